"""vLLM start time, and the latency the gateway adds in front of vLLM.

Starts a real vLLM (CPU build, the embedded SmolLM2, ``--enforce-eager``) and a real ``alignpro serve`` whose
``openai`` engine points at it, then times one chat request, sequentially, over three paths:

    direct            straight to vLLM
    gateway, off      through the gateway, prompter off (pure proxy overhead)
    gateway, ref      through the gateway, reference prompter on the same vLLM (rewrite cache off, so every
                      request pays for the rewrite: the real cost of an aligned request)

Every answer is exactly ``--max-tokens`` tokens (``ignore_eos``), so the paths do the same decoding work.
Prints a table and writes bench/results/vllm_latency.json.

    .venv/bin/python bench/vllm_latency.py [--reps 5] [--max-tokens 32]

vLLM comes from .venv-vllm (``make vllm-env``) or ``$ALIGNPRO_VLLM_PYTHON``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from alignpro.testing.servers import gateway_server
from alignpro.testing.vllm import SERVED_MODEL, start_vllm, vllm_python

ROOT = Path(__file__).resolve().parents[1]

PROMPT = "Write a short poem about the sea."


def timed(client: httpx.Client, url: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    r = client.post(url, json=body)
    elapsed = time.perf_counter() - t0
    r.raise_for_status()
    return elapsed, r.json()


def summary(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples)
    p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
    return {"median_ms": statistics.median(ms), "p90_ms": p90, "min_ms": ms[0], "max_ms": ms[-1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="timed requests per path (after one warm-up)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vllm_latency.json")
    args = ap.parse_args()

    from alignpro import embedded

    model_dir = embedded.prepare()
    work = Path(tempfile.mkdtemp(prefix="alignpro-bench-"))
    load_before = os.getloadavg()
    vllm = start_vllm(model_dir, work, timeout=600.0)
    gateway = None
    try:
        config = f"""
read_timeout_s: 600
rewrite_cache_size: 0
engines:
  vllm: {{kind: openai, urls: ["{vllm.url}/v1"], model: {SERVED_MODEL}}}
aliases:
  smollm2: {{engine: vllm, prompter: {{mode: "off"}}}}
  smollm2-aligned: {{engine: vllm, prompter: {{mode: reference, engine: vllm}}}}
"""
        gateway = gateway_server(work, config).start(timeout=60.0)
        base = {
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        paths = [
            ("direct vLLM", f"{vllm.url}/v1/chat/completions", SERVED_MODEL),
            ("gateway, prompter off", f"{gateway.url}/v1/chat/completions", "smollm2"),
            ("gateway, prompter reference", f"{gateway.url}/v1/chat/completions", "smollm2-aligned"),
        ]
        samples: dict[str, list[float]] = {name: [] for name, _, _ in paths}
        prompter_ms: dict[str, list[float]] = {name: [] for name, _, _ in paths}
        tokens: dict[str, int] = {}
        with httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0)) as client:
            # Warm-up: first-request costs (connections, compiled kernels) are not steady state.
            for _name, url, model in paths:
                timed(client, url, {**base, "model": model})
            # Interleaved, one request per path per round: the machine is shared and its speed drifts, so
            # paths measured side by side compare better than paths measured one after the other.
            for _ in range(args.reps):
                for name, url, model in paths:
                    elapsed, data = timed(client, url, {**base, "model": model})
                    samples[name].append(elapsed)
                    tokens[name] = int(data["usage"]["completion_tokens"])
                    prompter_ms[name].append(float((data.get("alignpro") or {}).get("prompter_ms") or 0.0))
        rows: list[dict[str, Any]] = []
        for name, _, model in paths:
            row: dict[str, Any] = {
                "path": name,
                "model": model,
                "completion_tokens": tokens[name],
                **summary(samples[name]),
            }
            row["prompter_median_ms"] = statistics.median(prompter_ms[name])
            row["samples_ms"] = [round(x * 1000, 1) for x in samples[name]]
            rows.append(row)
        direct = rows[0]["median_ms"]
        for row in rows:
            row["overhead_vs_direct_ms"] = row["median_ms"] - direct
    finally:
        if gateway is not None:
            gateway.stop()
        vllm.stop()

    result = {
        "bench": "vllm_latency",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "vllm": {"python": str(vllm_python()), "args": vllm.args[1:], "start_s": round(vllm.started_s, 2)},
        "gateway_start_s": round(gateway.started_s, 2) if gateway else None,
        "request": {"prompt": PROMPT, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True},
        "reps": args.reps,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    machine = result["machine"]
    print(
        f"vLLM start (spawn -> /health 200): {vllm.started_s:.1f} s; gateway: {result['gateway_start_s']} s"
    )
    print(f"load average before/after: {machine['loadavg_before']} / {machine['loadavg_after']}")
    print(f"one chat request, {args.max_tokens} completion tokens, {args.reps} reps after a warm-up:\n")
    head = f"{'path':<30} {'median ms':>10} {'p90 ms':>9} {'min ms':>9} {'vs direct':>10} {'prompter ms':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['path']:<30} {r['median_ms']:>10.1f} {r['p90_ms']:>9.1f} {r['min_ms']:>9.1f} "
            f"{r['overhead_vs_direct_ms']:>+10.1f} {r['prompter_median_ms']:>12.1f}"
        )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
