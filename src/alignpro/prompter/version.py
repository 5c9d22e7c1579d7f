"""What identifies a prompter: the instruction it was trained under and its adapter's weights.

A LoRA prompter is trained on the chat :func:`~alignpro.prompter.instruction.prompter_messages` builds; served
under another instruction it sees prompts it never saw in training. ``alignpro.json`` records
:func:`instruction_digest` and :func:`adapter_fingerprint` so that a mismatch is reported when the adapter loads
and so that anyone can check that the committed files are the ones described. Pure Python: no numpy, no torch.

A *merged copy* of an adapter (``alignpro models merge-prompter``: the base model with the LoRA folded into its
weights, a plain model folder) carries the adapter's ``alignpro.json`` with its ``fingerprint`` unchanged, so it
is identified as the same prompter, plus a ``merged`` record whose ``digest`` (:func:`merged_digest`) covers its
own weight files.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from alignpro.protocol import Contract

log = logging.getLogger(__name__)

ADAPTER_META = "alignpro.json"
# The files that define the adapter's behaviour; alignpro.json describes them and is not part of the digest.
_WEIGHT_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
MERGED = "merged"  # the record alignpro.json of a merged copy has (what it was merged from, its own digest)


def instruction_digest(contract: Contract) -> str:
    """A short digest of the instruction and worked examples the prompter sees under ``contract``."""
    from alignpro.prompter import instruction as ins

    text, examples = (
        (ins.REWRITE_INSTRUCTION, ins.REWRITE_EXAMPLES)
        if contract == "rewrite"
        else (ins.AUGMENT_INSTRUCTION, ins.AUGMENT_EXAMPLES)
    )
    return hashlib.sha256(json.dumps([text, examples]).encode()).hexdigest()[:16]


def adapter_fingerprint(adapter_dir: Path) -> str:
    """A digest of the adapter's weight and config files, in a fixed order: equal files, equal fingerprint.

    ``adapter_config.json`` is hashed as parsed JSON with sorted keys, so rewriting its base-model path (done for
    portability when training ends) is the only edit that changes nothing else; the digest is taken after it.
    """
    return _digest_files(adapter_dir, list(_WEIGHT_FILES))


def _digest_files(folder: Path, names: list[str]) -> str:
    """A digest of the files ``names`` of ``folder`` in that order (JSON ones as parsed, keys sorted)."""
    h = hashlib.sha256()
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if name.endswith(".json"):
            data = json.dumps(json.loads(data), sort_keys=True).encode()
        h.update(name.encode() + b"\0" + data)
    return h.hexdigest()[:16]


def merged_digest(model_dir: Path) -> str:
    """A digest of a merged copy's config and weights (``config.json`` and every ``*.safetensors``)."""
    return _digest_files(model_dir, ["config.json", *sorted(p.name for p in model_dir.glob("*.safetensors"))])


def prompter_meta(folder: Path) -> dict[str, Any]:
    """``folder/alignpro.json`` (an adapter or a merged copy); empty when there is none."""
    path = folder / ADAPTER_META
    return dict(json.loads(path.read_text())) if path.is_file() else {}


def prompter_fingerprint(folder: Path) -> str | None:
    """Which prompter ``folder`` holds: an adapter's :func:`adapter_fingerprint`, or for a merged copy the
    fingerprint of the adapter it was merged from; None for a plain model (no prompter record)."""
    meta = prompter_meta(folder)
    if MERGED in meta:
        return str(meta.get("fingerprint")) if meta.get("fingerprint") else None
    if (folder / "adapter_config.json").is_file():
        return adapter_fingerprint(folder)
    return None


def check_adapter(adapter_dir: Path) -> list[str]:
    """What is wrong with serving ``adapter_dir`` (an adapter or a merged copy) under today's instruction (an
    empty list: nothing known).

    An adapter without ``alignpro.json`` (a plain PEFT folder) or without the fields carries no claim to check.
    """
    meta = prompter_meta(adapter_dir)
    if not meta:
        return []
    problems = []
    contract = meta.get("contract", "rewrite")
    trained_under = meta.get("instruction")
    if trained_under and trained_under != instruction_digest(contract):
        problems.append(
            f"trained under instruction {trained_under}, served under {instruction_digest(contract)}: "
            "retrain it, or serve it with the alignpro version that trained it"
        )
    if MERGED in meta:
        recorded = meta[MERGED].get("digest")
        if recorded != merged_digest(adapter_dir):
            problems.append(f"its weights do not match the merged digest {recorded} in {ADAPTER_META}")
        return problems
    recorded = meta.get("fingerprint")
    if recorded and recorded != adapter_fingerprint(adapter_dir):
        problems.append(f"its files do not match the fingerprint {recorded} in {ADAPTER_META}")
    return problems


def warn_if_mismatched(adapter_dir: Path) -> None:
    """Log each :func:`check_adapter` problem once per load: a mismatch degrades rewrites, it does not break them."""
    for problem in check_adapter(adapter_dir):
        log.warning("prompter adapter %s: %s", adapter_dir, problem)
