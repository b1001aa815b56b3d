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
        })
    baseline = {(r["sweep"], r["dataset"], r["budget"]): r for r in rows if r["algorithm"] == "random"}
    for r in rows:
        b = baseline.get((r["sweep"], r["dataset"], r["budget"]), {})
        r["random_acc_mean"], r["random_acc_std"] = b.get("acc_mean"), b.get("acc_std")
    rows.sort(key=lambda r: (r["sweep"] or "", r["algorithm"] != "random", r["algorithm"] or "", r["budget"]))
    return rows


def _pm(mean, std) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{100 * mean:.1f} ± {100 * (std or 0):.1f}"


def table(rows: list[dict[str, Any]], title: str = "results") -> Table:
    """Distilled trials with their random baseline and the experts' full-data accuracy (%)."""
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
    w = csv.DictWriter(buf, fieldnames=FIELDS + ["hyperparameters"], extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "hyperparameters": json.dumps(r["hyperparameters"], sort_keys=True)})
    return buf.getvalue()
