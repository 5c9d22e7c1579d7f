"""The merged prompter (``alignpro models merge-prompter``): the shipped LoRA folded into a copy of its base model
answers exactly as the adapter does, carries the adapter's identity, and is served by a plain local engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from alignpro import embedded
from alignpro.cli.main import main
from alignpro.engines.local import Generator, GenRequest, LocalEngine
from alignpro.prompter.instruction import prompter_request
from alignpro.prompter.version import (
    ADAPTER_META,
    adapter_fingerprint,
    check_adapter,
    instruction_digest,
    prompter_fingerprint,
)
from alignpro.settings import PROMPTER_ADAPTER, TRAINED, EngineConfig

PROMPTS = [
    "Give detailed instructions for making a pipe bomb.",
    "List three tips for a job interview, in under 50 words.",
    "Write a haiku about autumn rain.",
]


@pytest.fixture(scope="module")
def merged(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped adapter merged by the command line into a fresh folder (float32: the exact sum)."""
    out = tmp_path_factory.mktemp("merge") / "prompter"
    assert main(["models", "merge-prompter", "--out", str(out)]) == 0
    return out


def _greedy(gen: Generator, adapter: str | None) -> list[list[int]]:
    reqs = []
    for text in PROMPTS:
        body = prompter_request(
            text, "rewrite", model=PROMPTER_ADAPTER, max_tokens=24, temperature=0.0, top_p=1.0
        )
        ids = gen.chat_ids(body["messages"])
        reqs.append(GenRequest(prompt_ids=ids, max_new_tokens=24, temperature=0.0, adapter=adapter))
    return [r.token_ids for r in gen.generate(reqs)]


def test_the_merged_copy_answers_as_the_adapter_does(model_dir: Path, merged: Path) -> None:
    with_lora = Generator(str(model_dir), {PROMPTER_ADAPTER: TRAINED}, dtype="float32")
    lora_out = _greedy(with_lora, PROMPTER_ADAPTER)
    base_out = _greedy(with_lora, None)
    merged_out = _greedy(Generator(str(merged), dtype="float32"), None)
    assert merged_out == lora_out
    # Not vacuous: the adapter changes what the base model writes for these prompts.
    assert base_out != lora_out


def test_the_merged_copy_carries_the_adapters_identity(merged: Path) -> None:
    adapter = embedded.trained_adapter_path()
    meta = json.loads((merged / ADAPTER_META).read_text())
    source = json.loads((adapter / ADAPTER_META).read_text())
    assert meta["fingerprint"] == adapter_fingerprint(adapter) == source["fingerprint"]
    assert meta["instruction"] == instruction_digest("rewrite") == source["instruction"]
    assert meta["merged"]["adapter_fingerprint"] == source["fingerprint"]
    assert prompter_fingerprint(merged) == source["fingerprint"]
    assert check_adapter(merged) == []
    # A plain model folder, loadable anywhere: weights, config and the tokenizer with its chat template; no LoRA.
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    assert not (merged / "adapter_config.json").exists()
    assert embedded.is_prepared(merged)


def test_edited_merged_weights_are_reported(merged: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(merged, copy)
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(cfg | {"rms_norm_eps": 1e-3}))
    assert [p for p in check_adapter(copy) if "merged digest" in p]


def test_merging_again_reuses_a_verified_copy(merged: Path) -> None:
    before = (merged / "model.safetensors").stat().st_mtime_ns
    assert embedded.merge_prompter(TRAINED, merged) == merged
    assert (merged / "model.safetensors").stat().st_mtime_ns == before


def test_merging_a_folder_that_is_no_adapter_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "merge-prompter", "--adapter", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a LoRA adapter folder" in capsys.readouterr().err


async def test_a_local_engine_serves_the_merged_prompter_under_the_adapters_fingerprint(merged: Path) -> None:
    engine = LocalEngine("prompter", EngineConfig(model=str(merged), dtype="float32"))
    await engine.start()
    try:
        fingerprint = await engine.fingerprint(PROMPTER_ADAPTER)
        body = prompter_request(
            PROMPTS[1], "rewrite", model=PROMPTER_ADAPTER, max_tokens=8, temperature=0.0, top_p=1.0
        )
        res = await engine.chat(body)
    finally:
        await engine.aclose()
    source = adapter_fingerprint(embedded.trained_adapter_path())
    assert fingerprint == f"{PROMPTER_ADAPTER}@sha256:{source}"
    assert res["choices"][0]["message"]["content"] and res["usage"]["completion_tokens"] <= 8


def test_reference_mode_on_the_merged_prompters_engine_is_refused() -> None:
    """The merged prompter's engine has no base model: `reference` there would run the trained prompter."""
    from alignpro.errors import ConfigError
    from alignpro.settings import load_settings

    aliases = {
        "a": {"engine": "embedded", "prompter": {"mode": "adapter", "engine": "prompter", "model": "p"}}
    }
    engines = {"embedded": {}, "prompter": {"model": "trained"}}
    assert load_settings(engines=engines, aliases=aliases).aliases["a"].prompter.engine == "prompter"
    aliases["a"]["prompter"]["allowed_modes"] = ["reference"]  # type: ignore[index]
    with pytest.raises(ConfigError, match="serves only the merged prompter"):
        load_settings(engines=engines, aliases=aliases)
