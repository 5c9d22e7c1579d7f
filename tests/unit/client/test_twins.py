"""The sync client is the async client with the I/O un-awaited (httpcore's "unasync" rule, checked here rather
than generated): a change made to one twin and not the other fails this test, bodies included."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

from alignpro.client import AlignPro, AsyncAlignPro, _async, _sync

CLIENT = Path(_async.__file__).parent

# async spelling -> sync spelling, applied in order to the async source.
UNASYNC = [
    (r"\basync def\b", "def"),
    (r"\bawait ", ""),
    (r"\basync with\b", "with"),
    (r"\basync for\b", "for"),
    (r"\bAsyncAlignPro\b", "AlignPro"),
    (r"\bAsyncStream\b", "Stream"),
    (r"__aenter__", "__enter__"),
    (r"__aexit__", "__exit__"),
    (r"\bAsyncClient\b", "Client"),
    (r"\baclose\b", "close"),
    (r"\baread\b", "read"),
    (r"\bimport asyncio\b", "import time"),
    (r"\basyncio\.sleep\b", "time.sleep"),
]


def _body(path: Path) -> str:
    """The module's source without its docstring (the one place the twins may say different things)."""
    source = path.read_text()
    doc = ast.get_docstring(ast.parse(source), clean=False)
    assert doc is not None
    return source.split('"""', 2)[2]


def unasync(source: str) -> str:
    for pattern, replacement in UNASYNC:
        source = re.sub(pattern, replacement, source)
    return source


def test_sync_client_is_the_async_client_unasynced() -> None:
    expected, actual = unasync(_body(CLIENT / "_async.py")), _body(CLIENT / "_sync.py")
    assert actual == expected, "edit both twins: _sync.py must equal _async.py under UNASYNC"


def test_public_signatures_match() -> None:
    def public(cls: type) -> dict[str, inspect.Signature]:
        return {
            n: inspect.signature(f) for n, f in vars(cls).items() if callable(f) and not n.startswith("_")
        }

    for sync_cls, async_cls in [(AlignPro, AsyncAlignPro)] + [
        (getattr(_sync, n), getattr(_async, n)) for n in ("ChatCompletions", "Completions", "Models")
    ]:
        a, s = public(async_cls), public(sync_cls)
        assert a.keys() == s.keys()
        for name in a:
            assert unasync(str(a[name])) == str(s[name]), f"{sync_cls.__name__}.{name}"
