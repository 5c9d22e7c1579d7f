"""What the prompter costs the user: aligned / direct latency with the shipped prompter, its latency features off
and on, on vLLM-CPU and on the embedded engine.

Systems (one ``alignpro serve`` process; every prompter alias runs the shipped adapter, greedy):

    direct       the frozen model alone: vLLM hit directly (vLLM part); the gateway's prompter-off alias
                 (embedded part, where there is no gateway-less path)
    frozen       vLLM part: the gateway with the prompter off
    plain        the prompter's whole output read at once, then the frozen model on the result
    early        + early decision: the prompter streamed, stopped at a KEEP line
    speculative  + speculative start: the frozen model starts on the request as sent at once, and its answer
                 is released when the prompter keeps the request

Each round takes fresh prompts (half IFBench, half AdvBench: the dev mix), then for each concurrency runs every
system on them: a cold pass (every rewrite generated) and a warm one (every rewrite from the cache). Answers are
``--max-tokens`` long (``ignore_eos`` on vLLM), so the frozen model's work does not depend on the prompt it got.
Rows are split by what the prompter did with the prompt: ``kept`` (KEEP, or a fallback to the original) and
``rewritten``; each ratio is to the direct latency of the same prompts. On vLLM the counters of its /metrics give,
per pass: tokens generated (speculative minus early = the tokens a discarded speculative start spent), prompt
tokens, and prefix-cache hits (the prefill the prompter's fixed instruction prefix saves).

    ALIGNPRO_HOME=/tmp/aphome .venv/bin/python bench/prompter_cost.py --parts vllm,local
    ... --parts vllm --prompts 16 --concurrency 1,16 --tag quick

Writes bench/results/prompter-cost[-TAG]-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from common import (
    ROOT,
    VLLM_SERVED,
    Server,
    alignpro_gateway,
    bench_prompts,
    exit_on_sigterm,
    percentile,
    table,
    vllm,
    write_json,
)

ADAPTER = ROOT / "src" / "alignpro" / "data" / "prompter"
# The prompter's own deadline (default 60 s) would turn slow rewrites on a loaded CPU into fallbacks (the original
# prompt served, nothing cached): that would measure the fail-open path, not the prompter.
PROMPTER_TIMEOUT = 1800
# Prompter aliases: (early_decision, speculative).
FEATURES = {"plain": (False, False), "early": (True, False), "speculative": (True, True)}
# vLLM-CPU, cold cache: aligned/direct p50 for kept prompts and for the whole mix; warm: the whole mix; c16
# throughput as a share of vLLM alone.
GOALS = {"kept": 1.05, "all": 1.3, "warm": 1.02, "throughput %": 90.0}
VLLM_COUNTERS = ("generation_tokens", "prompt_tokens", "prefix_cache_hits", "prefix_cache_queries")


def gateway_config(engine: str, prompter_engine: str, warm: bool) -> str:
    """Aliases ``frozen`` (prompter off, on the engine YAML ``engine``) and one per :data:`FEATURES`, whose prompter
    runs on ``prompter_engine`` as model ``alignpro-prompter``. Rewrites are cached per prompter, and one alias's
    cold pass must not find the rewrites of the alias before it: with ``warm`` (a rewrite cache) each prompter
    alias has a prompter engine of its own (the same upstream under another name); without, there is no cache and
    one prompter engine serves all (the embedded part: two in-process models, as ``make serve`` runs them)."""
    names = {a: f"p-{a}" if warm else "p" for a in FEATURES}
    engines = "".join(f"\n  {name}: {prompter_engine}" for name in dict.fromkeys(names.values()))
    cfg = f"""
log_level: warning
rewrite_cache_size: {4096 if warm else 0}
read_timeout_s: 1800
engines:
  e: {engine}{engines}
aliases:
  frozen: {{engine: e, prompter: {{mode: "off"}}}}
"""
    for alias, (early, speculative) in FEATURES.items():
        cfg += (
            f"  {alias}: {{engine: e, prompter: {{mode: adapter, engine: {names[alias]}, model: alignpro-prompter, "
            f"temperature: 0, timeout_s: {PROMPTER_TIMEOUT}, early_decision: {str(early).lower()}, "
            f"speculative: {str(speculative).lower()}}}}}\n"
        )
    return cfg


def vllm_engine(url: str, model: str = VLLM_SERVED) -> str:
    # vLLM-CPU 0.32 crashes on seeded sampled requests (seeds: false); ignore_eos makes every answer equally long.
    return f'{{kind: openai, urls: ["{url}"], model: "{model}", seeds: false, allowed_fields: [ignore_eos]}}'


# The defaults of `make serve`: the embedded model, and the shipped prompter merged into a copy of it.
LOCAL_ENGINE = "{kind: local, model: embedded, max_batch_size: 16}"
LOCAL_PROMPTER = "{kind: local, model: trained, max_batch_size: 16}"


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
            b["ignore_eos"] = True  # vLLM extension, allowed on the bench's engine: equal answer lengths
        out.append(b)
    return out


async def load(url: str, reqs: list[dict[str, Any]], concurrency: int) -> tuple[float, list[dict[str, Any]]]:
    """POST every body with ``concurrency`` workers: wall seconds and one record per request, in prompt order."""
    todo = list(enumerate(reqs))
    records: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=PROMPTER_TIMEOUT, limits=limits) as client:

        async def worker() -> None:
            while todo:
                i, body = todo.pop(0)
                t0 = time.perf_counter()
                r = await client.post(url, json=body)
                records.append({"i": i, "s": time.perf_counter() - t0, **_outcome(r)})

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return wall, sorted(records, key=lambda r: r["i"])


def _outcome(r: httpx.Response) -> dict[str, Any]:
    if r.status_code != 200:
        return {"error": f"{r.status_code}: {r.text[:200]}"}
    info = r.json().get("alignpro") or {}
    return {
        "rewritten": bool(info.get("rewritten")),
        "cached": bool(info.get("cached")),
        "fallback": info.get("fallback"),
        "speculative": info.get("speculative"),
        "prompter_ms": info.get("prompter_ms", 0.0),
    }


def vllm_counters(bases: list[str]) -> dict[str, float]:
    """vLLM's token counters, summed over its label sets and over the servers at ``bases`` (their /metrics)."""
    out = dict.fromkeys(VLLM_COUNTERS, 0.0)
    for base in bases:
        text = httpx.get(base + "/metrics", timeout=30).text
        for name in VLLM_COUNTERS:
            for m in re.finditer(rf"^vllm:{name}_total(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE):
                out[name] += float(m.group(1))
    return out


def run_pass(
    target: tuple[str, str],
    prompts: list[str],
    concurrency: int,
    args: argparse.Namespace,
    metrics: list[str],
) -> dict[str, Any]:
    """One pass of ``prompts`` through ``target`` (URL, model), with the deltas of the counters of the vLLMs at
    ``metrics`` (their base URLs; none for the embedded part)."""
    before = vllm_counters(metrics) if metrics else {}
    url, model = target
    wall, records = asyncio.run(
        load(url, bodies(prompts, model, args.max_tokens, bool(metrics)), concurrency)
    )
    after = vllm_counters(metrics) if metrics else {}
    return {"wall_s": wall, "records": records, "counters": {k: after[k] - before[k] for k in after}}


def run_part(
    part: str, targets: dict[str, tuple[str, str]], metrics: list[str], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Every system at every concurrency on the same fresh prompts (new ones per round and concurrency, so no cold
    pass meets a rewrite cached before); the passes, with their records."""
    passes = []
    n, k = args.prompts, len(args.concurrency)
    for r in range(args.rounds):
        for j, c in enumerate(args.concurrency):
            start = n * (r * k + j)
            prompts = bench_prompts(start + n, seed=101)[start:]
            # The baseline runs first and last: the machine's load drifts over a block, and its mean per prompt
            # is what every system is compared with.
            for step, system in enumerate([*targets, "direct"]):
                target = targets[system]
                for cache in _caches(system, part):
                    prime(target, metrics, f"{part}-{r}-{c}-{step}-{system}-{cache}")
                    res = run_pass(target, prompts, c, args, metrics)
                    passes.append({"part": part, "round": r, "c": c, "system": system, "cache": cache, **res})
                    print(_line(passes[-1]), flush=True)
    return passes


def _caches(system: str, part: str) -> tuple[str, ...]:
    """The passes of ``system``: a prompter alias runs cold, then warm where there is a cache (vLLM part)."""
    if system not in FEATURES:
        return ("-",)
    return ("cold", "warm") if part == "vllm" else ("cold",)


def prime(target: tuple[str, str], metrics: list[str], tag: str) -> None:
    """Start every pass alike: vLLM's prefix cache emptied (else a system would find the prompts of the systems
    before it cached), then one request on a text of no pass, so the prompter's fixed instruction prefix is cached
    as on a server that has been up for a while."""
    for base in metrics:
        httpx.post(base + "/reset_prefix_cache", timeout=60).raise_for_status()
    url, model = target
    asyncio.run(load(url, bodies([f"Say hello ({tag})."], model, 4, False), 1))


def _line(p: dict[str, Any]) -> str:
    recs = p["records"]
    ok = [r for r in recs if "error" not in r]
    lat = [r["s"] for r in ok]
    return (
        f"  {p['part']} r{p['round']} c{p['c']:<3d} {p['system']:12s} {p['cache']:4s} wall {p['wall_s']:7.2f} s"
        f"  p50 {percentile(lat, 50):6.2f} s  rewritten {sum(r['rewritten'] for r in ok):3d}"
        f"  errors {len(recs) - len(ok)}  {p['counters'] or ''}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="vllm,local")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=16, help="prompts per round and concurrency")
    ap.add_argument("--concurrency", default="1,16", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--tag", default="")
    ap.add_argument("--prompter-serving", choices=("lora", "merged"), default="lora", help="vLLM part")
    ap.add_argument(
        "--merged-dir", help="--prompter-serving merged: the model folder (default: merge_prompter())"
    )
    args = ap.parse_args(argv)
    exit_on_sigterm()
    if not (ADAPTER / "adapter_config.json").is_file():
        raise SystemExit(f"no shipped prompter adapter at {ADAPTER}")

    passes: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="alignpro-bench-"))
    try:
        if "vllm" in args.parts:
            passes += vllm_part(work, args)
        if "local" in args.parts:
            passes += local_part(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [row for part in dict.fromkeys(p["part"] for p in passes) for row in summarize(passes, part)]
    print()
    print(
        table(
            rows, COLUMNS, title="What the prompter costs (ratios to the direct latency of the same prompts)"
        )
    )
    goals = check_goals(rows)
    for k, v in goals.items():
        print(f"goal {k}: {v}")
    out = write_json(
        "prompter-cost" + (f"-{args.tag}" if args.tag else ""),
        {
            "config": vars(args) | {"adapter": str(ADAPTER)},
            "rows": rows,
            "goals": goals,
            "passes": passes,  # per request: the prompt's index in bench_prompts' order, never its text
        },
    )
    print(f"wrote {out}")
    return 0


def vllm_part(work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """vLLM-CPU serves the frozen model; the prompter is its LoRA module (``--prompter-serving lora``) or the
    adapter merged into a copy of the base, on a second vLLM (``merged``)."""
    servers: list[Server] = []
    try:
        lora = {"alignpro-prompter": ADAPTER} if args.prompter_serving == "lora" else None
        vs, vurl = vllm(work, lora=lora, max_lora_rank=64, dev_mode=True)
        servers.append(vs)
        purl, metrics = vurl, [vurl.removesuffix("/v1")]
        if args.prompter_serving == "merged":
            ps, purl = vllm(work, model=merged_prompter(args), served="alignpro-prompter", dev_mode=True)
            servers.append(ps)
            metrics.append(purl.removesuffix("/v1"))
        config = gateway_config(vllm_engine(vurl), vllm_engine(purl, "alignpro-prompter"), warm=True)
        gw, gurl = alignpro_gateway(work, config)
        servers.append(gw)
        targets = {"direct": (vurl + "/chat/completions", VLLM_SERVED)}
        targets |= {a: (gurl + "/v1/chat/completions", a) for a in ("frozen", *FEATURES)}
        warm_up(targets)
        return run_part("vllm", targets, metrics, args)
    finally:
        for s in reversed(servers):
            s.stop()


def merged_prompter(args: argparse.Namespace) -> Path:
    """The shipped adapter merged into a copy of its base (made once, then reused), or ``--merged-dir``."""
    from alignpro import embedded

    return Path(args.merged_dir) if args.merged_dir else embedded.merge_prompter()


def local_part(work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    gw, gurl = alignpro_gateway(work, gateway_config(LOCAL_ENGINE, LOCAL_PROMPTER, warm=False), timeout=300)
    try:
        url = gurl + "/v1/chat/completions"
        targets = {"direct": (url, "frozen")} | {a: (url, a) for a in FEATURES}
        warm_up(targets)
        return run_part("local", targets, [], args)
    finally:
        gw.stop()


def warm_up(targets: dict[str, tuple[str, str]]) -> None:
    """Load the model (and the adapter) and the validator before anything is timed; "Hello" is not a bench prompt."""
    for url, model in targets.values():
        asyncio.run(load(url, bodies(["Hello"], model, 4, False), 1))


COLUMNS = [
    "part",
    "c",
    "system",
    "cache",
    "prompts",
    "n",
    "p50 s",
    "mean s",
    "p50 x",
    "mean x",
    "req/s",
    "throughput %",
    "prompter ms",
    "gen tokens",
    "prefix hit %",
    "errors",
]


def summarize(passes: list[dict[str, Any]], part: str) -> list[dict[str, Any]]:
    """Rows per (concurrency, system, cache) and per subset of prompts (all, kept, rewritten); ratios to the
    direct latencies of the same prompts, pooled over rounds."""
    mine = [p for p in passes if p["part"] == part]
    rows = []
    for c in dict.fromkeys(p["c"] for p in mine):
        at_c = [p for p in mine if p["c"] == c]
        direct = _latencies([p for p in at_c if p["system"] == "direct"])
        direct_rps = _rps([p for p in at_c if p["system"] == "direct"])
        for system, cache in dict.fromkeys((p["system"], p["cache"]) for p in at_c):
            group = [p for p in at_c if (p["system"], p["cache"]) == (system, cache)]
            rows += _rows(part, c, system, cache, group, direct, direct_rps)
    return rows


def _latencies(group: list[dict[str, Any]]) -> dict[tuple[int, int], float]:
    """Each prompt's latency, averaged over the passes of ``group`` that answered it."""
    seen: dict[tuple[int, int], list[float]] = {}
    for p in group:
        for r in p["records"]:
            if "error" not in r:
                seen.setdefault((p["round"], r["i"]), []).append(r["s"])
    return {k: sum(v) / len(v) for k, v in seen.items()}


def _rps(group: list[dict[str, Any]]) -> float:
    done = sum(1 for p in group for r in p["records"] if "error" not in r)
    return done / sum(p["wall_s"] for p in group)


def _rows(
    part: str,
    c: int,
    system: str,
    cache: str,
    group: list[dict[str, Any]],
    direct: dict[tuple[int, int], float],
    direct_rps: float,
) -> list[dict[str, Any]]:
    recs = [((p["round"], r["i"]), r) for p in group for r in p["records"]]
    ok = [(k, r) for k, r in recs if "error" not in r]
    # What the prompter did with each prompt, from the cold pass (a warm pass serves the same decisions cached).
    subsets = {"all": ok}
    if system in FEATURES:
        subsets["kept"] = [(k, r) for k, r in ok if not r["rewritten"]]
        subsets["rewritten"] = [(k, r) for k, r in ok if r["rewritten"]]
    counters = {k: sum(p["counters"].get(k, 0.0) for p in group) for k in VLLM_COUNTERS}
    out = []
    for name, sub in subsets.items():
        if not sub:
            continue
        lat = [r["s"] for _, r in sub]
        base = [direct[k] for k, _ in sub if k in direct]
        row: dict[str, Any] = {
            "part": part,
            "c": c,
            "system": system,
            "cache": cache,
            "prompts": name,
            "n": len(sub),
            "p50 s": round(percentile(lat, 50), 3),
            "mean s": round(sum(lat) / len(lat), 3),
            "p50 x": round(percentile(lat, 50) / percentile(base, 50), 3) if base else None,
            "mean x": round(sum(lat) / sum(base), 3) if base else None,
            "prompter ms": round(sum(r.get("prompter_ms") or 0.0 for _, r in sub) / len(sub), 1),
            "errors": len(recs) - len(ok) if name == "all" else None,
        }
        if name == "all":
            row["req/s"] = round(_rps(group), 3)
            row["throughput %"] = round(100 * _rps(group) / direct_rps, 1)
            if counters["prompt_tokens"]:
                row["gen tokens"] = int(counters["generation_tokens"])
                row["prefix hit %"] = round(
                    100 * counters["prefix_cache_hits"] / max(counters["prefix_cache_queries"], 1.0), 1
                )
        out.append(row)
    return out


def check_goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets on vLLM-CPU, for every prompter alias."""
    goals: dict[str, Any] = {}
    for r in rows:
        if r["part"] != "vllm" or r["system"] not in FEATURES:
            continue
        key = f"{r['system']}-c{r['c']}-{r['cache']}-{r['prompts']}"
        if r["cache"] == "cold" and r["prompts"] in ("kept", "all"):
            goals[key] = _goal(r["p50 x"], GOALS[r["prompts"]])
        if r["cache"] == "warm" and r["prompts"] == "all":
            goals[key] = _goal(r["p50 x"], GOALS["warm"])
        if r["prompts"] == "all" and r["c"] >= 16:
            goals[f"{key}-throughput"] = _goal(r["throughput %"], GOALS["throughput %"], at_least=True)
    return goals


def _goal(value: float | None, target: float, at_least: bool = False) -> dict[str, Any]:
    met = value is not None and (value >= target if at_least else value <= target)
    return {"value": value, "goal": f"{'>=' if at_least else '<='} {target}", "met": met}


if __name__ == "__main__":
    sys.exit(main())
