"""The trajectory store: expert trajectories as Arrow IPC files, one file per expert.

Layout: ``<root>/<dataset>-<key>/expert_00003.arrow`` where ``key`` hashes everything that
determines a trajectory (dataset name and content digest, model spec, training config, base
seed). One row per stored checkpoint (epoch) with the flat parameters in a fixed-size float32
column; the schema metadata carries the parameter manifest, dataset, model, training config,
seed, library versions and a SHA-256 of the parameters, so a file is readable and verifiable
with plain pyarrow.

Writes are atomic: a hidden temporary file in the same folder, fsync, rename, fsync of the
folder. Reads are memory-mapped (zero copy). A truncated or corrupt file fails verification,
is moved aside (never deleted, never used) and reported as missing, so it gets retrained.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import os
import platform
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import torch

FORMAT_VERSION = "1"
META_PREFIX = "distill."


class CorruptTrajectoryError(RuntimeError):
    """A trajectory file that cannot be read or whose checksum does not match."""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def store_key(dataset: dict, model: dict, training: dict, seed: int) -> str:
    """Content address of a set of experts: 16 hex digits of a SHA-256."""
    blob = canonical_json({"dataset": dataset, "model": model, "training": training, "seed": seed,
                           "format": FORMAT_VERSION})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version(), "torch": torch.__version__, "pyarrow": pa.__version__,
           "numpy": np.__version__}
    with contextlib.suppress(metadata.PackageNotFoundError):
        out["distill-orchestrator"] = metadata.version("distill-orchestrator")
    return out


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (hidden temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _params_digest(epochs: np.ndarray, params: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(epochs, dtype="<i4").tobytes())
    h.update(np.ascontiguousarray(params, dtype="<f4").data)
    return h.hexdigest()


@dataclass
class ExpertRecord:
    """What an expert worker returns: where its file is and how to check it."""
    index: int
    path: str
    sha256: str
    nbytes: int
    final_test_acc: float


class Trajectory:
    """One expert's checkpoints, memory-mapped. ``params`` is a read-only [epochs+1, P] tensor
    view of the file; index it and copy (``.clone()`` / ``.to(device)``) before changing it."""

    def __init__(self, path: Path, table: pa.Table, meta: dict[str, Any]):
        self.path, self.meta = path, meta
        chunked = table.column("params")
        # one chunk (as written here) is a zero-copy view; several are combined (a copy)
        col = chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()
        n = col.type.list_size
        values = col.values.to_numpy(zero_copy_only=True)[col.offset * n : (col.offset + len(col)) * n]
        self._flat = values.reshape(len(col), n)
        self.epochs = table.column("epoch").to_numpy()
        self.test_acc = table.column("test_acc").to_numpy(zero_copy_only=False)
        self.train_loss = table.column("train_loss").to_numpy(zero_copy_only=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.params = torch.from_numpy(self._flat)

    @property
    def manifest(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(n, tuple(s)) for n, s in self.meta["manifest"]]

    @property
    def num_epochs(self) -> int:
        return int(self.epochs[-1])

    @property
    def final_test_acc(self) -> float:
        return float(self.test_acc[-1])

    def __len__(self) -> int:
        return len(self._flat)

    def __getitem__(self, epoch: int) -> torch.Tensor:
        return self.params[epoch]


def read_meta(schema: pa.Schema) -> dict[str, Any]:
    raw = schema.metadata or {}
    out = {}
    for k, v in raw.items():
        k = k.decode()
        if k.startswith(META_PREFIX):
            out[k[len(META_PREFIX):]] = json.loads(v.decode())
    return out


def open_trajectory(path: str | Path, verify: bool = True) -> Trajectory:
    """Memory-map one expert file; with ``verify`` the parameters' checksum is recomputed."""
    path = Path(path)
    try:
        source = pa.memory_map(str(path), "r")
        table = pa.ipc.open_file(source).read_all()
        meta = read_meta(table.schema)
        traj = Trajectory(path, table, meta)
    except (pa.ArrowInvalid, pa.ArrowException, OSError, KeyError, ValueError, json.JSONDecodeError) as e:
        raise CorruptTrajectoryError(f"{path}: not a readable trajectory file ({type(e).__name__}: {e})") from e
    if verify:
        expected = meta.get("params_sha256")
        actual = _params_digest(traj.epochs, traj._flat)
        if expected != actual:
            raise CorruptTrajectoryError(f"{path}: checksum mismatch (metadata says {expected}, data hashes to "
                                         f"{actual}); the file is corrupt")
    return traj


def write_trajectory(path: str | Path, checkpoints: Iterable, manifest, info: dict[str, Any]) -> tuple[str, int]:
    """Write the checkpoints (objects with ``epoch, params, train_loss, test_acc``) of one expert
    atomically. Returns (params SHA-256, bytes on disk). ``info`` goes into the schema metadata."""
    path = Path(path)
    epochs, rows, losses, accs = [], [], [], []
    for c in checkpoints:
        epochs.append(c.epoch)
        rows.append(c.params.detach().to("cpu", torch.float32).numpy())
        losses.append(c.train_loss)
        accs.append(c.test_acc)
    params = np.stack(rows)
    epochs_np = np.asarray(epochs, dtype=np.int32)
    digest = _params_digest(epochs_np, params)
    meta = {**info, "manifest": [[n, list(s)] for n, s in manifest], "params_sha256": digest,
            "format": FORMAT_VERSION, "versions": library_versions()}
    schema = pa.schema([("epoch", pa.int32()), ("params", pa.list_(pa.float32(), params.shape[1])),
                        ("train_loss", pa.float32()), ("test_acc", pa.float32())],
                       metadata={META_PREFIX + k: json.dumps(v, default=str) for k, v in meta.items()})
    flat = pa.array(params.reshape(-1), type=pa.float32())
    table = pa.table([pa.array(epochs_np), pa.FixedSizeListArray.from_arrays(flat, params.shape[1]),
                      pa.array(losses, pa.float32()), pa.array(accs, pa.float32())], schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with pa.OSFile(str(tmp), "wb") as sink:
            with pa.ipc.new_file(sink, schema) as writer:
                writer.write_table(table, max_chunksize=max(1, len(table)))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return digest, path.stat().st_size


# -- the compact (convexified, MCT) form ------------------------------------------------------------
def convex_form(waypoints: int = 2, beta: str = "path", smooth: bool = False) -> str:
    """The name of a compact form, e.g. ``convex-w2-path``; also its file suffix."""
    return f"convex-w{waypoints}-{beta}" + ("-smooth" if smooth else "")


def write_convex(path: str | Path, convex, manifest, info: dict[str, Any], test_acc: float = math.nan) -> tuple[str, int]:
    """Write an expert's convexified trajectory (``algorithms.mct.ConvexTrajectory``): one row per
    waypoint, and the β table (float32, little-endian, base64) with its SHA-256 in the metadata."""
    beta = np.ascontiguousarray(convex.beta.detach().cpu().numpy(), dtype="<f4")
    rows = [SimpleNamespace(epoch=e, params=w, train_loss=math.nan, test_acc=test_acc if e == convex.num_epochs else math.nan)
            for e, w in zip(convex.epochs, convex.waypoints)]
    meta = {**info, "convex": {"epochs": convex.num_epochs, "waypoint_epochs": list(convex.epochs),
                               "beta_shape": list(beta.shape), "beta_b64": base64.b64encode(beta.tobytes()).decode(),
                               "beta_sha256": hashlib.sha256(beta.tobytes()).hexdigest()}}
    return write_trajectory(path, rows, manifest, meta)


def open_convex(path: str | Path, verify: bool = True):
    """Read a compact file back into a ``ConvexTrajectory`` (bit-exact)."""
    return convex_of(open_trajectory(path, verify=verify), verify=verify)


def convex_of(t: Trajectory, verify: bool = True):
    """The ``ConvexTrajectory`` held by an opened compact file (its β table checked)."""
    from algorithms.mct import ConvexTrajectory, layer_bounds

    try:
        c = t.meta["convex"]
        raw = base64.b64decode(c["beta_b64"])
    except (KeyError, ValueError) as e:
        raise CorruptTrajectoryError(f"{t.path}: not a convexified trajectory ({e})") from e
    if verify and hashlib.sha256(raw).hexdigest() != c.get("beta_sha256"):
        raise CorruptTrajectoryError(f"{t.path}: checksum mismatch in the beta table; the file is corrupt")
    beta = torch.from_numpy(np.frombuffer(raw, dtype="<f4").reshape(c["beta_shape"]).copy())
    return ConvexTrajectory(t.params.clone(), [int(e) for e in t.epochs], beta, layer_bounds(t.manifest))


class TrajectoryStore:
    """A folder of expert sets, each addressed by :func:`store_key`. Every expert may be kept
    in several *forms*: ``full`` (``expert_00003.arrow``, every epoch) and compact convexified
    ones (``expert_00003.convex-w2-path.arrow``, see :func:`convex_form`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def dir(self, key: str, dataset: str) -> Path:
        return self.root / f"{dataset}-{key}"

    @staticmethod
    def expert_name(index: int, form: str = "full") -> str:
        return f"expert_{index:05d}.arrow" if form == "full" else f"expert_{index:05d}.{form}.arrow"

    def expert_path(self, key: str, dataset: str, index: int, form: str = "full") -> Path:
        return self.dir(key, dataset) / self.expert_name(index, form)

    def describe(self, key: str, dataset: str, what: dict[str, Any]) -> None:
        """Record (once) what the key stands for, readable by people."""
        p = self.dir(key, dataset) / "key.json"
        if not p.exists():
            atomic_write_bytes(p, json.dumps({"key": key, **what}, indent=2, default=str).encode())

    def check(self, key: str, dataset: str, count: int, form: str = "full"
              ) -> tuple[list[ExpertRecord], list[int], list[str]]:
        """Verify experts 0..count-1 in ``form``: returns (valid records, indices missing, problems).
        A corrupt file is renamed to ``*.corrupt-<id>`` so it is never used and never lost."""
        valid, todo, problems = [], [], []
        for i in range(count):
            p = self.expert_path(key, dataset, i, form)
            if not p.exists():
                todo.append(i)
                continue
            try:
                t = open_trajectory(p)
                if form != "full":
                    convex_of(t)  # checks the beta table too
                valid.append(ExpertRecord(i, str(p), t.meta["params_sha256"], p.stat().st_size, t.final_test_acc))
            except CorruptTrajectoryError as e:
                aside = p.with_name(f"{p.name}.corrupt-{uuid.uuid4().hex[:6]}")
                os.replace(p, aside)
                problems.append(f"{e}; moved to {aside.name} and rebuilding it")
                todo.append(i)
        return valid, todo, problems

    def write_manifest(self, key: str, dataset: str, records: dict[str, list[ExpertRecord]]) -> Path:
        p = self.dir(key, dataset) / "manifest.json"
        body = {"key": key, "forms": {form: [r.__dict__ | {"path": Path(r.path).name}
                                             for r in sorted(recs, key=lambda r: r.index)]
                                      for form, recs in records.items()}}
        atomic_write_bytes(p, json.dumps(body, indent=2).encode())
        return p

    def nbytes(self, key: str, dataset: str, form: str = "full") -> int:
        d = self.dir(key, dataset)
        pattern = "expert_[0-9]*[0-9].arrow" if form == "full" else f"expert_*.{form}.arrow"
        return sum(p.stat().st_size for p in d.glob(pattern)) if d.exists() else 0
