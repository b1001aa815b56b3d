"""The results as tables for the terminal (rich): image trials with their baseline, full-data
accuracy and scores, the cross-architecture table, and sequence trials with their own metrics.
The rows come from :func:`orchestrator.results.collect`."""
from __future__ import annotations

import math
from typing import Any

from rich.table import Table

from .methods import is_baseline
from .results import (
    SCORE_FIELDS,
    SEQ_METRICS,
    _number,
    architectures,
    row_metric,
    scores,
)


def _pm(mean, std) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{100 * mean:.1f} ± {100 * (std or 0):.1f}"


def _fmt_score(key: str, field: str, v: float | None) -> str:
    """A score for the table: percentage points for fractions (signed gain), raw for perplexity,
    DDRS as a fraction."""
    if v is None:
        return "-"
    if field == "ddrs":
        return f"{v:.3f}"
    scale, digits = (1.0, 2) if key == "ppl" else (100.0, 1)
    return f"{scale * v:+.{digits}f}" if field == "gain_over_random" else f"{scale * v:.{digits}f}"


def _z(r: dict[str, Any]) -> list[str]:
    """The ``z`` cell of a row (:func:`orchestrator.results.attach_paired`), or none when the rows
    were not paired."""
    if "gain_z" not in r:
        return []
    return ["-" if r["gain_z"] is None else f"{r['gain_z']:+.1f}"]


Z_CAPTION = ("; z: the gain over its paired standard error (the two sets' networks on the same test cases; "
             "|z| < 2: not a difference this evaluation can tell)")


def _seq_table(rows: list[dict[str, Any]], title: str) -> Table:
    """Sequence trials: the task's headline metric, its baseline, the full-data result and % of it;
    the scores on the row's headline metric line."""
    t = Table(title=title)
    paired = any("gain_z" in r for r in rows)
    for col in ("algorithm", "dataset", "budget (seqs)", "metric", "final", "selected (iter)", "random", "full data",
                "% of full", "gain", *(["z"] if paired else []), "gap", "DDRS", "status", "run_id"):
        t.add_column(col, justify="right" if col not in ("algorithm", "dataset", "metric", "status", "run_id")
                     else "left", no_wrap=col == "run_id")
    only_random = all(is_baseline(r["algorithm"]) for r in rows)  # e.g. ``results --algorithm random``
    for r in rows:
        if is_baseline(r["algorithm"]) and not only_random:
            continue
        status = r["status"] if not r["failure_reason"] else f"{r['status']}: {r['failure_reason'][:60]}"
        headline, sc = (row_metric(r) or ("", True))[0], scores(r)
        shown = [k for k in SEQ_METRICS if r.get(f"{k}_mean") is not None or r.get(f"full_data_{k}_mean") is not None]
        if not shown:  # a trial with nothing logged yet (running, its metrics not flushed; failed early)
            cells = ["-"] * len(SCORE_FIELDS)
            cells[1:1] = _z(r)  # its latest evaluation's outcomes may be logged already
            t.add_row(r["algorithm"], r["dataset"], str(r["budget"]), "-", "-", "-", "-", "-", "-", *cells, status,
                      r["run_id"])
        for k in shown:
            fmt = (lambda m, sd: "-" if m is None else f"{m:.2f} ± {sd or 0:.2f}") if k == "ppl" else _pm
            pct = r.get(f"{k}_pct_of_full")
            score_cells = [_fmt_score(k, f, sc[f]) if k == headline else "" for f in SCORE_FIELDS]
            if paired:
                score_cells.insert(1, _z(r)[0] if k == headline else "")
            sel = "-" if r.get(f"{k}_selected_mean") is None else \
                f"{fmt(r[f'{k}_selected_mean'], r.get(f'{k}_selected_std'))} ({r.get('selected_iteration')})"
            t.add_row(r["algorithm"], r["dataset"], str(r["budget"]), k, fmt(r[f"{k}_mean"], r[f"{k}_std"]), sel,
                      fmt(r[f"random_{k}_mean"], r[f"random_{k}_std"]),
                      fmt(r[f"full_data_{k}_mean"], r[f"full_data_{k}_std"]), "-" if pct is None else f"{pct:.0f}%",
                      *score_cells, status, r["run_id"])
    t.caption = ("HR@10 / NDCG@10 (%, full ranking; _s100: against 100 sampled negatives) or perplexity, "
                 "mean ± std over the evaluation networks; selected: the evaluation (iteration) that scored best on "
                 "the validation split, whose set the trial stands behind (`orchestrate export --selected`); "
                 "% of full: ours ÷ full data (perplexity: full ÷ ours); on the headline metric's line "
                 "(HR@10, or perplexity): gain over the random subset and gap to full data (points; perplexity: "
                 "lower is better, so random − ours and ours − full), DDRS: DD-Ranking score (none for perplexity)"
                 + (Z_CAPTION if paired else ""))
    return t


def table(rows: list[dict[str, Any]], title: str = "results"):
    """Distilled trials with their random baseline and the experts' full-data accuracy (%) and the
    scores (gain over random, gap to full, DDRS); where trials were also evaluated on other
    architectures, a second table below with one column per architecture (:func:`arch_table`).
    Sequence trials (no ``acc``) get their own metrics. A rich renderable: a ``Table``, or a
    ``Group`` of the two tables."""
    if rows and all(r.get("acc_mean") is None and r.get("full_data_acc_mean") is None for r in rows):
        return _seq_table(rows, title)
    t = Table(title=title)
    paired = any("gain_z" in r for r in rows)
    for col in ("algorithm", "dataset", "IPC", "acc (final)", "best over evals*", "random subset",
                "full data (experts)", "gain", *(["z"] if paired else []), "gap", "DDRS", "status", "run_id"):
        t.add_column(col, justify="right" if col not in ("algorithm", "dataset", "status", "run_id") else "left",
                     no_wrap=col == "run_id")
    only_random = all(is_baseline(r["algorithm"]) for r in rows)  # e.g. ``results --algorithm random``
    for r in rows:
        if is_baseline(r["algorithm"]) and not only_random:
            continue
        status = r["status"] if not r["failure_reason"] else f"{r['status']}: {r['failure_reason'][:60]}"
        sc = scores(r)
        cells = [_fmt_score("acc", f, sc[f]) for f in SCORE_FIELDS]
        cells[1:1] = _z(r)
        t.add_row(r["algorithm"], r["dataset"], str(r["budget"]), _pm(r["acc_mean"], r["acc_std"]),
                  _pm(r["acc_best_over_evals_mean"], r["acc_best_over_evals_std"]),
                  _pm(r["random_acc_mean"], r["random_acc_std"]),
                  _pm(r["full_data_acc_mean"], r["full_data_acc_std"]), *cells, status, r["run_id"])
    t.caption = ("test accuracy (%), mean ± std over the evaluation networks; *best over periodic evaluations "
                 "is selected on the test set, as MTT reports it; gain: acc − random subset, gap: full data "
                 "− acc (points); DDRS: DD-Ranking score (e^α − e^−1)/(e − e^−1), α = ½·gain − ½·gap on "
                 "fractions" + (Z_CAPTION if paired else ""))
    cross = arch_table(rows, title=f"{title}: cross-architecture")
    if cross is None:
        return t
    from rich.console import Group

    return Group(t, cross)


def arch_table(rows: list[dict[str, Any]], title: str = "cross-architecture") -> Table | None:
    """One column per architecture: the final accuracy of the spec's own model (``acc_mean``)
    and of each other architecture the trials were evaluated on (``acc_mean/<arch>``), the random
    subsets' rows included; a trial's cell adds its gain over the random subset of its budget on
    the same architecture. None when no row has another architecture."""
    archs = architectures(rows)
    shown = [r for r in rows if any(_number(r.get(f"acc_mean/{a}")) is not None for a in archs)]
    if not shown:
        return None
    models = {r.get("model") for r in shown}
    own = f"{models.pop()} (spec)" if len(models) == 1 and None not in models else "spec's model"
    t = Table(title=title)
    for col in ("algorithm", "dataset", "IPC", own, *archs, "run_id"):
        t.add_column(col, justify="left" if col in ("algorithm", "dataset", "run_id") else "right",
                     no_wrap=col == "run_id")
    for r in shown:
        t.add_row(r["algorithm"], r["dataset"], str(r["budget"]), _arch_cell(r, None),
                  *(_arch_cell(r, a) for a in archs), r["run_id"])
    t.caption = ("test accuracy (%) of networks of each architecture trained on the set, mean ± std, same "
                 "protocol and seeds; (±x): gain over the random subset of the budget on that architecture "
                 "(points)")
    return t


def _arch_cell(r: dict[str, Any], arch: str | None) -> str:
    suffix = f"/{arch}" if arch else ""
    mean, rnd = _number(r.get(f"acc_mean{suffix}")), _number(r.get(f"random_acc_mean{suffix}"))
    cell = _pm(mean, r.get(f"acc_std{suffix}"))
    if mean is not None and rnd is not None and not is_baseline(r["algorithm"]):
        cell += f" ({100 * (mean - rnd):+.1f})"
    return cell
