"""Image sets for ``orchestrate evaluate``: the models to train (``--models``, ConvNet variants and
the other architectures), the dataset read as the set was (its options, ZCA whitening), the checks
of the images and labels against it, and the evaluation itself (the set and a random real subset
of the same per-class counts, every network a job of :class:`orchestrator.parallel.EvaluateRunner`).
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

import torch

from algorithms.augment import DC_MNIST_STRATEGY, check_dc_strategy, check_strategy
from algorithms.evaluate import EVAL_THREADS, EvalConfig, network_job, random_subset_like
from algorithms.networks import MODELS, build_network

from .artifacts import file_model
from .datasets import DATASETS, FOLDER_DATASETS, DatasetFormatError, load_dataset
from .evaluate import (NO_RANDOM, EvalOptions, EvaluateError, SetFile, _report_head, _row, _scalar, file_sha256, finish,
                       model_text, read_other, stored_experts)
from .spec import Spec, eval_seed
from .spec_schema import SCHEMA

IMAGE_MODEL_DEFAULTS = {k: v[1] for k, v in SCHEMA["model"].items()}  # ConvNet-3, width 128, instance norm
SGD = "SGD momentum 0.9, weight decay 5e-4, step size x0.1 after half of the epochs"


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

# -- the dataset and the images ------------------------------------------------------------------
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


# -- evaluation ----------------------------------------------------------------------------------
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


def _evaluate_images(sf: SetFile, name: str, opts: EvalOptions, say, device) -> dict[str, Any]:
    spec = opts.spec
    if opts.aug not in (None, "dsa", "dc", "none"):
        raise EvaluateError(f"--aug {opts.aug}: must be dsa, dc or none")
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
    others = []  # --against: (file, images, labels, lr, where the lr comes from)
    for path in opts.against:
        other = read_other(path, sf, name)
        if (other.meta.get("zca") == "true") != (sf.meta.get("zca") == "true"):
            raise EvaluateError(f"{other.path} (--against): {'ZCA-whitened' if other.meta.get('zca') == 'true' else 'raw'}"
                                f" images (metadata field 'zca'), but {sf.path}'s are "
                                f"{'whitened' if sf.meta.get('zca') == 'true' else 'raw'}: both are trained on "
                                "the same dataset, so both must be in the same space")
        o_images, o_labels, _ = check_images(other, info)
        others.append((other, o_images, o_labels, *_set_lr(other, opts.lr)))
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
    aug = opts.aug or ("dc" if ev.get("dc_strategy") else "dsa" if ev["dsa"] else "none")
    strategy = opts.dsa_strategy or ev["dsa_strategy"]
    if problem := check_strategy(strategy):
        raise EvaluateError(f"--dsa-strategy {strategy}: {problem}")
    dc_strategy = (opts.dc_strategy or ev.get("dc_strategy") or DC_MNIST_STRATEGY) if aug == "dc" else None
    if dc_strategy is not None and (problem := check_dc_strategy(dc_strategy)):
        raise EvaluateError(f"--dc-strategy {dc_strategy}: {problem}")
    seed = opts.seed if opts.seed is not None else eval_seed({"seed": spec.seed if spec else 0})
    cfg = EvalConfig(networks=networks, epochs=epochs, batch_size=ev["batch_size"], dsa=aug == "dsa",
                     dsa_strategy=strategy, dc_strategy=dc_strategy)
    seeds = list(range(seed, seed + networks))

    counts = torch.bincount(labels, minlength=info.num_classes).tolist()
    uniform = len(set(counts)) == 1
    budget = counts[0] if uniform else len(labels)
    subset_seed = (spec.seed if spec else 0) * 7919 + budget  # as a sweep's random baseline of this budget
    if spec is not None:
        random_lr, random_lr_from = float(spec.experts["lr"]), "the spec's experts.lr, as a sweep's random baseline"
    else:
        random_lr, random_lr_from = lr, f"no --spec: the set's lr, {lr_from}"
    r_images = r_labels = None
    try:
        if opts.random:
            r_images, r_labels = random_subset_like(data.x_train, data.y_train, labels, info.num_classes,
                                                    torch.Generator().manual_seed(subset_seed))
        random_note = None if opts.random else NO_RANDOM
    except ValueError as e:
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
        for j, (other, o_images, o_labels, o_lr, _) in enumerate(others):
            trainings.append((label, model, (m, j), o_images, o_labels, o_lr, other.path.name))
    jobs, owner = [], []
    for t, (label, model, _, images_, labels_, lr_, _) in enumerate(trainings):
        for k, s in enumerate(seeds):
            jobs.append(network_job(model, info, images_, labels_, lr_, data.x_test, data.y_test, cfg, s, device,
                                    per_case=True))
            owner.append((t, k))

    def done(i: int, res: tuple[float, torch.Tensor]) -> None:
        t, k = owner[i]
        label, what = trainings[t][0], trainings[t][6]
        say(f"{label}: {what}, network {k + 1}/{networks} (seed {seeds[k]}): {100 * res[0]:.1f} %")

    from .parallel import EvaluateRunner

    runner = EvaluateRunner(opts.workers, opts.address)
    results = runner(jobs, on_done=done)
    per: dict[tuple[int, Any], list[dict[str, float]]] = {}  # (model's index, trained on) -> per network
    cases: dict[tuple[int, Any], list] = {}  # the same -> per network, which test images it gets right
    for (t, _), (acc, hits) in zip(owner, results):
        per.setdefault(trainings[t][2], []).append({"acc": acc})
        cases.setdefault(trainings[t][2], []).append((hits, torch.ones(len(hits), dtype=torch.float64)))

    for m, (label, model) in enumerate(models):
        rows.append(_row(label, "synthetic", what_set, lr, per[(m, "synthetic")], seeds,
                         cases=cases[(m, "synthetic")]))
        if r_images is not None:
            rows.append(_row(label, "random", f"random real subset, {len(r_labels)} images", random_lr,
                             per[(m, "random")], seeds, cases=cases[(m, "random")]))
        else:
            rows.append(_row(label, "random", "random real subset", random_lr, [], None, random_note))
        if full and spec is not None and model == spec.model:
            rows.append(_row(label, "full_data", "full data (the spec's experts)", None,
                             [{"acc": a} for a in full], None, full_note))
        else:
            note = full_note if spec is None or not full else \
                f"the experts are {model_text(spec.model)}, not this model"
            rows.append(_row(label, "full_data", "full data (the spec's experts)", None, [], None, note))
        for j, (other, o_images, o_labels, o_lr, o_lr_from) in enumerate(others):
            o_counts = torch.bincount(o_labels, minlength=info.num_classes).tolist()
            o_what = f"{other.meta.get('algorithm')} set, {len(o_labels)} images" + \
                (f" ({o_counts[0]} per class)" if len(set(o_counts)) == 1 else "")
            rows.append({**_row(label, "other", o_what, o_lr, per[(m, j)], seeds, cases=cases[(m, j)]),
                         "file": str(other.path.resolve()), "sha256": file_sha256(other.path), "other_index": j,
                         "lr_from": o_lr_from})

    return finish({**_report_head(sf, name, spec), "kind": "images", "size": len(labels), "per_class": counts,
            "metrics": ["acc"], "models": {label: model for label, model in models}, "model_from": base_from,
            "protocol": {"networks": networks, "epochs": epochs, "batch_size": cfg.batch_size, "aug": aug,
                         "dsa_strategy": strategy, "dc_strategy": dc_strategy,
                         "seed": seed, "seeds": seeds, "optimizer": SGD, "device": str(device),
                         "threads_per_network": EVAL_THREADS, "runner": runner.how},
            "lr": {"set": lr, "set_from": lr_from, "random": random_lr, "random_from": random_lr_from},
            "random_subset": {"seed": subset_seed, "budget": budget, "note": random_note},
            "full_data_note": full_note, "renormalised": renormalised, "rows": rows}, "acc", "images")
