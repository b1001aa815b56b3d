"""Results from MLflow: one row per trial, joined with the random baseline of the same budget
and the full-data accuracy of the experts; printed as a table, JSON or CSV."""
from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

from mlflow import MlflowClient
from rich.table import Table

from .tracking import PARENT_TAG, ROLE_TAG

FIELDS = ["run_id", "sweep", "algorithm", "dataset", "budget", "status", "acc_mean", "acc_std",
          "acc_best_over_evals_mean", "acc_best_over_evals_std", "random_acc_mean", "random_acc_std",
          "full_data_acc_mean", "full_data_acc_std", "syn_lr", "iterations", "failure_reason"]

# event-sequence trials (Farzi and its baseline): recommendation HR@10 / NDCG@10, LM perplexity
SEQ_METRICS = ("hr10", "ndcg10", "ppl", "token_acc")
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


def collect(tracking_uri: str, sweep: str | None = None, experiment: str | None = None,
            all_sweeps: bool = False) -> list[dict[str, Any]]:
    """Rows for the trials of one sweep (default: the latest) or of every sweep."""
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
    baseline = {(r["sweep"], r["dataset"], r["budget"]): r for r in rows if r["algorithm"] == "random"}
    for r in rows:
        b = baseline.get((r["sweep"], r["dataset"], r["budget"]), {})
        r["random_acc_mean"], r["random_acc_std"] = b.get("acc_mean"), b.get("acc_std")
        for k in SEQ_METRICS:
            r[f"random_{k}_mean"], r[f"random_{k}_std"] = b.get(f"{k}_mean"), b.get(f"{k}_std")
    rows.sort(key=lambda r: (r["sweep"] or "", r["algorithm"] != "random", r["algorithm"] or "", r["budget"]))
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
    for r in rows:
        if r["algorithm"] == "random":
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
    t.caption = ("HR@10 / NDCG@10 (%, full ranking) or perplexity, mean ± std over the evaluation networks; "
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
    for r in rows:
        if r["algorithm"] == "random":
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
