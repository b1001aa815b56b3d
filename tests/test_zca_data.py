"""ZCA whitening as a dataset option (``dataset.zca``): the whitened data, its digest and store
key, the export contract's inverse, the image grid in pixels, and ``orchestrate evaluate``."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from algorithms.base import SyntheticSet
from algorithms.evaluate import random_real_subset
from orchestrator.artifacts import image_grid, read_synthetic, save_synthetic
from orchestrator.cli import main
from orchestrator.experts import expert_key
from orchestrator.spec import SpecError, validate

from .conftest import tiny_spec


@pytest.fixture(scope="module")
def pair():
    plain, zca = validate(tiny_spec()), validate(tiny_spec(dataset={"zca": True}))
    return plain, plain.task.load(plain), zca, zca.task.load(zca)


def test_whitened_digits_and_their_own_store_key(pair):
    plain, d0, zspec, dz = pair
    assert dz.zca is not None and d0.zca is None
    assert dz.digest() != d0.digest() and expert_key(zspec, dz) != expert_key(plain, d0)
    assert zspec.hash != plain.hash and validate(tiny_spec(dataset={"zca": False})).hash == plain.hash
    # MTT whitens pixels: undoing the whitening gives the dataset's pixels back
    torch.testing.assert_close(dz.zca.inverse(dz.x_test.double()).float(), d0.denormalise(d0.x_test),
                               atol=1e-4, rtol=0)
    # whitened training images: covariance U diag(l/(l+eps)) U^T, below the identity, near it on strong directions
    lam = torch.linalg.eigvalsh(torch.cov(d0.denormalise(d0.x_train).flatten(1).double().T)).clamp_min(0)
    eig = torch.linalg.eigvalsh(torch.cov(dz.x_train.flatten(1).double().T))
    torch.testing.assert_close(eig, (lam / (lam + 0.1)).sort().values, atol=1e-4, rtol=0)
    with pytest.raises(SpecError, match=r"dataset\.zca: ZCA whitening is for images"):
        validate({**tiny_spec(), "dataset": {"name": "ml-100k", "zca": True},
                  "algorithms": {"farzi": {"budgets": [2]}}})


def test_export_carries_the_inverse_and_the_grid_shows_pixels(pair, tmp_path):
    _, d0, _, dz = pair
    x, y = random_real_subset(dz.x_train, dz.y_train, 2, 10, torch.Generator().manual_seed(1))
    f = save_synthetic(tmp_path / "z.safetensors", SyntheticSet(x, y, 0.01), dz.info, "random", zca=dz.zca)
    t, meta = read_synthetic(f)
    assert meta["zca"] == "true" and t["zca_inverse"].shape == (64, 64) and t["zca_mean"].shape == (1, 8, 8)
    pixels = (t["images"].flatten(1) @ t["zca_inverse"]).view_as(t["images"]) + t["zca_mean"]
    x0, _ = random_real_subset(d0.x_train, d0.y_train, 2, 10, torch.Generator().manual_seed(1))
    torch.testing.assert_close(pixels, d0.denormalise(x0), atol=1e-4, rtol=0)  # the same images, as pixels
    plain = tmp_path / "plain.safetensors"
    save_synthetic(plain, SyntheticSet(x0, y, 0.01), d0.info, "random")
    assert "zca" not in read_synthetic(plain)[1]  # files without ZCA read as before
    from PIL import Image
    a = image_grid(x, y, dz.info.mean, dz.info.std, tmp_path / "a.png", zca=dz.zca)
    b = image_grid(x0, y, d0.info.mean, d0.info.std, tmp_path / "b.png")
    diff = torch.tensor(list(Image.open(a).getdata())).float() - torch.tensor(list(Image.open(b).getdata())).float()
    assert diff.abs().max() <= 1  # the same picture, up to rounding
    bad = {**t, "zca_mean": torch.zeros(1, 4, 4)}
    from safetensors.torch import save_file
    save_file(bad, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"tensor 'zca_mean' has shape \(1, 4, 4\), expected \(1, 8, 8\)"):
        read_synthetic(tmp_path / "bad.safetensors")


def test_orchestrate_evaluate_whitens_the_dataset_like_the_set(pair, tmp_path):
    _, _, _, dz = pair
    x, y = random_real_subset(dz.x_train, dz.y_train, 3, 10, torch.Generator().manual_seed(2))
    f = save_synthetic(tmp_path / "z.safetensors", SyntheticSet(x, y, 0.01), dz.info, "random", zca=dz.zca,
                       model={"name": "convnet", "depth": 2, "width": 16, "norm": "instancenorm",
                              "pooling": "avgpooling"})
    res = CliRunner().invoke(main, ["evaluate", str(f), "--networks", "1", "--epochs", "30", "--format", "json"])
    assert res.exit_code == 0, res.output
    acc = {r["trained_on"]: r.get("acc_mean") for r in json.loads(res.stdout)["rows"]}
    assert acc["synthetic"] > 0.3 and acc["random"] > 0.3  # whitened sets, tested on whitened images (chance 0.1)
    t, meta = read_synthetic(f)
    from safetensors.torch import save_file
    save_file({**t, "zca_inverse": torch.eye(64)}, str(tmp_path / "other.safetensors"), metadata=meta)
    res = CliRunner().invoke(main, ["evaluate", str(tmp_path / "other.safetensors"), "--networks", "1"])
    assert res.exit_code == 2 and "tensor 'zca_inverse' is not the ZCA whitening of digits" in res.output
