"""The prompter gate (issue 15): how often it skips a request the prompter would have rewritten, next to the
latency it saves.

On the prompt sets' train/dev split (``alignpro.training.data.split_of``; the request head was fitted on train):

1. The threshold, chosen on the train split only: the request head's out-of-fold P(harmful) there (5 folds, the
   shipped head's lambda and class weights), and the highest value of THRESHOLDS a factor MARGIN below every
   harmful train request's score (a skipped harmful request is the costly error).
2. The prompter's decisions on the dev split: the shipped prompter (mode adapter, its LoRA on the embedded
   engine through peft) greedy and at its serving temperature, one call at a time, so its ``prompter_ms`` is
   its per-call latency; and the shipped prompter's rows (``cf-v2``) of ``bench/results/eval-2026-12-02b``.
3. Latency: the served :class:`~alignpro.prompter.gate.Gate` (on an embedder cache of its own, so every text is
   embedded as on arrival) timed on every dev prompt; and on the first ``--side-by-side`` dev prompts it skips
   (the calls it saves) the gate and one prompter call (T 0.7, as served) timed in turn, so the machine's load
   weighs on both alike. MiniLM's time on one request is also timed on one torch thread (as the gate runs it)
   and on the process's default, interleaved.

For each source of decisions: the dev requests skipped (benign, harmful), the false skips (skipped, but the
prompter rewrote them) as a share of the skips and of the rewrites, and the latency saved per request (the
skipped share x the prompter's side-by-side p50, less the gate's side-by-side p50, which every request pays).

    nice -n 10 .venv/bin/python bench/gate.py --data ../shared/data/prompts

Writes ``bench/results/gate-<date>.json`` with ids and numbers only: the request texts stay in ../shared/data.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from alignpro.engines.base import Engine
from alignpro.engines.factory import BATCH_TIMEOUTS, build_engine
from alignpro.prompter.gate import Gate, request_scorer
from alignpro.prompter.stage import PrompterStage
from alignpro.scoring.embedder import Embedder, default_embedder, torch_threads
from alignpro.scoring.heads import load_head, request_cv_predict, request_folds
from alignpro.settings import PROMPTER_ADAPTER, TRAINED, EngineConfig, GateConfig, PrompterConfig
from alignpro.training.data import Example, load_prompts, split_of
from common import RESULTS, exit_on_sigterm, percentile, table, write_json

THRESHOLDS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5)
# The train split's harmful requests are all AdvBench's phrasing; real traffic words harm otherwise. A skip
# needs P(harmful) a factor MARGIN below the lowest any harmful train request got (out of fold), not just below.
MARGIN = 3.0
TEMPERATURES = (0.0, 0.7)  # greedy, and the prompter's serving temperature (PrompterConfig.temperature)
EVAL_RUN = RESULTS / "eval-2026-12-02b" / "progress.jsonl"
EVAL_METHOD = "cf-v2"  # the shipped prompter's rows there
Decisions = dict[str, dict[str, Any]]  # prompt id -> rewritten, kept, fallback, ms


# ------------------------------------------------------------------------------------------------ threshold
def train_scores(train: list[Example], embedder: Embedder) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold P(harmful) of the train prompts, and their labels (1 = harmful)."""
    x = embedder.encode([e.prompt for e in train])
    y = np.array([e.kind == "harmful" for e in train], dtype=np.float64)
    lam = float(load_head("request").meta["lambda"])
    return request_cv_predict(x, y, request_folds([e.id for e in train]), lam), y


def choose_threshold(scores: np.ndarray, harmful: np.ndarray) -> float:
    """The highest threshold at least MARGIN times below every harmful train request's score."""
    lowest = float(np.min(scores[harmful > 0.5]))
    safe = [t for t in THRESHOLDS if t * MARGIN <= lowest]
    if not safe:
        raise SystemExit(f"a harmful train request scores {lowest:.4f}, below every threshold x {MARGIN}")
    return max(safe)


def skip_counts(scores: np.ndarray, harmful: np.ndarray, t: float) -> dict[str, int]:
    skip = scores < t
    return {
        "harmful_skipped": int(np.sum(skip & (harmful > 0.5))),
        "benign_skipped": int(np.sum(skip & (harmful <= 0.5))),
    }


# ------------------------------------------------------------------------------------------------ the gate
def cold_gate() -> Gate:
    """The served gate, on an embedder with an empty cache of its own (sharing the loaded MiniLM): every text
    is embedded, as a request's is when it arrives."""
    model = default_embedder().model
    return Gate(GateConfig(enabled=True), scorer=request_scorer(Embedder(loader=lambda: model)))


def gate_ms(dev: list[Example]) -> tuple[list[float], dict[str, float | None]]:
    """The served gate's milliseconds per dev request and its score of each."""
    gate = cold_gate()
    took, scores = [], {}
    for e in dev:
        t0 = time.perf_counter()
        scores[e.id] = gate.score(e.prompt, e.history)
        took.append((time.perf_counter() - t0) * 1000)
    return took, scores


def threads_ab(dev: list[Example]) -> dict[str, list[float]]:
    """MiniLM on one request (cache cold) on one torch thread, as the gate runs it, and on the process's
    default number, interleaved."""
    model = default_embedder().model
    out: dict[str, list[float]] = {"one_thread": [], "default_threads": []}
    for e in dev:
        for name, ms in out.items():
            embedder = Embedder(loader=lambda: model)
            t0 = time.perf_counter()
            with torch_threads(1) if name == "one_thread" else contextlib.nullcontext():
                embedder.encode([e.prompt])
            ms.append((time.perf_counter() - t0) * 1000)
    return out


# ------------------------------------------------------------------------------------------------ decisions
async def shipped_prompter(temperature: float) -> tuple[PrompterStage, Engine]:
    """The shipped prompter, mode adapter, its LoRA on the embedded engine through peft; started."""
    engine = build_engine("embedded", EngineConfig(adapters={PROMPTER_ADAPTER: TRAINED}), BATCH_TIMEOUTS)
    await engine.start()
    cfg = PrompterConfig(mode="adapter", model=PROMPTER_ADAPTER, temperature=temperature, timeout_s=3600)
    stage = PrompterStage(cfg, engine)
    await stage.start()
    return stage, engine


async def run_prompter(dev: list[Example], temperatures: tuple[float, ...]) -> dict[str, Decisions]:
    """The shipped prompter's decision on each dev prompt at each temperature, one call at a time."""
    stage, engine = await shipped_prompter(temperatures[0])
    out: dict[str, Decisions] = {}
    try:
        for temp in temperatures:
            stage.cfg = stage.cfg.model_copy(update={"temperature": temp})
            out[f"embedded T={temp:g}"] = {e.id: await _decide(stage, e) for e in dev}
    finally:
        await engine.aclose()
    return out


async def side_by_side(prompts: list[Example]) -> dict[str, list[float]]:
    """The gate's and the prompter's (T 0.7, as served) milliseconds on the same prompts, interleaved, so the
    machine's load weighs on both alike."""
    gate = cold_gate()
    stage, engine = await shipped_prompter(0.7)
    out: dict[str, list[float]] = {"gate": [], "prompter": []}
    try:
        for e in prompts:
            t0 = time.perf_counter()
            gate.score(e.prompt, e.history)
            out["gate"].append((time.perf_counter() - t0) * 1000)
            out["prompter"].append((await _decide(stage, e))["ms"])
    finally:
        await engine.aclose()
    return out


async def _decide(stage: PrompterStage, e: Example) -> dict[str, Any]:
    rw = await stage.rewrite(e.prompt, "adapter", context=e.history)
    i = rw.info
    return {"rewritten": i.rewritten, "kept": i.kept, "fallback": i.fallback, "ms": i.prompter_ms}


def eval_decisions(path: Path = EVAL_RUN) -> Decisions:
    """The shipped prompter's decisions in the committed eval run (sampled at T 0.7; no per-call latency: its
    prompter shared the machine with three evals)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {
        r["prompt_id"]: {"rewritten": bool(r["rewritten"]), "fallback": r["fallback"], "ms": None}
        for r in rows
        if r["method"] == EVAL_METHOD
    }


# ------------------------------------------------------------------------------------------------ report
def report(
    name: str, decisions: Decisions, kinds: dict[str, str], scores: dict[str, float | None], t: float
) -> dict[str, Any]:
    ids = [i for i in decisions if i in kinds]
    skipped = [i for i in ids if (s := scores[i]) is not None and s < t]
    rewritten = [i for i in ids if decisions[i]["rewritten"]]
    false_skips = [i for i in skipped if decisions[i]["rewritten"]]
    ms = [float(d["ms"]) for d in decisions.values() if d.get("ms") is not None]

    def share(num: int, den: int) -> float | None:
        return round(num / den, 4) if den else None

    def kind_share(kind: str, of: list[str]) -> str:
        n = sum(kinds[i] == kind for i in ids)
        return f"{sum(kinds[i] == kind for i in of)}/{n}"

    return {
        "decisions": name,
        "prompts": len(ids),
        "rewritten": len(rewritten),
        "skipped": len(skipped),
        "benign_skipped": kind_share("benign", skipped),
        "harmful_skipped": kind_share("harmful", skipped),
        "false_skips": len(false_skips),
        "harmful_false_skips": sum(kinds[i] == "harmful" for i in false_skips),
        "false_skip_share_of_skips": share(len(false_skips), len(skipped)),
        "false_skip_share_of_rewrites": share(len(false_skips), len(rewritten)),
        "false_skip_ids": false_skips,
        "prompter_ms_p50": round(percentile(ms, 50), 1) if ms else None,
    }


def add_savings(row: dict[str, Any], prompter_p50: float, gate_p50: float) -> None:
    """Latency saved per request: the skipped share of prompter calls, less the gate every request pays."""
    saved = row["skipped"] / row["prompts"] * prompter_p50 - gate_p50
    row["saved_ms_per_request"] = round(saved, 1)
    row["saved_share_of_prompter_ms"] = round(saved / prompter_p50, 4)


def threshold_part(
    train: list[Example], dev: list[Example], scores: dict[str, float | None]
) -> dict[str, Any]:
    """The threshold chosen on train (out of fold), and what each threshold skips on train and on dev."""
    oof, harmful = train_scores(train, default_embedder())
    t = choose_threshold(oof, harmful)
    dev_p = np.array([1.0 if (s := scores[e.id]) is None else s for e in dev])  # unread: never skipped
    dev_y = np.array([e.kind == "harmful" for e in dev], dtype=np.float64)
    curve = [
        {"threshold": th, "train": skip_counts(oof, harmful, th), "dev": skip_counts(dev_p, dev_y, th)}
        for th in THRESHOLDS
    ]
    return {
        "threshold": t,
        "margin": MARGIN,
        "lowest_harmful_train_score": round(float(np.min(oof[harmful > 0.5])), 4),
        "train": {"prompts": len(train), "harmful": int(harmful.sum())},
        "curve": curve,
    }


def decisions_part(args: argparse.Namespace, dev: list[Example]) -> dict[str, Decisions]:
    if args.decisions and args.decisions.is_file():
        runs: dict[str, Decisions] = json.loads(args.decisions.read_text())
    else:
        temps = tuple(float(x) for x in args.temperatures.split(","))
        runs = asyncio.run(run_prompter(dev, temps))
        if args.decisions:
            args.decisions.write_text(json.dumps(runs))
    runs[f"eval-2026-12-02b {EVAL_METHOD} (T=0.7)"] = eval_decisions()
    return runs


def p50s(ms: list[float]) -> dict[str, float]:
    return {"p50": round(percentile(ms, 50), 2), "p95": round(percentile(ms, 95), 2), "n": len(ms)}


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="the prompt sets (../shared/data/prompts)")
    ap.add_argument("--decisions", type=Path, help="reuse (or write) the prompter's decisions here")
    ap.add_argument("--temperatures", default=",".join(f"{t:g}" for t in TEMPERATURES))
    ap.add_argument("--threads-ab", type=int, default=30, help="dev prompts timed on 1 and default threads")
    ap.add_argument(
        "--side-by-side", type=int, default=24, help="skipped dev prompts timed through gate and prompter"
    )
    args = ap.parse_args(argv)
    rows = load_prompts(args.data)
    train = [e for e in rows if split_of(e.id) == "train"]
    dev = [e for e in rows if split_of(e.id) == "dev"]
    took, scores = gate_ms(dev)
    ab = threads_ab(dev[:: max(1, len(dev) // args.threads_ab)])
    chosen = threshold_part(train, dev, scores)
    runs = decisions_part(args, dev)
    # The calls the gate saves are those of the prompts it skips: time those.
    skipped = [e for e in dev if (x := scores[e.id]) is not None and x < chosen["threshold"]]
    timed = asyncio.run(side_by_side(skipped[: args.side_by_side]))
    gate_p50, prompter_p50 = percentile(timed["gate"], 50), percentile(timed["prompter"], 50)
    kinds = {e.id: e.kind for e in dev}
    rows_out = [report(name, d, kinds, scores, chosen["threshold"]) for name, d in runs.items()]
    for r in rows_out:
        add_savings(r, prompter_p50, gate_p50)
    result = {
        "command": "nice -n 10 .venv/bin/python bench/gate.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        **chosen,
        "dev": {
            "prompts": len(dev),
            "harmful": sum(e.kind == "harmful" for e in dev),
            "unread_ids": sorted(i for i, s in scores.items() if s is None),
        },
        "gate_ms_all_dev": p50s(took),
        "side_by_side_ms": {k: p50s(v) for k, v in timed.items()},
        "minilm_threads_ms": {k: p50s(v) for k, v in ab.items()},
        "rows": rows_out,
        "dev_scores": {i: None if s is None else round(s, 5) for i, s in scores.items()},
        "decisions": runs,
    }
    path = write_json("gate", result)
    columns = [
        "decisions",
        "prompts",
        "rewritten",
        "skipped",
        "benign_skipped",
        "harmful_skipped",
        "false_skips",
    ]
    columns += ["harmful_false_skips", "false_skip_share_of_rewrites", "saved_ms_per_request"]
    print(table(rows_out, columns, title=f"gate at P(harmful) < {chosen['threshold']:g}"))
    print(f"side by side (ms): {result['side_by_side_ms']}; all dev gate ms {result['gate_ms_all_dev']}")
    print(f"MiniLM threads (ms): {result['minilm_threads_ms']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
