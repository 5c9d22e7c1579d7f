"""The gateway's core: aliases -> (prompter stage, frozen engine), and the request path between them.

A request for alias A goes: validate -> prompter stage (x -> x') -> the frozen engine of A with x' -> the
response, with the ``alignpro`` extension object and ``x-alignpro-*`` headers. A chat (or a Responses API
input) goes through the conversation contract (:meth:`Gateway._rewrite_turns`; README, "Conversations and
agents"): each user turn rewritten once, with its earlier turns as context, everything else relayed as sent.
Routes in :mod:`alignpro.server.routes` are thin wrappers around :meth:`Gateway.chat`, :meth:`Gateway.completion`,
:meth:`Gateway.responses`, :meth:`Gateway.relay` and :meth:`Gateway.rewrite_only`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from alignpro.engines.base import DONE_EVENT, Engine, stream_error
from alignpro.engines.factory import Timeouts, build_engine
from alignpro.errors import (
    AlignProError,
    ConfigError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
)
from alignpro.prompter.cache import MemoryRewriteCache, RewriteCache
from alignpro.prompter.instruction import conversation_context
from alignpro.prompter.stage import Context, PrompterStage, Rewrite, SelectRewrite
from alignpro.protocol import (
    AgentInfo,
    AlignProInfo,
    AlignProOptions,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    Contract,
    EmbeddingRequest,
    Mode,
    ModelCard,
    ModelList,
    PrompterSwap,
    PrompterSwapResult,
    ResponsesRequest,
    RewriteRequest,
    RewriteResponse,
    TokenizeRequest,
    TurnRewrite,
)
from alignpro.server import audit
from alignpro.server.audit import Call, outcome
from alignpro.server.auth import ANONYMOUS, KeyStore, Principal
from alignpro.server.limits import KeyLimiter
from alignpro.server.metrics import Metrics
from alignpro.server.shared import RedisBuckets, RedisRewriteCache, SharedRedis
from alignpro.server.speculative import Held, Opened, guarded
from alignpro.server.tracing import Tracing, from_settings
from alignpro.settings import AliasConfig, Settings

if TYPE_CHECKING:
    from alignpro.scoring.rewards import RewardFn

Api = Literal["chat", "completion", "responses"]
log = logging.getLogger(__name__)

# What mode `optimal` estimates R with unless the caller names a reward (alignpro.prompter.optimal loads it).
DEFAULT_REWARD = "safe-and-helpful"


@dataclass
class Route:
    alias: str
    cfg: AliasConfig
    engine: Engine
    stage: PrompterStage

    @property
    def upstream_model(self) -> str:
        return self.cfg.model or self.engine.default_model()


@dataclass
class Reply:
    """A non-streaming answer, or a stream whose first event already arrived (so errors were raised)."""

    info: AlignProInfo
    headers: dict[str, str]
    body: dict[str, Any] | None = None
    stream: AsyncIterator[bytes] | None = None


class Gateway:
    def __init__(
        self,
        settings: Settings,
        engines: dict[str, Engine] | None = None,
        reward: str | RewardFn = DEFAULT_REWARD,
        tracing: Tracing | None = None,
    ) -> None:
        """``engines`` replaces the engines the settings name (already started by the caller's choice);
        ``reward`` is what mode ``optimal`` estimates R with (loaded on the first optimal request)."""
        self.settings = settings
        self.metrics = Metrics(settings.aliases)
        self.tracing = tracing or from_settings(settings.tracing)
        self.engines = engines or {
            n: build_engine(n, c, Timeouts.of(settings)) for n, c in settings.engines.items()
        }
        self.shared = SharedRedis(**settings.redis_options()) if settings.redis_url else None
        size, ttl = settings.rewrite_cache_size, settings.rewrite_cache_ttl_s
        self.cache: RewriteCache | None = None
        if size > 0:
            self.cache = (
                RedisRewriteCache(self.shared, size, ttl)
                if self.shared
                else MemoryRewriteCache(size, ttl, settings.rewrite_cache_bytes)
            )
        self.keys = KeyStore.from_settings(settings.api_keys, settings.api_keys_file)
        self.limiter = KeyLimiter.from_settings(settings, RedisBuckets(self.shared) if self.shared else None)
        self.routes: dict[str, Route] = {}
        for alias, cfg in settings.aliases.items():
            prompter_engine = self.engines.get(cfg.prompter.engine)
            stage = PrompterStage(
                cfg.prompter,
                prompter_engine,
                self.cache,
                on_fallback=lambda reason: self.metrics.fallbacks.labels(reason).inc(),
            )
            route = Route(alias, cfg, self.engines[cfg.engine], stage)
            if prompter_engine is not None:
                # mode `optimal` (opt-in: K prompter samples + K frozen answers): the rho* sampler of this alias
                stage.optimal = _optimal_sampler(route, reward)
            self.routes[alias] = route

    async def start(self) -> None:
        await asyncio.gather(*(e.start() for e in self.engines.values()))
        self.tracing.instrument_clients(c for e in self.engines.values() for c in e.http_clients())
        await asyncio.gather(*(r.stage.start() for r in self.routes.values()))

    async def aclose(self) -> None:
        await asyncio.gather(*(e.aclose() for e in self.engines.values()), return_exceptions=True)
        if self.shared is not None:
            await self.shared.aclose()
        if self.tracing.provider is not None:
            self.tracing.provider.shutdown()  # flush the spans still batched

    async def ready(self) -> dict[str, Any]:
        return {name: await e.ready() for name, e in self.engines.items()}

    # ------------------------------------------------------------------------------------ checks
    def route(self, model: str, who: Principal = ANONYMOUS) -> Route:
        route = self.routes.get(model)
        if route is None:
            # Name only the aliases this key may use: a restricted key does not learn the others.
            names = ", ".join(sorted(a for a in self.routes if who.may_use(a)))
            raise NotFoundError(f"The model '{model}' does not exist. Available: {names}.", param="model")
        who.check(model)
        return route

    def models(self, who: Principal = ANONYMOUS) -> ModelList:
        return ModelList(data=[ModelCard(id=a) for a in self.routes if who.may_use(a)])

    def _check_messages(self, messages: list[ChatMessage]) -> None:
        if len(messages) > self.settings.max_messages:
            raise InvalidRequestError(
                f"at most {self.settings.max_messages} messages per request",
                param="messages",
                code="too_many_messages",
            )

    def _check_caps(self, n: int, max_tokens: int | None, prompts: int = 1) -> None:
        """``n`` answers to each of ``prompts`` prompts: every one is a row decoded, so the rows are capped."""
        if n > self.settings.max_n:
            raise InvalidRequestError(
                f"n must be at most {self.settings.max_n}", param="n", code="invalid_value"
            )
        if n * prompts > self.settings.max_n:
            raise InvalidRequestError(
                f"{prompts} prompts x n={n} asks for {n * prompts} completions; at most {self.settings.max_n} "
                "per request",
                param="prompt",
                code="too_many_completions",
            )
        if max_tokens is not None and max_tokens > self.settings.max_tokens_cap:
            raise InvalidRequestError(
                f"max_tokens must be at most {self.settings.max_tokens_cap}",
                param="max_tokens",
                code="invalid_value",
            )

    def _mode(self, route: Route, opts: AlignProOptions | None, who: Principal) -> tuple[Mode, Contract]:
        cfg = route.cfg.prompter
        mode, contract = cfg.mode, cfg.contract
        if opts is not None and (opts.mode or opts.contract):
            if not _own_or(who.allow_mode_override, self.settings.allow_mode_override):
                raise PermissionDeniedError(
                    "this gateway does not let requests choose the prompter mode",
                    param="alignpro",
                    code="override_not_allowed",
                )
            if opts.mode is not None and opts.mode != mode and opts.mode not in cfg.allowed_modes:
                raise PermissionDeniedError(
                    f"the model '{route.alias}' does not let requests pick the prompter mode '{opts.mode}'",
                    param="alignpro.mode",
                    code="mode_not_allowed",
                )
            mode, contract = opts.mode or mode, opts.contract or contract
        return mode, contract

    @staticmethod
    def _check_fields(
        route: Route, extras: dict[str, Any] | None, messages: list[ChatMessage] | None = None
    ) -> None:
        """Refuse request fields and content parts the alias's engine does not take (see :class:`Engine`)."""
        engine = route.engine
        unknown = sorted(set(extras or ()) - engine.extra_fields)
        if unknown:
            raise InvalidRequestError(
                f"Unrecognized request argument supplied: {', '.join(unknown)}",
                param=unknown[0],
                code="unsupported_parameter",
            )
        for i, m in enumerate(messages or ()):
            kinds = {str(p.get("type")) for p in m.content} if isinstance(m.content, list) else set()
            if kinds - engine.content_types:
                raise InvalidRequestError(
                    f"the model '{route.alias}' takes no content parts of type "
                    f"{', '.join(sorted(kinds - engine.content_types))}",
                    param=f"messages.{i}.content",
                    code="unsupported_content",
                )

    @staticmethod
    def _screened(route: Route, mode: Mode, unread: str | None, code: str, param: str, allowed: bool) -> None:
        """An aligned alias answers only what its prompter read: ``unread`` (what it could not read, if any) is
        refused unless the alias ``allowed`` it."""
        if unread is not None and mode != "off" and not allowed:
            raise InvalidRequestError(
                f"the model '{route.alias}' answers only what its prompter screens, and it cannot screen {unread}",
                param=param,
                code=code,
            )

    def _screen_chat(self, route: Route, mode: Mode, messages: list[ChatMessage]) -> None:
        cfg = route.cfg.prompter
        system = any(m.role in ("system", "developer") for m in messages)
        unread = "the caller's system messages" if system else None
        self._screened(route, mode, unread, "system_not_screened", "messages", cfg.allow_client_system)
        text = next((m.text() for m in reversed(messages) if m.role == "user"), "")
        unread = "a request without user text" if not text.strip() else None
        self._screened(route, mode, unread, "no_text", "messages", cfg.allow_unscreened)

    def _reveals(self, who: Principal) -> bool:
        return _own_or(who.reveal_rewrite, self.settings.reveal_rewrite)

    def _visible(self, info: AlignProInfo, who: Principal) -> dict[str, Any]:
        data = info.model_dump(exclude_none=True)
        if not self._reveals(who):
            for part in (data, *data.get("turns", ())):
                for k in ("original_prompt", "rewritten_prompt", "guidance"):
                    part.pop(k, None)
        return data

    @staticmethod
    def _headers(info: AlignProInfo) -> dict[str, str]:
        h = {
            "x-alignpro-mode": info.mode,
            "x-alignpro-rewritten": "true" if info.rewritten else "false",
            "x-alignpro-prompter-ms": f"{info.prompter_ms:.1f}",
        }
        if info.prompter:
            h["x-alignpro-prompter"] = info.prompter
        if info.fallback:
            h["x-alignpro-fallback"] = info.fallback
            if info.fallback == "prompter_unavailable":
                h["x-alignpro-degraded"] = "prompter-unavailable"
        if info.cached:
            h["x-alignpro-cache"] = "hit"
        if info.gated:
            h["x-alignpro-gated"] = "true"
        return h

    async def _apply_prompter(
        self,
        route: Route,
        text: str | None,
        mode: Mode,
        contract: Contract,
        context: Context = (),
        scope: str = "",
        on_rewrite: Callable[[], None] | None = None,
    ) -> Rewrite:
        """The prompter stage of ``route`` on ``text`` (timed and counted); no text or mode ``off``: nothing.
        ``scope`` (the caller's id) keeps cached rewrites apart per caller; ``on_rewrite``: see
        :meth:`PrompterStage.rewrite`."""
        if text is None or not text.strip() or mode == "off":
            info = AlignProInfo(mode=mode, contract=None if mode == "off" else contract, original_prompt=text)
            if mode != "off":
                info.fallback = "no_text"
            return Rewrite(info, text or "")
        with self.tracing.span("alignpro.prompter", alias=route.alias, mode=mode) as span:
            rw = await route.stage.rewrite(text, mode, contract, context, scope, on_rewrite)
            how = "cached" if rw.info.cached else outcome(rw.info)
            if span is not None:
                span.set_attribute("outcome", how)
        self.metrics.prompter_seconds.labels(route.alias, how).observe(rw.info.prompter_ms / 1000)
        if rw.info.cached:
            self.metrics.cache_hits.inc()
        elif mode != "optimal" and self.cache is not None and not rw.info.gated:
            self.metrics.cache_misses.inc()
        return rw

    async def _rewrite_turns(
        self,
        route: Route,
        chat: list[ChatMessage],
        mode: Mode,
        contract: Contract,
        signals: list[str] | None = None,
        scope: str = "",
        on_rewrite: Callable[[], None] | None = None,
    ) -> tuple[dict[int, Rewrite], Rewrite]:
        """The conversation contract (README, "Conversations and agents") on the turns ``chat``: the rewrites to
        put in place, by message index, and the newest user turn's (what the ``alignpro`` object reports).

        Only user messages' text is rewritten. Each user turn's rewrite depends only on the turns before it, so
        the turns of earlier requests get the rewrite they got then (cache, or the same seeded draw).
        ``signals`` (an agent's request) with ``agents: off``: no prompter at all."""
        conv = route.cfg.prompter.conversation
        users = [i for i, m in enumerate(chat) if m.role == "user"]
        if signals and conv.agents == "off":
            mode = "off"
        newest = users[-1] if users else None
        applied: dict[int, Rewrite] = {}
        if newest is None or mode == "off":
            text = chat[newest].text() if newest is not None else None
            rw = await self._apply_prompter(route, text, "off", contract)
        else:
            # Augment adds one guidance for the newest turn; rho* draws are not reproducible: one turn each.
            every = contract == "rewrite" and mode != "optimal" and conv.earlier_turns == "rewritten"
            targets = users if every else [newest]
            start = time.perf_counter()
            outs = await asyncio.gather(
                *(
                    self._apply_prompter(
                        route,
                        chat[i].text(),
                        mode,
                        contract,
                        _context(chat, i, conv.context_turns),
                        scope,
                        on_rewrite,
                    )
                    for i in targets
                )
            )
            applied = {i: out for i, out in zip(targets, outs, strict=True) if out.info.rewritten}
            rw = outs[-1]
            rw.info.prompter_ms = round((time.perf_counter() - start) * 1000, 3)
            if len(targets) > 1:
                rw.info.turns = [_turn(i, out.info) for i, out in zip(targets, outs, strict=True)]
        rw.info.turn = newest
        if signals:
            rw.info.agent = AgentInfo(signals=signals, prompter="off" if mode == "off" else "user_turns")
        return applied, rw

    async def _prompt_messages(
        self,
        route: Route,
        chat: list[ChatMessage],
        mode: Mode,
        contract: Contract,
        signals: list[str] | None = None,
        scope: str = "",
        on_rewrite: Callable[[], None] | None = None,
    ) -> tuple[list[dict[str, Any]], Rewrite]:
        """The messages of ``chat`` with the conversation contract applied; every message it does not rewrite
        goes upstream exactly as received."""
        applied, rw = await self._rewrite_turns(route, chat, mode, contract, signals, scope, on_rewrite)
        messages = [m.wire() for m in chat]
        for i, out in applied.items():
            _apply(messages, i, out)
        return messages, rw

    # ------------------------------------------------------------------------------------ administration
    async def swap_prompter(
        self, alias: str, swap: PrompterSwap, who: Principal, call: Call
    ) -> PrompterSwapResult:
        """Point ``alias``'s prompter at the adapter ``swap.model`` (loading it from ``swap.path`` first), without a
        restart. Its rewrites are cached under the new adapter's fingerprint, so none of the old one's is served."""
        if not who.admin:
            raise PermissionDeniedError("this API key may not call the admin routes", code="admin_only")
        route = self.routes.get(alias)
        if route is None:
            raise NotFoundError(f"no alias '{alias}'", param="alias")
        cfg, engine = route.cfg.prompter, route.stage.engine
        if cfg.mode not in ("adapter", "optimal") or engine is None:
            raise InvalidRequestError(
                f"alias '{alias}' does not run an adapter prompter (its mode is {cfg.mode})", param="alias"
            )
        loaded = await engine.load_adapter(swap.model, swap.path) if swap.path else []
        fingerprint = await engine.fingerprint(swap.model)
        new = cfg.model_copy(update={"model": swap.model})
        route.cfg = route.cfg.model_copy(update={"prompter": new})
        route.stage.cfg, route.stage.fingerprint = new, fingerprint
        call.alias, call.mode = alias, new.mode
        result = PrompterSwapResult(
            alias=alias, previous=cfg.model, model=swap.model, fingerprint=fingerprint, loaded_on=loaded
        )
        audit.log.info(
            json.dumps(
                {
                    "event": "prompter_swap",
                    "request_id": call.request_id,
                    "key_id": who.id,
                    **result.model_dump(),
                }
            )
        )
        return result

    # ------------------------------------------------------------------------------------ requests
    async def chat(
        self, req: ChatCompletionRequest, who: Principal = ANONYMOUS, call: Call | None = None
    ) -> Reply:
        call = call or Call("in-process")
        route = self.route(req.model, who)
        self._check_messages(req.messages)
        self._check_caps(req.n, req.output_limit())
        self._check_fields(route, req.model_extra, req.messages)
        mode, contract = self._mode(route, req.alignpro, who)
        self._screen_chat(route, mode, req.messages)
        held = self._speculate(
            route,
            who,
            mode,
            contract,
            lambda: req.upstream_payload(route.upstream_model, messages=[m.wire() for m in req.messages]),
            req.stream,
            "chat",
        )
        messages, rw = await guarded(
            held,
            self._prompt_messages(
                route, req.messages, mode, contract, req.agent_signals(), who.id, _cancel(held)
            ),
        )
        call.prompted(route.alias, rw.info, rw.sent_text())
        body = req.upstream_payload(route.upstream_model, messages=messages)
        return await self._forward(route, who, call, rw.info, body, req.stream, "chat", held)

    async def completion(
        self, req: CompletionRequest, who: Principal = ANONYMOUS, call: Call | None = None
    ) -> Reply:
        call = call or Call("in-process")
        route = self.route(req.model, who)
        self._check_caps(req.n, req.output_limit(), req.prompts())
        self._check_fields(route, req.model_extra)
        mode, contract = self._mode(route, req.alignpro, who)
        text = req.text()
        self._screened(
            route,
            mode,
            "token ids or a list of prompts" if text is None else None,
            "prompt_not_text",
            "prompt",
            route.cfg.prompter.allow_unscreened,
        )
        self._screened(
            route,
            mode,
            "an empty prompt" if text is not None and not text.strip() else None,
            "no_text",
            "prompt",
            route.cfg.prompter.allow_unscreened,
        )
        # A completion has one length field upstream (max_tokens); max_completion_tokens is its chat name.
        replace: dict[str, Any] = {"max_tokens": req.output_limit()} if req.max_completion_tokens else {}
        held = self._speculate(
            route,
            who,
            mode,
            contract,
            lambda: _completion_body(req, route, replace),
            req.stream,
            "completion",
        )
        rw = await guarded(
            held, self._apply_prompter(route, text, mode, contract, scope=who.id, on_rewrite=_cancel(held))
        )
        if rw.info.rewritten:
            # A completion prompt has no system turn: augment guidance goes in front of the verbatim prompt.
            replace["prompt"] = rw.sent_text()
        elif text is None and mode != "off":
            rw.info.fallback = (
                "prompt_not_text"  # allowed unscreened: token ids or a batch are passed through
            )
        call.prompted(route.alias, rw.info, replace.get("prompt", text))
        body = _completion_body(req, route, replace)
        return await self._forward(route, who, call, rw.info, body, req.stream, "completion", held)

    async def responses(
        self, req: ResponsesRequest, who: Principal = ANONYMOUS, call: Call | None = None
    ) -> Reply:
        """``/v1/responses``: the conversation contract on the input's user items, then the engine's answer.
        The turns the upstream stores under ``previous_response_id`` are not seen here: the prompter's context is
        this request's input."""
        call = call or Call("in-process")
        route = self.route(req.model, who)
        self._check_caps(1, req.max_output_tokens)
        mode, contract = self._mode(route, req.alignpro, who)
        turns = req.turns()
        self._check_messages(turns)
        # `instructions` is the caller's system prompt, screened like a system message
        system = [ChatMessage(role="system", content=req.instructions)] if req.instructions else []
        self._screen_chat(route, mode, system + turns)
        held = self._speculate(
            route,
            who,
            mode,
            contract,
            lambda: req.upstream_payload(route.upstream_model, **_responses_input(req, {})),
            req.stream,
            "responses",
        )
        applied, rw = await guarded(
            held,
            self._rewrite_turns(route, turns, mode, contract, req.agent_signals(), who.id, _cancel(held)),
        )
        call.prompted(route.alias, rw.info, rw.sent_text())
        body = req.upstream_payload(route.upstream_model, **_responses_input(req, applied))
        return await self._forward(route, who, call, rw.info, body, req.stream, "responses", held)

    def _speculate(
        self,
        route: Route,
        who: Principal,
        mode: Mode,
        contract: Contract,
        as_sent: Callable[[], dict[str, Any]],
        stream: bool,
        kind: Api,
    ) -> Held | None:
        """With ``prompter.speculative``, start the frozen model on the request as sent (``as_sent()``, built only
        then) now; see :mod:`alignpro.server.speculative`. Augment always adds a guidance and rho* is K answers
        already: no."""
        if not route.cfg.prompter.speculative or mode in ("off", "optimal") or contract != "rewrite":
            return None
        body, _ = self._upstream_body(who, as_sent(), stream, kind)
        return Held(body, self._open(route, body, stream, kind))

    def _upstream_body(
        self, who: Principal, body: dict[str, Any], stream: bool, kind: Api
    ) -> tuple[dict[str, Any], bool]:
        """The body the frozen engine gets, and whether the gateway asked for a usage chunk the client did not.
        A key with a token budget is charged from the stream's usage: the upstream is asked for it even when the
        client did not, and that extra chunk is kept from the client (some clients stumble on its empty choices).
        """
        hide_usage = (
            stream and kind != "responses" and self.limiter.limits(who).tpm > 0 and not _asks_usage(body)
        )
        if hide_usage:
            body = {**body, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}
        return body, hide_usage

    async def _forward(
        self,
        route: Route,
        who: Principal,
        call: Call,
        info: AlignProInfo,
        body: dict[str, Any],
        stream: bool,
        kind: Api,
        held: Held | None = None,
    ) -> Reply:
        body, hide_usage = self._upstream_body(who, body, stream, kind)
        opened, start = await self._answer(route, call, info, body, stream, kind, held)
        headers = self._headers(info)
        if isinstance(opened, dict):
            self._frozen_done(route, call, start)
            await self._count_usage(route.alias, who, opened.get("usage"))
            opened["alignpro"] = self._visible(info, who)
            return Reply(info, headers, body=opened)
        first, gen = opened
        call.ttft_ms = call.since_start_ms()
        self.metrics.ttft_seconds.labels(route.alias).observe(call.ttft_ms / 1000)
        relay = self._relay(
            route, who, call, info, first, gen, start, responses=kind == "responses", hide_usage=hide_usage
        )
        return Reply(info, headers, stream=relay)

    async def _answer(
        self,
        route: Route,
        call: Call,
        info: AlignProInfo,
        body: dict[str, Any],
        stream: bool,
        kind: Api,
        held: Held | None,
    ) -> tuple[Opened, float]:
        """The frozen model's answer to ``body`` and when it started: the held one if it was started on this very
        body, else a new call (the held one discarded)."""
        if held is not None:
            info.speculative = "released" if held.answers(body) else "discarded"
            self.metrics.speculative.labels(route.alias, info.speculative).inc()
            if info.speculative == "released":
                return await self._timed(route, call, held.started, held.take()), held.started
            await held.discard()
        start = time.perf_counter()
        return await self._timed(route, call, start, self._open(route, body, stream, kind)), start

    async def _timed(self, route: Route, call: Call, start: float, opening: Awaitable[Opened]) -> Opened:
        try:
            return await opening
        except BaseException:
            self._frozen_done(route, call, start)
            raise

    async def _open(self, route: Route, body: dict[str, Any], stream: bool, kind: Api) -> Opened:
        """Call the frozen engine: the whole response, or a stream up to its first event (so upstream errors
        surface here, before any byte is sent)."""
        engine = route.engine
        if not stream:
            answer = {"chat": engine.chat, "completion": engine.completion, "responses": engine.responses}
            with self.tracing.span("alignpro.frozen", alias=route.alias, stream=False):
                return await answer[kind](body)
        streams = {
            "chat": engine.chat_stream,
            "completion": engine.completion_stream,
            "responses": engine.responses_stream,
        }
        gen = streams[kind](body)
        try:
            # The span covers the stream's opening, to its first event; the rest is relayed after the route returned.
            with self.tracing.span("alignpro.frozen", alias=route.alias, stream=True):
                first = await gen.__anext__()
        except StopAsyncIteration:
            first = DONE_EVENT
        except BaseException:
            await gen.aclose()  # type: ignore[attr-defined]
            raise
        return first, gen

    def _frozen_done(self, route: Route, call: Call, start: float) -> None:
        took = time.perf_counter() - start
        call.frozen_ms = round(took * 1000, 3)
        self.metrics.stage_seconds.labels("frozen", route.alias).observe(took)

    async def _relay(
        self,
        route: Route,
        who: Principal,
        call: Call,
        info: AlignProInfo,
        first: bytes,
        rest: AsyncIterator[bytes],
        start: float,
        responses: bool = False,
        hide_usage: bool = False,
    ) -> AsyncIterator[bytes]:
        """The stream to the client: the first event with ``alignpro`` added, the others as they come
        (``hide_usage``: less the usage-only chunk the gateway asked for itself)."""
        try:
            yield _inject(first, self._visible(info, who))
            async for event in rest:
                if b'"usage":{' in event or b'"usage": {' in event:  # compact JSON (vLLM) or not
                    data = _event_json(event)
                    await self._count_usage(route.alias, who, _usage(data))
                    if hide_usage and not data.get("choices"):
                        continue
                yield event
        except AlignProError as exc:
            self.metrics.errors.labels(exc.type).inc()
            for end in stream_error(exc.to_dict()["error"], responses):
                yield end
        except Exception:  # a bug or an engine failure mid-stream: the client still gets an end
            log.exception("stream relay failed")
            self.metrics.errors.labels("internal_error").inc()
            internal = {"message": "internal error", "type": "internal_error", "param": None, "code": None}
            for end in stream_error(internal, responses):
                yield end
        finally:
            await rest.aclose()  # type: ignore[attr-defined]
            self._frozen_done(route, call, start)

    async def _count_usage(self, alias: str, who: Principal, usage: Any) -> None:
        """Count the usage an upstream reported; what is not a non-negative integer counts as 0 (a counter cannot
        go down, and the answer the work paid for must not fail over the upstream's bookkeeping)."""
        if isinstance(usage, dict):
            # chat and completions count prompt/completion tokens; the Responses API input/output tokens
            prompt = _tokens(usage.get("prompt_tokens")) or _tokens(usage.get("input_tokens"))
            completion = _tokens(usage.get("completion_tokens")) or _tokens(usage.get("output_tokens"))
            self.metrics.tokens.labels(alias, "prompt").inc(prompt)
            self.metrics.tokens.labels(alias, "completion").inc(completion)
            await self.limiter.charge_tokens(who, prompt + completion)

    async def relay(
        self, req: EmbeddingRequest | TokenizeRequest, who: Principal = ANONYMOUS
    ) -> dict[str, Any]:
        """``/v1/embeddings`` and ``/tokenize``: the alias's engine answers; the prompter has no part in them."""
        route = self.route(req.model, who)
        body = req.model_dump(exclude_unset=True)
        body["model"] = route.upstream_model
        if isinstance(req, TokenizeRequest) and req.messages is not None:
            body["messages"] = [m.wire() for m in req.messages]
        if isinstance(req, EmbeddingRequest):
            return await route.engine.embeddings(body)
        return await route.engine.tokenize(body)

    async def rewrite_only(
        self, req: RewriteRequest, who: Principal = ANONYMOUS, call: Call | None = None
    ) -> RewriteResponse:
        """``/v1/alignpro/rewrite``: what the frozen model would be sent, without sending it."""
        call = call or Call("in-process")
        if not self._reveals(who):
            raise PermissionDeniedError("this gateway does not reveal rewrites", code="rewrite_hidden")
        route = self.route(req.model, who)
        mode, contract = self._mode(route, req.alignpro, who)
        if (req.prompt is None) == (req.messages is None):
            raise InvalidRequestError("give exactly one of prompt or messages", param="prompt")
        if req.prompt is not None:
            rw = await self._apply_prompter(route, req.prompt, mode, contract, scope=who.id)
            call.prompted(route.alias, rw.info, rw.sent_text())
            prompt = rw.sent_text()
            return RewriteResponse(model=req.model, prompt=prompt, alignpro=rw.info)
        assert req.messages is not None
        if not req.messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        self._check_messages(req.messages)
        messages, rw = await self._prompt_messages(route, req.messages, mode, contract, scope=who.id)
        call.prompted(route.alias, rw.info, rw.sent_text())
        return RewriteResponse(
            model=req.model, messages=[ChatMessage.model_validate(m) for m in messages], alignpro=rw.info
        )


def _optimal_sampler(route: Route, reward: str | RewardFn) -> SelectRewrite:
    """The rho* sampler of ``route``'s prompter. Mode ``optimal`` needs the ``[local]`` extra (numpy, the reward's
    embedding model): without it, an alias configured in that mode is a configuration error, and a request that
    asks for it is answered 400."""
    try:
        from alignpro.prompter.optimal import for_stage
    except ModuleNotFoundError as exc:  # numpy and the rest of the [local] extra are not installed
        why = f"mode 'optimal' needs the [local] extra (pip install 'alignpro[local]'): {exc}"
        if route.cfg.prompter.mode == "optimal":
            raise ConfigError(f"alias '{route.alias}': {why}") from exc

        async def unavailable(text: str, contract: Contract) -> str | None:
            raise InvalidRequestError(why, param="alignpro.mode")

        return unavailable
    return for_stage(route.stage, route.engine, route.cfg.model, reward=reward)


def _cancel(held: Held | None) -> Callable[[], None] | None:
    """The prompter's early-rewrite hook: stop the held answer, which will not be sent."""
    return held.cancel if held is not None else None


def _completion_body(req: CompletionRequest, route: Route, replace: dict[str, Any]) -> dict[str, Any]:
    body = req.upstream_payload(route.upstream_model, **replace)
    body.pop("max_completion_tokens", None)
    return body


def _asks_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def _own_or(own: bool | None, default: bool) -> bool:
    """A key's own policy where it sets one, else the gateway's."""
    return default if own is None else own


def _context(chat: list[ChatMessage], idx: int, n: int) -> list[tuple[str, str]]:
    """The prompter's view of the turns before the user turn ``idx``."""
    return conversation_context([(str(m.role), m.text()) for m in chat[:idx]], n)


def _turn(idx: int, info: AlignProInfo) -> TurnRewrite:
    return TurnRewrite(
        index=idx,
        rewritten=info.rewritten,
        gated=info.gated,
        cached=info.cached,
        fallback=info.fallback,
        original_prompt=info.original_prompt,
        rewritten_prompt=info.rewritten_prompt,
    )


def _apply(messages: list[dict[str, Any]], idx: int, rw: Rewrite) -> None:
    """Put the rewrite into the chat: replace the user's text, or add the guidance as a system message."""
    if rw.guidance is not None:
        if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
            messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{rw.guidance}"}
        else:
            # Chat templates accept a system message first; not all accept one later on.
            messages.insert(0, {"role": "system", "content": rw.guidance})
        return
    content = messages[idx].get("content")
    if isinstance(content, list):  # keep non-text parts (images...), replace the text with the rewrite
        others = [p for p in content if p.get("type") != "text"]
        messages[idx] = {**messages[idx], "content": [{"type": "text", "text": rw.prompt}, *others]}
    else:
        messages[idx] = {**messages[idx], "content": rw.prompt}


async def rewrite_in_process(settings: Settings, req: RewriteRequest) -> RewriteResponse:
    """One rewrite by a gateway started in this process for it (``alignpro rewrite`` without ``--url``)."""
    gw = Gateway(settings)
    await gw.start()
    try:
        return await gw.rewrite_only(req)
    finally:
        await gw.aclose()


def _split_event(event: bytes) -> tuple[bytes, bytes]:
    """An SSE event as (its ``event:`` line, with its newline, or b""; the payload after ``data: ``)."""
    head = b""
    if event.startswith(b"event: "):
        end = event.find(b"\n") + 1
        head, event = event[:end], event[end:]
    return head, event[len(b"data: ") :] if event.startswith(b"data: ") else b""


def _tokens(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _event_json(event: bytes) -> dict[str, Any]:
    try:
        data = json.loads(_split_event(event)[1])
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _usage(data: dict[str, Any]) -> Any:
    """The usage of a stream event: on a chunk, or on the response of a Responses API event."""
    response = data.get("response")
    return data.get("usage") or (response.get("usage") if isinstance(response, dict) else None)


def _inject(event: bytes, info: dict[str, Any]) -> bytes:
    """Add the ``alignpro`` object to the first chunk of a stream (a Responses stream: to ``response.created``)."""
    head, payload = _split_event(event)
    if not payload.startswith(b"{"):
        return event
    data = _event_json(event)
    if not data or "error" in data or data.get("type") == "error":
        return event
    data["alignpro"] = info
    return head + b"data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def _responses_input(req: ResponsesRequest, applied: dict[int, Rewrite]) -> dict[str, Any]:
    """The fields of ``req`` to replace upstream: user input items' text rewritten, augment guidance appended to
    ``instructions`` (the Responses API's system prompt). Other items stay as sent."""
    replace: dict[str, Any] = {}
    items: list[dict[str, Any]] | None = None if isinstance(req.input, str) else list(req.input)
    for i, rw in applied.items():
        if rw.guidance is not None:
            replace["instructions"] = (
                f"{req.instructions}\n\n{rw.guidance}" if req.instructions else rw.guidance
            )
        elif items is None:
            replace["input"] = rw.prompt
        else:
            content = items[i].get("content")
            if isinstance(content, list):  # keep non-text parts (images, files), the text becomes the rewrite
                others = [p for p in content if p.get("type") not in ("input_text", "text")]
                items[i] = {**items[i], "content": [{"type": "input_text", "text": rw.prompt}, *others]}
            else:
                items[i] = {**items[i], "content": rw.prompt}
            replace["input"] = items
    return replace
