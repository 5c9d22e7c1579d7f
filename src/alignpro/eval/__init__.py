"""Evaluation of prompters: :mod:`~alignpro.eval.runner` (``alignpro eval``), :mod:`~alignpro.eval.stats` (the
numbers) and :mod:`~alignpro.eval.report` (the files).

The names below are imported on first use, so ``import alignpro.eval.stats`` stays light (no matplotlib, no
gateway).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EvalConfig": "alignpro.eval.runner",
    "EvalRunner": "alignpro.eval.runner",
    "EngineSpec": "alignpro.engines.factory",
    "Method": "alignpro.eval.runner",
    "arun_eval": "alignpro.eval.runner",
    "run_eval": "alignpro.eval.runner",
    "parse_prompters": "alignpro.eval.runner",
    "read_progress": "alignpro.eval.runner",
    "records_from_progress": "alignpro.eval.runner",
    "select_prompts": "alignpro.eval.runner",
    "EvalRecord": "alignpro.eval.stats",
    "summarize": "alignpro.eval.stats",
    "write_report": "alignpro.eval.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'alignpro.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
