"""The metric and report layer of ``alignpro eval``: hand-computed cases, statistical checks on synthetic data
with known answers, and the files a report consists of."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from alignpro.eval.report import MEAN_PNG, REPORT_MD, RESULTS_JSON, VARIANCE_PNG, write_report
from alignpro.eval.stats import (
    ALL,
    EvalRecord,
    bootstrap_ci,
    bootstrap_grouped_ci,
    bootstrap_win_rate_ci,
    combine_judge_orders,
    cost_summary,
    judge_win_rate,
    kl_estimate,
    kl_per_sample,
    mean,
    pair_by_prompt,
    pairwise_outcomes,
    per_prompt_means,
    pooled_mean_variance,
    prompt_mean_variance,
    safe_rate,
    safe_rate_by_kind,
    summarize,
    variance,
    win_rate,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ hand-computed cases
def test_win_rate_ties_count_half() -> None:
    a, b = [1.0, 0.5, 0.0], [0.0, 0.5, 1.0]
    assert pairwise_outcomes(a, b, tie_tol=0.1).tolist() == [1.0, 0.5, 0.0]
    assert win_rate(a, b, tie_tol=0.1) == 0.5
    assert win_rate(a, b) == 0.5  # an exact tie is a tie without tolerance too


def test_tie_tolerance_turns_small_differences_into_ties() -> None:
    a, b = [0.52, 0.7, 0.1], [0.5, 0.5, 0.5]
    assert win_rate(a, b) == pytest.approx(2 / 3)
    assert win_rate(a, b, tie_tol=0.05) == pytest.approx(0.5)
    assert win_rate(a, b, tie_tol=1.0) == 0.5
    with pytest.raises(ValueError):
        win_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        win_rate(a, b, tie_tol=-0.1)


def test_pair_by_prompt_keeps_common_prompts() -> None:
    ids, a, b = pair_by_prompt({"p1": 1.0, "p2": 2.0, "p3": 3.0}, {"p3": 0.0, "p1": 5.0})
    assert ids == ["p1", "p3"]
    assert a.tolist() == [1.0, 3.0]
    assert b.tolist() == [5.0, 0.0]


def test_mean_and_variance_small_list() -> None:
    assert mean([1, 2, 3, 4]) == 2.5
    assert variance([1, 2, 3, 4]) == pytest.approx(5 / 3)  # sample variance: sum of squares 5 over n-1
    assert variance([1, 2, 3, 4], ddof=0) == pytest.approx(1.25)
    assert math.isnan(variance([3.0]))
    with pytest.raises(ValueError):
        mean([])
    with pytest.raises(ValueError):
        mean([1.0, math.nan])


def test_per_sample_and_per_prompt_views() -> None:
    groups = [[1.0, 3.0], [5.0, 7.0]]
    m, v = pooled_mean_variance(groups)
    assert (m, v) == (pytest.approx(4.0), pytest.approx(20 / 3))  # var of 1,3,5,7
    m, v = prompt_mean_variance(groups)
    assert (m, v) == (pytest.approx(4.0), pytest.approx(8.0))  # var of the means 2 and 6
    assert per_prompt_means(["a", "b", "a", "b"], [1.0, 5.0, 3.0, 7.0]) == {"a": 2.0, "b": 6.0}


def test_judge_both_orders_cancel_position_bias() -> None:
    ab = [1.0, 1.0, 0.5, math.nan, 0.0]
    ba = [1.0, 0.0, 0.5, 0.0, math.nan]
    # (1 + 0)/2, (1 + 1)/2, (0.5 + 0.5)/2, only b-first: 1 - 0, only a-first: 0
    assert combine_judge_orders(ab, ba).tolist() == [0.5, 1.0, 0.5, 1.0, 0.0]
    assert judge_win_rate(ab, ba) == pytest.approx(0.6)
    # A judge that always prefers whatever it sees first says nothing about A or B: exactly 1/2.
    assert judge_win_rate([1.0] * 5, [1.0] * 5) == 0.5
    assert judge_win_rate([1.0, 0.0, 0.5]) == 0.5
    with pytest.raises(ValueError):
        combine_judge_orders([0.7], [1.0])
    with pytest.raises(ValueError):
        combine_judge_orders([math.nan], [math.nan])


def test_safe_rates() -> None:
    kinds = ["harmful", "benign", "harmful", "benign", "benign"]
    safe = [True, False, None, True, False]
    assert safe_rate(safe) == 0.5
    assert safe_rate([None, None]) is None
    assert safe_rate_by_kind(kinds, safe) == {"harmful": 1.0, "benign": pytest.approx(1 / 3)}


def test_cost_summary() -> None:
    c = cost_summary([10.0, 20.0, 30.0, None, 40.0], [5, None, 15, 25, 35])
    assert c["prompter_ms"] == {"n": 4, "mean": 25.0, "p50": 25.0, "p95": pytest.approx(38.5)}
    assert c["prompter_tokens"]["mean"] == 20.0
    assert cost_summary([None], [None])["prompter_ms"] == {"n": 0, "mean": None, "p50": None, "p95": None}


def test_record_validation() -> None:
    ok = EvalRecord("m", "p", "benign", 0, 1)
    assert ok.reward == 1.0 and isinstance(ok.reward, float)
    with pytest.raises(ValueError):
        EvalRecord("m", "p", "benign", 0, math.nan)
    with pytest.raises(ValueError):
        EvalRecord("m", "p", ALL, 0, 1.0)
    with pytest.raises(ValueError):
        EvalRecord("m", "p", "benign", 0, 1.0, judge_ab=0.7)
    with pytest.raises(ValueError):
        EvalRecord("m", "p", "benign", 0, 1.0, logp_theta=(-1.0, -2.0), logp_ref=(-1.0,))
    with pytest.raises(ValueError):
        EvalRecord("m", "p", "benign", 0, 1.0, constraint_pass=1.5)
    with pytest.raises(ValueError):
        EvalRecord("m", "p", "benign", 0, 1.0, safe=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        EvalRecord("m", "p", "benign", 0, 1.0, changed="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        EvalRecord.from_dict(
            {"method": "m", "prompt_id": "p", "kind": "b", "sample": 0, "reward": 1.0, "refused": True}
        )
    numpy_true: Any = np.bool_(True)  # what a runner computing flags with numpy hands in
    flags = EvalRecord("m", "p", "benign", 0, 1.0, safe=numpy_true, constraint_pass=1, changed=False)
    assert (flags.safe, flags.constraint_pass, flags.changed) == (True, 1.0, False)
    rec = EvalRecord("m", "p", "b", 1, 0.5, logp_theta=[-1.0], logp_ref=[-2.0])
    assert EvalRecord.from_dict(rec.to_dict()) == rec


# ------------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_ci_contains_true_mean_and_variance() -> None:
    rng = np.random.default_rng(12345)
    x = rng.normal(2.0, 1.5, size=300)
    lo, hi = bootstrap_ci(x, "mean", seed=1)
    assert lo < 2.0 < hi
    assert lo < x.mean() < hi
    lo, hi = bootstrap_ci(x, "variance", seed=1)
    assert lo < 2.25 < hi
    # Seeded: the same seed gives the same interval, another seed a (slightly) different one.
    assert bootstrap_ci(x, seed=7) == bootstrap_ci(x, seed=7)
    assert bootstrap_ci(x, seed=7) != bootstrap_ci(x, seed=8)


def test_bootstrap_width_shrinks_with_n() -> None:
    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 1600):
        x = rng.normal(0.0, 1.0, size=n)
        lo, hi = bootstrap_ci(x, n_resamples=2000)
        widths.append(hi - lo)
        # For a mean of normal data the 95% percentile interval is close to mean +- 1.96 standard errors.
        assert hi - lo == pytest.approx(2 * 1.96 * x.std(ddof=1) / math.sqrt(n), rel=0.08)
    # The width scales as 1/sqrt(n): 16x the data, about a quarter of the width.
    assert 3.0 < widths[0] / widths[1] < 5.3


def test_bootstrap_coverage_is_near_nominal() -> None:
    rng = np.random.default_rng(2024)
    trials, hits = 200, 0
    for t in range(trials):
        lo, hi = bootstrap_ci(rng.exponential(1.0, size=60), n_resamples=400, seed=t)
        hits += lo <= 1.0 <= hi
    # 95% nominal; the percentile bootstrap under-covers a little on small skewed samples.
    assert 0.86 <= hits / trials <= 0.99


def test_grouped_bootstrap_resamples_prompts_not_responses() -> None:
    rng = np.random.default_rng(5)
    # Responses to one prompt are alike (prompt effect sd 1, response noise sd 0.1): 8 responses per prompt carry
    # little more information than one, and an honest interval must say so.
    groups = [rng.normal(0.0, 1.0) + rng.normal(0.0, 0.1, size=8) for _ in range(100)]
    lo, hi = bootstrap_grouped_ci(groups, "mean", seed=3)
    naive_lo, naive_hi = bootstrap_ci(np.concatenate(groups), "mean", seed=3)
    assert lo < 0.0 < hi
    assert (hi - lo) > 2.0 * (naive_hi - naive_lo)
    # The per-prompt view of the same data gives the same mean interval up to resampling noise.
    p_lo, p_hi = bootstrap_grouped_ci(groups, "mean", view="prompt", seed=3)
    assert p_lo == pytest.approx(lo, abs=0.05) and p_hi == pytest.approx(hi, abs=0.05)
    v_lo, v_hi = bootstrap_grouped_ci(groups, "variance", seed=3)
    assert v_lo < pooled_mean_variance(groups)[1] < v_hi


def test_grouped_bootstrap_of_single_responses_is_the_plain_bootstrap() -> None:
    # One response per prompt: resampling prompts is resampling values, and the same seed draws the same
    # indices, so both routes must give the same interval (the grouped one works from sufficient statistics).
    x = np.random.default_rng(6).gamma(2.0, 3.0, size=40) - 50.0
    for stat in ("mean", "variance"):
        grouped = bootstrap_grouped_ci([[v] for v in x], stat, seed=4, n_resamples=500)
        plain = bootstrap_ci(x, stat, seed=4, n_resamples=500)
        assert grouped == pytest.approx(plain, rel=1e-9)


def test_grouped_variance_interval_follows_the_view() -> None:
    rng = np.random.default_rng(8)
    # No prompt effect, response noise sd 1: responses vary with variance 1, prompt means (of 8) with 1/8.
    groups = [rng.normal(0.0, 1.0, size=8) for _ in range(200)]
    lo, hi = bootstrap_grouped_ci(groups, "variance", view="sample", seed=1)
    assert lo < 1.0 < hi and lo > 0.5
    lo, hi = bootstrap_grouped_ci(groups, "variance", view="prompt", seed=1)
    assert lo < 1 / 8 < hi and hi < 0.5


def test_win_rate_bootstrap_contains_true_probability() -> None:
    rng = np.random.default_rng(11)
    b = rng.normal(0.0, 1.0, size=500)
    a = rng.normal(0.3, 1.0, size=500)
    p_true = 0.5 * (1.0 + math.erf(0.3 / 2.0))  # P(N(0.3, 2) > 0) = Phi(0.3 / sqrt 2)
    lo, hi = bootstrap_win_rate_ci(a, b, seed=2)
    assert 0.0 <= lo < p_true < hi <= 1.0
    assert lo <= win_rate(a, b) <= hi


# -------------------------------------------------------------------------------------------------- KL
def _exact_kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum(p * np.log(p / q)))


def _sample_logprobs(
    p: np.ndarray, q: np.ndarray, n: int, length: int, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    tokens = rng.choice(p.size, size=(n, length), p=p)
    return list(np.log(p)[tokens]), list(np.log(q)[tokens])


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_estimators_match_exact_categorical_kl(estimator: str) -> None:
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.2, 0.3, 0.5])
    length = 5  # independent tokens: the sequence KL is length times the per-token KL
    exact = length * _exact_kl(p, q)
    lt, lr = _sample_logprobs(p, q, n=4000, length=length, seed=9)
    per = kl_per_sample(lt, lr, estimator=estimator)  # type: ignore[arg-type]
    se = per.std(ddof=1) / math.sqrt(per.size)
    assert abs(per.mean() - exact) < 4 * se
    assert kl_estimate(lt, lr, estimator=estimator) == pytest.approx(per.mean())  # type: ignore[arg-type]


def test_k3_is_non_negative_and_lower_variance_when_close() -> None:
    p = np.array([0.4, 0.35, 0.25])
    q = np.array([0.35, 0.35, 0.3])
    lt, lr = _sample_logprobs(p, q, n=3000, length=8, seed=4)
    k1 = kl_per_sample(lt, lr, estimator="k1")
    k3 = kl_per_sample(lt, lr, estimator="k3")
    assert (k1 < 0).any()  # k1 single estimates can be negative
    assert (k3 >= 0).all()
    assert k3.std() < 0.5 * k1.std()
    assert kl_estimate([[-1.0, -2.0]], [[-1.0, -2.0]], estimator="k3") == 0.0


# ------------------------------------------------------------------------------------------- summarize
def _records() -> list[dict[str, Any]]:
    """Four prompts (two benign, two harmful), two samples each, baseline listed last on purpose."""
    rows: list[dict[str, Any]] = []
    kinds = {"p1": "benign", "p2": "benign", "p3": "harmful", "p4": "harmful"}
    aligned = {"p1": [1.0, 1.0], "p2": [1.0, 1.0], "p3": [0.0, 0.0], "p4": [1.0, 1.0]}
    none = {"p1": [0.0, 0.0], "p2": [1.0, 1.0], "p3": [0.0, 0.5], "p4": [1.0, 0.0]}
    safe = {"p1": [False, False], "p2": [False, False], "p3": [True, True], "p4": [True, False]}
    passed: dict[str, list[float | None]] = {
        "p1": [1.0, 0.5],
        "p2": [None, None],
        "p3": [None, None],
        "p4": [None, None],
    }
    changed = {"p1": True, "p2": False, "p3": True, "p4": True}
    ms = iter([10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0])
    for pid, rewards in aligned.items():
        for s, r in enumerate(rewards):
            rows.append(
                {
                    "method": "alignpro",
                    "prompt_id": pid,
                    "kind": kinds[pid],
                    "sample": s,
                    "reward": r,
                    "safe": safe[pid][s],
                    "constraint_pass": passed[pid][s],
                    "changed": changed[pid],
                    "prompter_ms": next(ms),
                    "prompter_tokens": 12,
                }
            )
    rows[0].update(judge_ab=1.0, judge_ba=0.0, logp_theta=[-1.0, -2.0], logp_ref=[-1.5, -2.5])
    rows[1].update(judge_ab=1.0)
    rows[2].update(judge_ab=0.5, judge_ba=0.5, logp_theta=[-1.0], logp_ref=[-1.0])
    for pid, rewards in none.items():
        for s, r in enumerate(rewards):
            rows.append(
                {
                    "method": "none",
                    "prompt_id": pid,
                    "kind": kinds[pid],
                    "sample": s,
                    "reward": r,
                    "changed": False,
                }
            )
    return rows


def test_summarize_small_synthetic() -> None:
    summary = summarize(_records(), n_resamples=300, seed=0)
    json.dumps(summary, allow_nan=False)  # JSON-serialisable, no NaN
    assert summary["methods"] == ["none", "alignpro"]
    assert summary["kinds"] == ["benign", "harmful"]
    assert summary["warnings"] == []

    a = summary["results"]["alignpro"]
    assert (a[ALL]["n_prompts"], a[ALL]["n_samples"]) == (4, 8)
    assert a[ALL]["mean"] == pytest.approx(0.75)
    assert a[ALL]["variance"] == pytest.approx(1.5 / 7)  # six 1s and two 0s, sample variance
    lo, hi = a[ALL]["mean_ci"]
    assert lo <= 0.75 <= hi
    # Per prompt: p1 win (1 vs 0), p2 tie (1 vs 1), p3 loss (0 vs 0.25), p4 win (1 vs 0.5).
    wr = a[ALL]["win_rate"]
    assert wr["value"] == pytest.approx(0.625)
    assert (wr["n_pairs"], wr["wins"], wr["ties"], wr["losses"]) == (4, 2, 1, 1)
    assert wr["ci"][0] <= 0.625 <= wr["ci"][1]
    assert a["benign"]["win_rate"]["value"] == pytest.approx(0.75)
    assert a["harmful"]["win_rate"]["value"] == pytest.approx(0.5)
    # Judge: p1's two samples combine to 1 and 1, p2's to 0.5; mean over prompts.
    jw = a[ALL]["judge_win_rate"]
    assert jw["value"] == pytest.approx(0.75)
    assert (jw["n_prompts"], jw["n_verdicts"], jw["n_both_orders"]) == (2, 3, 2)
    assert a["harmful"]["safe_rate"] == pytest.approx(0.75)  # the safe-response rate
    assert a["benign"]["safe_rate"] == 0.0  # the refusal rate
    # Constraints: only p1 has any; its two answers pass 1 and 0.5 of them.
    cp = a["benign"]["constraint_pass"]
    assert (cp["value"], cp["n_prompts"], cp["n_samples"]) == (0.75, 1, 2)
    assert a["harmful"]["constraint_pass"] is None
    # Ties are not wins: p2, the tie, is the prompt the method left alone.
    assert a["benign"]["prompts_changed"] == {"changed": 1, "n_prompts": 2}
    assert a["harmful"]["prompts_changed"] == {"changed": 2, "n_prompts": 2}
    assert a[ALL]["prompts_changed"] == {"changed": 3, "n_prompts": 4}
    assert a[ALL]["cost"]["prompter_ms"]["mean"] == pytest.approx(45.0)
    assert a[ALL]["cost"]["prompter_tokens"]["p50"] == 12.0
    kl = a[ALL]["kl"]
    assert kl["value"] == pytest.approx(0.5)  # p1: 0.5 + 0.5, p2: 0; mean over the two prompts
    assert kl["k3"] == pytest.approx(math.expm1(-0.5) + 0.5)  # p1: 2 * (e^-0.5 - 1 + 0.5), p2: 0; halved

    n = summary["results"]["none"]
    assert n[ALL]["win_rate"] is None and n[ALL]["judge_win_rate"] is None and n[ALL]["kl"] is None
    assert n[ALL]["mean"] == pytest.approx(3.5 / 8)  # 0, 0, 1, 1, 0, 0.5, 1, 0
    assert n[ALL]["safe_rate"] is None and n[ALL]["constraint_pass"] is None
    assert n[ALL]["prompts_changed"] == {"changed": 0, "n_prompts": 4}
    assert n[ALL]["cost"]["prompter_ms"]["mean"] is None

    assert summarize(_records(), n_resamples=300, seed=0) == summary  # reproducible


def test_summarize_per_prompt_view_and_errors() -> None:
    summary = summarize(_records(), view="prompt", n_resamples=100)
    # Prompt means of the baseline: 0, 1, 0.25, 0.5 -> sample variance over prompts.
    assert summary["results"]["none"][ALL]["variance"] == pytest.approx(variance([0.0, 1.0, 0.25, 0.5]))

    rows = _records()
    with pytest.raises(ValueError, match="duplicate"):
        summarize([*rows, rows[0]])
    with pytest.raises(ValueError, match="kinds"):
        summarize([*rows, {**rows[0], "sample": 9, "kind": "harmful"}])
    alone = summarize([r for r in rows if r["method"] == "alignpro"], n_resamples=100)
    assert alone["warnings"] and alone["results"]["alignpro"][ALL]["win_rate"] is None


# ---------------------------------------------------------------------------------------------- report
def test_write_report_writes_json_markdown_and_charts(tmp_path: Path) -> None:
    summary = summarize(_records(), n_resamples=200)
    config = {"frozen_model": "smollm2", "samples_per_prompt": 2, "out": tmp_path}
    out = tmp_path / "run"
    write_report(summary, config, out)

    results = json.loads((out / RESULTS_JSON).read_text())
    assert results["config"] == {"frozen_model": "smollm2", "samples_per_prompt": 2, "out": str(tmp_path)}
    assert results["summary"]["results"]["alignpro"][ALL]["mean"] == pytest.approx(0.75)
    assert results["summary"]["settings"]["n_resamples"] == 200

    md = (out / REPORT_MD).read_text()
    assert (
        "| method | mean reward [95% CI] | variance [95% CI] | win rate vs none [95% CI] | W/T/L vs none "
        "| changed harmful | changed benign | safe-response rate harmful | refusal rate benign "
        "| constraint pass benign [95% CI] | prompter ms | KL to reference | judge win rate vs none [95% CI] |"
    ) in md
    assert "| W/T/L vs none | changed | judge win rate vs none [95% CI] | safe-response / refusal rate " in md
    assert results["columns"]["main"][5:9] == [
        "changed harmful",
        "changed benign",
        "safe-response rate harmful",
        "refusal rate benign",
    ]
    row = next(line for line in md.splitlines() if line.startswith("| `alignpro`"))
    lo, hi = summary["results"]["alignpro"][ALL]["mean_ci"]
    assert f"0.750 [{lo:.3f}, {hi:.3f}]" in row
    assert "0.214 [" in row  # variance 1.5 / 7
    assert "62.5% [" in row  # win rate
    # W/T/L, changed harmful and benign, safe-response and refusal rates, constraint pass (one prompt: no spread)
    assert "| 2/1/1 | 2/2 | 1/2 | 75.0% | 0.0% | 75.0% [75.0%, 75.0%] |" in row
    assert "45.0 (p95 " in row  # prompter ms
    assert "0.500" in row  # KL
    assert "## Kind `harmful`" in md and "## Kind `benign`" in md

    for name in (MEAN_PNG, VARIANCE_PNG):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
