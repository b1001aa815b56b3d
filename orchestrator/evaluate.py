"""``orchestrate evaluate FILE.safetensors``: evaluate a synthetic set in the export contract on
its own, outside any sweep.

The set is checked against its dataset (the contract's tensors and metadata by
:func:`orchestrator.artifacts.read_synthetic`, then the image shape, the labels and the
normalisation, or for sequence sets the vocabulary), then K fresh networks per model are trained
on it with the protocol of the sweeps' trials (:func:`algorithms.evaluate.evaluate_set`,
:func:`algorithms.seqtrain.evaluate_sequences`), next to a random real subset of the same size
(the same per-class counts) trained under the same protocol and seeds, and the full-data result
of the spec's stored experts when there are some. Every problem with the file is an
:class:`EvaluateError` naming the file and the tensor or field.

This module holds what both kinds of set share (the options, the file and its dataset's name, the
stored experts, the report's rows, the printed table and notes, the MLflow run); the image sets'
checks and evaluation are in :mod:`orchestrator.evaluate_images`, the sequence sets' in
:mod:`orchestrator.evaluate_sequences`.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .artifacts import SEQUENCES_FORMAT, read_synthetic
from .datasets import DATASETS, FOLDER_DATASETS
from .sequences import SEQUENCE_DATASETS
from .spec import Spec
from .spec_schema import SCHEMA, SEQ_SCHEMA
from .store import file_sha256  # noqa: F401 (evaluate_images/_sequences import it from here)

EXPERIMENT = "evaluate"  # the MLflow experiment of `orchestrate evaluate --log`
ROLE = "evaluate"  # its runs' orchestrate.role tag (results/compare list trials and sweeps only)


class EvaluateError(ValueError):
    """A set file, an option or a spec that cannot be evaluated together (the message names the
    file and the tensor, field or option); ``orchestrate evaluate`` exits 2 with it."""


@dataclass
class EvalOptions:
    """The options of ``orchestrate evaluate``; None: the default (see the README)."""
    dataset: str | None = None
    data_root: str | None = None
    spec: Spec | None = None
    models: str | None = None  # "convnet,convnetD2"
    networks: int | None = None
    epochs: int | None = None
    aug: str | None = None  # dsa | dc | none
    dsa_strategy: str | None = None  # DSA's families (default: the spec's evaluation.dsa_strategy)
    dc_strategy: str | None = None  # DC's families with aug dc (default: the spec's, else crop_scale_rotate)
    lr: float | None = None
    seed: int | None = None
    trajectories: Any = None  # the trajectory store's root (Path or URI) to look for the spec's experts
    workers: int | None = None  # networks at once: 1 sequential, N a local Ray of N-1 CPUs, None auto
    address: str | None = None  # a Ray cluster to train the networks on ('auto' or HOST:PORT)
    against: tuple[str, ...] = ()  # other set files of the same dataset, trained with the same seeds
    random: bool = True  # False: no random real subset is trained (its row says so)


NO_RANDOM = "not trained (--no-random)"


def _canon(name: str) -> str:
    return str(name).strip().lower()


# -- models --------------------------------------------------------------------------------------
def model_text(model: dict[str, Any]) -> str:
    order = [*SCHEMA["model"], *SEQ_SCHEMA["model"]]  # the spec's order: depth, width, norm, pooling
    keys = sorted((k for k in model if k != "name"), key=lambda k: (order.index(k) if k in order else len(order), k))
    rest = ", ".join(f"{k} {model[k]}" for k in keys)
    return f"{model.get('name')} ({rest})" if rest else str(model.get("name"))


# -- the set and its dataset ---------------------------------------------------------------------
@dataclass
class SetFile:
    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]

    @property
    def sequences(self) -> bool:
        return self.meta.get("format") == SEQUENCES_FORMAT


def read_set(path: str | Path) -> SetFile:
    """The file, checked against the export contract (tensors, dtypes, metadata)."""
    try:
        tensors, meta = read_synthetic(path)
    except ValueError as e:
        raise EvaluateError(str(e)) from None
    return SetFile(Path(path), tensors, meta)


def check_dataset_name(sf: SetFile, given: str | None, spec: Spec | None) -> str:
    """The dataset of the set (its ``dataset`` metadata), which ``--dataset`` and the spec must name."""
    name = sf.meta["dataset"]
    if given is not None and _canon(given) != _canon(name):
        raise EvaluateError(f"{sf.path}: the set is of dataset {name!r} (metadata field 'dataset'), but --dataset "
                            f"is {given!r}; they must be the same")
    if spec is not None and _canon(spec.dataset["name"]) != _canon(name):
        raise EvaluateError(f"{sf.path}: the set is of dataset {name!r} (metadata field 'dataset'), but the spec "
                            f"{spec.path} is for {spec.dataset['name']!r}")
    known = sorted(SEQUENCE_DATASETS) if sf.sequences else sorted({*DATASETS, *FOLDER_DATASETS})
    if _canon(name) not in known:
        other = sorted({*DATASETS, *FOLDER_DATASETS}) if sf.sequences else sorted(SEQUENCE_DATASETS)
        kind = "sequence" if sf.sequences else "image"
        hint = (f" (it is a{'n image' if sf.sequences else ' sequence'} dataset, but the file is "
                f"{'a sequence set' if sf.sequences else 'an image set'})" if _canon(name) in other else "")
        raise EvaluateError(f"{sf.path}: metadata field 'dataset' is {name!r}, not a known {kind} dataset{hint}; "
                            f"known: {', '.join(known)}")
    if spec is not None and (spec.task.kind == "sequence") != sf.sequences:
        raise EvaluateError(f"{sf.path}: a{' sequence' if sf.sequences else 'n image'} set, but the spec "
                            f"{spec.path} is a{' sequence' if spec.sequences else 'n image'} spec")
    return _canon(name)


def _scalar(sf: SetFile, key: str) -> float | None:
    t = sf.tensors.get(key)
    if t is None:
        return None
    if t.numel() != 1 or not t.dtype.is_floating_point:
        raise EvaluateError(f"{sf.path}: tensor {key!r} must be a float scalar, is {t.dtype} of shape "
                            f"{tuple(t.shape)}")
    return float(t.reshape(()))


# -- the experts' full-data result ---------------------------------------------------------------
def stored_experts(spec: Spec, data, trajectories) -> tuple[list[tuple[int, str, float]], str]:
    """The spec's experts in the trajectory store ``trajectories``: ([(index, path, final test
    metric)], where or why none), from the store's ``manifest.json`` (else the files' own records,
    read without moving anything). Nothing is trained or written."""
    from . import storage
    from .experts import expert_key  # only with --spec
    from .store import TrajectoryStore

    if trajectories is None:
        return [], "no store given"
    store = TrajectoryStore(trajectories)
    name, count = spec.dataset["name"], spec.experts["count"]
    key = expert_key(spec, data)
    folder = store.dir(key, name)
    manifest = storage.join(folder, "manifest.json")
    form = spec.expert_forms()[0]
    try:
        text = storage.read_bytes(manifest) if store.remote else Path(manifest).read_bytes()
        forms = json.loads(text)["forms"]
        recs = forms["full"] if "full" in forms else forms[form]
        found = sorted((int(r["index"]), str(storage.join(folder, r["path"])), float(r["final_test_acc"]))
                       for r in recs if int(r["index"]) < count)
        # the manifest is the last launch's: one with a smaller experts.count lists fewer than are
        # stored, and then the files themselves are read
        if len(found) == count and (store.remote or all(Path(p).is_file() for _, p, _ in found)):
            return found, str(folder)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if not store.remote and not Path(folder).is_dir():
        return [], f"no experts of the spec in {folder}"
    valid, _, _ = store.check(key, name, count, form, quarantine=False)
    found = sorted((r.index, r.path, r.final_test_acc) for r in valid)
    return found, str(folder) if found else f"no valid experts of the spec in {folder}"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


# -- evaluation ----------------------------------------------------------------------------------
def _row(model: str, trained_on: str, what: str, lr: float | None, per_network: list[dict[str, float]],
         seeds: list[int] | None, note: str | None = None, cases: list | None = None) -> dict[str, Any]:
    """One row of the report. ``cases``: each network's per-test-case outcome ``(value, weight)``
    (:func:`algorithms.seqtrain.task_cases`; images: which test images it classifies right), kept
    under ``_cases`` until :func:`finish` turns them into the paired differences."""
    row: dict[str, Any] = {"model": model, "trained_on": trained_on, "what": what, "lr": lr, "seeds": seeds,
                           "networks": len(per_network)}
    for k in per_network[0] if per_network else ():
        vals = [r[k] for r in per_network]
        row[f"{k}_mean"], row[f"{k}_std"] = _mean_std(vals)
        row[k] = vals
    if note:
        row["note"] = note
    if cases:
        row["_cases"] = cases
    return row


def read_other(path: str | Path, first: SetFile, name: str) -> SetFile:
    """An ``--against`` file: a set of the same dataset and kind as the evaluated one."""
    sf = read_set(path)
    other = _canon(sf.meta["dataset"])
    if other != name:
        raise EvaluateError(f"{sf.path} (--against): a set of dataset {sf.meta['dataset']!r} (metadata field "
                            f"'dataset'), but {first.path} is of {name!r}: a paired comparison needs the same test set")
    if sf.sequences != first.sequences:
        raise EvaluateError(f"{sf.path} (--against): a{' sequence' if sf.sequences else 'n image'} set, but "
                            f"{first.path} is a{' sequence' if first.sequences else 'n image'} set")
    return sf


def _mean_cases(cases: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Per test case, the mean outcome over a row's networks, and the cases' weights."""
    values = torch.stack([v.double() for v, _ in cases]).mean(0)
    return values, cases[0][1].double()


def paired_stats(a: list, b: list, same_seeds: bool, what: str = "the other") -> dict[str, Any]:
    """``a`` minus ``b``: two evaluations' per-network ``(value, weight)`` outcomes on the same test
    cases (:func:`algorithms.seqtrain.task_cases`; images: which test images a network gets right).
    ``delta`` of the mean outcome (accuracy and HR@k as fractions; perplexity as the difference of
    the mean cross-entropy, ln of the perplexities' ratio); its standard error over the test cases
    (``se_cases``: the test set's sampling noise, networks held fixed) and over the seed pairs
    (``se_networks``: the networks' noise, from each seed's difference where ``same_seeds``, both
    trained networks of the same seeds, else NaN); ``se`` = the root of their squares' sum, ``z`` =
    delta / se. ValueError (naming ``what``) where the two were scored on other test cases."""
    import math

    from algorithms.evaluate import paired_difference

    va, w = _mean_cases(a)
    vb, wb = _mean_cases(b)
    if len(vb) != len(va) or not torch.equal(wb, w):
        raise ValueError(f"{what}: scored on other test cases than the one it is paired with ({len(va)} cases "
                         f"against {len(vb)}, or other weights)")
    delta, se_cases = paired_difference(va, vb, w)
    se_net = math.nan
    if same_seeds and len(a) == len(b) and len(a) > 1:
        def metric(v: torch.Tensor, weight: torch.Tensor) -> float:
            return float(v.double().sum() / weight.double().sum())

        diffs = [metric(*x) - metric(*y) for x, y in zip(a, b)]
        se_net = statistics.stdev(diffs) / math.sqrt(len(diffs))
    se = math.hypot(se_cases, 0.0 if math.isnan(se_net) else se_net)
    return {"delta": delta, "se_cases": se_cases, "se_networks": se_net, "se": se,
            "z": delta / se if se > 0 else math.nan, "cases": len(va),
            "seed_pairs": len(a) if not math.isnan(se_net) else 0}


def paired_differences(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """For each model, its set's row minus each other row of that model with per-case outcomes, on
    the same test cases (:func:`paired_stats`; the seed pairs where both rows trained the same
    seeds)."""
    out = []
    for first in (r for r in rows if r["trained_on"] == "synthetic" and r.get("_cases")):
        for i, r in enumerate(rows):
            if r is first or r["model"] != first["model"] or not r.get("_cases"):
                continue
            same = bool(r["seeds"]) and r["seeds"] == first["seeds"]
            out.append({"model": first["model"], "row": i, "against": _row_key(r), "metric": metric,
                        **paired_stats(first["_cases"], r["_cases"], same, _trained_on(r))})
    return out


def finish(report: dict[str, Any], metric: str, unit: str) -> dict[str, Any]:
    """The report with its paired differences (``paired``; ``unit``: what one test case is) and
    without the per-case outcomes they came from."""
    report["paired"] = paired_differences(report["rows"], metric)
    report["paired_unit"] = unit
    for r in report["rows"]:
        r.pop("_cases", None)
    return report


def evaluate_file(path: str | Path, opts: EvalOptions, say: Callable[[str], None] = lambda _: None,
                  device: str | torch.device | None = None) -> dict[str, Any]:
    """Check and evaluate one set file; returns the report (JSON-ready: accuracies and sampled
    ranking metrics as fractions, perplexity as is)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sf = read_set(path)
    spec = opts.spec
    name = check_dataset_name(sf, opts.dataset, spec)
    if sf.sequences:
        from .evaluate_sequences import _evaluate_sequences  # they import this module's shared names

        return _evaluate_sequences(sf, name, opts, say, device)
    from .evaluate_images import _evaluate_images

    return _evaluate_images(sf, name, opts, say, device)


def _report_head(sf: SetFile, name: str, spec: Spec | None) -> dict[str, Any]:
    return {"file": str(sf.path.resolve()), "sha256": file_sha256(sf.path), "dataset": name,
            "algorithm": sf.meta.get("algorithm"), "source_run_id": sf.meta.get("run_id"),
            "spec": spec.path if spec else None, "spec_hash": spec.hash if spec else None}


# -- output --------------------------------------------------------------------------------------
TRAINED_ON = {"synthetic": "the set", "random": "random real subset", "full_data": "full data (experts)",
              "other": "--against"}


def _set_name(r: dict[str, Any]) -> str:
    """A set's short name: its file's, and for a trial's set read from MLflow (``uri``, runs:/RUN_ID/...)
    the run's too."""
    uri = r.get("uri")
    if not uri:
        return Path(r["file"]).name
    run_id = uri[len("runs:/"):].split("/", 1)[0]
    return f"{Path(uri).name} of run {run_id[:8]}"


def _trained_on(r: dict[str, Any]) -> str:
    return _set_name(r) if r["trained_on"] == "other" else TRAINED_ON[r["trained_on"]]


def _row_key(r: dict[str, Any]) -> str:
    """A row's name in MLflow metric keys: synthetic, random, full_data, other1, other2, ..."""
    return f"other{r['other_index'] + 1}" if r["trained_on"] == "other" else r["trained_on"]


def paired_text(p: dict[str, Any], unit: str) -> str:
    """One paired difference in words: the set minus another row on the same test cases."""
    import math

    if p["metric"] == "ppl":
        head = (f"perplexity x{math.exp(p['delta']):.3f} (ln ratio {p['delta']:+.4f}, SE {p['se']:.4f}: "
                f"{p['se_cases']:.4f} over the {p['cases']} test {unit}")
        nets = f", {p['se_networks']:.4f} over {p['seed_pairs']} seed pairs" if p["seed_pairs"] else ""
    else:
        head = (f"{p['metric']} {100 * p['delta']:+.2f} points (SE {100 * p['se']:.2f}: {100 * p['se_cases']:.2f} "
                f"over the {p['cases']} test {unit}")
        nets = f", {100 * p['se_networks']:.2f} over {p['seed_pairs']} seed pairs" if p["seed_pairs"] else ""
    z = "" if math.isnan(p["z"]) else f"; z {p['z']:+.1f}"
    return f"{head}{nets}{z})"


def _fmt(metric: str, mean: float | None, std: float | None) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if metric == "ppl":
        return f"{mean:.2f} ± {std or 0:.2f}"
    return f"{100 * mean:.1f} ± {100 * (std or 0):.1f}"


def table(report: dict[str, Any]):
    """The report as a rich table: one row per (model, training set), one column per metric."""
    from rich.table import Table

    size = (f"{report['size']} images" if report["kind"] == "images" else f"{report['size']} sequences")
    t = Table(title=f"{_set_name(report)}: {report['algorithm']} set of {report['dataset']}, {size}")
    for col in ("model", "trained on", "lr"):
        t.add_column(col, justify="right" if col == "lr" else "left")
    for m in report["metrics"]:
        t.add_column(f"{m} (%)" if m != "ppl" else m, justify="right")
    t.add_column("networks", justify="right")
    for r in report["rows"]:
        lr = "-" if r["lr"] is None else f"{r['lr']:.4g}"
        n = str(r["networks"]) if r["trained_on"] != "full_data" else (f"{r['networks']} experts" if r["networks"]
                                                                        else "-")
        t.add_row(r["model"], _trained_on(r), lr,
                  *(_fmt(m, r.get(f"{m}_mean"), r.get(f"{m}_std")) for m in report["metrics"]), n)
    what = {"images": "test accuracy (%)", "recommendation": "HR@10 / NDCG@10 (%; _s100: against 100 sampled "
            "negatives per user)", "language_model": "test perplexity and next-token accuracy (%)"}
    t.caption = f"{what[report.get('task', report['kind'])]}, mean ± std over the networks"
    return t


def _aug_text(p: dict[str, Any]) -> str:
    """The augmentation of an image protocol, in words."""
    aug = p["aug"]
    if aug == "dc":
        return f"DC's augmentation ({p.get('dc_strategy')})"
    return f"DSA ({p.get('dsa_strategy')})" if aug == "dsa" else "no augmentation"


def notes(report: dict[str, Any]) -> list[str]:
    """The lines printed under the table: where the models, the lr, the baseline and full data come from."""
    lr, rs, p = report["lr"], report["random_subset"], report["protocol"]
    seeds = f"seeds {p['seeds'][0]}..{p['seeds'][-1]}" if len(p["seeds"]) > 1 else f"seed {p['seeds'][0]}"
    if report["kind"] == "images":
        out = [(f"protocol: {p['networks']} fresh network{'s' * (p['networks'] != 1)} per row, "
                f"{p['epochs']} epochs, {p['optimizer']}, "
                f"{_aug_text(p)}, "
                f"batch {p['batch_size']}, {seeds}")]
        for k, v in report["models"].items():
            where = report["model_from"] if k == "convnet" else "convnet with one setting changed"
            out.append(f"model {k}: {model_text(v)}, {where}")
        drawn = "real training images with the set's per-class counts"
        if p.get("runner"):
            out.append(f"networks: {p['threads_per_network']} torch thread each, trained by {p['runner']}")
    else:
        out = [(f"protocol: {p['networks']} fresh model{'s' * (p['networks'] != 1)} per row, "
                f"{p['epochs']} epochs of Adam, batch {p['batch_size']}, weight decay {p['weight_decay']}, {seeds}")]
        out += [f"model {k}: {model_text(v)}, {report['model_from']}" for k, v in report["models"].items()]
        drawn = "real training sequences"
    out.append(f"the set is trained at lr {lr['set']:.4g} ({lr['set_from']}); the random subset at lr "
               f"{lr['random']:.4g} ({lr['random_from']})")
    out.append(f"random subset: {rs['note']}" if rs["note"] else
               f"random subset: {drawn}, drawn with seed {rs['seed']} (as a sweep's random baseline of budget "
               f"{rs['budget']} draws them)")
    out.append(f"full data: {report['full_data_note']}")
    if report.get("uri"):
        out.append(f"the set: {report['uri']}, downloaded to {report['file']}")
    if report.get("spec"):
        out.append(f"spec: {report['spec']} (hash {report['spec_hash']})")
    if report.get("renormalised"):
        out.append("the file's mean/std differ from the dataset's: its images were mapped to the dataset's "
                   "normalisation (images * std + mean are its pixels)")
    for r in report["rows"]:
        if r["trained_on"] == "other":
            out.append(f"--against {r.get('uri') or r['file']}: {r['what']}, trained with the same models, protocol and seeds at lr "
                       f"{r['lr']:.4g} ({r['lr_from']})")
    for p in report.get("paired", ()):
        name = _trained_on(report["rows"][p["row"]])
        out.append(f"paired, the set minus {name} ({p['model']}): {paired_text(p, report['paired_unit'])}")
    return out


# -- MLflow --------------------------------------------------------------------------------------
def metrics_of(report: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics: ``<metric>_mean``/``_std`` of the set, ``random_<metric>_*``,
    ``full_data_<metric>_*`` and ``other<j>_<metric>_*`` (the j-th ``--against`` file), and the
    paired differences ``paired_<row>_<metric>_delta``/``_se``, for the first model; with several
    models, ``<model>/...`` for each."""
    first = report["rows"][0]["model"]
    several = len(report["models"]) > 1
    out: dict[str, float] = {}

    def put(key: str, model: str, v: float | None) -> None:
        if v is None:
            return
        if model == first:
            out[key] = v
        if several:
            out[f"{model}/{key}"] = v

    for r in report["rows"]:
        prefix = "" if r["trained_on"] == "synthetic" else f"{_row_key(r)}_"
        for m in report["metrics"]:
            for s in ("mean", "std"):
                put(f"{prefix}{m}_{s}", r["model"], r.get(f"{m}_{s}"))
    for p in report.get("paired", ()):  # paired_<row>_<metric>_delta / _se
        key = f"paired_{p['against']}_{p['metric']}"
        put(f"{key}_delta", p["model"], p["delta"])
        put(f"{key}_se", p["model"], p["se"])
    return out


def log_run(tracking_uri: str, artifact_root: str | None, report: dict[str, Any], params: dict[str, Any]) -> str:
    """One MLflow run in the experiment ``evaluate``: the options as parameters, the results as
    metrics (per network too, as steps of ``<model>/<training set>/<metric>``), the set file and
    the report (``evaluation.json``) as artifacts. Returns the run id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from .tracking import ROLE_TAG, ensure_experiment

    client = MlflowClient(tracking_uri)
    exp = ensure_experiment(client, EXPERIMENT, artifact_root)
    tags = {ROLE_TAG: ROLE, "dataset": report["dataset"], "algorithm": str(report["algorithm"]),
            "orchestrate.file_sha256": report["sha256"]}
    if report.get("source_run_id"):
        tags["orchestrate.source_run_id"] = report["source_run_id"]
    if report.get("spec_hash"):
        tags["orchestrate.spec_hash"] = report["spec_hash"]
    run = client.create_run(exp, run_name=f"{report['algorithm']}-{report['dataset']}-{Path(report['file']).stem}",
                            tags=tags)
    run_id = run.info.run_id
    try:
        ps = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(ps), 100):
            client.log_batch(run_id, params=ps[i:i + 100])
        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, 0) for k, v in metrics_of(report).items()]
        for r in report["rows"]:
            for m in report["metrics"]:
                ms += [Metric(f"{r['model']}/{_row_key(r)}/{m}", float(v), now, i)
                       for i, v in enumerate(r.get(m) or [])]
        for i in range(0, len(ms), 1000):
            client.log_batch(run_id, metrics=ms[i:i + 1000])
        client.log_artifact(run_id, report["file"], "synthetic")
        client.log_dict(run_id, report, "evaluation.json")
        client.log_batch(run_id, tags=[RunTag("orchestrate.protocol", json.dumps(report["protocol"]))])
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
