"""Shared fixtures: the prepared embedded model, a tiny random model with its tokenizer, and real gateway processes
on loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from alignpro.testing.faults import FaultInjector
from alignpro.testing.servers import free_port, start_gateway


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The embedded SmolLM2 as a safetensors folder (converted once, then reused)."""
    from alignpro import embedded

    return embedded.prepare()


@pytest.fixture(scope="session")
def gateway_url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real gateway process with the default settings (embedded model in-process)."""
    server, url = start_gateway(tmp_path_factory.mktemp("gateway"))
    # /health answers before the model is loaded; wait for /ready so tests do not time out on the first call.
    deadline = time.monotonic() + 120
    while httpx.get(f"{url}/ready", timeout=5).status_code != 200:
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"gateway not ready:\n{server.log_tail()}")
        time.sleep(0.5)
    yield url
    server.stop()


@pytest.fixture(scope="session")
def tiny_model(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LlamaForCausalLM (hidden 32, 2 layers) with the SmolLM2 tokenizer and chat template: trainer and
    evaluator mechanics in seconds."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama") / "model"  # the folder name is the model's name in reports
    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def faults() -> Iterator[FaultInjector]:
    """A scripted OpenAI-compatible upstream on loopback (instant answers, faults on request), one per module."""
    fi = FaultInjector(free_port()).start()
    yield fi
    fi.stop()
