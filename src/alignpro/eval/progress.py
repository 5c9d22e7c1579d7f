"""``progress.jsonl``, what makes ``alignpro eval`` resumable and its report checkable.

Each finished (method, prompt) is one line (:func:`append_row`), carrying the :func:`method_fingerprint` of
everything that shapes its numbers; a rerun keeps the lines whose fingerprint is current (:func:`latest_rows`) and
redoes the rest. The report's records are read back from the file alone (:func:`records_from_progress`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from alignpro.engines.factory import EngineSpec
from alignpro.eval.config import (
    FROZEN,
    SAFE_REWRITE_TEMPLATE,
    SAFETY_SYSTEM_PROMPT,
    SYSTEM,
    EvalConfig,
    Method,
)
from alignpro.eval.stats import EvalRecord
from alignpro.prompter.version import instruction_digest

log = logging.getLogger(__name__)

PROGRESS_JSONL = "progress.jsonl"

Row = dict[str, Any]  # one line of the progress file
# How answers are scored and what a line records; lines of another version are redone. 2: the reward gets the
# request's columns (rewrites, constraints), the refusal detector's safe flag, constraint shares, changed inputs.
SCORING_VERSION = 2


# ------------------------------------------------------------------------------------------ fingerprint
def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.iterdir()) if path.is_dir() else [path]:
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _prompter_parts(cfg: EvalConfig, m: Method) -> dict[str, Any]:
    """What shapes a method's rewrites: the prompter's model and sampling, its adapter's files, the sampler's K."""
    parts: dict[str, Any] = {}
    if m.mode != "off":
        parts["prompter"] = [
            str(EngineSpec.parse(cfg.prompter_model)),
            cfg.contract,
            instruction_digest(cfg.contract),
            cfg.prompter_max_tokens,
            cfg.prompter_temperature,
            cfg.prompter_top_p,
        ]
    if m.adapter_path:
        from alignpro.embedded import resolve_adapter

        path = Path(resolve_adapter(m.adapter_path))
        parts["adapter"] = _file_digest(path) if path.exists() else m.adapter_path
    if m.mode == "optimal":
        parts["optimal"] = [cfg.candidates, cfg.lam]
    if m.control == SYSTEM:
        parts["control"] = [m.control, SAFETY_SYSTEM_PROMPT]
    elif m.control is not None:
        from alignpro.scoring.heads import HEADS_DIR

        # The template control's routing is the request head's: a refitted head redoes its lines.
        head = HEADS_DIR / "request.npz"
        parts["control"] = [m.control, SAFE_REWRITE_TEMPLATE, _file_digest(head) if head.is_file() else None]
    return parts


def method_fingerprint(cfg: EvalConfig, m: Method, baseline: str) -> str:
    """A digest of everything that shapes the numbers of ``m``'s lines: when it changes, they are redone."""
    parts: dict[str, Any] = {
        "engine": str(EngineSpec.parse(cfg.frozen)) if m.engine == FROZEN else cfg.upper_bound_model,
        "sampling": [
            cfg.samples,
            cfg.max_tokens,
            cfg.temperature,
            cfg.top_p,
            cfg.seed if cfg.request_seeds else None,
        ],
        "reward": cfg.reward,
        "judge": [cfg.judge, cfg.judge_max_tokens] if cfg.judge and m.name != baseline else None,
        "scoring": SCORING_VERSION,
        "mode": m.mode,
        "best_of": m.best_of,
        "common_answers": m.shapes_prompt and not cfg.request_seeds,
        **_prompter_parts(cfg, m),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- the file
def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


@contextmanager
def open_progress(path: Path) -> Iterator[TextIO]:
    """``path`` opened for appending; a last line torn by a kill is ended first, so the next row starts on its
    own line."""
    with path.open("a", encoding="utf-8") as sink:
        if path.stat().st_size and not _ends_with_newline(path):
            sink.write("\n")
        yield sink


def append_row(sink: TextIO, row: Row) -> None:
    """One line per finished prompt, flushed at once: a killed run loses only the prompts in flight."""
    sink.write(json.dumps(row, ensure_ascii=False) + "\n")
    sink.flush()


def read_progress(path: Path) -> list[Row]:
    """The lines of a progress file; a torn last line (the run was killed while writing it) is skipped."""
    if not path.is_file():
        return []
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                log.warning("skipping an unreadable line in %s (an interrupted write)", path)
    return rows


# ------------------------------------------------------------------------------------------ reading back
def latest_rows(
    rows: Sequence[Row],
    fingerprints: dict[str, str] | None = None,
    prompt_ids: set[str] | None = None,
) -> dict[tuple[str, str], Row]:
    """The lines that match the run (method fingerprint, prompt set; None: any) by (method, prompt id); the last
    line of a pair wins."""
    latest: dict[tuple[str, str], Row] = {}
    for row in rows:
        if fingerprints is not None and fingerprints.get(row["method"]) != row.get("fingerprint"):
            continue
        if prompt_ids is not None and row["prompt_id"] not in prompt_ids:
            continue
        latest[(row["method"], row["prompt_id"])] = row
    return latest


def records_from_progress(
    rows: Sequence[Row],
    fingerprints: dict[str, str] | None = None,
    prompt_ids: set[str] | None = None,
) -> list[EvalRecord]:
    """The records of the progress lines that match the run (method fingerprint, prompt set); the last line of a
    (method, prompt) pair wins."""
    latest = latest_rows(rows, fingerprints, prompt_ids)
    return [EvalRecord.from_dict(r) for row in latest.values() for r in row["records"]]


def method_counts(rows: Sequence[Row], fingerprints: dict[str, str], prompt_ids: set[str]) -> dict[str, Any]:
    """Per method, over the lines that match the run: prompts, prompts rewritten, prompts changed (a rewrite,
    guidance or a system message), fallbacks by reason and the frozen model's completion tokens."""
    per: dict[str, dict[str, Any]] = {}
    for (method, _), row in latest_rows(rows, fingerprints, prompt_ids).items():
        s = per.setdefault(
            method,
            {"prompts": 0, "rewritten": 0, "changed": 0, "fallbacks": {}, "frozen_completion_tokens": 0},
        )
        s["prompts"] += 1
        s["rewritten"] += int(bool(row.get("rewritten")))
        s["changed"] += int(bool(row.get("changed")))
        if row.get("fallback"):
            s["fallbacks"][row["fallback"]] = s["fallbacks"].get(row["fallback"], 0) + 1
        s["frozen_completion_tokens"] += int(row.get("frozen_completion_tokens") or 0)
    return per
