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


# -- the strategy reaches every place that augments ------------------------------------------------
def _spy_families(monkeypatch) -> list[str]:
    """Every family DSA draws from now on (``DSA.sample`` records what it picked)."""
    seen: list[str] = []
    original = DSA.sample

    def sample(self, *a, **kw):
        s = original(self, *a, **kw)
        seen.extend(s.families)
        return s

    monkeypatch.setattr(DSA, "sample", sample)
    return seen


def _digits_like():
    g = torch.Generator().manual_seed(5)
    return torch.randn(30, 1, 8, 8, generator=g), torch.arange(3).repeat_interleave(10)


def _run(kind: str, strategy: str | None, steps: int = 4) -> None:
    from algorithms.dc import DCConfig, DCDistiller
    from algorithms.dm import DMConfig, DMDistiller
    from algorithms.experts import ExpertConfig, train_expert
    from algorithms.mtt import EpochSampler, MTTConfig, MTTDistiller
    from algorithms.networks import flatten_params, seeded_network

    kw = {} if strategy is None else {"dsa_strategy": strategy}
    net = seeded_network({"depth": 1, "width": 4}, 1, 3, 8, seed=0)
    x, y = _digits_like()
    if kind == "expert":
        data = type("D", (), {"x_train": x, "y_train": y, "x_test": x[:6], "y_test": y[:6],
                              "info": type("I", (), {"channels": 1, "num_classes": 3, "size": 8})()})()
        list(train_expert({"depth": 1, "width": 4}, data, ExpertConfig(epochs=steps, batch_size=8, **kw), seed=0))
        return
    if kind == "mtt":
        p0 = flatten_params(net)
        traj = [torch.stack([p0 + 0.01 * k for k in range(4)])]
        d = MTTDistiller(net, EpochSampler(traj, 1, 2), x, y, 3,
                         MTTConfig(ipc=2, syn_steps=3, expert_epochs=1, max_start_epoch=2, **kw))
    elif kind == "dm":
        d = DMDistiller(net, x, y, 3, DMConfig(ipc=2, batch_real=4, **kw))
    else:
        d = DCDistiller(net, x, y, 3, DCConfig(ipc=2, dsa=True, outer_loop=2, inner_loop=2, batch_real=4,
                                               batch_train=4, **kw))
    for _ in range(steps):
        d.step()


@pytest.mark.parametrize("kind", ["expert", "mtt", "dsa", "dm"])
def test_the_configured_strategy_is_the_one_applied(kind, monkeypatch):
    """Experts, the MTT/MCT student, DSA's siamese matching and training, DM: each draws only the
    families of its config's ``dsa_strategy`` (digits: no flip), and the default draws all six."""
    seen = _spy_families(monkeypatch)
    _run(kind, "flip_rotate")
    assert seen and set(seen) <= {"flip", "rotate"}
    seen.clear()
    _run(kind, "color_crop_cutout_scale_rotate", steps=8)
    assert seen and "flip" not in seen
    seen.clear()
    _run(kind, None, steps=8)
    assert len(set(seen)) >= 4  # one family per call, drawn from all six


def test_a_bad_strategy_names_the_field():
    from algorithms.mtt import MTTConfig

    with pytest.raises(ValueError, match=r"dsa_strategy.*mirror"):
        MTTConfig(ipc=1, dsa_strategy="crop_mirror")


# -- DC's own evaluation augmentation (utils.augment of DC's authors) ---------------------------------
def _family_of(x: torch.Tensor, out: torch.Tensor) -> str | None:
    """Which of DC's transformations of one image (c, h, w) gives ``out``, searched over every value
    the transformation can take and computed as DC's authors do, or None. ``x`` is one image of a
    batch whose channel means were ``_MEAN`` (set by the caller)."""
    import torch.nn.functional as F
    from scipy.ndimage import rotate

    c, h, w = x.shape
    padded = _MEAN.view(c, 1, 1).repeat(1, h + 8, w + 8)
    padded[:, 4:4 + h, 4:4 + w] = x
    if any(torch.equal(out, padded[:, r:r + h, q:q + w]) for r in range(8) for q in range(8)):
        return "crop"
    for sh in range(int(0.8 * h), int(1.2 * h) + 1):
        for sw in range(int(0.8 * h), int(1.2 * h) + 1):
            small = F.interpolate(x[None], [sh, sw])[0]
            m = max(sh, sw, h, w)
            canvas = torch.zeros(c, m, m)
            canvas[:, (m - sh) // 2:(m - sh) // 2 + sh, (m - sw) // 2:(m - sw) // 2 + sw] = small
            if torch.equal(out, canvas[:, (m - h) // 2:(m - h) // 2 + h, (m - w) // 2:(m - w) // 2 + w]):
                return "scale"
    for angle in range(-45, 45):
        turned = torch.from_numpy(rotate(x.numpy(), angle=angle, axes=(-2, -1), cval=float(_MEAN.mean())))
        r, q = (turned.shape[-2] - h) // 2, (turned.shape[-1] - w) // 2
        if torch.allclose(out, turned[:, r:r + h, q:q + w].float(), atol=1e-5):
            return "rotate"
    return None


_MEAN = torch.zeros(1)


def test_dc_augmentation_is_one_of_the_authors_transformations_per_image():
    """Every image is exactly one of DC's crop (shift in [-4, 3] filled with the batch's channel
    mean), scale (nearest resize of height and width by 0.8-1.2, centred on zeros) or rotation
    (scipy, whole degrees in [-45, 44], filled with the mean), each drawn about a third of the time;
    the input is left alone and the same generator gives the same batch."""
    from algorithms.augment import DCAugment

    global _MEAN
    torch.manual_seed(0)
    x = torch.rand(45, 1, 12, 12) * torch.linspace(0.5, 2, 45).view(-1, 1, 1, 1)
    before = x.clone()
    out = DCAugment()(x, torch.Generator().manual_seed(3))
    assert torch.equal(x, before)
    assert torch.equal(out, DCAugment()(x, torch.Generator().manual_seed(3)))
    _MEAN = x.mean(dim=(0, 2, 3))
    families = Counter(_family_of(x[i], out[i]) for i in range(len(x)))
    assert None not in families, families
    assert set(families) == {"crop", "scale", "rotate"} and min(families.values()) >= 8, families


def test_dc_noise_and_strategy_errors():
    from algorithms.augment import DCAugConfig, DCAugment, check_dc_strategy

    x = torch.randn(64, 3, 8, 8)
    noisy = DCAugment(DCAugConfig(strategy="noise"))(x, torch.Generator().manual_seed(0))
    assert abs(float((noisy - x).std()) - 0.001) < 1e-4
    assert check_dc_strategy("crop_scale_rotate") is None and check_dc_strategy("crop_noise") is None
    assert "flip" in check_dc_strategy("crop_flip") and check_dc_strategy(3) is not None
    with pytest.raises(ValueError, match="color"):
        DCAugment(DCAugConfig(strategy="color"))
