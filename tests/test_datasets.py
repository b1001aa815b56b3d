"""Tests for the image dataset registry (orchestrator.datasets)."""

from __future__ import annotations

import gzip
import os
import pathlib
import pickle

import numpy as np
import pytest
import torch

from .conftest import real_data
from orchestrator import datasets as ds
from orchestrator.datasets import (
    DATASETS,
    DatasetFormatError,
    DatasetNotFoundError,
    ImageData,
    dataset_info,
    load_dataset,
    resolve_root,
)

MNIST_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    """Every test starts with an empty dataset cache and no ORCHESTRATE_DATA."""
    monkeypatch.delenv("ORCHESTRATE_DATA", raising=False)
    ds.clear_cache()
    yield
    ds.clear_cache()


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def idx_bytes(arr: np.ndarray) -> bytes:
    """Serialise a uint8 array as an IDX file."""
    magic = (0x08 << 8) | arr.ndim
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_fake_mnist(root: pathlib.Path, n_train=12, n_test=5, gz=True, seed=0):
    """Write four small valid IDX files; returns the raw arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        MNIST_NAMES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        MNIST_NAMES[1]: rng.integers(0, 10, n_train, dtype=np.uint8),
        MNIST_NAMES[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        MNIST_NAMES[3]: rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        if gz:
            with gzip.open(root / f"{name}.gz", "wb") as f:
                f.write(idx_bytes(arr))
        else:
            (root / name).write_bytes(idx_bytes(arr))
    return arrays


def cifar_batch(n: int, label_key: bytes, num_classes: int, seed: int, str_keys=False):
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": b"fake batch",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, num_classes, n)],
    }
    if str_keys:
        batch = {k.decode(): v for k, v in batch.items()}
    return batch


def dump(obj, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_fake_cifar10(root: pathlib.Path, n=4, str_keys=False):
    folder = root / "cifar-10-batches-py"
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batches[name] = cifar_batch(n, b"labels", 10, seed=i, str_keys=str_keys)
        dump(batches[name], folder / name)
    return folder, batches


def write_fake_cifar100(root: pathlib.Path, n_train=6, n_test=3):
    folder = root / "cifar-100-python"
    batches = {
        "train": cifar_batch(n_train, b"fine_labels", 100, seed=10),
        "test": cifar_batch(n_test, b"fine_labels", 100, seed=11),
    }
    for name, batch in batches.items():
        batch[b"coarse_labels"] = [0] * len(batch[b"fine_labels"])
        dump(batch, folder / name)
    return folder, batches


def assert_normalised_roundtrip(data: ImageData, x_test_raw: np.ndarray, scale: float):
    """denormalise(x_test) * scale gives back the raw pixels."""
    pixels = data.denormalise(data.x_test) * scale
    np.testing.assert_allclose(pixels.numpy(), x_test_raw.astype(np.float32), atol=1e-3)


# --------------------------------------------------------------------------- #
# registry
# --------------------------------------------------------------------------- #


def test_registry_consistent():
    assert set(DATASETS) == {"digits", "mnist", "cifar10", "cifar100"}
    for name, info in DATASETS.items():
        assert info.name == name
        assert len(info.mean) == len(info.std) == info.channels
        d = info.to_dict()
        assert d["name"] == name and d["num_classes"] == info.num_classes
        assert list(d["mean"]) == list(info.mean)
    assert dataset_info("cifar100").num_classes == 100


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError) as exc:
        dataset_info("imagenet")
    msg = str(exc.value)
    assert "imagenet" in msg
    for name in DATASETS:
        assert name in msg
    with pytest.raises(ValueError, match="digits"):
        load_dataset("svhn")


def test_resolve_root_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_root("mnist", None) == (tmp_path / "data" / "mnist").resolve()
    monkeypatch.setenv("ORCHESTRATE_DATA", str(tmp_path / "env"))
    assert resolve_root("mnist", None) == (tmp_path / "env" / "mnist").resolve()
    assert resolve_root("mnist", str(tmp_path / "explicit")) == (tmp_path / "explicit").resolve()


# --------------------------------------------------------------------------- #
# digits
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def digits() -> ImageData:
    ds.clear_cache()
    return load_dataset("digits")


def test_digits_shapes(digits):
    assert digits.info.num_classes == 10
    assert tuple(digits.x_train.shape) == (1437, 1, 8, 8)
    assert tuple(digits.x_test.shape) == (360, 1, 8, 8)
    assert digits.y_train.shape == (1437,) and digits.y_test.shape == (360,)
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert digits.x_train.is_contiguous() and digits.x_test.is_contiguous()
    assert set(digits.y_train.tolist()) == set(range(10))


def test_digits_normalisation_matches_train_stats(digits):
    x = digits.x_train
    assert abs(x.mean().item()) < 1e-3
    assert abs(x.std(correction=0).item() - 1.0) < 1e-3
    pixels = digits.denormalise(x)
    assert pixels.min().item() >= -1e-5 and pixels.max().item() <= 1 + 1e-5
    assert pixels.mean().item() == pytest.approx(digits.info.mean[0], abs=1e-5)
    assert pixels.std(correction=0).item() == pytest.approx(digits.info.std[0], abs=1e-5)


def test_digits_pixels_match_sklearn(digits):
    from sklearn.datasets import load_digits

    raw = load_digits()
    pixels = (digits.denormalise(digits.x_train) * 16).round().reshape(len(digits.x_train), 64)
    # every training image is one of sklearn's images with the same label
    lookup = {row.astype(np.uint8).tobytes(): lab for row, lab in zip(raw.data, raw.target)}
    for row, lab in zip(pixels.numpy()[:50], digits.y_train.tolist()[:50]):
        assert lookup[row.astype(np.uint8).tobytes()] == lab


def test_digits_split_is_stratified(digits):
    train = np.bincount(digits.y_train.numpy(), minlength=10)
    test = np.bincount(digits.y_test.numpy(), minlength=10)
    total = train + test
    assert np.all(np.abs(test - 0.2 * total) <= 1)


def test_digits_digest_stable_and_sensitive(digits):
    first = digits.digest()
    assert len(first) == 64 and int(first, 16) >= 0
    ds.clear_cache()
    again = load_dataset("digits")
    assert again is not digits
    assert again.digest() == first

    x = digits.x_train.clone()
    x[0, 0, 0, 0] += 1.0
    changed = ImageData(digits.info, x, digits.y_train, digits.x_test, digits.y_test)
    assert changed.digest() != first
    relabelled = ImageData(
        digits.info, digits.x_train, digits.y_train, digits.x_test, torch.roll(digits.y_test, 1)
    )
    assert relabelled.digest() != first


def test_load_is_cached_per_root(tmp_path):
    assert load_dataset("digits") is load_dataset("DIGITS")
    write_fake_mnist(tmp_path / "a")
    write_fake_mnist(tmp_path / "b", seed=1)
    a = load_dataset("mnist", str(tmp_path / "a"))
    assert load_dataset("mnist", tmp_path / "a") is a
    b = load_dataset("mnist", str(tmp_path / "b"))
    assert b is not a and b.digest() != a.digest()


# --------------------------------------------------------------------------- #
# MNIST
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def mnist() -> ImageData:
    folder = real_data("mnist", *(f"{n}.gz" for n in MNIST_NAMES))
    ds.clear_cache()
    return load_dataset("mnist", str(folder))


def test_mnist_real(mnist):
    assert tuple(mnist.x_train.shape) == (60000, 1, 28, 28)
    assert tuple(mnist.x_test.shape) == (10000, 1, 28, 28)
    assert mnist.y_train.shape == (60000,) and mnist.y_test.shape == (10000,)
    assert mnist.y_train.min().item() == 0 and mnist.y_train.max().item() == 9
    assert mnist.y_test.min().item() == 0 and mnist.y_test.max().item() == 9
    assert mnist.y_train.dtype == torch.int64 and mnist.x_train.dtype == torch.float32
    # the declared mean/std are the usual MNIST constants
    assert abs(mnist.x_train.mean().item()) < 1e-3
    assert abs(mnist.x_train.std().item() - 1.0) < 1e-3


def test_mnist_env_var_root(tmp_path, monkeypatch):
    arrays = write_fake_mnist(tmp_path / "mnist", n_train=7, n_test=3)
    monkeypatch.setenv("ORCHESTRATE_DATA", str(tmp_path))
    data = load_dataset("mnist")
    assert tuple(data.x_train.shape) == (7, 1, 28, 28)
    assert data.y_test.tolist() == arrays[MNIST_NAMES[3]].tolist()
    assert_normalised_roundtrip(data, arrays[MNIST_NAMES[2]][:, None], 255.0)


@pytest.mark.parametrize("layout", ["plain", "torchvision"])
def test_mnist_uncompressed_files(tmp_path, layout):
    folder = tmp_path if layout == "plain" else tmp_path / "MNIST" / "raw"
    arrays = write_fake_mnist(folder, gz=False)
    data = load_dataset("mnist", str(tmp_path))
    assert data.y_train.tolist() == arrays[MNIST_NAMES[1]].tolist()
    assert_normalised_roundtrip(data, arrays[MNIST_NAMES[2]][:, None], 255.0)


def test_mnist_missing_files(tmp_path):
    with pytest.raises(DatasetNotFoundError) as exc:
        load_dataset("mnist", str(tmp_path))
    err = exc.value
    msg = str(err)
    assert isinstance(err, FileNotFoundError)
    assert "mnist" in msg and str(tmp_path.resolve()) in msg
    for name in MNIST_NAMES:
        assert f"{name}.gz" in msg
    assert "dataset.root" in msg and "ORCHESTRATE_DATA" in msg
    assert len(err.missing) == 4


def test_mnist_partially_missing(tmp_path):
    write_fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError) as exc:
        load_dataset("mnist", str(tmp_path))
    assert exc.value.missing == ("t10k-labels-idx1-ubyte.gz",)
    assert "t10k-labels-idx1-ubyte.gz  [missing]" in str(exc.value)
    assert "train-images-idx3-ubyte.gz  [found]" in str(exc.value)
    # survives pickling (e.g. when raised inside a Ray worker)
    clone = pickle.loads(pickle.dumps(exc.value))
    assert str(clone) == str(exc.value) and clone.missing == exc.value.missing


def _corrupt(tmp_path: pathlib.Path, name: str, payload: bytes, gz: bool) -> pathlib.Path:
    write_fake_mnist(tmp_path, gz=False)
    target = tmp_path / name
    target.unlink()
    if gz:
        target = tmp_path / f"{name}.gz"
    target.write_bytes(payload)
    return target


@pytest.mark.parametrize(
    "case",
    ["garbage", "truncated_data", "wrong_magic", "truncated_gzip", "label_count", "label_range"],
)
def test_mnist_bad_idx_file(tmp_path, case):
    good = idx_bytes(np.random.default_rng(0).integers(0, 256, (12, 28, 28), dtype=np.uint8))
    name, gz = MNIST_NAMES[0], False
    if case == "garbage":
        payload = b"this is not an idx file at all"
    elif case == "truncated_data":
        payload = good[: len(good) // 2]
    elif case == "wrong_magic":
        payload = idx_bytes(np.zeros(12, np.uint8))  # a label file where images belong
    elif case == "truncated_gzip":
        compressed = gzip.compress(good)
        payload, gz = compressed[: len(compressed) // 2], True
    elif case == "label_count":
        name, payload = MNIST_NAMES[1], idx_bytes(np.zeros(11, np.uint8))
    else:
        name, payload = MNIST_NAMES[1], idx_bytes(np.full(12, 10, np.uint8))
    target = _corrupt(tmp_path, name, payload, gz)
    with pytest.raises(DatasetFormatError) as exc:
        load_dataset("mnist", str(tmp_path))
    assert str(target) in str(exc.value)


# --------------------------------------------------------------------------- #
# CIFAR
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("root_is_folder", [False, True])
def test_cifar10_fake_batches(tmp_path, root_is_folder):
    folder, batches = write_fake_cifar10(tmp_path, n=4)
    data = load_dataset("cifar10", str(folder if root_is_folder else tmp_path))
    assert tuple(data.x_train.shape) == (20, 3, 32, 32)
    assert tuple(data.x_test.shape) == (4, 3, 32, 32)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    expected_y = sum((batches[f"data_batch_{k}"][b"labels"] for k in range(1, 6)), [])
    assert data.y_train.tolist() == expected_y
    assert data.y_test.tolist() == batches["test_batch"][b"labels"]

    raw = batches["test_batch"][b"data"]
    # rows are R(1024) G(1024) B(1024), each a row-major 32x32 plane
    assert_normalised_roundtrip(data, raw.reshape(-1, 3, 32, 32), 255.0)
    mean, std = data.info.mean, data.info.std
    expected = (raw[1, 1024 + 5 * 32 + 7] / 255.0 - mean[1]) / std[1]
    assert data.x_test[1, 1, 5, 7].item() == pytest.approx(expected, abs=1e-5)


def test_cifar10_str_keys(tmp_path):
    _, batches = write_fake_cifar10(tmp_path, n=2, str_keys=True)
    data = load_dataset("cifar10", str(tmp_path))
    assert data.y_test.tolist() == batches["test_batch"]["labels"]


def test_cifar100_fake_batches(tmp_path):
    _, batches = write_fake_cifar100(tmp_path)
    data = load_dataset("cifar100", str(tmp_path))
    assert data.info.num_classes == 100
    assert tuple(data.x_train.shape) == (6, 3, 32, 32)
    assert tuple(data.x_test.shape) == (3, 3, 32, 32)
    assert data.y_train.tolist() == batches["train"][b"fine_labels"]
    assert_normalised_roundtrip(data, batches["test"][b"data"].reshape(-1, 3, 32, 32), 255.0)


def test_cifar_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as exc:
        load_dataset("cifar100", str(tmp_path))
    msg = str(exc.value)
    assert str(tmp_path.resolve()) in msg
    assert "cifar-100-python/train" in msg and "cifar-100-python/test" in msg


class _Payload:
    """Unpickling this would create a file: the loader must refuse it."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class _Custom:
    pass


@pytest.mark.parametrize("kind", ["os_system", "payload", "custom_class"])
def test_cifar_refuses_forbidden_globals(tmp_path, kind):
    folder, batches = write_fake_cifar10(tmp_path, n=2)
    marker = tmp_path / "pwned"
    evil = dict(batches["data_batch_3"])
    evil[b"extra"] = {
        "os_system": os.system,
        "payload": _Payload(marker),
        "custom_class": _Custom(),
    }[kind]
    target = folder / "data_batch_3"
    dump(evil, target)
    with pytest.raises(DatasetFormatError) as exc:
        load_dataset("cifar10", str(tmp_path))
    msg = str(exc.value)
    assert str(target) in msg and "refuses to unpickle" in msg
    assert not marker.exists()


@pytest.mark.parametrize("case", ["truncated", "not_a_dict", "bad_shape", "bad_label"])
def test_cifar_bad_contents(tmp_path, case):
    _, batches = write_fake_cifar100(tmp_path)
    target = tmp_path / "cifar-100-python" / "test"
    batch = batches["test"]
    if case == "truncated":
        target.write_bytes(target.read_bytes()[:100])
    elif case == "not_a_dict":
        dump([batch[b"data"]], target)
    elif case == "bad_shape":
        dump({**batch, b"data": batch[b"data"][:, :1000]}, target)
    else:
        dump({**batch, b"fine_labels": [100] * len(batch[b"fine_labels"])}, target)
    with pytest.raises(DatasetFormatError) as exc:
        load_dataset("cifar100", str(tmp_path))
    assert str(target) in str(exc.value)


def test_real_data_skips_where_absent_and_fails_where_required(tmp_path, monkeypatch):
    """CI sets ORCHESTRATE_REQUIRE_DATA=1 where ../shared/data exists: a real-data test whose files
    are missing then fails instead of skipping, so a skip never hides in its log."""
    from tests import conftest

    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "a.gz").write_bytes(b"")
    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path)
    monkeypatch.setattr(conftest, "REQUIRE_DATA", False)
    assert conftest.real_data("mnist", "a.gz") == tmp_path / "mnist"
    with pytest.raises(pytest.skip.Exception, match="'mnist' not found: b.gz missing under"):
        conftest.real_data("mnist", "a.gz", "b.gz")
    monkeypatch.setattr(conftest, "REQUIRE_DATA", True)
    with pytest.raises(pytest.fail.Exception, match="ORCHESTRATE_REQUIRE_DATA=1"):
        conftest.real_data("ptb", "ptb.train.txt")
