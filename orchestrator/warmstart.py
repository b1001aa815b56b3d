"""Starting a distillation from an exported set: ``algorithms.<name>.init_from: FILE``.

A spec may start an image method (at every budget, or at the budgets a mapping
``{budget: FILE}`` names) from a synthetic set in the export contract (``orchestrate
export``, or a file of ``distilled/``) instead of real images or noise: the trial's images are the
file's, its learned step size (MTT, MCT) the file's ``lr``, and its optimisers start afresh (no
momentum: an exported set does not carry it). That is how a distillation continues past the end
of the sweep that made the set (a sweep's root that did not survive, a set made on another
machine, a longer run in steps of what one session affords); the new trial counts its iterations
from 0 and its sets record where they started (metadata ``start``: the file, its sha256, the
iterations behind it, the start record of its own trial), so the iterations behind a set add up
along the chain (:func:`iterations_behind`).

The file is checked twice: when the spec is read (:func:`check_spec_entry`: it exists, is an image
set of the spec's dataset, whitened exactly when the spec whitens) and, once the data is loaded,
against it (:func:`load_init_sets`: the normalisation, the image shape, and ``budget`` images per
class in the class-major order every image distiller keeps). Its sha256 is part of the spec's hash:
a sweep resumes only on the same start.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .artifacts import IMAGES_FORMAT, read_synthetic
from .store import file_sha256


@dataclass(frozen=True)
class InitSet:
    """The start one algorithm of a spec reads: the file's images, labels and step size."""
    path: str
    sha256: str
    images: torch.Tensor
    labels: torch.Tensor
    lr: float
    meta: dict[str, str]

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


def check_spec_entry(key: str, value: Any, method, dataset: dict[str, Any], err) -> dict[str, str] | None:
    """``algorithms.<name>.init_from`` as the spec gives it (``key``): a path (relative paths from
    the working directory, as ``dataset.root``) to an image set of the spec's dataset. Returns
    ``{"path", "sha256"}``, or None after ``err(key, message)``."""
    if not isinstance(value, str) or not value:
        err(key, f"must be the path of an exported image set (.safetensors), or a mapping budget -> path, "
                 f"got {value!r}")
        return None
    if method.kind != "image":
        err(key, f"{method.name} distils {method.kind}s; init_from starts an image method from an exported image set")
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        err(key, f"{value}: no such file (relative paths are read from the working directory, {Path.cwd()})")
        return None
    try:
        tensors, meta = read_synthetic(path)
    except ValueError as e:
        err(key, str(e))
        return None
    if meta.get("format", IMAGES_FORMAT) != IMAGES_FORMAT or "images" not in tensors:
        err(key, f"{value}: metadata field 'format' is {meta.get('format')!r}: not an image set")
        return None
    name = str(dataset.get("name", "")).lower()
    if meta["dataset"].lower() != name:
        err(key, f"{value}: a set of {meta['dataset']!r} (metadata field 'dataset'), but the spec's dataset is {name!r}")
        return None
    if (meta.get("zca") == "true") != bool(dataset.get("zca")):
        err(key, f"{value}: {'ZCA-whitened' if meta.get('zca') == 'true' else 'not whitened'} images (metadata "
                 f"field 'zca'), but the spec has dataset.zca {bool(dataset.get('zca'))}: they must agree")
        return None
    return {"path": value, "sha256": file_sha256(path)}


def check_init_from(key: str, value: Any, budgets: list[int], method, dataset: dict[str, Any],
                    err) -> dict[int, dict[str, str]]:
    """``algorithms.<name>.init_from``: one path (the start of every budget) or a mapping budget ->
    path (budgets it leaves out start as the method does). Returns budget -> ``{"path", "sha256"}``
    of the files that passed :func:`check_spec_entry`."""
    if isinstance(value, dict):
        out = {}
        for b, path in value.items():
            if b not in budgets:
                err(f"{key}.{b}", f"is not one of the budgets {budgets}")
                continue
            entry = check_spec_entry(f"{key}.{b}", path, method, dataset, err)
            if entry is not None:
                out[b] = entry
        return out
    entry = check_spec_entry(key, value, method, dataset, err)
    return {} if entry is None else {b: dict(entry) for b in budgets}


def load_init_sets(spec, data) -> dict[tuple[str, int], InitSet]:
    """(algorithm, budget) -> its start, for every budget of ``spec`` that ``init_from`` starts
    from a file, checked against the loaded ``data``; raises SpecError naming the spec, the key and
    the file."""
    from .spec import SpecError

    out: dict[tuple[str, int], InitSet] = {}
    for name, algo, budget, entry in ((n, a, b, e) for n, a in spec.algorithms.items()
                                      for b, e in (a.get("init_from") or {}).items()):
        key, path = f"algorithms.{name}.init_from", entry["path"]

        def fail(msg: str):
            return SpecError([f"{spec.path}: {key}: {path}: {msg}"])

        try:
            tensors, meta = read_synthetic(Path(path).expanduser())
        except (ValueError, OSError) as e:
            raise SpecError([f"{spec.path}: {key}: {e}"]) from None
        sha = file_sha256(Path(path).expanduser())
        if sha != entry["sha256"]:
            raise fail(f"the file changed since the spec was read (sha256 {sha[:16]}, read as {entry['sha256'][:16]})")
        info, images, labels = data.info, tensors["images"], tensors["labels"]
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
        lr = float(tensors["lr"].reshape(()))
        if not math.isfinite(lr) or not bool(torch.isfinite(images).all()):
            raise fail("the set holds a NaN or infinite value (tensor 'images' or 'lr')")
        out[(name, budget)] = InitSet(path=path, sha256=sha, images=images, labels=labels, lr=lr, meta=meta)
    return out


def warm_start(distiller, init: InitSet) -> None:
    """Start ``distiller`` (just built, at iteration 0) from ``init``: its images (and, for a method
    that learns its step size, its lr) become the set's."""
    start = getattr(distiller, "warm_start", None)
    if start is None:
        raise TypeError(f"{type(distiller).__name__} cannot start from a set (it has no warm_start(images, lr))")
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
