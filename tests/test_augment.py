import math
from collections import Counter

import pytest
import torch

from algorithms.augment import DSA, FAMILIES, DSAConfig


def test_every_family_keeps_gradients():
    for fam in FAMILIES:
        dsa = DSA(DSAConfig(strategy=fam))
        x = torch.randn(6, 3, 16, 16, requires_grad=True)
        out = dsa(x, torch.Generator().manual_seed(0))
        assert out.shape == x.shape
        (out * torch.randn_like(out)).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0, fam


def test_mode_s_uses_one_family_per_batch_and_all_over_time():
    dsa = DSA(DSAConfig())
    g = torch.Generator().manual_seed(0)
    seen = Counter()
    for _ in range(300):
        s = dsa.sample(8, 16, g)
        assert len(s.families) == 1
        seen[s.families[0]] += 1
    assert set(seen) == set(FAMILIES)
    assert min(seen.values()) > 20  # roughly uniform


def test_siamese_same_sample_same_transform():
    dsa = DSA(DSAConfig(mode="M"))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 1, 8, 8)
    s = dsa.sample(5, 8, g)
    assert torch.equal(dsa.apply(x, s), dsa.apply(x.clone(), s))
    assert not torch.equal(dsa.apply(x, s), dsa.apply(x, dsa.sample(5, 8, g)))


def test_batchmode_shares_parameters_across_the_batch():
    x = torch.randn(1, 3, 16, 16).repeat(7, 1, 1, 1)
    for fam in FAMILIES:
        dsa = DSA(DSAConfig(strategy=fam, batchmode=True))
        out = dsa(x, torch.Generator().manual_seed(2))
        assert torch.allclose(out, out[:1].expand_as(out)), fam
    # without batchmode, per-sample parameters differ
    out = DSA(DSAConfig(strategy="rotate"))(x, torch.Generator().manual_seed(2))
    assert not torch.allclose(out, out[:1].expand_as(out))


def test_families_do_what_they_say():
    x = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8).repeat(2, 1, 1, 1)
    dsa = DSA(DSAConfig(strategy="flip"))
    s = dsa.sample(2, 8, torch.Generator().manual_seed(0))
    s.params["flip"] = torch.tensor([True, False])
    out = dsa.apply(x, s)
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])

    crop = DSA(DSAConfig(strategy="crop"))
    s = crop.sample(2, 8, torch.Generator().manual_seed(0))
    s.params["shift"] = torch.tensor([[1, 0], [0, -2]])
    out = crop.apply(x, s)
    assert torch.equal(out[0, 0, :7], x[0, 0, 1:]) and torch.equal(out[0, 0, 7], torch.zeros(8))
    assert torch.equal(out[1, 0, :, 2:], x[1, 0, :, :6]) and torch.equal(out[1, 0, :, :2], torch.zeros(8, 2))

    cut = DSA(DSAConfig(strategy="cutout"))
    out = cut(torch.ones(4, 1, 8, 8), torch.Generator().manual_seed(0))
    zeros = (out == 0).flatten(1).sum(1)
    assert ((zeros > 0) & (zeros <= 16)).all()  # a 4x4 hole, clipped at the borders

    rot = DSA(DSAConfig(strategy="rotate"))
    s = rot.sample(2, 8, torch.Generator().manual_seed(0))
    s.params["angle"] = torch.zeros(2)
    torch.testing.assert_close(rot.apply(x, s), x, atol=1e-4, rtol=0)
    s.params["angle"] = torch.full((2,), math.pi / 2)
    torch.testing.assert_close(rot.apply(x, s), torch.rot90(x, 1, (2, 3)), atol=1e-4, rtol=0)


def test_unknown_family_is_rejected():
    with pytest.raises(ValueError, match="unknown DSA families"):
        DSA(DSAConfig(strategy="color_blur"))
