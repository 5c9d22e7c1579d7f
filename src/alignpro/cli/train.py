"""``alignpro train CONFIG.yaml [--resume]``: train an Align-Pro prompter (closed-form or RL), evaluate it on the
dev split, and write a PEFT adapter with its ``alignpro.json``.

Only the command line lives here. The YAML keys are the fields of the trainer's config in
:mod:`alignpro.training.config` (``trainer: closed-form | rl``); ``--set key=value`` overrides one
(``alignpro train --help-config`` lists them with their help). :func:`alignpro.training.pipeline.run` does the
work; its module lists what the output folder gets.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from alignpro.errors import ConfigError


def cmd_train(args: argparse.Namespace) -> int:
    # imported here: `alignpro` builds every command's parser; only this command needs the training code
    from alignpro.training.config import config_help, load_config
    from alignpro.training.pipeline import run

    if args.help_config:
        sys.stdout.write(config_help() + "\n")  # one write: `| head` closing the pipe early is no error
        return 0
    if not args.config:
        raise ConfigError("alignpro train needs a CONFIG.yaml")
    overrides = list(args.set or [])
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    cfg = load_config(args.config, overrides)
    report = run(
        cfg,
        resume=args.resume,
        eval_only=args.eval_only,
        progress=not args.no_progress,
        optimal_k=args.optimal_k,
    )
    dev = report.get("dev")
    if dev:
        modes = [m for m in ("none", "reference", "trained", "optimal") if m in dev]
        kl = dev.get("kl_trained_vs_reference", float("nan"))
        print(" ".join(f"{m}={dev[m]['mean_reward']:.4f}" for m in modes), f"kl={kl:.3f}")
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
