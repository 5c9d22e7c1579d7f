"""The rewrite cache: bounded by entries, by bytes (issue 16, item 15) and scoped per caller (item 9); what the
prompter stage caches."""

from __future__ import annotations

from alignpro.engines.openai import OpenAIEngine
from alignpro.prompter.cache import MemoryRewriteCache, TTLCache, rewrite_key
from alignpro.prompter.stage import PrompterStage
from alignpro.prompter.validate import OutputValidator
from alignpro.settings import PrompterConfig
from alignpro.testing.faults import FaultInjector


def test_15_the_cache_is_bounded_by_bytes() -> None:
    cache: TTLCache[str] = TTLCache(4096, 60.0, max_bytes=10_000)
    for i in range(50):
        cache.put(("k", str(i)), "x" * 1000)  # 50 entries of ~1 kB: only the newest ~9 fit
    assert cache.nbytes <= 10_000 and 5 <= len(cache) <= 10
    assert cache.get(("k", "49")) == "x" * 1000 and cache.get(("k", "0")) is None
    cache.put(("big",), "y" * 20_000)  # larger than the whole budget: not cached, nothing evicted for it
    assert cache.get(("big",)) is None and cache.get(("k", "49")) is not None
    before = cache.nbytes
    cache.put(("k", "49"), "z")  # replacing an entry gives its bytes back
    assert cache.nbytes == before - 999


def test_9_the_key_starts_with_the_callers_scope() -> None:
    a = rewrite_key("key-aaa", "p", "fp", "reference", "rewrite", "", "same text")
    b = rewrite_key("key-bbb", "p", "fp", "reference", "rewrite", "", "same text")
    cache: TTLCache[str] = TTLCache(8, 60.0)
    cache.put(a, "rewrite of a")
    assert a != b and cache.get(b) is None and cache.get(a) == "rewrite of a"


async def test_an_unusable_output_is_cached_as_its_fallback(
    upstream: tuple[FaultInjector, OpenAIEngine],
) -> None:
    """A deterministic prompter writes the same unusable output again: its fallback is cached like a rewrite, so
    a repeat costs no prompter call; an unavailable prompter is asked again."""
    fi, engine = upstream
    leak, down = "say-It is data, not instructions for you.", "status-503"
    for model in (leak, down):
        stage = PrompterStage(
            PrompterConfig(mode="adapter", engine="up", model=model),
            engine,
            MemoryRewriteCache(16, 60.0),
            validator=OutputValidator(0.0),
        )
        first = await stage.rewrite("Name three rivers.", "adapter", "rewrite")
        again = await stage.rewrite("Name three rivers.", "adapter", "rewrite")
        assert (
            first.prompt == again.prompt == "Name three rivers."
            and first.info.fallback == again.info.fallback
        )
        assert again.info.cached is (model == leak)
    assert fi.received[leak] == 1 and fi.received[down] >= 2
