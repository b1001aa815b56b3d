"""Starting a distillation from an exported set: ``algorithms.<name>.init_from: FILE``.

A spec may start an image method or Farzi (at every budget, or at the budgets a mapping
``{budget: FILE}`` names) from a synthetic set in the export contract (``orchestrate
export``, or a file of ``distilled/``) instead of real data or noise: an image trial's images are the
file's and its learned step size (MTT, MCT) the file's ``lr``; a Farzi trial's latent sequences
``F`` and decoder ``M`` are the file's. Optimisers start afresh (no momentum: an exported set does
not carry it). That is how a distillation continues past the end
of the sweep that made the set (a sweep's root that did not survive, a set made on another
machine, a longer run in steps of what one session affords). ``FILE`` may also name a trial's
set in the MLflow tracking store, as MLflow names artifacts: ``runs:/RUN_ID`` (the final set of a
finished trial) or ``runs:/RUN_ID/ARTIFACT_PATH`` (e.g. ``synthetic_latest/synthetic.safetensors``,
a running trial's latest set); it is downloaded into the node's cache (:func:`fetch_run_set`) when
the spec is read, and is from then on the file it downloaded. The new trial counts its iterations
from 0 and its sets record where they started (metadata ``start``: the file, its sha256, the
iterations behind it, the start record of its own trial), so the iterations behind a set add up
along the chain (:func:`iterations_behind`).

The file is checked twice: when the spec is read (:func:`check_spec_entry`: it exists, is a set
of the spec's dataset and of the method's kind, whitened exactly when the spec whitens) and, once
the data is loaded, against it (:func:`load_init_sets`: images: the normalisation, the image shape,
and ``budget`` images per class in the class-major order every image distiller keeps; Farzi: ``F``
of [budget, seq_len, latent_dim] and ``M`` of [latent_dim, the data's vocabulary], decoded at the
spec's temperature). Its sha256 is part of the spec's hash:
a sweep resumes only on the same start.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .artifacts import IMAGES_FORMAT, SEQUENCES_FORMAT, read_synthetic
from .store import file_sha256


@dataclass(frozen=True)
class InitSet:
    """The start one algorithm of a spec reads: the file's tensors (images: ``images``, ``labels``,
    ``lr``; Farzi: ``F``, ``M``, ``lr``, ``temperature``) and metadata."""
    path: str
    sha256: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]

    @property
    def images(self) -> torch.Tensor:
        return self.tensors["images"]

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors["labels"]

    @property
    def lr(self) -> float:
        return float(self.tensors["lr"].reshape(()))

    def record(self) -> dict[str, Any]:
        """The start record of a trial that starts from this set (``start.json``, and the ``start``
        metadata of its sets): the file, and what was behind it."""
        meta = self.meta
        parent_start = _json(meta.get("start"))
        return {"init": "set", "path": self.path, "sha256": self.sha256, "algorithm": meta.get("algorithm"),
                "spec_hash": meta.get("spec_hash"), "run_id": meta.get("run_id"),
                "iteration": _int(meta.get("iteration")), "iterations_behind": iterations_behind(meta),
                **({"start": parent_start} if parent_start is not None else {})}


def _json(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _int(text: str | None) -> int:
    try:
        return int(json.loads(text)) if text is not None else 0
    except (ValueError, TypeError):
        return 0


def iterations_behind(meta: dict[str, str]) -> int:
    """How many iterations made the set whose metadata is ``meta``: its own ``iteration``, plus those
    behind the set it started from (``start.init == "set"``), recursively."""
    start = _json(meta.get("start"))
    before = int(start.get("iterations_behind", 0)) if isinstance(start, dict) and start.get("init") == "set" else 0
    return _int(meta.get("iteration")) + before


RUNS_PREFIX = "runs:/"


def fetch_run_set(uri: str, tracking_uri: str | None) -> Path:
    """The local file of the set that ``uri`` (``runs:/RUN_ID[/ARTIFACT_PATH]``) names in the MLflow
    store at ``tracking_uri``: downloaded with MLflow's client into the node's cache
    (``ORCHESTRATE_CACHE``/runs/RUN_ID/SHA256.safetensors, written under a temporary name, then
    renamed). Without an artifact path, the final set of a finished trial. Raises ValueError saying
    why (no store given, no such store or run, a sweep's run, a trial without that set)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    from .storage import cache_dir
    from .tracking import ROLE_TAG, TrackingStoreError, check_tracking_store, sqlite_file
    from .trial import LATEST_ARTIFACT, SYNTHETIC_ARTIFACT

    if not tracking_uri:
        raise ValueError("a run's set is read from its MLflow tracking store, and none is given here "
                         "(--tracking-uri; launch, validate and experts also read the store of --root)")
    try:
        run_id, artifact = RunsArtifactRepository.parse_runs_uri(uri)
    except MlflowException as e:
        raise ValueError(f"not a run's artifact URI, runs:/RUN_ID[/ARTIFACT_PATH] ({e.message})") from None
    db = sqlite_file(tracking_uri)
    if db is not None and not db.is_file():  # MLflow would create an empty store there
        raise ValueError(f"no MLflow tracking database at {db}: give the --root (or --tracking-uri) of the "
                         f"store that holds run {run_id}")
    try:
        check_tracking_store(tracking_uri, write=False)
    except TrackingStoreError as e:
        raise ValueError(str(e)) from None
    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise ValueError(f"run {run_id} is not in {tracking_uri} ({e.message})") from None
    if artifact is None:
        if run.data.tags.get(ROLE_TAG) == "sweep":
            raise ValueError(f"run {run_id} is a sweep, whose trials hold the sets: name one of them "
                             f"(orchestrate results --sweep {run_id} lists them)")
        if run.info.status != "FINISHED":
            raise ValueError(f"run {run_id} is {run.info.status}: a trial logs its final set when it finishes; "
                             f"name the set of its latest evaluation, {RUNS_PREFIX}{run_id}/{LATEST_ARTIFACT}")
        artifact = SYNTHETIC_ARTIFACT
    folder = cache_dir() / "runs" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as tmp:
        try:
            local = Path(client.download_artifacts(run_id, artifact, tmp))
        except (MlflowException, OSError) as e:
            raise ValueError(f"run {run_id} has no artifact {artifact!r} in {tracking_uri} "
                             f"({getattr(e, 'message', None) or e})") from None
        if not local.is_file():
            raise ValueError(f"{artifact!r} of run {run_id} is a folder; name the set's file in it")
        dest = folder / f"{file_sha256(local)}.safetensors"
        os.replace(local, dest)
    return dest


# the method's kind -> the export format its starts are in, and the tensors they must hold
START_FORMATS = {"image": (IMAGES_FORMAT, {"images", "labels", "lr"}),
                 "sequence": (SEQUENCES_FORMAT, {"F", "M", "temperature"})}


def check_spec_entry(key: str, value: Any, method, dataset: dict[str, Any], err,
                     tracking_uri: str | None = None) -> dict[str, str] | None:
    """``algorithms.<name>.init_from`` as the spec gives it (``key``): a path (relative paths from
    the working directory, as ``dataset.root``) to a set of the spec's dataset, or a trial's
    set in the tracking store at ``tracking_uri`` (``runs:/...``, :func:`fetch_run_set`). Returns
    ``{"path", "sha256"}`` (and ``"uri"``: the run's URI, ``path`` being the file downloaded), or
    None after ``err(key, message)``."""
    if not isinstance(value, str) or not value:
        err(key, f"must be the path of an exported set (.safetensors) or a trial's set (runs:/RUN_ID), "
                 f"or a mapping budget -> either, got {value!r}")
        return None
    if method.kind not in START_FORMATS:
        err(key, f"{method.name} distils {method.kind}s; init_from starts an image method or Farzi from an exported "
                 f"set")
        return None
    run_uri = value.startswith(RUNS_PREFIX)
    if run_uri:
        try:
            path = fetch_run_set(value, tracking_uri)
        except ValueError as e:
            err(key, f"{value}: {e}")
            return None
    else:
        path = Path(value).expanduser()
        if not path.is_file():
            err(key, f"{value}: no such file (relative paths are read from the working directory, {Path.cwd()})")
            return None
    try:
        tensors, meta = read_synthetic(path)
    except ValueError as e:
        err(key, f"{value}: {e}" if run_uri else str(e))
        return None
    fmt, needs = START_FORMATS[method.kind]
    if meta.get("format", IMAGES_FORMAT) != fmt:
        err(key, f"{value}: metadata field 'format' is {meta.get('format')!r}: not a set of {method.kind}s, which "
                 f"{method.name} distils")
        return None
    if not needs <= set(tensors):
        err(key, f"{value}: holds {', '.join(sorted(tensors))}, not {', '.join(sorted(needs))}: "
                 f"{'real sequences (a baseline), not a distilled latent set' if 'sequences' in tensors else 'not a set'}"
                 f" {method.name} can start from")
        return None
    name = str(dataset.get("name", "")).lower()
    if meta["dataset"].lower() != name:
        err(key, f"{value}: a set of {meta['dataset']!r} (metadata field 'dataset'), but the spec's dataset is {name!r}")
        return None
    if (meta.get("zca") == "true") != bool(dataset.get("zca")):
        err(key, f"{value}: {'ZCA-whitened' if meta.get('zca') == 'true' else 'not whitened'} images (metadata "
                 f"field 'zca'), but the spec has dataset.zca {bool(dataset.get('zca'))}: they must agree")
        return None
    if run_uri:
        return {"path": str(path), "sha256": path.stem, "uri": value}
    return {"path": value, "sha256": file_sha256(path)}


def check_init_from(key: str, value: Any, budgets: list[int], method, dataset: dict[str, Any],
                    err, tracking_uri: str | None = None) -> dict[int, dict[str, str]]:
    """``algorithms.<name>.init_from``: one path or run URI (the start of every budget) or a mapping
    budget -> path or run URI (budgets it leaves out start as the method does). Returns budget ->
    ``{"path", "sha256"[, "uri"]}`` of the sets that passed :func:`check_spec_entry`."""
    if isinstance(value, dict):
        out = {}
        for b, path in value.items():
            if b not in budgets:
                err(f"{key}.{b}", f"is not one of the budgets {budgets}")
                continue
            entry = check_spec_entry(f"{key}.{b}", path, method, dataset, err, tracking_uri)
            if entry is not None:
                out[b] = entry
        return out
    entry = check_spec_entry(key, value, method, dataset, err, tracking_uri)
    return {} if entry is None else {b: dict(entry) for b in budgets}


def load_init_sets(spec, data) -> dict[tuple[str, int], InitSet]:
    """(algorithm, budget) -> its start, for every budget of ``spec`` that ``init_from`` starts
    from a file, checked against the loaded ``data``; raises SpecError naming the spec, the key and
    the file."""
    from . import methods
    from .spec import SpecError

    out: dict[tuple[str, int], InitSet] = {}
    for name, algo, budget, entry in ((n, a, b, e) for n, a in spec.algorithms.items()
                                      for b, e in (a.get("init_from") or {}).items()):
        key, path = f"algorithms.{name}.init_from", entry["path"]
        given = entry.get("uri", path)  # a run's set: its URI; the file is its download

        def fail(msg: str):
            return SpecError([f"{spec.path}: {key}: {given}: {msg}"])

        try:
            tensors, meta = read_synthetic(Path(path).expanduser())
        except (ValueError, OSError) as e:
            raise SpecError([f"{spec.path}: {key}: {f'{given}: ' if given != path else ''}{e}"]) from None
        sha = file_sha256(Path(path).expanduser())
        if sha != entry["sha256"]:
            raise fail(f"the file changed since the spec was read (sha256 {sha[:16]}, read as {entry['sha256'][:16]})")
        if methods.get(name).kind == "sequence":
            hp = {**algo["hyperparameters"], **(algo.get("per_budget") or {}).get(budget, {})}
            _check_latent_start(tensors, meta, data.info, budget, hp, fail)
        else:
            _check_image_start(tensors, meta, data.info, budget, fail)
        bad = [k for k in ("images", "F", "M", "lr", "temperature") if k in tensors and not bool(torch.isfinite(tensors[k]).all())]
        if bad:
            raise fail(f"the set holds a NaN or infinite value (tensor {', '.join(repr(k) for k in bad)})")
        out[(name, budget)] = InitSet(path=given, sha256=sha, tensors=tensors, meta=meta)
    return out


def _check_image_start(tensors: dict[str, torch.Tensor], meta: dict[str, str], info, budget: int, fail) -> None:
    """An image set against the loaded data: the image shape, the normalisation, and ``budget``
    images per class in class order."""
    images, labels = tensors["images"], tensors["labels"]
    want = (info.channels, info.size, info.size)
    if tuple(images.shape[1:]) != want:
        raise fail(f"images of {tuple(images.shape[1:])}, but {info.name} at this spec's size is {want}")
    for field, ours in (("mean", info.mean), ("std", info.std)):
        theirs = _json(meta.get(field))
        if not isinstance(theirs, list) or len(theirs) != len(ours) or \
                any(not math.isclose(float(a), float(b), rel_tol=1e-5, abs_tol=1e-7) for a, b in zip(theirs, ours)):
            raise fail(f"metadata field {field!r} is {meta.get(field)}, but {info.name} is normalised with "
                       f"{[round(float(v), 6) for v in ours]}: the images are in another scale")
    k = info.num_classes
    layout = torch.arange(k).repeat_interleave(budget)
    if labels.shape != layout.shape or not torch.equal(labels, layout):
        counts = torch.bincount(labels.clamp(min=0), minlength=k).tolist() if labels.numel() else []
        raise fail(f"budget {budget} needs {budget} images per class for {k} classes in class order "
                   f"(labels 0 x{budget}, 1 x{budget}, ...); the file's labels count {counts} per class"
                   f"{' (not in class order)' if counts == [budget] * k else ''}; give each budget its "
                   f"own file ({{{budget}: FILE}})")


def _check_latent_start(tensors: dict[str, torch.Tensor], meta: dict[str, str], info, budget: int,
                        hp: dict[str, Any], fail) -> None:
    """A Farzi set (``F``, ``M``) against the loaded data and the trial's hyperparameters: ``budget``
    latent sequences of ``seq_len`` x ``latent_dim``, a decoder onto the data's vocabulary (and its
    padding id), decoded at the spec's ``temperature``. A set fixes those three: they must be single
    values, not a grid or a distribution."""
    fixed = {}
    for k in ("seq_len", "latent_dim", "temperature"):
        if isinstance(hp.get(k), (list, dict)):
            raise fail(f"the set fixes {k} ({k} {hp[k]!r} in the spec is a grid or a distribution): give one value")
        fixed[k] = hp.get(k)
    for field, ours in (("vocab_size", info.vocab_size), ("pad_id", info.pad_id)):
        if _json(meta.get(field)) != ours:
            raise fail(f"metadata field {field!r} is {meta.get(field)}, but {info.name}'s is {json.dumps(ours)}: "
                       f"a set of another vocabulary")
    F, M = tensors["F"], tensors["M"]
    want = (budget, fixed["seq_len"], fixed["latent_dim"])
    if tuple(F.shape) != want:
        raise fail(f"F of {tuple(F.shape)}, but budget {budget} at seq_len {fixed['seq_len']} and latent_dim "
                   f"{fixed['latent_dim']} is {want}; give each budget its own file ({{{budget}: FILE}})")
    if tuple(M.shape) != (fixed["latent_dim"], info.vocab_size):
        raise fail(f"M of {tuple(M.shape)}, but latent_dim {fixed['latent_dim']} onto {info.vocab_size} tokens is "
                   f"{(fixed['latent_dim'], info.vocab_size)}")
    temperature = float(tensors["temperature"].reshape(()))
    if not math.isclose(temperature, float(fixed["temperature"]), rel_tol=1e-6):
        raise fail(f"tensor 'temperature' is {temperature:g}, but the spec's temperature is {fixed['temperature']:g}: "
                   f"F and M decode to the set's sequences at the set's temperature only")


def warm_start(distiller, init: InitSet) -> None:
    """Start ``distiller`` (just built, at iteration 0) from ``init``: an image method's images (and,
    for a method that learns its step size, its lr), or Farzi's ``F`` and ``M``, become the set's."""
    start = getattr(distiller, "warm_start", None)
    if start is None:
        raise TypeError(f"{type(distiller).__name__} cannot start from a set (it has no warm_start)")
    if "F" in init.tensors:
        start(init.tensors["F"], init.tensors["M"])
    else:
        start(init.images, init.lr)


def build_started(point: dict[str, Any], spec: dict[str, Any], data, task, expert_files: dict[str, list[str]],
                  device: torch.device, init_sets: dict[tuple[str, int], InitSet], seed: int | None = None):
    """The distiller of a trial point (``methods.build_point``) started as its spec says, and its
    start record (``start.json`` and the sets' ``start`` metadata): the exported set of
    ``init_from`` when ``init_sets`` has one for its (algorithm, budget) (:meth:`InitSet.record`), else the
    method's own start (``Method.start_record``: the real rows it read, or None)."""
    from . import methods

    distiller = methods.build_point(point, spec, data, task, expert_files, device, seed)
    init = init_sets.get((point["algorithm"], point["budget"]))
    if init is not None:
        warm_start(distiller, init)
        return distiller, init.record()
    return distiller, methods.get(point["algorithm"]).start_record(distiller, task, data, spec["model"])
