"""Speculative start: the frozen model begins on the request as sent while the prompter decides.

A prompter keeps most prompts as they are (KEEP), and then the user waited for a decision that changed nothing.
With ``prompter.speculative`` the gateway starts the frozen model on the request as received at the moment the
prompter starts, and holds what comes back: a non-streamed answer stays inside a task, a stream is opened up to
its first event and nothing after it is read. When the prompter is done, the request the gateway would send is
compared with the held one:

* the same body (the prompter kept the prompt, or failed open), and the held call still running or done: the held
  answer is the answer, and a stream goes on from its first event;
* any difference (a rewritten turn, a guidance): the held call is cancelled, which closes its upstream
  connection (vLLM aborts a request whose client went away), and the frozen model starts on what the gateway
  sends now.

Release needs the identical body, so no part of an answer to a prompt the prompter rewrote can reach the
client. The prompter's early verdict (:meth:`PrompterStage.generate_early`) cancels the held call at its first
characters when they cannot be KEEP, so a rewrite wastes few frozen-model tokens. That verdict is a forecast: an
output that then fails validation serves the original after all, and the frozen model starts on it again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

# What the frozen engine's call gave: a whole response, or a stream's first event and the rest of its events.
Opened = dict[str, Any] | tuple[bytes, AsyncIterator[bytes]]
T = TypeVar("T")


class Held:
    """A frozen-model call on ``body``, started before the prompter decided; see the module docstring."""

    def __init__(self, body: dict[str, Any], call: Awaitable[Opened]) -> None:
        self.body = body
        self.started = time.perf_counter()
        self.task: asyncio.Future[Opened] = asyncio.ensure_future(call)
        self.stopped = False  # cancelled before it finished: there is no answer to release

    def cancel(self) -> None:
        """Stop the call if it is still running (the prompter's early verdict; synchronous on purpose)."""
        if not self.task.done():
            self.task.cancel()
            self.stopped = True

    def answers(self, body: dict[str, Any]) -> bool:
        """Whether the held call is the answer to ``body``: the very body it was started on, and not stopped."""
        return not self.stopped and self.body == body

    async def take(self) -> Opened:
        """The held answer; the call's error, if it failed, as the same call made now would raise it."""
        return await self.task

    async def discard(self) -> None:
        """Cancel the call and close what it opened; nothing of it is read any further."""
        self.cancel()
        # wait() does not raise the task's own error or cancellation, only this task's cancellation.
        await asyncio.wait({self.task})
        if self.task.cancelled() or self.task.exception() is not None:
            return
        opened = self.task.result()
        if isinstance(opened, tuple):
            await opened[1].aclose()  # type: ignore[attr-defined]


async def guarded(held: Held | None, work: Awaitable[T]) -> T:
    """``work`` (the prompter stage); if it fails or is cancelled, the held call is discarded with it."""
    try:
        return await work
    except BaseException:
        if held is not None:
            await held.discard()
        raise
