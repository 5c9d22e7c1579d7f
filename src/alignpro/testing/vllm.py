"""Start and stop real vLLM processes on loopback, for tests and bench scripts.

    vllm = start_vllm(model_dir, workdir, lora={"alignpro-prompter": adapter_dir})
    ...
    vllm.stop()

vLLM runs from its own virtual environment: ``.venv-vllm/bin/python`` (``make vllm-env`` builds it; ``make
test`` depends on it), or the interpreter named by ``ALIGNPRO_VLLM_PYTHON`` when that folder does not exist.
Nothing here skips: a missing vLLM or a server that does not come up is an error with the end of its log, so a
broken CI setup fails loudly instead of passing with the vLLM tests silently left out.

The processes are :class:`alignpro.testing.servers.Server` objects: each is its own process group, so stopping it by its
pid also reaches the children it spawned (vLLM's engine-core process) if it does not take them down itself.
A gateway in front of it: :func:`alignpro.testing.servers.start_gateway`.
"""

from __future__ import annotations

import os
from pathlib import Path

from alignpro.testing.servers import Server, free_port

# In a source checkout (an editable install) the repository root is three folders up; `make vllm-env` puts
# the vLLM environment there.
ROOT = Path(__file__).resolve().parents[3]
VLLM_VENV_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
SERVED_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the id vLLM reports (alignpro.embedded.SMOLLM2)
# 2048 instead of the model's 8192: a smaller KV cache per sequence on a shared CPU, and a context-length
# error that a test can provoke with a short body.
MAX_MODEL_LEN = 2048


def vllm_python() -> Path:
    """The interpreter with vLLM: ``.venv-vllm``, else ``$ALIGNPRO_VLLM_PYTHON``; an error if neither."""
    if VLLM_VENV_PYTHON.exists():
        return VLLM_VENV_PYTHON
    env = os.environ.get("ALIGNPRO_VLLM_PYTHON")
    if env and Path(env).exists():
        return Path(env)
    raise RuntimeError(
        f"no vLLM interpreter: {VLLM_VENV_PYTHON} does not exist (run `make vllm-env`) and "
        f"ALIGNPRO_VLLM_PYTHON is {'unset' if not env else repr(env) + ', which does not exist'}"
    )


def vllm_server(
    model_dir: Path,
    workdir: Path,
    *,
    lora: dict[str, Path] | None = None,
    max_lora_rank: int = 8,
    port: int | None = None,
    extra_args: list[str] | None = None,
    python: Path | None = None,
    eager: bool = True,
) -> Server:
    """A vLLM OpenAI server (not started) for ``model_dir``, served as :data:`SERVED_MODEL`.

    ``python``: the interpreter with vLLM (default :func:`vllm_python`). ``eager``: ``--enforce-eager``, which
    the CPU build wants; on a GPU, CUDA graphs (eager=False) are the production setting.
    """
    port = port or free_port()
    args = [
        str(python or vllm_python()),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        SERVED_MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *(["--enforce-eager"] if eager else []),
        "--dtype",
        "bfloat16",
        "--max-model-len",
        str(MAX_MODEL_LEN),
    ]
    if lora:
        args += ["--enable-lora", "--max-lora-rank", str(max_lora_rank), "--lora-modules"]
        args += [f"{name}={path}" for name, path in lora.items()]
    args += extra_args or []
    cache = workdir / "vllm-cache"
    cache.mkdir(parents=True, exist_ok=True)
    env = {
        # Two OMP threads pinned to the two cores of a CI runner; a KV cache that fits beside the other tests.
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"),
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
        "VLLM_CACHE_ROOT": str(cache),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",  # tests read the access log while the server runs
        "VLLM_NO_USAGE_STATS": "1",
        # /v1/load_lora_adapter, which the gateway's admin call uses to swap the prompter adapter.
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "DO_NOT_TRACK": "1",
        # /v1/responses keeps responses for previous_response_id only with its store on (in memory, unbounded:
        # fine for a test server; a deployment chooses).
        "VLLM_ENABLE_RESPONSES_API_STORE": "1",
    }
    return Server(
        "vllm", args, f"http://127.0.0.1:{port}/health", env=env, log_path=workdir / f"vllm-{port}.log"
    )


def start_vllm(
    model_dir: Path,
    workdir: Path,
    *,
    lora: dict[str, Path] | None = None,
    extra_args: list[str] | None = None,
    timeout: float = 180.0,
) -> Server:
    return vllm_server(model_dir, workdir, lora=lora, extra_args=extra_args).start(timeout=timeout)


def make_lora_adapter(model_dir: Path, out: Path, rank: int = 8, seed: int = 0) -> Path:
    """A random LoRA adapter (q_proj, v_proj) on ``model_dir``, saved as a peft folder.

    Both LoRA matrices are random (``init_lora_weights=False``): with peft's default the B matrix is zero and
    the adapter would answer exactly like the base model, so a test could not tell them apart.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    get_peft_model(model, cfg).save_pretrained(str(out))
    return out


def prometheus_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``, from a /metrics page."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total
