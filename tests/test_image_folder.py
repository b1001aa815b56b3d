"""image_folder: a user's own PNG/JPEG images in class folders (orchestrator.imagefolder).

Every image here is generated with Pillow into tmp_path: fast, no real data. Images are given a
unique first pixel (their "id") so that a test can tell which file went to which split.
"""
from __future__ import annotations

import copy
import pathlib
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, PngImagePlugin

from orchestrator import datasets as ds
from orchestrator.cli import main
from orchestrator.datasets import DatasetFormatError, DatasetNotFoundError, ImageData, load_dataset
from orchestrator.spec import SpecError, load_spec, validate
from orchestrator.sweep import check_budgets, load_data

from .test_datasets import write_fake_mnist

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.delenv("ORCHESTRATE_DATA", raising=False)
    ds.clear_cache()
    yield
    ds.clear_cache()


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def pixels(ident: int, shape: tuple[int, ...], seed: int = 0, base: int = 0) -> np.ndarray:
    """uint8 pixels whose first value is ``ident`` (the image's id), the rest seeded noise."""
    rng = np.random.default_rng(seed * 100_003 + ident)
    arr = rng.integers(base, min(256, base + 128), size=shape, dtype=np.uint8)
    arr.reshape(-1)[0] = ident
    return arr


def write_image(path: pathlib.Path, arr: np.ndarray, **save) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **save)
    return path


def make_classes(folder: pathlib.Path, counts: dict[str, int], shape=(8, 8), ext=".png", start=1,
                 base: int = 0) -> dict[str, list[int]]:
    """One folder per class with ``counts[name]`` images; returns the ids per class."""
    ids: dict[str, list[int]] = {}
    ident = start
    for name, n in counts.items():
        ids[name] = []
        for k in range(n):
            write_image(folder / name / f"img{k:03d}{ext}", pixels(ident, shape, base=base),
                        **({"quality": 100} if ext.lower() in (".jpg", ".jpeg") else {}))
            ids[name].append(ident)
            ident += 1
    return ids


def ids_of(data: ImageData, x: torch.Tensor) -> list[int]:
    """The id (first pixel, 0..255) of every image of ``x``."""
    return [int(v) for v in (data.denormalise(x)[:, 0, 0, 0] * 255).round().tolist()]


def load(root, **opts) -> ImageData:
    opts.setdefault("size", 8)
    return load_dataset("image_folder", root, **opts)


# --------------------------------------------------------------------------- #
# layouts and the split
# --------------------------------------------------------------------------- #


def test_flat_layout_classes_sorted_and_stratified(tmp_path):
    ids = make_classes(tmp_path, {"dog": 10, "cat": 10, "bird": 5})
    data = load(tmp_path)
    assert data.info.name == "image_folder"
    assert data.info.classes == ("bird", "cat", "dog") and data.info.num_classes == 3
    assert data.info.to_dict()["classes"] == ["bird", "cat", "dog"]
    assert data.info.channels == 1 and data.info.size == 8
    assert tuple(data.x_train.shape) == (20, 1, 8, 8) and tuple(data.x_test.shape) == (5, 1, 8, 8)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert np.bincount(data.y_test.numpy()).tolist() == [1, 2, 2]  # round(0.2 * n) per class
    assert np.bincount(data.y_train.numpy()).tolist() == [4, 8, 8]
    # every image once, under its own class's label
    train_ids, test_ids = ids_of(data, data.x_train), ids_of(data, data.x_test)
    assert sorted(train_ids + test_ids) == sorted(i for v in ids.values() for i in v)
    label_of = {i: label for label, name in enumerate(data.info.classes) for i in ids[name]}
    assert [label_of[i] for i in train_ids] == data.y_train.tolist()
    assert [label_of[i] for i in test_ids] == data.y_test.tolist()


def test_train_test_layout_takes_the_test_split_from_test(tmp_path):
    train = make_classes(tmp_path / "train", {"a": 4, "b": 3})
    test = make_classes(tmp_path / "test", {"a": 2, "b": 1}, start=100)
    (tmp_path / "README.txt").write_text("ignored")
    data = load(tmp_path, test_fraction=0.5, seed=7)  # neither matters with a test/ folder
    assert data.info.classes == ("a", "b")
    assert ids_of(data, data.x_train) == train["a"] + train["b"]
    assert ids_of(data, data.x_test) == test["a"] + test["b"]
    assert data.y_train.tolist() == [0, 0, 0, 0, 1, 1, 1] and data.y_test.tolist() == [0, 0, 1]
    ds.clear_cache()
    assert load(tmp_path).digest() == data.digest()  # the fraction and the seed do not enter it


def test_train_without_test_draws_the_test_split_from_train(tmp_path):
    make_classes(tmp_path / "train", {"a": 5, "b": 5})
    data = load(tmp_path)
    assert data.info.classes == ("a", "b")  # not a class called 'train'
    assert len(data.x_train) == 8 and np.bincount(data.y_test.numpy()).tolist() == [1, 1]


def test_a_class_called_train_with_images_is_a_class(tmp_path):
    make_classes(tmp_path, {"train": 3, "bus": 3})
    assert load(tmp_path).info.classes == ("bus", "train")


def test_train_and_test_need_the_same_classes(tmp_path):
    make_classes(tmp_path / "train", {"a": 2, "b": 2, "c": 2})
    make_classes(tmp_path / "test", {"a": 1, "b": 1, "d": 1}, start=100)
    with pytest.raises(DatasetFormatError) as exc:
        load(tmp_path)
    msg = str(exc.value)
    assert "same class" in msg and "only in train/: c" in msg and "only in test/: d" in msg


@pytest.mark.parametrize("fraction, n, expected", [(0.2, 2, 1), (0.2, 3, 1), (0.2, 7, 1), (0.2, 10, 2),
                                                   (0.5, 3, 2), (0.5, 7, 4), (0.9, 4, 3), (0.01, 50, 1)])
def test_split_sizes_per_class(tmp_path, fraction, n, expected):
    make_classes(tmp_path, {"x": n, "y": 2})
    data = load(tmp_path, test_fraction=fraction)
    assert np.bincount(data.y_test.numpy(), minlength=2)[0] == expected
    assert np.bincount(data.y_train.numpy(), minlength=2)[0] == n - expected


def test_split_is_deterministic_by_seed(tmp_path):
    make_classes(tmp_path, {"a": 10, "b": 10, "c": 10})
    first = load(tmp_path, seed=0)
    split0 = sorted(ids_of(first, first.x_test))
    ds.clear_cache()
    again = load(tmp_path, seed=0)
    assert again is not first and sorted(ids_of(again, again.x_test)) == split0
    assert torch.equal(again.x_train, first.x_train) and again.digest() == first.digest()
    other = load(tmp_path, seed=1)
    assert sorted(ids_of(other, other.x_test)) != split0
    assert np.bincount(other.y_test.numpy()).tolist() == [2, 2, 2]  # still stratified
    assert other.digest() != first.digest()
    # a class's split depends on its own files only: another class added leaves it alone
    make_classes(tmp_path, {"d": 4}, start=200)
    ds.clear_cache()
    more = load(tmp_path, seed=0)
    assert [i for i in sorted(ids_of(more, more.x_test)) if i < 200] == split0


def test_a_class_of_one_image_cannot_be_split(tmp_path):
    make_classes(tmp_path, {"a": 3, "lonely": 1})
    with pytest.raises(DatasetFormatError) as exc:
        load(tmp_path)
    msg = str(exc.value)
    assert str(tmp_path / "lonely") in msg and "at least 2" in msg and "dataset.test_fraction" in msg


# --------------------------------------------------------------------------- #
# pixels: resizing, channels, normalisation
# --------------------------------------------------------------------------- #


def test_images_are_resized_with_pillow_bilinear(tmp_path):
    files = [write_image(tmp_path / "train" / c / "0.png", pixels(i, (10, 6))) for i, c in ((1, "a"), (2, "b"))]
    files += [write_image(tmp_path / "test" / c / "0.png", pixels(i, (30, 17))) for i, c in ((3, "a"), (4, "b"))]
    data = load(tmp_path, size=4)
    assert tuple(data.x_train.shape) == (2, 1, 4, 4) and tuple(data.x_test.shape) == (2, 1, 4, 4)
    got = data.denormalise(torch.cat([data.x_train, data.x_test])).numpy()[:, 0]
    for g, f in zip(got, files):
        want = np.asarray(Image.open(f).convert("L").resize((4, 4), Image.Resampling.BILINEAR)) / 255.0
        np.testing.assert_allclose(g, want, atol=1e-5)


def test_images_of_the_given_size_keep_their_pixels(tmp_path):
    make_classes(tmp_path / "train", {"a": 2, "b": 2}, shape=(5, 5))
    make_classes(tmp_path / "test", {"a": 1, "b": 1}, shape=(5, 5), start=50)
    data = load(tmp_path, size=5)
    raw = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "test").rglob("*.png"))]
    np.testing.assert_allclose(data.denormalise(data.x_test).numpy()[:, 0] * 255, np.stack(raw), atol=1e-3)


def test_mean_and_std_come_from_the_train_split_only(tmp_path):
    make_classes(tmp_path / "train", {"a": 3, "b": 3}, shape=(6, 6, 3))
    make_classes(tmp_path / "test", {"a": 2, "b": 2}, shape=(6, 6, 3), start=100, base=128)  # brighter
    data = load(tmp_path, size=6)
    def read(split):  # N,C,H,W in [0, 1], in the loader's order
        files = sorted((tmp_path / split).rglob("*.png"))
        return np.stack([np.asarray(Image.open(p)) for p in files]).astype(np.float64).transpose(0, 3, 1, 2) / 255

    train, test = read("train"), read("test")
    np.testing.assert_allclose(data.info.mean, train.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(data.info.std, train.std(axis=(0, 2, 3)), rtol=1e-6)
    everything = np.concatenate([train, test])
    assert np.all(np.abs(np.array(data.info.mean) - everything.mean(axis=(0, 2, 3))) > 0.05)
    # normalised like the built-in datasets: the train split has mean 0 and std 1 per channel
    x = data.x_train.double()
    np.testing.assert_allclose(x.mean(dim=(0, 2, 3)).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(x.std(dim=(0, 2, 3), correction=0).numpy(), 1.0, atol=1e-5)
    assert float(data.x_test.mean()) > 0.5  # the brighter test split is not centred
    # ... and is normalised with the train split's statistics: denormalising gives its pixels back
    np.testing.assert_allclose(data.denormalise(data.x_test).double().numpy(), test, atol=1e-5)


def test_grayscale_and_rgb_are_detected(tmp_path):
    gray, rgb = tmp_path / "gray", tmp_path / "rgb"
    make_classes(gray, {"a": 2, "b": 2}, ext=".png")
    (gray / "b" / "img000.png").unlink()
    write_image(gray / "b" / "la.png", np.stack([pixels(9, (8, 8)), np.full((8, 8), 7, np.uint8)], -1))  # LA
    assert load(gray).info.channels == 1
    # RGB: PNG, RGBA (alpha dropped), JPEG whatever the case of the extension
    write_image(rgb / "red" / "0.png", np.dstack([np.full((8, 8), 250, np.uint8), *[np.zeros((8, 8), np.uint8)] * 2]))
    write_image(rgb / "red" / "1.PNG", np.dstack([np.full((8, 8), 240, np.uint8), *[np.zeros((8, 8), np.uint8)] * 3]))
    write_image(rgb / "blue" / "0.JPG", np.dstack([*[np.zeros((8, 8), np.uint8)] * 2, np.full((8, 8), 250, np.uint8)]),
                quality=100)
    write_image(rgb / "blue" / "1.jpeg", np.dstack([*[np.zeros((8, 8), np.uint8)] * 2, np.full((8, 8), 230, np.uint8)]),
                quality=100)
    data = load(rgb)
    assert data.info.channels == 3 and len(data.info.mean) == len(data.info.std) == 3
    assert data.info.classes == ("blue", "red") and tuple(data.x_train.shape[1:]) == (3, 8, 8)
    x = torch.cat([data.x_train, data.x_test])
    y = torch.cat([data.y_train, data.y_test])
    means = data.denormalise(x).mean(dim=(2, 3))
    assert torch.all(means[y == 1, 0] > 0.9) and torch.all(means[y == 1, 2] < 0.05)  # red
    assert torch.all(means[y == 0, 2] > 0.85) and torch.all(means[y == 0, 0] < 0.05)  # blue


def test_sixteen_bit_grayscale_is_scaled_by_65535(tmp_path):
    for c, v in (("a", 65535), ("a", 32768), ("b", 0), ("b", 1000)):
        write_image(tmp_path / c / f"{v}.png", np.full((4, 4), v, dtype=np.uint16))
    assert Image.open(tmp_path / "a" / "65535.png").mode.startswith("I")
    data = load(tmp_path, size=4, test_fraction=0.5)
    x = data.denormalise(torch.cat([data.x_train, data.x_test]))
    assert data.info.channels == 1
    assert sorted(round(float(v), 5) for v in x[:, 0, 0, 0]) == \
        sorted(round(v / 65535, 5) for v in (65535, 32768, 0, 1000))


def test_mixed_channel_counts_name_both_files_unless_channels_is_given(tmp_path):
    write_image(tmp_path / "a" / "gray.png", pixels(1, (8, 8)))
    write_image(tmp_path / "a" / "gray2.png", pixels(2, (8, 8)))
    write_image(tmp_path / "b" / "colour.png", pixels(3, (8, 8, 3)))
    write_image(tmp_path / "b" / "colour2.png", pixels(4, (8, 8, 3)))
    with pytest.raises(DatasetFormatError) as exc:
        load(tmp_path)
    msg = str(exc.value)
    assert "different channel counts" in msg and "dataset.channels" in msg
    assert ("gray.png is L" in msg or "gray2.png is L" in msg) and ("colour.png is RGB" in msg or
                                                                  "colour2.png is RGB" in msg)
    as_rgb = load(tmp_path, channels=3)
    assert as_rgb.info.channels == 3
    gray = as_rgb.denormalise(torch.cat([as_rgb.x_train, as_rgb.x_test]))[torch.cat([as_rgb.y_train,
                                                                                   as_rgb.y_test]) == 0]
    assert torch.allclose(gray[:, 0], gray[:, 1], atol=1e-5) and torch.allclose(gray[:, 0], gray[:, 2], atol=1e-5)
    as_gray = load(tmp_path, channels=1)
    assert as_gray.info.channels == 1 and as_gray.digest() != as_rgb.digest()


# --------------------------------------------------------------------------- #
# errors
# --------------------------------------------------------------------------- #


def test_missing_root_and_no_class_folders(tmp_path):
    with pytest.raises(DatasetNotFoundError) as exc:
        load(tmp_path / "nowhere")
    assert "dataset.root" in str(exc.value) and str(tmp_path / "nowhere") in str(exc.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetFormatError, match="no class folders"):
        load(tmp_path / "empty")
    write_image(tmp_path / "loose" / "0.png", pixels(1, (8, 8)))
    with pytest.raises(DatasetFormatError, match="1 images lie directly in it"):
        load(tmp_path / "loose")


def test_empty_class_folder_is_named(tmp_path):
    make_classes(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "c").mkdir()
    with pytest.raises(DatasetFormatError) as exc:
        load(tmp_path)
    assert str(tmp_path / "c") in str(exc.value) and "'c' holds no" in str(exc.value)
    (tmp_path / "c" / "notes.txt").write_text("x")
    (tmp_path / "c" / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(DatasetFormatError, match=r"found 1 other files, e\.g\. notes\.txt"):
        load(tmp_path)


def test_hidden_files_and_other_extensions_are_skipped(tmp_path):
    make_classes(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "a" / "._img000.png").write_bytes(b"AppleDouble junk")
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / ".hidden").mkdir()
    write_image(tmp_path / "a" / "deeper" / "x.png", pixels(60, (8, 8)))  # sub-folders are read
    data = load(tmp_path, test_fraction=0.01)
    assert data.info.classes == ("a", "b") and len(data.x_train) + len(data.x_test) == 7


@pytest.mark.parametrize("kind", ["garbage", "truncated", "other_format", "empty"])
def test_corrupt_image_is_named(tmp_path, kind):
    make_classes(tmp_path, {"a": 3, "b": 3})
    bad = tmp_path / "b" / "bad.png"
    good = (tmp_path / "b" / "img000.png").read_bytes()
    if kind == "garbage":
        bad.write_bytes(b"this is not an image at all")
    elif kind == "truncated":
        bad.write_bytes(good[: len(good) // 2])
    elif kind == "other_format":  # a GIF named .png: only the PNG and JPEG decoders are used
        Image.fromarray(pixels(1, (8, 8))).save(bad, format="GIF")
    else:
        bad.write_bytes(b"")
    with pytest.raises(DatasetFormatError) as exc:
        load(tmp_path)
    assert str(bad) in str(exc.value) and "not a readable PNG or JPEG image" in str(exc.value)


def test_corrupt_png_checksum_is_caught_by_verify(tmp_path):
    make_classes(tmp_path, {"a": 3, "b": 3})
    path = tmp_path / "a" / "img001.png"
    raw = bytearray(path.read_bytes())
    at = raw.index(b"IDAT") + 6  # a byte of the compressed data: its CRC no longer matches
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetFormatError, match=str(path)):
        load(tmp_path)


def test_options_are_checked_and_only_image_folder_takes_them(tmp_path):
    make_classes(tmp_path, {"a": 2, "b": 2})
    with pytest.raises(ValueError, match="dataset.size: is required"):
        load_dataset("image_folder", tmp_path)
    for bad, key in (({"size": 1}, "dataset.size"), ({"test_fraction": 1.0}, "dataset.test_fraction"),
                     ({"channels": 2}, "dataset.channels"), ({"size": True}, "dataset.size")):
        with pytest.raises(ValueError, match=key):
            load(tmp_path, **bad)
    write_fake_mnist(tmp_path / "mnist")
    with pytest.raises(TypeError, match="takes no options"):
        load_dataset("mnist", tmp_path / "mnist", size=32)
    with pytest.raises(ValueError, match="come from its files"):
        ds.dataset_info("image_folder")


# --------------------------------------------------------------------------- #
# the digest (the experts' store key)
# --------------------------------------------------------------------------- #


def test_digest_follows_the_files_the_size_and_the_split(tmp_path):
    make_classes(tmp_path / "a", {"x": 4, "y": 4})
    base = load(tmp_path / "a")
    # the same files elsewhere: the same data, the same digest
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    assert load(tmp_path / "copy").digest() == base.digest()
    # one pixel of one file
    path = tmp_path / "copy" / "y" / "img002.png"
    arr = np.asarray(Image.open(path)).copy()
    arr[3, 3] ^= 1
    write_image(path, arr)
    ds.clear_cache()
    assert load(tmp_path / "copy").digest() != base.digest()
    # the size, the fraction, the seed, the channels
    assert load(tmp_path / "a", size=7).digest() != base.digest()
    assert load(tmp_path / "a", test_fraction=0.5).digest() != base.digest()
    assert load(tmp_path / "a", seed=3).digest() != base.digest()
    assert load(tmp_path / "a", channels=3).digest() != base.digest()
    # a change of the file that the pixels do not show (a PNG text chunk) changes it too
    shutil.rmtree(tmp_path / "copy")
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "retouched")
    path = tmp_path / "copy" / "x" / "img000.png"
    write_image(path, np.asarray(Image.open(path)).copy(), pnginfo=info)
    ds.clear_cache()
    changed = load(tmp_path / "copy")
    assert torch.equal(changed.x_train, base.x_train) and torch.equal(changed.x_test, base.x_test)
    assert changed.digest() != base.digest()


def test_builtin_digests_are_unchanged(tmp_path):
    """The experts' store keys of the built-in datasets hold their digests: they must not move."""
    assert load_dataset("digits").digest() == "ce2a68fa9b82ac3c0e682ac23adf9d695165c4dba58bb380e10b7fda18a0886e"
    assert load_dataset("digits").source is None
    assert "classes" not in load_dataset("digits").info.to_dict()


# --------------------------------------------------------------------------- #
# specs
# --------------------------------------------------------------------------- #

# The sweeps of these specs resume with `orchestrate launch SPEC`, which refuses a changed hash.
PINNED_HASHES = {
    "search_spaces/quickstart.yaml": "de12dceadda28755",
    "search_spaces/reference/mnist_ipc1.yaml": "07f51aaeb6cf0912",
    # was 1e70544da2e361ae: now bf16, one core per trial, two at once, the authors' 1000-epoch evaluation;
    # 7d198094c7e7146f while checkpoint_interval (10 here) counted: still among its hashes (LEGACY_HASHES)
    "search_spaces/reference/mnist_baselines_ipc1.yaml": "58d29d434b1fb5bf",
    "search_spaces/mnist.yaml": "a582257331c9d11c",
    "search_spaces/cifar10.yaml": "9a9b3f5f69d0df47",
    "search_spaces/mct_vs_mtt.yaml": "43c6708e146f4538",
    "search_spaces/farzi_ml100k.yaml": "da25be40724558d2",  # init teacher, eps 1e-3, max_start_epoch 1 (47b277b0a07cae30 before)
    "search_spaces/farzi_ptb.yaml": "b4b5b7ad7b61bfa0",
    # init teacher, eps 1e-3, outer lr 1e-3 (978ab7f0d5af4e62: eps 1e-4; 5fad745de34b418a: eps 1e-8; db5bd04212fd4e59: d 16)
    "search_spaces/reference/farzi_ml100k.yaml": "213d95e84eed8e9d",
    "search_spaces/reference/farzi_ml100k_t200.yaml": "7f65a86905342c3c",
    "search_spaces/reference/farzi_ml100k_teacher.yaml": "bbe063d99f89dff3",
    "search_spaces/reference/farzi_ml100k_ensemble.yaml": "d56a17e1264c7f7b",
    "search_spaces/reference/farzi_ptb.yaml": "605cdd63f2d894cc",
    "search_spaces/reference/mnist_dm_ipc10.yaml": "5699287cb90ba348",
    # its one init_from file hashes as the file's sha256 alone (51689150fffa1047 for one commit,
    # 607f4de, which hashed every start as a mapping); it moves when a continued set is published
    # over distilled/mnist-dm-ipc10.safetensors (the spec then starts from that one)
    "search_spaces/reference/mnist_dm_ipc10_continued.yaml": "aa470a05e1259b98",
    # as mnist_dm_ipc10_continued.yaml: it moves when a continued PTB set is published over the one it reads
    # (8a1ad21cd1b29005 from the 50-step set: the leg that published the 125-step set, 2026-12-04)
    "search_spaces/reference/farzi_ptb_continued.yaml": "25555be83df61148",
}


# The hashes of specs with a non-default checkpoint_interval from before it left the hash: their sweeps
# resume and their published sets (distilled/index.json) verify under them.
LEGACY_HASHES = {
    "search_spaces/reference/mnist_baselines_ipc1.yaml": "7d198094c7e7146f",
    # its checkpoint_interval 5 counted for one commit (2421e50), under which a CPU sweep was launched
    "search_spaces/reference/farzi_ptb.yaml": "77f12da1871cf3c2",
    # written after checkpoint_interval left the hash: no sweep ran under these, but the spec still has them
    "search_spaces/reference/mnist_dm_ipc10.yaml": "6fe2db7a74ad2423",
    "search_spaces/reference/mnist_dm_ipc10_continued.yaml": "5c5d2ef6ef6ccb17",
    "search_spaces/reference/farzi_ptb_continued.yaml": "1e7c9740dd23e9f6",
}


@pytest.mark.parametrize("path", sorted(PINNED_HASHES))
def test_shipped_spec_hashes_are_pinned(path):
    spec = load_spec(REPO / path)
    assert spec.hash == PINNED_HASHES[path]
    assert spec.hashes == (PINNED_HASHES[path], *([LEGACY_HASHES[path]] if path in LEGACY_HASHES else []))
    assert set(spec.dataset) == {"name", "root", "zca"}  # no image_folder keys for the other datasets


FOLDER_SPEC = {
    "name": "mine",
    "seed": 5,
    "dataset": {"name": "image_folder", "root": "ROOT", "size": 8},
    "model": {"depth": 2, "width": 8},
    "experts": {"count": 1, "epochs": 2},
    "algorithms": {"mtt": {"budgets": [1, 2], "iterations": 3,
                           "hyperparameters": {"expert_epochs": 1, "max_start_epoch": 1}}},
}


def folder_spec(root, **dataset) -> dict:
    raw = copy.deepcopy(FOLDER_SPEC)
    raw["dataset"]["root"] = str(root)
    raw["dataset"].update(dataset)
    raw["dataset"] = {k: v for k, v in raw["dataset"].items() if v is not ...}  # ...: leave the key out
    return raw


def test_image_folder_spec_defaults():
    spec = validate(folder_spec("/data/mine"))
    assert spec.dataset == {"name": "image_folder", "root": "/data/mine", "size": 8, "test_fraction": 0.2,
                            "channels": None, "zca": False}
    assert validate(folder_spec("/data/mine", size=16)).hash != spec.hash
    assert validate(folder_spec("/data/mine", name="Image_Folder", channels=3)).dataset["channels"] == 3


@pytest.mark.parametrize("change, key, words", [
    ({"size": ...}, "dataset.size", "is required"),
    ({"size": "32"}, "dataset.size", "must be int"),
    ({"size": 32.0}, "dataset.size", "must be int"),
    ({"size": 1}, "dataset.size", "from 2 to 1024"),
    ({"size": 3}, "dataset.size", "pooled below 1x1"),  # model.depth 2 needs 4 px
    ({"test_fraction": 0}, "dataset.test_fraction", "(0, 1)"),
    ({"test_fraction": 1.5}, "dataset.test_fraction", "(0, 1)"),
    ({"test_fraction": "a fifth"}, "dataset.test_fraction", "must be int or float"),
    ({"channels": 2}, "dataset.channels", "1 (grayscale), 3 (RGB) or null"),
    ({"channels": True}, "dataset.channels", "must be int or null"),
    ({"sise": 8}, "dataset.sise", "did you mean 'size'"),
])
def test_image_folder_spec_errors_name_the_key(change, key, words):
    with pytest.raises(SpecError) as exc:
        validate(folder_spec("/data/mine", **change), "mine.yaml")
    assert any(p.startswith(f"mine.yaml: {key}: ") and words in p for p in exc.value.problems), exc.value.problems


@pytest.mark.parametrize("name", ["digits", "mnist", "cifar10"])
def test_other_datasets_refuse_the_image_folder_keys(name):
    raw = folder_spec("/data/x", name=name, test_fraction=0.3)
    with pytest.raises(SpecError) as exc:
        validate(raw, "s.yaml")
    assert sorted(exc.value.problems) == [f"s.yaml: dataset.size: only image_folder takes size, not {name!r}",
                                          (f"s.yaml: dataset.test_fraction: only image_folder takes test_fraction, "
                                           f"not {name!r}")]


def test_load_data_of_a_spec_end_to_end(tmp_path):
    make_classes(tmp_path / "imgs", {"cat": 6, "dog": 6, "fish": 6}, shape=(12, 10, 3), ext=".jpg")
    spec = validate(folder_spec(tmp_path / "imgs", test_fraction=0.5))
    data = load_data(spec)
    assert data.info.classes == ("cat", "dog", "fish") and data.info.num_classes == 3
    assert data.info.shape == (3, 8, 8)
    assert tuple(data.x_train.shape) == (9, 3, 8, 8) and tuple(data.x_test.shape) == (9, 3, 8, 8)
    assert np.bincount(data.y_train.numpy()).tolist() == [3, 3, 3]
    # the spec's seed draws the split
    assert data is load_dataset("image_folder", tmp_path / "imgs", size=8, test_fraction=0.5, seed=5)
    other = load_data(validate({**folder_spec(tmp_path / "imgs", test_fraction=0.5), "seed": 6}))
    assert other.digest() != data.digest()
    check_budgets(spec, data)  # budgets 1 and 2 fit 3 images per class
    with pytest.raises(SpecError, match="exceed the 3 training images"):
        check_budgets(validate({**folder_spec(tmp_path / "imgs", test_fraction=0.5),
                                "algorithms": {"mtt": {"budgets": [4], "iterations": 1, "hyperparameters": {
                                    "expert_epochs": 1, "max_start_epoch": 1}}}}), data)


def test_cli_exits_2_naming_a_corrupt_file_before_ray(tmp_path, write_spec):
    make_classes(tmp_path / "imgs", {"a": 3, "b": 3})
    bad = tmp_path / "imgs" / "b" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    spec = write_spec(folder_spec(tmp_path / "imgs"))
    res = CliRunner().invoke(main, ["experts", str(spec), "--root", str(tmp_path / "store")])
    assert res.exit_code == 2, res.output
    assert str(bad) in res.output and "not a readable PNG or JPEG image" in res.output
