"""The Responses API (``/v1/responses``) served over chat completions, for an engine that only chats.

vLLM serves ``/v1/responses`` itself and the OpenAI engine relays it; the embedded engine answers it through
:class:`ChatResponses`: the request's ``instructions`` and ``input`` items become a chat, the chat's answer becomes
a ``response`` object (or, streamed, the Responses events: ``response.created``, ``response.output_text.delta``
... ``response.completed``). ``previous_response_id`` continues a conversation this process stored (``store``,
on by default as in the OpenAI API; the last :data:`STORED` conversations are kept); an unknown id is a 404.
Text only: the embedded models call no tools, so tool items in ``input`` are refused with a 400.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from alignpro.engines.base import sse_event
from alignpro.errors import InvalidRequestError, NotFoundError
from alignpro.protocol import input_text, new_id

STORED = 1024  # conversations kept for previous_response_id
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}

Chat = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
ChatStream = Callable[[dict[str, Any]], AsyncIterator[bytes]]


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat messages of a Responses request's ``instructions`` and ``input``."""
    out: list[dict[str, Any]] = []
    if body.get("instructions"):
        out.append({"role": "system", "content": str(body["instructions"])})
    items = body.get("input")
    if isinstance(items, str):
        return [*out, {"role": "user", "content": items}]
    for i, item in enumerate(items or []):
        role = _ROLES.get(str(item.get("role")))
        if item.get("type", "message") != "message" or role is None:
            raise InvalidRequestError(
                f"input[{i}]: this engine takes message items only (type {item.get('type')!r})",
                param=f"input[{i}]",
                code="unsupported_input_item",
            )
        out.append({"role": role, "content": input_text(item.get("content"))})
    return out


class ChatResponses:
    """``/v1/responses`` over an engine's chat completions, with a bounded store for ``previous_response_id``."""

    def __init__(self, chat: Chat, chat_stream: ChatStream, stored: int = STORED) -> None:
        self._chat = chat
        self._chat_stream = chat_stream
        self._stored = stored
        self._store: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()

    def _chat_body(self, body: dict[str, Any]) -> dict[str, Any]:
        history: list[dict[str, Any]] = []
        previous = body.get("previous_response_id")
        if previous is not None:
            if previous not in self._store:
                raise NotFoundError(
                    f"Previous response with id '{previous}' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            history = self._store[previous]
        chat: dict[str, Any] = {"model": body.get("model"), "messages": history + _messages(body)}
        for src, dst in (
            ("max_output_tokens", "max_tokens"),
            ("temperature", "temperature"),
            ("top_p", "top_p"),
        ):
            if body.get(src) is not None:
                chat[dst] = body[src]
        return chat

    def _keep(self, rid: str, chat: dict[str, Any], text: str, body: dict[str, Any]) -> None:
        if body.get("store") is False:
            return
        self._store[rid] = [*chat["messages"], {"role": "assistant", "content": text}]
        while len(self._store) > self._stored:
            self._store.popitem(last=False)

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        chat = self._chat_body(body)
        resp = await self._chat(chat)
        choice = resp["choices"][0]
        text = str(choice["message"].get("content") or "")
        rid = new_id("resp")
        self._keep(rid, chat, text, body)
        usage = resp.get("usage") or {}
        return _response(rid, body, text, choice.get("finish_reason"), usage)

    def stream(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        chat = self._chat_body(body)  # errors (an unknown previous id...) before the stream starts
        chunks = self._chat_stream({**chat, "stream": True, "stream_options": {"include_usage": True}})
        return self._events(body, chat, chunks)

    async def _events(
        self, body: dict[str, Any], chat: dict[str, Any], chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        rid, mid = new_id("resp"), new_id("msg")
        seq = iter(range(1 << 30))

        def event(kind: str, **fields: Any) -> bytes:
            return sse_event({"type": kind, "sequence_number": next(seq), **fields}, kind)

        def part(text: str) -> dict[str, Any]:
            return {"type": "output_text", "text": text, "annotations": []}

        def item(text: str, status: str) -> dict[str, Any]:
            content = [part(text)] if status == "completed" else []
            return {"type": "message", "id": mid, "status": status, "role": "assistant", "content": content}

        started = _response(rid, body, "", None, {}, status="in_progress")
        yield event("response.created", response=started)
        yield event("response.in_progress", response=started)
        yield event("response.output_item.added", output_index=0, item=item("", "in_progress"))
        yield event(
            "response.content_part.added", item_id=mid, output_index=0, content_index=0, part=part("")
        )
        pieces: list[str] = []
        finish: str | None = None
        usage: dict[str, Any] = {}
        try:
            async for raw in chunks:
                data = _data(raw)
                if "error" in data:  # the engine failed mid-stream: the Responses API's last event
                    yield event("error", **data["error"])
                    return
                usage = data.get("usage") or usage
                for c in data.get("choices") or []:
                    finish = c.get("finish_reason") or finish
                    delta = (c.get("delta") or {}).get("content")
                    if delta:
                        pieces.append(delta)
                        yield event(
                            "response.output_text.delta",
                            item_id=mid,
                            output_index=0,
                            content_index=0,
                            delta=delta,
                            logprobs=[],
                        )
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
        text = "".join(pieces)
        self._keep(rid, chat, text, body)
        yield event(
            "response.output_text.done", item_id=mid, output_index=0, content_index=0, text=text, logprobs=[]
        )
        yield event(
            "response.content_part.done", item_id=mid, output_index=0, content_index=0, part=part(text)
        )
        yield event("response.output_item.done", output_index=0, item=item(text, "completed"))
        final = _response(rid, body, text, finish, usage, mid=mid)
        yield event(f"response.{final['status']}", response=final)


def _data(event: bytes) -> dict[str, Any]:
    if not event.startswith(b"data: {"):
        return {}
    parsed = json.loads(event[len(b"data: ") :])
    return parsed if isinstance(parsed, dict) else {}


def _response(
    rid: str,
    body: dict[str, Any],
    text: str,
    finish: str | None,
    usage: dict[str, Any],
    status: str | None = None,
    mid: str | None = None,
) -> dict[str, Any]:
    """A Responses API ``response`` object with one assistant message ``text``."""
    truncated = finish == "length"
    status = status or ("incomplete" if truncated else "completed")
    output = []
    if status != "in_progress":
        content = [{"type": "output_text", "text": text, "annotations": []}]
        output = [
            {
                "type": "message",
                "id": mid or new_id("msg"),
                "status": "completed",
                "role": "assistant",
                "content": content,
            }
        ]
    n_in, n_out = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "model": body.get("model"),
        "status": status,
        "output": output,
        "instructions": body.get("instructions"),
        "previous_response_id": body.get("previous_response_id"),
        "max_output_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "store": body.get("store", True),
        "parallel_tool_calls": False,
        "tool_choice": "none",
        "tools": [],
        "text": {"format": {"type": "text"}},
        "metadata": body.get("metadata") or {},
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "usage": {
            "input_tokens": n_in,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": n_out,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": n_in + n_out,
        },
    }
