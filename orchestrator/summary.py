"""The summary of a sweep, written when it ends and logged to its parent run under ``summary/``:
``results.csv`` (every trial with its scores), the plot of the headline metric against the budget
(with the gain over the random subset below it), and each finished trial's scores logged as
metrics of its own run."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from .compare import get_runs
from .methods import is_baseline
from .results import (PAIRED_FIELDS, _number, attach_paired, best_per_group, collect, headline_metric, scores,
                      to_csv)

SUMMARY_ARTIFACT_DIR = "summary"
_METRIC_LABELS = {"acc": ("test accuracy (%)", 100.0), "hr10": ("HR@10 (%)", 100.0),
                  "ppl": ("perplexity (lower is better)", 1.0)}


def _plot_vs_budget(rows: list[dict[str, Any]], parent: dict[str, float], path: Path, title: str) -> Path:
    """Final headline metric against budget: one series per algorithm (the best trial of each
    budget), the random baseline, and the full-data result as a line with a ±std band; below, the
    gain of each algorithm's point over the random subset of its budget (``gain_over_random``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    metric, _ = headline_metric(rows) if rows else \
        next(((k, h) for k, h in (("acc", True), ("hr10", True), ("ppl", False))
              if f"full_data_{k}_mean" in parent), ("acc", True))
    label, scale = _METRIC_LABELS[metric]
    fig = Figure(figsize=(7, 6.5), dpi=120)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 1, height_ratios=(3, 1.5))
    ax = fig.add_subplot(grid[0])
    gax = fig.add_subplot(grid[1], sharex=ax)
    done = [r for r in rows if r.get("status") == "FINISHED" and _number(r.get(f"{metric}_mean")) is not None]
    budgets = sorted({r["budget"] for r in done})
    algorithms = list(dict.fromkeys(r["algorithm"] for r in done))
    algorithms.sort(key=is_baseline)  # the baseline last in the legend
    best = best_per_group(done)
    gains = False
    for algo in algorithms:
        pts = sorted((r for r in best if r["algorithm"] == algo), key=lambda r: r["budget"])
        xs = [r["budget"] for r in pts]
        ys = [scale * r[f"{metric}_mean"] for r in pts]
        es = [scale * (_number(r.get(f"{metric}_std")) or 0.0) for r in pts]
        if is_baseline(algo):
            ax.errorbar(xs, ys, yerr=es, fmt="s--", color="0.45", capsize=3, label="random real subset")
            continue
        line = ax.errorbar(xs, ys, yerr=es, fmt="o-", capsize=3, label=algo)
        gain = [(r["budget"], scores(r)["gain_over_random"]) for r in pts]
        gain = [(x, scale * g) for x, g in gain if g is not None]
        if gain:
            gains = True
            gx, gy = zip(*gain)
            gax.plot(gx, gy, "o-", color=line.lines[0].get_color(), label=algo)
            for x, y in gain:
                gax.annotate(f"{y:+.1f}" if metric != "ppl" else f"{y:+.0f}", (x, y), textcoords="offset points",
                             xytext=(0, 5), ha="center", fontsize="x-small")
    full = next(((_number(r.get(f"full_data_{metric}_mean")), _number(r.get(f"full_data_{metric}_std")))
                 for r in rows if _number(r.get(f"full_data_{metric}_mean")) is not None),
                (_number(parent.get(f"full_data_{metric}_mean")), _number(parent.get(f"full_data_{metric}_std"))))
    if full[0] is not None:
        m, s = scale * full[0], scale * (full[1] or 0.0)
        ax.axhline(m, color="black", linewidth=1, label=f"full data ({m:.1f} ± {s:.1f})")
        if s:
            ax.axhspan(m - s, m + s, color="black", alpha=0.12, linewidth=0)
    if budgets:
        if len(budgets) > 1 and budgets[0] > 0 and budgets[-1] / budgets[0] >= 10:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(budgets)
        ax.set_xticklabels([str(b) for b in budgets])
    else:
        ax.text(0.5, 0.5, "no finished trials", transform=ax.transAxes, ha="center", va="center")
    ax.tick_params(labelbottom=False)
    gax.axhline(0.0, color="0.45", linestyle="--", linewidth=1)
    gax.margins(y=0.25)  # room for the annotations
    if not gains:
        gax.text(0.5, 0.5, "no random subset of these budgets to compare with", transform=gax.transAxes,
                 ha="center", va="center", fontsize="small", color="0.4")
    images = metric == "acc"
    gax.set_xlabel("budget (images per class)" if images else "budget (sequences)")
    ax.set_ylabel(label)
    unit = "points" if metric != "ppl" else "perplexity, random − ours"
    gax.set_ylabel(f"gain over random\n({unit})", fontsize="small")
    ax.set_title(title)
    for a in (ax, gax):
        a.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.text(0.99, 0.01, "error bars / band: ± std over the evaluation networks", ha="right", va="bottom",
             fontsize="x-small", color="0.4")
    fig.tight_layout(rect=(0, 0.02, 1, 1))  # the footnote below the axis label
    fig.savefig(path)
    return path


def summarise_sweep(tracking_uri: str, parent_run_id: str, out_dir: Path) -> list[Path]:
    """Writes ``results.csv`` (every trial of the sweep, failed ones included, with its scores,
    their paired standard errors (:func:`attach_paired`) and per-architecture fields, see :func:`to_csv`) and ``accuracy_vs_budget.png`` (the final
    headline metric of the finished trials against the budget: accuracy for images, HR@10 for
    recommendation, perplexity for language modelling; below it the gain over the random subset)
    to ``out_dir``, logs both to the parent run under ``summary/`` and returns their paths.
    Raises LookupError when ``parent_run_id`` is not in the store."""
    from .tracking import RunLogger

    parent = get_runs(MlflowClient(tracking_uri), [parent_run_id])[0]
    rows = collect(tracking_uri, sweep=parent_run_id)
    attach_paired(tracking_uri, rows)  # each trial's gain over random, paired on the test cases (gain_se, gain_z)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "results.csv"
    csv_path.write_text(to_csv(rows), encoding="utf-8")
    dataset = next((r["dataset"] for r in rows if r.get("dataset")), None) or parent.data.tags.get("dataset") or ""
    title = f"{parent.info.run_name or 'sweep'}: {dataset} (sweep run {parent_run_id[:8]})"
    png_path = _plot_vs_budget(rows, parent.data.metrics, out_dir / "accuracy_vs_budget.png", title)
    logger = RunLogger(tracking_uri, parent_run_id)
    for p in (csv_path, png_path):
        logger.artifact(p, SUMMARY_ARTIFACT_DIR)
    log_scores(tracking_uri, rows)
    return [csv_path, png_path]


def log_scores(tracking_uri: str, rows: list[dict[str, Any]]) -> None:
    """Each finished trial's scores as metrics of its own MLflow run (``gain_over_random``,
    ``gap_to_full``, ``ddrs``, and where the rows were paired ``gain_se`` and ``gain_z``: they need
    the sweep's random subset, so they are known at the end of the sweep, not when the trial ends).
    Scores that cannot be computed are not logged."""
    client = MlflowClient(tracking_uri)
    for r in rows:
        if r.get("status") != "FINISHED" or not r.get("run_id"):
            continue
        for k in ("gain_over_random", "gap_to_full", "ddrs", *PAIRED_FIELDS):
            v = r.get(k)
            if v is not None and math.isfinite(v):
                client.log_metric(r["run_id"], k, float(v))
