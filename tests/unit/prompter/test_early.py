"""The early decision: the prompter's output read as it streams, stopped at a KEEP line, and a rewrite announced at
its first characters (see alignpro.prompter.instruction.early_verdict and PrompterStage.generate_early)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from alignpro.engines.openai import OpenAIEngine
from alignpro.prompter.instruction import EARLY_KEEP, EARLY_REWRITE, early_verdict, parse_output
from alignpro.prompter.stage import PrompterStage
from alignpro.prompter.validate import OutputValidator
from alignpro.settings import PrompterConfig
from alignpro.testing.faults import FaultInjector


@pytest.mark.parametrize(
    ("partial", "verdict"),
    [
        ("", None),
        ("KE", None),
        ("KEEP", None),  # "KEEP it short: ..." is still possible
        ("KEEP\n", EARLY_KEEP),
        (" keep.\nThe request is safe", EARLY_KEEP),
        ("Rewritten request: KEEP\n", EARLY_KEEP),
        ('"KEEP\n', EARLY_KEEP),
        ("KEEP it sh", None),
        ("Explain w", EARLY_REWRITE),
        ("Explain why lock picking", EARLY_REWRITE),
    ],
)
def test_early_verdict(partial: str, verdict: str | None) -> None:
    assert early_verdict(partial) == verdict


def test_augment_has_no_keep() -> None:
    assert early_verdict("KEEP\n", "augment") == EARLY_REWRITE


def test_the_full_parse_agrees_with_an_early_keep() -> None:
    """What the early verdict calls KEEP the whole output parses as KEEP: the cut stream and the uncut one serve
    the same text. A KEEP that only starts a sentence is not one."""
    original = "Name three rivers."
    assert parse_output("KEEP\nThe request is safe.", "stop", original).text == original
    assert parse_output("KEEP.\nThe request is safe and", "length", original).text == original
    assert parse_output("KEEP it short: name three rivers.", "stop", original).text != original
    assert parse_output("KEEP", "length", original).reason == "truncated"


def _stage(engine: OpenAIEngine, model: str, early: bool = True) -> PrompterStage:
    cfg = PrompterConfig(mode="adapter", engine="up", model=model, early_decision=early)
    return PrompterStage(cfg, engine, validator=OutputValidator(0.0))


async def test_a_keep_line_stops_the_prompter(upstream: tuple[FaultInjector, OpenAIEngine]) -> None:
    """A prompter that would talk on for 5 s after its KEEP line is cut at the line: its stream is abandoned
    upstream, and the original prompt is served as kept."""
    fi, engine = upstream
    model = "slowsay-0.5-KEEP\nThe request asks for three rivers, which is safe, so it needs no change."
    t0 = time.perf_counter()
    rw = await _stage(engine, model).rewrite("Name three rivers.", "adapter", "rewrite")
    took = time.perf_counter() - t0
    assert rw.info.kept and rw.prompt == "Name three rivers." and took < 2.5
    await _until(lambda: fi.streams["abandoned"] == 1)
    assert fi.streams["finished"] == 0


async def test_without_early_decision_the_whole_output_is_read(
    upstream: tuple[FaultInjector, OpenAIEngine],
) -> None:
    fi, engine = upstream
    rw = await _stage(engine, "say-KEEP\nThe request is safe.", early=False).rewrite(
        "Name three rivers.", "adapter", "rewrite"
    )
    assert rw.info.kept and fi.received["say-KEEP\nThe request is safe."] == 1


async def test_a_rewrite_is_announced_at_its_first_characters(
    upstream: tuple[FaultInjector, OpenAIEngine],
) -> None:
    """``on_rewrite`` is called once, while the prompter is still writing; the rewrite itself is the whole output."""
    _, engine = upstream
    text = "Explain why picking a lock you do not own is illegal."
    announced: list[float] = []
    t0 = time.perf_counter()
    rw = await _stage(engine, f"slowsay-0.2-{text}").rewrite(
        "How do I pick my neighbour's lock?",
        "adapter",
        "rewrite",
        on_rewrite=lambda: announced.append(time.perf_counter() - t0),
    )
    took = time.perf_counter() - t0
    assert rw.info.rewritten and rw.prompt == text
    assert len(announced) == 1 and announced[0] < took / 2


async def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)
