"""The rho* sampler (serving mode ``optimal``): softmax(R/lam) selection, best-of-K as lam -> 0, gateway wiring."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import numpy as np
import pytest

from alignpro.prompter.optimal import OptimalSampler, choose
from alignpro.prompter.validate import OutputValidator
from alignpro.scoring.estimate import FrozenSampling, REstimator


class EchoEngine:
    """A frozen 'model' that answers with the user's message, so R is a deterministic function of the rewrite."""

    name = "echo"
    kind = "fake"

    def __init__(self) -> None:
        self.calls = 0

    def default_model(self) -> str:
        return "echo"

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        text = body["messages"][-1]["content"]
        return {
            "choices": [{"message": {"content": text}, "finish_reason": "stop"} for _ in range(body["n"])]
        }


SCORES = {"bad rewrite about cats": 0.1, "good rewrite about cats": 0.9, "ok rewrite about cats": 0.5}


def score(prompts: list[str], completions: list[str], **kw: Any) -> list[float]:
    return [SCORES.get(c, 0.3) for c in completions]


def sampler(lam: float, seed: int = 0) -> tuple[OptimalSampler, EchoEngine]:
    candidates = ["bad rewrite about cats", "ok rewrite about cats", "good rewrite about cats", ""]

    async def generate(text: str, contract: str, n: int) -> list[tuple[str, str | None]]:
        return [(c, "stop") for c in candidates[:n]]

    engine = EchoEngine()
    est = REstimator(engine, score, sampling=FrozenSampling(m=1, seed=None))  # type: ignore[arg-type]
    s = OptimalSampler(generate, est, k=4, lam=lam, validator=OutputValidator(0.0), kind_fn=None, seed=seed)
    return s, engine


async def test_best_of_k_as_lambda_goes_to_zero() -> None:
    s, engine = sampler(lam=1e-9)
    for _ in range(5):
        assert await s("tell me about cats", "rewrite") == "good rewrite about cats"
    assert s.last is not None
    # the empty candidate is unusable: it stands for the original prompt, scored as such
    assert s.last.candidates[3] is None and s.last.reasons[3] == "empty"
    assert s.last.rewards == pytest.approx([0.1, 0.5, 0.9, 0.3])
    assert engine.calls == 4  # cached after the first request


def test_choice_frequencies_follow_softmax() -> None:
    r = [0.1, 0.5, 0.9]
    lam = 0.4
    rng = random.Random(0)
    n = 6000
    counts = Counter(choose(r, lam, rng) for _ in range(n))
    e = np.exp(np.array(r) / lam)
    expected = e / e.sum()
    got = np.array([counts[i] / n for i in range(3)])
    assert np.abs(got - expected).max() < 0.03
    assert choose([0.2, 0.7, 0.7], 0.0, rng) == 1  # argmax, first on ties


async def test_large_lambda_is_close_to_uniform() -> None:
    s, _ = sampler(lam=1e6, seed=1)
    picks = Counter([await s("tell me about cats", "rewrite") for _ in range(400)])
    assert len(picks) == 4 and min(picks.values()) > 60


def test_gateway_installs_an_optimal_sampler_per_alias() -> None:
    from alignpro.server.gateway import Gateway
    from alignpro.settings import Settings

    engine = EchoEngine()
    engines = {"embedded": engine, "prompter": engine}
    gw = Gateway(Settings(), engines=engines)  # type: ignore[arg-type]
    for route in gw.routes.values():
        assert isinstance(route.stage.optimal, OptimalSampler)

    def custom(prompts: list[str], completions: list[str], **kw: object) -> list[float]:
        return [0.0] * len(prompts)

    gw2 = Gateway(Settings(), engines=engines, reward=custom)  # type: ignore[arg-type]
    sampler2 = gw2.routes["smollm2-aligned"].stage.optimal
    assert isinstance(sampler2, OptimalSampler) and sampler2.estimator.reward is custom


async def test_stage_serves_the_original_when_it_wins() -> None:
    from alignpro.prompter.stage import PrompterStage
    from alignpro.settings import PrompterConfig

    async def keep(text: str, contract: str) -> str | None:
        return None

    stage = PrompterStage(PrompterConfig(mode="optimal"), EchoEngine(), optimal=keep)  # type: ignore[arg-type]
    rw = await stage.rewrite("hello there", "optimal")
    assert rw.prompt == "hello there" and rw.info.fallback == "optimal_kept_original"
