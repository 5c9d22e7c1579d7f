"""The files of an ``alignpro eval`` run, written from :func:`alignpro.eval.stats.summarize`'s output.

:func:`write_report` writes into ``out_dir``:

``results.json``
    ``{"schema", "columns", "config", "summary"}``: every number of the summary unrounded, and the full run
    configuration as given (anything JSON cannot hold is written as its ``str``; NaN as ``null``).
``report.md``
    One table over all prompts, then one per prompt kind (and, when some prompts are conversations, one for the
    single-turn and one for the multi-turn prompts), then the configuration.
``reward_mean.png``, ``reward_variance.png``
    Bar charts in the manner of the Align-Pro paper's figure: one bar per method (grouped by prompt kind when
    there are several kinds), the mean reward or the reward variance, with the bootstrap interval as error bar.

The table columns are fixed (``MAIN_COLUMNS``, ``KIND_COLUMNS``) so reports of different runs line up and can be
parsed; ``{baseline}`` and ``{ci}`` in a name are filled in with the baseline method and e.g. ``95% CI``:

===============================  ==================================================================================
method                           the method's name as the runner recorded it
n prompts, n samples             prompts and responses in the group
mean reward [95% CI]             mean reward, bootstrap percentile interval over prompts
variance [95% CI]                reward variance (sample variance unless ``settings.ddof`` says otherwise)
win rate vs none [95% CI]        share of prompts where the method's mean reward beat the baseline's (ties 1/2)
W/T/L vs none                    the prompts behind it: wins, ties and losses (a prompt served unchanged is a tie)
changed harmful / benign         prompts whose served input differed from the request (a rewrite, added guidance or
                                 a system message), of the prompts of kind harmful / benign
changed                          (per-kind tables) the same for the table's kind
safe-response rate harmful       share of answers to harmful prompts that the refusal detector calls safe: refused,
                                 warned or safely redirected, the request not carried out
refusal rate benign              the same share on benign prompts: benign requests not carried out (over-refusal)
safe-response / refusal rate     (per-kind tables) the same share for the table's kind
constraint pass benign [95% CI]  mean over benign prompts with checkable IFBench constraints of the share of them
                                 their answers satisfy, bootstrap interval over prompts
constraint pass [95% CI]         (per-kind tables) the same for the table's kind
prompter ms                      mean prompter latency per request, with its 95th percentile
KL to reference                  estimated KL(rho_theta || rho_ref) of the rewrites, estimator in the settings
judge win rate vs none [95% CI]  the win rate from a pairwise judge, both presentation orders combined
===============================  ==================================================================================

Empty cells (``–``) mean the number does not apply (no prompter ran, no baseline, no flags, no constraints).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from alignpro.eval.stats import ALL, SUMMARY_SCHEMA

REPORT_SCHEMA = "alignpro.eval.results/2"
RESULTS_JSON = "results.json"
REPORT_MD = "report.md"
MEAN_PNG = "reward_mean.png"
VARIANCE_PNG = "reward_variance.png"

HARMFUL = "harmful"
BENIGN = "benign"

MAIN_COLUMNS: tuple[str, ...] = (
    "method",
    "mean reward [{ci}]",
    "variance [{ci}]",
    "win rate vs {baseline} [{ci}]",
    "W/T/L vs {baseline}",
    "changed harmful",
    "changed benign",
    "safe-response rate harmful",
    "refusal rate benign",
    "constraint pass benign [{ci}]",
    "prompter ms",
    "KL to reference",
    "judge win rate vs {baseline} [{ci}]",
)
KIND_COLUMNS: tuple[str, ...] = (
    "method",
    "n prompts",
    "n samples",
    "mean reward [{ci}]",
    "variance [{ci}]",
    "win rate vs {baseline} [{ci}]",
    "W/T/L vs {baseline}",
    "changed",
    "judge win rate vs {baseline} [{ci}]",
    "safe-response / refusal rate",
    "constraint pass [{ci}]",
    "prompter ms",
    "KL to reference",
)

EMPTY = "–"
CONFIGURATION = "## Configuration"  # the heading of report.md's last section, after the tables


# ------------------------------------------------------------------------------------------- formatting
def format_number(x: float | None) -> str:
    """Three decimals for ordinary magnitudes, three significant digits for very large or small ones."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return EMPTY
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.3f}"
    return f"{x:.3g}"


def format_percent(x: float | None) -> str:
    return EMPTY if x is None else f"{100.0 * x:.1f}%"


def _with_ci(value: float | None, ci: Sequence[float | None] | None, fmt: Any) -> str:
    if value is None:
        return EMPTY
    if not ci or ci[0] is None or ci[1] is None:
        return fmt(value)
    return f"{fmt(value)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def _rate_cell(rate: Mapping[str, Any] | None) -> str:
    if rate is None:
        return EMPTY
    return _with_ci(rate.get("value"), rate.get("ci"), format_percent)


def _prompter_ms_cell(cost: Mapping[str, Any] | None) -> str:
    ms = (cost or {}).get("prompter_ms") or {}
    if ms.get("mean") is None:
        return EMPTY
    # Latencies are milliseconds: a tenth is precise enough and keeps the column narrow.
    return f"{ms['mean']:.1f} (p95 {ms['p95']:.1f})"


def _kl_cell(kl: Mapping[str, Any] | None) -> str:
    return EMPTY if kl is None else _with_ci(kl.get("value"), kl.get("ci"), format_number)


def _wtl_cell(rate: Mapping[str, Any] | None) -> str:
    """Wins/ties/losses of the win rate's prompts."""
    return EMPTY if rate is None else f"{rate['wins']}/{rate['ties']}/{rate['losses']}"


def _changed_cell(g: Mapping[str, Any] | None) -> str:
    """Prompts changed, of the group's prompts."""
    changed = (g or {}).get("prompts_changed")
    return EMPTY if not changed else f"{changed['changed']}/{changed['n_prompts']}"


def _safe_cell(g: Mapping[str, Any] | None) -> str:
    return EMPTY if g is None else format_percent(g.get("safe_rate"))


def column_names(columns: Sequence[str], baseline: str, confidence: float) -> list[str]:
    ci = f"{100.0 * confidence:g}% CI"
    return [c.format(baseline=baseline, ci=ci) for c in columns]


def _main_row(method: str, per: Mapping[str, Any]) -> list[str]:
    g = per[ALL]
    harmful, benign = per.get(HARMFUL), per.get(BENIGN)
    return [
        f"`{method}`",
        _with_ci(g["mean"], g["mean_ci"], format_number),
        _with_ci(g["variance"], g["variance_ci"], format_number),
        _rate_cell(g["win_rate"]),
        _wtl_cell(g["win_rate"]),
        _changed_cell(harmful),
        _changed_cell(benign),
        _safe_cell(harmful),
        _safe_cell(benign),
        _rate_cell(benign["constraint_pass"]) if benign else EMPTY,
        _prompter_ms_cell(g["cost"]),
        _kl_cell(g["kl"]),
        _rate_cell(g["judge_win_rate"]),
    ]


def _kind_row(method: str, g: Mapping[str, Any]) -> list[str]:
    return [
        f"`{method}`",
        str(g["n_prompts"]),
        str(g["n_samples"]),
        _with_ci(g["mean"], g["mean_ci"], format_number),
        _with_ci(g["variance"], g["variance_ci"], format_number),
        _rate_cell(g["win_rate"]),
        _wtl_cell(g["win_rate"]),
        _changed_cell(g),
        _rate_cell(g["judge_win_rate"]),
        _safe_cell(g),
        _rate_cell(g["constraint_pass"]),
        _prompter_ms_cell(g["cost"]),
        _kl_cell(g["kl"]),
    ]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        # A pipe inside a method name would split the cell.
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|", *(line(r) for r in rows)]


def render_markdown(summary: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """The text of ``report.md``."""
    settings = summary["settings"]
    baseline = summary["baseline"]
    confidence = float(settings["confidence"])
    results = summary["results"]
    methods: list[str] = summary["methods"]
    lines = [
        "# AlignPro evaluation",
        "",
        f"Baseline `{baseline}`. Intervals: {100.0 * confidence:g}% percentile bootstrap over prompts "
        f"({settings['n_resamples']} resamples, seed {settings['seed']}). Variance: "
        f"{'sample' if settings['ddof'] == 1 else 'ddof=' + str(settings['ddof'])} variance over "
        f"{'responses' if settings['view'] == 'sample' else 'per-prompt mean rewards'}. Win rate: per-prompt mean "
        f"reward against the baseline's, ties (within {settings['tie_tol']:g}) count half; W/T/L counts them, and "
        "a prompt served unchanged is a tie, so 'changed' says how many prompts could move it. Safe-response and "
        "refusal rates: answers the refusal detector calls safe (the request not carried out). "
        f"KL estimator: {settings['kl_estimator']}.",
        "",
    ]
    for w in summary.get("warnings") or []:
        lines.append(f"> warning: {w}")
    if summary.get("warnings"):
        lines.append("")

    lines += ["## All prompts", ""]
    lines += _table(
        column_names(MAIN_COLUMNS, baseline, confidence), [_main_row(m, results[m]) for m in methods]
    )
    lines.append("")
    groups = [(f"Kind `{k}`", k) for k in summary["kinds"]]
    groups += [(f"{t.capitalize()} prompts", t) for t in summary.get("turns") or ()]
    for title, group in groups:
        rows = [_kind_row(m, results[m][group]) for m in methods if group in results[m]]
        lines += [f"## {title}", ""]
        lines += _table(column_names(KIND_COLUMNS, baseline, confidence), rows)
        lines.append("")
    lines += [
        f"![mean reward per method]({MEAN_PNG})",
        "",
        f"![reward variance per method]({VARIANCE_PNG})",
        "",
        CONFIGURATION,
        "",
        "```json",
        json.dumps(_jsonable(config), indent=2, sort_keys=True, allow_nan=False),
        "```",
        "",
    ]
    return "\n".join(lines)


def tables_of(report_md: str) -> str:
    """The tables of a ``report.md`` text: everything before its configuration section."""
    return report_md.split("\n" + CONFIGURATION)[0].rstrip()


# ----------------------------------------------------------------------------------------------- charts
def _bars(
    summary: Mapping[str, Any], method: str, groups: Sequence[str], key: str, ci_key: str
) -> tuple[list[float], list[list[float]], list[str]]:
    """One method's bars over ``groups``: heights (NaN: no value), error bars [below, above] and labels."""
    heights, below, above, labels = [], [], [], []
    for group in groups:
        g = summary["results"][method].get(group) or {}
        value = g.get(key)
        ci = g.get(ci_key) or [None, None]
        if value is None:
            heights.append(math.nan)
            below.append(0.0)
            above.append(0.0)
            labels.append("")
            continue
        heights.append(float(value))
        # A percentile interval need not contain the point estimate (skewed statistics such as the
        # variance); error bars cannot be negative, so such a side is drawn as zero.
        below.append(max(0.0, value - ci[0]) if ci[0] is not None else 0.0)
        above.append(max(0.0, ci[1] - value) if ci[1] is not None else 0.0)
        labels.append(format_number(value))
    return heights, [below, above], labels


def _bar_chart(
    summary: Mapping[str, Any], key: str, ci_key: str, ylabel: str, title: str, path: Path
) -> None:
    methods: list[str] = summary["methods"]
    kinds: list[str] = summary["kinds"]
    # With one kind, "all" is that kind: one group. With several, the pooled group first, as the paper's figure
    # puts its settings side by side.
    groups = [ALL, *kinds] if len(kinds) > 1 else [ALL]
    fig = Figure(figsize=(max(4.5, 1.5 + 0.8 * len(methods) * len(groups)), 3.8), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, set per figure, so no global pyplot backend is touched
    ax = fig.add_subplot()
    x = np.arange(len(groups), dtype=np.float64)
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        heights, yerr, labels = _bars(summary, method, groups, key, ci_key)
        bars = ax.bar(
            x + (i - (len(methods) - 1) / 2.0) * width,
            heights,
            width,
            yerr=yerr,
            capsize=3,
            label=method,
            color=f"C{i % 10}",
            edgecolor="black",
            linewidth=0.5,
        )
        ax.bar_label(bars, labels=labels, padding=2, fontsize=7)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    confidence = float(summary["settings"]["confidence"])
    ax.set_title(f"{title} (error bars: {100.0 * confidence:g}% bootstrap CI)", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=150)


# ------------------------------------------------------------------------------------------------ files
def _jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars and arrays as Python values, NaN and infinities as None, tuples as lists."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | np.ndarray):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def _write_text(path: Path, text: str) -> None:
    # Written beside and renamed, so a crash never leaves a half-written report where a complete one was.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_report(summary: dict[str, Any], config: dict[str, Any], out_dir: Path) -> None:
    """Write ``results.json``, ``report.md``, ``reward_mean.png`` and ``reward_variance.png`` into ``out_dir``."""
    if summary.get("schema") != SUMMARY_SCHEMA:
        raise ValueError(f"not a summary of schema {SUMMARY_SCHEMA!r}: {summary.get('schema')!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    baseline = summary["baseline"]
    confidence = float(summary["settings"]["confidence"])
    results = {
        "schema": REPORT_SCHEMA,
        "columns": {
            "main": column_names(MAIN_COLUMNS, baseline, confidence),
            "kind": column_names(KIND_COLUMNS, baseline, confidence),
        },
        "config": _jsonable(config),
        "summary": _jsonable(summary),
    }
    _write_text(out_dir / RESULTS_JSON, json.dumps(results, indent=2, allow_nan=False) + "\n")
    _write_text(out_dir / REPORT_MD, render_markdown(summary, config))
    _bar_chart(summary, "mean", "mean_ci", "mean reward", "Mean reward per method", out_dir / MEAN_PNG)
    _bar_chart(
        summary,
        "variance",
        "variance_ci",
        "reward variance",
        "Reward variance per method",
        out_dir / VARIANCE_PNG,
    )
