"""Evaluation of prompters (``alignpro eval``), one concept per module:

:mod:`~alignpro.eval.config`    what a run is asked to do: the options, the methods (report rows), the prompts
:mod:`~alignpro.eval.runner`    the run: every method through the gateway, each answer scored
:mod:`~alignpro.eval.tap`       the prompter's calls as the gateway makes them (the KL and cost columns)
:mod:`~alignpro.eval.progress`  ``progress.jsonl``: resuming, and the records the report is computed from
:mod:`~alignpro.eval.stats`     the numbers
:mod:`~alignpro.eval.report`    the files

The names below are imported on first use, so ``import alignpro.eval.stats`` stays light (no matplotlib, no
gateway).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EvalConfig": "alignpro.eval.config",
    "Method": "alignpro.eval.config",
    "parse_prompters": "alignpro.eval.config",
    "select_prompts": "alignpro.eval.config",
    "EngineSpec": "alignpro.engines.factory",
    "EvalRunner": "alignpro.eval.runner",
    "arun_eval": "alignpro.eval.runner",
    "run_eval": "alignpro.eval.runner",
    "PrompterTap": "alignpro.eval.tap",
    "read_progress": "alignpro.eval.progress",
    "records_from_progress": "alignpro.eval.progress",
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
