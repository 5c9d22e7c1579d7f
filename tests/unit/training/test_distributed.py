"""The scale path: both trainers under ``accelerate launch`` with two CPU processes (gloo), on the tiny model, with R
estimated over HTTP on two frozen replicas (scripted echo servers on loopback: the answer is the served prompt, so R
is a deterministic function of the rewrite).

``accelerate launch --cpu`` starts one process unless MPI is installed; ``--multi_gpu`` on a machine without a GPU
starts torchrun processes that accelerate sets up as MULTI_CPU with the gloo backend (CUDA is hidden from them, so the
test is the same on a GPU box). One launch trains the closed-form config, then the RL one, in the same two processes
(:mod:`dist_worker`), so the imports are paid once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import alignpro
from alignpro.testing.faults import FaultInjector
from alignpro.testing.servers import free_port
from alignpro.training.artifacts import read_log
from alignpro.training.config import ClosedFormConfig
from alignpro.training.data import Example, balanced, load_prompts
from alignpro.training.pipeline import run

from .test_train import EXAMPLES, NO_TOPIC_CHECK, length_reward, write_jsonl

WORKER = Path(__file__).with_name("dist_worker.py")
PROMPTS = EXAMPLES[:5]  # odd: the epoch's last global batch has one prompt, so one rank fits nothing of it


@pytest.fixture
def replicas() -> Iterator[tuple[FaultInjector, FaultInjector]]:
    """Two frozen 'replicas' that answer each request with its last message (model ``echo``)."""
    a, b = FaultInjector(free_port()).start(), FaultInjector(free_port()).start()
    yield a, b
    a.stop()
    b.stop()


def closed_form_raw(tmp: Path, tiny: Path, urls: list[str], out: str, **kw: Any) -> dict[str, Any]:
    """A closed-form config (as YAML would give it): two rounds (the second importance-corrected), 5 prompts."""
    raw: dict[str, Any] = dict(
        trainer="closed-form",
        output_dir=str(tmp / out),
        data=[str(write_jsonl(tmp / "data.jsonl", PROMPTS))],
        train_percent=100,
        base_model=str(tiny),
        frozen_engine="openai",
        frozen_model="echo",
        frozen_urls=urls,
        concurrency=1,  # one request in flight per rank: each rank stays on its first replica
        k=3,
        m=1,
        max_new_tokens=8,
        rounds=2,
        epochs=1,
        prompts_per_step=1,
        lam=0.1,
        learning_rate=5e-3,
        save_steps=3,
        kl_every=3,
        kl_probe_prompts=2,
        dev_limit=0,
        min_weight=0.0,
        drop_unusable=False,
        shared_prefix=True,
        seed=0,
    )
    raw.update(kw)
    return raw


def rl_raw(tmp: Path, tiny: Path, urls: list[str]) -> dict[str, Any]:
    """A GRPO config: 4 prompts, 1 per process and step, K=2, one step."""
    return dict(
        trainer="rl",
        output_dir=str(tmp / "rl"),
        data=[str(write_jsonl(tmp / "rl-data.jsonl", EXAMPLES[:4]))],
        train_percent=100,
        base_model=str(tiny),
        frozen_engine="openai",
        frozen_model="echo",
        frozen_urls=urls,
        k=2,
        m=1,
        max_new_tokens=6,
        prompts_per_step=1,
        max_steps=1,
        save_steps=1,
        lam=0.1,
        learning_rate=5e-2,
        dev_limit=0,
        seed=0,
    )


def launch(tmp: Path, configs: list[dict[str, Any]]) -> None:
    """``accelerate launch`` two gloo processes of :mod:`dist_worker` over ``configs``."""
    paths = []
    for i, raw in enumerate(configs):
        paths.append(tmp / f"config-{i}.json")
        paths[-1].write_text(json.dumps(raw))
    src = str(Path(alignpro.__file__).parents[1])
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": src}
    cmd = [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={free_port()}",
        str(WORKER),
        *map(str, paths),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def weights(out: Path, rank: int) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = torch.load(out / f"weights.rank{rank}.pt")
    return state


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_two_processes_split_the_prompts_and_end_with_identical_weights(
    tmp_path: Path, tiny_model: Path, replicas: tuple[FaultInjector, FaultInjector]
) -> None:
    a, b = replicas
    urls = [a.url, b.url]
    launch(tmp_path, [closed_form_raw(tmp_path, tiny_model, urls, "cf2"), rl_raw(tmp_path, tiny_model, urls)])
    out = tmp_path / "cf2"
    reports = [json.loads((out / f"report.rank{r}.json").read_text()) for r in (0, 1)]
    rl = tmp_path / "rl"
    rl_reports = [json.loads((rl / f"report.rank{r}.json").read_text()) for r in (0, 1)]
    launched = (a.received["echo"], b.received["echo"])

    # the ranks split the train prompts by position, each scoring its share's rewrites itself
    order = [
        e.prompt
        for e in balanced(load_prompts(tmp_path / "data.jsonl", split="train", train_percent=100), None)
    ]
    assert sorted(order) == sorted(e.prompt for e in PROMPTS)
    assert reports[0]["scored"] == sorted(order[0::2]) and reports[1]["scored"] == sorted(order[1::2])
    # ... over HTTP, each rank on its own replica first (frozen_urls rotated by rank; one request in flight each),
    # and the reported frozen calls are both ranks' (a rank's calls only go to the replicas)
    assert launched[0] > 0 and launched[1] > 0
    assert sum(launched) == reports[0]["train"]["frozen_calls"] + rl_reports[0]["train"]["frozen_calls"]

    # identical weights on both ranks, and they moved
    w0, w1 = weights(out, 0), weights(out, 1)
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert any(float(v.abs().sum()) > 0 for k, v in w0.items() if "lora_B" in k)

    # rank 0 alone wrote the log (each step once), the samples and the adapter; the other rank wrote nothing shared
    recs = read_log(out / "log.jsonl")
    steps = [r for r in recs if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 7))  # 2 rounds x ceil(5 prompts / 2 per global step)
    assert [r["prompts_per_rank"] for r in recs if r["event"] == "round"] == [[3, 2], [3, 2]]
    assert "dev" not in reports[1] and (out / "adapter" / "alignpro.json").is_file()
    assert (out / "frozen_cache.rank1.jsonl").is_file() and (out / "latest").read_text() == "checkpoint-6"

    # the same objective as one process with the same global batch (2 prompts a step), compared over round 0 (round
    # 1 samples the fitted prompter, and on a random model's near-uniform softmax float noise flips samples): the
    # same rewrites in the same order, the same losses, the same adapter (round 0 ends at step 3's checkpoint)
    raw1 = closed_form_raw(tmp_path, tiny_model, urls, "cf1", prompts_per_step=2, rounds=1)
    cfg1 = ClosedFormConfig(**{k: v for k, v in raw1.items() if k != "trainer"})
    run(cfg1, reward_fn=length_reward, progress=False, command="test", validator=NO_TOPIC_CHECK)
    one = Path(cfg1.output_dir)
    rows2 = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    rows1 = [json.loads(ln) for ln in (one / "samples.jsonl").read_text().splitlines()]
    rows2 = [r for r in rows2 if r["round"] == 0]
    assert [(r["id"], r["text"]) for r in rows2] == [(r["id"], r["text"]) for r in rows1]
    assert [r["weight"] for r in rows2] == pytest.approx([r["weight"] for r in rows1], rel=1e-4, abs=1e-6)
    steps1 = [r for r in read_log(one / "log.jsonl") if r["event"] == "step"]
    assert [r["loss"] for r in steps[:3]] == pytest.approx([r["loss"] for r in steps1], rel=1e-4)
    ad1, ad2 = adapter(one / "adapter"), adapter(out / "checkpoint-3")
    assert ad1.keys() == ad2.keys()
    for k in ad1:
        torch.testing.assert_close(ad2[k], ad1[k], rtol=1e-3, atol=1e-5)

    # RL (TRL GRPO's own data parallelism): TRL's sampler gave each rank its own prompt of the step (one per process)
    # and each rank scored it, both ran the same steps (a rank's wrapper stopping early or waiting would hang the launch), rank 0 alone logged and saved.
    # (The tiny model's rewrites are all truncated, so R is flat and GRPO's advantages are 0: RL weights do not move
    # here and comparing them would prove nothing; the closed-form run above is the gradient-sync check.)
    s0, s1 = (set(rep["scored"]) for rep in rl_reports)
    assert len(s0) == len(s1) == 1 and s0 != s1 and s0 | s1 <= {e.prompt for e in EXAMPLES[:4]}
    assert [rep["train"]["steps"] for rep in rl_reports] == [1, 1]
    rl_steps = [r["step"] for r in read_log(rl / "log.jsonl") if r["event"] == "step"]
    assert rl_steps == [1] and (rl / "adapter" / "adapter_config.json").is_file()


def test_ranks_shard_and_rotate() -> None:
    from alignpro.training.dist import Dist

    rows = [Example(f"p{i}", f"x{i}", "benign") for i in range(5)]
    assert [e.id for e in Dist(1, 2).shard(rows)] == ["p1", "p3"]
    assert Dist(1, 2).rotate(["a", "b", "c"]) == ["b", "c", "a"] and Dist(3, 4).rotate(["a", "b"]) == [
        "b",
        "a",
    ]
    assert Dist(1, 2).rank_file(Path("o/frozen_cache.jsonl")) == Path("o/frozen_cache.rank1.jsonl")
    assert Dist().rank_file(Path("o/log.jsonl")) == Path("o/log.jsonl")


def test_paper_configs_parse() -> None:
    """The shipped paper-scale configs load as trainer settings and as an accelerate config (no model is loaded:
    they name a prompter folder and vLLM replicas that exist only on a GPU box)."""
    from accelerate.commands.config.config_args import load_config_from_file

    from alignpro.training.config import load_config

    root = Path(__file__).parents[3] / "configs"
    closed, rl = load_config(root / "paper-closed-form.yaml"), load_config(root / "paper-rl.yaml")
    assert (closed.trainer, rl.trainer) == ("closed-form", "rl")
    for cfg in (closed, rl):
        assert cfg.frozen_engine == "openai" and len(cfg.frozen_urls) == 4 and cfg.train_limit is None
    layout = load_config_from_file(str(root / "accelerate-4gpu.yaml"))
    assert layout.num_processes == len(str(layout.gpu_ids).split(",")) and str(layout.mixed_precision) == "no"
