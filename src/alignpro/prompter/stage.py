"""The prompter stage of the gateway: x -> x' before the frozen model sees the request.

Modes: ``off`` (pass-through), ``reference`` (rho_ref: the base instruct model under the rewrite instruction),
``adapter`` (a trained LoRA prompter: the same instruction, run on the adapter, locally or as a vLLM LoRA
module), ``optimal`` (the rho* sampler: K candidates scored with the frozen model and a reward, one drawn with
probability proportional to exp(R/lam); see :mod:`alignpro.prompter.optimal`).

Failure policy: with ``fail_policy=open`` a prompter error, timeout or unusable output serves the original prompt
and says why in ``alignpro.fallback``; with ``closed`` an unavailable prompter answers 503.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from alignpro.engines.base import Engine
from alignpro.errors import (
    ContextLengthError,
    InvalidRequestError,
    UpstreamStatusError,
    UpstreamUnavailableError,
)
from alignpro.prompter.cache import RewriteCache, rewrite_key
from alignpro.prompter.gate import Gate
from alignpro.prompter.instruction import (
    EARLY_KEEP,
    EARLY_REWRITE,
    early_verdict,
    frame_guidance,
    prompter_outputs,
    prompter_request,
    render_context,
    stream_delta,
)
from alignpro.prompter.validate import Validator, default_validator
from alignpro.prompter.version import instruction_digest
from alignpro.protocol import AlignProInfo, Contract, Mode
from alignpro.settings import PrompterConfig

log = logging.getLogger(__name__)

# (text, contract) -> the chosen rewrite, or None when the original prompt won; installed by the rho* sampler
SelectRewrite = Callable[[str, Contract], Awaitable[str | None]]
# Earlier turns of a conversation, (role, text), oldest first: what the prompter sees before the user turn.
Context = Sequence[tuple[str, str]]


# Fallbacks that say nothing of what the prompter would write: it failed, or its upstream refused the request (a
# 4xx that a fixed configuration may lift). Every other fallback is its output's (parse_output, the validator).
UNAVAILABLE, REJECTED = "prompter_unavailable", "prompter_rejected_prompt"
# A cached fallback: no rewrite starts with a NUL character (the validator's outputs are model text).
_FALLBACK = "\x00fallback:"


def _from_cache(value: str) -> tuple[str | None, str | None]:
    """A cached entry as (the rewrite, or None with the fallback's reason)."""
    if value.startswith(_FALLBACK):
        return None, value.removeprefix(_FALLBACK)
    return value, None


def draw_seed(key: tuple[str, ...]) -> int:
    """The sampling seed of the rewrite cached under ``key``: the same history draws the same rewrite on any
    replica (and again after the cache forgot it), while different histories still get independent draws."""
    digest = hashlib.sha256("\x00".join(key).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass
class Rewrite:
    """The outcome of the stage: what to send, and what to report."""

    info: AlignProInfo
    prompt: str  # the user text to send (rewritten, or the original)
    guidance: str | None = None  # augment contract: the system guidance to add

    def sent_text(self) -> str:
        """The prompt as one text: the guidance in front of the verbatim prompt (augment), or the prompt."""
        return f"{self.guidance}\n\n{self.prompt}" if self.guidance else self.prompt


class PrompterStage:
    def __init__(
        self,
        cfg: PrompterConfig,
        engine: Engine | None,
        cache: RewriteCache | None = None,
        optimal: SelectRewrite | None = None,
        on_fallback: Callable[[str], None] | None = None,
        validator: Validator | None = None,
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.cache = cache
        self.fingerprint = ""  # of the prompter's weights (adapter version), in every cache key; see start()
        self.optimal = optimal
        self.on_fallback = on_fallback
        # Empty, truncated, leaking or off-topic output falls back to the original prompt (counted there).
        self.validator: Validator = validator or default_validator()
        # Skips the prompter for requests it would keep (opt-in; a ConfigError without the [local] extra).
        self.gate: Gate | None = Gate(cfg.gate) if cfg.gate.enabled else None

    async def start(self) -> None:
        """Load what the first rewrite would otherwise wait for (the validator's embedding model); learn the
        prompter's fingerprint."""
        await self.refresh_fingerprint()
        similarity = getattr(self.validator, "similarity", None)
        if similarity is not None and self.cfg.mode != "off":
            await asyncio.to_thread(similarity, "warm", "up")
        if self.gate is not None and self.cfg.mode != "off":
            await asyncio.to_thread(self.gate.skips, "warm up")

    async def refresh_fingerprint(self) -> None:
        """Ask the engine which weights serve the prompter now (after an adapter swap, another version)."""
        if self.engine is not None and self.cfg.mode != "off":
            weights = await self.engine.fingerprint(self.cfg.model or self.engine.default_model())
            # The instruction is part of the prompter: a new one must not serve rewrites cached under the old.
            self.fingerprint = f"{weights}/{instruction_digest('rewrite')}.{instruction_digest('augment')}"

    def name(self, mode: Mode) -> str | None:
        if mode == "off" or self.engine is None:
            return None
        model = self.cfg.model if mode in ("adapter", "optimal") and self.cfg.model else "base"
        return f"{self.engine.name}/{model}"

    async def generate(
        self,
        text: str,
        mode: Mode,
        contract: Contract,
        n: int = 1,
        context: Context = (),
        seed: int | None = None,
    ) -> list[tuple[str, str | None]]:
        """Draw ``n`` raw prompter outputs (text, finish_reason) for ``text`` after the turns ``context``."""
        body = self._request(text, mode, contract, n, context, seed)
        assert self.engine is not None
        return prompter_outputs(await self.engine.chat(body))

    async def generate_early(
        self,
        text: str,
        mode: Mode,
        contract: Contract,
        context: Context = (),
        seed: int | None = None,
        on_rewrite: Callable[[], None] | None = None,
    ) -> tuple[str, str | None]:
        """One raw prompter output, read as it streams: cut at an early KEEP (the prompter request is cancelled,
        so the rest is never generated), and ``on_rewrite`` called once as soon as the output cannot be KEEP."""
        body = self._request(text, mode, contract, 1, context, seed)
        assert self.engine is not None
        out, finish, told = "", None, False
        events = self.engine.chat_stream({**body, "stream": True})
        try:
            async for event in events:
                delta, reason = stream_delta(event)
                out, finish = out + delta, reason or finish
                verdict = early_verdict(out, contract)
                if verdict == EARLY_KEEP:
                    return out, "stop"
                if verdict == EARLY_REWRITE and on_rewrite is not None and not told:
                    told = True
                    on_rewrite()
        finally:
            await events.aclose()  # type: ignore[attr-defined]
        return out, finish

    def _request(
        self, text: str, mode: Mode, contract: Contract, n: int, context: Context, seed: int | None
    ) -> dict[str, Any]:
        """The prompter engine's chat body for ``n`` outputs (the adapter's model id in mode adapter)."""
        if self.engine is None:
            raise UpstreamUnavailableError("no prompter engine is configured", code="prompter_unavailable")
        use_adapter = mode == "adapter" or (mode == "optimal" and self.cfg.model is not None)
        model = self.cfg.model if use_adapter and self.cfg.model else self.engine.default_model()
        if mode == "adapter" and not self.cfg.model:
            raise InvalidRequestError(
                "mode 'adapter' needs prompter.model (the adapter's name)", param="alignpro"
            )
        c = self.cfg
        temperature = c.temperature
        if seed is not None and not self.engine.seeds:
            # The engine cannot take the seed that makes this draw reproducible: the greedy draw is.
            seed, temperature = None, 0.0
        return prompter_request(
            text,
            contract,
            model=model,
            max_tokens=c.max_tokens,
            temperature=temperature,
            top_p=c.top_p,
            n=n,
            context=context,
            seed=seed,
        )

    async def rewrite(
        self,
        text: str,
        mode: Mode,
        contract: Contract | None = None,
        context: Context = (),
        scope: str = "",
        on_rewrite: Callable[[], None] | None = None,
    ) -> Rewrite:
        """The rewrite of the user text ``text``, which comes after the earlier turns ``context``. ``on_rewrite``
        hears as early as possible that the prompt will not be kept (see :meth:`generate_early`).

        Non-optimal rewrites are cached under the prompter, mode, contract, context and text; with
        ``conversation.deterministic`` the draw is seeded from that key too, so a turn gets the same rewrite on
        every request of its conversation, on any replica."""
        contract = contract or self.cfg.contract
        info = AlignProInfo(mode=mode, prompter=self.name(mode), contract=contract, original_prompt=text)
        if mode == "off":
            return Rewrite(info, text)
        if mode == "optimal" and self.optimal is None:
            raise InvalidRequestError(
                "mode 'optimal' is not configured on this gateway", param="alignpro.mode"
            )
        rendered = render_context(context)
        info.context_turns = len(context)
        gated = await self._gated(info, text, context)
        if gated is not None:
            return gated
        # A rho* draw is a fresh sample each time: only the other modes are cached.
        cache = self.cache if mode != "optimal" else None
        digest = hashlib.sha256(rendered.encode()).hexdigest()
        key = rewrite_key(scope, info.prompter or "", self.fingerprint, mode, contract, digest, text)
        # The draw's seed depends on the history only: equal requests of two callers get the same rewrite, but
        # each computes its own (the cache is per ``scope``).
        seed = draw_seed(key[1:]) if self.cfg.conversation.deterministic else None
        start = time.perf_counter()
        cached = await cache.get(key) if cache is not None else None
        if cached is not None:
            out, reason = _from_cache(cached)
        else:
            out, reason = await self._attempt(text, mode, contract, context, seed, on_rewrite)
            entry = self._cache_entry(out, reason)
            if entry is not None and cache is not None:
                await cache.put(key, entry)
        info.prompter_ms = round((time.perf_counter() - start) * 1000, 3)
        info.cached = cached is not None
        return self._outcome(info, text, out, reason)

    def _cache_entry(self, out: str | None, reason: str | None) -> str | None:
        """What to cache for a rewrite ``out`` or a fallback for ``reason`` (None: nothing). A fallback that the
        prompter's own output caused (truncated, off-topic...) is as reproducible as a rewrite when draws are
        deterministic (seeded, or greedy): cached too, so a repeat does not pay the prompter again for the same
        unusable output. An unavailable prompter is not: the next request may find it back."""
        if out is not None:
            return out
        if (
            reason is not None
            and reason not in (UNAVAILABLE, REJECTED)
            and self.cfg.conversation.deterministic
        ):
            return _FALLBACK + reason
        return None

    async def _gated(self, info: AlignProInfo, text: str, context: Context) -> Rewrite | None:
        """The original prompt, reported as ``gated``, when the gate is confident the prompter would keep it.
        Only the rewrite contract has KEEP: augment guidance is always written."""
        if self.gate is None or info.contract != "rewrite":
            return None
        start = time.perf_counter()
        try:
            skip = await asyncio.to_thread(self.gate.skips, text, context)
        except Exception:  # the gate only saves time: when it fails, the prompter decides
            log.warning("the prompter gate failed; the prompter runs", exc_info=True)
            return None
        if not skip:
            return None
        info.gated, info.prompter_ms = True, round((time.perf_counter() - start) * 1000, 3)
        return Rewrite(info, text)

    async def _attempt(
        self,
        text: str,
        mode: Mode,
        contract: Contract,
        context: Context = (),
        seed: int | None = None,
        on_rewrite: Callable[[], None] | None = None,
    ) -> tuple[str | None, str | None]:
        """One rewrite within the timeout: (the rewrite, or None with the reason); failures follow the policy."""
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                return await self._draw(text, mode, contract, context, seed, on_rewrite)
        except (ContextLengthError, UpstreamStatusError) as exc:
            return None, self._rejected(exc)
        except InvalidRequestError:
            raise
        except Exception as exc:  # any prompter failure, a bug in its engine included, follows the policy
            return None, self._unavailable(exc)

    async def _draw(
        self,
        text: str,
        mode: Mode,
        contract: Contract,
        context: Context,
        seed: int | None,
        on_rewrite: Callable[[], None] | None,
    ) -> tuple[str | None, str | None]:
        if mode == "optimal":  # the rho* sampler scores single prompts: it does not see the conversation
            assert self.optimal is not None
            out = await self.optimal(text, contract)
            return out, (None if out is not None else "optimal_kept_original")
        if self.cfg.early_decision:
            raw, finish = await self.generate_early(text, mode, contract, context, seed, on_rewrite)
        else:
            raw, finish = (await self.generate(text, mode, contract, context=context, seed=seed))[0]
        history = "\n".join(t for _, t in context)
        parsed = await asyncio.to_thread(self.validator, text, raw, finish, contract, history)
        return parsed.text, parsed.reason

    def _rejected(self, exc: ContextLengthError | UpstreamStatusError) -> str:
        """The prompter's model refused the prompt itself (too long for its context, say). Fail-open serves the
        original, which the frozen model may still take; fail-closed relays that 4xx. Upstream overload (429/5xx)
        is an unavailable prompter like any other failure."""
        refused = isinstance(exc, ContextLengthError) or (
            400 <= exc.status_code < 500 and exc.status_code != 429
        )
        if not refused:
            return self._unavailable(exc)
        if self.cfg.fail_policy == "closed":
            raise exc
        return REJECTED

    def _unavailable(self, exc: Exception) -> str:
        """Fail-closed answers 503 for a failed prompter; fail-open serves the original prompt and says why."""
        if self.cfg.fail_policy == "closed":
            raise UpstreamUnavailableError(
                f"the prompter is unavailable ({type(exc).__name__})", code="prompter_unavailable"
            ) from exc
        return UNAVAILABLE

    def _outcome(self, info: AlignProInfo, text: str, out: str | None, reason: str | None) -> Rewrite:
        """What to send: the rewrite ``out`` under the contract, or the original ``text`` when there is none."""
        if out is None:
            info.fallback = reason
            if self.on_fallback is not None and reason is not None:
                self.on_fallback(reason)
            return Rewrite(info, text)
        if info.contract == "augment":
            info.rewritten, info.rewritten_prompt, info.guidance = True, text, frame_guidance(out)
            return Rewrite(info, text, guidance=info.guidance)
        info.rewritten_prompt = out
        # `rewritten` means the frozen model is sent something else; the prompter's KEEP (or an output equal to
        # the original) is its choice to keep the prompt, reported as `kept`.
        info.rewritten = out != text
        info.kept = not info.rewritten
        return Rewrite(info, out)
