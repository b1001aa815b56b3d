"""``orchestrate compare``: MLflow runs side by side (run fields, parameters, latest metrics and
tags, the differing rows marked) and, for trials, each one's set minus the first one's on the same
test cases (:func:`paired_runs`, from the per-case outcomes trials log), as a table, JSON or CSV;
and :func:`get_runs`, the runs of a list of ids, every missing one named."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
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


def compare_runs(tracking_uri: str, run_ids: list[str], paired: bool = True, selected: bool = False
                 ) -> dict[str, Any]:
    """The runs' parameters, metrics (latest values) and tags side by side and, with ``paired``,
    each trial's set minus the first run's on the same test cases (:func:`paired_runs`).

    Returns ``{"runs": [{run_id, run_name, experiment, status, start_time, end_time}, ...],
    "rows": [{"section": "run"|"param"|"metric"|"tag"|"paired", "name", "values": {run_id: value},
    "differs": bool}, ...], "paired": ...}``; a value is None where a run lacks the entry; the
    ``paired`` rows are ``<metric>_delta``, ``_se``, ``_se_cases``, ``_se_networks``, ``_z``.
    Raises LookupError naming every run id that is not in the store."""
    client = MlflowClient(tracking_uri)
    items = [parse_item(x) for x in dict.fromkeys(run_ids)]  # (key, run id, iteration or None)
    by_id = {r.info.run_id: r for r in get_runs(client, list(dict.fromkeys(rid for _, rid, _ in items)))}
    runs = [by_id[rid] for _, rid, _ in items]
    keys = [k for k, _, _ in items]
    experiments: dict[str, str] = {}

    def experiment(eid: str) -> str:
        if eid not in experiments:
            experiments[eid] = client.get_experiment(eid).name
        return experiments[eid]

    def iso(ms: int | None) -> str | None:
        import datetime as dt

        return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(timespec="seconds") if ms else None

    info = [{"run_id": r.info.run_id, "key": key, "iteration": it, "run_name": r.info.run_name,
             "experiment": experiment(r.info.experiment_id), "status": r.info.status,
             "start_time": iso(r.info.start_time), "end_time": iso(r.info.end_time)}
            for (key, _, it), r in zip(items, runs)]
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
            values = {key: d.get(name) for key, d in zip(keys, per_run)}
            if section == "run" and all(v is None for v in values.values()):
                continue
            vs = list(values.values())
            rows.append({"section": section, "name": name, "values": values,
                         "differs": any(_differ(vs[0], v) for v in vs[1:])})
    out = {"runs": info, "rows": rows}
    if paired and len(runs) > 1:
        pr = out["paired"] = paired_runs(client, runs, selected, [it for _, _, it in items], keys)
        if pr["stats"]:
            for stat in PAIRED_STATS:
                values = {key: pr["stats"].get(key, {}).get(stat) for key in keys}
                rows.append({"section": "paired", "name": f"{pr['metric']}_{stat}", "values": values,
                             "differs": True})
    return out


def paired_caption(comparison: dict[str, Any]) -> list[str]:
    """The paired rows in words: what they are, and every run left out and why."""
    from .evaluate import paired_text

    pr = comparison.get("paired")
    if not pr:
        return []
    names = {i["key"]: (i["run_name"] or i["run_id"]) + ("" if i["iteration"] is None else f"@{i['iteration']}")
             for i in comparison["runs"]}
    lines = []
    if pr["reference"]:
        its = pr["iterations"]
        lines.append(f"paired: each run's set minus {names[pr['reference']]}'s ({pr['set']}, iteration "
                     f"{its.get(pr['reference'])}), evaluated on the same {pr['cases']} test {pr['unit']}"
                     + (" (ln of the perplexity ratio)" if pr["metric"] == "ppl" else " (fractions)"))
        for rid, st in pr["stats"].items():
            lines.append(f"  {names[rid]} (iteration {its.get(rid)}): "
                         f"{paired_text({**st, 'metric': pr['metric']}, pr['unit'])}")
    lines += [f"  not paired, {names[rid]}: {why}" for rid, why in pr["skipped"].items()]
    return lines


@contextlib.contextmanager
def quiet_downloads():
    """MLflow's artifact downloads without their progress bars (one small file per run)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


PAIRED_STATS = ("delta", "se", "se_cases", "se_networks", "z")


def parse_item(item: str) -> tuple[str, str, int | None]:
    """``RUN_ID`` or ``RUN_ID@ITERATION`` (one evaluation of a trial): (the item, the run id, the
    iteration or None). ValueError naming a malformed one."""
    rid, at, it = item.partition("@")
    if at and not (rid and it.isdigit()):
        raise ValueError(f"{item!r}: expected RUN_ID or RUN_ID@ITERATION (an evaluation's iteration, e.g. "
                         f"{rid or 'RUN_ID'}@0)")
    return item, rid, int(it) if at else None


def run_cases(client: MlflowClient, run, selected: bool = False, iteration: int | None = None):
    """The per-case outcomes (``CaseOutcomes``, metadata) a trial logged beside the set that stands for
    it (:func:`orchestrator.trial.set_artifact`: the final set of a finished trial, the latest
    evaluation's of one still running, with ``selected`` the one chosen on validation) or, given
    ``iteration``, those of its evaluation there (:func:`orchestrator.trial.cases_artifact`); or
    the reason there are none, as a string."""
    import tempfile

    from mlflow.exceptions import MlflowException

    from .artifacts import CASES_FILE, read_cases
    from .trial import cases_artifact, set_artifact

    path = cases_artifact(iteration) if iteration is not None else \
        f"{set_artifact(run.info.status == 'FINISHED', selected).rpartition('/')[0]}/{CASES_FILE}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with quiet_downloads():
                local = client.download_artifacts(run.info.run_id, path, tmp)
        except (MlflowException, OSError):
            return (f"no evaluation at iteration {iteration} logged its outcomes ({path})" if iteration is not None
                    else f"no {path} (not a trial; no evaluation logged there yet; or a trial that predates "
                         f"per-case outcomes)")
        try:
            return read_cases(local)
        except ValueError as e:
            return str(e)


def paired_runs(client: MlflowClient, runs: list, selected: bool = False, iterations: list | None = None,
                keys: list[str] | None = None) -> dict[str, Any]:
    """Each run's set minus the first run's, on the same test cases: the trials' logged per-case
    outcomes (:func:`run_cases`; ``iterations``: per run, an evaluation's iteration or None for the
    set that stands for it) through :func:`orchestrator.evaluate.paired_stats`; the seed pairs
    count where both evaluated networks of the same model and seeds (trials of one spec do).
    Returns ``{"reference", "set", "metric", "unit", "cases", "iterations": {key: it},
    "stats": {key: {delta, se, ...}}, "skipped": {key: why}}`` (``keys``: default the run ids);
    ``reference`` is None (and every run skipped) where the first run has no outcomes."""
    from .evaluate import paired_stats

    keys = keys or [r.info.run_id for r in runs]
    iterations = iterations or [None] * len(runs)
    got = {k: run_cases(client, r, selected, it) for k, r, it in zip(keys, runs, iterations)}
    ref_id = keys[0]
    out: dict[str, Any] = {"reference": None, "set": "the selected set" if selected else "the final or latest set",
                           "iterations": {}, "stats": {}, "skipped": {}}
    if isinstance(got[ref_id], str):
        out["skipped"] = {rid: g if isinstance(g, str) else f"the first run ({ref_id}) has no per-case outcomes"
                          for rid, g in got.items()}
        return out
    ref, ref_meta = got[ref_id]
    out.update({"reference": ref_id, "metric": ref.metric, "unit": ref.unit, "cases": int(ref.values.shape[1])})
    for rid, g in got.items():
        if isinstance(g, str):
            out["skipped"][rid] = g
            continue
        cases, meta = g
        out["iterations"][rid] = int(meta["iteration"]) if meta.get("iteration", "").isdigit() else None
        if rid == ref_id:
            continue
        if (meta.get("dataset"), cases.metric) != (ref_meta.get("dataset"), ref.metric):
            out["skipped"][rid] = (f"its outcomes are {cases.metric} on dataset {meta.get('dataset')!r}, the first "
                                   f"run's {ref.metric} on {ref_meta.get('dataset')!r}")
            continue
        same = cases.seeds == ref.seeds and meta.get("model") == ref_meta.get("model")
        try:
            out["stats"][rid] = paired_stats(cases.pairs(), ref.pairs(), same, rid)
        except ValueError as e:
            out["skipped"][rid] = str(e)
    return out


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
        t.add_column(Text(f"{i['run_name'] or ''}\n{i['key']}"), justify="left", overflow="fold")
    for r in comparison["rows"]:
        t.add_row("≠" if r["differs"] else "", Text(f"{r['section']} {r['name']}" if r["section"] != "run"
                                                     else r["name"]),
                  *(Text(_cell(v)) for v in r["values"].values()), style="bold" if r["differs"] else None)
    t.caption = "≠ (bold): the values differ; metrics are the latest logged values; '-': not logged for that run"
    return t


def compare_to_json(comparison: dict[str, Any]) -> str:
    """The comparison as strict JSON: NaN (a standard error without seed pairs) as null."""
    def strict(v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: strict(x) for k, x in v.items()}
        if isinstance(v, list):
            return [strict(x) for x in v]
        return v

    return json.dumps(strict(comparison), indent=2)


def compare_to_csv(comparison: dict[str, Any]) -> str:
    ids = [i["key"] for i in comparison["runs"]]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["section", "name", "differs", *ids])
    for r in comparison["rows"]:
        w.writerow([r["section"], r["name"], r["differs"], *("" if r["values"][i] is None else r["values"][i]
                                                              for i in ids)])
    return buf.getvalue()
