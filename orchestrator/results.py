"""Results from MLflow: one row per trial, joined with the random baseline of the same budget
and the full-data accuracy of the experts, scored against both (:func:`scores`: gain over the
random subset, gap to full data, DD-Ranking score); printed as a table, JSON or CSV, and browsed
(filters, the best trial per group, sorting). Runs side by side are in :mod:`orchestrator.compare`,
a sweep's end-of-sweep summary in :mod:`orchestrator.summary`, the terminal tables in
:mod:`orchestrator.results_tables`."""
from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

from mlflow import MlflowClient

from .compare import get_runs
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
            # the set chosen on the validation split (sequences): its iteration and test metrics
            "selected_iteration": None if m.get("selected_iteration") is None else int(m["selected_iteration"]),
            "selected_by": t.get("orchestrate.selected_by"),
            **{k: v for k, v in m.items() if k.endswith(("_selected_mean", "_selected_std"))},
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


PAIRED_FIELDS = ["gain_se", "gain_z"]


def attach_paired(tracking_uri: str, rows: list[dict[str, Any]],
                  among: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Give every trial row (in place) the paired standard error of its gain over the random subset
    of its sweep, dataset and budget, from the per-case outcomes both logged beside their final
    sets (:func:`orchestrator.compare.run_cases`; a trial still running: its latest evaluation's):
    ``gain_se`` in the gain's units (fractions; None for perplexity, whose paired difference is a
    ln ratio) and ``gain_z`` = the paired difference over its standard error, signed as the gain
    (positive: better than random). Both None where either run lacks outcomes. ``among``: the rows
    to find the random subsets in (default ``rows``; :func:`collect`'s, when ``rows`` are filtered).
    Returns ``rows``."""
    from .compare import run_cases
    from .evaluate import paired_stats

    client = MlflowClient(tracking_uri)
    baselines = {(r["sweep"], r["dataset"], r["budget"]): r for r in (rows if among is None else among)
                 if is_baseline(r["algorithm"])}
    cache: dict[str, Any] = {}

    def cases(run_id: str):
        if run_id not in cache:
            cache[run_id] = run_cases(client, client.get_run(run_id))
        return cache[run_id]

    for r in rows:
        r.update(dict.fromkeys(PAIRED_FIELDS))
        b = baselines.get((r["sweep"], r["dataset"], r["budget"]))
        if b is None or b["run_id"] == r["run_id"]:
            continue
        ours, theirs = cases(r["run_id"]), cases(b["run_id"])
        if isinstance(ours, str) or isinstance(theirs, str) or ours[0].metric != theirs[0].metric:
            continue
        try:
            st = paired_stats(ours[0].pairs(), theirs[0].pairs(), ours[0].seeds == theirs[0].seeds, r["run_id"])
        except ValueError:
            continue
        higher = ours[0].metric != "ppl"
        r["gain_se"] = st["se"] if higher else None
        r["gain_z"] = (st["z"] if higher else -st["z"]) if not math.isnan(st["z"]) else None
    return rows


def attach_scores(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give every row (in place) its :func:`scores`; call after :func:`attach_baselines`."""
    for r in rows:
        r.update(scores(r))
    return rows


def _with_scores(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with its scores computed from its numbers (rows built by hand may lack them)."""
    return {**row, **scores(row)}


def to_json(rows: list[dict[str, Any]]) -> str:
    """The rows with their scores (``gain_over_random``, ``gap_to_full``, ``ddrs``) and, where
    there are some, the per-architecture fields (``acc_mean/<arch>`` ...)."""
    return json.dumps([_with_scores(r) for r in rows], indent=2)


def to_csv(rows: list[dict[str, Any]]) -> str:
    """``FIELDS`` (scores included), the per-architecture fields of the rows (:func:`arch_fields`,
    none when no trial evaluated other architectures), ``SEQ_FIELDS`` and the hyperparameters."""
    buf = io.StringIO()
    paired = PAIRED_FIELDS if any("gain_z" in r for r in rows) else []
    w = csv.DictWriter(buf, fieldnames=FIELDS + paired + arch_fields(rows) + SEQ_FIELDS + ["hyperparameters"],
                       extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**_with_scores(r), "hyperparameters": json.dumps(r["hyperparameters"], sort_keys=True)})
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# browsing: filters, the best trial per group, sorting (pure functions on the rows of ``collect``)

SORT_FIELDS = FIELDS + PAIRED_FIELDS + SEQ_FIELDS
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
