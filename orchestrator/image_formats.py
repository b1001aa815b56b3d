"""The files of the built-in image datasets: where they may lie under a data root, MNIST's IDX
files (optionally gzipped) and the CIFAR python batches, read with a restricted unpickler that
only rebuilds numpy arrays and plain containers. :mod:`orchestrator.datasets` loads them through
:data:`FILE_LOADERS`."""

from __future__ import annotations

import codecs
import gzip
import pathlib
import pickle
import zlib
from typing import Any, Callable, Iterator

import numpy as np

from .datasets import (_ALT_DIRS, _MNIST_FILES, DATA_ENV_VAR, DatasetFormatError, DatasetInfo, DatasetNotFoundError,
                       ImageData, _to_image_data)


def _check_labels(info: DatasetInfo, y: np.ndarray, path: pathlib.Path) -> None:
    if y.size and (y.min() < 0 or y.max() >= info.num_classes):
        raise DatasetFormatError(
            f"{path}: labels out of range [0, {info.num_classes}) "
            f"(found {int(y.min())}..{int(y.max())})"
        )


# ---- locating files -------------------------------------------------------- #


def _candidates(info: DatasetInfo, root: pathlib.Path, rel: str) -> Iterator[pathlib.Path]:
    """Places where the expected file ``rel`` may lie, in order of preference.

    Besides ``root/rel`` this accepts ``root`` being the dataset's own folder
    (e.g. ``cifar-10-batches-py`` itself), uncompressed names for ``.gz`` files
    and the dataset's alternative layouts (torchvision's ``MNIST/raw``).
    """
    rel_path = pathlib.PurePosixPath(rel)
    names = [rel_path.name]
    if rel_path.suffix == ".gz":
        names.append(rel_path.stem)
    dirs = [root / rel_path.parent, root, *(root / d for d in _ALT_DIRS.get(info.name, ()))]
    seen: set[pathlib.Path] = set()
    for d in dirs:
        for n in names:
            p = d / n
            if p not in seen:
                seen.add(p)
                yield p


def _locate(info: DatasetInfo, root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Map each expected file to its path, or raise :class:`DatasetNotFoundError`."""
    found: dict[str, pathlib.Path] = {}
    for rel in info.expected_files:
        hit = next((p for p in _candidates(info, root, rel) if p.is_file()), None)
        if hit is not None:
            found[rel] = hit
    missing = tuple(rel for rel in info.expected_files if rel not in found)
    if missing:
        raise DatasetNotFoundError(
            _not_found_message(info, root, found, missing),
            name=info.name,
            root=root,
            missing=missing,
        )
    return found


def _not_found_message(
    info: DatasetInfo,
    root: pathlib.Path,
    found: dict[str, pathlib.Path],
    missing: tuple[str, ...],
) -> str:
    where = "the directory does not exist" if not root.is_dir() else "some files are missing"
    lines = [
        f"dataset {info.name!r} not found under data root {root} ({where}: "
        f"{len(missing)} of {len(info.expected_files)} expected files missing).",
        "Expected files (relative to the data root):",
    ]
    for rel in info.expected_files:
        lines.append(f"  {rel}  [{'missing' if rel in missing else 'found'}]")
    notes = []
    if any(rel.endswith(".gz") for rel in info.expected_files):
        notes.append("uncompressed files without '.gz' are accepted too")
    if any("/" in rel for rel in info.expected_files):
        notes.append("the root may also be the sub-folder itself")
    for alt in _ALT_DIRS.get(info.name, ()):
        notes.append(f"files under '{alt}/' are accepted too")
    if notes:
        lines.append("(" + "; ".join(notes) + ")")
    lines.append(
        f"To provide them, set dataset.root in the spec to the folder holding these files, "
        f"or set {DATA_ENV_VAR}=<dir> so that <dir>/{info.name} holds them "
        f"(default when neither is given: ./data/{info.name})."
    )
    return "\n".join(lines)


# ---- MNIST (IDX) ------------------------------------------------------------ #

_IDX_IMAGES_MAGIC = 2051  # ubyte, 3 dims
_IDX_LABELS_MAGIC = 2049  # ubyte, 1 dim


def _read_bytes(path: pathlib.Path) -> bytes:
    """Read a file, transparently gunzipping it when it starts with the gzip magic."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetFormatError(f"{path}: cannot read or decompress file ({exc})") from exc


def _read_idx(path: pathlib.Path, magic: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file, checking its magic number and size."""
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DatasetFormatError(f"{path}: not an IDX file (only {len(raw)} bytes)")
    found_magic = int.from_bytes(raw[:4], "big")
    if found_magic != magic:
        raise DatasetFormatError(
            f"{path}: bad IDX magic number {found_magic} (expected {magic})"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64))
    actual = len(raw) - header
    if actual != expected:
        state = "truncated" if actual < expected else "has trailing data"
        raise DatasetFormatError(
            f"{path}: IDX file {state}: dims {dims} need {expected} bytes of data, found {actual}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_mnist_split(
    info: DatasetInfo, images_path: pathlib.Path, labels_path: pathlib.Path
) -> tuple[np.ndarray, np.ndarray]:
    x = _read_idx(images_path, _IDX_IMAGES_MAGIC)
    if x.shape[1:] != (info.size, info.size):
        raise DatasetFormatError(
            f"{images_path}: images are {x.shape[1:]}, expected ({info.size}, {info.size})"
        )
    y = _read_idx(labels_path, _IDX_LABELS_MAGIC)
    if len(y) != len(x):
        raise DatasetFormatError(
            f"{labels_path}: {len(y)} labels for {len(x)} images in {images_path.name}"
        )
    _check_labels(info, y, labels_path)
    return x.reshape(-1, 1, info.size, info.size), y


def _load_mnist(info: DatasetInfo, root: pathlib.Path) -> ImageData:
    """MNIST from the four (optionally gzipped) IDX files."""
    files = _locate(info, root)
    x_train, y_train = _load_mnist_split(info, files[_MNIST_FILES[0]], files[_MNIST_FILES[1]])
    x_test, y_test = _load_mnist_split(info, files[_MNIST_FILES[2]], files[_MNIST_FILES[3]])
    return _to_image_data(info, x_train, y_train, x_test, y_test, scale=255.0)


# ---- CIFAR (restricted pickles) -------------------------------------------- #


try:
    from numpy._core.multiarray import _reconstruct as _np_reconstruct  # numpy >= 2
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

# The only globals a CIFAR batch may reference: what rebuilding a numpy array
# needs (protocol-2 pickles encode bytes through ``_codecs.encode``) and a few
# harmless builtin containers.
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}
for _module in ("builtins", "__builtin__"):
    for _container in (set, frozenset, bytearray):
        _SAFE_GLOBALS[(_module, _container.__name__)] = _container
del _module, _container


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and plain containers."""

    def __init__(self, file: Any, path: pathlib.Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise DatasetFormatError(
                f"{self._path}: refuses to unpickle {module}.{name} "
                "(only numpy arrays and plain containers are allowed)"
            ) from None


def _load_pickle(path: pathlib.Path) -> Any:
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except DatasetFormatError:
        raise
    except Exception as exc:  # corrupt pickles raise many different types
        raise DatasetFormatError(f"{path}: cannot unpickle ({type(exc).__name__}: {exc})") from exc


def _get(batch: dict, key: str, path: pathlib.Path) -> Any:
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise DatasetFormatError(f"{path}: missing key {key!r} (found {sorted(map(repr, batch))})")


def _read_cifar_batch(
    info: DatasetInfo, path: pathlib.Path, label_key: str
) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch: uint8 images ``N,3,32,32`` and int64 labels."""
    batch = _load_pickle(path)
    if not isinstance(batch, dict):
        raise DatasetFormatError(f"{path}: expected a dict, got {type(batch).__name__}")
    data = _get(batch, "data", path)
    labels = _get(batch, label_key, path)
    pixels = info.channels * info.size * info.size
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
        desc = f"{data.dtype} array {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetFormatError(f"{path}: 'data' must be a uint8 array of shape (N, {pixels}), got {desc}")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DatasetFormatError(f"{path}: {label_key!r} is not a list of integers") from exc
    if y.ndim != 1 or len(y) != len(data):
        raise DatasetFormatError(f"{path}: {len(y)} labels for {len(data)} images")
    _check_labels(info, y, path)
    return data.reshape(-1, info.channels, info.size, info.size), y


def _load_cifar(
    info: DatasetInfo,
    root: pathlib.Path,
    label_key: str,
    train: tuple[str, ...],
    test: tuple[str, ...],
) -> ImageData:
    """Concatenate the CIFAR batches listed in ``train`` and ``test``."""
    files = _locate(info, root)

    def read(rels: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        parts = [_read_cifar_batch(info, files[rel], label_key) for rel in rels]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    x_train, y_train = read(train)
    x_test, y_test = read(test)
    return _to_image_data(info, x_train, y_train, x_test, y_test, scale=255.0)


def _load_cifar10(info: DatasetInfo, root: pathlib.Path) -> ImageData:
    """CIFAR-10 from the python batches (``data_batch_1..5`` and ``test_batch``)."""
    return _load_cifar(info, root, "labels", info.expected_files[:5], info.expected_files[5:])


def _load_cifar100(info: DatasetInfo, root: pathlib.Path) -> ImageData:
    """CIFAR-100 (fine labels) from the python ``train`` and ``test`` files."""
    return _load_cifar(info, root, "fine_labels", info.expected_files[:1], info.expected_files[1:])


FILE_LOADERS: dict[str, Callable[[DatasetInfo, pathlib.Path], ImageData]] = {
    "mnist": _load_mnist,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
}
