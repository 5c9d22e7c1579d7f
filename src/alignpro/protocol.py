"""OpenAI wire models shared by the gateway and the client.

Requests are validated with these models; unknown request fields are kept (``extra="allow"``) and passed
through to the upstream, so vLLM extras such as ``top_k`` or ``structured_outputs`` keep working. Responses are
typed for the client; the gateway relays upstream JSON as dicts (re-validating every response would only cost
time) and adds the ``alignpro`` extension object.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    field_validator,
    model_validator,
)

Mode = Literal["off", "reference", "adapter", "optimal"]
Contract = Literal["rewrite", "augment"]
# A seed is a signed 64-bit integer, as in OpenAI's API and vLLM; torch's generators take no wider one.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
TokenId = Annotated[int, Field(ge=0)]


class _Open(BaseModel):
    """A wire object that keeps fields it does not know (forward compatibility, upstream extras)."""

    model_config = ConfigDict(extra="allow")


# ----------------------------------------------------------------------------------------------- errors
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ----------------------------------------------------------------------------------------- extension
class AlignProOptions(BaseModel):
    """Per-request options, sent as the ``alignpro`` field (``extra_body={"alignpro": {...}}`` in openai-python)."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode | None = Field(
        None, description="Override the alias's prompter mode, when the gateway allows it."
    )
    contract: Contract | None = Field(None, description="Override the output contract (rewrite or augment).")


class TurnRewrite(_Open):
    """One user turn of a conversation: what the frozen model was sent in its place."""

    index: int = Field(..., description="The message's index in the request's messages.")
    rewritten: bool = False
    gated: bool = False
    cached: bool = False
    fallback: str | None = None
    original_prompt: str | None = None
    rewritten_prompt: str | None = None


class AgentInfo(_Open):
    """Why the request counts as an agent's, and where the prompter ran."""

    signals: list[str] = Field(
        default_factory=list, description="tools, tool_choice, response_format, tool_result."
    )
    prompter: Literal["user_turns", "off"] = Field(
        "user_turns",
        description="user_turns: only user messages' text was rewritten; tools, tool calls, tool results and "
        "response_format went upstream as sent. off: nothing was rewritten.",
    )


class AlignProInfo(_Open):
    """What the prompter did for this response (the ``alignpro`` object on responses and first stream chunks)."""

    mode: Mode
    prompter: str | None = None
    contract: Contract | None = None
    original_prompt: str | None = None
    rewritten_prompt: str | None = None
    rewritten: bool = Field(
        False, description="The prompt sent to the frozen model differs from the original."
    )
    kept: bool = Field(
        False, description="The prompter ran and chose to keep the prompt as it is (it answered KEEP)."
    )
    gated: bool = Field(
        False,
        description="The gate (prompter.gate) skipped the prompter, sure that it would keep the prompt.",
    )
    guidance: str | None = Field(None, description="augment contract: the system guidance that was added.")
    fallback: str | None = Field(
        None, description="Why the original prompt was used, when the prompter failed."
    )
    cached: bool = False
    prompter_ms: float = 0.0
    turn: int | None = Field(
        None, description="chat: the index of the newest user message, which the fields above describe."
    )
    context_turns: int = Field(0, description="How many earlier messages the prompter saw as context.")
    turns: list[TurnRewrite] | None = Field(
        None, description="chat, rewrite contract: every user turn's outcome (earlier ones reused)."
    )
    agent: AgentInfo | None = Field(None, description="Set when the request is an agent's (tools, JSON...).")
    speculative: Literal["released", "discarded"] | None = Field(
        None,
        description="Speculative start: the frozen model's answer to the request as sent was released (the "
        "prompter kept it) or discarded (the prompter rewrote it).",
    )


# ---------------------------------------------------------------------------------------------- requests
class FunctionCall(_Open):
    name: str | None = None
    arguments: str | None = None


class ToolCall(_Open):
    """An assistant's tool call (``index`` is set on stream deltas, where the other fields come in pieces)."""

    index: int | None = None
    id: str | None = None
    type: str | None = None
    function: FunctionCall | None = None


class Tool(_Open):
    type: str = "function"
    function: dict[str, Any] | None = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"] | str
    json_schema: dict[str, Any] | None = None


class ChatMessage(_Open):
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    # The message as the client sent it: what the gateway does not rewrite goes upstream exactly so (key order,
    # nulls and all), so tool calls and tool results reach the model as the agent wrote them.
    _raw: dict[str, Any] | None = PrivateAttr(None)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_raw(cls, data: Any, handler: ModelWrapValidatorHandler[ChatMessage]) -> ChatMessage:
        msg = handler(data)
        if isinstance(data, dict):
            msg._raw = data
        return msg

    def wire(self) -> dict[str, Any]:
        """The message to send upstream: as received, or (built in code) its set fields."""
        return dict(self._raw) if self._raw is not None else self.model_dump(exclude_unset=True)

    def text(self) -> str:
        """The message's text (text parts joined), for the prompter."""
        if isinstance(self.content, str):
            return self.content
        if not self.content:
            return ""
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")


class StreamOptions(_Open):
    include_usage: bool = False


class _Request(_Open):
    """A request the gateway forwards: the caller's fields (extras included), less the ``alignpro`` extension."""

    alignpro: AlignProOptions | None = None

    def upstream_payload(self, model: str, **replace: Any) -> dict[str, Any]:
        """The body to send upstream: what the caller set (extras included), minus our extension."""
        body = self.model_dump(exclude_unset=True, exclude_none=False, exclude={"alignpro"})
        body.update(replace)
        body["model"] = model
        return body


class _SamplingRequest(_Request):
    model: str = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop sequences")
        return v

    def output_limit(self) -> int | None:
        """The most tokens the answer may have, whichever of the two fields set it."""
        return self.max_completion_tokens or self.max_tokens


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # Agent fields: relayed upstream as sent (the prompter never rewrites them; see Gateway.chat).
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    def agent_signals(self) -> list[str]:
        """What makes this an agent's request: the structure the prompter must leave alone."""
        signals = [f for f in ("tools", "tool_choice") if getattr(self, f)]
        if self.response_format is not None and self.response_format.type != "text":
            signals.append("response_format")
        if self.messages[-1].role in ("tool", "function"):
            signals.append("tool_result")
        return signals


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and (not v or any(isinstance(p, list) and not p for p in v)):
            raise ValueError("prompt must not be empty, nor hold an empty list of token ids")
        return v

    def prompts(self) -> int:
        """How many prompts the request holds: each is decoded ``n`` times."""
        p = self.prompt
        return 1 if isinstance(p, str) or not isinstance(p[0], str | list) else len(p)

    def text(self) -> str | None:
        """The prompt as one text the prompter can read; None for token ids or a batch of prompts."""
        p = self.prompt
        if isinstance(p, str):
            return p
        return p[0] if len(p) == 1 and isinstance(p[0], str) else None


class ResponsesRequest(_Request):
    """``POST /v1/responses`` (the Responses API). The prompter rewrites the text of user input items; everything
    else (instructions, tool items, ``previous_response_id``, ``store``, ``text``...) goes upstream as sent."""

    model: str = Field(..., min_length=1)
    input: str | list[dict[str, Any]] = Field(..., min_length=1)
    instructions: str | None = None
    previous_response_id: str | None = None
    stream: bool = False
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    store: bool | None = None

    def turns(self) -> list[ChatMessage]:
        """The input as chat turns, index for index, for the conversation contract: message items keep their role
        and text; a tool call is an assistant turn and its output a tool turn (neither is ever rewritten)."""
        if isinstance(self.input, str):
            return [ChatMessage(role="user", content=self.input)]
        kinds = {"function_call": "assistant", "function_call_output": "tool"}
        out = []
        for item in self.input:
            kind = item.get("type", "message")
            role = item.get("role") if kind == "message" else kinds.get(str(kind), "assistant")
            if role not in ("user", "assistant", "system", "developer", "tool"):
                role = "assistant"
            parts = item.get("content") if kind == "message" else None
            text = input_text(parts)
            out.append(ChatMessage(role=role, content=text))
        return out

    def agent_signals(self) -> list[str]:
        signals = [f for f in ("tools", "tool_choice") if getattr(self, f)]
        if str(((self.text or {}).get("format") or {}).get("type")) in ("json_object", "json_schema"):
            signals.append("response_format")
        if isinstance(self.input, list) and self.input[-1].get("type") == "function_call_output":
            signals.append("tool_result")
        return signals


def input_text(content: Any) -> str:
    """The text of a Responses input item's ``content``: a string, or its text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    kinds = ("input_text", "output_text", "text")
    return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") in kinds)


class EmbeddingRequest(_Open):
    """``POST /v1/embeddings``, relayed to the alias's engine."""

    model: str = Field(..., min_length=1)
    input: str | list[str] | list[int] | list[list[int]]


class TokenizeRequest(_Open):
    """``POST /tokenize`` (vLLM's), relayed to the alias's engine: a ``prompt`` or chat ``messages``."""

    model: str = Field(..., min_length=1)
    prompt: str | None = None
    messages: list[ChatMessage] | None = None


class RewriteRequest(BaseModel):
    """``POST /v1/alignpro/rewrite``: the optimised prompt without an answer."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1)
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    alignpro: AlignProOptions | None = None


# --------------------------------------------------------------------------------------------- responses
class Usage(_Open):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatChoice(_Open):
    index: int
    message: ChatMessage
    finish_reason: str | None = None
    logprobs: Any = None


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    alignpro: AlignProInfo | None = None


class ChatDelta(_Open):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChunkChoice(_Open):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: Any = None


class ChatCompletionChunk(_Open):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    alignpro: AlignProInfo | None = None


class CompletionChoice(_Open):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: Any = None


class Completion(_Open):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    alignpro: AlignProInfo | None = None


class ModelCard(_Open):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "alignpro"


class ModelList(_Open):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class RewriteResponse(BaseModel):
    model: str
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    alignpro: AlignProInfo


class PrompterSwap(BaseModel):
    """``POST /admin/aliases/{alias}/prompter``: point the alias's prompter at another adapter, loaded first if
    ``path`` is given."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        ..., min_length=1, description="The adapter's name on the prompter engine (a new version)."
    )
    path: str | None = Field(
        None,
        min_length=1,
        description="Where the prompter engine (vLLM) loads it from; none = already loaded.",
    )


class PrompterSwapResult(BaseModel):
    alias: str
    previous: str | None
    model: str
    fingerprint: str
    loaded_on: list[str]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
