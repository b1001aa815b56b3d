"""Results from MLflow: one row per trial, joined with the random baseline of the same budget
and the full-data accuracy of the experts; printed as a table, JSON or CSV."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from rich.table import Table

from .methods import is_baseline
from .tracking import PARENT_TAG, ROLE_TAG

FIELDS = ["run_id", "sweep", "algorithm", "dataset", "budget", "status", "acc_mean", "acc_std",
          "acc_best_over_evals_mean", "acc_best_over_evals_std", "random_acc_mean", "random_acc_std",
          "full_data_acc_mean", "full_data_acc_std", "syn_lr", "iterations", "failure_reason"]

# event-sequence trials (Farzi and its baseline): recommendation HR@10 / NDCG@10, LM perplexity
SEQ_METRICS = ("hr10", "ndcg10", "hr10_s100", "ndcg10_s100", "ppl", "token_acc")
SEQ_FIELDS = [f"{p}{k}_{s}" for k in SEQ_METRICS for p in ("", "random_", "full_data_") for s in ("mean", "std")] + \
    [f"{k}_pct_of_full" for k in SEQ_METRICS]


def _experiments(client: MlflowClient, experiment: str | None) -> list[str]:
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise LookupError(f"no MLflow experiment named {experiment!r}")
        return [exp.experiment_id]
    return [e.experiment_id for e in client.search_experiments()]


def latest_sweep(client: MlflowClient, experiment: str | None = None) -> str | None:
    runs = client.search_runs(_experiments(client, experiment), filter_string=f"tags.`{ROLE_TAG}` = 'sweep'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def check_sweep(client: MlflowClient, run_id: str, experiment: str | None = None):
    """The parent run of sweep ``run_id``; LookupError when there is no such run, when it is not a
    sweep (a trial: the message names its sweep) or when it is not in ``experiment``."""
    run = get_runs(client, [run_id])[0]
    role, parent = run.data.tags.get(ROLE_TAG), run.data.tags.get(PARENT_TAG)
    if role != "sweep":
        if role == "trial" and parent:
            raise LookupError(f"run {run_id} is a trial of sweep {parent}, not a sweep: use --sweep {parent} "
                              f"(and `orchestrate compare {run_id}` for this trial alone)")
        raise LookupError(f"run {run_id} is not a sweep: its tag {ROLE_TAG} is "
                          f"{'missing' if role is None else repr(role)}, a sweep's parent run has {ROLE_TAG} = sweep")
    if experiment:
        exp = client.get_experiment(run.info.experiment_id)
        if exp.name != experiment:
            raise LookupError(f"sweep {run_id} is in experiment {exp.name!r}, not {experiment!r}")
    return run


def collect(tracking_uri: str, sweep: str | None = None, experiment: str | None = None,
            all_sweeps: bool = False) -> list[dict[str, Any]]:
    """Rows for the trials of one sweep (default: the latest) or of every sweep (``all_sweeps``,
    which excludes ``sweep``: ValueError)."""
    if sweep and all_sweeps:
        raise ValueError(f"either one sweep ({sweep}) or all of them, not both")
    client = MlflowClient(tracking_uri)
    exps = _experiments(client, experiment)
    if not exps:
        return []
    filt = f"tags.`{ROLE_TAG}` = 'trial'"
    if not all_sweeps:
        sweep = sweep or latest_sweep(client, experiment)
        if sweep is None:
            return []
        filt += f" and tags.`{PARENT_TAG}` = '{sweep}'"
    runs = client.search_runs(exps, filter_string=filt, order_by=["attributes.start_time ASC"], max_results=50000)
    rows = []
    for r in runs:
        m, t, p = r.data.metrics, r.data.tags, r.data.params
        rows.append({
            "run_id": r.info.run_id, "sweep": t.get(PARENT_TAG), "algorithm": t.get("algorithm"),
            "dataset": t.get("dataset"), "budget": int(t.get("budget", 0)), "status": r.info.status,
            "acc_mean": m.get("acc_mean"), "acc_std": m.get("acc_std"),
            "acc_best_over_evals_mean": m.get("acc_best_over_evals_mean"),
            "acc_best_over_evals_std": m.get("acc_best_over_evals_std"),
            "full_data_acc_mean": m.get("full_data_acc_mean"), "full_data_acc_std": m.get("full_data_acc_std"),
            "syn_lr": m.get("final_syn_lr"), "iterations": int(p.get("iterations", 0)),
            "failure_reason": t.get("orchestrate.failure_reason"),
            "hyperparameters": {k[3:]: v for k, v in p.items() if k.startswith("hp.")},
            **{f: m.get(f) for f in SEQ_FIELDS if not f.startswith("random_")},
        })
    attach_baselines(rows)
    rows.sort(key=lambda r: (r["sweep"] or "", not is_baseline(r["algorithm"]), r["algorithm"] or "", r["budget"]))
    return rows


def attach_baselines(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give every row (in place) the ``random_<metric>_mean`` / ``_std`` of the random-subset
    trial of the same sweep, dataset and budget (None where there is none); returns ``rows``."""
    baseline = {(r["sweep"], r["dataset"], r["budget"]): r for r in rows if is_baseline(r["algorithm"])}
    for r in rows:
        b = baseline.get((r["sweep"], r["dataset"], r["budget"]), {})
        r["random_acc_mean"], r["random_acc_std"] = b.get("acc_mean"), b.get("acc_std")
        for k in SEQ_METRICS:
            r[f"random_{k}_mean"], r[f"random_{k}_std"] = b.get(f"{k}_mean"), b.get(f"{k}_std")
    return rows


def _pm(mean, std) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{100 * mean:.1f} ± {100 * (std or 0):.1f}"


def _seq_table(rows: list[dict[str, Any]], title: str) -> Table:
    """Sequence trials: the task's headline metric, its baseline, the full-data result and % of it."""
    t = Table(title=title)
    for col in ("algorithm", "dataset", "budget (seqs)", "metric", "final", "random", "full data", "% of full",
                "status", "run_id"):
        t.add_column(col, justify="right" if col not in ("algorithm", "dataset", "metric", "status", "run_id")
                     else "left")
    only_random = all(is_baseline(r["algorithm"]) for r in rows)  # e.g. ``results --algorithm random``
    for r in rows:
        if is_baseline(r["algorithm"]) and not only_random:
            continue
        status = r["status"] if not r["failure_reason"] else f"{r['status']}: {r['failure_reason'][:60]}"
        for k in SEQ_METRICS:
            if r.get(f"{k}_mean") is None and r.get(f"full_data_{k}_mean") is None:
                continue
            fmt = (lambda m, sd: "-" if m is None else f"{m:.2f} ± {sd or 0:.2f}") if k == "ppl" else _pm
            pct = r.get(f"{k}_pct_of_full")
            t.add_row(r["algorithm"], r["dataset"], str(r["budget"]), k, fmt(r[f"{k}_mean"], r[f"{k}_std"]),
                      fmt(r[f"random_{k}_mean"], r[f"random_{k}_std"]),
                      fmt(r[f"full_data_{k}_mean"], r[f"full_data_{k}_std"]), "-" if pct is None else f"{pct:.0f}%",
                      status, r["run_id"])
    t.caption = ("HR@10 / NDCG@10 (%, full ranking; _s100: against 100 sampled negatives) or perplexity, "
                 "mean ± std over the evaluation networks; "
                 "% of full: ours ÷ full data (perplexity: full ÷ ours)")
    return t


def table(rows: list[dict[str, Any]], title: str = "results") -> Table:
    """Distilled trials with their random baseline and the experts' full-data accuracy (%).
    Sequence trials (no ``acc``) get their own metrics."""
    if rows and all(r.get("acc_mean") is None and r.get("full_data_acc_mean") is None for r in rows):
        return _seq_table(rows, title)
    t = Table(title=title)
    for col in ("algorithm", "dataset", "IPC", "acc (final)", "best over evals*", "random subset",
                "full data (experts)", "status", "run_id"):
        t.add_column(col, justify="right" if col not in ("algorithm", "dataset", "status", "run_id") else "left")
    only_random = all(is_baseline(r["algorithm"]) for r in rows)  # e.g. ``results --algorithm random``
    for r in rows:
        if is_baseline(r["algorithm"]) and not only_random:
            continue
        status = r["status"] if not r["failure_reason"] else f"{r['status']}: {r['failure_reason'][:60]}"
        t.add_row(r["algorithm"], r["dataset"], str(r["budget"]), _pm(r["acc_mean"], r["acc_std"]),
                  _pm(r["acc_best_over_evals_mean"], r["acc_best_over_evals_std"]),
                  _pm(r["random_acc_mean"], r["random_acc_std"]),
                  _pm(r["full_data_acc_mean"], r["full_data_acc_std"]), status, r["run_id"])
    t.caption = ("test accuracy (%), mean ± std over the evaluation networks; *best over periodic evaluations "
                 "is selected on the test set, as MTT reports it")
    return t


def to_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2)


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS + SEQ_FIELDS + ["hyperparameters"], extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "hyperparameters": json.dumps(r["hyperparameters"], sort_keys=True)})
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# browsing: filters, the best trial per group, sorting (pure functions on the rows of ``collect``)

SORT_FIELDS = FIELDS + SEQ_FIELDS
GROUP_KEYS = ("sweep", "dataset", "algorithm", "budget")


def _number(v: Any) -> float | None:
    """``v`` as a float, or None when it is missing or NaN."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def row_metric(row: dict[str, Any]) -> tuple[str, bool] | None:
    """The headline metric of a row and whether higher is better: ``acc`` for images,
    ``hr10`` for recommendation, ``ppl`` (lower is better) for language modelling; None when
    the row has none of them (a failed trial, say)."""
    for key, higher in (("acc", True), ("hr10", True), ("ppl", False)):
        if any(row.get(f"{p}{key}_mean") is not None for p in ("", "full_data_", "random_")):
            return key, higher
    return None


def headline_metric(rows: list[dict[str, Any]]) -> tuple[str, bool]:
    """The headline metric of a set of rows (the first row that has one decides); ``acc`` by default."""
    for r in rows:
        m = row_metric(r)
        if m:
            return m
    return "acc", True


def filter_rows(rows: list[dict[str, Any]], algorithms=None, datasets=None, budgets=None,
                statuses=None) -> list[dict[str, Any]]:
    """The rows that match every given filter; an empty or None filter matches everything.
    Names and statuses match case-insensitively; the order is kept."""
    algos = {a.lower() for a in algorithms or ()}
    dsets = {d.lower() for d in datasets or ()}
    buds = {int(b) for b in budgets or ()}
    stats = {s.upper() for s in statuses or ()}
    return [r for r in rows
            if (not algos or (r.get("algorithm") or "").lower() in algos)
            and (not dsets or (r.get("dataset") or "").lower() in dsets)
            and (not buds or r.get("budget") in buds)
            and (not stats or (r.get("status") or "").upper() in stats)]


def best_per_group(rows: list[dict[str, Any]], keys: tuple[str, ...] = GROUP_KEYS) -> list[dict[str, Any]]:
    """One row per group of equal ``keys`` (default: sweep, dataset, algorithm, budget): the one
    with the best final headline metric (``acc_mean``, ``hr10_mean``, or the lowest ``ppl_mean``).
    Ties go to the earlier row; a group where no row has the metric (only failed trials) keeps its
    first row. Groups come in the order of their first row."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    out = []
    for members in groups.values():
        metric, higher = headline_metric(members)
        best, best_v = members[0], None
        for r in members:
            v = _number(r.get(f"{metric}_mean"))
            if v is not None and (best_v is None or (v > best_v if higher else v < best_v)):
                best, best_v = r, v
        out.append(best)
    return out


def sort_rows(rows: list[dict[str, Any]], fields: str | list[str] | tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows sorted by one or more fields of ``SORT_FIELDS`` (``-field``: descending). The sort is
    stable; missing values (None, NaN) come last in either direction. Unknown field: ValueError."""
    fields = [fields] if isinstance(fields, str) else list(fields)
    for f in fields:
        if f.lstrip("-") not in SORT_FIELDS:
            raise ValueError(f"unknown sort field {f.lstrip('-')!r}; allowed: {', '.join(SORT_FIELDS)}")
    out = list(rows)
    for f in reversed(fields):  # least significant first; each pass is stable
        name, desc = f.lstrip("-"), f.startswith("-")

        def missing(r):
            v = r.get(name)
            return v is None or (isinstance(v, float) and math.isnan(v))

        present = [r for r in out if not missing(r)]
        out = sorted(present, key=lambda r: r[name], reverse=desc) + [r for r in out if missing(r)]
    return out


# ---------------------------------------------------------------------------------------------
# comparing runs side by side


def get_runs(client: MlflowClient, run_ids: list[str]) -> list:
    """The MLflow runs ``run_ids``; LookupError naming every id that is not in the store."""
    from mlflow.exceptions import MlflowException

    runs, missing = [], []
    for rid in run_ids:
        try:
            runs.append(client.get_run(rid))
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            missing.append(rid)
    if missing:
        raise LookupError(f"no run{'s' if len(missing) > 1 else ''} {', '.join(missing)} in {client.tracking_uri}")
    return runs


def compare_runs(tracking_uri: str, run_ids: list[str]) -> dict[str, Any]:
    """The runs' parameters, metrics (latest values) and tags side by side.

    Returns ``{"runs": [{run_id, run_name, experiment, status, start_time, end_time}, ...],
    "rows": [{"section": "run"|"param"|"metric"|"tag", "name", "values": {run_id: value},
    "differs": bool}, ...]}``; a value is None where a run lacks the entry. Raises LookupError
    naming every run id that is not in the store."""
    client = MlflowClient(tracking_uri)
    runs = get_runs(client, list(dict.fromkeys(run_ids)))
    experiments: dict[str, str] = {}

    def experiment(eid: str) -> str:
        if eid not in experiments:
            experiments[eid] = client.get_experiment(eid).name
        return experiments[eid]

    def iso(ms: int | None) -> str | None:
        import datetime as dt

        return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(timespec="seconds") if ms else None

    info = [{"run_id": r.info.run_id, "run_name": r.info.run_name, "experiment": experiment(r.info.experiment_id),
             "status": r.info.status, "start_time": iso(r.info.start_time), "end_time": iso(r.info.end_time)}
            for r in runs]
    sections: list[tuple[str, list[dict[str, Any]]]] = [
        ("run", [{"run_name": i["run_name"], "experiment": i["experiment"], "status": i["status"],
                  "sweep": r.data.tags.get(PARENT_TAG)}
                 for i, r in zip(info, runs)]),
        ("param", [r.data.params for r in runs]),
        ("metric", [r.data.metrics for r in runs]),
        ("tag", [{k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.")} for r in runs]),
    ]
    rows = []
    for section, per_run in sections:
        names = list(per_run[0]) if section == "run" else sorted(set().union(*per_run))
        for name in names:
            values = {r.info.run_id: d.get(name) for r, d in zip(runs, per_run)}
            if section == "run" and all(v is None for v in values.values()):
                continue
            vs = list(values.values())
            rows.append({"section": section, "name": name, "values": values,
                         "differs": any(_differ(vs[0], v) for v in vs[1:])})
    return {"runs": info, "rows": rows}


def _differ(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return False
    return a != b


def only_differing(comparison: dict[str, Any]) -> dict[str, Any]:
    """``comparison`` with only the rows whose values differ between the runs."""
    return {**comparison, "rows": [r for r in comparison["rows"] if r["differs"]]}


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def compare_table(comparison: dict[str, Any], title: str = "compare") -> Table:
    """One column per run, one row per run field / param / metric / tag; rows whose values
    differ are bold and marked ≠."""
    from rich.text import Text

    t = Table(title=title)
    t.add_column("", width=1)
    t.add_column("field", justify="left")
    for i in comparison["runs"]:
        t.add_column(Text(f"{i['run_name'] or ''}\n{i['run_id']}"), justify="left", overflow="fold")
    for r in comparison["rows"]:
        t.add_row("≠" if r["differs"] else "", Text(f"{r['section']} {r['name']}" if r["section"] != "run"
                                                     else r["name"]),
                  *(Text(_cell(v)) for v in r["values"].values()), style="bold" if r["differs"] else None)
    t.caption = "≠ (bold): the values differ; metrics are the latest logged values; '-': not logged for that run"
    return t


def compare_to_json(comparison: dict[str, Any]) -> str:
    return json.dumps(comparison, indent=2)


def compare_to_csv(comparison: dict[str, Any]) -> str:
    ids = [i["run_id"] for i in comparison["runs"]]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["section", "name", "differs", *ids])
    for r in comparison["rows"]:
        w.writerow([r["section"], r["name"], r["differs"], *("" if r["values"][i] is None else r["values"][i]
                                                              for i in ids)])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# the summary of a sweep, logged to its parent run

SUMMARY_ARTIFACT_DIR = "summary"
_METRIC_LABELS = {"acc": ("test accuracy (%)", 100.0), "hr10": ("HR@10 (%)", 100.0),
                  "ppl": ("perplexity (lower is better)", 1.0)}


def _plot_vs_budget(rows: list[dict[str, Any]], parent: dict[str, float], path: Path, title: str) -> Path:
    """Final headline metric against budget: one series per algorithm (the best trial of each
    budget), the random baseline, and the full-data result as a line with a ±std band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    metric, _ = headline_metric(rows) if rows else \
        next(((k, h) for k, h in (("acc", True), ("hr10", True), ("ppl", False))
              if f"full_data_{k}_mean" in parent), ("acc", True))
    label, scale = _METRIC_LABELS[metric]
    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    done = [r for r in rows if r.get("status") == "FINISHED" and _number(r.get(f"{metric}_mean")) is not None]
    budgets = sorted({r["budget"] for r in done})
    algorithms = list(dict.fromkeys(r["algorithm"] for r in done))
    algorithms.sort(key=is_baseline)  # the baseline last in the legend
    best = best_per_group(done)
    for algo in algorithms:
        pts = sorted((r for r in best if r["algorithm"] == algo), key=lambda r: r["budget"])
        xs = [r["budget"] for r in pts]
        ys = [scale * r[f"{metric}_mean"] for r in pts]
        es = [scale * (_number(r.get(f"{metric}_std")) or 0.0) for r in pts]
        if is_baseline(algo):
            ax.errorbar(xs, ys, yerr=es, fmt="s--", color="0.45", capsize=3, label="random real subset")
        else:
            ax.errorbar(xs, ys, yerr=es, fmt="o-", capsize=3, label=algo)
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
    images = metric == "acc"
    ax.set_xlabel("budget (images per class)" if images else "budget (sequences)")
    ax.set_ylabel(label)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.text(0.99, 0.01, "error bars / band: ± std over the evaluation networks", ha="right", va="bottom",
             fontsize="x-small", color="0.4")
    fig.tight_layout()
    fig.savefig(path)
    return path


def summarise_sweep(tracking_uri: str, parent_run_id: str, out_dir: Path) -> list[Path]:
    """Writes ``results.csv`` (every trial of the sweep, failed ones included) and
    ``accuracy_vs_budget.png`` (the final headline metric of the finished trials against the
    budget: accuracy for images, HR@10 for recommendation, perplexity for language modelling)
    to ``out_dir``, logs both to the parent run under ``summary/`` and returns their paths.
    Raises LookupError when ``parent_run_id`` is not in the store."""
    from .tracking import RunLogger

    parent = get_runs(MlflowClient(tracking_uri), [parent_run_id])[0]
    rows = collect(tracking_uri, sweep=parent_run_id)
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
    return [csv_path, png_path]
