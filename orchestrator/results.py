"""Results from MLflow: one row per trial, joined with the random baseline of the same budget
and the full-data accuracy of the experts, scored against both (:func:`scores`: gain over the
random subset, gap to full data, DD-Ranking score); printed as a table, JSON or CSV."""
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
          "full_data_acc_mean", "full_data_acc_std", "gain_over_random", "gap_to_full", "ddrs",
          "syn_lr", "iterations", "failure_reason"]
# the scores of a row on its headline metric (see ``scores``)
SCORE_FIELDS = ["gain_over_random", "gap_to_full", "ddrs"]
# cross-architecture: a trial's final evaluation on other architectures (``evaluation.models``)
# logs ``acc_mean/<arch>`` and ``acc_std/<arch>``; rows carry them, and the random subset's as
# ``random_acc_mean/<arch>`` / ``random_acc_std/<arch>``
ARCH_STATS = ("acc_mean", "acc_std")

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
            "syn_lr": m.get("final_syn_lr"), "iterations": int(p.get("iterations", 0)), "model": p.get("model.name"),
            "failure_reason": t.get("orchestrate.failure_reason"),
            "hyperparameters": {k[3:]: v for k, v in p.items() if k.startswith("hp.")},
            **{f: m.get(f) for f in SEQ_FIELDS if not f.startswith("random_")},
            **{k: v for k, v in m.items() if k.partition("/")[0] in ARCH_STATS and k.partition("/")[2]},
        })
    attach_baselines(rows)
    attach_scores(rows)
    rows.sort(key=lambda r: (r["sweep"] or "", not is_baseline(r["algorithm"]), r["algorithm"] or "", r["budget"]))
    return rows


def architectures(rows: list[dict[str, Any]]) -> list[str]:
    """The other evaluation architectures the rows carry (``acc_mean/<arch>``), sorted by name."""
    return sorted({k.partition("/")[2] for r in rows for k in r
                   if k.partition("/")[0] in ARCH_STATS and k.partition("/")[2]})


def arch_fields(rows: list[dict[str, Any]]) -> list[str]:
    """The per-architecture fields of ``rows``: ``acc_mean/<arch>``, ``acc_std/<arch>`` and the
    random subset's ``random_acc_mean/<arch>``, ``random_acc_std/<arch>`` for each architecture."""
    return [f"{p}{s}/{a}" for a in architectures(rows) for p in ("", "random_") for s in ARCH_STATS]


def attach_baselines(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give every row (in place) the ``random_<metric>_mean`` / ``_std`` of the random-subset
    trial of the same sweep, dataset and budget (None where there is none), per architecture too
    (``random_acc_mean/<arch>``; every row gets every architecture's fields of ``rows``, None
    where it has none); returns ``rows``."""
    baseline = {(r["sweep"], r["dataset"], r["budget"]): r for r in rows if is_baseline(r["algorithm"])}
    archs = architectures(rows)
    for r in rows:
        b = baseline.get((r["sweep"], r["dataset"], r["budget"]), {})
        r["random_acc_mean"], r["random_acc_std"] = b.get("acc_mean"), b.get("acc_std")
        for k in SEQ_METRICS:
            r[f"random_{k}_mean"], r[f"random_{k}_std"] = b.get(f"{k}_mean"), b.get(f"{k}_std")
        for a in archs:
            for s in ARCH_STATS:
                r.setdefault(f"{s}/{a}", None)
                r[f"random_{s}/{a}"] = b.get(f"{s}/{a}")
    return rows


# ---------------------------------------------------------------------------------------------
# scores: against the random subset and the full data

DDRS_WEIGHT = 0.5  # DD-Ranking's default w: IOR and HLR weigh the same


def ddrs(acc: float, random_acc: float, full_acc: float, w: float = DDRS_WEIGHT) -> float:
    """The DD-Ranking score (DDRS) of a distilled set, from DD-Ranking (Li et al. 2025, "DD-Ranking:
    Rethinking the Evaluation of Dataset Distillation", arXiv:2505.13300,
    https://github.com/NUS-HPC-AI-Lab/DD-Ranking; renamed "label-robust score", LRS, there since
    May 2025, same formula)::

        IOR  = acc - random_acc        improvement over random (same budget, same protocol)
        HLR  = full_acc - acc          hard-label recovery: what is left to the full data
        alpha = w * IOR - (1 - w) * HLR
        DDRS = (e**alpha - e**-1) / (e - e**-1)

    Accuracies are fractions in [0, 1], so that alpha lies in [-1, 1] and DDRS in [0, 1], the
    range DD-Ranking normalises to (its README and docs; its code computes top-1 accuracy in
    percent, ``100 / batch_size``, and feeds percentage points to ``exp`` unchanged, which gives
    scores outside [0, 1]: we follow the definition, not that unit). alpha = 0 (at w = 0.5: the
    set's gain over random equals its gap to full data) gives (1 - e**-1) / (e - e**-1) ≈ 0.269;
    alpha = acc - (random_acc + full_acc) / 2 at w = 0.5, so a set that matches the full data
    scores (e**(IOR/2) - e**-1) / (e - e**-1), 0.545 at most. Our trials evaluate every set
    with hard labels under one protocol, so DD-Ranking's "syn-hard" and "syn-any" accuracies are
    the same number here. DD-Ranking averages the score over its evaluation rounds; we compute it
    from the mean accuracies (rows keep only means and stds). ValueError when an accuracy is
    outside [0, 1] (percent, say) or w is outside [0, 1]."""
    for name, v in (("acc", acc), ("random_acc", random_acc), ("full_acc", full_acc), ("w", w)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} = {v} is outside [0, 1]: DDRS takes accuracies as fractions")
    alpha = w * (acc - random_acc) - (1.0 - w) * (full_acc - acc)
    return (math.exp(alpha) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


def scores(row: dict[str, Any]) -> dict[str, float | None]:
    """The scores of a results row on its headline metric (:func:`row_metric`: ``acc`` for images,
    ``hr10`` for recommendation, ``ppl`` for language modelling), as
    ``{"gain_over_random", "gap_to_full", "ddrs"}``:

    - ``gain_over_random``: ours minus the random subset's (``random_<m>_mean``: same sweep,
      dataset and budget, hence same protocol and seeds); for perplexity, where lower is better,
      the random subset's minus ours. Positive: better than random.
    - ``gap_to_full``: the full data's (``full_data_<m>_mean``) minus ours; for perplexity ours
      minus the full data's. Positive: short of full data.
    - ``ddrs``: :func:`ddrs` with IOR = gain, HLR = gap, for the fractions in [0, 1] (accuracy,
      HR@10); None for perplexity, which is unbounded (DD-Ranking's normalisation assumes
      IOR and HLR in [-1, 1]).

    Units are the metric's: fractions for accuracy and HR@10 (0.12 = 12 points), perplexity for
    perplexity. A score is None where the row lacks a number it needs (no random subset of that
    budget in the sweep, no full-data result, a failed trial). The random subset's own row gets a
    gain of 0. Only ``<m>_mean``, ``random_<m>_mean`` and ``full_data_<m>_mean`` are read, so a
    trial can score itself with ``scores({"acc_mean": a, "random_acc_mean": r,
    "full_data_acc_mean": f})`` and log the result as MLflow metrics."""
    out: dict[str, float | None] = dict.fromkeys(SCORE_FIELDS)
    metric = row_metric(row)
    if metric is None:
        return out
    key, higher = metric
    ours, rnd, full = (_number(row.get(f"{p}{key}_mean")) for p in ("", "random_", "full_data_"))
    sign = 1.0 if higher else -1.0
    if ours is not None and rnd is not None:
        out["gain_over_random"] = sign * (ours - rnd)
    if ours is not None and full is not None:
        out["gap_to_full"] = sign * (full - ours)
    if higher and None not in (ours, rnd, full):
        try:
            out["ddrs"] = ddrs(ours, rnd, full)
        except ValueError:  # not fractions: no score rather than a wrong one
            pass
    return out


def attach_scores(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give every row (in place) its :func:`scores`; call after :func:`attach_baselines`."""
    for r in rows:
        r.update(scores(r))
    return rows


def _with_scores(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with its scores computed from its numbers (rows built by hand may lack them)."""
    return {**row, **scores(row)}


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


def _seq_table(rows: list[dict[str, Any]], title: str) -> Table:
    """Sequence trials: the task's headline metric, its baseline, the full-data result and % of it;
    the scores on the row's headline metric line."""
    t = Table(title=title)
    for col in ("algorithm", "dataset", "budget (seqs)", "metric", "final", "random", "full data", "% of full",
                "gain", "gap", "DDRS", "status", "run_id"):
        t.add_column(col, justify="right" if col not in ("algorithm", "dataset", "metric", "status", "run_id")
                     else "left", no_wrap=col == "run_id")
    only_random = all(is_baseline(r["algorithm"]) for r in rows)  # e.g. ``results --algorithm random``
    for r in rows:
        if is_baseline(r["algorithm"]) and not only_random:
            continue
        status = r["status"] if not r["failure_reason"] else f"{r['status']}: {r['failure_reason'][:60]}"
        headline, sc = (row_metric(r) or ("", True))[0], scores(r)
        for k in SEQ_METRICS:
            if r.get(f"{k}_mean") is None and r.get(f"full_data_{k}_mean") is None:
                continue
            fmt = (lambda m, sd: "-" if m is None else f"{m:.2f} ± {sd or 0:.2f}") if k == "ppl" else _pm
            pct = r.get(f"{k}_pct_of_full")
            score_cells = [_fmt_score(k, f, sc[f]) if k == headline else "" for f in SCORE_FIELDS]
            t.add_row(r["algorithm"], r["dataset"], str(r["budget"]), k, fmt(r[f"{k}_mean"], r[f"{k}_std"]),
                      fmt(r[f"random_{k}_mean"], r[f"random_{k}_std"]),
                      fmt(r[f"full_data_{k}_mean"], r[f"full_data_{k}_std"]), "-" if pct is None else f"{pct:.0f}%",
                      *score_cells, status, r["run_id"])
    t.caption = ("HR@10 / NDCG@10 (%, full ranking; _s100: against 100 sampled negatives) or perplexity, "
                 "mean ± std over the evaluation networks; "
                 "% of full: ours ÷ full data (perplexity: full ÷ ours); on the headline metric's line "
                 "(HR@10, or perplexity): gain over the random subset and gap to full data (points; perplexity: "
                 "lower is better, so random − ours and ours − full), DDRS: DD-Ranking score (none for perplexity)")
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
    for col in ("algorithm", "dataset", "IPC", "acc (final)", "best over evals*", "random subset",
                "full data (experts)", "gain", "gap", "DDRS", "status", "run_id"):
        t.add_column(col, justify="right" if col not in ("algorithm", "dataset", "status", "run_id") else "left",
                     no_wrap=col == "run_id")
    only_random = all(is_baseline(r["algorithm"]) for r in rows)  # e.g. ``results --algorithm random``
    for r in rows:
        if is_baseline(r["algorithm"]) and not only_random:
            continue
        status = r["status"] if not r["failure_reason"] else f"{r['status']}: {r['failure_reason'][:60]}"
        sc = scores(r)
        t.add_row(r["algorithm"], r["dataset"], str(r["budget"]), _pm(r["acc_mean"], r["acc_std"]),
                  _pm(r["acc_best_over_evals_mean"], r["acc_best_over_evals_std"]),
                  _pm(r["random_acc_mean"], r["random_acc_std"]),
                  _pm(r["full_data_acc_mean"], r["full_data_acc_std"]),
                  *(_fmt_score("acc", f, sc[f]) for f in SCORE_FIELDS), status, r["run_id"])
    t.caption = ("test accuracy (%), mean ± std over the evaluation networks; *best over periodic evaluations "
                 "is selected on the test set, as MTT reports it; gain: acc − random subset, gap: full data "
                 "− acc (points); DDRS: DD-Ranking score (e^α − e^−1)/(e − e^−1), α = ½·gain − ½·gap on "
                 "fractions")
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


def to_json(rows: list[dict[str, Any]]) -> str:
    """The rows with their scores (``gain_over_random``, ``gap_to_full``, ``ddrs``) and, where
    there are some, the per-architecture fields (``acc_mean/<arch>`` ...)."""
    return json.dumps([_with_scores(r) for r in rows], indent=2)


def to_csv(rows: list[dict[str, Any]]) -> str:
    """``FIELDS`` (scores included), the per-architecture fields of the rows (:func:`arch_fields`,
    none when no trial evaluated other architectures), ``SEQ_FIELDS`` and the hyperparameters."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS + arch_fields(rows) + SEQ_FIELDS + ["hyperparameters"],
                       extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**_with_scores(r), "hyperparameters": json.dumps(r["hyperparameters"], sort_keys=True)})
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
    """Writes ``results.csv`` (every trial of the sweep, failed ones included, with its scores
    and per-architecture fields, see :func:`to_csv`) and ``accuracy_vs_budget.png`` (the final
    headline metric of the finished trials against the budget: accuracy for images, HR@10 for
    recommendation, perplexity for language modelling; below it the gain over the random subset)
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
    log_scores(tracking_uri, rows)
    return [csv_path, png_path]


def log_scores(tracking_uri: str, rows: list[dict[str, Any]]) -> None:
    """Each finished trial's scores as metrics of its own MLflow run (``gain_over_random``,
    ``gap_to_full``, ``ddrs``: they need the sweep's random subset, so they are known at the end
    of the sweep, not when the trial ends). Scores that cannot be computed are not logged."""
    client = MlflowClient(tracking_uri)
    for r in rows:
        if r.get("status") != "FINISHED" or not r.get("run_id"):
            continue
        for k in ("gain_over_random", "gap_to_full", "ddrs"):
            v = r.get(k)
            if v is not None and math.isfinite(v):
                client.log_metric(r["run_id"], k, float(v))
