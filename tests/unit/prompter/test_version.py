"""The prompter's identity: the instruction digest and the adapter fingerprint recorded in alignpro.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignpro.engines.local import trained_adapter_path
from alignpro.prompter import instruction
from alignpro.prompter.version import ADAPTER_META, adapter_fingerprint, check_adapter, instruction_digest


def _adapter(tmp_path: Path, weights: bytes = b"\x00\x01weights", **meta: object) -> Path:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": "m"}))
    (tmp_path / "adapter_model.safetensors").write_bytes(weights)
    if meta:
        (tmp_path / ADAPTER_META).write_text(json.dumps(meta))
    return tmp_path


def test_instruction_digest_is_stable_and_tells_the_contracts_apart() -> None:
    assert instruction_digest("rewrite") == instruction_digest("rewrite")
    assert instruction_digest("rewrite") != instruction_digest("augment")


def test_instruction_digest_follows_the_worked_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    before = instruction_digest("rewrite")
    monkeypatch.setattr(instruction, "REWRITE_EXAMPLES", instruction.REWRITE_EXAMPLES[:-1])
    assert instruction_digest("rewrite") != before


def test_fingerprint_reads_weights_and_config_not_the_metadata(tmp_path: Path) -> None:
    path = _adapter(tmp_path)
    first = adapter_fingerprint(path)
    (path / ADAPTER_META).write_text('{"note": "metadata is not behaviour"}')
    # Key order in the config is formatting, not content.
    (path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "m", "r": 8}, indent=2))
    assert adapter_fingerprint(path) == first
    (path / "adapter_model.safetensors").write_bytes(b"\x00\x02weights")
    assert adapter_fingerprint(path) != first


def test_check_adapter_reports_a_foreign_instruction_and_edited_weights(tmp_path: Path) -> None:
    path = _adapter(tmp_path)
    good = {
        "contract": "rewrite",
        "instruction": instruction_digest("rewrite"),
        "fingerprint": adapter_fingerprint(path),
    }
    (path / ADAPTER_META).write_text(json.dumps(good))
    assert check_adapter(path) == []
    (path / ADAPTER_META).write_text(json.dumps(good | {"instruction": "0123456789abcdef"}))
    assert [p for p in check_adapter(path) if "instruction" in p]
    (path / ADAPTER_META).write_text(json.dumps(good))
    (path / "adapter_model.safetensors").write_bytes(b"edited")
    assert [p for p in check_adapter(path) if "fingerprint" in p]


def test_a_plain_peft_folder_carries_no_claim(tmp_path: Path) -> None:
    assert check_adapter(_adapter(tmp_path)) == []


def test_the_shipped_prompter_matches_its_record() -> None:
    """The committed adapter was trained under today's instruction, and its files are the ones described."""
    path = trained_adapter_path()
    meta = json.loads((path / ADAPTER_META).read_text())
    assert meta["instruction"] == instruction_digest(meta["contract"])
    assert meta["fingerprint"] == adapter_fingerprint(path)
    assert check_adapter(path) == []
