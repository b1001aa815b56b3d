"""Image dataset registry: digits (embedded), MNIST, CIFAR-10, CIFAR-100 and a user's own
folder of PNG/JPEG images (``image_folder``, :mod:`orchestrator.imagefolder`).

Everything is read with numpy and handed out as normalised torch tensors
(``float32`` images ``N,C,H,W``, ``int64`` labels).  No torchvision: MNIST is
parsed from its IDX files, the CIFAR python batches are read with a
restricted unpickler that only rebuilds numpy arrays and plain containers (both in
:mod:`orchestrator.image_formats`), and image folders are decoded by Pillow (PNG and
JPEG decoders only).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

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


def _load_files(info: DatasetInfo, root: pathlib.Path) -> ImageData:
    """MNIST and CIFAR, read from their files by :mod:`orchestrator.image_formats` (imported on
    first use: it builds on the types above)."""
    from .image_formats import FILE_LOADERS

    return FILE_LOADERS[info.name](info, root)


_LOADERS: dict[str, Callable[[DatasetInfo, Any], ImageData]] = {
    "digits": _load_digits,
    "mnist": _load_files,
    "cifar10": _load_files,
    "cifar100": _load_files,
}

# the image datasets of the registry (image_folder is read by orchestrator.imagefolder, with options)
IMAGES = DatasetRegistry("image", DATASETS, _LOADERS)
