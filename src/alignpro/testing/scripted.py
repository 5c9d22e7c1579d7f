"""ScriptedUpstream: an OpenAI-compatible upstream whose answers follow a script, for tests of request *shapes*.

It plays both parts a gateway sends to, and records every request body as received (``requests``: path, raw
bytes):

* **the prompter** (a chat whose system turn is the rewrite instruction): it answers like a sampler. Given a
  ``seed`` its rewrite is a function of the seed; without one each call draws the next variant, so two unseeded
  calls for the same request never agree (what temperature-0.7 sampling does to a real prompter). The rewrite is
  ``"<variant> <request>"``; a request that comes after a ``<conversation>`` block gets
  ``"<request> (following up on: <the conversation's first user turn>)"``, a self-contained follow-up.
* **the frozen model**, as an agent's model: with ``tools`` and fewer than :data:`TOOL_STEPS` tool results in
  the chat it calls ``get_weather`` (ids ``call_1``, ``call_2``...); then it answers in text. With a JSON
  ``response_format`` it answers :data:`JSON_ANSWER`. Streams carry tool calls in pieces, as vLLM sends them.

``/v1/embeddings``, ``/tokenize`` and ``/v1/responses`` (not streamed) answer fixed shapes that name what they were
sent: a response's text is the number of input items it got.
It runs in a thread of the test process (uvicorn on a free loopback port), like
:class:`~alignpro.testing.faults.FaultInjector`.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from alignpro.engines.base import DONE_EVENT, sse_event
from alignpro.prompter.instruction import AUGMENT_INSTRUCTION, REWRITE_INSTRUCTION

VARIANTS = (
    "Please answer clearly:",
    "Answer precisely and helpfully:",
    "Give a careful, accurate answer:",
    "Respond clearly and completely:",
    "Answer this in plain words:",
    "Please give a helpful, correct answer:",
)
TOOL_STEPS = 2  # tool calls before the scripted agent model answers in text
JSON_ANSWER = '{"answer": 42, "unit": null}'
_REQUEST = re.compile(r"<request>\n(.*)\n</request>", re.S)
_CONVERSATION = re.compile(r"<conversation>\n(.*)\n</conversation>", re.S)


def tool_arguments(step: int) -> str:
    """The arguments string of the scripted model's tool call number ``step`` (1-based)."""
    return json.dumps({"city": "Paris", "step": step, "units": "celsius"})


class ScriptedUpstream:
    def __init__(self, port: int) -> None:
        self.port = port
        self.requests: list[tuple[str, bytes]] = []
        self.sent_events: list[bytes] = []  # the SSE events of the last stream it sent
        self._draws = itertools.count()
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/responses", self._responses, methods=["POST"]),
                Route("/v1/embeddings", self._embeddings, methods=["POST"]),
                Route("/tokenize", self._tokenize, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ScriptedUpstream:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("scripted upstream did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def bodies(self, kind: str) -> list[dict[str, Any]]:
        """The chat bodies received, of ``kind`` ``prompter`` or ``model``, in order."""
        out = []
        for path, raw in self.requests:
            body = json.loads(raw)
            if path.endswith("/chat/completions") and (_is_prompter(body) == (kind == "prompter")):
                out.append(body)
        return out

    async def _record(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        self.requests.append((request.url.path, raw))
        body: dict[str, Any] = json.loads(raw)
        return body

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "scripted", "object": "model"}]})

    async def _embeddings(self, request: Request) -> Response:
        body = await self._record(request)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [
            {"object": "embedding", "index": i, "embedding": [float(len(t)), 1.0]}
            for i, t in enumerate(inputs)
        ]
        return JSONResponse(
            {"object": "list", "data": data, "model": body["model"], "usage": {"prompt_tokens": 1}}
        )

    async def _responses(self, request: Request) -> Response:
        body = await self._record(request)
        items = body["input"] if isinstance(body["input"], list) else [body["input"]]
        text = f"{len(items)} input items"
        content = [{"type": "output_text", "text": text, "annotations": []}]
        message = {
            "type": "message",
            "id": "msg_1",
            "status": "completed",
            "role": "assistant",
            "content": content,
        }
        return JSONResponse(
            {
                "id": "resp_scripted",
                "object": "response",
                "created_at": int(time.time()),
                "model": body["model"],
                "status": "completed",
                "output": [message],
                "previous_response_id": body.get("previous_response_id"),
                "usage": {"input_tokens": 5, "output_tokens": 3, "total_tokens": 8},
            }
        )

    async def _tokenize(self, request: Request) -> Response:
        body = await self._record(request)
        text = body.get("prompt") or json.dumps(body.get("messages"))
        return JSONResponse(
            {"count": len(text.split()), "tokens": list(range(len(text.split()))), "max_model_len": 8192}
        )

    async def _chat(self, request: Request) -> Response:
        body = await self._record(request)
        prompter = _is_prompter(body)
        if prompter:
            message, finish = {"role": "assistant", "content": self._rewrite(body)}, "stop"
        else:
            message, finish = _agent_turn(body)
        if body.get("stream"):
            events = self._stream(body, message, finish, record=not prompter)
            return StreamingResponse(events, media_type="text/event-stream")
        return JSONResponse(_completion(body, message, finish))

    def _rewrite(self, body: dict[str, Any]) -> str:
        last = str(body["messages"][-1]["content"])
        request = _REQUEST.search(last)
        text = request.group(1) if request else last
        conversation = _CONVERSATION.search(last)
        if conversation:
            first = next(line for line in conversation.group(1).splitlines() if line.startswith("user: "))
            return f"{text} (following up on: {first.removeprefix('user: ')})"
        seed = body.get("seed")
        k = seed if isinstance(seed, int) else next(self._draws)
        return f"{VARIANTS[k % len(VARIANTS)]} {text}"

    async def _stream(
        self, body: dict[str, Any], message: dict[str, Any], finish: str, record: bool = True
    ) -> AsyncIterator[bytes]:
        """``message`` as a stream; ``record``: keep its events in ``sent_events`` (the frozen model's)."""

        def chunk(delta: dict[str, Any], reason: str | None = None) -> bytes:
            out = _completion(body, {}, reason)
            out["object"] = "chat.completion.chunk"
            out["choices"] = [{"index": 0, "delta": delta, "finish_reason": reason}]
            del out["usage"]
            return sse_event(out)

        events = [chunk({"role": "assistant", "content": ""})]
        for k, call in enumerate(message.get("tool_calls") or []):
            args = call["function"]["arguments"]
            head = {
                "index": k,
                "id": call["id"],
                "type": "function",
                "function": {"name": "get_weather", "arguments": ""},
            }
            events += [
                chunk({"tool_calls": [head]}),
                chunk({"tool_calls": [{"index": k, "function": {"arguments": args[: len(args) // 2]}}]}),
                chunk({"tool_calls": [{"index": k, "function": {"arguments": args[len(args) // 2 :]}}]}),
            ]
        if message.get("content"):
            events.append(chunk({"content": message["content"]}))
        events += [chunk({}, finish), DONE_EVENT]
        if record:
            self.sent_events = events
        for event in events:
            yield event


def _is_prompter(body: dict[str, Any]) -> bool:
    first = body["messages"][0]
    system = str(first.get("content")) if first.get("role") == "system" else ""
    return system.startswith((REWRITE_INSTRUCTION, AUGMENT_INSTRUCTION))


def _agent_turn(body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The scripted model's message for the chat ``body`` and its finish reason."""
    messages = body["messages"]
    results = sum(1 for m in messages if m.get("role") == "tool")
    if body.get("tools") and results < TOOL_STEPS:
        call = {
            "id": f"call_{results + 1}",
            "type": "function",
            "function": {"name": "get_weather", "arguments": tool_arguments(results + 1)},
        }
        return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
    fmt = (body.get("response_format") or {}).get("type")
    if fmt in ("json_object", "json_schema"):
        return {"role": "assistant", "content": JSON_ANSWER}, "stop"
    user = next(m for m in reversed(messages) if m.get("role") == "user")
    return {"role": "assistant", "content": f"After {results} tool results: {user['content']}"}, "stop"


def _completion(body: dict[str, Any], message: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "scripted"),
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }
