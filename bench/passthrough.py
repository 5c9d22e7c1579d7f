"""Pass-through overhead: what the gateway adds in front of an upstream that answers instantly.

An nginx on loopback answers every chat completion from memory (a fixed JSON body, or a fixed SSE stream on its
own path). wrk (one thread, keep-alive connections, a Lua script for the POST body) loads it three ways, in the
same run and interleaved: directly, through AlignPro (a real ``alignpro serve --config`` process, prompter
``off``, an ``openai`` engine pointing at nginx) and through the LiteLLM proxy (1 worker, same upstream as an
OpenAI-compatible model; skipped if ``.venv-litellm`` is missing). A raw-socket probe in its own process measures
time to first byte of the streams. Gateway CPU per request comes from /proc/<pid>/stat before and after a run.

    .venv/bin/python bench/passthrough.py                    # ~6 minutes
    .venv/bin/python bench/passthrough.py --seconds 3 --repeats 1 --systems direct,alignpro --tag quick
    .venv/bin/python bench/passthrough.py --variant workers=2 --variant workers=4 --tag workers
    .venv/bin/python bench/passthrough.py --variant transport=httpx-aiohttp --variant transport=aiohttp

``--variant`` runs a further AlignPro gateway as its own system, in the same interleaved rounds: ``NAME=SRC``
from another source tree (system ``alignpro-NAME``), ``SETTING=VALUE`` with a top-level setting
(``workers=2``) or a setting of its openai engines (``transport=aiohttp``) changed (system ``SETTING=VALUE``).

Writes bench/results/passthrough[-TAG]-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from alignpro.settings import EngineConfig, Settings
from alignpro.testing.servers import cpu_seconds
from common import (
    ROOT,
    Server,
    alignpro_gateway,
    exit_on_sigterm,
    free_port,
    median,
    nginx,
    table,
    ttfb,
    write_json,
    wrk,
)

LITELLM = ROOT / ".venv-litellm" / "bin" / "litellm"
LITELLM_VERSION = "1.100.5"  # pinned: litellm[proxy] of later releases needs litellm-proxy, not on our mirror

REQUEST = {
    "model": "passthrough",
    "messages": [{"role": "user", "content": "Say something short about foxes."}],
    "max_tokens": 16,
    "temperature": 0.0,
}

GOALS = {
    "added_p50_ms_at_c1": 1.0,  # AlignPro p50 minus direct p50, non-streaming, concurrency 1
    "rps_vs_direct_at_c64": 0.90,  # AlignPro / direct requests/s, non-streaming, concurrency 64
    "rps_vs_litellm": 2.0,  # AlignPro / LiteLLM requests/s (every cell; the minimum is what counts)
}


def alignpro_config(upstream: str, setting: tuple[str, str] | None = None) -> str:
    """The gateway's config; ``setting``: a (name, value) of Settings or of its openai engines, changed."""
    top, engine = "", ""
    if setting is not None:
        name, value = setting
        if name in EngineConfig.model_fields:
            engine = f", {name}: {value}"
        else:
            top = f"{name}: {value}"
    return f"""
log_level: warning
{top}
engines:
  nginx: {{kind: openai, urls: ["{upstream}/v1"], model: upstream{engine}}}
  nginx-stream: {{kind: openai, urls: ["{upstream}/stream/v1"], model: upstream{engine}}}
aliases:
  passthrough: {{engine: nginx, prompter: {{mode: "off", engine: nginx}}}}
  passthrough-stream: {{engine: nginx-stream, prompter: {{mode: "off", engine: nginx-stream}}}}
"""


def litellm_server(workdir: Path, upstream: str) -> tuple[Server, str]:
    port = free_port()
    cfg = workdir / "litellm.yaml"
    cfg.write_text(
        f"""
model_list:
  - model_name: passthrough
    litellm_params: {{model: openai/upstream, api_base: "{upstream}/v1", api_key: none}}
  - model_name: passthrough-stream
    litellm_params: {{model: openai/upstream, api_base: "{upstream}/stream/v1", api_key: none}}
litellm_settings: {{drop_params: true, telemetry: false}}
"""
    )
    url = f"http://127.0.0.1:{port}"
    server = Server(
        "litellm",
        [
            str(LITELLM),
            "--config",
            str(cfg),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ],
        f"{url}/health/liveliness",
        env={"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "DISABLE_SCHEMA_UPDATE": "True"},
        log_path=workdir / "litellm.log",
        grace=20.0,
    )
    return server.start(timeout=180), url


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="length of one wrk run")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds; medians are reported")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--systems", default="direct,alignpro,litellm")
    ap.add_argument("--ttfb-n", type=int, default=300, help="requests of the stream TTFB probe per system")
    ap.add_argument("--tag", default="", help="suffix of the results file (e.g. before / after)")
    ap.add_argument("--no-stream", action="store_true")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=SRC|SETTING=VALUE",
        help="also run AlignPro from another source tree (e.g. a copy before an optimisation), as system "
        "alignpro-NAME, or with one setting changed (workers=2, transport=aiohttp), as system SETTING=VALUE: "
        "measures a change before/after in the same run",
    )
    args = ap.parse_args(argv)
    exit_on_sigterm()

    levels = [int(c) for c in args.concurrency.split(",")]
    systems = args.systems.split(",")
    variants = variant_systems(args.variant)
    systems[1:1] = list(variants)
    if "litellm" in systems and not LITELLM.exists():
        print(
            f"(no {LITELLM}: LiteLLM skipped; make it with python -m venv .venv-litellm && "
            f".venv-litellm/bin/pip install 'litellm[proxy]=={LITELLM_VERSION}')"
        )
        systems.remove("litellm")
    modes = ["json"] if args.no_stream else ["json", "stream"]

    work = Path(tempfile.mkdtemp(prefix="alignpro-bench-"))
    servers: list[Server] = []
    try:
        ng, upstream = nginx(work / "nginx")
        servers.append(ng)
        targets: dict[
            str, tuple[str, int | None, str]
        ] = {}  # system -> (base URL, pid to meter, path prefix)
        targets["direct"] = (upstream, ng.pid, "")
        if "alignpro" in systems:
            gw, gw_url = alignpro_gateway(work, alignpro_config(upstream))
            servers.append(gw)
            targets["alignpro"] = (gw_url, gw.pid, "")
        for system, (setting, src) in variants.items():
            env = {"PYTHONPATH": str(Path(src).resolve())} if src else None
            v, v_url = alignpro_gateway(work, alignpro_config(upstream, setting), env=env)
            servers.append(v)
            settle(v.pid)  # every worker started, not only the one that answered /health
            targets[system] = (v_url, v.pid, "")
        if "litellm" in systems:
            ll, ll_url = litellm_server(work, upstream)
            servers.append(ll)
            targets["litellm"] = (ll_url, ll.pid, "")

        def url_body(system: str, mode: str) -> tuple[str, dict[str, Any]]:
            base = targets[system][0]
            body = dict(REQUEST)
            if mode == "stream":
                body.update(model="passthrough-stream", stream=True)
                path = "/stream/v1/chat/completions" if system == "direct" else "/v1/chat/completions"
            else:
                path = "/v1/chat/completions"
            return base + path, body

        # Warm-up: connection pools, lazy imports, first-request paths.
        for s in systems:
            for m in modes:
                u, b = url_body(s, m)
                wrk(u, b, 4, 1)

        runs: list[dict[str, Any]] = []
        for rep in range(args.repeats):
            for mode in modes:
                for c in levels:
                    order = (
                        systems[rep % len(systems) :] + systems[: rep % len(systems)]
                    )  # rotate who goes first
                    for s in order:
                        u, b = url_body(s, mode)
                        r = wrk(u, b, c, args.seconds, targets[s][1])
                        runs.append(
                            {"repeat": rep, "mode": mode, "concurrency": c, "system": s, **r.__dict__}
                        )
                        print(
                            f"  rep {rep} {mode:6s} c={c:<3d} {s:9s} {r.rps:9.1f} req/s  p50 {r.p50_ms:7.3f} ms"
                            f"  p99 {r.p99_ms:8.3f} ms  cpu {r.cpu_ms_per_req:.3f} ms/req  err {r.errors}",
                            flush=True,
                        )

        ttfbs: list[dict[str, Any]] = []
        if "stream" in modes:
            for c in (1, 16):
                for s in systems:
                    u, b = url_body(s, "stream")
                    ttfbs.append({"system": s, "concurrency": c, **ttfb(u, b, args.ttfb_n, c)})
    finally:
        for srv in reversed(servers):
            srv.stop()

    rows = summarize(runs, systems, modes, levels)
    print()
    print(
        table(
            rows,
            [
                "mode",
                "c",
                "system",
                "req/s",
                "p50 ms",
                "p99 ms",
                "+p50 ms",
                "rps/direct",
                "cpu ms/req",
                "vs litellm",
                "rps/alignpro",
                "cpu/alignpro",
            ],
            title="Pass-through (medians over repeats)",
        )
    )
    if ttfbs:
        print()
        print(
            table(
                ttfbs,
                [
                    "system",
                    "concurrency",
                    "ttfb_p50_ms",
                    "ttfb_p99_ms",
                    "total_p50_ms",
                    "total_p99_ms",
                    "errors",
                ],
                title="Streams: time to first byte (raw-socket probe)",
            )
        )
    goals = check_goals(rows, systems)
    print()
    for k, v in goals.items():
        print(f"goal {k}: {v}")
    path = write_json(
        "passthrough" + (f"-{args.tag}" if args.tag else ""),
        {
            "config": vars(args)
            | {
                "litellm_version": LITELLM_VERSION if "litellm" in systems else None,
                "nginx": shutil.which("nginx"),
                "request": REQUEST,
            },
            "summary": rows,
            "ttfb": ttfbs,
            "goals": goals,
            "runs": runs,
        },
    )
    print(f"\nwrote {path}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def settle(pid: int, quiet_s: float = 0.05, timeout: float = 120.0) -> None:
    """Wait until a process tree spends under ``quiet_s`` CPU seconds in half a second (its start is over)."""
    deadline = time.monotonic() + timeout
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = cpu_seconds(pid)
        if now - last < quiet_s:
            return
        last = now


def variant_systems(specs: list[str]) -> dict[str, tuple[tuple[str, str] | None, str | None]]:
    """``--variant`` values -> {system: (setting changed or None, source tree or None)}."""
    out: dict[str, tuple[tuple[str, str] | None, str | None]] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep:
            raise SystemExit(f"--variant {spec!r}: expected NAME=SRC or SETTING=VALUE")
        if name in Settings.model_fields or name in EngineConfig.model_fields:
            out[spec] = ((name, value), None)
        else:
            out[f"alignpro-{name}"] = (None, value)
    return out


def summarize(
    runs: list[dict[str, Any]], systems: list[str], modes: list[str], levels: list[int]
) -> list[dict[str, Any]]:
    rows = []
    for mode in modes:
        for c in levels:
            med: dict[str, dict[str, float]] = {}
            for s in systems:
                rs = [r for r in runs if r["mode"] == mode and r["concurrency"] == c and r["system"] == s]
                med[s] = {
                    k: median([r[k] for r in rs]) for k in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_req")
                }
                med[s]["errors"] = sum(r["errors"] for r in rs)
            for s in systems:
                m, d = med[s], med["direct"]
                rows.append(
                    {
                        "mode": mode,
                        "c": c,
                        "system": s,
                        "req/s": round(m["rps"], 1),
                        "p50 ms": round(m["p50_ms"], 3),
                        "p99 ms": round(m["p99_ms"], 3),
                        "+p50 ms": round(m["p50_ms"] - d["p50_ms"], 3),
                        "rps/direct": round(m["rps"] / d["rps"], 4) if d["rps"] else None,
                        "cpu ms/req": round(m["cpu_ms_per_req"], 4),
                        "vs litellm": round(m["rps"] / med["litellm"]["rps"], 2)
                        if "litellm" in med
                        else None,
                        # Variants against the default gateway: throughput and CPU per request.
                        "rps/alignpro": ratio(m["rps"], med, "alignpro", "rps"),
                        "cpu/alignpro": ratio(m["cpu_ms_per_req"], med, "alignpro", "cpu_ms_per_req"),
                        "errors": int(m["errors"]),
                    }
                )
    return rows


def ratio(value: float, med: dict[str, dict[str, float]], base: str, key: str) -> float | None:
    return round(value / med[base][key], 3) if base in med and med[base][key] else None


def check_goals(rows: list[dict[str, Any]], systems: list[str]) -> dict[str, Any]:
    def cell(mode: str, c: int, s: str) -> dict[str, Any] | None:
        return next((r for r in rows if r["mode"] == mode and r["c"] == c and r["system"] == s), None)

    out: dict[str, Any] = {}
    a1 = cell("json", 1, "alignpro")
    if a1:
        out["added_p50_ms_at_c1"] = {
            "value": a1["+p50 ms"],
            "goal": f"<= {GOALS['added_p50_ms_at_c1']}",
            "met": a1["+p50 ms"] <= GOALS["added_p50_ms_at_c1"],
        }
    a64 = cell("json", 64, "alignpro")
    if a64:
        out["rps_vs_direct_at_c64"] = {
            "value": a64["rps/direct"],
            "goal": f">= {GOALS['rps_vs_direct_at_c64']}",
            "met": a64["rps/direct"] >= GOALS["rps_vs_direct_at_c64"],
        }
    if "litellm" in systems:
        ratios = [r["vs litellm"] for r in rows if r["system"] == "alignpro"]
        out["rps_vs_litellm"] = {
            "value": min(ratios),
            "all": ratios,
            "goal": f">= {GOALS['rps_vs_litellm']}",
            "met": min(ratios) >= GOALS["rps_vs_litellm"],
        }
    return json.loads(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
