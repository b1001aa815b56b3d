"""DC, DSA and DM (algorithms/dc.py, algorithms/dm.py): the gradient distance, configs, exact
resumption on tiny problems, and (slow) quality on digits against a random real subset."""
import math
import time

import pytest
import torch

from algorithms.augment import DSAConfig
from algorithms.base import DivergenceError
from algorithms.dc import (EVAL_LR, DCConfig, DCDistiller, broadcast_sample, gradient_distance, loops_for,
                           siamese_augment, siamese_sample)
from algorithms.dm import (GPU_FORWARD_PIXELS, DMConfig, DMDistiller, augment_by_class, class_groups,
                          default_forward_images, mean_embedding_distance)
from algorithms.networks import flatten_params, fresh_params, functional_embed, seeded_network

TINY_MODEL = {"depth": 1, "width": 4}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are small: one thread, not conftest's two, which crawl on a busy machine
    (module scope, so that it is also in force for the module's other fixtures)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the gradient distance -------------------------------------------------------------------------
def _one_minus_cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return 1 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)) + 1e-6)


def test_gradient_distance_by_hand():
    lin_s, lin_r = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 0.0], [0.0, -1.0]])
    conv_s = torch.tensor([1.0, 1.0, 1.0, 0.0]).view(2, 1, 1, 2)  # rows [1, 1] and [1, 0]
    conv_r = torch.tensor([1.0, -1.0, 2.0, 2.0]).view(2, 1, 1, 2)  # rows [1, -1] and [2, 2]
    bias_s, bias_r = torch.tensor([1.0, 2.0]), torch.tensor([-5.0, 3.0])
    expected = (_one_minus_cos([1, 0], [3, 0]) + _one_minus_cos([0, 2], [0, -1])  # 0 + 2
                + _one_minus_cos([1, 1], [1, -1]) + _one_minus_cos([1, 0], [2, 2]))  # 1 + (1 - 1/√2)
    assert expected == pytest.approx(4 - 1 / math.sqrt(2), abs=1e-5)
    got = gradient_distance([lin_s, bias_s, conv_s], [lin_r, bias_r, conv_r])
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # biases (1-D tensors) count nothing, however different
    assert gradient_distance([bias_s], [bias_r]).item() == 0.0
    assert gradient_distance([lin_s, bias_s], [lin_r, -bias_r]).item() == pytest.approx(
        gradient_distance([lin_s], [lin_r]).item())


def test_gradient_distance_of_identical_gradients_is_zero_and_scale_free():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, generator=g), torch.randn(10, 36, generator=g)]
    assert gradient_distance(grads, [t.clone() for t in grads]).item() == pytest.approx(0.0, abs=1e-5)
    scaled = [3 * grads[0], -grads[1], 0.5 * grads[2]]  # positive row scales and any bias: still 0
    assert gradient_distance(scaled, grads).item() == pytest.approx(0.0, abs=1e-5)
    assert gradient_distance([-grads[2]], [grads[2]]).item() == pytest.approx(2 * 10, rel=1e-5)  # opposite: 2 a row


# -- configs -----------------------------------------------------------------------------------------
def test_loops_for_the_authors_budgets():
    assert loops_for(1) == (1, 1) and loops_for(10) == (10, 50) and loops_for(50) == (50, 10)
    assert loops_for(20) == (20, 25)
    with pytest.raises(ValueError, match="ipc"):
        loops_for(7)
    assert DCConfig(ipc=10).loops() == (10, 50)
    assert DCConfig(ipc=10, inner_loop=5).loops() == (10, 5)
    assert DCConfig(ipc=7, outer_loop=3, inner_loop=0).loops() == (3, 0)


@pytest.mark.parametrize("cls,field,value", [
    (DCConfig, "ipc", 0), (DCConfig, "lr_img", -0.1), (DCConfig, "lr_img", float("nan")),
    (DCConfig, "momentum", 1.0), (DCConfig, "batch_real", 0), (DCConfig, "batch_train", 2.5),
    (DCConfig, "lr_net", 0), (DCConfig, "outer_loop", 0), (DCConfig, "inner_loop", -1),
    (DCConfig, "pix_init", "zeros"), (DCConfig, "dsa", "yes"),
    (DMConfig, "ipc", -1), (DMConfig, "lr_img", 0.0), (DMConfig, "momentum", -0.5), (DMConfig, "batch_real", 0),
    (DMConfig, "pix_init", "uniform"), (DMConfig, "dsa", 1),
])
def test_bad_config_value_names_the_field(cls, field, value):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field}"):
        cls(ipc=1, **{field: value}) if field != "ipc" else cls(ipc=value)


def test_ipc_without_default_loops_asks_for_them():
    with pytest.raises(ValueError, match=r"DCConfig\.outer_loop/inner_loop.*not 7"):
        DCConfig(ipc=7)
    assert DCConfig(ipc=7, outer_loop=2, inner_loop=3).to_dict()["inner_loop"] == 3


# -- networks and augmentation helpers -----------------------------------------------------------
def test_fresh_params_is_the_seeded_initialisation():
    net = seeded_network(TINY_MODEL, 1, 3, 8, seed=0)
    for seed in (1, 2):
        assert torch.equal(fresh_params(net, seed), flatten_params(seeded_network(TINY_MODEL, 1, 3, 8, seed=seed)))
    assert torch.equal(flatten_params(net), flatten_params(seeded_network(TINY_MODEL, 1, 3, 8, seed=0)))  # untouched


def test_functional_embed_is_the_classifier_input():
    net = seeded_network(TINY_MODEL, 1, 3, 8, seed=0)
    flat = fresh_params(net, 5)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    other = seeded_network(TINY_MODEL, 1, 3, 8, seed=5)
    torch.testing.assert_close(functional_embed(net, flat, x), other.embed(x))
    torch.testing.assert_close(other.classifier(functional_embed(net, flat, x)), other(x))


@pytest.mark.parametrize("family", ["color", "crop", "cutout", "flip", "scale", "rotate"])
def test_siamese_sample_transforms_real_and_synthetic_batches_alike(family):
    """One parameter set for both batches and all their images: an image gets the same output in
    a batch of 5 and in a batch of 2 (the authors' Siamese mode), whatever the config's batchmode."""
    aug = siamese_augment(DSAConfig(strategy=family, batchmode=False))
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        s = siamese_sample(aug, 8, g)
        real, syn = aug.apply(x, broadcast_sample(s, 5)), aug.apply(x[[3, 0]], broadcast_sample(s, 2))
        torch.testing.assert_close(syn, real[[3, 0]])
        if family != "color":  # a geometric transformation moves a constant image identically
            ones = aug.apply(torch.ones(5, 1, 8, 8), broadcast_sample(s, 5))
            assert torch.equal(ones, ones[:1].expand_as(ones))


# -- distillers on a tiny problem ----------------------------------------------------------------
def tiny_data():
    g = torch.Generator().manual_seed(5)
    return torch.randn(30, 1, 8, 8, generator=g), torch.arange(3).repeat_interleave(10)


def make(kind: str, seed: int = 0, **kw):
    net = seeded_network(TINY_MODEL, 1, 3, 8, seed=0)
    x, y = tiny_data()
    if kind == "dm":
        return DMDistiller(net, x, y, 3, DMConfig(ipc=2, batch_real=4, **kw), seed=seed)
    cfg = DCConfig(ipc=2, dsa=kind == "dsa", outer_loop=2, inner_loop=2, batch_real=4, batch_train=4, **kw)
    return DCDistiller(net, x, y, 3, cfg, seed=seed)


@pytest.mark.parametrize("kind", ["dc", "dsa", "dm"])
def test_state_dict_resumes_exactly(kind):
    a = make(kind)
    for _ in range(2):
        a.step()
    state = a.state_dict()
    b = make(kind, seed=99)
    b.load_state_dict(state)
    assert b.iteration == 2
    steps = []
    for _ in range(2):
        ma, mb = a.step(), b.step()
        assert ma == mb
        assert torch.equal(a.images, b.images)
        steps.append((ma, a.images.detach().clone()))
    assert torch.equal(a.synthetic().images, b.synthetic().images) and a.iteration == b.iteration == 4
    c = make(kind, seed=98)  # the state dict is a snapshot: later steps of `a` and `b` did not change it
    c.load_state_dict(state)
    assert c.step() == steps[0][0] and torch.equal(c.images, steps[0][1])


@pytest.mark.parametrize("kind", ["dc", "dsa", "dm"])
def test_step_moves_every_image_and_keeps_the_fixed_lr(kind):
    d = make(kind)
    before = d.synthetic()
    assert before.labels.tolist() == [0, 0, 1, 1, 2, 2] and before.lr == EVAL_LR == 0.01
    x, y = tiny_data()
    for img, lab in zip(before.images, before.labels):  # initialised from real images of the class
        assert any(torch.equal(img, r) for r in x[y == lab])
    metrics = d.step()
    assert set(metrics) >= {"loss"} and all(math.isfinite(v) for v in metrics.values())
    after = d.synthetic()
    assert after.lr == 0.01
    assert all(not torch.equal(p, q) for p, q in zip(before.images, after.images))


def test_dc_matches_at_every_outer_loop_and_trains_between():
    """With outer_loop 3 the images take 3 SGD steps per iteration; the second and third matchings
    happen on the network trained on the synthetic set (a different loss than a fresh net's)."""
    net = seeded_network(TINY_MODEL, 1, 3, 8, seed=0)
    x, y = tiny_data()
    d = DCDistiller(net, x, y, 3, DCConfig(ipc=2, outer_loop=3, inner_loop=1, batch_real=4), seed=0)
    m = d.step()
    assert d.opt_img.state[d.images]["momentum_buffer"] is not None
    assert m["loss"] != m["loss_first"]
    d1 = DCDistiller(net, x, y, 3, DCConfig(ipc=2, outer_loop=1, inner_loop=1, batch_real=4), seed=0)
    assert d1.step()["loss"] == pytest.approx(m["loss_first"])  # same fresh network, same first matching


@pytest.mark.parametrize("kind", ["dc", "dm"])
def test_nan_stops_with_a_clear_reason(kind):
    d = make(kind)
    with torch.no_grad():
        d.images[0] = float("nan")
    with pytest.raises(DivergenceError, match="loss is .*nan.* at iteration 0"):
        d.step()


def test_class_groups_fill_up_to_the_limit_in_class_order():
    assert class_groups([4, 4, 4], 0) == [range(0, 1), range(1, 2), range(2, 3)]  # 0: a class a forward
    assert class_groups([4, 4, 4], 8) == [range(0, 2), range(2, 3)]
    assert class_groups([4, 4, 4], 100) == [range(0, 3)]
    assert class_groups([9, 2, 2, 9], 5) == [range(0, 1), range(1, 3), range(3, 4)]  # a larger class alone
    assert default_forward_images(torch.device("cpu"), 28 * 28) == 0
    assert default_forward_images(torch.device("cuda"), 28 * 28) == GPU_FORWARD_PIXELS // 784 > 10 * 256


@pytest.mark.parametrize("strategy", ["color_crop_cutout_scale_rotate", "crop_flip"])
def test_augment_by_class_is_each_class_augmented_alone(strategy):
    """One apply over the classes that drew the same families, with per-row parameters, gives what
    each class's sample gives its own block (rows independent), and gradients flow alike."""
    aug = siamese_augment(DSAConfig(strategy=strategy))
    g = torch.Generator().manual_seed(3)
    sizes = [5, 3, 5, 1, 4, 5]
    x = torch.randn(sum(sizes), 1, 8, 8, generator=g, requires_grad=True)
    samples = [siamese_sample(aug, 8, g) for _ in sizes]
    assert len({s.families for s in samples}) > 1  # several family groups are exercised
    alone = torch.cat([aug.apply(b, broadcast_sample(s, len(b))) for b, s in zip(x.split(sizes), samples)])
    together = augment_by_class(aug, x, samples, sizes)
    assert torch.allclose(together, alone, atol=1e-6)
    w = torch.randn(alone.shape, generator=g)
    grad_alone, = torch.autograd.grad((alone * w).sum(), x)
    grad_together, = torch.autograd.grad((together * w).sum(), x)
    assert torch.allclose(grad_together, grad_alone, atol=1e-6) and grad_alone.abs().sum() > 0


@pytest.mark.parametrize("dsa", [True, False])
def test_dm_classes_embedded_together_step_like_one_by_one(dsa):
    """forward_images groups classes into one forward (a GPU's default) without changing the
    algorithm: the same draws in the same order, the same loss and images to rounding, the same
    generator state, whatever the grouping; a class with fewer real images than batch_real too."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 1, 8, 8, generator=g)
    y = torch.cat([torch.zeros(12), torch.ones(3), torch.full((13,), 2), torch.full((12,), 3)]).long()
    runs = {}
    for limit in (0, 8, 10 ** 6):  # one class a forward; groups of two; all classes at once
        net = seeded_network(TINY_MODEL, 1, 4, 8, seed=0)
        d = DMDistiller(net, x, y, 4, DMConfig(ipc=2, batch_real=6, dsa=dsa), seed=7, forward_images=limit)
        runs[limit] = ([d.step()["loss"] for _ in range(4)], d.images.detach().clone(), d.gen.get_state())
    base_losses, base_images, base_gen = runs[0]
    for limit in (8, 10 ** 6):
        losses, images, gen = runs[limit]
        assert losses == pytest.approx(base_losses, rel=1e-5)
        assert torch.allclose(images, base_images, atol=1e-5)
        assert torch.equal(gen, base_gen)
    # and the steps do move the images, by far more than the groupings differ
    start = DMDistiller(seeded_network(TINY_MODEL, 1, 4, 8, seed=0), x, y, 4, DMConfig(ipc=2, batch_real=6, dsa=dsa),
                        seed=7).images.detach()
    assert (base_images - start).abs().max() > 1e3 * (runs[10 ** 6][1] - base_images).abs().max()


def test_noise_init_and_mean_embedding_distance():
    d = make("dm", pix_init="noise")
    x, _ = tiny_data()
    assert not any(torch.equal(img, r) for img in d.images.detach() for r in x)
    a, b = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0]])
    assert mean_embedding_distance(a, b).item() == pytest.approx(2.0 ** 2 + 3.0 ** 2)


# -- quality on digits (slow) ------------------------------------------------------------------------
# Same model, seeds and evaluation networks as tests/test_quality.py's MTT test at IPC 1: the
# random subset of seed 1 evaluated with the experts' lr, the distilled sets with their fixed
# lr 0.01, both by EVAL (3 networks, 300 epochs, DSA) from seed 7.
@pytest.fixture(scope="module")
def digits_random_ipc1():
    from algorithms.evaluate import evaluate_set, random_real_subset
    from orchestrator.datasets import load_dataset
    from tests.test_quality import EVAL, MODEL, QUICKSTART

    data = load_dataset("digits")
    xr, yr = random_real_subset(data.x_train, data.y_train, 1, 10, torch.Generator().manual_seed(1))
    random = evaluate_set(MODEL, data.info, xr, yr, QUICKSTART.experts["lr"], data.x_test, data.y_test, EVAL, seed=7)
    return data, random


@pytest.mark.slow
@pytest.mark.parametrize("kind,iterations", [("dc", 60), ("dsa", 60), ("dm", 100)])
def test_baseline_beats_random_subset_on_digits(digits_random_ipc1, kind, iterations, capsys):
    from algorithms.evaluate import evaluate_set
    from tests.test_quality import EVAL, MODEL

    data, random = digits_random_ipc1
    t0 = time.perf_counter()
    net = seeded_network(MODEL, 1, 10, 8, seed=0)
    ipc = 1
    if kind == "dm":
        distiller = DMDistiller(net, data.x_train, data.y_train, 10, DMConfig(ipc=ipc), seed=ipc)
    else:
        distiller = DCDistiller(net, data.x_train, data.y_train, 10, DCConfig(ipc=ipc, dsa=kind == "dsa"), seed=ipc)
    losses = [distiller.step()["loss"] for _ in range(iterations)]
    t_distil = time.perf_counter() - t0
    syn = distiller.synthetic()
    assert syn.lr == 0.01
    distilled = evaluate_set(MODEL, data.info, syn.images, syn.labels, syn.lr, data.x_test, data.y_test, EVAL, seed=7)
    with capsys.disabled():
        print(f"\n[digits IPC 1] {kind.upper()} {100 * distilled.mean:.1f} ± {100 * distilled.std:.1f}  "
              f"random {100 * random.mean:.1f} ± {100 * random.std:.1f}  loss {sum(losses[:10]) / 10:.3f} -> "
              f"{sum(losses[-10:]) / 10:.3f}  ({iterations} iterations {t_distil:.1f} s, "
              f"with evaluation {time.perf_counter() - t0:.1f} s)")
    assert distilled.mean >= random.mean + 0.10
    assert sum(losses[-10:]) < sum(losses[:10])  # the matching loss went down
