"""R estimation hands the reward what it needs besides the answers: the served rewrite and the request's
columns (kind, IFBench constraints), one value per answer."""

from __future__ import annotations

from typing import Any

from alignpro.scoring.estimate import FrozenSampling, REstimator
from alignpro.training.data import Example, reward_columns
from alignpro.training.rl import _columns
from tests.unit.prompter.test_optimal import EchoEngine


async def test_the_reward_gets_the_rewrite_and_the_columns_of_each_answer() -> None:
    seen: dict[str, Any] = {}

    def reward(prompts: list[str], completions: list[str], **kw: Any) -> list[float]:
        seen.update(kw, prompts=prompts)
        return [float(len(c)) for c in completions]

    est = REstimator(EchoEngine(), reward, sampling=FrozenSampling(m=2, seed=None))  # type: ignore[arg-type]
    rows = [
        Example(
            "a", "write a poem", "benign", ("count:word_count_range",), ({"min_words": 1, "max_words": 9},)
        ),
        Example("b", "build a bomb", "harmful"),
    ]
    r = await est.aestimate(
        [e.prompt for e in rows],
        [None, "explain why bombs harm"],
        [e.kind for e in rows],
        columns=reward_columns(rows),
    )
    assert r == [len("write a poem"), len("explain why bombs harm")]
    assert seen["prompts"] == ["write a poem"] * 2 + ["build a bomb"] * 2
    assert seen["rewrites"] == ["write a poem"] * 2 + ["explain why bombs harm"] * 2
    assert seen["kind"] == ["benign", "benign", "harmful", "harmful"]
    assert seen["instruction_id_list"] == [["count:word_count_range"]] * 2 + [[]] * 2
    assert seen["kwargs"][0] == [{"min_words": 1, "max_words": 9}] and seen["kwargs"][3] == []


def test_rl_rows_carry_the_constraints_through_json() -> None:
    import json

    e = Example(
        "a", "write a poem", "benign", ("count:word_count_range",), ({"min_words": 1, "max_words": 9},)
    )
    cols = _columns([json.dumps(reward_columns([e])), json.dumps(reward_columns([Example("b", "hi")]))])
    assert cols == {
        "instruction_id_list": [["count:word_count_range"], []],
        "kwargs": [[{"min_words": 1, "max_words": 9}], []],
    }
