"""Fidelity report: the reference sweeps against the published numbers (issue 11, section 4).

For each reference spec (default: every ``search_spaces/reference/*.yaml``; positional arguments
name others) it reads the latest sweep of that spec (MLflow experiment = the spec's name) from the
store of ``--root`` and prints one row per (dataset, method, budget): iterations done of planned,
the final evaluation (mean ± std over the evaluation networks), for sequence trials the evaluation
that scored best on the validation split (with its iteration: the set ``--publish`` publishes; for
a trial still running, the one its ``eval/valid_<metric>_mean`` history chooses so far), the
best of the periodic evaluations (the ``eval/<metric>_mean`` history, with its iteration; selected
on the test set, as MTT reports), the random real subset of the same budget from the same sweep, % of the full-data
result, the published number with its source, and the trial's wall time (MLflow run start to
end, or to now for a trial still running; with the steps' own time when a resumed trial's wall
time counts hours it was stopped). Images report test accuracy; ML-100k HR@10 (and
NDCG@10 on a second line); PTB perplexity. A sweep still running is read as it stands.

    orchestrate launch search_spaces/reference/mnist_ipc1.yaml --root ~/runs-ref   # hours on a CPU
    python bench/fidelity.py --root ~/runs-ref            # read the sweeps of the reference specs
    python bench/fidelity.py SPEC.yaml --root R --run     # orchestrate launch SPEC --root R, then read
    python bench/fidelity.py --quick --json /tmp/fid.json # a tiny digits sweep in a temporary root
    python bench/fidelity.py --direct OUT --publish distilled/ --unfinished   # bench/direct.py runs
    python bench/fidelity.py --verify distilled/          # every published set, evaluated independently
    python bench/fidelity.py --reevaluate distilled/ --also-strategy S --also-epochs 1000   # no sweep needed

``--run`` launches each spec with ``orchestrate launch SPEC --root ROOT`` in a subprocess (the
command users run; a sweep that exists is resumed), then reads. ``--quick`` writes a CI-sized
digits spec (MTT at IPC 1 and 10, a random subset of each) to a temporary folder and runs it so,
into a temporary root (or ``--root``): a few minutes on 2 CPU cores; digits has no published
number, so that column shows none.

Published numbers (``PUBLISHED``; nothing else is compared against): MNIST DC and DSA from the
DatasetCondensation README, DM from its paper; MTT/MCT on MNIST have no paper number, so DSA's is shown as the level
to reach; CIFAR-10 MTT from the MTT paper; Farzi on ML-100k as the paper's claim of 98-120% of
full-data performance. JSON (``--json``): ``rows`` with the logged values (accuracy, HR@10,
NDCG@10 as fractions of 1, perplexity as is) and the published numbers as their sources state
them (percent), ``sweeps``, the machine.
"""
from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from common import REPO, bench_console, bench_parser, machine_info, shared_data, write_results
from rich.markup import escape
from rich.table import Table

sys.path.insert(0, str(REPO))

from orchestrator.results import best_per_group, headline_metric, row_metric  # noqa: E402

# -- published numbers ----------------------------------------------------------------------------
DC_README = "VICO-UoE/DatasetCondensation README, ConvNet-3"
# DC's authors evaluate DC sets with DC's own augmentation, not DSA's: compare under it
# (``--also-strategy dc:crop_scale_rotate``; the same MNIST IPC 1 set reads 88.4 under DSA's, 91.6 under DC's)
DC_README_DC_AUG = f"{DC_README}, under DC's augmentation (crop_scale_rotate)"
DM_PAPER = "Zhao & Bilen 2023 (DM, WACV), Table 1, ConvNet-3"
MTT_PAPER = "Cazenavette et al. 2022 (MTT), Table 1"  # ZCA at IPC 1 and 10, none at IPC 50
FARZI_PAPER = "Sachdeva et al. 2023 (Farzi), abstract"

# (dataset, method, budget or None for any budget) -> what the source states
PUBLISHED: dict[tuple[str, str, int | None], dict[str, Any]] = {
    **{("mnist", "dc", b): {"value": v, "unit": "acc %", "source": DC_README_DC_AUG}
       for b, v in ((1, 91.7), (10, 97.4), (50, 98.8))},
    **{("mnist", "dsa", b): {"value": v, "unit": "acc %", "source": DC_README}
       for b, v in ((1, 88.7), (10, 97.8), (50, 99.2))},
    **{("mnist", "dm", b): {"value": v, "unit": "acc %", "source": DM_PAPER}
       for b, v in ((1, 89.7), (10, 97.5), (50, 98.6))},
    **{("cifar10", "mtt", b): {"value": v, "unit": "acc %", "source": f"{MTT_PAPER}, {zca}"}
       for b, v, zca in ((1, 46.3, "ZCA"), (10, 65.3, "ZCA"), (50, 71.6, "no ZCA"))},
    ("ml-100k", "farzi", None): {"value": [98.0, 120.0], "unit": "% of full", "source": FARZI_PAPER},
}
# methods with no published number of their own on a dataset: the method whose number is the level to reach
REACH = {("mnist", "mtt"): "dsa", ("mnist", "mct"): "dsa"}

SECONDARY = {"hr10": ("ndcg10", "hr10_s100", "ndcg10_s100")}  # shown under the headline metric
LABELS = {"acc": "acc", "hr10": "HR@10", "ndcg10": "NDCG@10", "hr10_s100": "HR@10 (100 neg.)",
          "ndcg10_s100": "NDCG@10 (100 neg.)", "ppl": "ppl"}


def published(dataset: str, method: str, budget: int) -> dict[str, Any] | None:
    """The published number for (dataset, method, budget) with its source and ``kind``
    ("published", or "level to reach" when it is another method's); None when there is none."""
    d, m = (dataset or "").lower(), (method or "").lower()
    for key in ((d, m, budget), (d, m, None)):
        if key in PUBLISHED:
            return {**PUBLISHED[key], "method": m, "kind": "published"}
    other = REACH.get((d, m))
    if other and (d, other, budget) in PUBLISHED:
        return {**PUBLISHED[(d, other, budget)], "method": other,
                "kind": f"level to reach ({other.upper()}; no {m.upper()} paper number)"}
    return None


# -- rows -----------------------------------------------------------------------------------------
def best_of(means: list[tuple[int, float]], stds: list[tuple[int, float]], higher: bool = True):
    """The best periodic evaluation, ``(mean, std, step)``, of a metric history given as
    ``[(step, value)]`` (max, or min when lower is better; the earlier step on a tie); None if empty."""
    if not means:
        return None
    std_at = dict(stds)
    step, mean = min(means, key=lambda sv: (-sv[1] if higher else sv[1], sv[0]))
    return mean, std_at.get(step), step


def _pct(final, full, higher: bool) -> float | None:
    if final is None or not full:
        return None
    return 100 * (final / full if higher else full / final)


def report_row(row: dict[str, Any], history: dict[str, list[tuple[int, float]]], start_ms: int | None,
               end_ms: int | None, now_ms: int, spec: str = "", trials: int = 1,
               default: tuple[str, bool] = ("acc", True)) -> dict[str, Any]:
    """One report row from a row of :func:`orchestrator.results.collect` (random baseline
    attached), the trial's metric histories (``eval/<metric>_mean`` / ``_std`` and
    ``sec_per_iter``, each ``[(step, value)]``) and its MLflow start / end times (ms).
    ``default``: the sweep's headline metric, for a row that has logged none yet (running)."""
    metric, higher = row_metric(row) or default
    running = row.get("status") == "RUNNING"
    selected, selected_by = row.get("selected_iteration"), row.get("selected_by")
    at: dict[str, Any] = {}  # metric statistic -> value at the selected evaluation, while the trial runs
    if selected is None and running:  # the evaluation the trial would stand behind if it ended now
        valid = best_of(history.get(f"eval/valid_{metric}_mean", []), [], higher)
        if valid:  # chosen as the trial chooses (its orchestrate.selected_by tag, logged when it ends)
            selected, selected_by = valid[2], f"valid_{metric} ({'max' if higher else 'min'})"
            at = {key[len("eval/"):]: dict(h).get(selected) for key, h in history.items() if key.startswith("eval/")}
    metrics = {}
    for k in (metric, *SECONDARY.get(metric, ())):
        best = best_of(history.get(f"eval/{k}_mean", []), history.get(f"eval/{k}_std", []), higher)
        final, full = row.get(f"{k}_mean"), row.get(f"full_data_{k}_mean")
        pct = row.get(f"{k}_pct_of_full")
        metrics[k] = {"final_mean": final, "final_std": row.get(f"{k}_std"),
                      # the evaluation chosen on the validation split (sequences), None where there is none
                      "selected_mean": row.get(f"{k}_selected_mean", at.get(f"{k}_mean")),
                      "selected_std": row.get(f"{k}_selected_std", at.get(f"{k}_std")),
                      "best_mean": best and best[0], "best_std": best and best[1], "best_iteration": best and best[2],
                      "random_mean": row.get(f"random_{k}_mean"), "random_std": row.get(f"random_{k}_std"),
                      "full_data_mean": full, "full_data_std": row.get(f"full_data_{k}_std"),
                      "pct_of_full": pct if pct is not None else _pct(final, full, higher)}
    per_step = dict(history.get("sec_per_iter", []))  # one value per iteration (a resumed trial logs on)
    done = max(per_step, default=0)
    end = now_ms if running or not end_ms else end_ms
    return {"spec": spec, "sweep": row.get("sweep"), "run_id": row.get("run_id"), "dataset": row.get("dataset"),
            "method": row.get("algorithm"), "budget": row.get("budget"), "trials": trials,
            "status": row.get("status"), "running": running, "failure_reason": row.get("failure_reason"),
            "iterations_done": done, "iterations_planned": row.get("iterations"),
            "metric": metric, "higher_is_better": higher, "metrics": metrics,
            "selected_iteration": selected, "selected_by": selected_by,
            "published": published(row.get("dataset"), row.get("algorithm"), row.get("budget")),
            "wall_s": (end - start_ms) / 1000 if start_ms is not None else None,
            # the distillation steps' own time: a trial resumed across sessions has a wall time that
            # counts the hours it was stopped; this does not (nor its evaluations)
            "steps_s": sum(per_step.values()) if per_step else None}


def report_rows(rows: list[dict[str, Any]], histories: dict[str, dict], times: dict[str, tuple], now_ms: int,
                spec: str = "") -> list[dict[str, Any]]:
    """Report rows of one sweep: the distilled trials (the random subsets are their baseline
    column), one per (dataset, method, budget) (the best final one when a grid gave several).
    ``histories`` and ``times`` (``(start_ms, end_ms)``) are keyed by run id."""
    distilled = [r for r in rows if r.get("algorithm") != "random"]
    counts: dict[tuple, int] = {}
    for r in distilled:
        key = (r.get("sweep"), r.get("dataset"), r.get("algorithm"), r.get("budget"))
        counts[key] = counts.get(key, 0) + 1
    default = headline_metric(rows)
    out = [report_row(r, histories.get(r["run_id"], {}), *times.get(r["run_id"], (None, None)), now_ms, spec,
                      counts[(r.get("sweep"), r.get("dataset"), r.get("algorithm"), r.get("budget"))], default)
           for r in best_per_group(distilled)]
    return sorted(out, key=lambda r: (r["dataset"] or "", r["method"] or "", r["budget"] or 0))


# -- reading MLflow ---------------------------------------------------------------------------------
class ReportError(Exception):
    """A spec or a root that cannot be reported on (the message names them)."""


def open_store(root: Path):
    """The workspace of ``root``; ReportError when it has no tracking store."""
    from orchestrator.tracking import TrackingStoreError, check_tracking_store, sqlite_file, workspace

    if not root.is_dir():
        raise ReportError(f"{root}: no such folder, so no tracking store (the --root of `orchestrate launch`; "
                          f"add --run to launch the specs into it)")
    ws = workspace(root)
    db = sqlite_file(ws.tracking_uri)
    if db is not None and not db.is_file():
        raise ReportError(f"{root}: no tracking store ({db} does not exist); launch the specs with "
                          f"`orchestrate launch SPEC --root {root}` or add --run")
    try:
        check_tracking_store(ws.tracking_uri, write=False)
    except TrackingStoreError as e:
        raise ReportError(str(e)) from e
    return ws


def read_sweep(spec_path: str, ws, now_ms: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The latest sweep of ``spec_path`` in the store of ``ws``: its description and report rows."""
    from mlflow import MlflowClient

    from orchestrator.compare import get_runs
    from orchestrator.results import collect, latest_sweep
    from orchestrator.spec import SpecError, load_spec

    try:
        spec = load_spec(spec_path)
    except SpecError as e:
        raise ReportError(str(e)) from e
    client = MlflowClient(ws.tracking_uri)
    try:
        sweep = latest_sweep(client, spec.name)
    except LookupError:
        sweep = None
    if sweep is None:
        raise ReportError(f"{spec_path}: no sweep of this spec (MLflow experiment {spec.name!r}) in the tracking "
                          f"store of {ws.root} ({ws.tracking_uri}); run `orchestrate launch {spec_path} --root "
                          f"{ws.root}` or add --run")
    rows = collect(ws.tracking_uri, sweep=sweep, experiment=spec.name)
    runs = {r.info.run_id: r for r in get_runs(client, [sweep] + [r["run_id"] for r in rows])}
    parent = runs[sweep]
    for r in rows:  # a trial logs the full-data result at its end: until then, the sweep's (parent run's)
        for k, v in parent.data.metrics.items():
            if k.startswith("full_data_") and r.get(k) is None:
                r[k] = v
    default = headline_metric(rows)
    histories, times = {}, {}
    for r in rows:
        if r["algorithm"] == "random":
            continue
        metric = (row_metric(r) or default)[0]
        keys = ["sec_per_iter", f"eval/valid_{metric}_mean"] + [
            f"eval/{k}_{s}" for k in (metric, *SECONDARY.get(metric, ())) for s in ("mean", "std")]
        histories[r["run_id"]] = {k: [(m.step, m.value) for m in client.get_metric_history(r["run_id"], k)]
                                  for k in keys}
        info = runs[r["run_id"]].info
        times[r["run_id"]] = (info.start_time, info.end_time)
    sweep_hash = parent.data.tags.get("orchestrate.spec_hash")
    commit = parent.data.tags.get("orchestrate.git_commit")
    desc = {"spec": spec_path, "name": spec.name, "sweep_run_id": sweep, "status": parent.info.status,
            "spec_hash": spec.hash, "spec_hashes": list(spec.hashes), "sweep_spec_hash": sweep_hash,
            "git_commit": commit, "trials": len(rows)}
    out = report_rows(rows, histories, times, now_ms, spec=spec_path)
    for r in out:
        # the trial's code history (a trial resumed under later code ran partly on it), else the sweep's launch
        r["git_commits"] = code_history(runs[r["run_id"]].data.tags) if r["run_id"] in runs else None
        known = [c for _, c in r["git_commits"] or [] if c]
        r["git_commit"], r["spec_hash"] = (known[-1] if known else commit), sweep_hash
    return desc, out


# -- bench/direct.py outputs -------------------------------------------------------------------------
def entry_spec(spec_path: str, sets: list[str] | None = None):
    """The validated spec of a row or index entry: its file (relative to the repository unless
    absolute) with the ``--set`` overrides a bench/direct.py run applied (``direct.load``)."""
    import direct

    path = Path(spec_path) if Path(spec_path).is_absolute() else REPO / spec_path
    try:
        return direct.load(str(path), list(sets or []))
    except (direct.DirectError, FileNotFoundError) as e:
        raise ReportError(f"{spec_path}: {e}") from e


def entry_hashes(entry: dict[str, Any]) -> tuple[str, ...]:
    """The hashes of an index entry's spec as it stood when the set was made. A trial that started
    from an exported set (``init_from``) hashed that file's sha256, which the set records
    (``init_from`` of the entry): the file at the path may since have been replaced, as when the
    continued set is published over the one it started from."""
    spec = entry_spec(entry["spec"], entry.get("set"))
    algo = spec.algorithms.get(entry["method"], {})
    start = algo.get("init_from", {}).get(entry["budget"])
    if entry.get("init_from") and start is not None:
        algo["init_from"][entry["budget"]] = {**start, "sha256": entry["init_from"]["sha256"]}
    return spec.hashes


def _headline(evaluation: dict[str, Any]) -> tuple[str, bool]:
    for metric, higher in (("acc", True), ("hr10", True), ("ppl", False)):
        if metric in evaluation:
            return metric, higher
    raise ReportError(f"no headline metric (acc, hr10, ppl) among {sorted(evaluation)}")


def direct_rows(folders: list[Path]) -> list[dict[str, Any]]:
    """Report rows of bench/direct.py ``--out`` folders (``<trial>/curve.json`` and the trial's set),
    for runs made where Ray and MLflow are not (a lent GPU machine). The recipe is checked, not
    taken on trust: the curve's spec with its overrides must validate to the spec hash that the set
    file carries. A trial that did not reach its planned iterations is ``CUT OFF`` (published with
    ``--unfinished``, by the set of its latest evaluation). The random baseline of a row is the
    random trial of the same dataset and budget under the same model and evaluation section, from
    any of the folders (a random subset does not depend on the experts)."""
    from orchestrator.artifacts import read_synthetic

    trials = []
    for folder in folders:
        found = sorted(Path(folder).glob("*/curve.json"))
        if not found:
            raise ReportError(f"{folder}: no <trial>/curve.json in it (a bench/direct.py --out folder)")
        for path in found:
            curve = json.loads(path.read_text())
            if not curve.get("spec"):
                raise ReportError(f"{path}: names no spec (bench/direct.py records its spec and --set overrides "
                                  f"in every curve.json; an older curve needs them added, then checked here)")
            spec = entry_spec(curve["spec"], curve.get("set"))
            chosen = curve.get("selected") is not None
            set_file = path.parent / ("synthetic_selected.safetensors" if chosen else "synthetic.safetensors")
            try:
                _, meta = read_synthetic(set_file)
            except (OSError, ValueError) as e:
                raise ReportError(f"{set_file}: {e}") from e
            if meta.get("spec_hash") not in spec.hashes or curve.get("spec_hash", spec.hash) not in spec.hashes:
                raise ReportError(f"{set_file}: made by spec {meta.get('spec_hash')}, but {curve['spec']} with "
                                  f"{curve.get('set') or 'no overrides'} is {spec.hash}: not the recipe of this set")
            trials.append((path, curve, spec, set_file, chosen))

    def protocol(spec) -> str:  # what a random subset's numbers depend on (not how often it was evaluated)
        ev = {k: v for k, v in spec.evaluation.items() if k != "interval"}
        return json.dumps([spec.dataset["name"], spec.model, ev], sort_keys=True, default=str)

    randoms = {(protocol(spec), curve["budget"]): curve["evals"][0]
               for _, curve, spec, _, _ in trials if curve["algorithm"] == "random" and curve["evals"]}
    scored = []  # (the set's own score: chosen on validation, else its latest evaluation; row)
    for path, curve, spec, set_file, chosen in trials:
        if curve["algorithm"] == "random" or not curve["evals"]:
            continue
        evals = curve["evals"]
        metric, higher = _headline(evals[-1])
        finished = curve["iterations_done"] >= curve["iterations_planned"] and not curve.get("diverged")
        at = {e["iteration"]: e for e in evals}
        sel = at.get(curve["selected"][0]) if chosen else None
        rand = randoms.get((protocol(spec), curve["budget"]), {})
        metrics = {}
        for k in (metric, *SECONDARY.get(metric, ())):
            hist = [(e["iteration"], e[k][0], e[k][1]) for e in evals if k in e]
            best = (max if higher else min)(hist, key=lambda h: h[1]) if hist else None
            final = evals[-1].get(k) if finished else None
            full = (curve.get("full_data") or {}).get(k)
            metrics[k] = {"final_mean": final and final[0], "final_std": final and final[1],
                          "selected_mean": sel and sel[k][0], "selected_std": sel and sel[k][1],
                          "best_mean": best and best[1], "best_std": best and best[2],
                          "best_iteration": best and best[0],
                          "random_mean": rand[k][0] if k in rand else None,
                          "random_std": rand[k][1] if k in rand else None,
                          "full_data_mean": full and full[0], "full_data_std": full and full[1],
                          "pct_of_full": _pct(final and final[0], full and full[0], higher)}
        spec_rel = os.path.relpath(spec.path, REPO) if str(spec.path).startswith(str(REPO) + os.sep) else spec.path
        score = sel[metric][0] if chosen else next(e for e in reversed(evals) if metric in e)[metric][0]
        scored.append((score, {"spec": spec_rel, "set": list(curve.get("set") or []), "sweep": f"direct:{path.parent.parent.name}",
                     "run_id": None, "dataset": spec.dataset["name"], "method": curve["algorithm"],
                     "budget": curve["budget"], "trials": 1, "status": "FINISHED" if finished else "CUT OFF",
                     "running": False, "failure_reason": curve.get("diverged"),
                     "iterations_done": curve["iterations_done"], "iterations_planned": curve["iterations_planned"],
                     "metric": metric, "higher_is_better": higher, "metrics": metrics,
                     "selected_iteration": curve["selected"][0] if chosen else None,
                     "selected_by": f"valid_{metric} ({'max' if higher else 'min'})" if chosen else None,
                     "published": published(spec.dataset["name"], curve["algorithm"], curve["budget"]),
                     "wall_s": curve.get("wall_s"), "steps_s": sum(curve.get("sec_per_step") or []) or None,
                     "spec_hash": spec.hash, "git_commit": curve.get("git_commit"), "git_commits": None,
                     "device": curve.get("device"), "local_file": str(set_file)}))
    best: dict[tuple, tuple[float, dict[str, Any]]] = {}  # one row per (dataset, method, budget): the best set
    for score, r in scored:
        key = (r["dataset"], r["method"], r["budget"])
        if key not in best or (score > best[key][0] if r["higher_is_better"] else score < best[key][0]):
            best[key] = (score, r)
    return [r for _, (_, r) in sorted(best.items())]


# -- publishing ------------------------------------------------------------------------------------
PUBLISH_LIMIT = 5 * 1024 * 1024  # the distilled/ folder stays under 5 MB in all
INDEX, README = "index.json", "README.md"


def set_name(row: dict[str, Any]) -> str:
    """``<dataset>-<method>-ipc<N>.safetensors`` (images) or ``-mu<N>`` (sequences)."""
    unit = "mu" if row["metric"] != "acc" else "ipc"
    return f"{row['dataset']}-{row['method']}-{unit}{row['budget']}.safetensors"


def chose_on_validation(row: dict[str, Any]) -> bool:
    """Whether the published set of ``row`` is the one its trial chose on validation (sequence trials),
    rather than its final set."""
    return row.get("selected_iteration") is not None


def index_entry(row: dict[str, Any], file: str, data: bytes, meta: dict[str, str] | None = None) -> dict[str, Any]:
    """What the index (and the README table) records of one published set. ``meta``: the file's
    metadata, which scores the set of a trial still running (its latest evaluation)."""
    import hashlib

    from orchestrator.artifacts import set_evaluation

    m = row["metrics"][row["metric"]]
    chosen = chose_on_validation(row)
    unfinished = row["status"] != "FINISHED"
    # the published file's own evaluation: the chosen set's where there is one, else the final set's, else
    # (a trial still running) the latest evaluation's, which the file carries
    if chosen:
        score = (m["selected_mean"], m["selected_std"], row["selected_iteration"])
    elif unfinished:
        own = set_evaluation(meta or {}).get(row["metric"])
        if own is None:
            raise ReportError(f"{row['dataset']} {row['method']} {row['budget']} (run {row['run_id']}): its latest set "
                              f"carries no evaluation (written before sets carried one); let the trial reach its "
                              f"next evaluation, or finish")
        score = (own[0], own[1], int(json.loads(meta["iteration"])))
    else:
        score = (m["final_mean"], m["final_std"], row["iterations_done"])
    return {"file": file, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "set_mean": score[0], "set_std": score[1], "set_iteration": score[2],
            "selected_by": row.get("selected_by") if chosen else None,
            "dataset": row["dataset"], "method": row["method"], "budget": row["budget"], "metric": row["metric"],
            "higher_is_better": row["higher_is_better"],
            "final_mean": m["final_mean"], "final_std": m["final_std"], "best_mean": m["best_mean"],
            "best_iteration": m["best_iteration"], "random_mean": m["random_mean"], "random_std": m["random_std"],
            "pct_of_full": _pct(score[0], m["full_data_mean"], row["higher_is_better"])
            if chosen or unfinished else m["pct_of_full"],
            "iterations": row["iterations_done"], "iterations_planned": row.get("iterations_planned"),
            **started_from(data),
            "status": row["status"],
            "published": row["published"], "spec": row["spec"], **({"set": row["set"]} if row.get("set") else {}),
            "spec_hash": row.get("spec_hash"),
            "git_commit": row.get("git_commit"), "git_commits": row.get("git_commits"), "run_id": row["run_id"],
            "sweep": row["sweep"]}


def started_from(data: bytes) -> dict[str, Any]:
    """``iterations_before`` and ``init_from`` (the set's sha256 and path) of a set whose trial
    started from an exported set (``algorithms.<name>.init_from``: its ``start`` metadata), from the
    file's bytes; {} for a set that started from real images or noise."""
    import struct

    try:
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
        start = json.loads(meta.get("start") or "null")
    except (ValueError, struct.error):
        return {}
    if not isinstance(start, dict) or start.get("init") != "set":
        return {}
    return {"iterations_before": int(start.get("iterations_behind") or 0),
            "init_from": {"sha256": start.get("sha256"), "path": start.get("path")}}


def code_history(tags: dict[str, str]) -> list | None:
    """A trial run's ``[[iteration, commit], ...]`` (``orchestrate.git_commits``), None when the run
    predates it."""
    from orchestrator.tracking import COMMITS_TAG

    raw = tags.get(COMMITS_TAG)
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _short(commit: str | None) -> str:
    if not commit:
        return "unknown"
    head, _, flag = commit.partition("+")
    return head[:10] + (f"+{flag}" if flag else "")


def spec_cell(e: dict[str, Any]) -> str:
    """The README's spec: the file, and the overrides of a bench/direct.py run (``--set``) or its sweep."""
    where = "" if not str(e.get("sweep") or "").startswith("direct:") else " (`bench/direct.py`)"
    sets = e.get("set") or []
    return f"`{e['spec']}`" + (" with " + ", ".join(f"`{x}`" for x in sets) if sets else "") + where


def commit_cell(e: dict[str, Any]) -> str:
    """The README's commit: one commit, or the code history of a trial that ran under several,
    ``abc@0, … , def@590`` (``…``: resumes that were not recorded)."""
    hist = e.get("git_commits") or []
    if len(hist) <= 1:
        return _short(e.get("git_commit"))
    return ", ".join("…" if c is None else f"{_short(c)}@{it}" for it, c in hist)


def readme_text(entries: list[dict[str, Any]]) -> str:
    """``distilled/README.md``: what the folder is, and one table row per set (from the index)."""
    lines = ["# Distilled sets we stand behind", "",
             "Each file is the best synthetic set a reference sweep reached for one (dataset, method, budget),",
             "in the export contract of the main README (`orchestrate export`; Farzi: `F` and `M`). The table",
             "gives the spec and the commit that made it (`c@N, d@M`: a trial resumed under later code ran on",
             "commit c from iteration N and on d from M; `…`: resumes made before runs recorded their code),",
             "our evaluation of it (mean ± std over the sweep's",
             "evaluation networks), the random real subset of the same size under the same protocol, and the",
             "published number. Which set: image sets are the sweep's final one (the image datasets have no",
             "validation split); sequence sets are the evaluation that scored best on the validation split",
             "(each user's second-to-last item; PTB's valid text), chosen without the test data, whose test",
             "numbers the table gives (`orchestrate export --selected`). `best (iter)` is the best test",
             "number over the periodic evaluations, as MTT reports it, for comparison only. A trial still",
             "running when its set was published (`--unfinished`) shows `N of M (running)` iterations and the",
             "set of its latest evaluation (`latest`; `orchestrate export --latest`), with that evaluation's numbers;",
             "`(killed)`: a sweep stopped by hand (Ctrl-C) before its end, which the same launch command resumes.",
             "A spec marked (`bench/direct.py`) ran through that script (the sweep's own components without Ray",
             "or MLflow, on a lent GPU machine) with the overrides shown, which were checked against the spec hash",
             "the file carries; `cut off` is a run its time limit stopped. `N + M before (from h)`: a trial",
             "that started from an exported set (`init_from`) of sha256 `h`, made by M iterations before its N.",
             "`tests/test_distilled.py` checks every file against this table;",
             "`python bench/fidelity.py --verify distilled/` evaluates every set again independently (a fresh",
             "network of a new seed each, under the sweep's protocol; CI runs its `--quick` part). Written by",
             "`python bench/fidelity.py --root ROOT --publish distilled/` from the sweeps in ROOT; the folder",
             "stays under 5 MB. The ± is the spread over evaluation networks only: a test number also carries",
             "the test set's sampling noise, which more networks do not remove (a hit rate p on n test cases:",
             "standard error sqrt(p (1 - p) / n); HR@10 at 15 % on ML-100k's 943 users: 1.2 points; accuracy",
             "at 90 % on MNIST's 10 000 test images: 0.3). Two sets on the same test cases differ with less",
             "(ML-100k: a paired standard error of 0.7-0.8 points, bench/README.md, Farzi).", "",
             "| set | dataset | method | budget | iterations | ours: this set (iter) | final | best (iter) "
             "| random subset | % of full | published | spec | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in sorted(entries, key=lambda e: e["file"]):
        scale = 1.0 if e["metric"] == "ppl" else 100.0
        label = LABELS.get(e["metric"], e["metric"])
        best = "-" if e["best_mean"] is None else f"{_num(e['best_mean'], scale)} ({e['best_iteration']})"
        p = e["published"]
        if p is None:
            pub = "none"
        else:
            v = p["value"]
            pub = f"{v[0]:g}-{v[1]:g}% of full" if isinstance(v, list) else f"{v:g}"
            pub += ("" if p["kind"] == "published" else f" ({p['method'].upper()}, to reach)") + f", {p['source']}"
        pct = "-" if e["pct_of_full"] is None else f"{e['pct_of_full']:.0f}%"
        running = e.get("status", "FINISHED") != "FINISHED"
        which = f"{e['set_iteration']}" + (f", by {e['selected_by']}" if e["selected_by"] else
                                           ", latest" if running else ", final")
        iters = f"{e['iterations']} of {e['iterations_planned']} ({e['status'].lower()})" if running else f"{e['iterations']}"
        if e.get("iterations_before"):  # a trial started from an exported set (init_from)
            iters += f" + {e['iterations_before']} before (from {e['init_from']['sha256'][:10]})"
        lines.append(f"| [{e['file']}]({e['file']}) ({e['bytes'] / 1024:.0f} KB) | {e['dataset']} | {e['method']} "
                     f"| {e['budget']} | {iters} | {label} {_pm(e['set_mean'], e['set_std'], scale)} ({which}) "
                     f"| {_pm(e['final_mean'], e['final_std'], scale)} "
                     f"| {best} | {_pm(e['random_mean'], e['random_std'], scale)} | {pct} | {pub} "
                     f"| {spec_cell(e)} | {commit_cell(e)} |")
    extra = [(e, p) for e in sorted(entries, key=lambda e: e["file"]) for p in e.get("protocols", [])]
    if extra:
        lines += ["", "## The same sets under other evaluation protocols", "",
                  "Evaluated again by `orchestrate evaluate FILE --dsa-strategy S [--epochs N]` with the sweep's "
                  "evaluation (networks, seeds, and its epochs unless N is given) but DSA's families `S` (DC/DSA's "
                  "authors drop `flip` for digits), or with `--aug dc --dc-strategy S`: DC's own per-image "
                  "augmentation, under which DC's authors evaluate DC sets (`crop_scale_rotate` on MNIST); next "
                  "to a random real subset under the same protocol. 1000 epochs is the MTT, DC, DSA and DM "
                  "authors' evaluation. Written by `bench/fidelity.py --also-strategy [dc:]S [--also-epochs N]`.",
                  "",
                  "| set | augmentation | networks x epochs | ours | random subset | gain |", "|---|---|---|---|---|---|"]
        for e, p in extra:
            gain = "-" if p["random_mean"] is None else f"{100 * (p['mean'] - p['random_mean']):+.1f}"
            aug, families, _ = protocol_key(p)
            lines.append(f"| {e['file']} | {aug.upper()} `{families}` | {p['networks']} x {p['epochs']} "
                         f"| {_pm(p['mean'], p['std'], 100.0)} | {_pm(p['random_mean'], p['random_std'], 100.0)} "
                         f"| {gain} |")
    return "\n".join(lines) + "\n"


def parse_augmentation(text: str) -> tuple[str, str]:
    """``--also-strategy``'s value as (augmentation, families): DSA's families as they are, or
    ``dc:FAMILIES`` for DC's own per-image augmentation (``dc:crop_scale_rotate``: how DC's authors
    evaluate DC sets on MNIST)."""
    from algorithms.augment import check_dc_strategy, check_strategy

    aug, families = text.split(":", 1) if ":" in text else ("dsa", text)
    problem = check_dc_strategy(families) if aug == "dc" else \
        check_strategy(families) if aug == "dsa" else "the prefix must be dc: (DC's augmentation) or none (DSA's)"
    if problem:
        raise ReportError(f"--also-strategy {text}: {problem}")
    return aug, families


def protocol_key(p: dict[str, Any]) -> tuple[str, str, int]:
    """(augmentation, families, epochs) of a recorded protocol; entries from before DC's augmentation are DSA's."""
    aug = p.get("aug", "dsa")
    return aug, p["dc_strategy"] if aug == "dc" else p["dsa_strategy"], p["epochs"]


def sweep_protocol(evaluation: dict[str, Any]) -> tuple[str, str | None, int]:
    """(augmentation, families, epochs) of a spec's own ``evaluation`` section, as :func:`protocol_key`
    gives a recorded one (what ``orchestrate evaluate`` trains with when given nothing else)."""
    aug = "dc" if evaluation.get("dc_strategy") else "dsa" if evaluation.get("dsa", True) else "none"
    return aug, evaluation["dc_strategy"] if aug == "dc" else evaluation["dsa_strategy"], evaluation["epochs"]


def also_evaluate(folder: Path, strategies: list[str], console, workers: int | None = None,
                  epochs: list[int | None] | None = None, methods: list[str] | None = None) -> list[dict[str, Any]]:
    """Evaluate every published image set of ``folder`` (of ``methods``, when given) again under each (DSA strategy, epochs) it
    has not been evaluated with (``orchestrate evaluate``'s code: the sweep's networks and seeds,
    its epochs where ``epochs`` holds None, the set and a random subset of its size), record it
    under the entry's ``protocols`` and rewrite the index and the README. Sequence sets are left
    alone (no augmentation), and so is a protocol that is the sweep's own: the table's numbers are it."""
    from orchestrator.evaluate import EvalOptions, EvaluateError, evaluate_file
    from orchestrator.spec import load_spec
    from orchestrator.store import atomic_write_bytes

    index_path = folder / INDEX
    if not index_path.is_file():
        raise ReportError(f"{folder}: no {INDEX}: nothing is published to evaluate again")
    entries = json.loads(index_path.read_text())
    # the random subset a set is compared with depends on its spec (seed, experts' lr, model,
    # evaluation), its budget and the protocol only: sets of one spec and budget (DC, DSA and DM at
    # IPC 1, say) share it, so it is trained once per (spec, budget, protocol) and reused
    randoms: dict[tuple, tuple[float | None, float | None, str]] = {}
    for e in entries:
        if e["metric"] != "acc" or (methods and e["method"] not in methods):
            continue
        spec = load_spec(REPO / e["spec"])
        done = {protocol_key(p) for p in e.get("protocols", [])}
        for strategy, n_epochs in ((s, n or spec.evaluation["epochs"]) for s in strategies for n in epochs or [None]):
            aug, families = parse_augmentation(strategy)
            if (aug, families, n_epochs) in done:
                continue
            if (aug, families, n_epochs) == sweep_protocol(spec.evaluation):
                console.print(f"{e['file']}: {aug.upper()} {families} over {n_epochs} epochs is its sweep's own "
                              f"evaluation ({e['spec']}): the table's numbers are that protocol's; not evaluated again")
                continue
            rkey = (e["spec"], e["dataset"], e["budget"], aug, families, n_epochs)
            known = randoms.get(rkey)
            console.print(f"evaluating {e['file']} with {aug.upper()} {families} ({spec.evaluation['networks']} "
                          f"networks x {n_epochs} epochs, and " +
                          (f"the random subset {known[2]} was compared with: the same one)" if known else
                           "a random subset)"))
            families_opt = {"dc_strategy": families} if aug == "dc" else {"dsa_strategy": families}
            try:
                report = evaluate_file(folder / e["file"], EvalOptions(dataset=e["dataset"], spec=spec, epochs=n_epochs,
                                                                       aug=aug, workers=workers, random=known is None,
                                                                       **families_opt),
                                       say=lambda line: console.print(f"  {escape(line)}", highlight=False))
            except EvaluateError as err:
                raise ReportError(f"{folder / e['file']}: {err}") from None
            first = report["rows"][0]["model"]
            rows = {r["trained_on"]: r for r in report["rows"] if r["model"] == first}
            syn, rnd = rows["synthetic"], rows.get("random") or {}
            if known is None:
                known = randoms[rkey] = (rnd.get("acc_mean"), rnd.get("acc_std"), e["file"])
            rnd = {"acc_mean": known[0], "acc_std": known[1]}
            e.setdefault("protocols", []).append({
                **({"aug": "dc", "dc_strategy": families, "dsa_strategy": None} if aug == "dc" else
                   {"dsa_strategy": families}),
                "networks": report["protocol"]["networks"],
                "epochs": report["protocol"]["epochs"], "seed": report["protocol"]["seed"],
                "mean": syn["acc_mean"], "std": syn["acc_std"],
                "random_mean": rnd.get("acc_mean"), "random_std": rnd.get("acc_std")})
            atomic_write_bytes(index_path, (json.dumps(entries, indent=1) + "\n").encode(), replace=True)
            atomic_write_bytes(folder / README, readme_text(entries).encode(), replace=True)
            random = (f"{100 * rnd['acc_mean']:.2f} ± {100 * rnd['acc_std']:.2f}" if rnd.get("acc_mean") is not None
                      else "none")
            console.print(f"  {e['file']}: {100 * syn['acc_mean']:.2f} ± {100 * syn['acc_std']:.2f} "
                          f"(random subset {random}); recorded in {index_path}")
    return entries


def check_size(folder: Path, index: dict[str, dict], new: dict[str, int]) -> int:
    """The folder's size once ``new`` (file -> bytes) replaces or joins the indexed sets; ReportError
    above :data:`PUBLISH_LIMIT`."""
    total = sum(e["bytes"] for f, e in index.items() if f not in new) + sum(new.values())
    if total > PUBLISH_LIMIT:
        raise ReportError(f"{folder}: publishing would make the folder {total / 2**20:.1f} MB, over its 5 MB limit")
    return total


def publish(rows: list[dict[str, Any]], ws, folder: Path, console, unfinished: bool = False) -> list[dict[str, Any]]:
    """Export the synthetic set of every finished row into ``folder`` (atomic writes), record it in
    ``index.json`` (a set already there is replaced) and rewrite ``README.md``. Rows still running
    or cut off are skipped and said so, or with ``unfinished`` published by the set of their latest
    evaluation (the index and the README say which iteration of how many); a folder that would
    exceed 5 MB is refused before writing."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from orchestrator.artifacts import read_synthetic
    from orchestrator.store import atomic_write_bytes
    from orchestrator.trial import set_artifact

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per set is enough
    folder.mkdir(parents=True, exist_ok=True)
    index_path = folder / INDEX
    index = {e["file"]: e for e in json.loads(index_path.read_text())} if index_path.is_file() else {}
    client = MlflowClient(ws.tracking_uri) if any(not r.get("local_file") for r in rows) else None
    new: dict[str, tuple[bytes, dict]] = {}
    for r in rows:
        finished = r["status"] == "FINISHED"
        if not finished and not unfinished:
            console.print(f"not published: {r['dataset']} {r['method']} {r['budget']} is {r['status']} (--unfinished "
                          f"publishes the set of its latest evaluation)")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            if r.get("local_file"):  # a bench/direct.py trial: its set is a file (checked by direct_rows)
                local = r["local_file"]
            else:
                artifact = set_artifact(finished, chose_on_validation(r))
                try:
                    local = client.download_artifacts(r["run_id"], artifact, tmp)
                except MlflowException as e:  # a running trial not evaluated since it logs the set
                    console.print(f"not published: {r['dataset']} {r['method']} {r['budget']} ({r['status']}) "
                                  f"has no {artifact} yet: {e.message}")
                    continue
            _, meta = read_synthetic(local)  # the export contract, checked before it is published
            data = Path(local).read_bytes()
        name = set_name(r)
        new[name] = (data, index_entry(r, name, data, meta))
    check_size(folder, index, {name: len(d) for name, (d, _) in new.items()})
    for name, (data, entry) in new.items():
        atomic_write_bytes(folder / name, data, replace=True)
        old = index.get(name, {})
        if old.get("sha256") == entry["sha256"] and old.get("protocols"):
            entry["protocols"] = old["protocols"]  # the same file: its evaluations under other protocols still hold
        index[name] = entry
        console.print(f"published {folder / name} ({len(data) / 1024:.0f} KB)")
    entries = sorted(index.values(), key=lambda e: e["file"])
    atomic_write_bytes(index_path, (json.dumps(entries, indent=1) + "\n").encode(), replace=True)
    atomic_write_bytes(folder / README, readme_text(entries).encode(), replace=True)
    return entries


# -- independent evaluation of the published sets --------------------------------------------------
# One fresh network per set, of a seed none of the sweep's networks had (theirs start at the spec's
# eval seed), under the sweep's evaluation protocol, against the number the table states for that
# file (the published set's own: the final one for images, the one chosen on validation for
# sequences): within 4 points of accuracy or 2 of HR@10, or 3 of the sweep's std if larger.
VERIFY_TOLERANCE = {"acc": 0.04, "hr10": 0.02, "ppl": 0.05}  # ppl: relative (5 % of the stated perplexity)
INDEPENDENT_SEED = 12345
# --verify --quick (and tests/test_distilled.py) checks the cheapest set of each metric of QUICK_METRICS
# (by job_cost: an MNIST IPC 1 set at 300 epochs, ~40 s on a core, and the ML-100k set, ~13 s), side by
# side: a CI fidelity test stays within a minute (issue 11). The rest (IPC 10, the sets evaluated over
# 1000 epochs: 1-3 minutes each; the PTB set, whose one LM takes ~110 s on a core) are checked by the full
# --verify.
QUICK_METRICS = ("acc", "hr10")
# --verify --quick scores an image set on every QUICK_TEST_STRIDE-th test image (MNIST: 2500 of 10 000):
# one network's pass over all of MNIST's test images takes ~25 s on a core, more than its 300 epochs of
# training (~19 s), and would hold the CI check above its minute (76-90 s measured, 2026-12-04). On 2500
# images a 90 % accuracy carries a sampling error of 0.6 points, well inside the 4-point tolerance.
QUICK_TEST_STRIDE = 4


def job_cost(entry: dict[str, Any], folder: Path) -> float:
    """A verification job's training work, for ordering and for --quick: epochs x (examples in the
    set + 25 for an epoch's fixed cost). Measured on the published sets, one core each: 13 s for
    the ML-100k set (100 epochs, 50 sequences), 37 s for an MNIST IPC 1 set at 300 epochs, ~64 s
    at 1000, 177 s for IPC 10 at 300."""
    from orchestrator.artifacts import read_synthetic

    spec = entry_spec(entry["spec"], entry.get("set"))
    tensors, _ = read_synthetic(folder / entry["file"])
    examples = len(tensors["images"] if "images" in tensors else tensors["F"])
    # a sequence set's steps cost with its vocabulary (the soft inputs and the output layer): ML-100k's
    # 1683 items are the unit (PTB's 10 000 words: ~100 s for the PTB set, 100 epochs of 50 chunks)
    width = 1.0 if "images" in tensors else max(1.0, tensors["M"].shape[1] / 1683 if "M" in tensors else 1.0)
    return float(spec.evaluation["epochs"]) * (examples + 25) * width


def verify_job(entry: dict[str, Any], folder: Path, test_stride: int = 1):
    """A picklable zero-argument job training one fresh network (seed :data:`INDEPENDENT_SEED`) of
    the entry's spec on the published file: it returns the test accuracy (images; on every
    ``test_stride``-th test image) or the test metrics (sequences: a dict holding the entry's metric,
    HR@10 with full ranking)."""
    import dataclasses

    from orchestrator.artifacts import read_synthetic

    spec = entry_spec(entry["spec"], entry.get("set"))  # with a bench/direct.py run's overrides
    tensors, _ = read_synthetic(folder / entry["file"])
    ev = spec.evaluation
    root = None if entry["dataset"] == "digits" else shared_data(entry["dataset"])
    if root is not None and not root.is_dir():
        raise ReportError(f"{folder / entry['file']}: its data set {entry['dataset']!r} is not at {root} "
                          f"(put it in ../shared/data beside the repository or set ORCHESTRATE_DATA)")
    if entry["metric"] == "acc":
        from algorithms.evaluate import EvalConfig, network_job
        from orchestrator.datasets import load_dataset

        data = load_dataset(entry["dataset"], None if root is None else str(root))
        return network_job(spec.model, data.info, tensors["images"], tensors["labels"], float(tensors["lr"]),
                           data.x_test[::test_stride], data.y_test[::test_stride], EvalConfig.from_section(ev, networks=1),
                           seed=INDEPENDENT_SEED)
    from algorithms.farzi import FarziSet
    from algorithms.seqtrain import SeqTrainConfig, seq_network_job
    from orchestrator.sequences import load_sequences, seq_task

    data = load_sequences(entry["dataset"], str(root))
    task = dataclasses.replace(seq_task(data, spec.model["max_len"]), valid_inputs=None)  # test metrics only
    x = FarziSet(tensors["F"].float(), tensors["M"].float(), float(tensors["temperature"]), data.info.pad_id,
                 0.0).probs().detach() if "F" in tensors else tensors["sequences"]
    cfg = SeqTrainConfig(epochs=ev["epochs"], lr=ev["lr"], batch_size=ev["batch_size"],
                         weight_decay=ev["weight_decay"])
    return seq_network_job(spec.model, task, x, cfg, INDEPENDENT_SEED)


def verify(folder: Path, quick: bool = False, workers: int | None = None, console=None) -> list[dict]:
    """Evaluate the published sets of ``folder`` independently (see :data:`VERIFY_TOLERANCE`):
    every set, or with ``quick`` the cheapest (:func:`job_cost`) of each metric of :data:`QUICK_METRICS`,
    an image set on every :data:`QUICK_TEST_STRIDE`-th test image.
    The networks train side by side through ``orchestrate evaluate``'s runner (``workers`` at once; default every usable CPU), the
    longest first. One row per set: the stated number, the independent one, their difference, the
    tolerance and whether it holds (``ok``)."""
    from orchestrator.parallel import EvaluateRunner, usable_cpus

    index_path = folder / INDEX
    if not index_path.is_file():
        raise ReportError(f"{folder}: no {INDEX}: nothing is published to verify")
    entries = json.loads(index_path.read_text())
    costs = [job_cost(e, folder) for e in entries]
    chosen = list(range(len(entries)))
    if quick:
        chosen = [min((i for i in chosen if entries[i]["metric"] == m), key=lambda i: (costs[i], entries[i]["file"]))
                  for m in sorted({e["metric"] for e in entries} & set(QUICK_METRICS))]
        left = sorted(e["file"] for e in entries if e["metric"] not in QUICK_METRICS)
        if left and console is not None:
            console.print(f"--quick leaves {', '.join(left)} to the full --verify (metrics other than "
                          f"{', '.join(QUICK_METRICS)}: minutes per network)")
    if not chosen:
        raise ReportError(f"{folder}: {INDEX} lists no set" + (f" that --quick checks ({', '.join(QUICK_METRICS)})" if quick else ""))
    chosen.sort(key=lambda i: -costs[i])
    if console is not None:
        console.print(f"verifying {len(chosen)} of {len(entries)} published sets in {folder}: one fresh network each "
                      f"(seed {INDEPENDENT_SEED})")
    stride = QUICK_TEST_STRIDE if quick else 1
    jobs = [verify_job(entries[i], folder, stride) for i in chosen]
    t0 = time.monotonic()
    runner = EvaluateRunner(workers or max(1, min(len(jobs), usable_cpus())))
    outs = runner(jobs)
    wall = time.monotonic() - t0
    rows = []
    for i, out in zip(chosen, outs):
        e = entries[i]
        score = float(out[e["metric"]] if isinstance(out, dict) else out)
        base = VERIFY_TOLERANCE[e["metric"]] * (e["set_mean"] if e["metric"] == "ppl" else 1.0)
        tol = max(base, 3 * (e["set_std"] or 0))
        diff = score - e["set_mean"]
        rows.append({"file": e["file"], "dataset": e["dataset"], "method": e["method"], "budget": e["budget"],
                     "metric": e["metric"], "stated_mean": e["set_mean"], "stated_std": e["set_std"],
                     "independent": score, "diff": diff, "tolerance": tol, "ok": abs(diff) <= tol,
                     "seed": INDEPENDENT_SEED, "cost": costs[i],
                     "test_images": f"every {stride}th" if stride > 1 and e["metric"] == "acc" else "all"})
    rows.sort(key=lambda r: r["file"])
    if console is not None:
        t = Table(title=f"independent evaluation: {folder}")
        for col in ("set", "metric", "stated", "independent", "diff", "tolerance", "holds"):
            t.add_column(col, justify="left" if col in ("set", "metric") else "right")
        for r in rows:
            scale = 1.0 if r["metric"] == "ppl" else 100.0
            t.add_row(r["file"], LABELS[r["metric"]], _pm(r["stated_mean"], r["stated_std"], scale),
                      _num(r["independent"], scale), f"{scale * r['diff']:+.1f}", f"{scale * r['tolerance']:.1f}",
                      "yes" if r["ok"] else "[red]no[/red]")
        subset = f" (image sets on every {stride}th test image)" if stride > 1 else ""
        t.caption = (f"one network per set, seed {INDEPENDENT_SEED}, the sweep's protocol{subset}; {runner.how}; "
                     f"{_duration(wall)}")
        console.print(t)
    return rows


# -- running ----------------------------------------------------------------------------------------
def orchestrate_command() -> str:
    """The ``orchestrate`` console script of this Python (its venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "orchestrate"
    found = str(beside) if beside.is_file() else shutil.which("orchestrate")
    if not found:
        raise ReportError("no `orchestrate` command beside this Python or on PATH: pip install -e . first")
    return found


def launch(spec_path: str, root: Path, console) -> int:
    """``orchestrate launch SPEC --root ROOT`` as a subprocess (its output on stderr); its exit code."""
    cmd = [orchestrate_command(), "launch", spec_path, "--root", str(root)]
    console.print(f"[bold]$ {' '.join(cmd)}[/bold]")
    t0 = time.time()
    rc = subprocess.call(cmd, stdout=sys.stderr)
    console.print(f"launch of {spec_path} ended with exit code {rc} after {time.time() - t0:.0f} s")
    return rc


def quick_spec() -> dict[str, Any]:
    """A CI-sized digits sweep (tests/conftest.py's TINY, a little larger): MTT at IPC 1 and 10,
    20 iterations, evaluations every 10, against random subsets of both budgets."""
    return {
        "name": "fidelity-quick", "seed": 0, "checkpoint_interval": 10,
        "description": "bench/fidelity.py --quick: MTT on digits, IPC 1 and 10, 20 iterations",
        "dataset": {"name": "digits"}, "model": {"name": "convnet", "depth": 1, "width": 16},
        "experts": {"count": 2, "epochs": 6, "lr": 0.03, "batch_size": 64},
        "algorithms": {"mtt": {"budgets": [1, 10], "iterations": 20,
                               "hyperparameters": {"syn_steps": 10, "expert_epochs": 2, "max_start_epoch": 3,
                                                   "lr_img": 30, "lr_lr": 1.0e-6}}},
        "baselines": ["random"],
        "evaluation": {"networks": 2, "epochs": 100, "interval": 10},
        "resources": {"cpus_per_trial": 1},
    }


# -- output -------------------------------------------------------------------------------------------
def _num(v, scale: float) -> str:
    return "-" if v is None else f"{scale * v:.1f}" if scale != 1 else f"{v:.2f}"


def _pm(mean, std, scale: float) -> str:
    return "-" if mean is None else f"{_num(mean, scale)} ± {_num(std or 0.0, scale)}"


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    h, rem = divmod(round(s), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s" if rem >= 60 else f"{rem}s"


def _wall(r: dict) -> str:
    text = _duration(r["wall_s"])
    if r.get("steps_s") and r["wall_s"] and r["wall_s"] > 1.2 * r["steps_s"]:  # evaluations, or stopped hours
        text += f", steps {_duration(r['steps_s'])}"
    if r["running"]:
        return f"{text} (running)"
    return text if r["status"] == "FINISHED" else f"{text} ({(r['status'] or '?').lower()})"


def _published_cell(p: dict | None, notes: dict[str, int]) -> str:
    if p is None:
        return "none"
    n = notes.setdefault(p["source"], len(notes) + 1)
    v = p["value"]
    text = f"{v[0]:g}-{v[1]:g}% of full" if isinstance(v, list) else f"{v:g}"
    if p["kind"] != "published":
        text = f"{text} {p['method'].upper()}, to reach"
    return f"{text} [{n}]"


def table(rows: list[dict[str, Any]], title: str = "fidelity") -> tuple[Table, dict[str, int]]:
    """The report table and its footnotes (source -> number)."""
    t = Table(title=title)
    for col in ("dataset", "method", "budget", "iters", "metric", "final", "selected (iter)", "best (iter)",
                "random subset", "% of full", "published", "wall"):
        t.add_column(col, justify="left" if col in ("dataset", "method", "metric", "published", "wall")
                     else "right")
    notes: dict[str, int] = {}
    for r in rows:
        shown = [(k, m) for i, (k, m) in enumerate(r["metrics"].items())  # secondary lines only with data
                 if i == 0 or any(m[f] is not None for f in ("final_mean", "best_mean", "random_mean"))]
        for i, (k, m) in enumerate(shown):
            scale = 1.0 if k == "ppl" else 100.0
            best = "-" if m["best_mean"] is None else \
                f"{_pm(m['best_mean'], m['best_std'], scale)} ({m['best_iteration']})"
            first = i == 0
            sel = "-" if m["selected_mean"] is None else \
                f"{_pm(m['selected_mean'], m['selected_std'], scale)} ({r['selected_iteration']})"
            t.add_row(r["dataset"] if first else "", r["method"] if first else "",
                      str(r["budget"]) if first else "",
                      f"{r['iterations_done']}/{r['iterations_planned']}" if first else "", LABELS.get(k, k),
                      _pm(m["final_mean"], m["final_std"], scale), sel, best,
                      _pm(m["random_mean"], m["random_std"], scale),
                      "-" if m["pct_of_full"] is None else f"{m['pct_of_full']:.0f}%",
                      _published_cell(r["published"], notes) if first else "", _wall(r) if first else "")
    t.caption = ("%, mean ± std over the evaluation networks (ppl as is); selected: the evaluation that scored "
                 "best on the validation split (sequences; --publish publishes its set); best: over the periodic "
                 "evaluations, selected on the test set as MTT reports it; published: the source's number for this "
                 "(dataset, method, budget), 'to reach' when it is another method's")
    return t, notes


def print_report(console, rows: list[dict[str, Any]], sweeps: list[dict[str, Any]], root: Path) -> None:
    for s in sweeps:
        # a sweep launched before checkpoint_interval left the hash has the spec's older hash: no drift
        drift = "" if s["sweep_spec_hash"] in (None, s["spec_hash"], *s.get("spec_hashes", ())) else \
            f" [yellow](launched from another version of the spec: hash {s['sweep_spec_hash']}, now " \
            f"{s['spec_hash']})[/yellow]"
        console.print(f"{s['spec']}: sweep {s['sweep_run_id']} ({s['status'].lower()}, {s['trials']} trials){drift}")
    t, notes = table(rows, title=f"fidelity: {root}")
    console.print(t)
    for source, n in notes.items():
        console.print(f"[{n}] {source}", markup=False)
    for r in rows:
        if r["trials"] > 1:
            console.print(f"{r['dataset']} {r['method']} {r['budget']}: best final of {r['trials']} trials")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    ap = bench_parser(__doc__, "write a tiny digits spec and run it (--run) into a temporary root: a few minutes")
    ap.add_argument("specs", nargs="*", metavar="SPEC",
                    help="reference sweep specs (default: search_spaces/reference/*.yaml)")
    ap.add_argument("--root", default=None,
                    help="the store of the sweeps (`orchestrate launch SPEC --root ROOT`); default: "
                         "$ORCHESTRATE_ROOT or ./orchestrate-runs; with --quick a temporary folder")
    ap.add_argument("--run", action="store_true", help="launch each spec (`orchestrate launch SPEC --root ROOT`, "
                                                       "resuming a sweep that exists) before reading")
    ap.add_argument("--publish", metavar="DIR", default=None,
                    help="export the set of every finished row into DIR (e.g. distilled/) and rewrite its "
                         "index.json and README.md table")
    ap.add_argument("--direct", metavar="FOLDER", action="append", default=[],
                    help="report (and with --publish, publish) the trials of a bench/direct.py --out folder instead "
                         "of sweeps: its spec and overrides are checked against the spec hash each set carries; "
                         "repeat for several (a random trial of the same protocol in any of them is the baseline)")
    ap.add_argument("--unfinished", action="store_true",
                    help="with --publish: also publish the rows still running or cut off, by the set of their latest "
                         "evaluation (marked `N of M (running)` in the README); a later --publish replaces it")
    ap.add_argument("--also-strategy", metavar="S", action="append", default=[],
                    help="with --publish (or --reevaluate): also evaluate each published image set with DSA's families S (e.g. "
                         "color_crop_cutout_scale_rotate, DC/DSA's digits protocol: no flip), or with DC's own "
                         "augmentation if S is dc:FAMILIES (dc:crop_scale_rotate, how DC's authors evaluate DC "
                         "sets on MNIST), the sweep's networks, epochs and seeds, next to a random subset; recorded "
                         "in index.json and the README")
    ap.add_argument("--also-epochs", metavar="N", type=int, action="append", default=[],
                    help="with --also-strategy: train N epochs instead of the sweep's (e.g. 1000, the MTT, DC, DSA "
                         "and DM authors' evaluation); repeat for several")
    ap.add_argument("--also-method", metavar="M", action="append", default=[],
                    help="with --also-strategy: only the published sets of method M (e.g. dc with "
                         "dc:crop_scale_rotate, DC's own protocol); repeat for several; default: every set")
    ap.add_argument("--reevaluate", metavar="DIR", default=None,
                    help="evaluate the sets already published in DIR under --also-strategy's protocols (as --publish "
                         "DIR --also-strategy does after publishing), reading and running no sweep: for sets whose "
                         "sweep or store is gone; recorded in DIR's index.json and README like --also-strategy's")
    ap.add_argument("--workers", type=int, default=None, metavar="N",
                    help="networks at once for --also-strategy, as `orchestrate evaluate --workers` (1: one after "
                         "another here; default: auto), and for --verify (default: every usable CPU)")
    ap.add_argument("--verify", metavar="DIR", default=None,
                    help="evaluate every set published in DIR (e.g. distilled/) independently: one fresh network "
                         "each, of a seed no sweep network had, under the sweep's protocol, against the number its "
                         "table states (4 points of accuracy, 2 of HR@10 or 5 %% of a perplexity, or 3 stds); exits 2 when one is off. "
                         "With --quick only the cheapest set of accuracy and of HR@10, an image set on every "
                         f"{QUICK_TEST_STRIDE}th test image (what CI checks: under a minute; "
                         "perplexity sets take minutes and are left to the full check); "
                         "a few minutes for all on 2 cores")
    args = ap.parse_args()
    if args.verify:
        if args.specs or args.run or args.publish or args.direct or args.also_strategy or args.reevaluate:
            ap.error("--verify evaluates the sets already in DIR: give no SPEC, --run, --publish, --direct or "
                     "--also-strategy with it")
        console = bench_console(140)
        load0 = os.getloadavg()
        try:
            rows = verify(Path(args.verify), args.quick, args.workers, console)
        except ReportError as e:
            fail(str(e))
        if args.json:
            write_results(console, args.json, "fidelity", machine_info("cpu", load0),
                          {"verify": args.verify, "quick": args.quick}, verified=rows)
        off = [r["file"] for r in rows if not r["ok"]]
        if off:
            fail(f"{len(off)} published set(s) evaluate independently away from the number their table states: "
                 + ", ".join(str(Path(args.verify) / f) for f in off))
        return
    for text in args.also_strategy:  # a bad value is refused before anything is published
        try:
            parse_augmentation(text)
        except ReportError as e:
            ap.error(str(e))
    if args.also_strategy and not (args.publish or args.reevaluate):
        ap.error("--also-strategy evaluates the published sets: give --publish DIR (or --reevaluate DIR)")
    if args.unfinished and not args.publish:
        ap.error("--unfinished chooses the rows --publish exports: give --publish DIR")
    if args.also_method and not args.also_strategy:
        ap.error("--also-method chooses the sets of --also-strategy's evaluations: give --also-strategy S")
    if args.also_epochs and not args.also_strategy:
        ap.error("--also-epochs sets the epochs of --also-strategy's evaluations: give --also-strategy S")
    if any(n < 1 for n in args.also_epochs):
        ap.error("--also-epochs must be >= 1")
    console = bench_console(170)
    load0 = os.getloadavg()
    if args.reevaluate:
        if args.specs or args.run or args.publish or args.direct or args.quick or args.unfinished:
            ap.error("--reevaluate evaluates the sets already in DIR again: give no SPEC, --run, --publish, --direct, "
                     "--quick or --unfinished with it")
        if not args.also_strategy:
            ap.error("--reevaluate needs the protocol to evaluate with: give --also-strategy S")
        try:
            entries = also_evaluate(Path(args.reevaluate), args.also_strategy, console, args.workers,
                                    args.also_epochs or None, args.also_method or None)
        except ReportError as e:
            fail(str(e))
        if args.json:
            write_results(console, args.json, "fidelity", machine_info("cpu", load0),
                          {"reevaluate": args.reevaluate, "also_strategy": args.also_strategy,
                           "also_epochs": args.also_epochs, "also_method": args.also_method}, published_sets=entries)
        return
    if args.direct:
        if args.quick or args.specs or args.run or args.also_strategy:
            ap.error("--direct reads bench/direct.py folders: give no SPEC, --quick, --run or --also-strategy with it")
        try:
            rows = direct_rows([Path(f) for f in args.direct])
            console.print(table(rows, "fidelity: bench/direct.py")[0])
            if args.publish:
                publish(rows, None, Path(args.publish), console, args.unfinished)
        except ReportError as e:
            fail(str(e))
        if args.json:
            write_results(console, args.json, "fidelity", machine_info("cpu", load0), {"direct": args.direct},
                          rows=rows)
        return
    if args.quick and args.specs:
        ap.error("--quick runs its own spec: give no SPEC with it")
    with tempfile.TemporaryDirectory(prefix="fidelity-") as tmp:
        if args.quick:
            spec_path = Path(tmp) / "fidelity_quick.yaml"
            spec_path.write_text(yaml.safe_dump(quick_spec(), sort_keys=False))
            specs, run = [str(spec_path)], True
            root = Path(args.root or Path(tmp) / "root").expanduser().resolve()
        else:
            specs = args.specs or [os.path.relpath(p) if p.startswith(os.getcwd() + os.sep) else p
                                   for p in sorted(glob.glob(str(REPO / "search_spaces" / "reference" / "*.yaml")))]
            run = args.run
            root = Path(args.root or os.environ.get("ORCHESTRATE_ROOT") or "orchestrate-runs").expanduser().resolve()
        if not specs:
            fail("no spec given and none in search_spaces/reference/")
        errors, launches = [], {}
        try:
            if run:
                for s in specs:
                    launches[s] = launch(s, root, console)
            ws = open_store(root)
        except ReportError as e:
            fail(str(e))
        now_ms = int(time.time() * 1000)
        sweeps, rows = [], []
        for s in specs:
            try:
                desc, spec_rows = read_sweep(s, ws, now_ms)
            except ReportError as e:
                errors.append(str(e))
                continue
            sweeps.append({**desc, "launch_exit_code": launches.get(s)})
            rows += spec_rows
        if sweeps:
            print_report(console, rows, sweeps, root)
        if args.publish:
            try:
                publish(rows, ws, Path(args.publish), console, args.unfinished)
                if args.also_strategy:
                    also_evaluate(Path(args.publish), args.also_strategy, console, args.workers,
                                  args.also_epochs or None, args.also_method or None)
            except ReportError as e:
                errors.append(str(e))
        for s, rc in launches.items():
            if rc not in (0, None):
                console.print(f"[yellow]`orchestrate launch {s} --root {root}` exited with {rc}: the rows of its "
                              f"sweep are what it logged[/yellow]")
        for e in errors:
            console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        if args.json:
            versions = {p: importlib.metadata.version(p) for p in ("ray", "mlflow")}
            device = "cuda" if __import__("torch").cuda.is_available() else "cpu"
            write_results(console, args.json, "fidelity", machine_info(device, load0, versions=versions),
                          {"specs": specs, "root": str(root), "run": run, "quick": args.quick},
                          sweeps=sweeps, errors=errors,
                          published=[{"dataset": d, "method": m, "budget": b, **v}
                                     for (d, m, b), v in PUBLISHED.items()],
                          rows=rows)
    if errors:
        sys.exit(2)


if __name__ == "__main__":
    main()
