"""The prompter's identity: the instruction digest and the adapter fingerprint recorded in alignpro.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignpro.embedded import trained_adapter_path
from alignpro.prompter import instruction
from alignpro.prompter.version import (
    ADAPTER_META,
    adapter_fingerprint,
    check_adapter,
    instruction_digest,
    merged_digest,
    prompter_fingerprint,
)


def _adapter(tmp_path: Path, weights: bytes = b"\x00\x01weights", **meta: object) -> Path:
    tmp_path.mkdir(exist_ok=True)
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


def _merged(tmp_path: Path, adapter_fp: str) -> Path:
    """A merged copy's files as merge-prompter writes them: config, weights, and the adapter's record."""
    tmp_path.mkdir()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model.safetensors").write_bytes(b"\x00merged")
    meta: dict[str, object] = {
        "contract": "rewrite",
        "instruction": instruction_digest("rewrite"),
        "fingerprint": adapter_fp,
    }
    meta["merged"] = {"adapter_fingerprint": adapter_fp, "digest": merged_digest(tmp_path)}
    (tmp_path / ADAPTER_META).write_text(json.dumps(meta))
    return tmp_path


def test_a_merged_copy_is_identified_as_its_adapter_and_checked_by_its_own_digest(tmp_path: Path) -> None:
    adapter = _adapter(tmp_path / "adapter")
    merged = _merged(tmp_path / "merged", adapter_fingerprint(adapter))
    assert prompter_fingerprint(merged) == prompter_fingerprint(adapter) == adapter_fingerprint(adapter)
    assert check_adapter(merged) == []
    (merged / "model.safetensors").write_bytes(b"\x00edited")
    assert [p for p in check_adapter(merged) if "merged digest" in p]


def test_a_plain_model_folder_is_no_prompter(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert prompter_fingerprint(tmp_path) is None
