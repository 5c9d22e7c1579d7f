"""The engine interface: one shape for everything that generates text.

The frozen model and the prompter both run on engines, so the gateway, the trainers and the evaluator talk to
an in-process model (:mod:`alignpro.engines.local`) and to vLLM or any OpenAI-compatible server
(:mod:`alignpro.engines.openai`) the same way. Bodies are OpenAI request dicts (validated by the gateway, extra
fields kept); non-streaming calls return OpenAI response dicts, streaming calls yield complete SSE events
(``b"data: {...}\\n\\n"``) ending with ``b"data: [DONE]\\n\\n"``. Responses API streams (``/v1/responses``)
are named events (``b"event: response.output_text.delta\\ndata: {...}\\n\\n"``) that end with
``response.completed`` (or ``.failed``, ``.incomplete``, ``error``) and no ``[DONE]``.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from alignpro.engines.transport import UpstreamClient

from alignpro.errors import InvalidRequestError

DONE_EVENT = b"data: [DONE]\n\n"

# The id of the gateway request this task serves (set by the server); HTTP engines send it upstream as
# x-request-id, so the gateway's audit line and the upstream's log of one request can be joined.
REQUEST_ID: ContextVar[str | None] = ContextVar("alignpro_request_id", default=None)


# The last event of a Responses API stream.
RESPONSE_END_EVENTS = (
    b"event: response.completed\n",
    b"event: response.failed\n",
    b"event: response.incomplete\n",
    b"event: error\n",
)


def sse_event(obj: dict[str, Any], name: str | None = None) -> bytes:
    """One SSE event carrying ``obj``; ``name`` adds an ``event:`` line (the Responses API names its events)."""
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def stream_ends(event: bytes, responses: bool) -> bool:
    """Whether ``event`` is the last one of a chat/completions stream, or of a Responses stream."""
    return event.startswith(RESPONSE_END_EVENTS) if responses else event.startswith(b"data: [DONE]")


def stream_error(error: dict[str, Any], responses: bool) -> list[bytes]:
    """The events that end a stream that broke off with ``error`` (the OpenAI error object): an error event, then
    ``[DONE]`` for chat and completions; a Responses API ``error`` event (which is its last) for responses."""
    if responses:
        return [sse_event({"type": "error", **error}, "error")]
    return [sse_event({"error": error}), DONE_EVENT]


class Engine(ABC):
    """Something that serves OpenAI-shaped chat and text completions.

    ``extra_fields`` are the request fields, beyond those :mod:`alignpro.protocol` models, that this engine
    takes; ``content_types`` the message content parts. The gateway refuses others (400) rather than pass them
    on verbatim: an upstream's own extensions (vLLM's ``chat_template``, ``logits_processors``, ``ignore_eos``)
    and image URLs it would fetch are the operator's to allow, not a caller's.
    """

    kind: str = ""
    extra_fields: frozenset[str] = frozenset()
    content_types: frozenset[str] = frozenset({"text"})
    seeds = True  # honours a request's ``seed`` (see EngineConfig.seeds)

    def __init__(self, name: str) -> None:
        self.name = name

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections / load weights. Called once from the app lifespan."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release what :meth:`start` opened."""

    async def fingerprint(self, model: str) -> str:
        """What identifies the weights behind ``model`` (an adapter's version), for caches of its outputs."""
        return model

    async def load_adapter(self, name: str, path: str) -> list[str]:
        """Load the LoRA adapter at ``path`` (as the upstream sees it) under ``name`` on every replica, without a
        restart; the replicas that loaded it."""
        from alignpro.errors import InvalidRequestError

        raise InvalidRequestError(
            f"engine {self.name!r} ({self.kind}) cannot load adapters at runtime; vLLM engines can",
            param="path",
        )

    def http_clients(self) -> list[UpstreamClient]:
        """The HTTP clients the engine calls its upstreams with, once started (for tracing)."""
        return []

    @abstractmethod
    async def ready(self) -> dict[str, Any]:
        """Raise if the engine cannot serve now; else a small status dict for ``/ready``."""

    @abstractmethod
    async def chat(self, body: dict[str, Any]) -> dict[str, Any]: ...

    @abstractmethod
    def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[bytes]: ...

    @abstractmethod
    async def completion(self, body: dict[str, Any]) -> dict[str, Any]: ...

    @abstractmethod
    def completion_stream(self, body: dict[str, Any]) -> AsyncIterator[bytes]: ...

    @abstractmethod
    def default_model(self) -> str:
        """The model id a request without an adapter name should carry."""

    async def responses(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/responses``: a Responses API ``response`` object."""
        raise self._unsupported("/v1/responses")

    def responses_stream(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """``POST /v1/responses`` with ``stream``: its named events (see the module docstring)."""
        raise self._unsupported("/v1/responses")

    async def embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/embeddings`` (vLLM serves it for embedding models)."""
        raise self._unsupported("/v1/embeddings")

    async def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /tokenize`` (vLLM's): the token ids of a prompt or of a chat under the model's template."""
        raise self._unsupported("/tokenize")

    def _unsupported(self, path: str) -> InvalidRequestError:
        return InvalidRequestError(
            f"engine {self.name!r} ({self.kind}) does not serve {path}",
            param="model",
            code="unsupported_endpoint",
        )
