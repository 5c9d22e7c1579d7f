"""Validate the rule-based refusal detector (``alignpro.scoring.refusal``) against human labels.

Reports AUC, and precision/recall of the "safe" class at the detector's own threshold, on:

* ``labels/refusal.jsonl`` (PyRIT's refusal labels: 1 = refused or did not carry the request out), dev and train
  parts. The split is the one the embedding heads use (``heads.row_hash(prompt) % 4 == 0`` is dev) and, for
  comparison, ``int(sha256(prompt).hexdigest(), 16) % 4 == 0``;
* ``labels/harm.jsonl`` (human harm scores): "safe" = harm_score < 0.5. A secondary check: that set measures
  harmful content, not refusal, and many harmless rows are plain compliant answers to benign questions;
* ``tests/data/smollm2_labelled.jsonl``: SmolLM2-135M-Instruct's own greedy answers (with and without a
  safety-instruction rewrite of the request), labelled by hand; reported whole, by set and by kind.

    .venv/bin/python bench/reward_validation.py --data ../shared/data --out bench/results/reward-validation.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from alignpro.scoring.refusal import THRESHOLD, assess

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "smollm2_labelled.jsonl"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def heads_hash(prompt: str) -> int:
    """The split hash of ``alignpro.scoring.heads.row_hash`` (kept here so the bench needs no numpy)."""
    digest = hashlib.sha256(prompt.encode() + b"\x00").digest()
    return int.from_bytes(digest[:8], "big")


def hex_hash(prompt: str) -> int:
    return int(hashlib.sha256(prompt.encode()).hexdigest(), 16)


def auc(labels: list[int], scores: list[float]) -> float:
    """Area under the ROC curve, ties counted half; nan when a class is missing."""
    pos = [s for y, s in zip(labels, scores, strict=True) if y]
    neg = [s for y, s in zip(labels, scores, strict=True) if not y]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def evaluate(rows: Iterable[tuple[str, str, int]]) -> dict[str, Any]:
    """Metrics of the detector's "safe" score against labels (1 = safe/refused)."""
    data = list(rows)
    labels = [y for _, _, y in data]
    scores = [assess(p, r).score for p, r, _ in data]
    flagged = [s >= THRESHOLD for s in scores]
    tp = sum(1 for y, f in zip(labels, flagged, strict=True) if y and f)
    fp = sum(1 for y, f in zip(labels, flagged, strict=True) if not y and f)
    fn = sum(1 for y, f in zip(labels, flagged, strict=True) if y and not f)
    tn = len(data) - tp - fp - fn
    return {
        "n": len(data),
        "positives": sum(labels),
        "auc": auc(labels, scores),
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "accuracy": (tp + tn) / len(data) if data else float("nan"),
        # Share of the complied (label 0) rows scored below the threshold: how much compliance is caught.
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "threshold": THRESHOLD,
    }


def refusal_parts(rows: list[dict[str, Any]], hash_fn: Callable[[str], int]) -> dict[str, dict[str, Any]]:
    def part(dev: bool) -> list[tuple[str, str, int]]:
        return [
            (r["prompt"], r["response"], int(r["refusal"]))
            for r in rows
            if (hash_fn(r["prompt"]) % 4 == 0) == dev
        ]

    return {"dev": evaluate(part(True)), "train": evaluate(part(False))}


def run(data: Path, fixture: Path) -> dict[str, Any]:
    refusal = read_jsonl(data / "labels" / "refusal.jsonl")
    harm = read_jsonl(data / "labels" / "harm.jsonl")
    report: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "detector": "alignpro.scoring.refusal.safe_response_score (rules, pure Python)",
        "positive_class": "safe: refused, redirected or did not carry the request out",
        "refusal_heads_split": refusal_parts(refusal, heads_hash),
        "refusal_hex_split": refusal_parts(refusal, hex_hash),
        "harm": evaluate((r["prompt"], r["response"], int(float(r["harm_score"]) < 0.5)) for r in harm),
    }
    if fixture.is_file():
        report["smollm2_labelled"] = fixture_parts(read_jsonl(fixture))
    return report


def fixture_parts(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The hand-labelled answers: all, by set ("dev" was read while writing the SmolLM2-specific patterns,
    "heldout" was generated and labelled after the detector was frozen) and by kind of request."""

    def pick(subset: str | None = None, kind: str | None = None) -> dict[str, Any]:
        return evaluate(
            (r["prompt"], r["response"], int(r["safe"]))
            for r in rows
            if subset in (None, r.get("set")) and kind in (None, r["kind"])
        )

    return {
        "all": pick(),
        "dev": pick(subset="dev"),
        "heldout": pick(subset="heldout"),
        "harmful": pick(kind="harmful"),
        "benign": pick(kind="benign"),
        "heldout_harmful": pick(subset="heldout", kind="harmful"),
    }


def table(report: dict[str, Any]) -> str:
    lines = [f"{'set':34} {'n':>5} {'pos':>5} {'AUC':>6} {'prec':>6} {'recall':>6} {'spec':>6}"]
    flat: list[tuple[str, dict[str, Any]]] = []
    for key, value in report.items():
        if isinstance(value, dict) and "auc" in value:
            flat.append((key, value))
        elif isinstance(value, dict):
            flat += [(f"{key}/{k}", v) for k, v in value.items() if isinstance(v, dict) and "auc" in v]
    for name, m in flat:
        lines.append(
            f"{name:34} {m['n']:5d} {m['positives']:5d} {m['auc']:6.3f} {m['precision']:6.3f} {m['recall']:6.3f} "
            f"{m['specificity']:6.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "data", help="the shared data folder"
    )
    parser.add_argument("--fixture", type=Path, default=FIXTURE, help="hand-labelled SmolLM2 answers (JSONL)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "reward-validation.json")
    args = parser.parse_args(argv)
    report = run(args.data, args.fixture)
    print(table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
