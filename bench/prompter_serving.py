"""How to serve the prompter: the shipped LoRA adapter as a LoRA module of the frozen model's vLLM, or a merged
copy of it (``alignpro models merge-prompter``) served as its own model; on vLLM-CPU and on the embedded engine.

The workload is the real prompter request (:func:`alignpro.prompter.instruction.prompter_request`, contract
rewrite, greedy, ``--max-tokens``) for prompts from ``bench_prompts``, at concurrency 1 and 16. Systems:

vLLM part: three vLLM-CPU processes up for the whole part, all on the same cores: A = today's deployment (the
frozen model with ``--enable-lora --lora-modules alignpro-prompter=<adapter>``), B = the merged copy served as
``alignpro-prompter``, C = the frozen model without LoRA (the merged deployment's frozen vLLM). Systems:
  * ``base``: the base model on C (the reference: the same network without LoRA);
  * ``base-on-lora-vllm``: the base model on A (what enabling LoRA costs requests that use none);
  * ``lora``: the adapter as LoRA module of A;
  * ``merged``: the merged copy on B.
  Then the frozen model's own latency (chat requests at concurrency 2) in each deployment, alone and beside 16
  concurrent prompter calls: on A beside the LoRA prompter on A; on C beside the merged prompter on B (a second
  vLLM competing for the same cores). The CPU each process spent during the part is reported (idle ones too).
Local part (in-process, ``LocalEngine``): ``lora`` = one engine with the adapter loaded by peft (the frozen model
runs with it disabled, the previous default), ``merged`` = a second engine on the merged copy (``model:
trained``), ``base`` = a plain engine; and the frozen model's latency beside each prompter, as above.

Every system is measured in the same run, interleaved by concurrency; ratios are to ``base`` (vLLM) and to
``lora`` (local).

    ALIGNPRO_HOME=/tmp/aphome nice .venv/bin/python bench/prompter_serving.py --prompts 16 --max-tokens 48

Writes bench/results/prompter-serving-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from alignpro.prompter.instruction import prompter_request
from alignpro.settings import PROMPTER_ADAPTER, TRAINED
from alignpro.testing.servers import cpu_seconds
from common import (
    ROOT,
    VLLM_SERVED,
    bench_prompts,
    exit_on_sigterm,
    percentile,
    table,
    vllm,
    write_json,
)

ADAPTER = ROOT / "src" / "alignpro" / "data" / "prompter"
Call = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def prompter_bodies(prompts: list[str], model: str, max_tokens: int) -> list[dict[str, Any]]:
    return [
        prompter_request(p, "rewrite", model=model, max_tokens=max_tokens, temperature=0.0, top_p=1.0)
        for p in prompts
    ]


def frozen_bodies(prompts: list[str], model: str, max_tokens: int) -> list[dict[str, Any]]:
    return [
        {
            "model": model,
            "messages": [{"role": "user", "content": p}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
        }
        for p in prompts
    ]


async def load(call: Call, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """Send ``bodies`` through ``call`` with ``concurrency`` workers: latencies, wall time and tokens."""
    lat: list[float] = []
    prompt_tokens = completion_tokens = 0
    todo = list(bodies)

    async def worker() -> None:
        nonlocal prompt_tokens, completion_tokens
        while todo:
            body = todo.pop(0)
            t0 = time.perf_counter()
            res = await call(body)
            lat.append(time.perf_counter() - t0)
            prompt_tokens += int(res["usage"]["prompt_tokens"])
            completion_tokens += int(res["usage"]["completion_tokens"])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {
        "requests": len(bodies),
        "concurrency": concurrency,
        "p50_s": round(percentile(lat, 50), 3),
        "mean_s": round(sum(lat) / len(lat), 3),
        "wall_s": round(wall, 3),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "tokens_per_s": round(completion_tokens / wall, 1),
    }


async def beside(
    frozen: Call,
    frozen_work: list[dict[str, Any]],
    prompter: Call | None,
    prompter_work: list[dict[str, Any]],
) -> dict[str, Any]:
    """The frozen model's latency (its requests at concurrency 2) while ``prompter`` runs ``prompter_work`` at
    concurrency 16 at the same time (None: the frozen model alone)."""
    jobs = [load(frozen, frozen_work, 2)]
    if prompter is not None:
        jobs.append(load(prompter, prompter_work, 16))
    t0 = time.perf_counter()
    results = await asyncio.gather(*jobs)
    return {**results[0], "both_wall_s": round(time.perf_counter() - t0, 3)}


def http_call(client: Any, url: str) -> Call:
    async def call(body: dict[str, Any]) -> dict[str, Any]:
        r = await client.post(f"{url}/chat/completions", json=body)
        r.raise_for_status()
        return dict(r.json())

    return call


def add_ratios(rows: list[dict[str, Any]], baseline: str) -> None:
    """Each row's p50, mean and wall as ratios to the ``baseline`` system's row at the same concurrency."""
    for r in rows:
        ref = next(b for b in rows if b["system"] == baseline and b["concurrency"] == r["concurrency"])
        for k in ("p50_s", "mean_s", "wall_s"):
            r[f"{k[:-2]}_x"] = round(r[k] / ref[k], 2)


def print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    cols = ["system", "concurrency", "p50_s", "mean_s", "wall_s", "p50_x", "mean_x", "wall_x"]
    print(table(rows, [*cols, "prompt_tokens", "completion_tokens"], title=title), flush=True)


# ------------------------------------------------------------------------------------------------ vLLM
async def vllm_part(
    workdir: Path, merged: Path, prompts: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    import httpx

    servers = []
    try:
        # A: today's deployment (frozen model + LoRA prompter); B: the merged prompter; C: the frozen model alone.
        a, url_a = vllm(workdir / "a", lora={PROMPTER_ADAPTER: ADAPTER})
        servers.append(a)
        b, url_b = vllm(workdir / "b", model=merged, served=PROMPTER_ADAPTER)
        servers.append(b)
        c, url_c = vllm(workdir / "c")
        servers.append(c)
        async with httpx.AsyncClient(timeout=1800, limits=httpx.Limits(max_connections=64)) as client:
            on_a, on_b, on_c = (http_call(client, u) for u in (url_a, url_b, url_c))
            systems = {
                "base": (on_c, VLLM_SERVED),
                "base-on-lora-vllm": (on_a, VLLM_SERVED),
                "lora": (on_a, PROMPTER_ADAPTER),
                "merged": (on_b, PROMPTER_ADAPTER),
            }
            # (label, frozen model's engine, prompter beside it): each deployment's frozen vLLM, alone and busy.
            pairs = [
                ("lora deploy: frozen alone", on_a, None),
                ("lora deploy: beside lora", on_a, systems["lora"]),
                ("merged deploy: frozen alone", on_c, None),
                ("merged deploy: beside merged", on_c, systems["merged"]),
            ]
            cpu = {
                "a": cpu_seconds(a.pid),
                "b": cpu_seconds(b.pid),
                "c": cpu_seconds(c.pid),
                "t": time.monotonic(),
            }
            out = await measure(systems, "base", pairs, prompts, args)
            out["cpu_s_during_run"] = {
                k: round(cpu_seconds(p.pid) - cpu[k], 1) for k, p in (("a", a), ("b", b), ("c", c))
            } | {"wall_s": round(time.monotonic() - cpu["t"], 1)}
            return out
    finally:
        for server in reversed(servers):
            server.stop()


# ------------------------------------------------------------------------------------------------ local
async def local_part(prompts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from alignpro.engines.local import LocalEngine
    from alignpro.settings import EngineConfig

    # The previous default: one engine, the frozen model with the adapter disabled and the prompter with it on.
    with_lora = LocalEngine("embedded", EngineConfig(adapters={PROMPTER_ADAPTER: TRAINED}))
    # The merged alternative: a plain frozen engine and a second engine on the merged copy.
    plain = LocalEngine("frozen", EngineConfig())
    merged = LocalEngine("prompter", EngineConfig(model=TRAINED))
    engines = (with_lora, plain, merged)
    await asyncio.gather(*(e.start() for e in engines))
    try:
        systems = {
            "lora": (with_lora.chat, PROMPTER_ADAPTER),
            "merged": (merged.chat, PROMPTER_ADAPTER),
            "base": (plain.chat, VLLM_SERVED),
        }
        pairs = [
            ("lora engine: frozen alone", with_lora.chat, None),
            ("lora engine: beside lora", with_lora.chat, systems["lora"]),
            ("two engines: frozen alone", plain.chat, None),
            ("two engines: beside merged", plain.chat, systems["merged"]),
        ]
        return await measure(systems, "lora", pairs, prompts, args)
    finally:
        await asyncio.gather(*(e.aclose() for e in engines))


async def measure(
    systems: Mapping[str, tuple[Call, str]],
    baseline: str,
    pairs: Sequence[tuple[str, Call, tuple[Call, str] | None]],
    prompts: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Prompter calls per system (call, model) at concurrency 1 and 16; then, per pair, the frozen model's own
    latency alone or beside 16 concurrent prompter calls."""
    for call, model in systems.values():  # warm-up: the first call loads an adapter, fills caches
        await call(prompter_bodies(prompts[:1], model, 4)[0])
    rows: list[dict[str, Any]] = []
    for concurrency, n in ((1, args.prompts_c1), (16, args.prompts)):
        for name, (call, model) in systems.items():
            res = await load(call, prompter_bodies(prompts[:n], model, args.max_tokens), concurrency)
            rows.append({"system": name, **res})
            print(
                f"  {name:18s} c={concurrency:2d} p50 {res['p50_s']:.3f} s wall {res['wall_s']:.3f} s",
                flush=True,
            )
    add_ratios(rows, baseline)
    work = frozen_bodies(prompts[: args.frozen_requests], VLLM_SERVED, args.frozen_max_tokens)
    side: list[dict[str, Any]] = []
    alone: dict[str, Any] = {}
    for label, frozen, prompter in pairs:
        pwork = prompter_bodies(prompts[: args.prompts], prompter[1], args.max_tokens) if prompter else []
        res = await beside(frozen, work, prompter[0] if prompter else None, pwork)
        alone = res if prompter is None else alone  # each deployment's "alone" row precedes its "beside" row
        side.append(
            {
                "frozen": label,
                **res,
                "p50_x": round(res["p50_s"] / alone["p50_s"], 2),
                "mean_x": round(res["mean_s"] / alone["mean_s"], 2),
            }
        )
        print(f"  {label:30s} p50 {res['p50_s']:.3f} s wall {res['wall_s']:.3f} s", flush=True)
    return {"prompter": rows, "frozen_beside": side}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="vllm,local", help="vllm, local or both")
    ap.add_argument("--prompts", type=int, default=16, help="prompter calls at concurrency 16")
    ap.add_argument("--prompts-c1", type=int, default=4, help="prompter calls at concurrency 1")
    ap.add_argument("--max-tokens", type=int, default=48, help="prompter max_tokens (greedy)")
    ap.add_argument("--frozen-requests", type=int, default=8, help="frozen-model calls beside the prompter")
    ap.add_argument("--frozen-max-tokens", type=int, default=32)
    args = ap.parse_args()
    exit_on_sigterm()
    from alignpro import embedded

    merged = embedded.merge_prompter(TRAINED)
    prompts = bench_prompts(max(args.prompts, args.prompts_c1), seed=7)
    result: dict[str, Any] = {"args": vars(args), "merged": str(merged)}
    workdir = Path(tempfile.mkdtemp(prefix="prompter-serving-"))
    try:
        for part in args.parts.split(","):
            print(f"== {part}", flush=True)
            if part == "vllm":
                result[part] = asyncio.run(vllm_part(workdir, merged, prompts, args))
            elif part == "local":
                result[part] = asyncio.run(local_part(prompts, args))
            else:
                raise SystemExit(f"unknown part {part!r}")
            print_rows(f"{part}: prompter calls", result[part]["prompter"])
            cols = ["frozen", "concurrency", "p50_s", "mean_s", "wall_s", "both_wall_s", "p50_x", "mean_x"]
            print(
                table(
                    result[part]["frozen_beside"], cols, title=f"{part}: the frozen model beside the prompter"
                )
            )
            print(
                write_json("prompter-serving", result), flush=True
            )  # after each part: a failure keeps the rest
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
