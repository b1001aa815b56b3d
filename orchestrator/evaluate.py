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
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from algorithms.evaluate import EVAL_THREADS, EvalConfig, network_job, random_subset_like
from algorithms.networks import MODELS, build_network

from .artifacts import SEQUENCES_FORMAT, file_model, read_synthetic
from .datasets import DATASETS, FOLDER_DATASETS, DatasetFormatError, load_dataset
from .sequences import SEQUENCE_DATASETS, load_sequences, seq_task
from .spec import SCHEMA, SEQ_SCHEMA, Spec, eval_seed

EXPERIMENT = "evaluate"  # the MLflow experiment of `orchestrate evaluate --log`
ROLE = "evaluate"  # its runs' orchestrate.role tag (results/compare list trials and sweeps only)
IMAGE_MODEL_DEFAULTS = {k: v[1] for k, v in SCHEMA["model"].items()}  # ConvNet-3, width 128, instance norm
SGD = "SGD momentum 0.9, weight decay 5e-4, step size x0.1 after half of the epochs"


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
    aug: str | None = None  # dsa | none
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
# The ConvNet family as DC/MTT's code names it: convnet, and one setting changed: ConvNetD<depth>,
# ConvNetW<width>, ConvNetNN / ConvNetIN (no / instance norm), ConvNetNP / ConvNetMP / ConvNetAP
# (no / max / average pooling). The other architectures of the network registry
# (algorithms/networks.py: mlp, lenet, alexnet, vgg11, resnet18 and their BatchNorm variants) by name.
_VARIANT = re.compile(r"^convnet(?:(?P<dw>[dw])(?P<n>\d+)|(?P<flag>nn|in|np|mp|ap))?$")
_FLAGS = {"nn": ("norm", "none"), "in": ("norm", "instancenorm"), "np": ("pooling", "none"),
          "mp": ("pooling", "maxpooling"), "ap": ("pooling", "avgpooling")}
KNOWN_MODELS_TEXT = (f"{', '.join(MODELS)} (convnet: the file's or the spec's ConvNet), and ConvNet variants with one setting "
                     f"changed: convnetD<depth>, convnetW<width>, convnetNN, convnetIN (no / instance norm), "
                     f"convnetNP, convnetMP, convnetAP (no / max / average pooling)")


def parse_models(text: str | None, base: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``--models convnet,convnetD2,resnet18_bn``: (name, model section) per model, in the given
    order, duplicates dropped. Without ``text``: ``base`` itself (the file's model, else the spec's,
    else the schema's defaults). ``convnet`` is ``base`` when that is a ConvNet (else the default
    ConvNet), a variant changes one setting of it; another architecture of the network registry
    is taken with its own defaults (cross-architecture evaluation)."""
    out: list[tuple[str, dict[str, Any]]] = []
    if not text and base.get("name") != "convnet":
        return [(str(base.get("name")), dict(base))]
    for raw in (text or "convnet").split(","):
        name = raw.strip()
        if not name:
            raise EvaluateError(f"--models {text!r}: an empty model name; give names separated by commas, "
                                f"e.g. convnet,convnetD2")
        m = _VARIANT.match(name.lower())
        if m is None and name.lower() in MODELS:
            if name.lower() not in (n for n, _ in out):
                out.append((name.lower(), {"name": name.lower()}))
            continue
        if m is None:
            raise EvaluateError(f"--models: unknown model {name!r}; known: {KNOWN_MODELS_TEXT}")
        model = dict(base) if base.get("name") == "convnet" else dict(IMAGE_MODEL_DEFAULTS)
        if m.group("dw"):
            n = int(m.group("n"))
            if n < 1:
                raise EvaluateError(f"--models {name}: the {'depth' if m.group('dw') == 'd' else 'width'} "
                                    f"must be >= 1")
            model["depth" if m.group("dw") == "d" else "width"] = n
        elif m.group("flag"):
            key, value = _FLAGS[m.group("flag")]
            model[key] = value
        label = name.lower()
        if label not in (n for n, _ in out):
            out.append((label, model))
    return out


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


def load_image_data(name: str, sf: SetFile, data_root: str | None, spec: Spec | None):
    """The dataset to evaluate on: the spec's (its root and image_folder options) when given;
    image_folder without a spec is read at the set's size and channels, default split."""
    root = data_root if data_root is not None else (spec.dataset.get("root") if spec else None)
    options: dict[str, Any] = {}
    if name in FOLDER_DATASETS:
        if spec is not None:
            options = {k: v for k, v in spec.dataset.items() if k not in ("name", "root", "zca")}
            options["seed"] = spec.seed
        else:
            images = sf.tensors["images"]
            options = {"size": int(images.shape[-1]), "channels": int(images.shape[1]) if images.ndim == 4 else None}
    try:
        return load_dataset(name, root, **options)
    except DatasetFormatError:
        raise
    except (TypeError, ValueError) as e:  # image_folder's options (the set's size, say)
        raise EvaluateError(f"{sf.path}: dataset {name!r}: {e}") from None


def _whitened_like(sf: SetFile, data):
    """The dataset whitened as the set was: ZCA refitted on its training split (deterministic),
    checked against the set's own ``zca_inverse``; a set whitened otherwise is refused."""
    from .datasets import whitened

    w = whitened(data)
    mine = w.zca.state_dict()["inverse"].float()
    theirs = sf.tensors["zca_inverse"].float()
    if not torch.allclose(mine, theirs, rtol=1e-3, atol=1e-4 * float(mine.abs().max())):
        raise EvaluateError(f"{sf.path}: tensor 'zca_inverse' is not the ZCA whitening of {data.info.name}'s training "
                            f"split (regularisation 0.1) that this tool fits: the set was whitened otherwise")
    return w


def _json_floats(sf: SetFile, key: str, channels: int) -> list[float]:
    raw = sf.meta[key]
    try:
        v = json.loads(raw)
    except ValueError:
        v = None
    if not (isinstance(v, list) and len(v) == channels and all(isinstance(x, (int, float)) and
                                                               not isinstance(x, bool) and math.isfinite(x)
                                                               for x in v)):
        raise EvaluateError(f"{sf.path}: metadata field {key!r} must be a JSON list of {channels} finite "
                            f"number(s), one per channel; got {raw[:80]!r}")
    if key == "std" and any(x <= 0 for x in v):
        raise EvaluateError(f"{sf.path}: metadata field 'std' must be > 0 for every channel; got {raw[:80]!r}")
    return [float(x) for x in v]


def check_images(sf: SetFile, info) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The images (in ``info``'s normalised input space) and labels of an image set, checked
    against the dataset: shape (channels, size), finite values, labels among its classes, every
    class present. Images written in another normalisation (``mean``/``std`` metadata) are
    mapped to the dataset's (returns True then)."""
    images, labels = sf.tensors["images"], sf.tensors["labels"]
    if len(images) == 0:
        raise EvaluateError(f"{sf.path}: tensor 'images' holds no image (shape {tuple(images.shape)})")
    if tuple(images.shape[1:]) != info.shape:
        c, h, w = images.shape[1:]
        raise EvaluateError(f"{sf.path}: tensor 'images' has shape {tuple(images.shape)}, images of {c}x{h}x{w} "
                            f"(channels x height x width), but {info.name} images are "
                            f"{info.channels}x{info.size}x{info.size}")
    if not bool(torch.isfinite(images).all()):
        raise EvaluateError(f"{sf.path}: tensor 'images' holds NaN or infinite values")
    if labels.ndim != 1:
        raise EvaluateError(f"{sf.path}: tensor 'labels' must be one label per image (shape (N,)), "
                            f"has shape {tuple(labels.shape)}")
    k = info.num_classes
    outside = sorted({int(v) for v in labels[(labels < 0) | (labels >= k)].tolist()})
    if outside:
        shown = ", ".join(map(str, outside[:10])) + (", ..." if len(outside) > 10 else "")
        raise EvaluateError(f"{sf.path}: tensor 'labels' holds values outside {info.name}'s {k} classes "
                            f"(0..{k - 1}): {shown}")
    present = set(labels.tolist())
    if len(present) != k:
        missing = [c for c in range(k) if c not in present]
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise EvaluateError(f"{sf.path}: tensor 'labels' has {len(present)} classes, but {info.name} has {k} "
                            f"(no image of class {shown}); a set of the dataset holds every class")
    if sf.meta.get("zca") == "true":  # whitened images: compared with the dataset whitened the same way
        return images, labels, False
    mean = _json_floats(sf, "mean", info.channels)
    std = _json_floats(sf, "std", info.channels)
    same = all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(mean + std, [*info.mean, *info.std]))
    if same:
        return images, labels, False
    view = (1, -1, 1, 1)
    pixels = images * torch.tensor(std).view(view) + torch.tensor(mean).view(view)
    return ((pixels - torch.tensor(info.mean).view(view)) / torch.tensor(info.std).view(view)).float(), labels, True


def _scalar(sf: SetFile, key: str) -> float | None:
    t = sf.tensors.get(key)
    if t is None:
        return None
    if t.numel() != 1 or not t.dtype.is_floating_point:
        raise EvaluateError(f"{sf.path}: tensor {key!r} must be a float scalar, is {t.dtype} of shape "
                            f"{tuple(t.shape)}")
    return float(t.reshape(()))


def _set_lr(sf: SetFile, given: float | None) -> tuple[float, str]:
    """The step size to train on the set with: ``--lr``, else the file's ``lr`` tensor."""
    file_lr = _scalar(sf, "lr")
    if given is not None:
        return given, "--lr"
    if file_lr is None:
        raise EvaluateError(f"{sf.path}: tensor 'lr' is missing; give the step size with --lr")
    if not math.isfinite(file_lr) or file_lr <= 0:
        raise EvaluateError(f"{sf.path}: tensor 'lr' is {file_lr}, not a step size to train with; give one with --lr")
    return file_lr, "the file's lr"


# -- the experts' full-data result ---------------------------------------------------------------
def stored_experts(spec: Spec, data, trajectories) -> tuple[list[tuple[int, str, float]], str]:
    """The spec's experts in the trajectory store ``trajectories``: ([(index, path, final test
    metric)], where or why none), from the store's ``manifest.json`` (else the files' own records,
    read without moving anything). Nothing is trained or written."""
    from . import storage
    from .experts import expert_key  # imports Ray: only with --spec
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
        if found and (store.remote or all(Path(p).is_file() for _, p, _ in found)):
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
        return _evaluate_sequences(sf, name, opts, say, device)
    return _evaluate_images(sf, name, opts, say, device)


def _report_head(sf: SetFile, name: str, spec: Spec | None) -> dict[str, Any]:
    return {"file": str(sf.path.resolve()), "sha256": file_sha256(sf.path), "dataset": name,
            "algorithm": sf.meta.get("algorithm"), "source_run_id": sf.meta.get("run_id"),
            "spec": spec.path if spec else None, "spec_hash": spec.hash if spec else None}


def _evaluate_images(sf: SetFile, name: str, opts: EvalOptions, say, device) -> dict[str, Any]:
    spec = opts.spec
    if opts.aug not in (None, "dsa", "none"):
        raise EvaluateError(f"--aug {opts.aug}: must be dsa or none")
    lr, lr_from = _set_lr(sf, opts.lr)
    try:
        recorded = file_model(sf.meta, sf.path)
    except ValueError as e:
        raise EvaluateError(str(e)) from None
    if recorded is not None:
        base, base_from = recorded, "the file's model"
    elif spec is not None:
        base, base_from = dict(spec.model), "the spec's model (the file records none)"
    else:
        base, base_from = dict(IMAGE_MODEL_DEFAULTS), "the spec schema's default ConvNet: the file records no model"
    if base.get("name") not in MODELS:  # a model of a later network registry, say
        raise EvaluateError(f"{sf.path}: metadata field 'model' names the model {base.get('name')!r}, which "
                            f"algorithms/networks.py cannot build (known: {', '.join(MODELS)})")
    models = parse_models(opts.models, base)
    # the built-in datasets are described without their files: a file that does not fit is refused first
    data = None if name in DATASETS else load_image_data(name, sf, opts.data_root, spec)
    info = DATASETS[name] if data is None else data.info
    images, labels, renormalised = check_images(sf, info)
    for label, model in models:  # every model is built once before anything trains
        try:
            build_network(model, info.channels, info.num_classes, info.size)
        except (TypeError, ValueError) as e:
            where = f"{sf.path}: metadata field 'model'" if label == "convnet" and recorded is not None else \
                f"--models {label}"
            raise EvaluateError(f"{where}: {model_text(model)} cannot be built for {info.name} "
                                f"({info.channels}x{info.size}x{info.size}): {e}") from None
    if data is None:
        data = load_image_data(name, sf, opts.data_root, spec)
    if sf.meta.get("zca") == "true":
        data = _whitened_like(sf, data)

    ev = spec.evaluation if spec is not None else {k: v[1] for k, v in SCHEMA["evaluation"].items()}
    networks = opts.networks or (ev["networks"] if spec is not None else 5)
    epochs = opts.epochs or ev["epochs"]
    aug = opts.aug or ("dsa" if ev["dsa"] else "none")
    seed = opts.seed if opts.seed is not None else eval_seed({"seed": spec.seed if spec else 0})
    cfg = EvalConfig(networks=networks, epochs=epochs, batch_size=ev["batch_size"], dsa=aug == "dsa")
    seeds = list(range(seed, seed + networks))

    counts = torch.bincount(labels, minlength=info.num_classes).tolist()
    uniform = len(set(counts)) == 1
    budget = counts[0] if uniform else len(labels)
    subset_seed = (spec.seed if spec else 0) * 7919 + budget  # as a sweep's random baseline of this budget
    if spec is not None:
        random_lr, random_lr_from = float(spec.experts["lr"]), "the spec's experts.lr, as a sweep's random baseline"
    else:
        random_lr, random_lr_from = lr, f"no --spec: the set's lr, {lr_from}"
    try:
        r_images, r_labels = random_subset_like(data.x_train, data.y_train, labels, info.num_classes,
                                                torch.Generator().manual_seed(subset_seed))
        random_note = None
    except ValueError as e:
        r_images = r_labels = None
        random_note = f"no random subset of these counts: {e}"

    full, full_note = [], "no --spec: the experts' full-data accuracy needs the spec (and --root) of stored experts"
    if spec is not None:
        found, where = stored_experts(spec, data, opts.trajectories)
        full = [acc for _, _, acc in found if not math.isnan(acc)]
        full_note = (f"{len(full)} experts of the spec in {where} (their final test accuracy)" if full else where)

    rows = []
    what_set = f"{sf.meta.get('algorithm')} set, {len(labels)} images" + \
        (f" ({counts[0]} per class)" if uniform else " (per-class counts as in the file)")
    # every network of every row is one job (evaluate_set's, seeds seed, seed+1, ...); they all go
    # to the runner at once: in parallel when it can (the same numbers), said as each ends
    trainings = []
    for m, (label, model) in enumerate(models):
        trainings.append((label, model, (m, "synthetic"), images, labels, lr, "the set"))
        if r_images is not None:
            trainings.append((label, model, (m, "random"), r_images, r_labels, random_lr, "the random subset"))
    jobs, owner = [], []
    for t, (label, model, _, images_, labels_, lr_, _) in enumerate(trainings):
        for k, s in enumerate(seeds):
            jobs.append(network_job(model, info, images_, labels_, lr_, data.x_test, data.y_test, cfg, s, device))
            owner.append((t, k))

    def done(i: int, acc: float) -> None:
        t, k = owner[i]
        label, what = trainings[t][0], trainings[t][6]
        say(f"{label}: {what}, network {k + 1}/{networks} (seed {seeds[k]}): {100 * acc:.1f} %")

    from .parallel import EvaluateRunner

    runner = EvaluateRunner(opts.workers, opts.address)
    accs = runner(jobs, on_done=done)
    per: dict[tuple[int, str], list[dict[str, float]]] = {}  # (model's index, trained on) -> per network
    for (t, _), acc in zip(owner, accs):
        per.setdefault(trainings[t][2], []).append({"acc": acc})

    for m, (label, model) in enumerate(models):
        rows.append(_row(label, "synthetic", what_set, lr, per[(m, "synthetic")], seeds))
        if r_images is not None:
            rows.append(_row(label, "random", f"random real subset, {len(r_labels)} images", random_lr,
                             per[(m, "random")], seeds))
        else:
            rows.append(_row(label, "random", "random real subset", random_lr, [], None, random_note))
        if full and spec is not None and model == spec.model:
            rows.append(_row(label, "full_data", "full data (the spec's experts)", None,
                             [{"acc": a} for a in full], None, full_note))
        else:
            note = full_note if spec is None or not full else \
                f"the experts are {model_text(spec.model)}, not this model"
            rows.append(_row(label, "full_data", "full data (the spec's experts)", None, [], None, note))

    return {**_report_head(sf, name, spec), "kind": "images", "size": len(labels), "per_class": counts,
            "metrics": ["acc"], "models": {label: model for label, model in models}, "model_from": base_from,
            "protocol": {"networks": networks, "epochs": epochs, "batch_size": cfg.batch_size, "aug": aug,
                         "seed": seed, "seeds": seeds, "optimizer": SGD, "device": str(device),
                         "threads_per_network": EVAL_THREADS, "runner": runner.how},
            "lr": {"set": lr, "set_from": lr_from, "random": random_lr, "random_from": random_lr_from},
            "random_subset": {"seed": subset_seed, "budget": budget, "note": random_note},
            "full_data_note": full_note, "renormalised": renormalised, "rows": rows}


def check_sequences(sf: SetFile, data, max_len: int) -> None:
    """A sequence set against its dataset: the task, the vocabulary (``M``'s columns, the ids of
    ``sequences``) and the model's ``max_len`` (the length of the sequences)."""
    info = data.info
    if sf.meta.get("task") != info.task:
        raise EvaluateError(f"{sf.path}: metadata field 'task' is {sf.meta.get('task')!r}, but {info.name} is a "
                            f"{info.task} dataset")
    try:
        vocab = int(sf.meta["vocab_size"])
    except ValueError:
        raise EvaluateError(f"{sf.path}: metadata field 'vocab_size' must be an integer, got "
                            f"{sf.meta['vocab_size'][:40]!r}") from None
    if vocab != info.vocab_size:
        raise EvaluateError(f"{sf.path}: metadata field 'vocab_size' is {vocab}, but {info.name} read from its files "
                            f"has a vocabulary of {info.vocab_size}")
    t = sf.tensors
    if "F" in t:
        F, M = t["F"], t["M"]
        for key, x in (("F", F), ("M", M)):
            if not x.dtype.is_floating_point:
                raise EvaluateError(f"{sf.path}: tensor {key!r} is {x.dtype}, expected a float tensor")
            if not bool(torch.isfinite(x).all()):
                raise EvaluateError(f"{sf.path}: tensor {key!r} holds NaN or infinite values")
        if M.shape[1] != info.vocab_size:
            raise EvaluateError(f"{sf.path}: tensor 'M' has shape {tuple(M.shape)}: {M.shape[1]} columns, but "
                                f"{info.name}'s vocabulary has {info.vocab_size} ids (M is [latent_dim, vocab])")
        if F.shape[0] == 0:
            raise EvaluateError(f"{sf.path}: tensor 'F' holds no sequence (shape {tuple(F.shape)})")
        if F.shape[1] > max_len:
            raise EvaluateError(f"{sf.path}: tensor 'F' has shape {tuple(F.shape)}: sequences of {F.shape[1]} "
                                f"positions, longer than the model's max_len {max_len} (the spec's model.max_len)")
        if "temperature" not in t:
            raise EvaluateError(f"{sf.path}: tensor 'temperature' is missing (Farzi's sequences are "
                                f"softmax(F·M/temperature))")
        temp = _scalar(sf, "temperature")
        if not math.isfinite(temp) or temp <= 0:
            raise EvaluateError(f"{sf.path}: tensor 'temperature' is {temp}, must be > 0")
        return
    seqs = t["sequences"]
    if seqs.dtype != torch.int64:
        raise EvaluateError(f"{sf.path}: tensor 'sequences' is {seqs.dtype}, expected torch.int64")
    if seqs.ndim != 2 or len(seqs) == 0:
        raise EvaluateError(f"{sf.path}: tensor 'sequences' must be [N, length] with N >= 1, has shape "
                            f"{tuple(seqs.shape)}")
    if seqs.shape[1] > max_len:
        raise EvaluateError(f"{sf.path}: tensor 'sequences' has shape {tuple(seqs.shape)}: sequences of "
                            f"{seqs.shape[1]} positions, longer than the model's max_len {max_len}")
    bad = sorted({int(v) for v in seqs[(seqs < 0) | (seqs >= info.vocab_size)].tolist()})
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise EvaluateError(f"{sf.path}: tensor 'sequences' holds ids outside {info.name}'s vocabulary "
                            f"(0..{info.vocab_size - 1}): {shown}")


def _evaluate_sequences(sf: SetFile, name: str, opts: EvalOptions, say, device) -> dict[str, Any]:
    from algorithms.farzi import FarziSet
    from algorithms.seqtrain import SeqTrainConfig, evaluate_sequences, task_metrics

    spec = opts.spec
    if spec is None:
        raise EvaluateError(f"{sf.path}: a sequence set ({name}): give --spec SPEC, whose model and evaluation "
                            f"section (Adam epochs, lr, batch size) say how to train on it")
    if opts.aug not in (None, "none"):
        raise EvaluateError(f"--aug {opts.aug}: sequence sets are not augmented (DSA is for images); drop --aug")
    model_name = spec.model["name"]
    if opts.models is not None and [m.strip().lower() for m in opts.models.split(",")] != [model_name]:
        raise EvaluateError(f"--models {opts.models}: a sequence set is evaluated with the spec's model, "
                            f"{model_name!r} ({spec.path}); drop --models or give {model_name}")
    root = opts.data_root if opts.data_root is not None else spec.dataset.get("root")
    data = load_sequences(name, root)
    check_sequences(sf, data, spec.model["max_len"])
    try:
        task = seq_task(data, spec.model["max_len"])
    except ValueError as e:  # e.g. too few items for the sampled negatives
        raise EvaluateError(f"{name} ({root or 'default root'}): cannot build the evaluation task: {e}") from None
    ev = spec.evaluation
    networks = opts.networks or ev["networks"]
    epochs = opts.epochs or ev["epochs"]
    seed = opts.seed if opts.seed is not None else eval_seed({"seed": spec.seed})
    seeds = list(range(seed, seed + networks))
    lr, lr_from = (opts.lr, "--lr") if opts.lr is not None else \
        (float(ev["lr"]), "the spec's evaluation.lr, as a sweep's trials train")
    t = sf.tensors
    if "F" in t:
        temp = _scalar(sf, "temperature")
        syn = FarziSet(t["F"].float(), t["M"].float(), temp, data.info.pad_id, _scalar(sf, "lr") or 0.0)
        x = syn.probs().detach()
        what = f"{sf.meta.get('algorithm')} set, {len(t['F'])} soft sequences of {t['F'].shape[1]}"
    else:
        x = t["sequences"]
        what = f"{sf.meta.get('algorithm')} set, {len(x)} sequences of {x.shape[1]}"
    mu = len(x)
    subset_seed = spec.seed * 7919 + mu  # as a sweep's random baseline of this budget
    real = task.train
    random_note = None
    if mu > len(real):
        r = None
        random_note = f"no random subset: {mu} sequences, the data has {len(real)}"
    else:
        r = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(subset_seed))[:mu]]
    random_lr, random_lr_from = float(ev["lr"]), "the spec's evaluation.lr"

    def run(data_, lr_, what_):
        cfg = SeqTrainConfig(epochs=epochs, lr=lr_, batch_size=ev["batch_size"], weight_decay=ev["weight_decay"])
        out = []
        for k, s in enumerate(seeds):
            res = evaluate_sequences(spec.model, task, data_, cfg, 1, s, device).per_network[0]
            say(f"{model_name}: {what_}, network {k + 1}/{networks} (seed {s}): "
                + ", ".join(f"{m} {v:.4g}" for m, v in res.items()))
            out.append(res)
        return out

    set_results = run(x, lr, "the set")
    metrics = list(set_results[0])
    rows = [_row(model_name, "synthetic", what, lr, set_results, seeds)]
    if r is not None:
        rows.append(_row(model_name, "random", f"random real sequences, {mu}", random_lr,
                         run(r, random_lr, "the random sequences"), seeds))
    else:
        rows.append(_row(model_name, "random", "random real sequences", random_lr, [], None, random_note))
    found, where = stored_experts(spec, data, opts.trajectories)
    if found:
        from algorithms.seqmodels import seeded_seq_model

        from .store import open_trajectory

        model = seeded_seq_model(spec.model, task.vocab_size, task.pad_id, 0)
        per = [task_metrics(model, open_trajectory(p).params[-1].clone(), task) for _, p, _ in found]
        rows.append(_row(model_name, "full_data", "full data (the spec's experts)", None, per, None,
                         f"{len(per)} experts of the spec in {where} (their final parameters)"))
    else:
        rows.append(_row(model_name, "full_data", "full data (the spec's experts)", None, [], None, where))
    return {**_report_head(sf, name, spec), "kind": "sequences", "task": data.info.task, "size": mu,
            "metrics": metrics, "models": {model_name: dict(spec.model)}, "model_from": "the spec's model",
            "protocol": {"networks": networks, "epochs": epochs, "batch_size": ev["batch_size"],
                         "weight_decay": ev["weight_decay"], "seed": seed, "seeds": seeds, "optimizer": "Adam",
                         "device": str(device)},
            "lr": {"set": lr, "set_from": lr_from, "random": random_lr, "random_from": random_lr_from},
            "random_subset": {"seed": subset_seed, "budget": mu, "note": random_note},
            "full_data_note": rows[-1].get("note"), "renormalised": False, "rows": rows}


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


def notes(report: dict[str, Any]) -> list[str]:
    """The lines printed under the table: where the models, the lr, the baseline and full data come from."""
    lr, rs, p = report["lr"], report["random_subset"], report["protocol"]
    seeds = f"seeds {p['seeds'][0]}..{p['seeds'][-1]}" if len(p["seeds"]) > 1 else f"seed {p['seeds'][0]}"
    if report["kind"] == "images":
        out = [(f"protocol: {p['networks']} fresh network{'s' * (p['networks'] != 1)} per row, "
                f"{p['epochs']} epochs, {p['optimizer']}, "
                f"{'DSA' if p['aug'] == 'dsa' else 'no augmentation'}, batch {p['batch_size']}, {seeds}")]
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
