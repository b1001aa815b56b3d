"""ZCA whitening (algorithms/zca.py): round trip, whitened covariance, the formula, state round trip."""
import numpy as np
import pytest
import torch

from algorithms.zca import ZCA


def correlated_images(n=3000, shape=(3, 4, 4), seed=0):
    """Images in [0, 1]-ish whose pixels are strongly correlated (a random mixing of latent noise),
    with variances spread over three orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    d = int(np.prod(shape))
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(-1.5, 0, d, dtype=torch.float64)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (0.5 + 0.1 * z @ mix.T).to(torch.float32).reshape(n, *shape)


def cov(x):
    flat = x.reshape(len(x), -1).to(torch.float64)
    flat = flat - flat.mean(0)
    return flat.T @ flat / (len(x) - 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_restores_pixels(dtype):
    x = correlated_images()
    zca = ZCA.fit(x)
    xs = x[:200].to(dtype)
    z = zca.transform(xs)
    assert z.dtype == dtype and z.shape == xs.shape
    back = zca.inverse(z)
    err = (back - xs).abs().max().item()
    assert err < (1e-4 if dtype == torch.float32 else 1e-10), err
    assert (z - xs).abs().max().item() > 0.1  # it did change the pixels


def test_whitened_training_covariance_is_identity_up_to_the_regularisation():
    x = correlated_images()
    c = cov(x)
    lam, u = torch.linalg.eigh(c)
    # eps 0.1: covariance U diag(lam / (lam + eps)) U^T, not the identity (pixel variances are ~1e-2)
    zca = ZCA.fit(x, eps=0.1)
    got = cov(zca.transform(x.to(torch.float64)))
    expected = (u * (lam / (lam + 0.1))) @ u.T
    assert (got - expected).abs().max().item() < 1e-9
    assert (got - torch.eye(len(c), dtype=torch.float64)).abs().max().item() > 0.5
    # a negligible regularisation: the identity
    white = cov(ZCA.fit(x, eps=1e-12).transform(x.to(torch.float64)))
    assert (white - torch.eye(len(c), dtype=torch.float64)).abs().max().item() < 1e-6
    # the whitened training mean is zero
    assert zca.transform(x.to(torch.float64)).mean(0).abs().max().item() < 1e-9


def test_matches_the_textbook_formula_and_is_symmetric():
    """W = U diag((s + eps)^-1/2) U^T from numpy's SVD of numpy's unbiased covariance (kornia's recipe)."""
    x = correlated_images(n=500, shape=(1, 4, 4), seed=1)
    flat = x.reshape(len(x), -1).double().numpy()
    u, s, _ = np.linalg.svd(np.cov(flat, rowvar=False))
    w = u @ np.diag(1 / np.sqrt(s + 0.1)) @ u.T
    zca = ZCA.fit(x, chunk=64)  # chunked accumulation gives the same fit
    np.testing.assert_allclose(zca.matrix.numpy(), w, rtol=0, atol=1e-10)
    np.testing.assert_allclose(zca.mean.reshape(-1).numpy(), flat.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(zca.matrix, zca.matrix.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(zca.matrix @ zca.inverse_matrix, torch.eye(16, dtype=torch.float64),
                               rtol=0, atol=1e-10)
    z = zca.transform(x[:5].double()).reshape(5, -1).numpy()
    np.testing.assert_allclose(z, (flat[:5] - flat.mean(0)) @ w, rtol=0, atol=1e-10)


def test_state_dict_round_trip_gives_identical_outputs(tmp_path):
    from safetensors.torch import load_file, save_file

    x = correlated_images(n=400)
    zca = ZCA.fit(x)
    state = zca.state_dict()
    assert set(state) == {"mean", "transform", "inverse", "eps"}
    assert all(t.dtype == torch.float64 and t.is_contiguous() for t in state.values())
    assert tuple(state["mean"].shape) == (3, 4, 4) and tuple(state["transform"].shape) == (48, 48)
    save_file(state, str(tmp_path / "zca.safetensors"))
    again = ZCA.from_state_dict(load_file(str(tmp_path / "zca.safetensors")))
    assert again.eps == 0.1
    xs = x[:50]
    assert torch.equal(again.transform(xs), zca.transform(xs))
    assert torch.equal(again.inverse(zca.transform(xs)), zca.inverse(zca.transform(xs)))


def test_transform_is_differentiable_and_refuses_other_shapes():
    zca = ZCA.fit(correlated_images(n=300))
    x = torch.rand(4, 3, 4, 4, requires_grad=True)
    zca.transform(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"fitted on \(3, 4, 4\)"):
        zca.transform(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="at least 2 images"):
        ZCA.fit(torch.rand(1, 3, 4, 4))


def test_rank_deficient_data_is_regularised():
    """Digits-like data with constant pixels: eps > 0 keeps the transform finite (eps 0 refuses)."""
    x = correlated_images(n=300, shape=(1, 4, 4))
    x[:, :, 0, 0] = 0.0
    zca = ZCA.fit(x)
    assert torch.isfinite(zca.matrix).all()
    assert (zca.inverse(zca.transform(x)) - x).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="singular"):
        ZCA.fit(x, eps=0.0)
