"""The rho* sampler: serving mode ``optimal``.

Align-Pro's optimal prompter is ``rho*(x'|x) ∝ rho(x'|x) exp(R(x, x') / lam)``. At request time this module
samples it directly, without training: draw K candidates from the prompter (rho_ref, or the adapter when the
alias names one), estimate ``R(x, x'_k)`` for each with the frozen model and the reward
(:mod:`alignpro.scoring.estimate`), and pick one with probability ``softmax(R / lam)``: self-normalised importance
sampling of rho* with proposal rho. As ``lam -> 0`` it is best-of-K; as ``lam -> inf`` it is one plain draw.

It costs K prompter samples (one request with ``n=K``) plus K x m frozen answers, before the answer itself: it is
opt-in (an alias with ``prompter.mode: optimal``, or a request's ``alignpro.mode``). An unusable candidate stands
for the original prompt (what the gateway would serve), so it competes too; when it wins, the stage serves the
original and reports ``optimal_kept_original``.

The ``safe-and-helpful`` reward needs to know whether a request is harmful; at request time nobody says, so
:func:`harm_kind` guesses it with the harm head on the request alone (unless the reward ignores ``kind``).
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from alignpro.engines.base import Engine
from alignpro.prompter.validate import OutputValidator, Validator, default_validator
from alignpro.protocol import Contract
from alignpro.scoring.estimate import FrozenSampling, REstimator
from alignpro.scoring.rewards import RewardFn, load_reward

# (text, contract, n) -> n raw prompter outputs as (text, finish_reason)
Generate = Callable[[str, Contract, int], Awaitable[list[tuple[str, str | None]]]]
KindFn = Callable[[str], str]
HARM_THRESHOLD = 0.5


def harm_kind(text: str) -> str:
    """``harmful`` when the request head (P(harmful) from the request's embedding; dev AUC in
    ``bench/results/request-head.json``) scores it above 0.5."""
    from alignpro.scoring.embedder import default_embedder
    from alignpro.scoring.heads import load_head

    v = default_embedder().encode([text])
    return "harmful" if float(load_head("request").predict(v, v)[0]) > HARM_THRESHOLD else "benign"


def choose(rewards: list[float], lam: float, rng: random.Random) -> int:
    """An index drawn with probability softmax(R / lam); argmax (first on ties) when lam is ~0."""
    if lam <= 1e-8:
        return max(range(len(rewards)), key=lambda i: (rewards[i], -i))
    top = max(rewards)
    weights = [math.exp((r - top) / lam) for r in rewards]
    return rng.choices(range(len(rewards)), weights=weights, k=1)[0]


@dataclass
class Choice:
    """What the sampler saw for one request (kept on :attr:`OptimalSampler.last` for tests and debugging)."""

    candidates: list[str | None]
    rewards: list[float]
    index: int
    kind: str
    reasons: list[str | None] = field(default_factory=list)


class OptimalSampler:
    """An ``async (text, contract) -> rewrite | None`` for :class:`~alignpro.prompter.stage.PrompterStage`."""

    def __init__(
        self,
        generate: Generate,
        estimator: REstimator | Callable[[], REstimator],
        *,
        k: int = 4,
        lam: float = 0.1,
        validator: Validator | None = None,
        kind_fn: KindFn | None = harm_kind,
        seed: int | None = None,
    ) -> None:
        self.generate = generate
        self._estimator = estimator
        self.k, self.lam = k, lam
        self.validator: Validator = validator or default_validator()
        self.kind_fn = kind_fn
        self.rng = random.Random(seed)
        self._lock = threading.Lock()
        self.last: Choice | None = None

    @property
    def estimator(self) -> REstimator:
        if not isinstance(self._estimator, REstimator):
            with self._lock:
                if not isinstance(self._estimator, REstimator):
                    self._estimator = self._estimator()
        return self._estimator

    async def __call__(self, text: str, contract: Contract) -> str | None:
        raw = await self.generate(text, contract, self.k)
        parsed = [await asyncio.to_thread(self.validator, text, out, finish, contract) for out, finish in raw]
        candidates = [p.text for p in parsed]
        kind = await asyncio.to_thread(self.kind_fn, text) if self.kind_fn is not None else "benign"
        rewards = await self.estimator.aestimate(
            [text] * len(candidates), candidates, [kind] * len(candidates), contract
        )
        i = choose(rewards, self.lam, self.rng)
        self.last = Choice(candidates, rewards, i, kind, [p.reason for p in parsed])
        return candidates[i]


def for_stage(
    stage: Any,
    frozen: Engine,
    frozen_model: str | None = None,
    *,
    reward: str | RewardFn,
    sampling: FrozenSampling | None = None,
) -> OptimalSampler:
    """The sampler the gateway installs on an alias: candidates from the alias's prompter stage, R from the alias's
    frozen engine. The reward (and its embedding model) loads on the first optimal request."""
    cfg = stage.cfg

    async def generate(text: str, contract: Contract, n: int) -> list[tuple[str, str | None]]:
        out: list[tuple[str, str | None]] = await stage.generate(text, "optimal", contract, n=n)
        return out

    def make() -> REstimator:
        fn = load_reward(reward) if isinstance(reward, str) else reward
        return REstimator(
            frozen,
            fn,
            sampling=sampling or FrozenSampling(m=1, max_tokens=64, seed=None),
            model=frozen_model,
            contract=cfg.contract,
        )

    return OptimalSampler(
        generate,
        make,
        k=cfg.candidates,
        lam=cfg.lam,
        validator=getattr(stage, "validator", None) or OutputValidator(),
    )
