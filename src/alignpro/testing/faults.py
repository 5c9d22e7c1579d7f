"""FaultInjector: a deliberately broken OpenAI-compatible upstream, for fault tests only.

It answers like an instant OpenAI server, except for what the request's ``model`` asks it to break:

    ok            a normal answer (streaming too)
    say-<text>    a normal answer whose content is <text> (a scripted prompter output, KEEP say)
    echo          answers with the text of the last message (a prompter that keeps every request as it is)
    slow-<s>      sleep <s> seconds before answering (``waits`` counts "finished" and "left": the client went away)
    leak-<n>      answer HTTP <n> with an error message that holds the Authorization header it got, a traceback
                  and a connection string (an upstream whose errors must not reach clients)
    negusage      a normal answer (streaming too) whose usage has negative token counts
    status-<n>    answer HTTP <n> with an OpenAI error body
    badjson       200 with a body that is not JSON
    dropstream    start a stream, send one chunk, then cut the connection
    flaky-<n>[-x] answer 503 to the first <n> requests for this model name, then normally
    ratelimit-<n>[-x]  answer 429 with ``Retry-After: 1`` to the first <n> requests, then normally
    slowstream-<s>  a stream of 6 chunks, <s> seconds apart (counts streams finished and abandoned by the client)
    slowsay-<s>-<text>  <text> streamed in pieces of 3 characters, <s> seconds apart (counted like slowstream): a
                  prompter whose output the gateway reads as it is generated

It runs in a thread of the test process (uvicorn on a free loopback port) and counts what it received, or as
its own process for benchmarks: ``python -m alignpro.testing.faults --port 9100``.

:func:`missing_modules` is another fault: an extra that is not installed, in this process.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def _chat(model: str, text: str = "ok") -> dict[str, Any]:
    return {
        "id": "chatcmpl-fault",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


def _chunk(model: str, content: str | None, finish: str | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    body = {
        "id": "chatcmpl-fault",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


NEGATIVE_USAGE = {"prompt_tokens": -5, "completion_tokens": -1, "total_tokens": -6}


def _last_text(body: dict[str, Any]) -> str:
    messages = body.get("messages") or [{"content": body.get("prompt")}]
    content = messages[-1].get("content")
    return content if isinstance(content, str) else json.dumps(content)


class FaultInjector:
    def __init__(self, port: int) -> None:
        self.port = port
        self.received: Counter[str] = Counter()
        self.streams: Counter[str] = Counter()  # slowstream outcomes: "finished" | "abandoned"
        self.waits: Counter[str] = Counter()  # slow-<s> outcomes: "finished" | "left"
        self.last_bodies: list[dict[str, Any]] = []
        self.last_headers: list[dict[str, str]] = []  # of the requests in last_bodies
        self.roots: dict[
            str, str
        ] = {}  # extra models /v1/models lists, with the path vLLM would say they came from
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/completions", self._chat, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                # the relayed routes answer a fixed valid shape: enough for fuzzing the gateway's side of them
                Route("/v1/responses", self._fixed, methods=["POST"]),
                Route("/v1/embeddings", self._fixed, methods=["POST"]),
                Route("/tokenize", self._fixed, methods=["POST"]),
            ]
        )
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FaultInjector:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fault injector did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.server.force_exit = (
            True  # do not wait for injected sleeps (slow-<s>) that nobody awaits any more
        )
        self.thread.join(timeout=10)

    async def _fixed(self, request: Request) -> Response:
        self.received[request.url.path] += 1
        if request.url.path == "/tokenize":
            return JSONResponse({"count": 1, "tokens": [1], "max_model_len": 2048})
        if request.url.path == "/v1/embeddings":
            return JSONResponse(
                {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.0]}]}
            )
        text = [{"type": "output_text", "text": "ok", "annotations": []}]
        item = {
            "type": "message",
            "id": "msg-fault",
            "status": "completed",
            "role": "assistant",
            "content": text,
        }
        return JSONResponse(
            {"id": "resp-fault", "object": "response", "status": "completed", "output": [item]}
        )

    async def _models(self, request: Request) -> Response:
        cards = [{"id": "ok", "object": "model"}]
        cards += [{"id": m, "object": "model", "root": root} for m, root in self.roots.items()]
        return JSONResponse({"object": "list", "data": cards})

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        model = str(body.get("model", "ok"))
        self.received[model] += 1
        self.last_bodies.append(body)
        self.last_headers.append(dict(request.headers))
        if model.startswith("slow-"):
            if not await self._wait(request, float(model.split("-", 1)[1])):
                return Response(status_code=499)
        elif model.startswith("leak-"):
            status = int(model.split("-", 1)[1])
            leak = (
                f"bad key {request.headers.get('authorization')!r}; Traceback (most recent call last):\n"
                '  File "/srv/app.py", line 3, in handler\nconnect postgres://admin:hunter2@db:5432/prod'
            )
            return JSONResponse({"error": {"message": leak, "type": "injected"}}, status_code=status)
        elif model.startswith("status-"):
            status = int(model.split("-", 1)[1])
            err = {"message": f"injected {status}", "type": "injected", "param": None, "code": "injected"}
            return JSONResponse({"error": err}, status_code=status)
        elif model == "badjson":
            return Response(b"<html>not json", media_type="application/json")
        elif model.startswith(("flaky-", "ratelimit-")):
            kind, times = model.split("-")[:2]
            if self.received[model] <= int(times):
                status = 503 if kind == "flaky" else 429
                err = {"message": f"injected {kind}", "type": "injected", "param": None, "code": kind}
                headers = {"retry-after": "1"} if kind == "ratelimit" else None
                return JSONResponse({"error": err}, status_code=status, headers=headers)
        if body.get("stream") and model.startswith(("slowstream-", "slowsay-")):
            kind, rest = model.split("-", 1)
            gap, _, text = rest.partition("-")
            pieces = [str(i) for i in range(6)] if kind == "slowstream" else _pieces(text)
            events = self._slow_stream(model, float(gap), pieces)
            return StreamingResponse(events, media_type="text/event-stream")
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                self._stream(model, _answer(model, body), drop=model == "dropstream", usage=usage),
                media_type="text/event-stream",
            )
        answer = _chat(model, _answer(model, body))
        if model == "negusage":
            answer["usage"] = NEGATIVE_USAGE
        return JSONResponse(answer)

    async def _wait(self, request: Request, seconds: float) -> bool:
        """Sleep ``seconds``, or less if the client goes away first (False, counted as "left")."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if await request.is_disconnected():
                self.waits["left"] += 1
                return False
            await asyncio.sleep(0.05)
        self.waits["finished"] += 1
        return True

    async def _stream(self, model: str, text: str, drop: bool, usage: bool = False) -> Any:
        first, *rest = _pieces(text)
        yield _chunk(model, first)
        if drop:
            raise ConnectionResetError("injected: stream dropped")
        for piece in rest:
            yield _chunk(model, piece)
        yield _chunk(model, None, "stop")
        if model == "negusage" or usage:  # stream_options.include_usage: a last chunk with no choices
            last: dict[str, Any] = {
                "id": "chatcmpl-fault",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [],
                "usage": NEGATIVE_USAGE if model == "negusage" else _chat(model)["usage"],
            }
            yield b"data: " + json.dumps(last).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    async def _slow_stream(self, model: str, gap: float, pieces: list[str]) -> Any:
        try:
            for piece in pieces:
                yield _chunk(model, piece)
                await asyncio.sleep(gap)
            yield _chunk(model, None, "stop")
            yield b"data: [DONE]\n\n"
            self.streams["finished"] += 1
        except BaseException:  # the client closed the connection: starlette cancels or closes this generator
            self.streams["abandoned"] += 1
            raise


def _answer(model: str, body: dict[str, Any]) -> str:
    """The text a normal answer holds, streamed or not: what ``say-<text>`` says, the last message for ``echo``."""
    if model == "echo":
        return _last_text(body)
    return model[4:] if model.startswith("say-") else "ok"


def _pieces(text: str) -> list[str]:
    """``text`` as the pieces of 3 characters a stream sends it in (one empty piece for no text)."""
    return [text[i : i + 3] for i in range(0, len(text), 3)] or [""]


@contextmanager
def missing_modules(*names: str) -> Iterator[None]:
    """Fault: the modules ``names`` are not installed (the base install without an extra). Importing one raises
    ImportError and ``importlib.util.find_spec`` finds none, as a ``None`` entry in ``sys.modules`` makes them;
    code that imported them before keeps its references."""
    saved = {n: sys.modules[n] for n in names if n in sys.modules}
    for n in names:
        sys.modules[n] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Run the FaultInjector as a process (benchmarks).")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    fi = FaultInjector(args.port)
    fi.server.run()
