"""Shared state on Redis: how well a key's rate limit holds across two gateway replicas, and what a cache hit
served from Redis costs next to one from process memory.

1. Limits: two ``alignpro serve`` processes on one Redis, a key allowed ``--rpm`` requests a minute (bucket of
   the same size); requests alternate between the replicas as fast as they are answered for ``--seconds``. The
   bucket allows ``rpm + rpm/60 * elapsed``: allowed / that is the accuracy. The same two replicas without Redis
   (each its own bucket) are measured in the same run for contrast.
2. Cache hits: a gateway with the in-memory cache and one with the Redis cache, the same reference-mode alias
   (prompter scripted by the FaultInjector); after one warm-up request, ``--hits`` requests of the same prompt to
   each, interleaved. Reported: p50 of the request (client side) and of the prompter stage (``x-alignpro-
   prompter-ms``: the cache lookup itself), and the differences.

    .venv/bin/python bench/shared_state.py                     # ~2 minutes
    .venv/bin/python bench/shared_state.py --seconds 5 --hits 50

Writes bench/results/shared-state-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from alignpro.testing.faults import FaultInjector
from alignpro.testing.redis import start_redis
from alignpro.testing.servers import Server, free_port
from common import alignpro_gateway, exit_on_sigterm, median, table, write_json

KEY = "sk-bench-shared"
OPEN_KEY = "sk-bench-open"  # no limits: the cache-hit runs
PROMPT = "How does photosynthesis work in plants?"
REWRITE = "Explain step by step how photosynthesis works in green plants."


def _config(upstream: str, redis_url: str | None) -> str:
    return f"""
engines:
  frozen: {{kind: openai, urls: ["{upstream}"], model: ok}}
  writer: {{kind: openai, urls: ["{upstream}"], model: "say-{REWRITE}"}}
aliases:
  aligned: {{engine: frozen, prompter: {{mode: reference, engine: writer}}}}
  plain: {{engine: frozen, prompter: {{mode: "off"}}}}
audit_log: false
""" + (f'redis_url: "{redis_url}"\n' if redis_url else "")


def _replicas(
    tmp: Path, upstream: str, redis_url: str | None, rpm: float, n: int
) -> list[tuple[Server, str]]:
    env = {"ALIGNPRO_API_KEYS": json.dumps([{"key": KEY, "rate_limit_rpm": rpm}, OPEN_KEY])}
    return [alignpro_gateway(tmp, _config(upstream, redis_url), env=env, timeout=180) for _ in range(n)]


def limits(urls: list[str], rpm: float, seconds: float) -> dict[str, Any]:
    body = {"model": "plain", "messages": [{"role": "user", "content": "Hi"}]}
    codes: list[int] = []
    t0 = time.monotonic()
    with httpx.Client(timeout=10, headers={"authorization": f"Bearer {KEY}"}) as c:
        while time.monotonic() - t0 < seconds:
            codes.append(c.post(f"{urls[len(codes) % len(urls)]}/v1/chat/completions", json=body).status_code)
    elapsed = time.monotonic() - t0
    allowed = codes.count(200)
    expected = rpm + rpm / 60 * elapsed
    return {
        "requests": len(codes),
        "seconds": round(elapsed, 2),
        "allowed": allowed,
        "expected": round(expected, 1),
        "accuracy": round(allowed / expected, 3),
        "other_statuses": sorted(set(codes) - {200, 429}),
    }


def hits(urls: dict[str, str], n: int) -> dict[str, dict[str, float]]:
    body = {"model": "aligned", "messages": [{"role": "user", "content": PROMPT}]}
    auth = {"authorization": f"Bearer {OPEN_KEY}"}
    lat: dict[str, list[float]] = {k: [] for k in urls}
    stage: dict[str, list[float]] = {k: [] for k in urls}
    with httpx.Client(timeout=30, headers=auth) as c:
        for url in urls.values():  # warm-up: the rewrite is made and cached
            r = c.post(f"{url}/v1/chat/completions", json=body)
            assert r.status_code == 200 and r.headers["x-alignpro-rewritten"] == "true", r.text
        for _ in range(n):
            for name, url in urls.items():
                t0 = time.perf_counter()
                r = c.post(f"{url}/v1/chat/completions", json=body)
                lat[name].append((time.perf_counter() - t0) * 1000)
                assert r.headers.get("x-alignpro-cache") == "hit", r.headers
                stage[name].append(float(r.headers["x-alignpro-prompter-ms"]))
    return {k: {"request_p50_ms": median(lat[k]), "prompter_stage_p50_ms": median(stage[k])} for k in urls}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rpm", type=float, default=120)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--hits", type=int, default=300)
    args = ap.parse_args()
    exit_on_sigterm()
    servers: list[Server] = []
    fi = FaultInjector(free_port()).start()
    try:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            redis, redis_url = start_redis(tmp)
            servers.append(redis)
            shared = _replicas(tmp, fi.url, redis_url, args.rpm, 2)
            local = _replicas(tmp, fi.url, None, args.rpm, 2)
            servers += [s for s, _ in shared + local]
            rows = [
                {"state": "redis", **limits([u for _, u in shared], args.rpm, args.seconds)},
                {"state": "process memory", **limits([u for _, u in local], args.rpm, args.seconds)},
            ]
            print(table(rows, title=f"\nA key of {args.rpm:g} requests/min over 2 replicas"))
            cache = hits({"memory": local[0][1], "redis": shared[0][1]}, args.hits)
            crow = [{"cache": k, **v} for k, v in cache.items()]
            added = {
                "request_p50_ms": cache["redis"]["request_p50_ms"] - cache["memory"]["request_p50_ms"],
                "prompter_stage_p50_ms": cache["redis"]["prompter_stage_p50_ms"]
                - cache["memory"]["prompter_stage_p50_ms"],
            }
            crow.append({"cache": "redis - memory", **added})
            print(table(crow, title=f"\nCache hits ({args.hits} each, interleaved)"))
    finally:
        for s in reversed(servers):
            s.stop()
        fi.stop()
    path = write_json(
        "shared-state",
        {"args": vars(args), "limits": rows, "cache_hits": cache, "redis_hit_adds": added},
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
