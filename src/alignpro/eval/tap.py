"""The prompter as ``alignpro eval``'s gateway sees it: :class:`PrompterTap` notes each call made for the request
being served (:func:`tap_calls` starts the note), so the runner can read back the rewrite exactly as sampled and
the tokens it cost."""

from __future__ import annotations

import contextvars
from typing import Any

from alignpro.engines.base import Engine

# The prompter calls made on behalf of the request being served in this asyncio task (each prompt runs in its own
# task, so the context variable keeps concurrent prompts apart).
_CALLS: contextvars.ContextVar[list[dict[str, Any]] | None] = contextvars.ContextVar(
    "alignpro_eval_calls", default=None
)


def tap_calls() -> list[dict[str, Any]]:
    """A fresh list that the prompter calls of the current asyncio task are appended to from now on, one dict per
    call: ``model``, ``messages``, ``outputs`` (``[text, finish_reason]`` per choice), ``completion_tokens``."""
    calls: list[dict[str, Any]] = []
    _CALLS.set(calls)
    return calls


class PrompterTap(Engine):
    """The prompter engine as the gateway sees it, noting each chat call (messages, outputs, token usage) for the
    request in flight: the KL column needs the rewrite exactly as sampled, before validation cleaned it, and the
    cost column the tokens the prompter generated. Everything else is delegated; start/close stay with the owner."""

    def __init__(self, inner: Engine) -> None:
        super().__init__(inner.name)
        self.inner = inner
        self.kind = inner.kind

    def default_model(self) -> str:
        return self.inner.default_model()

    async def ready(self) -> dict[str, Any]:
        return await self.inner.ready()

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        resp = await self.inner.chat(body)
        calls = _CALLS.get()
        if calls is not None:
            calls.append(
                {
                    "model": body.get("model"),
                    "messages": body.get("messages"),
                    "outputs": [
                        [str(c["message"].get("content") or ""), c.get("finish_reason")]
                        for c in resp["choices"]
                    ],
                    "completion_tokens": int((resp.get("usage") or {}).get("completion_tokens") or 0),
                }
            )
        return resp

    def chat_stream(self, body: dict[str, Any]) -> Any:
        return self.inner.chat_stream(body)

    async def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.inner.completion(body)

    def completion_stream(self, body: dict[str, Any]) -> Any:
        return self.inner.completion_stream(body)
