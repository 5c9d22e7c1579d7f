"""``alignpro train CONFIG.yaml [--resume]``: train an Align-Pro prompter (closed-form or RL), evaluate it on the
dev split, and write a PEFT adapter with its ``alignpro.json``.

The YAML keys are the fields of :class:`~alignpro.training.closed_form.ClosedFormConfig` or
:class:`~alignpro.training.rl.RLConfig` (``trainer: closed-form | rl``); ``--set key=value`` overrides one
(``alignpro train --help-config`` lists them with their help). The output folder gets:

=======================  ===================================================================================
``log.jsonl``            one JSON object per logged step (loss, reward, KL to rho_ref, CPU seconds, ...)
``curves.png``           reward, KL and loss against the step
``checkpoint-N/``        periodic checkpoints (adapter + optimizer + RNG + position); ``--resume`` continues
``adapter/``             the trained PEFT adapter and ``alignpro.json`` (base model, lam, reward, contract,
                         data hash, metrics, the command line)
``report.json``          the dev evaluation: mean reward for none / reference / trained (/ optimal), KL
=======================  ===================================================================================
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alignpro.errors import ConfigError

ADAPTER_META = "alignpro.json"
DEV_KEYS = (
    "n",
    "none",
    "reference",
    "trained",
    "optimal",
    "kl_trained_vs_reference",
    "trained_minus_reference",
)


# ------------------------------------------------------------------------------------------------ config
def config_classes() -> dict[str, type]:
    from alignpro.training.closed_form import ClosedFormConfig
    from alignpro.training.rl import RLConfig

    return {"closed-form": ClosedFormConfig, "rl": RLConfig}


def make_config(raw: dict[str, Any]) -> Any:
    """The trainer's config dataclass from a dict (YAML), checking the keys."""
    trainer = str(raw.get("trainer", "closed-form"))
    classes = config_classes()
    if trainer not in classes:
        raise ConfigError(f"unknown trainer {trainer!r}; expected one of {', '.join(classes)}")
    cls = classes[trainer]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"unknown {trainer} setting(s) {', '.join(unknown)}; see `alignpro train --help-config`"
        )
    cfg = cls(**raw)
    if cfg.lam <= 0:
        raise ConfigError("lam must be > 0")
    if cfg.contract not in ("rewrite", "augment"):
        raise ConfigError("contract must be rewrite or augment")
    if isinstance(cfg.data, str):
        cfg.data = [cfg.data]
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Any:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p} must hold a mapping of settings")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} must look like key=value")
        raw[key.strip()] = yaml.safe_load(value)
    return make_config(raw)


def config_help() -> str:
    lines = []
    for name, cls in config_classes().items():
        lines.append(f"trainer: {name}")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
            lines.append(f"  {f.name} = {default!r}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ helpers
class JsonlLog:
    def __init__(self, path: Path, echo: bool = False) -> None:
        self.path = path
        self.echo = echo
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, rec: dict[str, Any]) -> None:
        rec = {"time": round(time.time(), 3), **rec}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        if self.echo:
            print(json.dumps(rec), file=sys.stderr)


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_curves(log_path: Path, out: Path, title: str = "") -> Path | None:
    """reward, KL (to rho_ref) and loss against the step, from ``log.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in read_log(log_path) if r.get("event") == "step"]
    if not recs:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in zip(axes, ("reward", "kl", "loss"), ("reward (R estimate)", "KL(rho_theta || rho_ref)",
                                                                   "loss"), strict=True):  # fmt: skip
        pts = [(r["step"], r[key]) for r in recs if key in r and r[key] is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="." if len(pts) < 40 else None)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


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


def base_model_name(spec: str) -> str:
    from alignpro import embedded

    if spec in (embedded.EMBEDDED, embedded.DEFAULT_MODEL.name, embedded.DEFAULT_MODEL.served_name):
        return embedded.DEFAULT_MODEL.served_name
    return spec


async def engine_rewrites(
    engine: Any, rows: Sequence[Any], cfg: Any, k: int
) -> list[list[tuple[str, str | None]]]:
    """K rho_ref outputs per row drawn through ``engine`` (one request with n=K each, bounded concurrency)."""
    import asyncio

    from alignpro.prompter.instruction import prompter_outputs, prompter_request

    sem = asyncio.Semaphore(max(1, cfg.concurrency))

    async def one(text: str) -> list[tuple[str, str | None]]:
        body = prompter_request(
            text, cfg.contract, model=engine.default_model(), max_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, top_p=cfg.top_p, n=k,
        )  # fmt: skip
        async with sem:
            return prompter_outputs(await engine.chat(body))

    return list(await asyncio.gather(*(one(r.prompt) for r in rows)))


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate(
    policy: Any,
    dev: Sequence[Any],
    estimator: Any,
    runner: Any,
    cfg: Any,
    validator: Any,
    *,
    optimal_k: int = 0,
    selector: Any = None,
    seed_tag: str = "eval",
) -> dict[str, Any]:
    """Mean reward on ``dev`` when the frozen model is served the original prompt (``none``), a rho_ref rewrite
    (``reference``), a rho_theta rewrite (``trained``), and optionally the rho* sampler over K rho_ref rewrites
    (``optimal``, selected with ``selector``'s answers, scored with fresh ones); plus the KL of rho_theta to
    rho_ref on the sampled trained rewrites. ``estimator`` answers with a seed the training never used."""
    from alignpro.prompter.optimal import choose

    contract = cfg.contract
    xs = [e.prompt for e in dev]
    kinds = [e.kind for e in dev]
    out: dict[str, Any] = {"n": len(dev), "kinds": {k: kinds.count(k) for k in sorted(set(kinds))}}
    per_mode: dict[str, list[float]] = {}
    t0 = time.process_time()
    per_mode["none"] = estimator.estimate(runner, xs, [None] * len(xs), kinds)
    rewrites: dict[str, list[str | None]] = {}
    for mode, adapter in (("reference", False), ("trained", True)):
        samples = policy.sample(dev, contract, 1, adapter=adapter, max_new_tokens=cfg.max_new_tokens,
                                temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                                batch_size=cfg.gen_batch_size, tag=f"{seed_tag}-{mode}")  # fmt: skip
        validator.prefetch([t for s in samples for t in (s.example.prompt, s.text.strip())])
        served = []
        reasons: dict[str, int] = {}
        for s in samples:
            parsed = validator(s.example.prompt, s.text, s.finish_reason, contract)
            served.append(parsed.text)
            if parsed.text is None:
                reasons[parsed.reason or "unusable"] = reasons.get(parsed.reason or "unusable", 0) + 1
        rewrites[mode] = served
        per_mode[mode] = estimator.estimate(runner, xs, served, kinds)
        out[f"{mode}_fallbacks"] = reasons
        if adapter:
            theta = policy.sequence_logprob(samples, adapter=True)
            ref = policy.sequence_logprob(samples, adapter=False)
            diffs = [a - b for a, b in zip(theta, ref, strict=True)]
            out["kl_trained_vs_reference"] = float(np.mean(diffs))
            out["kl_sem"] = float(np.std(diffs, ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else 0.0
    if optimal_k > 0 and selector is not None:
        cands = policy.sample(dev, contract, optimal_k, adapter=False, max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                              batch_size=cfg.gen_batch_size, tag=f"{seed_tag}-optimal")  # fmt: skip
        texts = [validator(c.example.prompt, c.text, c.finish_reason, contract).text for c in cands]
        r_sel = selector.estimate(
            runner, [c.example.prompt for c in cands], texts, [c.example.kind for c in cands]
        )
        import random

        rng = random.Random(cfg.seed)
        chosen = []
        for i in range(len(dev)):
            block = r_sel[i * optimal_k : (i + 1) * optimal_k]
            chosen.append(texts[i * optimal_k + choose(block, cfg.lam, rng)])
        rewrites["optimal"] = chosen
        per_mode["optimal"] = estimator.estimate(runner, xs, chosen, kinds)
    for mode, rs in per_mode.items():
        arr = np.asarray(rs)
        out[mode] = {
            "mean_reward": float(arr.mean()),
            "sem": float(arr.std(ddof=1) / np.sqrt(len(arr))) if len(arr) > 1 else 0.0,
            "by_kind": {
                k: float(arr[[i for i, kk in enumerate(kinds) if kk == k]].mean()) for k in set(kinds)
            },
        }
    if "trained" in per_mode:
        d = np.asarray(per_mode["trained"]) - np.asarray(per_mode["reference"])
        out["trained_minus_reference"] = {
            "mean": float(d.mean()),
            "sem": float(d.std(ddof=1) / np.sqrt(len(d))),
        }
        d2 = np.asarray(per_mode["trained"]) - np.asarray(per_mode["none"])
        out["trained_minus_none"] = {
            "mean": float(d2.mean()),
            "sem": float(d2.std(ddof=1) / np.sqrt(len(d2))),
        }
    out["eval_cpu_s"] = time.process_time() - t0
    out["examples"] = [
        {"id": e.id, "kind": e.kind, "prompt": e.prompt, **{m: rewrites[m][i] for m in rewrites},
         **{f"R_{m}": per_mode[m][i] for m in per_mode}}
        for i, e in enumerate(dev[:12])
    ]  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------ run
def run(
    cfg: Any,
    *,
    resume: bool = False,
    eval_only: bool = False,
    progress: bool = True,
    reward_fn: Callable[..., list[float]] | None = None,
    command: str | None = None,
    optimal_k: int = 0,
    validator: Any = None,
) -> dict[str, Any]:
    """Train (unless ``eval_only``), save the adapter and its metadata, evaluate on dev; returns the report.
    ``reward_fn`` and ``validator`` replace the configured reward and the default output validator (tests)."""
    import torch

    from alignpro import embedded
    from alignpro.engines.factory import build_frozen_engine
    from alignpro.prompter.validate import OutputValidator
    from alignpro.scoring.estimate import FrozenSampling, LoopThread, REstimator
    from alignpro.scoring.rewards import load_reward
    from alignpro.training import closed_form as cf
    from alignpro.training.data import balanced, data_hash, load_prompts

    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cf.set_seed(cfg.seed)
    log = JsonlLog(out_dir / "log.jsonl")
    command = command or " ".join(shlex.quote(a) for a in sys.argv)
    if not resume and not eval_only and (out_dir / "log.jsonl").exists():
        (out_dir / "log.jsonl").unlink()
        for stale in ("samples.jsonl", "latest", "engine_samples.json"):
            (out_dir / stale).unlink(missing_ok=True)

    train = balanced(load_prompts(cfg.data, split="train", train_percent=cfg.train_percent), cfg.train_limit)
    dev = balanced(load_prompts(cfg.data, split="dev", train_percent=cfg.train_percent), cfg.dev_limit or 0)
    if not train and not eval_only:
        raise ConfigError("the train split is empty")
    base_path = embedded.resolve(cfg.base_model)
    reward = reward_fn or load_reward(cfg.reward)
    validator = validator or OutputValidator()
    runner = LoopThread()
    frozen_path = cfg.frozen_model
    if cfg.frozen_engine == "local":
        frozen_path = embedded.resolve(cfg.frozen_model)
    engine = build_frozen_engine(cfg.frozen_engine, frozen_path, cfg.frozen_urls)
    runner.run(engine.start())
    sampling = FrozenSampling(m=cfg.m, max_tokens=cfg.response_max_tokens, temperature=cfg.response_temperature,
                              seed=cfg.seed)  # fmt: skip
    estimator = REstimator(engine, reward, sampling=sampling, contract=cfg.contract, concurrency=cfg.concurrency,
                           cache_path=out_dir / "frozen_cache.jsonl")  # fmt: skip
    server_pid = getattr(cfg, "frozen_server_pid", None)
    log({"event": "start", "trainer": cfg.trainer, "train": len(train), "dev": len(dev), "resume": resume,
         "command": command, "config": dataclasses.asdict(cfg)})  # fmt: skip
    adapter_dir = out_dir / "adapter"
    summary: dict[str, Any] = {}
    wall0, cpu0 = time.perf_counter(), time.process_time()
    server0 = proc_cpu_seconds(server_pid) if server_pid else 0.0
    try:
        if not eval_only:
            if cfg.trainer == "closed-form":
                ckpt = cf.latest_checkpoint(out_dir) if resume else None
                policy = cf.Policy(base_path, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                   lora_dropout=cfg.lora_dropout, target_modules=cfg.target_modules,
                                   adapter_path=ckpt)  # fmt: skip
                state = cf.load_checkpoint(ckpt) if ckpt else None

                def score(samples: list[Any]) -> None:
                    validator.prefetch([t for s in samples for t in (s.example.prompt, s.text.strip())])
                    for s in samples:
                        parsed = validator(s.example.prompt, s.text, s.finish_reason, cfg.contract)
                        s.served, s.reason = parsed.text, parsed.reason
                    rs = estimator.estimate(runner, [s.example.prompt for s in samples],
                                            [s.served for s in samples], [s.example.kind for s in samples])  # fmt: skip
                    for s, r in zip(samples, rs, strict=True):
                        s.reward = r

                sampler = None
                if cfg.sample_with_engine:

                    def sampler(rows: Sequence[Any], k: int) -> list[list[tuple[str, str | None]]]:
                        # kept on disk: an interrupted run resumes without drawing them again
                        raw = out_dir / "engine_samples.json"
                        if resume and raw.is_file():
                            got = json.loads(raw.read_text())
                            if [g["id"] for g in got] == [r.id for r in rows]:
                                return [[(t, f) for t, f in g["outputs"]] for g in got]
                        drawn = runner.run(engine_rewrites(engine, rows, cfg, k))
                        raw.write_text(
                            json.dumps([{"id": r.id, "outputs": d} for r, d in zip(rows, drawn, strict=True)])
                        )
                        return drawn

                summary = cf.train_closed_form(cfg, policy, train, score, out_dir, log, resume=state,
                                               progress=progress, engine_sampler=sampler,
                                               reuse_samples=resume)  # fmt: skip
                policy.save(adapter_dir)
            else:
                from alignpro.training.rl import RReward, train_rl

                rr = RReward(estimator, runner, validator, cfg.contract, cfg.max_new_tokens)
                model, summary = train_rl(
                    cfg, base_path, train, rr, out_dir, log, resume=resume, progress=progress
                )
                model.save_pretrained(str(adapter_dir))
                del model
                summary["unusable_rate"] = rr.unusable / max(rr.seen, 1)
            summary["train_wall_s"] = time.perf_counter() - wall0
            summary["train_cpu_s"] = time.process_time() - cpu0
            if server_pid:
                summary["frozen_server_cpu_s"] = proc_cpu_seconds(server_pid) - server0
            summary["frozen_calls"] = estimator.calls
            log({"event": "trained", **summary})
            plot_curves(out_dir / "log.jsonl", out_dir / "curves.png", title=f"{cfg.trainer} (lam={cfg.lam})")
        elif not (adapter_dir / "adapter_config.json").is_file():
            raise ConfigError(f"--eval-only needs a trained adapter in {adapter_dir}")

        report: dict[str, Any] = {"trainer": cfg.trainer, "command": command, "config": dataclasses.asdict(cfg),
                                  "train_size": len(train), "data_hash": data_hash(train), "train": summary}  # fmt: skip
        if dev:
            eval_policy = cf.Policy(base_path, adapter_path=adapter_dir)
            eval_est = REstimator(engine, reward, sampling=dataclasses.replace(sampling, seed=cfg.seed + 1000,
                                  m=max(cfg.m, 2)), contract=cfg.contract, concurrency=cfg.concurrency,
                                  cache_path=out_dir / "frozen_cache.jsonl")  # fmt: skip
            eval_val = OutputValidator(validator.min_similarity, embed=validator._embed)
            report["dev"] = evaluate(eval_policy, dev, eval_est, runner, cfg, eval_val, optimal_k=optimal_k,
                                     selector=estimator)  # fmt: skip
            report["dev"]["validator_counts"] = dict(eval_val.counts)
            log({"event": "eval", **{k: v for k, v in report["dev"].items() if k != "examples"}})
        write_adapter_meta(adapter_dir, cfg, train, report, command)
        (out_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
        return report
    finally:
        runner.run(engine.aclose())
        runner.close()


def write_adapter_meta(
    adapter_dir: Path, cfg: Any, train: Sequence[Any], report: dict[str, Any], command: str
) -> None:
    from alignpro import __version__
    from alignpro.training.data import data_hash

    if not adapter_dir.is_dir():
        return
    dev = report.get("dev", {})
    metrics = {
        "train": report.get("train", {}),
        "dev": {k: dev[k] for k in DEV_KEYS if k in dev},
    }
    meta = {
        "format": "alignpro-prompter/1",
        "base_model": base_model_name(cfg.base_model),
        "trainer": cfg.trainer,
        "lam": cfg.lam,
        "reward": cfg.reward,
        "contract": cfg.contract,
        "data": list(cfg.data),
        "data_hash": data_hash(train),
        "train_size": len(train),
        "metrics": metrics,
        "command": command,
        "config": dataclasses.asdict(cfg),
        "alignpro_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (adapter_dir / ADAPTER_META).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    # A portable adapter: name the base model by its hub id rather than this machine's cache path.
    cfg_path = adapter_dir / "adapter_config.json"
    if cfg_path.is_file():
        acfg = json.loads(cfg_path.read_text())
        acfg["base_model_name_or_path"] = meta["base_model"]
        cfg_path.write_text(json.dumps(acfg, indent=2))
    for f in adapter_dir.iterdir():
        f.chmod(0o644)


# ------------------------------------------------------------------------------------------------ CLI
def cmd_train(args: argparse.Namespace) -> int:
    if args.help_config:
        print(config_help())
        return 0
    if not args.config:
        raise ConfigError("alignpro train needs a CONFIG.yaml")
    overrides = list(args.set or [])
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    cfg = load_config(args.config, overrides)
    report = run(cfg, resume=args.resume, eval_only=args.eval_only, progress=not args.no_progress,
                 optimal_k=args.optimal_k)  # fmt: skip
    dev = report.get("dev")
    if dev:
        modes = [m for m in ("none", "reference", "trained", "optimal") if m in dev]
        print(" ".join(f"{m}={dev[m]['mean_reward']:.4f}" for m in modes),
              f"kl={dev.get('kl_trained_vs_reference', float('nan')):.3f}")  # fmt: skip
    print(Path(cfg.output_dir) / "adapter")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="train an Align-Pro prompter (closed-form or RL) and evaluate it on dev")
    p.add_argument("config", nargs="?", help="YAML file of trainer settings (see --help-config)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting (YAML value)")
    p.add_argument("--output-dir", help="override output_dir")
    p.add_argument(
        "--eval-only", action="store_true", help="only evaluate output_dir/adapter on the dev split"
    )
    p.add_argument(
        "--optimal-k", type=int, default=0, help="also evaluate the rho* sampler with K candidates"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--help-config", action="store_true", help="list every setting with its help and exit")
    p.set_defaults(func=cmd_train)
