"""Fixtures of the prompter stage's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from alignpro.engines.openai import OpenAIEngine
from alignpro.settings import EngineConfig
from alignpro.testing.faults import FaultInjector
from alignpro.testing.servers import free_port


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[FaultInjector, OpenAIEngine]]:
    """A scripted upstream (the model name says what it answers) and an openai engine on it."""
    fi = FaultInjector(free_port()).start()
    engine = OpenAIEngine("up", EngineConfig(kind="openai", urls=[fi.url], model="ok"), httpx.Timeout(10), 30)
    await engine.start()
    yield fi, engine
    await engine.aclose()
    fi.stop()
