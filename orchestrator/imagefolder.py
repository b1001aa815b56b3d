"""A user's own images: ``dataset: {name: image_folder, root: PATH, size: 32}``.

Two layouts (class names sorted by folder name, as Python sorts strings, give the label ids):

* ``root/<class>/...``: the test split is a stratified fraction (``test_fraction``) of every
  class, drawn with the spec's ``seed``;
* ``root/train/<class>/...`` and ``root/test/<class>/...`` (the same class names): the test split
  is ``test/``. Without ``test/`` the fraction is drawn from ``train/``.

Inside a class folder, files ending in ``.png``, ``.jpg`` or ``.jpeg`` (any case) are read,
sub-folders included; hidden files and folders (``.DS_Store``, ``._x.png``) and other files are
skipped. Only Pillow's PNG and JPEG decoders are used (a file with another format inside is an
error, whatever its name), and no pickle.

Every image is checked (``verify()``, then decoded with ``load()``), converted to grayscale
(``L``) or RGB, stretched to ``size`` x ``size`` with Pillow's bilinear filter (antialiased when
shrinking; images already that size are not resampled) and scaled to [0, 1] (16-bit grayscale
PNGs by 65535). The channel count comes from the files (1 for grayscale modes, 3 for the
others, palette images included; an alpha channel is dropped) unless ``channels`` forces one;
files with different counts are an error naming one of each. Mean and std per channel
(population std) come from the training split only; both splits are normalised with them, as
the built-in datasets are.

The digest of the data (:meth:`ImageData.digest`, part of the experts' store key) also covers a
manifest of the folder: every file's relative path, split, class and SHA-256, the size, the
resampling filter, the channel count and, for a drawn split, the fraction and the seed.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pathlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from .datasets import DatasetFormatError, DatasetInfo, DatasetNotFoundError, ImageData, _to_image_data

__all__ = ["EXTENSIONS", "FolderOptions", "IMAGE_FOLDER", "RESAMPLE", "folder_options", "load_image_folder"]

IMAGE_FOLDER = "image_folder"
EXTENSIONS = (".png", ".jpg", ".jpeg")
RESAMPLE = "bilinear"  # Pillow's Image.Resampling.BILINEAR
DEFAULT_TEST_FRACTION = 0.2
MANIFEST_FORMAT = "distill-orchestrator/image-folder-v1"
MAX_SIZE = 1024

# Pillow modes read as one channel; every other mode is converted to RGB.
_SIXTEEN_BIT = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_GRAY = frozenset({"1", "L", "LA", "La", *_SIXTEEN_BIT})
_LAYOUT_HELP = ("image_folder reads root/<class>/*.png|jpg|jpeg, or root/train/<class>/... with an "
                "optional root/test/<class>/...")


@dataclass(frozen=True)
class FolderOptions:
    """How a folder becomes tensors (hashable: part of the dataset cache's key)."""

    size: int
    test_fraction: float = DEFAULT_TEST_FRACTION
    channels: int | None = None
    seed: int = 0


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def folder_options(size: Any = None, test_fraction: Any = DEFAULT_TEST_FRACTION, channels: Any = None,
                   seed: Any = 0) -> FolderOptions:
    """Check the options of ``image_folder`` (the spec checks the same, naming ``dataset.<key>``)."""
    problems = []
    if size is None:
        problems.append("dataset.size: is required for image_folder (the side in pixels the images are "
                        "resized to, e.g. 32)")
    elif not _is_int(size) or not 2 <= size <= MAX_SIZE:
        problems.append(f"dataset.size: must be an integer from 2 to {MAX_SIZE}, got {size!r}")
    if (isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float, np.floating))
            or not 0 < test_fraction < 1):
        problems.append(f"dataset.test_fraction: must be a number in (0, 1), got {test_fraction!r}")
    if channels is not None and (not _is_int(channels) or channels not in (1, 3)):
        problems.append(f"dataset.channels: must be 1, 3 or null (from the files), got {channels!r}")
    if not _is_int(seed) or seed < 0:
        problems.append(f"seed: must be an integer >= 0, got {seed!r}")
    if problems:
        raise ValueError("; ".join(problems))
    return FolderOptions(int(size), float(test_fraction), None if channels is None else int(channels), int(seed))


# ---- finding the files ---------------------------------------------------------------------- #


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(EXTENSIONS)


def _class_dirs(folder: pathlib.Path) -> list[pathlib.Path]:
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        raise DatasetFormatError(f"dataset.root: {folder}: cannot list the folder ({exc})") from exc
    return sorted((p for p in entries if not _hidden(p.name) and p.is_dir()), key=lambda p: p.name)


def _images_of(class_dir: pathlib.Path) -> list[pathlib.Path]:
    """The image files under a class folder (sub-folders included, hidden entries skipped), in
    order of their relative paths; an error naming the folder when there are none."""
    found: list[pathlib.Path] = []
    others: list[str] = []
    subdirs = False
    def fail(exc: OSError) -> None:
        raise DatasetFormatError(f"dataset.root: {exc.filename}: cannot list the folder ({exc.strerror})") from exc

    for dirpath, dirnames, filenames in os.walk(class_dir, onerror=fail, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        subdirs = subdirs or bool(dirnames)
        for f in sorted(filenames):
            if _hidden(f):
                continue
            (found if _is_image_name(f) else others).append(pathlib.Path(dirpath) / f)
    if not found:
        what = f"found {len(others)} other files, e.g. {others[0].name}" if others else \
            "it holds sub-folders without images" if subdirs else "it is empty"
        raise DatasetFormatError(
            f"dataset.root: {class_dir}: the class folder {class_dir.name!r} holds no "
            f"{'/'.join(e[1:] for e in EXTENSIONS)} image ({what}); remove it or add images")
    return sorted(found, key=lambda p: p.relative_to(class_dir).as_posix())


def _read_classes(folder: pathlib.Path) -> dict[str, list[pathlib.Path]]:
    """Class name -> image files of ``folder/<class>/`` (class names sorted)."""
    dirs = _class_dirs(folder)
    if not dirs:
        loose = [p.name for p in folder.iterdir() if p.is_file() and _is_image_name(p.name)]
        hint = f" ({len(loose)} images lie directly in it: put each class's images in a folder of its own)" \
            if loose else ""
        raise DatasetFormatError(f"dataset.root: {folder}: no class folders{hint}; {_LAYOUT_HELP}")
    return {d.name: _images_of(d) for d in dirs}


def _layout(root: pathlib.Path) -> tuple[str, pathlib.Path, pathlib.Path | None]:
    """``("split", train, test)`` when ``root/train`` holds class folders and no images directly,
    ``("train-only", train, None)`` when it does and there is no ``root/test``; else
    ``("flat", root, None)`` (``train`` is then a class like any other)."""
    train, test = root / "train", root / "test"
    if train.is_dir():
        direct = [p for p in train.iterdir() if p.is_file() and _is_image_name(p.name) and not _hidden(p.name)]
        if not direct and _class_dirs(train):
            return ("split", train, test) if test.is_dir() else ("train-only", train, None)
    return "flat", root, None


# ---- reading one image ---------------------------------------------------------------------- #


def _decode(path: pathlib.Path, size: int, channels: int | None) -> tuple[np.ndarray, str, str]:
    """``(pixels float32 C,size,size in [0, 1], Pillow mode, SHA-256 of the file)``; ``C`` is
    ``channels`` or the file's own count."""
    from PIL import Image

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetFormatError(f"{path}: cannot read the file ({exc})") from exc
    sha = hashlib.sha256(raw).hexdigest()
    formats = ("PNG", "JPEG")
    try:
        with Image.open(io.BytesIO(raw), formats=formats) as probe:
            probe.verify()  # checksums and structure; the image cannot be used after verify()
        im = Image.open(io.BytesIO(raw), formats=formats)
        im.load()  # decodes every pixel: truncated or corrupt data fails here
    except Image.DecompressionBombError as exc:
        raise DatasetFormatError(f"{path}: refused by Pillow as too large ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        what = "the file is empty" if not raw else "its contents are neither PNG nor JPEG, whatever its name"
        raise DatasetFormatError(f"{path}: not a readable PNG or JPEG image ({what})") from exc
    except Exception as exc:  # Pillow raises many types for corrupt files (OSError, SyntaxError, ...)
        raise DatasetFormatError(
            f"{path}: not a readable PNG or JPEG image ({type(exc).__name__}: {exc})") from exc
    mode = im.mode
    c = channels or (1 if mode in _GRAY else 3)
    target = (size, size)
    try:
        if mode in _SIXTEEN_BIT:  # 16-bit grayscale: resample as floats, scale by 65535
            f = im.convert("F")
            if f.size != target:
                f = f.resize(target, Image.Resampling.BILINEAR)
            pix = np.clip(np.asarray(f, dtype=np.float32) / np.float32(65535.0), 0.0, 1.0)[None]
            if c == 3:
                pix = np.repeat(pix, 3, axis=0)
        else:
            im = im.convert("L" if c == 1 else "RGB")  # L: ITU-R 601-2 luma; an alpha channel is dropped
            if im.size != target:
                im = im.resize(target, Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
            pix = (arr[None] if c == 1 else arr.transpose(2, 0, 1)).astype(np.float32) / np.float32(255.0)
    except Exception as exc:
        raise DatasetFormatError(f"{path}: cannot convert the {mode} image to "
                                 f"{'grayscale' if c == 1 else 'RGB'} ({type(exc).__name__}: {exc})") from exc
    return np.ascontiguousarray(pix, dtype=np.float32), mode, sha


# ---- the split ------------------------------------------------------------------------------ #


def _draw_test(files: list[pathlib.Path], class_dir: pathlib.Path, fraction: float, seed: int
               ) -> set[pathlib.Path]:
    """The files of one class held out for testing: ``round(fraction * n)``, at least 1 and at most
    n - 1. The order is a SHA-256 of the seed and each file's path in its class folder, so a class's
    split depends on nothing but its own file names, the fraction and the seed (not on numpy's
    generators, nor on the other classes)."""
    n = len(files)
    if n < 2:
        raise DatasetFormatError(
            f"dataset.root: {class_dir}: the class folder {class_dir.name!r} has {n} image; splitting off a "
            f"test set (dataset.test_fraction) needs at least 2 per class (or give root/train and root/test)")
    k = min(n - 1, max(1, math.floor(fraction * n + 0.5)))

    def rank(p: pathlib.Path) -> str:
        return hashlib.sha256(f"{seed}\0{p.relative_to(class_dir).as_posix()}".encode()).hexdigest()

    return set(sorted(files, key=rank)[:k])


# ---- loading -------------------------------------------------------------------------------- #


def load_image_folder(root: pathlib.Path, opts: FolderOptions) -> ImageData:
    """Read ``root`` (see the module's docstring) into normalised tensors."""
    root = pathlib.Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "no such folder"
        raise DatasetNotFoundError(f"dataset.root: {root}: {what}; {_LAYOUT_HELP}",
                                   name=IMAGE_FOLDER, root=root, missing=(str(root),))
    layout, train_dir, test_dir = _layout(root)
    train_classes = _read_classes(train_dir)
    names = list(train_classes)
    # (split, label, class folder, file) for every image, train then test, class by class
    items: list[tuple[str, int, pathlib.Path, pathlib.Path]] = []
    if test_dir is not None:
        test_classes = _read_classes(test_dir)
        if list(test_classes) != names:
            only_train = sorted(set(names) - set(test_classes))
            only_test = sorted(set(test_classes) - set(names))
            parts = ([f"only in train/: {', '.join(only_train)}"] if only_train else []) + \
                    ([f"only in test/: {', '.join(only_test)}"] if only_test else [])
            raise DatasetFormatError(f"dataset.root: {root}: train/ and test/ must hold the same class "
                                     f"folders ({'; '.join(parts)})")
        for split, classes, base in (("train", train_classes, train_dir), ("test", test_classes, test_dir)):
            for label, name in enumerate(names):
                items += [(split, label, base / name, f) for f in classes[name]]
    else:
        drawn = {name: _draw_test(files, train_dir / name, opts.test_fraction, opts.seed)
                 for name, files in train_classes.items()}
        for split in ("train", "test"):
            for label, name in enumerate(names):
                items += [(split, label, train_dir / name, f) for f in train_classes[name]
                          if (f in drawn[name]) == (split == "test")]

    pixels: list[np.ndarray] = []
    modes: list[str] = []
    files: list[list[Any]] = []
    for split, label, class_dir, path in items:
        pix, mode, sha = _decode(path, opts.size, opts.channels)
        pixels.append(pix)
        modes.append(mode)
        files.append([split, label, path.relative_to(root).as_posix(), sha])
    if opts.channels is None:
        counts = [p.shape[0] for p in pixels]
        if len(set(counts)) > 1:
            i1, i3 = counts.index(1), counts.index(3)
            raise DatasetFormatError(
                f"dataset.root: {root}: images with different channel counts: {items[i1][3]} is {modes[i1]} "
                f"(1 channel) and {items[i3][3]} is {modes[i3]} (3 channels); convert them, or set "
                f"dataset.channels to 1 or 3 to convert every image")
    channels = pixels[0].shape[0]
    n_train = sum(s == "train" for s, *_ in items)  # items list the train split first
    x = np.stack(pixels)
    y = np.array([label for _, label, *_ in items], dtype=np.int64)
    x_train, x_test, y_train, y_test = x[:n_train], x[n_train:], y[:n_train], y[n_train:]
    mean = tuple(float(x_train[:, c].mean(dtype=np.float64)) for c in range(channels))
    std = tuple(float(x_train[:, c].std(dtype=np.float64)) for c in range(channels))
    std = tuple(s if s > 1e-12 else 1.0 for s in std)  # a constant channel: centred, not scaled
    info = DatasetInfo(name=IMAGE_FOLDER, channels=channels, size=opts.size, num_classes=len(names),
                       mean=mean, std=std, expected_files=(), classes=tuple(names))
    manifest = {"format": MANIFEST_FORMAT, "layout": layout, "size": opts.size, "resample": RESAMPLE,
                "channels": channels, "classes": names, "files": files}
    if test_dir is None:  # the drawn split depends on these; a given test/ folder does not
        manifest.update(test_fraction=opts.test_fraction, seed=opts.seed)
    data = _to_image_data(info, x_train, y_train, x_test, y_test, scale=1.0)
    data.source = hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return data
