"""The training pipeline behind ``alignpro train`` (:func:`run`): load the data, start the frozen engine, train a
prompter (closed-form or RL), evaluate it on the dev split, and write a PEFT adapter with its ``alignpro.json``.

The settings are a config of :mod:`alignpro.training.config`. The output folder (``output_dir``) gets:

=======================  ===================================================================================
``log.jsonl``            one JSON object per logged step (loss, reward, KL to rho_ref, CPU seconds, ...)
``curves.png``           reward, KL and loss against the step
``checkpoint-N/``        periodic checkpoints (adapter + optimizer + RNG + position); ``--resume`` continues
``adapter/``             the trained PEFT adapter and ``alignpro.json`` (base model, lam, reward, contract,
                         data hash, metrics, the command line)
``report.json``          the dev evaluation: mean reward for none / reference / trained (/ optimal), KL
=======================  ===================================================================================

Under ``accelerate launch`` every process runs :func:`run` alike (:mod:`alignpro.training.dist`): each builds its own
frozen engine (the ``frozen_urls`` replicas, rotated by rank) and R estimator (its answer cache in
``frozen_cache.rank<N>.jsonl``), the trainer splits the prompts, and only rank 0 writes the files above and evaluates
on dev; the other ranks return a report without ``dev``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import random
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alignpro import embedded
from alignpro.engines.base import Engine
from alignpro.engines.factory import build_frozen_engine
from alignpro.errors import ConfigError, ContextLengthError
from alignpro.prompter.instruction import prompter_outputs, prompter_request
from alignpro.prompter.optimal import choose
from alignpro.prompter.validate import OutputValidator
from alignpro.scoring.estimate import FrozenSampling, LoopThread, REstimator
from alignpro.scoring.rewards import load_reward
from alignpro.training import closed_form as cf
from alignpro.training.artifacts import JsonlLog, plot_curves, write_adapter_meta
from alignpro.training.config import PROPOSAL_TEMPERATURE, PROPOSAL_TOP_P
from alignpro.training.data import Example, balanced, data_hash, load_prompts, reward_columns
from alignpro.training.dist import Dist
from alignpro.training.rl import RReward, train_rl

Rewrites = list[list[tuple[str, str | None]]]  # per row, K (text, finish reason) prompter outputs


# ------------------------------------------------------------------------------------------------ run
@dataclass
class RunContext:
    """What one run holds, from :func:`open_run` to :meth:`close`: its config and output folder, this process's rank,
    the data, the frozen engine with the event-loop thread that drives it, and the R estimator (reward over the
    engine). ``log`` writes ``log.jsonl`` on rank 0 and nothing elsewhere."""

    cfg: Any
    out_dir: Path
    dist: Dist
    log: Callable[[dict[str, Any]], None]
    train: list[Example]
    dev: list[Example]
    base_path: str
    reward: Callable[..., list[float]]
    validator: OutputValidator
    runner: LoopThread
    engine: Engine
    sampling: FrozenSampling
    estimator: REstimator
    resume: bool = False
    progress: bool = True

    @property
    def adapter_dir(self) -> Path:
        return self.out_dir / "adapter"

    def close(self) -> None:
        self.runner.run(self.engine.aclose())
        self.runner.close()


def run(
    cfg: Any,
    *,
    resume: bool = False,
    eval_only: bool = False,
    progress: bool = True,
    reward_fn: Callable[..., list[float]] | None = None,
    command: str | None = None,
    optimal_k: int = 0,
    validator: OutputValidator | None = None,
) -> dict[str, Any]:
    """Train (unless ``eval_only``), save the adapter and its metadata, evaluate on dev; returns the report.
    ``reward_fn`` and ``validator`` replace the configured reward and the default output validator (tests)."""
    ctx = open_run(cfg, resume, eval_only, progress, reward_fn, validator)
    command = command or " ".join(shlex.quote(a) for a in sys.argv)
    ctx.log(
        {
            "event": "start",
            "trainer": cfg.trainer,
            "train": len(ctx.train),
            "dev": len(ctx.dev),
            "resume": resume,
            "command": command,
            "config": dataclasses.asdict(cfg),
        }
    )
    try:
        summary: dict[str, Any] = {}
        if not eval_only:
            summary = train_phase(ctx)
        elif not (ctx.adapter_dir / "adapter_config.json").is_file():
            raise ConfigError(f"--eval-only needs a trained adapter in {ctx.adapter_dir}")
        report: dict[str, Any] = {
            "trainer": cfg.trainer,
            "command": command,
            "config": dataclasses.asdict(cfg),
            "train_size": len(ctx.train),
            "data_hash": data_hash(ctx.train),
            "train": summary,
        }
        if not ctx.dist.main:
            return report
        if ctx.dev:
            report["dev"] = eval_phase(ctx, optimal_k)
        write_adapter_meta(ctx.adapter_dir, cfg, ctx.train, report, command)
        (ctx.out_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
        return report
    finally:
        ctx.close()


def open_run(
    cfg: Any,
    resume: bool,
    eval_only: bool,
    progress: bool,
    reward_fn: Callable[..., list[float]] | None,
    validator: OutputValidator | None,
) -> RunContext:
    """Seed, clear a previous run's logs (unless resuming or only evaluating), load the splits and start the frozen
    engine."""
    import torch

    dist = Dist.current()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cf.set_seed(cfg.seed)
    if dist.main and not resume and not eval_only and (out_dir / "log.jsonl").exists():
        for stale in ("log.jsonl", "samples.jsonl", "latest", "engine_samples.json"):
            (out_dir / stale).unlink(missing_ok=True)
    dist.barrier()  # no rank starts writing before rank 0 has cleared the previous run
    train = balanced(load_prompts(cfg.data, split="train", train_percent=cfg.train_percent), cfg.train_limit)
    dev = balanced(load_prompts(cfg.data, split="dev", train_percent=cfg.train_percent), cfg.dev_limit or 0)
    if not train and not eval_only:
        raise ConfigError("the train split is empty")
    base_path = embedded.resolve(cfg.base_model)
    reward = reward_fn or load_reward(cfg.reward)
    validator = validator or OutputValidator()
    runner = LoopThread()
    frozen_path = embedded.resolve(cfg.frozen_model) if cfg.frozen_engine == "local" else cfg.frozen_model
    engine = build_frozen_engine(cfg.frozen_engine, frozen_path, dist.rotate(cfg.frozen_urls))
    runner.run(engine.start())
    sampling = FrozenSampling(
        m=cfg.m, max_tokens=cfg.response_max_tokens, temperature=cfg.response_temperature, seed=cfg.seed
    )
    return RunContext(
        cfg=cfg,
        out_dir=out_dir,
        dist=dist,
        log=dist.main_only(JsonlLog(out_dir / "log.jsonl")),
        train=train,
        dev=dev,
        base_path=base_path,
        reward=reward,
        validator=validator,
        runner=runner,
        engine=engine,
        sampling=sampling,
        estimator=_estimator(cfg, engine, reward, sampling, dist.rank_file(out_dir / "frozen_cache.jsonl")),
        resume=resume,
        progress=progress,
    )


def _estimator(
    cfg: Any, engine: Engine, reward: Callable[..., list[float]], sampling: FrozenSampling, cache: Path
) -> REstimator:
    """R over ``engine``, caching the frozen answers in ``cache`` (a JSON-lines file)."""
    return REstimator(
        engine,
        reward,
        sampling=sampling,
        contract=cfg.contract,
        concurrency=cfg.concurrency,
        cache_path=cache,
    )


# ------------------------------------------------------------------------------------------------ train
def train_phase(ctx: RunContext) -> dict[str, Any]:
    """Train with the configured trainer, save the adapter, plot the curves; returns the summary with the
    training's wall and CPU seconds (the frozen server's too, given ``frozen_server_pid``)."""
    cfg = ctx.cfg
    server_pid = getattr(cfg, "frozen_server_pid", None)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    server0 = proc_cpu_seconds(server_pid) if server_pid else 0.0
    summary = _train_closed_form(ctx) if cfg.trainer == "closed-form" else _train_rl(ctx)
    summary["train_wall_s"] = time.perf_counter() - wall0
    summary["train_cpu_s"] = time.process_time() - cpu0
    if server_pid:
        summary["frozen_server_cpu_s"] = proc_cpu_seconds(server_pid) - server0
    summary["frozen_calls"] = int(ctx.dist.reduce(ctx.estimator.calls))
    summary["processes"] = ctx.dist.world
    ctx.log({"event": "trained", **summary})
    if ctx.dist.main:
        plot_curves(
            ctx.out_dir / "log.jsonl", ctx.out_dir / "curves.png", title=f"{cfg.trainer} (lam={cfg.lam})"
        )
    return summary


def _train_closed_form(ctx: RunContext) -> dict[str, Any]:
    cfg = ctx.cfg
    ckpt = cf.latest_checkpoint(ctx.out_dir) if ctx.resume else None
    policy = cf.Policy(
        ctx.base_path,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        adapter_path=ckpt,
    )
    summary = cf.train_closed_form(
        cfg,
        policy,
        ctx.train,
        functools.partial(_score_samples, ctx),
        ctx.out_dir,
        ctx.log,
        resume=cf.load_checkpoint(ckpt) if ckpt else None,
        progress=ctx.progress,
        engine_sampler=functools.partial(_engine_samples, ctx) if cfg.sample_with_engine else None,
        reuse_samples=ctx.resume,
        dist=ctx.dist,
    )
    if ctx.dist.main:
        policy.save(ctx.adapter_dir)
    return summary


def _train_rl(ctx: RunContext) -> dict[str, Any]:
    cfg = ctx.cfg
    rr = RReward(ctx.estimator, ctx.runner, ctx.validator, cfg.contract, cfg.max_new_tokens)
    model, summary = train_rl(
        cfg,
        ctx.base_path,
        ctx.train,
        rr,
        ctx.out_dir,
        ctx.log,
        resume=ctx.resume,
        progress=ctx.progress,
        dist=ctx.dist,
    )
    if ctx.dist.main:
        model.save_pretrained(str(ctx.adapter_dir))
    del model
    summary["unusable_rate"] = ctx.dist.reduce(rr.unusable) / max(ctx.dist.reduce(rr.seen), 1)
    return summary


def _validate(samples: Sequence[cf.Sample], validator: OutputValidator, contract: Any) -> dict[str, int]:
    """Each sample's served text (None: unusable) and reason, as the gateway would validate it; returns how many
    fell back, by reason."""
    validator.prefetch([t for s in samples for t in (s.example.prompt, s.text.strip())])
    reasons: dict[str, int] = {}
    for s in samples:
        parsed = validator(s.example.prompt, s.text, s.finish_reason, contract, s.example.history_text())
        s.served, s.reason = parsed.text, parsed.reason
        if parsed.text is None:
            reasons[parsed.reason or "unusable"] = reasons.get(parsed.reason or "unusable", 0) + 1
    return reasons


def _score_samples(ctx: RunContext, samples: list[cf.Sample]) -> None:
    """The closed-form trainer's scorer: validate each sample, then R of what is served (the original request
    where the rewrite is unusable)."""
    _validate(samples, ctx.validator, ctx.cfg.contract)
    examples = [s.example for s in samples]
    rs = ctx.estimator.estimate(
        ctx.runner,
        [e.prompt for e in examples],
        [s.served for s in samples],
        [e.kind for e in examples],
        columns=reward_columns(examples),
        histories=[e.history for e in examples],
    )
    for s, r in zip(samples, rs, strict=True):
        s.reward = r


def _engine_samples(ctx: RunContext, rows: Sequence[Example], k: int) -> Rewrites:
    """Round 0's rho_ref rewrites drawn through the frozen engine (``sample_with_engine``)."""
    # kept on disk (each rank its share): an interrupted run resumes without drawing them again
    raw = ctx.dist.rank_file(ctx.out_dir / "engine_samples.json")
    if ctx.resume and raw.is_file():
        got = json.loads(raw.read_text())
        if [g["id"] for g in got] == [r.id for r in rows]:
            return [[(t, f) for t, f in g["outputs"]] for g in got]
    drawn = ctx.runner.run(engine_rewrites(ctx.engine, rows, ctx.cfg, k))
    raw.write_text(json.dumps([{"id": r.id, "outputs": d} for r, d in zip(rows, drawn, strict=True)]))
    return drawn


async def engine_rewrites(engine: Any, rows: Sequence[Any], cfg: Any, k: int) -> Rewrites:
    """K rho_ref outputs per row drawn through ``engine`` (one request with n=K each, bounded concurrency), at
    temperature 1 and top-p 1 whatever the config says: these are round 0's proposal, weighted as draws from rho_ref
    itself (importance ratio 1), which only the untempered, untruncated softmax is."""
    sem = asyncio.Semaphore(max(1, cfg.concurrency))

    async def one(row: Any) -> list[tuple[str, str | None]]:
        body = prompter_request(
            row.prompt,
            cfg.contract,
            context=row.context(),
            model=engine.default_model(),
            max_tokens=cfg.max_new_tokens,
            temperature=PROPOSAL_TEMPERATURE,
            top_p=PROPOSAL_TOP_P,
            n=k,
        )
        async with sem:
            try:
                return prompter_outputs(await engine.chat(body))
            except ContextLengthError:
                # The gateway serves such a request as asked (a fallback): every draw is unusable, the trainer
                # fits none of them, and one long request no longer ends the run.
                return [("", "length")] * k

    return list(await asyncio.gather(*(one(r) for r in rows)))


def proc_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its descendants, from /proc (0 where unreadable)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    todo = [pid]
    seen: set[int] = set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = (task / "children").read_text().split()
                todo += [int(k) for k in kids]
        except (OSError, ValueError, IndexError):
            continue
    return total


# ------------------------------------------------------------------------------------------------ evaluation
def eval_phase(ctx: RunContext, optimal_k: int = 0) -> dict[str, Any]:
    """:func:`evaluate` of the saved adapter on dev, with frozen answers from a seed the training never used and a
    fresh validator (its counts go in the result)."""
    cfg = ctx.cfg
    policy = cf.Policy(ctx.base_path, adapter_path=ctx.adapter_dir)
    sampling = dataclasses.replace(ctx.sampling, seed=cfg.seed + 1000, m=max(cfg.m, 2))
    estimator = _estimator(cfg, ctx.engine, ctx.reward, sampling, ctx.out_dir / "frozen_cache.jsonl")
    validator = OutputValidator(ctx.validator.min_similarity, embed=ctx.validator._embed)
    dev = evaluate(
        policy, ctx.dev, estimator, ctx.runner, cfg, validator, optimal_k=optimal_k, selector=ctx.estimator
    )
    dev["validator_counts"] = dict(validator.counts)
    ctx.log({"event": "eval", **{k: v for k, v in dev.items() if k != "examples"}})
    return dev


def evaluate(
    policy: cf.Policy,
    dev: Sequence[Example],
    estimator: REstimator,
    runner: LoopThread,
    cfg: Any,
    validator: OutputValidator,
    *,
    optimal_k: int = 0,
    selector: REstimator | None = None,
    seed_tag: str = "eval",
) -> dict[str, Any]:
    """Mean reward on ``dev`` when the frozen model is served the original prompt (``none``), a rho_ref rewrite
    (``reference``), a rho_theta rewrite (``trained``), and optionally the rho* sampler over K rho_ref rewrites
    (``optimal``, selected with ``selector``'s answers, scored with fresh ones); plus the KL of rho_theta to
    rho_ref on the sampled trained rewrites. ``estimator`` answers with a seed the training never used."""
    xs = [e.prompt for e in dev]
    kinds = [e.kind for e in dev]
    cols = reward_columns(dev)
    hs = [e.history for e in dev]
    out: dict[str, Any] = {"n": len(dev), "kinds": {k: kinds.count(k) for k in sorted(set(kinds))}}
    t0 = time.process_time()
    per_mode = {"none": estimator.estimate(runner, xs, [None] * len(xs), kinds, cols, hs)}
    rewrites: dict[str, list[str | None]] = {}
    for mode, adapter in (("reference", False), ("trained", True)):
        samples = cf.sample_rewrites(policy, dev, cfg, 1, adapter=adapter, tag=f"{seed_tag}-{mode}")
        out[f"{mode}_fallbacks"] = _validate(samples, validator, cfg.contract)
        rewrites[mode] = [s.served for s in samples]
        per_mode[mode] = estimator.estimate(runner, xs, rewrites[mode], kinds, cols, hs)
        if adapter:
            out.update(_kl_stats(policy, samples))
    if optimal_k > 0 and selector is not None:
        rewrites["optimal"] = _optimal_rewrites(
            policy, dev, selector, runner, cfg, validator, optimal_k, seed_tag
        )
        per_mode["optimal"] = estimator.estimate(runner, xs, rewrites["optimal"], kinds, cols, hs)
    for mode, rs in per_mode.items():
        out[mode] = _reward_stats(rs, kinds)
    if "trained" in per_mode:
        out["trained_minus_reference"] = _diff_stats(per_mode["trained"], per_mode["reference"])
        out["trained_minus_none"] = _diff_stats(per_mode["trained"], per_mode["none"])
    out["eval_cpu_s"] = time.process_time() - t0
    out["examples"] = _examples(dev[:12], rewrites, per_mode)
    return out


def _examples(
    rows: Sequence[Example], rewrites: dict[str, list[str | None]], rewards: dict[str, list[float]]
) -> list[dict[str, Any]]:
    """The first rows with each mode's rewrite and reward, for reading the report."""
    return [
        {
            "id": e.id,
            "kind": e.kind,
            "prompt": e.prompt,
            **{m: rewrites[m][i] for m in rewrites},
            **{f"R_{m}": rewards[m][i] for m in rewards},
        }
        for i, e in enumerate(rows)
    ]


def _kl_stats(policy: cf.Policy, samples: Sequence[cf.Sample]) -> dict[str, float]:
    """The mean (and its standard error) of ``log rho_theta - log rho_ref`` over rewrites drawn from rho_theta."""
    theta = policy.sequence_logprob(samples, adapter=True)
    ref = policy.sequence_logprob(samples, adapter=False)
    diffs = [a - b for a, b in zip(theta, ref, strict=True)]
    return {
        "kl_trained_vs_reference": float(np.mean(diffs)),
        "kl_sem": float(np.std(diffs, ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else 0.0,
    }


def _optimal_rewrites(
    policy: cf.Policy,
    dev: Sequence[Example],
    selector: REstimator,
    runner: LoopThread,
    cfg: Any,
    validator: OutputValidator,
    k: int,
    seed_tag: str,
) -> list[str | None]:
    """One rewrite per dev row from the rho* sampler: K rho_ref candidates, one chosen by ``selector``'s R."""
    # exact: resampling by exp(R/lam) turns draws from rho_ref into draws from rho* only if they are rho_ref's (T=1)
    cands = cf.sample_rewrites(policy, dev, cfg, k, adapter=False, tag=f"{seed_tag}-optimal", exact=True)
    texts = [
        validator(c.example.prompt, c.text, c.finish_reason, cfg.contract, c.example.history_text()).text
        for c in cands
    ]
    examples = [c.example for c in cands]
    r_sel = selector.estimate(
        runner,
        [e.prompt for e in examples],
        texts,
        [e.kind for e in examples],
        reward_columns(examples),
        [e.history for e in examples],
    )
    rng = random.Random(cfg.seed)
    return [texts[i * k + choose(r_sel[i * k : (i + 1) * k], cfg.lam, rng)] for i in range(len(dev))]


def _reward_stats(rs: Sequence[float], kinds: Sequence[str]) -> dict[str, Any]:
    arr = np.asarray(rs)
    return {
        "mean_reward": float(arr.mean()),
        "sem": float(arr.std(ddof=1) / np.sqrt(len(arr))) if len(arr) > 1 else 0.0,
        "by_kind": {k: float(arr[[i for i, kk in enumerate(kinds) if kk == k]].mean()) for k in set(kinds)},
    }


def _diff_stats(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    d = np.asarray(a) - np.asarray(b)
    return {"mean": float(d.mean()), "sem": float(d.std(ddof=1) / np.sqrt(len(d)))}
