"""Image dataset registry: digits (embedded), MNIST, CIFAR-10, CIFAR-100 and a user's own
folder of PNG/JPEG images (``image_folder``, :mod:`orchestrator.imagefolder`).

Everything is read with numpy and handed out as normalised torch tensors
(``float32`` images ``N,C,H,W``, ``int64`` labels).  No torchvision: MNIST is
parsed from its IDX files, the CIFAR python batches are read with a
restricted unpickler that only rebuilds numpy arrays and plain containers, and
image folders are decoded by Pillow (PNG and JPEG decoders only).
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import os
import pathlib
import pickle
import threading
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "FOLDER_DATASETS",
    "DatasetFormatError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "ImageData",
    "clear_cache",
    "dataset_info",
    "load_dataset",
    "resolve_root",
]

DATA_ENV_VAR = "ORCHESTRATE_DATA"


# --------------------------------------------------------------------------- #
# Public types
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset (shape, classes, normalisation, files)."""

    name: str
    channels: int
    size: int  # H == W
    num_classes: int
    mean: tuple[float, ...]  # per channel, for pixel intensities in [0, 1]
    std: tuple[float, ...]
    expected_files: tuple[str, ...]  # relative to the data root
    # class names by label id, where the data names them (image_folder: its class folders)
    classes: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one image."""
        return (self.channels, self.size, self.size)

    def to_dict(self) -> dict:
        """JSON-friendly representation (``classes`` only where the data names its classes)."""
        out = {
            "name": self.name,
            "channels": self.channels,
            "size": self.size,
            "num_classes": self.num_classes,
            "mean": list(self.mean),
            "std": list(self.std),
            "expected_files": list(self.expected_files),
        }
        if self.classes:
            out["classes"] = list(self.classes)
        return out


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are not where they were looked for."""

    def __init__(
        self,
        message: str,
        *,
        name: str | None = None,
        root: pathlib.Path | None = None,
        missing: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.name = name
        self.root = root
        self.missing = tuple(missing)


class DatasetFormatError(ValueError):
    """A dataset file exists but its contents are corrupt or unexpected."""


@dataclass
class ImageData:
    """A loaded dataset: normalised train/test tensors plus its description.

    Instances handed out by :func:`load_dataset` are shared through a cache;
    treat the tensors as read-only.
    """

    info: DatasetInfo
    x_train: torch.Tensor  # float32 N,C,H,W, normalised
    y_train: torch.Tensor  # int64 N
    x_test: torch.Tensor
    y_test: torch.Tensor
    _digest: str | None = field(default=None, init=False, repr=False, compare=False)
    # SHA-256 of what the tensors were made from, where that is more than the tensors show
    # (image_folder: every file's bytes, the size, the split); None for the built-in datasets
    source: str | None = field(default=None, repr=False, compare=False)
    # the ZCA whitening the tensors went through (algorithms.zca.ZCA; None: normalised pixels)
    zca: Any = field(default=None, repr=False, compare=False)

    def digest(self) -> str:
        """SHA-256 (hex) of the dataset name and the raw bytes of the four tensors (and of
        :attr:`source` where it is set: the built-in datasets' digests do not change)."""
        if self._digest is None:
            h = hashlib.sha256()
            h.update(f"dataset:{self.info.name}\n".encode())
            for label, tensor in (
                ("x_train", self.x_train),
                ("y_train", self.y_train),
                ("x_test", self.x_test),
                ("y_test", self.y_test),
            ):
                arr = np.ascontiguousarray(tensor.detach().cpu().numpy())
                h.update(f"{label}:{arr.dtype.str}:{arr.shape}\n".encode())
                h.update(memoryview(arr).cast("B"))
            if self.source is not None:
                h.update(f"source:{self.source}\n".encode())
            self._digest = h.hexdigest()
        return self._digest

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Map normalised images (``...,C,H,W``) back to pixel intensities: ``x*std+mean``."""
        mean = torch.tensor(self.info.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.info.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return x * std + mean


# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #

_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR100_DIR = "cifar-100-python"

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            name="digits",
            channels=1,
            size=8,
            num_classes=10,
            # Pixel mean/std of the fixed 1437-image train split (pixels / 16).
            mean=(0.305383,),
            std=(0.376119,),
            expected_files=(),
        ),
        DatasetInfo(
            name="mnist",
            channels=1,
            size=28,
            num_classes=10,
            mean=(0.1307,),
            std=(0.3081,),
            expected_files=_MNIST_FILES,
        ),
        DatasetInfo(
            name="cifar10",
            channels=3,
            size=32,
            num_classes=10,
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2023, 0.1994, 0.2010),
            expected_files=tuple(
                f"{_CIFAR10_DIR}/{f}"
                for f in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
            ),
        ),
        DatasetInfo(
            name="cifar100",
            channels=3,
            size=32,
            num_classes=100,
            mean=(0.5071, 0.4865, 0.4409),
            std=(0.2673, 0.2564, 0.2762),
            expected_files=(f"{_CIFAR100_DIR}/train", f"{_CIFAR100_DIR}/test"),
        ),
    )
}

# Datasets whose shape, classes and normalisation come from the files themselves (no static
# DatasetInfo): a user's folder of images, read by orchestrator.imagefolder.
FOLDER_DATASETS: tuple[str, ...] = ("image_folder",)

# Extra sub-directories of the root searched for a dataset's files.
_ALT_DIRS: dict[str, tuple[str, ...]] = {"mnist": ("MNIST/raw",)}


def _canonical(name: str) -> str:
    return str(name).strip().lower()


def dataset_info(name: str) -> DatasetInfo:
    """Return the :class:`DatasetInfo` of ``name`` (case-insensitive)."""
    key = _canonical(name)
    try:
        return DATASETS[key]
    except KeyError:
        if key in FOLDER_DATASETS:
            raise ValueError(f"dataset {key!r} has no fixed description: its shape, classes and "
                             f"normalisation come from its files (load_dataset({key!r}, root, size=...).info)"
                             ) from None
        known = ", ".join(sorted({*DATASETS, *FOLDER_DATASETS}))
        raise ValueError(f"unknown dataset {name!r}; known datasets: {known}") from None


def resolve_root(name: str, root: str | os.PathLike | None) -> pathlib.Path:
    """Data root: explicit ``root``, else ``$ORCHESTRATE_DATA/<name>``, else ``./data/<name>``."""
    key = _canonical(name)
    return data_root(key if key in FOLDER_DATASETS else dataset_info(name).name, root)


def data_root(key: str, root: str | os.PathLike | None) -> pathlib.Path:
    """The root rule for any registered dataset name ``key`` (images and event sequences)."""
    if root is not None and str(root) != "":
        path = pathlib.Path(root).expanduser()
    elif os.environ.get(DATA_ENV_VAR):
        path = pathlib.Path(os.environ[DATA_ENV_VAR]).expanduser() / key
    else:
        path = pathlib.Path("data") / key
    return path.resolve()


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #

_CACHE_LOCK = threading.RLock()


class DatasetRegistry:
    """The datasets of one kind (images here, event sequences in ``orchestrator.sequences``): their
    static descriptions by name, their loaders, and one per-process cache of what was loaded
    (keyed by name, resolved root and options). Both kinds resolve roots with :func:`data_root`
    and report missing files with :class:`DatasetNotFoundError`."""

    def __init__(self, kind: str, infos: dict[str, Any], loaders: dict[str, Callable[..., Any]]):
        self.kind, self.infos, self.loaders = kind, infos, loaders
        self._cache: dict[tuple, Any] = {}

    def __contains__(self, name: object) -> bool:
        return _canonical(str(name)) in self.infos

    def names(self) -> list[str]:
        return sorted(self.infos)

    def info(self, name: str):
        try:
            return self.infos[_canonical(name)]
        except KeyError:
            raise ValueError(f"unknown {self.kind} dataset {name!r}; known: {', '.join(self.names())}") from None

    def load(self, key: tuple, loader: Callable[[], Any]) -> Any:
        """``loader()``'s data, loaded once per process for ``key``."""
        with _CACHE_LOCK:
            data = self._cache.get(key)
            if data is None:
                data = loader()
                self._cache[key] = data
            return data

    def clear(self) -> None:
        with _CACHE_LOCK:
            self._cache.clear()


def load_dataset(name: str, root: str | os.PathLike | None = None, **options: Any) -> ImageData:
    """Load a dataset (cached per name, resolved root and options within the process).

    Only ``image_folder`` takes options: ``size`` (required), ``test_fraction``, ``channels``
    and ``seed`` (see :func:`orchestrator.imagefolder.load_image_folder`).
    """
    key_name = _canonical(name)
    if key_name in FOLDER_DATASETS:
        from .imagefolder import folder_options, load_image_folder

        opts = folder_options(**options)
        path = data_root(key_name, root)
        key: tuple = (key_name, str(path), opts)
        loader: Callable[[], ImageData] = lambda: load_image_folder(path, opts)  # noqa: E731
    else:
        info = dataset_info(name)
        if options:
            raise TypeError(f"dataset {info.name!r} takes no options (got {', '.join(sorted(options))}); "
                            f"only {', '.join(FOLDER_DATASETS)} does")
        path = None if info.name == "digits" else resolve_root(info.name, root)
        key = (info.name, None if path is None else str(path))
        loader = lambda: _LOADERS[info.name](info, path)  # noqa: E731
    return IMAGES.load(key, loader)


_ZCA_CACHE: dict[str, ImageData] = {}


def whitened(data: ImageData, eps: float | None = None) -> ImageData:
    """``data`` ZCA-whitened as MTT does for CIFAR (``--zca``): the transform (regularisation
    ``eps``, 0.1 by default: kornia's ZCAWhitening as MTT calls it) is fitted on the training
    split's pixels (the normalisation undone: MTT whitens [0, 1] pixels), and both splits are
    whitened with it. The result's digest differs from ``data``'s (the store key of its experts
    changes with ZCA); its ``zca`` maps sets back to pixels. Cached per process."""
    from algorithms.zca import DEFAULT_EPS, ZCA

    eps = DEFAULT_EPS if eps is None else eps
    key = f"{data.digest()}:{eps}"
    with _CACHE_LOCK:
        if key not in _ZCA_CACHE:
            zca = ZCA.fit(data.denormalise(data.x_train), eps=eps)
            _ZCA_CACHE[key] = ImageData(data.info, zca.transform(data.denormalise(data.x_train)).float(),
                                        data.y_train, zca.transform(data.denormalise(data.x_test)).float(),
                                        data.y_test, source=f"zca eps {eps} of {data.digest()}", zca=zca)
        return _ZCA_CACHE[key]


def clear_cache() -> None:
    """Forget every dataset loaded so far in this process."""
    IMAGES.clear()
    with _CACHE_LOCK:
        _ZCA_CACHE.clear()


def _to_image_data(
    info: DatasetInfo,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    scale: float,
) -> ImageData:
    """Scale raw pixels to [0,1], normalise per channel and wrap as tensors."""

    def images(x: np.ndarray) -> torch.Tensor:
        mean = np.asarray(info.mean, dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(info.std, dtype=np.float32).reshape(-1, 1, 1)
        x01 = x.astype(np.float32) / np.float32(scale)
        return torch.from_numpy(np.ascontiguousarray((x01 - mean) / std, dtype=np.float32))

    def labels(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))

    return ImageData(info, images(x_train), labels(y_train), images(x_test), labels(y_test))


def _check_labels(info: DatasetInfo, y: np.ndarray, path: pathlib.Path) -> None:
    if y.size and (y.min() < 0 or y.max() >= info.num_classes):
        raise DatasetFormatError(
            f"{path}: labels out of range [0, {info.num_classes}) "
            f"(found {int(y.min())}..{int(y.max())})"
        )


def _load_digits(info: DatasetInfo, root: pathlib.Path | None) -> ImageData:
    """sklearn's bundled 8x8 digits with the fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.reshape(-1, 1, 8, 8)
    y = digits.target
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y
    )
    return _to_image_data(info, x_train, y_train, x_test, y_test, scale=16.0)


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


_LOADERS: dict[str, Callable[[DatasetInfo, Any], ImageData]] = {
    "digits": _load_digits,
    "mnist": _load_mnist,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
}

# the image datasets of the registry (image_folder is read by orchestrator.imagefolder, with options)
IMAGES = DatasetRegistry("image", DATASETS, _LOADERS)
