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

import hashlib
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


def _canon(name: str) -> str:
    return str(name).strip().lower()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
         seeds: list[int] | None, note: str | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"model": model, "trained_on": trained_on, "what": what, "lr": lr, "seeds": seeds,
                           "networks": len(per_network)}
    for k in per_network[0] if per_network else ():
        vals = [r[k] for r in per_network]
        row[f"{k}_mean"], row[f"{k}_std"] = _mean_std(vals)
        row[k] = vals
    if note:
        row["note"] = note
    return row


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
TRAINED_ON = {"synthetic": "the set", "random": "random real subset", "full_data": "full data (experts)"}


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
    t = Table(title=f"{Path(report['file']).name}: {report['algorithm']} set of {report['dataset']}, {size}")
    for col in ("model", "trained on", "lr"):
        t.add_column(col, justify="right" if col == "lr" else "left")
    for m in report["metrics"]:
        t.add_column(f"{m} (%)" if m != "ppl" else m, justify="right")
    t.add_column("networks", justify="right")
    for r in report["rows"]:
        lr = "-" if r["lr"] is None else f"{r['lr']:.4g}"
        n = str(r["networks"]) if r["trained_on"] != "full_data" else (f"{r['networks']} experts" if r["networks"]
                                                                        else "-")
        t.add_row(r["model"], TRAINED_ON[r["trained_on"]], lr,
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
    if report.get("spec"):
        out.append(f"spec: {report['spec']} (hash {report['spec_hash']})")
    if report.get("renormalised"):
        out.append("the file's mean/std differ from the dataset's: its images were mapped to the dataset's "
                   "normalisation (images * std + mean are its pixels)")
    return out


# -- MLflow --------------------------------------------------------------------------------------
def metrics_of(report: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics: ``<metric>_mean``/``_std`` of the set, ``random_<metric>_*`` and
    ``full_data_<metric>_*`` for the first model; with several models, ``<model>/...`` for each."""
    prefix = {"synthetic": "", "random": "random_", "full_data": "full_data_"}
    first = report["rows"][0]["model"]
    several = len(report["models"]) > 1
    out: dict[str, float] = {}
    for r in report["rows"]:
        for m in report["metrics"]:
            for s in ("mean", "std"):
                v = r.get(f"{m}_{s}")
                if v is None:
                    continue
                key = f"{prefix[r['trained_on']]}{m}_{s}"
                if r["model"] == first:
                    out[key] = v
                if several:
                    out[f"{r['model']}/{key}"] = v
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
                ms += [Metric(f"{r['model']}/{r['trained_on']}/{m}", float(v), now, i)
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
