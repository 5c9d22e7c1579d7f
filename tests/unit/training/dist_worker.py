"""One rank of the multi-process training test (``test_distributed.py``), run by ``accelerate launch``.

``python dist_worker.py CONFIG.json [RL_CONFIG.json]``: trains the closed-form config through the real pipeline (then
the RL one, given), with a deterministic reward that also records, per rank, which requests this rank scored. Spies
around the trainers (they call the real ones) write this rank's final trainable weights to
``<output_dir>/weights.rank<N>.pt``, and the run's report to ``<output_dir>/report.rank<N>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from alignpro.prompter.validate import OutputValidator
from alignpro.training import closed_form as cf
from alignpro.training import pipeline
from alignpro.training.config import make_config
from alignpro.training.dist import Dist


def save_weights(model: Any, out_dir: Path, rank: int) -> None:
    state = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    torch.save(state, out_dir / f"weights.rank{rank}.pt")


def train_one(raw: dict[str, Any], rank: int) -> None:
    cfg = make_config(raw)
    out = Path(cfg.output_dir)
    scored: list[str] = []

    def reward(prompts: list[str], completions: list[str], **kw: Any) -> list[float]:
        """Longer answers score higher (saturating); notes the requests this rank scored."""
        scored.extend(prompts)
        return [min(len(c), 200) / 200 for c in completions]

    real_cf, real_rl = cf.train_closed_form, pipeline.train_rl

    def cf_spy(c: Any, policy: cf.Policy, *a: Any, **kw: Any) -> dict[str, Any]:
        summary = real_cf(c, policy, *a, **kw)
        save_weights(policy.model, out, rank)
        return summary

    def rl_spy(*a: Any, **kw: Any) -> tuple[Any, dict[str, Any]]:
        model, summary = real_rl(*a, **kw)
        save_weights(model, out, rank)
        return model, summary

    cf.train_closed_form, pipeline.train_rl = cf_spy, rl_spy  # type: ignore[assignment]
    try:
        # random tiny models write gibberish: no topic check, so that their rewrites are served and scored
        report = pipeline.run(
            cfg,
            reward_fn=reward,
            progress=False,
            command="test",
            validator=OutputValidator(min_similarity=0.0),
        )
    finally:
        cf.train_closed_form, pipeline.train_rl = real_cf, real_rl
    report["scored"] = sorted(set(scored))
    (out / f"report.rank{rank}.json").write_text(json.dumps(report))


def main() -> None:
    rank = Dist.current().rank
    for path in sys.argv[1:]:
        train_one(json.loads(Path(path).read_text()), rank)


if __name__ == "__main__":
    main()
