"""Start and stop real vLLM and gateway processes on loopback, for tests and bench scripts.

    vllm = start_vllm(model_dir, workdir, lora={"alignpro-prompter": adapter_dir})
    gw = start_gateway(workdir, config_yaml)
    ...
    gw.stop(); vllm.stop()

vLLM runs from its own virtual environment: ``.venv-vllm/bin/python`` (``make vllm-env`` builds it; ``make
test`` depends on it), or the interpreter named by ``ALIGNPRO_VLLM_PYTHON`` when that folder does not exist.
Nothing here skips: a missing vLLM or a server that does not come up is an error with the end of its log, so a
broken CI setup fails loudly instead of passing with the vLLM tests silently left out.

Each server is its own process group (``start_new_session``), so stopping it by its pid can also reach the
children it spawned (vLLM's engine-core process) if it does not take them down itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
VLLM_VENV_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
SERVED_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the id vLLM reports (alignpro.models.SMOLLM2)
# 2048 instead of the model's 8192: a smaller KV cache per sequence on a shared CPU, and a context-length
# error that a test can provoke with a short body.
MAX_MODEL_LEN = 2048


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


@dataclass
class Server:
    """A server subprocess with its log file, stopped by its pid."""

    name: str
    args: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    unset: tuple[str, ...] = ()  # variables of this process's environment not to pass on
    proc: subprocess.Popen[bytes] | None = None
    started_s: float = 0.0  # seconds from spawn to a healthy /health

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 180.0, health_path: str = "/health") -> Server:
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args,
                env={**{k: v for k, v in os.environ.items() if k not in self.unset}, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = t0 + timeout
        with httpx.Client(timeout=5.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with status {self.proc.returncode} before answering "
                        f"{health_path}; log {self.log_path}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.url + health_path).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"{self.name} did not answer {health_path} within {timeout:.0f} s; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                time.sleep(0.25)
        self.started_s = time.monotonic() - t0
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 6000) -> str:
        return self.log_text()[-n:] or "(empty log)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the pid, SIGKILL it after ``grace`` seconds; then kill what is left of its group."""
        if self.proc is None:
            return
        pid = self.proc.pid
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # The group id is the server's own pid (start_new_session): children it left behind, e.g. a vLLM
        # engine core whose parent was SIGKILLed, are in it and nothing else is.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


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
        "DO_NOT_TRACK": "1",
    }
    return Server("vllm", args, port, workdir / f"vllm-{port}.log", env=env)


def start_vllm(
    model_dir: Path,
    workdir: Path,
    *,
    lora: dict[str, Path] | None = None,
    extra_args: list[str] | None = None,
    timeout: float = 180.0,
) -> Server:
    return vllm_server(model_dir, workdir, lora=lora, extra_args=extra_args).start(timeout=timeout)


def gateway_server(workdir: Path, config: str, *, port: int | None = None, name: str = "gateway") -> Server:
    """``alignpro serve --config`` (not started) with ``config`` (YAML text) on a free loopback port."""
    port = port or free_port()
    path = workdir / f"{name}-{port}.yaml"
    path.write_text(config)
    args = [sys.executable, "-m", "alignpro.cli.main", "serve", "--port", str(port), "--config", str(path)]
    # ALIGNPRO_* from the caller's environment would override the file; the tests mean what the file says.
    unset = tuple(k for k in os.environ if k.startswith("ALIGNPRO_") and k != "ALIGNPRO_HOME")
    return Server(
        name, args, port, workdir / f"{name}-{port}.log", env={"PYTHONUNBUFFERED": "1"}, unset=unset
    )


def start_gateway(workdir: Path, config: str, *, port: int | None = None, name: str = "gateway") -> Server:
    return gateway_server(workdir, config, port=port, name=name).start(timeout=60.0)


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
