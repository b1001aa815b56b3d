"""Storage that the nodes of a cluster share: a local folder, or a URI read through ``pyarrow.fs``.

``--storage`` (``ORCHESTRATE_STORAGE``) holds the trajectory store, Tune's experiments and, with
a local MLflow database, the MLflow artifacts. It is a local folder (NFS or the like on a
cluster), a ``file://`` URI (the same thing), or any URI ``pyarrow.fs.FileSystem.from_uri``
resolves: ``s3://bucket/prefix``, ``gs://bucket/prefix``, ``hdfs://...``.

Credentials and endpoints come from each node's environment, as the cloud SDKs read them, never
from a spec or a file of this project: for S3, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (or
a profile, or an instance role), ``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL`` for an
S3-compatible server (MinIO, Ceph): pyarrow's S3 filesystem, boto3 and so MLflow all honour it
(MLflow also reads ``MLFLOW_S3_ENDPOINT_URL``).

Local locations are ``pathlib.Path`` objects and keep the local code paths (rename, fsync,
memory mapping); remote ones are URI strings, which travel to Ray workers as they are and are
resolved there.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import tempfile
import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

STORAGE_ENV = "ORCHESTRATE_STORAGE"
CACHE_ENV = "ORCHESTRATE_CACHE"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class StorageError(ValueError):
    """A storage location that cannot be used (says which and why)."""


def is_remote(loc) -> bool:
    """A URI other than ``file://`` (``s3://``, ``gs://``, ...)."""
    m = isinstance(loc, str) and _SCHEME.match(loc)
    return bool(m) and m.group(1).lower() != "file"


def normalise(loc: str | os.PathLike) -> Path | str:
    """A local path or ``file://`` URI becomes an absolute ``Path``; a remote URI stays a string,
    without a trailing slash (nothing is contacted: see :func:`check_access`)."""
    s = os.fspath(loc)
    m = _SCHEME.match(s)
    if not m:
        return Path(s).expanduser().resolve()
    parts = urlsplit(s)
    if parts.query or parts.fragment:
        raise StorageError(f"storage {s!r}: options in the URI ('?...') are not supported; give the endpoint and "
                           f"region in the environment (AWS_ENDPOINT_URL, AWS_DEFAULT_REGION)")
    if m.group(1).lower() == "file":
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"storage {s!r}: a file:// URI names a path on this machine (file:///abs/path)")
        return Path(unquote(parts.path)).resolve()
    if not parts.netloc:
        raise StorageError(f"storage {s!r}: no bucket or host after {m.group(0)!r}")
    return s.rstrip("/")


def check_access(loc) -> None:
    """Fail early, naming the location, when a remote storage cannot be reached (unknown scheme,
    missing bucket, no credentials, endpoint down); a local one is created when needed."""
    if not is_remote(loc):
        return
    parts = urlsplit(loc)
    try:
        fs, path = resolve(loc)
        _, top = resolve(f"{parts.scheme}://{parts.netloc}")
        if fs.get_file_info(top).type == pafs.FileType.NotFound:
            raise StorageError(f"storage {loc!r} cannot be used: {parts.netloc!r} does not exist (create the bucket "
                               f"first; the endpoint is {os.environ.get('AWS_ENDPOINT_URL') or 'the provider default'})")
        probe = f"{path}/.orchestrate-write-check-{uuid.uuid4().hex[:8]}"  # credentials that may write
        _upload(fs, probe, b"")
        fs.delete_file(probe)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as e:
        raise StorageError(f"storage {loc!r} cannot be used: {e}") from e


def local_path(loc: str | os.PathLike) -> Path:
    """A local path as given, or the path of a ``file://`` URI."""
    s = os.fspath(loc)
    return normalise(s) if _SCHEME.match(s) else Path(s)


def join(loc, *parts: str):
    """``loc / part / ...`` for a Path, ``loc + "/part/..."`` for a URI."""
    if isinstance(loc, Path):
        return loc.joinpath(*parts)
    return "/".join([loc.rstrip("/"), *(p.strip("/") for p in parts)])


def parent(loc):
    if isinstance(loc, Path):
        return loc.parent
    return loc.rsplit("/", 1)[0]


def name(loc) -> str:
    return loc.name if isinstance(loc, Path) else loc.rsplit("/", 1)[1]


@functools.lru_cache(maxsize=64)
def _filesystem(root: str, env: tuple) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(root)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a remote URI. One filesystem per bucket (host) and endpoint
    settings, made once per process (``from_uri`` asks S3 for the bucket's region)."""
    parts = urlsplit(uri)
    root = f"{parts.scheme}://{parts.netloc}"
    env = tuple(os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION",
                                            "AWS_REGION", "AWS_PROFILE"))
    fs, root_path = _filesystem(root, env)
    rest = unquote(parts.path).strip("/")
    base = root_path.rstrip("/")  # s3, gs: the bucket; hdfs and the like: "" (the root)
    if not rest:
        return fs, base or "/"
    return fs, f"{base}/{rest}"


# -- remote files ---------------------------------------------------------------------------------
def _info(uri: str) -> pafs.FileInfo:
    fs, path = resolve(uri)
    return fs.get_file_info(path)


def exists(uri: str) -> bool:
    return _info(uri).type != pafs.FileType.NotFound


def size(uri: str) -> int:
    return _info(uri).size


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def list_files(uri: str) -> dict[str, int]:
    """Name -> size of the files directly under a remote folder (none when it does not exist)."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return {i.base_name: i.size for i in infos if i.type == pafs.FileType.File}


def _upload(fs: pafs.FileSystem, path: str, data) -> None:
    out = fs.open_output_stream(path)
    out.write(data)
    out.close()


def atomic_write(uri: str, data) -> None:
    """Write ``data`` (bytes or an Arrow buffer) under ``uri`` so that the final name holds the
    whole of it or nothing, even when the write fails half way.

    The data goes to a hidden temporary key beside the final one, then is moved there. pyarrow's
    S3 (and GCS) output stream is not enough on its own: it completes the upload on ``close()``,
    and also when the stream is closed by ``with`` or garbage-collected after an exception,
    committing whatever part was written (pyarrow exposes no abort). A move is a server-side
    copy (S3 ``CopyObject``, a single request that makes the object appear whole or not at all,
    like a rename) then a delete of the temporary. A process killed before the move leaves at
    most a hidden ``.<name>.tmp-*`` object, which nothing reads (or, killed during the upload,
    an incomplete multipart upload, which is not an object at all)."""
    fs, path = resolve(uri)
    head, _, base = path.rpartition("/")
    tmp = f"{head}/.{base}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        _upload(fs, tmp, data)
        fs.move(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                fs.delete_file(tmp)


def move(src: str, dst: str) -> None:
    """Move a remote file, or a folder file by file (each a server-side copy then a delete)."""
    fs, s = resolve(src)
    _, d = resolve(dst)
    info = fs.get_file_info(s)
    if info.type == pafs.FileType.File:
        fs.move(s, d)
        return
    for f in fs.get_file_info(pafs.FileSelector(s, recursive=True)):
        if f.type == pafs.FileType.File:
            fs.move(f.path, d + f.path[len(s):])
    with contextlib.suppress(OSError):  # directory markers, if any are left
        fs.delete_dir(s)


# -- a node-local cache of remote files ----------------------------------------------------------
def cache_dir() -> Path:
    """Where remote trajectory files are kept on this node (``ORCHESTRATE_CACHE``; default a
    folder in the system's temporary directory). Nothing is evicted; anything in it may be
    deleted at any time (it is downloaded again when needed)."""
    d = os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), f"orchestrate-cache-{os.getuid()}")
    return Path(d)


def download(uri: str, dest: Path) -> None:
    """Copy the remote file ``uri`` to the local file ``dest`` (streamed, 8 MiB at a time)."""
    fs, path = resolve(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with fs.open_input_stream(path) as src, open(dest, "wb") as dst:
        while chunk := src.read(8 << 20):
            dst.write(chunk)
