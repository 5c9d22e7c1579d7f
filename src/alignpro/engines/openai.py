"""An OpenAI-compatible HTTP upstream (vLLM in production), with replicas.

One pooled :class:`~alignpro.engines.transport.UpstreamClient` (aiohttp) per engine, opened in the app lifespan. A request goes to the healthy replica
with the fewest outstanding requests. A replica that fails ``failure_threshold`` times in a row is ejected and
probed (``GET /models``) every ``probe_interval_s`` until it answers again.

A request is sent to a second replica only when that cannot duplicate work: the connection to the first
could not be opened (nothing was sent), or the first answered 503, which vLLM and AlignPro itself use for "not
taken on" (overloaded, draining, no upstream of its own). A 502 is *not* retried: behind a proxy or a chained
gateway it can mean the request reached a model server that then failed, so a retry could run it twice. A read
timeout or a stream that has started is never retried either. Streams are relayed event by event as the
upstream sends them; a stream that breaks off ends with an error event and ``data: [DONE]`` so clients stop
cleanly. When the client goes away the relay is closed, which closes the upstream connection, and vLLM aborts
the generation.

Client errors from the upstream (vLLM's 400 for a prompt over the context length, a bad ``top_k``...) are
relayed with their status, but in the OpenAI error shape: vLLM answers ``{"type": "BadRequestError", "code":
400}``, which clients cannot branch on, so type and code are normalised (``context_length_exceeded`` for the
context case). An upstream 401/403 means the gateway's own upstream key is wrong, not the caller's: that is a
502. An upstream's error text reaches the client only for those client errors and only when it is safe
(:func:`safe_message`: no upstream key, traceback or credentials); 429 and 5xx get a message of ours. The
upstream's own text is logged, with the key redacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from alignpro.engines.base import Engine, stream_ends, stream_error
from alignpro.engines.transport import UpstreamClient, UpstreamResponse
from alignpro.errors import (
    AlignProError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from alignpro.settings import EngineConfig

log = logging.getLogger(__name__)

_RETRYABLE_STATUS = {503}
# OpenAI error types by status, for upstreams (vLLM) that put an exception class name in "type".
_OPENAI_TYPES = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
# vLLM: "This model's maximum context length is 2048 tokens. However, your prompt contains ..."; OpenAI and
# others say "maximum context length" too.
_CONTEXT_RE = re.compile(r"maximum context length|context length|too many tokens|prompt is too long", re.I)


@dataclass
class Replica:
    url: str
    outstanding: int = 0
    failures: int = 0
    healthy: bool = True
    ejected_at: float = 0.0


# What an upstream error message must not carry to a client: secrets, tracebacks, addresses with credentials.
_UNSAFE = re.compile(
    r"traceback \(most recent call last\)|\bfile \"[^\"]+\", line \d+|\w+://[^/\s:@]+:[^/\s@]+@|bearer\s+\S|"
    r"\b(?:api[_-]?key|password|passwd|secret|token)\s*[=:]",
    re.IGNORECASE,
)
REDACTED = "[redacted]"
_IDENT = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _parsed(content: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(content)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, REDACTED) if secret else text


def safe_message(message: str, secret: str | None) -> str | None:
    """``message`` when it is fit for a client: it does not hold the gateway's upstream key (``secret``), a
    traceback, a connection string or a credential; else None."""
    if (secret and secret in message) or _UNSAFE.search(message) or len(message) > 2000:
        return None
    return message


def _server_error(status: int, parsed: dict[str, Any] | None, headers: Mapping[str, str]) -> AlignProError:
    """The error for an upstream 429 or 5xx: its status and a message of ours (its own text is logged only)."""
    msg = f"upstream answered {status}"
    if status == 429:
        theirs = parsed.get("error") if parsed else None
        theirs = theirs if isinstance(theirs, dict) else {}
        # Its code and type are identifiers a client may branch on; its message is text, which is not relayed.
        fields = {k: v for k in ("code", "type") if isinstance(v := theirs.get(k), str) and _IDENT.match(v)}
        message = "the upstream is rate limiting the gateway; retry later"
        err = UpstreamStatusError(429, {"error": {**fields, "message": message}}, message)
        # The upstream knows when it will take work again; a client that honours Retry-After (openai-python
        # does) should hear it rather than retry blind.
        retry_after = (headers.get("retry-after") or "").strip()
        if retry_after.isdigit():  # delta-seconds; anything else is not relayed
            err.headers["retry-after"] = retry_after
        return err
    if status == 503:
        # Passed on as a 503, not a 502: a gateway in front of this one may then try another replica.
        return UpstreamUnavailableError(f"the upstream is unavailable ({msg})")
    return UpstreamError(msg)


def client_error(status: int, parsed: dict[str, Any] | None, path: str, secret: str | None) -> AlignProError:
    """The error to raise for an upstream 4xx (not 429): relayed with its status, in the OpenAI shape, with the
    upstream's message when :func:`safe_message` passes it (vLLM's validation messages help the caller)."""
    msg = f"the upstream refused the request ({status})"
    err = parsed.get("error") if parsed else None
    if not isinstance(err, dict):  # FastAPI's {"detail": ...} and other shapes
        detail = parsed.get("detail") if parsed else None
        err = {"message": str(detail) if detail else msg}
    if status in (401, 403):
        return UpstreamError(f"the upstream refused the gateway's credentials ({status})")
    message = safe_message(str(err.get("message") or msg), secret) or msg
    param = err.get("param") if isinstance(err.get("param"), str) else None
    code = err.get("code") if isinstance(err.get("code"), str) else None
    if status == 400 and _CONTEXT_RE.search(message):
        code = "context_length_exceeded"
        param = "messages" if path.endswith("/chat/completions") else "prompt"
    elif code is None:
        code = "model_not_found" if status == 404 else "invalid_value"
    kind = err.get("type")
    if not isinstance(kind, str) or not kind.endswith("_error"):
        kind = _OPENAI_TYPES.get(status, "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return UpstreamStatusError(status, body, message)


# Extras of OpenAI's API and vLLM's sampling parameters that only shape the sampling of the one answer asked
# for. Not here: what changes the template or the model's code path (chat_template, chat_template_kwargs,
# logits_processors, add_special_tokens, mm_processor_kwargs, prompt_embeds), what lifts a limit or multiplies
# the work (ignore_eos, best_of, use_beam_search, min_tokens over max_tokens, priority), ids and internals
# (request_id, kv_transfer_params, vllm_xargs, cache_salt): an operator adds them with allowed_fields.
OPENAI_EXTRA_FIELDS = frozenset(
    """
    top_k min_p repetition_penalty length_penalty include_stop_str_in_output skip_special_tokens
    spaces_between_special_tokens stop_token_ids structured_outputs guided_json guided_regex guided_choice
    guided_grammar guided_whitespace_pattern logit_bias metadata store service_tier reasoning_effort
    truncate_prompt_tokens
    """.split()
)


class OpenAIEngine(Engine):
    kind = "openai"

    def __init__(
        self, name: str, cfg: EngineConfig, timeout: httpx.Timeout, request_timeout_s: float
    ) -> None:
        super().__init__(name)
        self.cfg = cfg
        self.extra_fields = OPENAI_EXTRA_FIELDS | frozenset(cfg.allowed_fields)
        self.content_types = frozenset(cfg.content_types)
        self.timeout = timeout
        self.request_timeout_s = request_timeout_s
        self.replicas = [Replica(u.rstrip("/")) for u in cfg.urls]
        self.seeds = cfg.seeds
        self._client: UpstreamClient | None = None
        self._prober: asyncio.Task[None] | None = None
        self._secret = cfg.api_key.get_secret_value() if cfg.api_key else None
        self._headers = {"authorization": f"Bearer {self._secret}"} if self._secret else {}

    def default_model(self) -> str:
        return self.cfg.model

    async def start(self) -> None:
        # aiohttp, max_inflight connections per replica: the cheapest client per request of those measured
        # (engines/transport.py, bench/README.md).
        self._client = UpstreamClient(self.timeout, self._headers, self.cfg.max_inflight)
        self._prober = asyncio.create_task(self._probe_loop(), name=f"alignpro-probe-{self.name}")

    async def aclose(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
        if self._client is not None:
            await self._client.aclose()

    async def fingerprint(self, model: str) -> str:
        """``model@<root>``: vLLM lists each LoRA adapter with the path it was loaded from (``root``), so an adapter
        reloaded from another path under the same name is another fingerprint. ``model`` when no replica says."""
        for rep in self.replicas:
            try:
                resp = await self.client.get(f"{rep.url}/models", timeout=self.timeout.connect or 5.0)
                cards = resp.json().get("data", []) if resp.status_code == 200 else []
            except (httpx.HTTPError, ValueError, AttributeError):
                continue
            for card in cards:
                if isinstance(card, dict) and card.get("id") == model and card.get("root"):
                    return f"{model}@{card['root']}"
        return model

    async def load_adapter(self, name: str, path: str) -> list[str]:
        """vLLM's ``POST /v1/load_lora_adapter`` on each replica (vLLM started with
        ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` and ``--enable-lora``). A replica that refuses stops the load
        with its error; those before it keep the adapter (loading it again under a new name is harmless)."""
        loaded: list[str] = []
        for rep in self.replicas:
            try:
                resp = await self.client.post(
                    f"{rep.url}/load_lora_adapter", json={"lora_name": name, "lora_path": path}
                )
            except httpx.HTTPError as exc:
                raise UpstreamUnavailableError(
                    f"cannot load the adapter on {rep.url}: {type(exc).__name__}"
                ) from exc
            if resp.status_code >= 400:
                # FastAPI's bare 404: the route is there only with runtime LoRA updating allowed.
                if resp.status_code == 404 and b'"detail":"Not Found"' in resp.content.replace(b" ", b""):
                    raise UpstreamError(
                        f"{rep.url} has no /load_lora_adapter: start vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
                    )
                raise self._refused(rep, "/load_lora_adapter", resp.status_code, resp.content, resp.headers)
            loaded.append(rep.url)
        return loaded

    def http_clients(self) -> list[UpstreamClient]:
        return [self.client]

    @property
    def client(self) -> UpstreamClient:
        if self._client is None:
            raise UpstreamUnavailableError(f"engine {self.name!r} is not started")
        return self._client

    # ---------------------------------------------------------------------------------- replica choice
    def _pick(self, tried: set[str]) -> Replica:
        live = [r for r in self.replicas if r.healthy and r.url not in tried]
        if not live:
            raise UpstreamUnavailableError(
                f"no healthy upstream for engine {self.name!r} ({len(self.replicas)} configured)"
            )
        return min(live, key=lambda r: r.outstanding)

    def _failed(self, rep: Replica, why: str) -> None:
        rep.failures += 1
        if rep.healthy and rep.failures >= self.cfg.failure_threshold:
            rep.healthy = False
            rep.ejected_at = time.monotonic()
            log.warning("upstream %s ejected after %d failures (%s)", rep.url, rep.failures, why)

    @staticmethod
    def _ok(rep: Replica) -> None:
        rep.failures = 0

    async def _probe(self, rep: Replica) -> bool:
        try:
            resp = await self.client.get(f"{rep.url}/models", timeout=self.timeout.connect or 5.0)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.probe_interval_s)
            for rep in self.replicas:
                if not rep.healthy and await self._probe(rep):
                    rep.healthy, rep.failures = True, 0
                    log.info("upstream %s is back", rep.url)

    async def ready(self) -> dict[str, Any]:
        results = await asyncio.gather(*(self._probe(r) for r in self.replicas))
        for rep, ok in zip(self.replicas, results, strict=True):
            if ok:
                rep.healthy, rep.failures = True, 0
        if not any(results):
            raise UpstreamUnavailableError(f"no upstream of engine {self.name!r} answers")
        # Replicas by their position in `urls`, not by URL: /ready is open to every key, the topology is not.
        return {
            "kind": self.kind,
            "replicas": {str(i): ok for i, ok in enumerate(results)},
            "ejected": [i for i, r in enumerate(self.replicas) if not r.healthy],  # until a probe passes
        }

    def _refused(
        self, rep: Replica, path: str, status: int, content: bytes, headers: Mapping[str, str]
    ) -> AlignProError:
        """The error for an upstream's error answer; its own text goes to the log (our key redacted), not to the
        client, whose error says what it can act on."""
        log.warning(
            "upstream %s%s answered %d: %s",
            rep.url,
            path,
            status,
            _redact(content[:2000].decode(errors="replace"), self._secret),
        )
        parsed = _parsed(content)
        if status < 500 and status != 429:
            self._ok(rep)  # the replica works; the request was wrong
            return client_error(status, parsed, path, self._secret)
        self._failed(rep, f"status {status}")
        return _server_error(status, parsed, headers)

    # ---------------------------------------------------------------------------------- requests
    async def _post(self, path: str, body: dict[str, Any], root: bool = False) -> dict[str, Any]:
        """POST ``body`` to ``path`` under a replica's base URL (``root``: under its server root, no /v1)."""
        tried: set[str] = set()
        last: AlignProError | None = None
        for _ in range(len(self.replicas)):
            rep = self._pick(tried)
            tried.add(rep.url)
            rep.outstanding += 1
            try:
                base = rep.url.removesuffix("/v1") if root else rep.url
                resp = await self.client.post(base + path, json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                self._failed(rep, type(exc).__name__)
                last = UpstreamUnavailableError(f"cannot connect to the upstream: {type(exc).__name__}")
                continue  # nothing reached the upstream: safe to try another replica
            except httpx.TimeoutException as exc:
                self._failed(rep, "timeout")
                raise UpstreamTimeoutError(
                    f"the upstream did not answer in time ({type(exc).__name__})"
                ) from exc
            except httpx.HTTPError as exc:
                self._failed(rep, type(exc).__name__)
                raise UpstreamError(f"the upstream connection failed: {type(exc).__name__}") from exc
            finally:
                rep.outstanding -= 1
            if resp.status_code >= 400:
                last = self._refused(rep, path, resp.status_code, resp.content, resp.headers)
                if resp.status_code in _RETRYABLE_STATUS:
                    continue
                raise last
            try:
                data = resp.json()
            except ValueError as exc:
                self._failed(rep, "invalid JSON")
                raise UpstreamError("the upstream answered with invalid JSON") from exc
            if not isinstance(data, dict):
                raise UpstreamError("the upstream answered with JSON that is not an object")
            self._ok(rep)
            return data
        assert last is not None
        raise last

    async def _bounded(self, path: str, body: dict[str, Any], root: bool = False) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self.request_timeout_s):
                return await self._post(path, body, root)
        except TimeoutError as exc:
            raise UpstreamTimeoutError(f"the upstream took longer than {self.request_timeout_s:g} s") from exc

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._bounded("/chat/completions", body)

    async def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._bounded("/completions", body)

    async def responses(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._bounded("/responses", body)

    def responses_stream(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        return self._stream("/responses", body)

    async def embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._bounded("/embeddings", body)

    async def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._bounded("/tokenize", body, root=True)  # vLLM serves it at the root, not under /v1

    def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        return self._stream("/chat/completions", body)

    def completion_stream(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        return self._stream("/completions", body)

    async def open_stream(self, path: str, body: dict[str, Any]) -> tuple[Replica, UpstreamResponse]:
        """Open a streaming response on some replica; retry on another only if nothing was sent (or 503).

        The replica returned has ``outstanding`` raised by one: the caller lowers it when the stream ends.
        """
        tried: set[str] = set()
        last: AlignProError | None = None
        for _ in range(len(self.replicas)):
            rep = self._pick(tried)
            tried.add(rep.url)
            # Counted from now, not from the first event: concurrent streams must see each other while they
            # wait for their headers, or they would all pick the same replica.
            rep.outstanding += 1
            try:
                resp = await self.client.stream(rep.url + path, json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                rep.outstanding -= 1
                self._failed(rep, type(exc).__name__)
                last = UpstreamUnavailableError(f"cannot connect to the upstream: {type(exc).__name__}")
                continue
            except httpx.TimeoutException as exc:
                rep.outstanding -= 1
                self._failed(rep, "timeout")
                raise UpstreamTimeoutError(
                    f"the upstream did not answer in time ({type(exc).__name__})"
                ) from exc
            except BaseException as exc:  # other transport errors, or the caller cancelled
                rep.outstanding -= 1
                if isinstance(exc, httpx.HTTPError):
                    self._failed(rep, type(exc).__name__)
                    raise UpstreamError(f"the upstream connection failed: {type(exc).__name__}") from exc
                raise
            if resp.status_code >= 400:
                rep.outstanding -= 1
                content = await resp.aread()
                await resp.aclose()
                last = self._refused(rep, path, resp.status_code, content, resp.headers)
                if resp.status_code in _RETRYABLE_STATUS:
                    continue
                raise last
            return rep, resp
        assert last is not None
        raise last

    async def _stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[bytes]:
        rep, resp = await self.open_stream(path, body)  # counted in rep.outstanding until the finally below
        responses = path == "/responses"
        buf = b""
        saw_done = False
        try:
            try:
                async for piece in resp.aiter_raw():
                    buf += piece
                    if b"\r" in buf:
                        # SSE allows CRLF line ends; relay them as LF events (a CR split from its LF across
                        # two pieces is joined here once the LF arrives).
                        buf = buf.replace(b"\r\n", b"\n")
                    # Relay each complete event as soon as it is there; keep the incomplete tail.
                    while True:
                        end = buf.find(b"\n\n")
                        if end < 0:
                            break
                        event, buf = buf[: end + 2], buf[end + 2 :]
                        if stream_ends(event, responses):
                            saw_done = True
                        yield event
            except httpx.TimeoutException:
                self._failed(rep, "stream timeout")
                for e in _stream_error(
                    "the upstream stopped sending (read timeout)", "upstream_timeout", responses
                ):
                    yield e
            except httpx.HTTPError as exc:
                self._failed(rep, type(exc).__name__)
                why = f"the upstream stream broke off ({type(exc).__name__})"
                for e in _stream_error(why, "stream_interrupted", responses):
                    yield e
            else:
                if saw_done:
                    self._ok(rep)
                else:
                    self._failed(rep, "stream ended without its last event")
                    for e in _stream_error(
                        "the upstream stream ended early", "stream_interrupted", responses
                    ):
                        yield e
        finally:
            rep.outstanding -= 1
            await resp.aclose()


def _stream_error(message: str, code: str, responses: bool) -> list[bytes]:
    return stream_error(
        {"message": message, "type": "upstream_error", "param": None, "code": code}, responses
    )
