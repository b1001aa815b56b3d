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

The store may also live behind a URI (``s3://bucket/prefix/trajectories``, see
:mod:`orchestrator.storage`): files are then written whole to a temporary key and moved under
their name (server-side copy), and read through a node-local cache that is memory-mapped.
"""
from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import json
import math
import os
import platform
import subprocess
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import torch

from . import storage

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


def git_commit() -> str | None:
    """The checkout's HEAD, with ``+dirty`` when tracked files differ from it (the numbers of such
    a launch are not reproducible from the commit alone); None outside a git checkout."""
    def git(*args: str) -> str | None:
        out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None
    try:
        head = git("rev-parse", "HEAD")
        if not head:
            return None
        return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _discard(tmp: Path) -> None:
    """Remove a temporary file in a ``finally`` block. It may not exist (its creation is what
    failed, e.g. in a read-only folder) and removing it may fail too: neither may replace the
    exception that is on its way out, which names the real problem."""
    with contextlib.suppress(OSError):
        tmp.unlink()


class StoreNotWritableError(RuntimeError):
    """A folder of the store that this process cannot write to (the message names it)."""


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """Make sure ``folder`` exists (creating it) and that a file can be created in it: the
    honest test (``os.access`` misses read-only mounts, ACLs and a file in the folder's place).
    Raises :class:`StoreNotWritableError` naming the folder and ``what`` it holds."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        if isinstance(e, FileExistsError) or (folder.exists() and not folder.is_dir()):
            reason = "a file is in the way of the folder"
        raise StoreNotWritableError(f"{folder}: cannot write there ({reason}); it holds {what}. "
                                    f"Make it writable for this user, or choose another --root/--storage") from e


def atomic_write_bytes(path: Path, data: bytes, replace: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (hidden temporary file, fsync, then renamed into
    place). With ``replace=False`` nothing that exists at ``path`` is ever replaced: the file is
    hard-linked into place (``FileExistsError`` if anything appeared there meanwhile), or created
    exclusively on a file system without hard links."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic, and never replaces anything
            except FileExistsError:
                raise
            except OSError:  # no hard links here: an exclusive create instead
                with open(path, "xb") as f:
                    f.write(data)
        _fsync_dir(path.parent)
    finally:
        _discard(tmp)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex), read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    """Memory-map one expert file; with ``verify`` the parameters' checksum is recomputed.
    ``path`` may be a remote URI: the file is then read from a node-local copy (downloaded once,
    see :func:`_open_remote`)."""
    if storage.is_remote(path):
        return _open_remote(path, verify)
    return _open_local(storage.local_path(path), verify, None)


def _open_remote(uri: str, verify: bool) -> Trajectory:
    """A remote trajectory file, memory-mapped from a node-local copy.

    Trials memory-map the expert trajectories they sample from: downloading them into each
    trial's memory would hold every expert of a sweep once per trial process (MTT's 100 CIFAR-10
    experts are 6.5 GB), whereas the processes of a node share one memory-mapped copy through
    the page cache. Copies are content-addressed: the file's footer (its schema, with the
    parameters' SHA-256 and every other metadata entry) is read first, a few kilobytes, and names
    the copy, so a copy is never stale; a download is verified before it is kept."""
    fs, fs_path = storage.resolve(uri)
    try:
        with fs.open_input_file(fs_path) as f:
            size = f.size()
            schema = pa.ipc.open_file(f).schema
    except (pa.ArrowException, OSError, ValueError) as e:
        raise CorruptTrajectoryError(f"{uri}: not a readable trajectory file ({type(e).__name__}: {e})") from e
    h = hashlib.sha256(str(size).encode())
    for k, v in sorted((schema.metadata or {}).items()):
        h.update(len(k).to_bytes(8, "little") + k + len(v).to_bytes(8, "little") + v)
    local = storage.cache_dir() / f"{h.hexdigest()[:32]}.arrow"
    if local.exists():
        try:
            return _open_local(local, verify, uri)
        except CorruptTrajectoryError:  # a damaged copy: fetch it again
            with contextlib.suppress(FileNotFoundError):
                local.unlink()
    tmp = local.with_name(f".{local.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        try:
            storage.download(uri, tmp)
        except (pa.ArrowException, OSError) as e:
            raise CorruptTrajectoryError(f"{uri}: could not be read ({type(e).__name__}: {e})") from e
        traj = _open_local(tmp, verify, uri)
        os.replace(tmp, local)  # the memory map stays valid across the rename
        return traj
    finally:
        _discard(tmp)


def _open_local(path: Path, verify: bool, uri: str | None) -> Trajectory:
    """Open the local file ``path``; errors and ``Trajectory.path`` name ``uri`` when it is the
    cached copy of a remote file."""
    shown = uri or path
    try:
        source = pa.memory_map(str(path), "r")
        table = pa.ipc.open_file(source).read_all()
        meta = read_meta(table.schema)
        traj = Trajectory(shown, table, meta)
    except (pa.ArrowInvalid, pa.ArrowException, OSError, KeyError, ValueError, json.JSONDecodeError) as e:
        raise CorruptTrajectoryError(f"{shown}: not a readable trajectory file ({type(e).__name__}: {e})") from e
    if verify:
        expected = meta.get("params_sha256")
        actual = _params_digest(traj.epochs, traj._flat)
        if expected != actual:
            raise CorruptTrajectoryError(f"{shown}: checksum mismatch (metadata says {expected}, data hashes to "
                                         f"{actual}); the file is corrupt")
    return traj


def write_trajectory(path: str | Path, checkpoints: Iterable, manifest, info: dict[str, Any]) -> tuple[str, int]:
    """Write the checkpoints (objects with ``epoch, params, train_loss, test_acc``) of one expert
    atomically. Returns (params SHA-256, bytes on disk). ``info`` goes into the schema metadata.
    ``path`` may be a remote URI (the whole file is built in memory, then stored atomically)."""
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
    if storage.is_remote(path):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, schema) as writer:
            writer.write_table(table, max_chunksize=max(1, len(table)))
        buf = sink.getvalue()
        storage.atomic_write(path, buf)
        return digest, buf.size
    path = storage.local_path(path)
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
        _discard(tmp)
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
    ones (``expert_00003.convex-w2-path.arrow``, see :func:`convex_form`).

    ``root`` is a local folder (locations are ``Path`` objects) or a remote URI such as
    ``s3://bucket/runs/trajectories`` (locations are URI strings)."""

    def __init__(self, root: str | Path):
        self.root = storage.normalise(root)
        self.remote = storage.is_remote(self.root)

    def dir(self, key: str, dataset: str) -> Path | str:
        return storage.join(self.root, f"{dataset}-{key}")

    @staticmethod
    def expert_name(index: int, form: str = "full") -> str:
        return f"expert_{index:05d}.arrow" if form == "full" else f"expert_{index:05d}.{form}.arrow"

    def expert_path(self, key: str, dataset: str, index: int, form: str = "full") -> Path | str:
        return storage.join(self.dir(key, dataset), self.expert_name(index, form))

    def _exists(self, loc) -> bool:
        return storage.exists(loc) if self.remote else loc.exists()

    def _write(self, loc, data: bytes) -> None:
        if self.remote:
            storage.atomic_write(loc, data)
        else:
            atomic_write_bytes(loc, data)

    def describe(self, key: str, dataset: str, what: dict[str, Any]) -> None:
        """Record (once) what the key stands for, readable by people."""
        p = storage.join(self.dir(key, dataset), "key.json")
        if not self._exists(p):
            self._write(p, json.dumps({"key": key, **what}, indent=2, default=str).encode())

    def check(self, key: str, dataset: str, count: int, form: str = "full", quarantine: bool = True
              ) -> tuple[list[ExpertRecord], list[int], list[str]]:
        """Verify experts 0..count-1 in ``form``: returns (valid records, indices missing, problems).
        A corrupt file is renamed to ``*.corrupt-<id>`` so it is never used and never lost (with
        ``quarantine``; without, it is only reported: a read-only check)."""
        valid, todo, problems = [], [], []
        present = storage.list_files(self.dir(key, dataset)) if self.remote else None  # one listing, not a HEAD each
        for i in range(count):
            p = self.expert_path(key, dataset, i, form)
            if not (storage.name(p) in present if self.remote else p.exists()):
                todo.append(i)
                continue
            try:
                t = open_trajectory(p)
                if form != "full":
                    convex_of(t)  # checks the beta table too
                nbytes = present[storage.name(p)] if self.remote else p.stat().st_size
                valid.append(ExpertRecord(i, str(p), t.meta["params_sha256"], nbytes, t.final_test_acc))
            except CorruptTrajectoryError as e:
                if not quarantine:
                    problems.append(f"{e}; it would be rebuilt")
                    todo.append(i)
                    continue
                aside = f"{storage.name(p)}.corrupt-{uuid.uuid4().hex[:6]}"
                if self.remote:
                    storage.move(p, storage.join(storage.parent(p), aside))
                else:
                    os.replace(p, p.with_name(aside))
                problems.append(f"{e}; moved to {aside} and rebuilding it")
                todo.append(i)
        return valid, todo, problems

    def write_manifest(self, key: str, dataset: str, records: dict[str, list[ExpertRecord]]) -> Path | str:
        """Record a launch's experts in ``manifest.json``. Entries of the manifest already there for other
        experts whose files still exist stay (a launch with a smaller ``experts.count`` does not hide the
        experts a larger one stored); the launch's own records replace theirs."""
        d = self.dir(key, dataset)
        p = storage.join(d, "manifest.json")
        forms: dict[str, dict[int, dict]] = {}
        try:
            old = json.loads(storage.read_bytes(p) if self.remote else Path(p).read_bytes())
            if old.get("key") == key:
                for form, recs in old["forms"].items():
                    for r in recs:
                        if isinstance(r, dict) and self._exists(storage.join(d, str(r["path"]))):
                            forms.setdefault(form, {})[int(r["index"])] = r
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # no manifest yet, or one unreadable: the launch's records alone
        for form, recs in records.items():
            for r in recs:
                forms.setdefault(form, {})[r.index] = r.__dict__ | {
                    "path": storage.name(r.path) if self.remote else Path(r.path).name}
        body = {"key": key, "forms": {form: [recs[i] for i in sorted(recs)] for form, recs in forms.items()}}
        self._write(p, json.dumps(body, indent=2).encode())
        return p

    def nbytes(self, key: str, dataset: str, form: str = "full") -> int:
        d = self.dir(key, dataset)
        pattern = "expert_[0-9]*[0-9].arrow" if form == "full" else f"expert_*.{form}.arrow"
        if self.remote:
            return sum(n for f, n in storage.list_files(d).items() if fnmatch.fnmatchcase(f, pattern))
        return sum(p.stat().st_size for p in d.glob(pattern)) if d.exists() else 0
