"""bench/farzi_snr.py's estimate of how many problems a Farzi outer step must average: checked on
gradients built with a known shared component."""
import math
import sys

import pytest
import torch

from .conftest import REPO

sys.path.insert(0, str(REPO / "bench"))  # the bench scripts import their helpers as ``common``
farzi_snr = pytest.importorskip("farzi_snr")


def _draws(n, dim, signal, seed=0):
    """n gradients = signal * u + unit Gaussian noise / sqrt(dim), u one fixed unit vector."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(dim, generator=g, dtype=torch.float64)
    u /= u.norm()
    return [signal * u + torch.randn(dim, generator=g, dtype=torch.float64) / math.sqrt(dim) for _ in range(n)]


@pytest.mark.parametrize("signal", [0.5, 0.2, 0.1])
def test_coherence_recovers_the_shared_fraction_and_the_problems_needed(signal):
    # unit noise and a shared component of length s: cos between two draws -> s^2 / (1 + s^2)
    out = farzi_snr.coherence(_draws(40, 20000, signal))
    c = signal ** 2 / (1 + signal ** 2)
    assert out["pairs"] == 40 * 39 // 2
    assert abs(out["cos_mean"] - c) < max(4 * out["cos_se"], 0.01)
    assert out["k_star"] == pytest.approx((1 - c) / c, rel=0.25)
    # averaging K* of them: the mean's shared part is as long as its noise
    K = round(out["k_star"])
    mean = sum(_draws(K, 20000, signal, seed=1)) / K
    assert (signal ** 2) / (float(mean.norm()) ** 2 - signal ** 2) == pytest.approx(1.0, rel=0.3)


def test_coherence_of_independent_gradients_finds_no_shared_direction_and_scale_does_not_matter():
    grads = _draws(30, 20000, 0.0)
    out = farzi_snr.coherence(grads)
    assert abs(out["cos_mean"]) < 4 * out["cos_se"] + 1e-3
    scaled = farzi_snr.coherence([g * (10.0 ** (i % 4)) for i, g in enumerate(grads)])
    assert scaled["cos_mean"] == pytest.approx(out["cos_mean"], abs=1e-12)
    assert scaled["norm_max_over_min"] > 900
    assert farzi_snr.coherence([-grads[0], grads[0]])["k_star"] == math.inf
    with pytest.raises(ValueError, match="at least 2"):
        farzi_snr.coherence(grads[:1])
