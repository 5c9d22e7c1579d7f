"""Validation of the prompter's output: what the frozen model would be sent must be a usable request.

:func:`~alignpro.prompter.instruction.parse_output` already rejects empty, truncated and instruction-leaking output
and strips labels and quotes. :class:`OutputValidator` adds an *off-topic* check: the cosine similarity of the
MiniLM embeddings (the ones the rewards use) of the original request and the output must reach
``min_similarity``. A small prompter sometimes answers the request instead of rewriting it, or drifts to another
subject; serving that would answer a question nobody asked. Rejected outputs fall back to the original prompt,
and every rejection is counted by reason (:attr:`OutputValidator.counts`).

It is cheap: two short texts through MiniLM (a few ms; embeddings are cached). Where the embedding model is not
installed (the base install: no numpy, no sentence-transformers), the check is skipped, counted as
``similarity_unavailable`` and logged once; numpy and the embedder are imported on first use only, so this
module imports with the base install.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from alignpro.errors import ConfigError
from alignpro.prompter.injection import echo_fragment, override_directive
from alignpro.prompter.instruction import Parsed, parse_output
from alignpro.protocol import Contract

if TYPE_CHECKING:
    import numpy.typing as npt

log = logging.getLogger(__name__)


class Validator(Protocol):
    def __call__(
        self,
        original: str,
        output: str,
        finish_reason: str | None,
        contract: Contract = ...,
        context: str = ...,
    ) -> Parsed:
        """The usable text of the prompter's ``output`` for ``original`` (after the earlier turns ``context``),
        or the reason it is not usable."""
        ...


# texts -> one embedding row per text
Embed = Callable[[list[str]], "npt.NDArray[Any]"]

# MiniLM puts unrelated texts near 0 and paraphrases at 0.6-0.9; a harmful request and its safe redirection
# ("explain why X is illegal") share the topic and land at 0.3-0.7. Guidance shares fewer words with the request.
DEFAULT_MIN_SIMILARITY = {"rewrite": 0.2, "augment": 0.1}


class OutputValidator:
    """``parse_output`` plus the off-topic check; a callable of the :data:`Validator` shape."""

    def __init__(
        self,
        min_similarity: dict[str, float] | float | None = None,
        embed: Embed | None = None,
    ) -> None:
        if isinstance(min_similarity, int | float):
            min_similarity = {"rewrite": float(min_similarity), "augment": float(min_similarity)}
        self.min_similarity = dict(DEFAULT_MIN_SIMILARITY, **(min_similarity or {}))
        self._embed = embed
        self._embed_missing = False  # the embedding model is not installed: the off-topic check is skipped
        self._load_lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def _embedder(self) -> Embed | None:
        """The embedding function, loaded on first use; None where the embedding model is not installed.

        Only a missing install (an ImportError, or the embedder's ConfigError for the model package) turns the
        check off, with one warning; any other failure propagates, and the next call tries again.
        """
        if self._embed is None and not self._embed_missing:
            with self._load_lock:
                if self._embed is None and not self._embed_missing:
                    try:
                        from alignpro.scoring.embedder import default_embedder

                        embedder = default_embedder()
                        embedder.model  # noqa: B018 - load now, so a missing model is found once
                    except (ImportError, ConfigError) as exc:
                        self._embed_missing = True
                        log.warning(
                            "the off-topic check of prompter outputs is off (needs the [local] extra and "
                            "the embedding model): %s",
                            exc,
                        )
                        return None
                    self._embed = embedder.encode
        return self._embed

    def similarity(self, a: str, b: str) -> float | None:
        embed = self._embedder()
        if embed is None:
            return None
        import numpy as np  # present wherever an embedder is

        from alignpro.scoring.embedder import torch_threads

        with torch_threads(
            1
        ):  # two short texts: milliseconds on one thread, up to seconds on several (gate.py)
            v = np.asarray(embed([a, b]), dtype=np.float64)
        return float(np.dot(v[0], v[1]) / max(np.linalg.norm(v[0]) * np.linalg.norm(v[1]), 1e-12))

    def prefetch(self, texts: list[str]) -> None:
        """Embed ``texts`` in one batch ahead of many calls (the embedder caches them): one MiniLM pass instead
        of one per call."""
        embed = self._embedder()
        if embed is not None and texts:
            embed(list(dict.fromkeys(texts)))

    def __call__(
        self,
        original: str,
        output: str,
        finish_reason: str | None,
        contract: Contract = "rewrite",
        context: str = "",
    ) -> Parsed:
        parsed = parse_output(output, finish_reason, original, contract)
        if parsed.text is None:
            self._count(parsed.reason or "unusable")
            return parsed
        # A "rewrite" that is only a short verbatim cut of the request is what an injected prompter emits
        # (bench/injection.py: hijacks 5.6% -> 0%, no usable benign rewrite rejected).
        if contract == "rewrite" and echo_fragment(original, parsed.text):
            self._count("echo_fragment")
            return Parsed(None, "echo_fragment")
        # KEEP serves the caller's own words; anything the prompter wrote must not lift the assistant's rules.
        if parsed.text != original and override_directive(parsed.text):
            self._count("override_directive")
            return Parsed(None, "override_directive")
        threshold = self.min_similarity.get(contract, 0.0)
        if threshold > 0 and parsed.text != original:
            # A follow-up's rewrite names what it refers to from earlier turns: on topic for the conversation.
            sim = self.similarity(f"{context}\n{original}" if context else original, parsed.text)
            if sim is None:
                self._count("similarity_unavailable")
            elif sim < threshold:
                self._count("off_topic")
                return Parsed(None, "off_topic")
        self._count("ok")
        return parsed

    def fallback_rate(self) -> float:
        total = sum(v for k, v in self.counts.items() if k != "similarity_unavailable")
        return 0.0 if total == 0 else 1.0 - self.counts["ok"] / total


@functools.cache
def default_validator() -> OutputValidator:
    """The process-wide validator the prompter stage uses unless given another."""
    return OutputValidator()
