"""Soak: a bounded, sustained load through a real gateway process; nothing may be lost, memory must not grow.

The gateway (``alignpro serve``) runs in front of an instant upstream (the FaultInjector, as its own process) at
concurrency 64, or in front of vLLM-CPU serving SmolLM2 at concurrency 16. Workers send a mix of chat requests
(non-streaming and streaming, a few invalid ones on purpose) until the time is up. Every request must end as

* ``ok``: a 200 with a complete body, or a stream ending in ``data: [DONE]``;
* ``error``: a clear OpenAI-shaped error (``{"error": {"type": ...}}``) with its status, e.g. the 422s we send;

anything else (connection reset, timeout, a 200 stream cut short, a body that is not the OpenAI shape) is
``lost``. The gateway's RSS is sampled every few seconds; growth is the median of the last fifth of the run
over the median of the first fifth after warm-up, plus a least-squares slope.

    .venv/bin/python bench/soak.py --duration 600                  # the full 10-minute run, instant upstream
    .venv/bin/python bench/soak.py --duration 240                  # a 4-minute run
    .venv/bin/python bench/soak.py --target vllm --duration 180    # vLLM-CPU upstream, concurrency 16

Exit status 0 when nothing was lost and RSS grew less than --max-growth (default 10%). Results go to
bench/results/soak-<target>-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from alignpro.testing.servers import Server, free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PYTHON = sys.executable
VLLM_PYTHONS = [ROOT / ".venv-vllm" / "bin" / "python", Path("/tmp/vllmvenv/bin/python")]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    lost_examples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    sent: int = 0

    def lost(self, why: str) -> None:
        self.outcomes["lost"] += 1
        if len(self.lost_examples) < 10:
            self.lost_examples.append(why)


def _clear_error(resp: httpx.Response) -> bool:
    try:
        err = resp.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) and isinstance(err.get("type"), str) and isinstance(err.get("message"), str)


async def one(
    client: httpx.AsyncClient, url: str, alias: str, rng: random.Random, tally: Tally, max_tokens: int
) -> None:
    roll = rng.random()
    stream = roll < 0.4
    body: dict[str, Any] = {
        "model": alias,
        "messages": [{"role": "user", "content": f"Say something about the number {rng.randint(0, 10**6)}."}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    if roll > 0.95:  # invalid on purpose: must come back as a clear 422, not be lost
        body["temperature"] = "hot"
    tally.sent += 1
    t = time.perf_counter()
    try:
        if stream:
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    if _clear_error(r):
                        tally.outcomes[f"error {r.status_code}"] += 1
                    else:
                        tally.lost(f"stream status {r.status_code}: {r.text[:100]}")
                    return
                last = ""
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        last = line
                        if '"error"' in line:
                            tally.outcomes["stream error event"] += 1
                            return
                if last != "data: [DONE]":
                    tally.lost(f"stream ended without [DONE]: {last[:100]}")
                    return
        else:
            r = await client.post(f"{url}/v1/chat/completions", json=body)
            if r.status_code == 200:
                if not r.json().get("choices"):
                    tally.lost(f"200 without choices: {r.text[:100]}")
                    return
            elif _clear_error(r):
                tally.outcomes[f"error {r.status_code}"] += 1
                return
            else:
                tally.lost(f"status {r.status_code}: {r.text[:100]}")
                return
    except (httpx.HTTPError, ValueError) as exc:
        kind = "stream" if stream else "plain"
        tally.lost(f"{type(exc).__name__} ({kind}, after {time.perf_counter() - t:.2f} s): {exc}"[:200])
        return
    tally.outcomes["ok"] += 1
    tally.latencies.append(time.perf_counter() - t)


async def load(
    url: str, alias: str, concurrency: int, duration: float, max_tokens: int, pid: int, sample_every: float
) -> tuple[Tally, list[tuple[float, float]]]:
    tally = Tally()
    samples: list[tuple[float, float]] = []
    deadline = time.monotonic() + duration
    start = time.monotonic()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0, connect=10.0), limits=limits) as client:

        async def worker(i: int) -> None:
            rng = random.Random(i)
            while time.monotonic() < deadline:
                await one(client, url, alias, rng, tally, max_tokens)

        async def sampler() -> None:
            while time.monotonic() < deadline:
                samples.append((time.monotonic() - start, rss_mb(pid)))
                await asyncio.sleep(sample_every)
            samples.append((time.monotonic() - start, rss_mb(pid)))

        await asyncio.gather(sampler(), *(worker(i) for i in range(concurrency)))
    return tally, samples


def rss_growth(samples: list[tuple[float, float]]) -> dict[str, float]:
    """Median RSS of the last fifth over the first fifth after a warm-up tenth; slope in MB per minute."""
    n = len(samples)
    body = samples[max(1, n // 10) :]
    k = max(1, len(body) // 5)
    first = statistics.median(r for _, r in body[:k])
    last = statistics.median(r for _, r in body[-k:])
    ts, rs = [t for t, _ in body], [r for _, r in body]
    slope = 0.0
    if len(body) >= 2 and max(ts) > min(ts):
        mt, mr = statistics.fmean(ts), statistics.fmean(rs)
        slope = sum((t - mt) * (r - mr) for t, r in body) / sum((t - mt) ** 2 for t in ts) * 60
    return {
        "first_mb": round(first, 1),
        "last_mb": round(last, 1),
        "peak_mb": round(max(rs), 1),
        "growth": round(last / first - 1, 4),
        "slope_mb_per_min": round(slope, 3),
    }


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def start_upstream(target: str, tmp: Path, model_dir: str | None) -> tuple[Server, str, str]:
    """The upstream process, its /v1 URL and the model id the gateway should send."""
    port = free_port()
    if target == "fault":
        args = [PYTHON, "-m", "alignpro.testing.faults", "--port", str(port)]
        proc = Server(
            "upstream", args, f"http://127.0.0.1:{port}/v1/models", log_path=tmp / "upstream.log", cwd=ROOT
        ).start(60)
        return proc, f"http://127.0.0.1:{port}/v1", "ok"
    py = next((p for p in VLLM_PYTHONS if p.exists()), None)
    if py is None:
        raise SystemExit("no vLLM environment (.venv-vllm or /tmp/vllmvenv)")
    if model_dir is None:
        from alignpro import embedded

        model_dir = str(embedded.prepare())
    args = [
        str(py),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_dir,
        "--enforce-eager",
        "--dtype",
        "bfloat16",
        "--port",
        str(port),
        "--served-model-name",
        "smollm2",
    ]
    env = {
        "VLLM_CPU_OMP_THREADS_BIND": "0-1",
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_CACHE_ROOT": str(tmp / "vllm-cache"),
        "HF_HUB_OFFLINE": "1",
    }
    proc = Server(
        "vllm", args, f"http://127.0.0.1:{port}/health", env=env, log_path=tmp / "upstream.log", cwd=ROOT
    ).start(1200)
    return proc, f"http://127.0.0.1:{port}/v1", "smollm2"


def run(
    target: str,
    duration: float,
    concurrency: int,
    max_tokens: int,
    sample_every: float,
    model_dir: str | None = None,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="alignpro-soak-") as d:
        tmp = Path(d)
        upstream, up_url, model = start_upstream(target, tmp, model_dir)
        try:
            port = free_port()
            cfg = tmp / "gateway.yaml"
            cfg.write_text(
                f"engines:\n  up: {{kind: openai, urls: ['{up_url}'], model: {model}}}\n"
                "aliases:\n  soak: {engine: up, prompter: {mode: off}}\nlog_level: warning\n"
            )
            gw = Server(
                "gateway",
                [PYTHON, "-m", "alignpro.cli.main", "serve", "--port", str(port), "--config", str(cfg)],
                f"http://127.0.0.1:{port}/health",
                log_path=tmp / "gateway.log",
                cwd=ROOT,
            ).start(120)
            try:
                t0 = time.monotonic()
                tally, samples = asyncio.run(
                    load(
                        f"http://127.0.0.1:{port}",
                        "soak",
                        concurrency,
                        duration,
                        max_tokens,
                        gw.pid,
                        sample_every,
                    )
                )
                wall = time.monotonic() - t0
                alive = gw.alive()
            finally:
                gw.stop()
            gateway_log = (tmp / "gateway.log").read_text(errors="replace")
        finally:
            upstream.stop()
    answered = sum(v for k, v in tally.outcomes.items() if k != "lost")
    return {
        "benchmark": "soak",
        "target": target,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "duration_s": round(wall, 1),
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "sent": tally.sent,
        "answered": answered,
        "lost": tally.outcomes["lost"],
        "outcomes": dict(tally.outcomes),
        "lost_examples": tally.lost_examples,
        "requests_per_s": round(tally.sent / wall, 1),
        "latency_ok_s": {
            "p50": round(pct(tally.latencies, 0.5), 4),
            "p99": round(pct(tally.latencies, 0.99), 4),
        },
        "gateway_alive_at_end": alive,
        "gateway_log_tail": gateway_log[-3000:] if tally.outcomes["lost"] else "",
        "rss": rss_growth(samples),
        "rss_samples": [(round(t, 1), round(r, 1)) for t, r in samples],
        "command": "python " + " ".join(sys.argv),
        "cpu_count": os.cpu_count(),
        "loadavg_at_end": os.getloadavg(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=["fault", "vllm"], default="fault")
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    ap.add_argument("--concurrency", type=int, default=None, help="default 64 (fault) or 16 (vllm)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples")
    ap.add_argument("--max-growth", type=float, default=0.10, help="RSS growth that fails the run")
    ap.add_argument(
        "--model-dir", default=None, help="vllm: the safetensors folder (default: the embedded one)"
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    conc = args.concurrency or (64 if args.target == "fault" else 16)
    res = run(args.target, args.duration, conc, args.max_tokens, args.sample_every, args.model_dir)
    rss = res["rss"]
    print(
        f"{'target':<8} {'conc':>5} {'secs':>6} {'sent':>8} {'lost':>5} {'req/s':>8} {'p50 s':>7} {'p99 s':>7} "
        f"{'RSS first':>10} {'RSS last':>9} {'growth':>7} {'MB/min':>7}"
    )
    print(
        f"{res['target']:<8} {conc:>5} {res['duration_s']:>6} {res['sent']:>8} {res['lost']:>5} "
        f"{res['requests_per_s']:>8} {res['latency_ok_s']['p50']:>7} {res['latency_ok_s']['p99']:>7} "
        f"{rss['first_mb']:>10} {rss['last_mb']:>9} {rss['growth']:>7.1%} {rss['slope_mb_per_min']:>7}"
    )
    print("outcomes:", res["outcomes"])
    if res["lost_examples"]:
        print("lost, e.g.:", *res["lost_examples"][:5], sep="\n  ")
    out = args.out or RESULTS / f"soak-{args.target}-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    ok = res["lost"] == 0 and res["gateway_alive_at_end"] and rss["growth"] < args.max_growth
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
