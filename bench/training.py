"""The two prompter trainers side by side on a few steps: rollouts/s and reward gained per CPU-minute.

Runs ``alignpro train configs/train-closed-form.yaml`` and ``configs/train-rl.yaml`` one after the other, shrunk
with ``--set`` (few train prompts, one round / few steps, a small dev set), against one vLLM-CPU frozen model
this script starts. Per trainer:

* rollouts: rewrites sampled and scored by R (closed-form: its round's samples; rl: steps x prompts x K);
* rollouts/s over the training wall time;
* CPU: the trainer process plus the vLLM server (all its processes), from /proc, during training and dev eval;
* reward gained: the dev ``trained_minus_reference`` mean reward (the trained prompter against rho_ref on held-out
  prompts), per CPU-minute of training.

A few steps on 2 shared cores say which trainer buys reward more cheaply, not what either reaches at the end.

    ALIGNPRO_HOME=/tmp/aphome .venv/bin/python bench/training.py                 # ~20+ minutes
    ... --train-limit 4 --dev-limit 4 --rl-steps 2

Writes bench/results/training[-TAG]-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, VLLM_SERVED, cpu_seconds, exit_on_sigterm, table, vllm, write_json

ALIGNPRO = str(ROOT / ".venv" / "bin" / "alignpro")


def run_trainer(trainer: str, out: Path, url: str, vllm_pid: int, args: argparse.Namespace) -> dict[str, Any]:
    sets = {
        "train_limit": args.train_limit,
        "dev_limit": args.dev_limit,
        "frozen_engine": "openai",
        "frozen_model": VLLM_SERVED,
        "frozen_urls": json.dumps([url]),
        "k": args.k,
        "save_steps": 1000,
    }
    if trainer == "rl":
        sets |= {"max_steps": args.rl_steps, "kl_every": 0}
    else:
        sets |= {"epochs": args.cf_epochs, "rounds": 1, "kl_every": 0}
    cmd = [
        ALIGNPRO,
        "train",
        str(ROOT / "configs" / f"train-{trainer}.yaml"),
        "--output-dir",
        str(out),
        "--no-progress",
    ]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    log = out.parent / f"{trainer}.log"
    server0 = cpu_seconds(vllm_pid)
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        trainer_cpu = 0.0
        while proc.poll() is None:
            trainer_cpu = max(trainer_cpu, cpu_seconds(proc.pid))  # /proc is gone once it exits
            time.sleep(1.0)
    wall = time.perf_counter() - t0
    server_cpu = cpu_seconds(vllm_pid) - server0
    if proc.returncode != 0:
        raise RuntimeError(f"{trainer} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    train = report.get("train", {})
    if trainer == "rl":
        steps = max((r["step"] for r in recs if r.get("event") == "step"), default=0)
        rollouts = steps * int(report["config"]["prompts_per_step"]) * int(report["config"]["k"])
    else:
        rollouts = sum(r["samples"] for r in recs if r.get("event") == "round")
    train_cpu = float(train.get("train_cpu_s", 0.0))
    train_wall = float(train.get("train_wall_s", wall))
    gain = (report.get("dev") or {}).get("trained_minus_reference", {})
    cpu_min = (train_cpu + server_cpu * train_wall / wall) / 60  # the server's share during training
    return {
        "trainer": trainer,
        "rollouts": rollouts,
        "train_wall_s": round(train_wall, 1),
        "rollouts/s": round(rollouts / train_wall, 3) if train_wall else None,
        "train_cpu_s": round(train_cpu, 1),
        "vllm_cpu_s": round(server_cpu, 1),
        "total_wall_s": round(wall, 1),
        "trainer_cpu_s_total": round(trainer_cpu, 1),
        "dev_gain": gain.get("mean"),
        "dev_gain_sem": gain.get("sem"),
        "gain/cpu-min": round(gain["mean"] / cpu_min, 4)
        if gain.get("mean") is not None and cpu_min
        else None,
        "dev": {k: v for k, v in (report.get("dev") or {}).items() if k != "examples"},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trainers", default="closed-form,rl")
    ap.add_argument("--train-limit", type=int, default=8)
    ap.add_argument("--dev-limit", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--rl-steps", type=int, default=4)
    ap.add_argument("--cf-epochs", type=int, default=2)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    exit_on_sigterm()

    work = Path(tempfile.mkdtemp(prefix="alignpro-bench-"))
    rows = []
    server, url = vllm(work)
    try:
        for trainer in args.trainers.split(","):
            rows.append(run_trainer(trainer, work / trainer, url, server.pid, args))
            print(f"  {rows[-1]}", flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        table(
            rows,
            [
                "trainer",
                "rollouts",
                "train_wall_s",
                "rollouts/s",
                "train_cpu_s",
                "vllm_cpu_s",
                "dev_gain",
                "dev_gain_sem",
                "gain/cpu-min",
            ],
            title="Trainers on a few steps",
        )
    )
    out = write_json("training" + (f"-{args.tag}" if args.tag else ""), {"config": vars(args), "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
