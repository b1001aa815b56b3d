"""Files a trial produces: the synthetic set in the export contract, an image grid, the per-case
outcomes of its evaluation (:class:`CaseOutcomes`), and the distiller state for Tune checkpoints.
Everything is safetensors plus JSON: nothing is pickled."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from algorithms.base import SyntheticSet

from .store import atomic_write_bytes

CONTRACT_TENSORS = {"images": torch.float32, "labels": torch.int64, "lr": torch.float32}
IMAGES_FORMAT = "distill-orchestrator/synthetic-v1"
SEQUENCES_FORMAT = "distill-orchestrator/sequences-v1"


def _model_meta(model: dict[str, Any] | None) -> dict[str, str]:
    """The ``model`` metadata field: the JSON of the spec's model section the set was distilled
    (and is evaluated) with; absent from files written before it was recorded."""
    return {} if model is None else {"model": json.dumps(model, sort_keys=True)}


def file_model(meta: dict[str, str], path: str | Path) -> dict[str, Any] | None:
    """The model a set file records (``model`` metadata: a JSON mapping with a ``name``), or None
    for files without it; ValueError naming the file and the field when it is not such a mapping."""
    raw = meta.get("model")
    if raw is None:
        return None
    try:
        model = json.loads(raw)
    except ValueError:
        model = None
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise ValueError(f"{path}: metadata field 'model' must be the JSON of a model section with a 'name' "
                         f"(e.g. {{\"name\": \"convnet\", \"depth\": 3}}), got {raw[:80]!r}")
    return model


def save_synthetic(path: str | Path, syn: SyntheticSet, info, algorithm: str, extra: dict[str, Any] | None = None,
                   model: dict[str, Any] | None = None, zca=None) -> Path:
    """Write the export contract: ``images`` (N,C,H,W float32, normalised), ``labels`` (int64),
    ``lr`` (float32 scalar); string metadata ``dataset``, ``algorithm``, ``mean``, ``std``, and
    ``model`` (JSON of the spec's model section) when given. A set of ZCA-whitened images
    (``zca``: an ``algorithms.zca.ZCA``) adds ``zca: "true"`` and what undoes the whitening:
    ``zca_inverse`` (float32 [D, D], D = C*H*W) and ``zca_mean`` (float32 [C, H, W]), so that
    pixels = (images.flatten(1) @ zca_inverse).view_as(images) + zca_mean; ``mean``/``std`` then
    describe the dataset's usual normalisation, which these images did not go through. Files
    without ``zca`` read as before."""
    tensors = {"images": syn.images.detach().cpu().to(torch.float32).contiguous(),
               "labels": syn.labels.detach().cpu().to(torch.int64).contiguous(),
               "lr": torch.tensor(float(syn.lr), dtype=torch.float32)}
    meta = {"dataset": info.name, "algorithm": algorithm, "mean": json.dumps(list(info.mean)),
            "std": json.dumps(list(info.std)), "format": IMAGES_FORMAT, **_model_meta(model)}
    if zca is not None:
        state = zca.state_dict()
        tensors["zca_inverse"] = state["inverse"].to(torch.float32).contiguous()
        tensors["zca_mean"] = state["mean"].to(torch.float32).contiguous()
        meta["zca"] = "true"
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items()})
    atomic_write_bytes(Path(path), st_save(tensors, metadata=meta))
    return Path(path)


def save_sequences(path: str | Path, syn, data, algorithm: str, extra: dict[str, Any] | None = None,
                   samples: int = 20, width: int = 12, model: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """A distilled (Farzi: latent ``F`` [mu, xi, d], decoder ``M`` [d, V], ``lr`` the inner Adam step,
    ``temperature``) or real (``sequences`` int64 [mu, L]) set of sequences as safetensors, with the
    string metadata of the export contract (``dataset``, ``algorithm``; ``task``, ``vocab_size``,
    ``pad_id``; ``model`` when given), and a readable ``samples.txt`` beside it: the most likely
    token of every position (PTB: words; MovieLens: titles) with its probability."""
    from algorithms.farzi import FarziSet

    info = data.info
    meta = {"dataset": info.name, "algorithm": algorithm, "task": info.task, "vocab_size": str(info.vocab_size),
            "pad_id": json.dumps(info.pad_id), "format": SEQUENCES_FORMAT, **_model_meta(model)}
    lines = [f"# {algorithm} on {info.name}: the most likely token per position"]
    if isinstance(syn, FarziSet):
        tensors = {"F": syn.F.detach().cpu().float().contiguous(), "M": syn.M.detach().cpu().float().contiguous(),
                   "lr": torch.tensor(float(syn.lr), dtype=torch.float32),
                   "temperature": torch.tensor(float(syn.temperature), dtype=torch.float32)}
        with torch.no_grad():
            top = syn.probs().cpu().max(-1)
        lines[0] += f" (mean entropy {syn.entropy():.3f} nats)"
        for i in range(min(samples, len(top.indices))):
            words = data.decode(top.indices[i].tolist())
            lines.append(f"[{i}] " + " | ".join(f"{w} ({p:.2f})" for w, p in zip(words, top.values[i].tolist())))
    else:  # real sequences (RealSequences, or their int64 tensor)
        seqs = getattr(syn, "sequences", syn).detach().cpu().to(torch.int64).contiguous()
        tensors = {"sequences": seqs}
        for i in range(min(samples, len(seqs))):
            ids = [t for t in seqs[i].tolist() if info.pad_id is None or t != info.pad_id][-width * 4:]
            lines.append(f"[{i}] " + " | ".join(data.decode(ids)))
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items()})
    atomic_write_bytes(Path(path), st_save(tensors, metadata=meta))
    text = Path(path).with_name("samples.txt")
    atomic_write_bytes(text, ("\n".join(lines) + "\n").encode())
    return Path(path), text


def set_evaluation(meta: dict[str, str]) -> dict[str, list[float]]:
    """The evaluation a set file carries (metric -> [mean, std] over the trial's evaluation networks at
    the set's iteration); {} for a file written before sets carried it, or made outside a trial."""
    try:
        value = json.loads(meta.get("evaluation", "{}"))
    except json.JSONDecodeError:
        return {}
    if not isinstance(value, dict):
        return {}
    # metric -> [mean, std] pairs only: bench/direct.py wrote its whole record (with "iteration" and
    # "seconds") into the sets it made before it wrote the pairs alone
    return {k: [float(v[0]), float(v[1])] for k, v in value.items()
            if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)}


def read_synthetic(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read and check a synthetic-set file (images, or sequences: Farzi's ``F``/``M`` or real
    ``sequences``); raises ValueError naming the file and the field."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    if meta.get("format") == SEQUENCES_FORMAT:
        for key in ("dataset", "algorithm", "task", "vocab_size"):
            if key not in meta:
                raise ValueError(f"{path}: metadata field {key!r} is missing")
        if "sequences" not in tensors and not {"F", "M"} <= set(tensors):
            raise ValueError(f"{path}: a sequence set holds 'F' and 'M' (Farzi) or 'sequences'; "
                             f"found {sorted(tensors)}")
        if "F" in tensors and (tensors["F"].ndim != 3 or tensors["M"].ndim != 2 or
                               tensors["F"].shape[2] != tensors["M"].shape[0]):
            raise ValueError(f"{path}: F {tuple(tensors['F'].shape)} and M {tuple(tensors['M'].shape)} do not match")
        return tensors, meta
    for name, dtype in CONTRACT_TENSORS.items():
        if name not in tensors:
            raise ValueError(f"{path}: tensor {name!r} is missing")
        if tensors[name].dtype != dtype:
            raise ValueError(f"{path}: tensor {name!r} is {tensors[name].dtype}, expected {dtype}")
    for key in ("dataset", "algorithm", "mean", "std"):
        if key not in meta:
            raise ValueError(f"{path}: metadata field {key!r} is missing")
    if tensors["images"].ndim != 4 or len(tensors["labels"]) != len(tensors["images"]):
        raise ValueError(f"{path}: images {tuple(tensors['images'].shape)} and labels "
                         f"{tuple(tensors['labels'].shape)} do not match")
    if meta.get("zca") == "true":
        shape = tuple(tensors["images"].shape[1:])
        d = math.prod(shape)
        for name, want in (("zca_inverse", (d, d)), ("zca_mean", shape)):
            if name not in tensors:
                raise ValueError(f"{path}: metadata field 'zca' is true but tensor {name!r} is missing")
            if tuple(tensors[name].shape) != want:
                raise ValueError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {want} "
                                 f"for images of {shape}")
    return tensors, meta


def image_grid(images: torch.Tensor, labels: torch.Tensor, mean, std, path: str | Path, max_per_class: int = 10,
               zca=None) -> Path:
    """A PNG grid of the synthetic images, one row per class, in pixel space (ZCA-whitened
    images through the inverse of ``zca``)."""
    from PIL import Image

    if zca is not None:
        x = zca.inverse(images.detach().cpu().double()).float()
    else:
        x = images.detach().cpu().float() * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    x = x.clamp(0, 1)
    classes = sorted(set(labels.tolist()))
    rows = [x[labels == c][:max_per_class] for c in classes]
    cols = max(len(r) for r in rows)
    _, c, h, w = x.shape
    scale = max(1, 64 // max(h, w))
    pad = 1
    canvas = np.ones(((h + pad) * len(rows) + pad, (w + pad) * cols + pad, 3), dtype=np.float32)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            arr = img.permute(1, 2, 0).numpy()
            if c == 1:
                arr = np.repeat(arr, 3, axis=2)
            canvas[pad + i * (h + pad): pad + i * (h + pad) + h, pad + j * (w + pad): pad + j * (w + pad) + w] = arr
    im = Image.fromarray((canvas * 255).round().astype(np.uint8))
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
    im.save(tmp, format="PNG")
    os.replace(tmp, path)
    return Path(path)


# -- distiller state <-> safetensors + JSON (Tune checkpoints) -----------------------------------
def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__items__": [[k, _encode(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint {type(obj).__name__} at {path}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        if "__list__" in obj:
            items = [_decode(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


def save_state(state: dict[str, Any], directory: str | Path) -> None:
    """Write a nested state (dicts, lists, tensors, scalars) as ``state.safetensors`` + ``state.json``."""
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, tensors, "s")
    atomic_write_bytes(directory / "state.safetensors", st_save(tensors))
    atomic_write_bytes(directory / "state.json", json.dumps(skeleton).encode())


def load_state(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    with safe_open(str(directory / "state.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _decode(json.loads((directory / "state.json").read_text()), tensors)


def state_complete(fs, directory: str) -> bool:
    """Whether the state written by :func:`save_state` in ``directory`` (on pyarrow filesystem
    ``fs``) is whole: ``state.json`` parses and ``state.safetensors`` is exactly as long as its
    header says. Tune copies a checkpoint file by file, so a copy cut off can leave either one
    missing or short."""
    try:
        with fs.open_input_stream(f"{directory}/state.json") as f:
            json.loads(f.read())
        info = fs.get_file_info(f"{directory}/state.safetensors")
        with fs.open_input_file(f"{directory}/state.safetensors") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return info.size == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError):
        return False


# -- per-case outcomes of an evaluation ----------------------------------------------------------
CASES_FORMAT = "distill-orchestrator/cases-v1"
CASES_FILE = "cases.safetensors"  # beside each synthetic.safetensors a trial logs


@dataclass
class CaseOutcomes:
    """One evaluation's headline metric test case by test case: ``values[k, i]`` is evaluation
    network ``k``'s outcome on test case ``i`` (right or wrong, hit@k, a chunk's summed
    cross-entropy), ``weights[i]`` the case's weight (1, or the chunk's number of targets); a
    network's metric is ``values[k].sum() / weights.sum()`` (ln of the perplexity for ``ppl``).
    Two evaluations of the same test cases, networks of the same seeds, give a paired difference
    (``orchestrator.evaluate.paired_stats``)."""

    metric: str  # acc, hr10, ppl
    unit: str  # what one test case is: images, users, chunks
    seeds: list[int]  # the networks' seeds, one per row of values
    values: torch.Tensor  # [networks, cases], float64
    weights: torch.Tensor  # [cases], float64

    @classmethod
    def of(cls, metric: str, unit: str, seeds: list[int], cases: list[tuple[torch.Tensor, torch.Tensor]]
           ) -> "CaseOutcomes":
        """From per-network ``(value, weight)`` pairs (every network scored on the same cases)."""
        return cls(metric, unit, list(seeds), torch.stack([v.detach().cpu().double() for v, _ in cases]),
                   cases[0][1].detach().cpu().double())

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per network, ``(value, weight)``: the form ``orchestrator.evaluate`` pairs."""
        return [(v, self.weights) for v in self.values]

    def network_metric(self, k: int) -> float:
        return float(self.values[k].sum() / self.weights.sum())


def save_cases(path: str | Path, cases: CaseOutcomes, extra: dict[str, Any] | None = None) -> Path:
    """Write ``cases`` as safetensors (0/1 outcomes as uint8, unit weights left out), atomically."""
    values = cases.values
    binary = bool(((values == 0) | (values == 1)).all())
    tensors = {"values": values.to(torch.uint8) if binary else values.contiguous()}
    if not bool((cases.weights == 1).all()):
        tensors["weights"] = cases.weights.contiguous()
    meta = {"format": CASES_FORMAT, "metric": cases.metric, "unit": cases.unit, "seeds": json.dumps(cases.seeds)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items()})
    atomic_write_bytes(Path(path), st_save(tensors, metadata=meta))
    return Path(path)


def read_cases(path: str | Path) -> tuple[CaseOutcomes, dict[str, str]]:
    """Read a :func:`save_cases` file; ValueError naming the file and the field that is wrong."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    if meta.get("format") != CASES_FORMAT:
        raise ValueError(f"{path}: metadata field 'format' is {meta.get('format')!r}, expected {CASES_FORMAT!r}")
    for key in ("metric", "unit", "seeds"):
        if key not in meta:
            raise ValueError(f"{path}: metadata field {key!r} is missing")
    try:
        seeds = json.loads(meta["seeds"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: metadata field 'seeds' is not JSON ({e})") from e
    values = tensors.get("values")
    if values is None or values.ndim != 2:
        raise ValueError(f"{path}: tensor 'values' must be [networks, cases]; found "
                         f"{None if values is None else tuple(values.shape)}")
    weights = tensors.get("weights", torch.ones(values.shape[1], dtype=torch.float64))
    if weights.shape != (values.shape[1],) or not isinstance(seeds, list) or len(seeds) != values.shape[0]:
        raise ValueError(f"{path}: tensor 'weights' {tuple(weights.shape)} and metadata field 'seeds' ({seeds}) "
                         f"do not match values {tuple(values.shape)}")
    return CaseOutcomes(meta["metric"], meta["unit"], [int(s) for s in seeds], values.double(), weights.double()), meta
