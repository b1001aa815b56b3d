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


# -- the registry: every architecture of cross-architecture evaluation -------------------------------
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402

from algorithms.evaluate import EvalConfig, train_on_set  # noqa: E402
from algorithms.networks import (  # noqa: E402
    MODELS,
    REGISTRY,
    build_network,
    functional_embed,
    has_batchnorm,
)

# parameters at (1 channel, 28 px, 10 classes) and (3 channels, 32 px, 10 classes): those of the
# networks of DC's networks.py (MLP, LeNet, AlexNet(BN), VGG11(BN), ResNet18(BN), ConvNet(BN)),
# counted by building them
PARAMS = {
    "convnet": (317_706, 320_010), "convnet_bn": (317_706, 320_010),
    "mlp": (118_282, 411_146), "lenet": (61_706, 62_006),
    "alexnet": (1_865_802, 1_872_202), "alexnet_bn": (1_867_722, 1_874_122),
    "vgg11": (9_229_962, 9_231_114), "vgg11_bn": (9_229_962, 9_231_114),
    "resnet18": (11_172_810, 11_173_962), "resnet18_bn": (11_172_810, 11_173_962),
}
BATCHNORM = {"convnet_bn", "alexnet_bn", "vgg11_bn", "resnet18_bn"}


@pytest.fixture
def one_thread():
    """Small networks and batches: intra-op threads only add synchronisation (on a loaded 2-core
    machine two threads made this training 10-50x slower than one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_registry_names():
    assert MODELS == tuple(REGISTRY) == ("convnet", "convnet_bn", "mlp", "lenet", "alexnet", "alexnet_bn",
                                         "vgg11", "vgg11_bn", "resnet18", "resnet18_bn")
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        build_network({"name": "resnet50"}, 3, 10, 32)


@pytest.mark.parametrize("name", MODELS)
def test_every_architecture_builds_for_mnist_and_cifar(name, one_thread):
    for (channels, size), params in zip([(1, 28), (3, 32)], PARAMS[name]):
        net = build_network({"name": name}, channels, 10, size).eval()
        assert num_params(manifest_of(net)) == params, (name, channels, size)
        seen = []
        net.classifier.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
        with torch.no_grad():
            out = net(torch.randn(2, channels, size, size))
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        assert seen == [(2, net.classifier.in_features)] and net.num_feat == net.classifier.in_features
        assert has_batchnorm(net) == (name in BATCHNORM)
        assert any(isinstance(m, torch.nn.GroupNorm) for m in net.modules()) == (name in ("convnet", "vgg11",
                                                                                          "resnet18"))


@pytest.mark.parametrize("name", ["convnet", "lenet", "alexnet", "vgg11", "resnet18"])
def test_28px_is_padded_to_the_feature_sizes_of_32px(name):
    """As MTT's ConvNet: the first convolution pads a 28x28 input to 32x32, so MNIST and CIFAR
    networks have the same feature maps (the classifier sees the same number of features)."""
    a = build_network({"name": name}, 1, 10, 28)
    b = build_network({"name": name}, 1, 10, 32)
    assert a.classifier.in_features == b.classifier.in_features
    first = next(m for m in a.modules() if isinstance(m, torch.nn.Conv2d))
    first32 = next(m for m in b.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.padding[0] == first32.padding[0] + 2


def test_digit_sized_inputs_build_or_name_the_model_and_size():
    ok = {"convnet": 298_506, "convnet_bn": 298_506, "mlp": 26_122, "alexnet": 1_837_002, "alexnet_bn": 1_838_922}
    for name in MODELS:
        if name in ok:
            net = build_network({"name": name}, 1, 10, 8).eval()
            assert num_params(manifest_of(net)) == ok[name]
            assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)
        else:
            with pytest.raises(ValueError, match=rf"^{name} cannot take 8x8 inputs: .* needs at least \d+x\d+ px"):
                build_network({"name": name}, 1, 10, 8)
    # the smallest sizes they take
    for name, size in [("lenet", 16), ("resnet18", 9), ("resnet18_bn", 9), ("vgg11", 32)]:
        build_network({"name": name}, 1, 10, size)
        with pytest.raises(ValueError, match=f"{name} cannot take {size - 1}x{size - 1}"):
            build_network({"name": name}, 1, 10, size - 1)


def test_convnet_keys_are_ignored_by_the_other_architectures():
    convnet_keys = {"width": 128, "depth": 3, "norm": "instancenorm", "pooling": "avgpooling"}
    a = build_network({"name": "vgg11", "width_mult": 0.25, **convnet_keys}, 3, 10, 32)
    b = build_network({"name": "vgg11", "width_mult": 0.25}, 3, 10, 32)
    assert manifest_of(a) == manifest_of(b)
    assert num_params(manifest_of(b)) == 579_786  # a quarter of the widths: about 1/16 of the parameters
    with pytest.raises(ValueError, match="model 'mlp' takes no option 'act'"):
        build_network({"name": "mlp", "act": "relu"}, 1, 10, 28)
    for bad in (0, -1, "wide", True):
        with pytest.raises(ValueError, match="width_mult must be a positive number"):
            build_network({"name": "resnet18", "width_mult": bad}, 3, 10, 32)
    with pytest.raises(TypeError):  # the ConvNet stays strict
        build_network({"name": "convnet", "width_mult": 0.5}, 3, 10, 32)


def test_convnet_bn_is_the_convnet_layout_with_batchnorm():
    """convnet_bn: BatchNorm whatever norm the spec gives, and the ConvNet's parameter layout
    (stored trajectories depend on it: conv, norm, conv, norm, ..., classifier)."""
    plain = build_network({"name": "convnet"}, 3, 10, 32)
    bn = build_network({"name": "convnet_bn", "norm": "instancenorm"}, 3, 10, 32)
    expected = [("features.0.weight", (128, 3, 3, 3)), ("features.0.bias", (128,)), ("features.1.weight", (128,)),
                ("features.1.bias", (128,)), ("features.4.weight", (128, 128, 3, 3)), ("features.4.bias", (128,)),
                ("features.5.weight", (128,)), ("features.5.bias", (128,)), ("features.8.weight", (128, 128, 3, 3)),
                ("features.8.bias", (128,)), ("features.9.weight", (128,)), ("features.9.bias", (128,)),
                ("classifier.weight", (10, 2048)), ("classifier.bias", (10,))]
    assert manifest_of(plain) == manifest_of(bn) == expected
    assert [type(m).__name__ for m in bn.features if "Norm" in type(m).__name__] == ["BatchNorm2d"] * 3
    assert ConvNet(ConvNetConfig(3, 10, 32, norm="batchnorm")).features[1].__class__ is torch.nn.BatchNorm2d


@pytest.mark.parametrize("name", MODELS)
def test_seeded_init_and_flat_view_of_every_architecture(name, one_thread):
    spec = {"name": name} if name.startswith("convnet") else {"name": name, "width_mult": 0.125}
    size = 32 if name.startswith("vgg") else 16
    a, b = (seeded_network(spec, 3, 10, size, seed=4) for _ in range(2))
    c = seeded_network(spec, 3, 10, size, seed=5)
    assert torch.equal(flatten_params(a), flatten_params(b))
    assert not torch.equal(flatten_params(a), flatten_params(c))
    x = torch.randn(4, 3, size, size)
    if name in BATCHNORM:  # flat parameters leave BatchNorm's statistics out: refused, not wrong
        for call in (functional_forward, functional_embed):
            with pytest.raises(ValueError, match="BatchNorm"):
                call(a, flatten_params(a), x)
        with pytest.raises(ValueError, match="BatchNorm"):
            accuracy(a, x, torch.zeros(4, dtype=torch.int64), flat=flatten_params(a))
    else:
        torch.testing.assert_close(functional_forward(a, flatten_params(a), x), a(x), rtol=0, atol=0)
        torch.testing.assert_close(functional_embed(a, flatten_params(a), x), a.embed(x), rtol=0, atol=0)


# -- digits: every architecture learns ----------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    """sklearn's 8x8 digits as the project's ``digits`` dataset: the stratified 80/20 split
    (random_state 0), pixels / 16 normalised by the train split's mean and std."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(raw.data.reshape(-1, 1, 8, 8), raw.target, test_size=0.2,
                                              random_state=0, stratify=raw.target)

    def images(x):
        return torch.from_numpy(((x.astype(np.float32) / 16 - 0.305383) / 0.376119).astype(np.float32))

    return images(x_tr), torch.from_numpy(y_tr), images(x_te), torch.from_numpy(y_te)


def upsampled(x, size):
    return x if size == 8 else F.interpolate(x, size=(size, size), mode="nearest")


# name -> (spec options, input size, epochs, lr, training images): the digits at the smallest size
# each takes (8 px, else upsampled), small widths for the large networks
DIGITS_RUNS = {
    "convnet": ({"width": 16, "depth": 2}, 8, 10, 0.01, 1437),
    "convnet_bn": ({"width": 16, "depth": 2}, 8, 10, 0.01, 1437),
    "mlp": ({}, 8, 10, 0.01, 1437),
    "lenet": ({}, 16, 10, 0.05, 1437),
    "alexnet": ({"width_mult": 0.125}, 8, 20, 0.05, 1437),  # no normalisation: slower to start
    "alexnet_bn": ({"width_mult": 0.125}, 8, 10, 0.01, 1437),
    "vgg11": ({"width_mult": 0.125}, 32, 6, 0.01, 600),
    "vgg11_bn": ({"width_mult": 0.125}, 32, 6, 0.01, 600),
    "resnet18": ({"width_mult": 0.125}, 16, 6, 0.01, 600),
    "resnet18_bn": ({"width_mult": 0.125}, 16, 6, 0.01, 600),
}


@pytest.mark.parametrize("name", MODELS)
def test_every_architecture_learns_digits(name, digits, one_thread):
    """evaluate.train_on_set (SGD, momentum 0.9, no DSA) on the digits: well above chance (10%)."""
    assert set(DIGITS_RUNS) == set(MODELS)
    opts, size, epochs, lr, n = DIGITS_RUNS[name]
    x_tr, y_tr, x_te, y_te = digits
    info = SimpleNamespace(channels=1, num_classes=10, size=size)
    start = time.perf_counter()
    acc = train_on_set({"name": name, **opts}, info, upsampled(x_tr[:n], size), y_tr[:n], lr,
                       upsampled(x_te, size), y_te, EvalConfig(networks=1, epochs=epochs, batch_size=64, dsa=False),
                       seed=0)
    print(f"\n[digits] {name} at {size} px: {100 * acc:.1f}% in {time.perf_counter() - start:.1f}s")
    assert acc > 0.5


# -- BatchNorm: trained in train mode, tested in eval mode --------------------------------------------
@pytest.mark.parametrize("name", sorted(BATCHNORM))
def test_batchnorm_evaluation_is_independent_of_the_batch(name, digits, one_thread):
    x_tr, y_tr, x_te, y_te = digits
    size = 32 if name == "vgg11_bn" else 16
    spec = {"name": name, "width": 16, "depth": 2} if name == "convnet_bn" else {"name": name, "width_mult": 0.125}
    net = seeded_network(spec, 1, 10, size, seed=0)
    x_tr, x_te = upsampled(x_tr[:256], size), upsampled(x_te, size)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    for i in range(0, 256, 32):
        loss = F.cross_entropy(net(x_tr[i : i + 32]), y_tr[i : i + 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 8
    running = [b.clone() for b in net.buffers()]
    # accuracy: eval mode (running statistics), so the batch size does not matter; mode restored
    one, all_ = accuracy(net, x_te, y_te, batch_size=1), accuracy(net, x_te, y_te, batch_size=1024)
    assert one == all_ and net.training
    assert all(torch.equal(a, b) for a, b in zip(running, net.buffers()))  # testing changed no statistic
    net.eval()
    with torch.no_grad():
        whole = net(x_te[:64])
        alone = torch.cat([net(x_te[i : i + 1]) for i in range(64)])
        torch.testing.assert_close(alone, whole, rtol=1e-4, atol=1e-4)
        net.train()  # in train mode the same image's output depends on its batch: the check above means something
        assert (net(x_te[:64])[:8] - net(x_te[:8])).abs().max() > 1e-3


def test_train_on_set_trains_in_train_mode_and_tests_in_eval_mode(monkeypatch, digits, one_thread):
    import algorithms.evaluate as ev

    seen = {}
    real = ev.accuracy

    def spy(net, x, y, **kw):
        seen["training_before"] = net.training
        seen["batches_tracked"] = [int(m.num_batches_tracked) for m in net.modules()
                                   if isinstance(m, torch.nn.BatchNorm2d)]
        modes = []
        hook = net.register_forward_pre_hook(lambda m, a: modes.append(m.training))
        try:
            out = real(net, x, y, **kw)
        finally:
            hook.remove()
        seen["modes"], seen["training_after"] = modes, net.training
        return out

    monkeypatch.setattr(ev, "accuracy", spy)
    x_tr, y_tr, x_te, y_te = digits
    info = SimpleNamespace(channels=1, num_classes=10, size=8)
    acc = ev.train_on_set({"name": "convnet_bn", "width": 8, "depth": 2}, info, x_tr[:100], y_tr[:100], 0.01,
                          x_te, y_te, EvalConfig(networks=1, epochs=2, batch_size=50, dsa=False), seed=0)
    assert 0 <= acc <= 1
    assert seen["training_before"] and seen["training_after"]
    assert seen["batches_tracked"] == [4, 4]  # 2 epochs of 2 batches, in train mode
    assert seen["modes"] and not any(seen["modes"])  # every test forward in eval mode
