"""What a training run leaves in its output folder, besides checkpoints (:mod:`alignpro.training.closed_form` or
TRL's): the JSON-lines log (:class:`JsonlLog`, :func:`read_log`), its curves (:func:`plot_curves`), and the
adapter's ``alignpro.json`` (:func:`write_adapter_meta`)."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignpro import __version__, embedded
from alignpro.prompter.version import ADAPTER_META, adapter_fingerprint, instruction_digest
from alignpro.training.data import Example, data_hash

DEV_KEYS = (
    "n",
    "none",
    "reference",
    "trained",
    "optimal",
    "kl_trained_vs_reference",
    "trained_minus_reference",
)
CURVES = (("reward", "reward (R estimate)"), ("kl", "KL(rho_theta || rho_ref)"), ("loss", "loss"))


class JsonlLog:
    """Appends one JSON object a line to ``path``, each stamped with the time (``echo``: also to stderr)."""

    def __init__(self, path: Path, echo: bool = False) -> None:
        self.path = path
        self.echo = echo
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, rec: dict[str, Any]) -> None:
        rec = {"time": round(time.time(), 3), **rec}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        if self.echo:
            print(json.dumps(rec), file=sys.stderr)


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_curves(log_path: Path, out: Path, title: str = "") -> Path | None:
    """reward, KL (to rho_ref) and loss against the step, from ``log.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in read_log(log_path) if r.get("event") == "step"]
    if not recs:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, label) in zip(axes, CURVES, strict=True):
        pts = [(r["step"], r[key]) for r in recs if key in r and r[key] is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="." if len(pts) < 40 else None)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def base_model_name(spec: str) -> str:
    """The hub id of the embedded model for any of its names; other specs unchanged."""
    if spec in (embedded.EMBEDDED, embedded.DEFAULT_MODEL.name, embedded.DEFAULT_MODEL.served_name):
        return embedded.DEFAULT_MODEL.served_name
    return spec


def write_adapter_meta(
    adapter_dir: Path, cfg: Any, train: Sequence[Example], report: dict[str, Any], command: str
) -> None:
    """``adapter_dir/alignpro.json`` (base model, lam, reward, contract, data hash, metrics, the command line),
    and a portable ``adapter_config.json``; nothing when there is no adapter folder."""
    if not adapter_dir.is_dir():
        return
    dev = report.get("dev", {})
    metrics = {
        "train": report.get("train", {}),
        "dev": {k: dev[k] for k in DEV_KEYS if k in dev},
    }
    meta = {
        "format": "alignpro-prompter/1",
        "base_model": base_model_name(cfg.base_model),
        "trainer": cfg.trainer,
        "lam": cfg.lam,
        "reward": cfg.reward,
        "contract": cfg.contract,
        "instruction": instruction_digest(cfg.contract),
        "data": list(cfg.data),
        "data_hash": data_hash(train),
        "train_size": len(train),
        "metrics": metrics,
        "command": command,
        "config": dataclasses.asdict(cfg),
        "alignpro_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # A portable adapter: name the base model by its hub id rather than this machine's cache path.
    cfg_path = adapter_dir / "adapter_config.json"
    if cfg_path.is_file():
        acfg = json.loads(cfg_path.read_text())
        acfg["base_model_name_or_path"] = meta["base_model"]
        cfg_path.write_text(json.dumps(acfg, indent=2))
    meta["fingerprint"] = adapter_fingerprint(adapter_dir)
    (adapter_dir / ADAPTER_META).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    for f in adapter_dir.iterdir():
        f.chmod(0o644)
