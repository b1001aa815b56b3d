"""``orchestrate compare``: MLflow runs side by side (run fields, parameters, latest metrics and
tags, the differing rows marked), as a table, JSON or CSV; and :func:`get_runs`, the runs of a
list of ids, every missing one named."""
from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

from mlflow import MlflowClient
from rich.table import Table

from .tracking import PARENT_TAG


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
