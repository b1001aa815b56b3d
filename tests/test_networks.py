import pytest
import torch
import torch.nn.functional as F

from algorithms.networks import (
    ConvNet,
    ConvNetConfig,
    accuracy,
    flatten_params,
    functional_forward,
    load_flat,
    manifest_of,
    num_params,
    seeded_network,
    unflatten,
)


@pytest.mark.parametrize("channels,size,depth,feat", [(1, 8, 2, 2 * 2), (1, 8, 3, 1), (1, 28, 3, 4 * 4),
                                                      (3, 32, 3, 4 * 4)])
def test_convnet_shapes(channels, size, depth, feat):
    net = ConvNet(ConvNetConfig(channels=channels, num_classes=10, im_size=size, width=16, depth=depth))
    out = net(torch.randn(5, channels, size, size))
    assert out.shape == (5, 10)
    assert net.num_feat == 16 * feat  # no global pooling: the classifier sees the whole map
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == depth and all(m.num_groups == m.num_channels == 16 for m in norms)


def test_mtt_cifar_convnet_has_reference_parameter_count():
    net = ConvNet(ConvNetConfig(channels=3, num_classes=10, im_size=32))
    assert num_params(manifest_of(net)) == 320_010  # ConvNet-3 on CIFAR-10 in the MTT paper


def test_depth_too_large_for_input():
    with pytest.raises(ValueError, match="below 1x1"):
        ConvNet(ConvNetConfig(channels=1, num_classes=10, im_size=8, depth=4))


def test_functional_forward_equals_module_and_differentiates_flat_vector():
    net = seeded_network({"depth": 2, "width": 8}, 1, 10, 8, seed=3)
    x = torch.randn(4, 1, 8, 8)
    flat = flatten_params(net).requires_grad_(True)
    out = functional_forward(net, flat, x)
    torch.testing.assert_close(out, net(x), rtol=0, atol=0)
    F.cross_entropy(out, torch.arange(4)).backward()
    ref = torch.autograd.grad(F.cross_entropy(net(x), torch.arange(4)), list(net.parameters()))
    torch.testing.assert_close(flat.grad, torch.cat([g.reshape(-1) for g in ref]))


def test_flat_round_trip_and_seeded_init():
    a = seeded_network({"depth": 2, "width": 8}, 1, 10, 8, seed=1)
    b = seeded_network({"depth": 2, "width": 8}, 1, 10, 8, seed=1)
    c = seeded_network({"depth": 2, "width": 8}, 1, 10, 8, seed=2)
    assert torch.equal(flatten_params(a), flatten_params(b))
    assert not torch.equal(flatten_params(a), flatten_params(c))
    load_flat(c, flatten_params(a))
    assert torch.equal(flatten_params(c), flatten_params(a))
    views = unflatten(flatten_params(a), manifest_of(a))
    assert [tuple(v.shape) for v in views.values()] == [s for _, s in manifest_of(a)]
    with pytest.raises(ValueError):
        unflatten(torch.zeros(3), manifest_of(a))


def test_accuracy_from_flat_matches_module():
    net = seeded_network({"depth": 2, "width": 8}, 1, 10, 8, seed=0)
    x, y = torch.randn(50, 1, 8, 8), torch.randint(0, 10, (50,))
    assert accuracy(net, x, y) == accuracy(net, x, y, flat=flatten_params(net))
