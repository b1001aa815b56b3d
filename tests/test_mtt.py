"""MTT's gradient, state and failure behaviour on tiny problems (no Ray, no MLflow)."""
import pytest
import torch

from algorithms.augment import DSA, DSAConfig
from algorithms.base import DivergenceError
from algorithms.mtt import EpochSampler, MTTConfig, MTTDistiller, unrolled_matching_loss
from algorithms.networks import flatten_params, manifest_of, seeded_network


def tiny_problem(dtype=torch.float64):
    net = seeded_network({"depth": 1, "width": 4}, 1, 3, 8, seed=0).to(dtype)
    g = torch.Generator().manual_seed(0)
    start = flatten_params(net).to(dtype)
    target = start + 0.05 * torch.randn(start.shape, generator=g, dtype=dtype)
    images = torch.randn(6, 1, 8, 8, generator=g, dtype=dtype)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    return net, start, target, images, labels


@pytest.mark.parametrize("augmented", [False, True])
def test_unrolled_gradient_matches_finite_differences(augmented):
    net, start, target, images, labels = tiny_problem()
    man = manifest_of(net)
    dsa = DSA(DSAConfig(strategy="color_crop_flip_scale_rotate")) if augmented else None
    g = torch.Generator().manual_seed(1)
    plan = [(torch.tensor([0, 2, 4]), dsa.sample(3, 8, g) if dsa else None),
            (torch.tensor([1, 3, 5]), dsa.sample(3, 8, g) if dsa else None),
            (torch.arange(6), dsa.sample(6, 8, g) if dsa else None)]
    x = images.clone().requires_grad_(True)
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)

    def loss(xv, lrv):
        return unrolled_matching_loss(net, man, start, target, xv, labels, lrv, plan, dsa)

    gx, glr = torch.autograd.grad(loss(x, lr), [x, lr])
    eps = 1e-6
    fd_lr = (loss(images, lr.detach() + eps) - loss(images, lr.detach() - eps)).detach() / (2 * eps)
    torch.testing.assert_close(glr, fd_lr, rtol=1e-5, atol=1e-9)
    direction = torch.randn(images.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    fd_x = (loss(images + eps * direction, lr) - loss(images - eps * direction, lr)).detach() / (2 * eps)
    torch.testing.assert_close((gx * direction).sum(), fd_x, rtol=1e-5, atol=1e-9)


def make_distiller(trajectories, seed=0, **kw):
    net = seeded_network({"depth": 1, "width": 4}, 1, 3, 8, seed=0)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(30, 1, 8, 8, generator=g)
    y = torch.arange(3).repeat_interleave(10)
    cfg = MTTConfig(ipc=2, syn_steps=3, expert_epochs=1, max_start_epoch=2, lr_img=10, lr_lr=1e-5, **kw)
    return MTTDistiller(net, EpochSampler(trajectories, 1, 2), x, y, 3, cfg, seed=seed)


def fake_trajectories():
    net = seeded_network({"depth": 1, "width": 4}, 1, 3, 8, seed=0)
    g = torch.Generator().manual_seed(3)
    p0 = flatten_params(net)
    return [torch.stack([p0 + 0.02 * k * torch.randn(p0.shape, generator=g) for k in range(4)]) for _ in range(2)]


def test_initialised_from_real_images_of_each_class():
    d = make_distiller(fake_trajectories())
    syn = d.synthetic()
    assert syn.labels.tolist() == [0, 0, 1, 1, 2, 2] and syn.lr == pytest.approx(0.01)
    g = torch.Generator().manual_seed(5)
    real = torch.randn(30, 1, 8, 8, generator=g)
    for img, lab in zip(syn.images, syn.labels):  # every image is a real one of its class
        assert any(torch.equal(img, r) for r in real[lab * 10:(lab + 1) * 10])


def test_state_dict_resumes_exactly():
    trajs = fake_trajectories()
    a = make_distiller(trajs, batch_syn=4)
    for _ in range(3):
        a.step()
    state = a.state_dict()
    b = make_distiller(trajs, seed=99, batch_syn=4)
    b.load_state_dict(state)
    steps = []
    for _ in range(2):
        ma, mb = a.step(), b.step()
        assert ma == mb
        steps.append(mb)
    assert torch.equal(a.synthetic().images, b.synthetic().images) and a.iteration == b.iteration == 5
    # the state dict is not aliased by the distiller it was loaded into: a second restore from the
    # same in-memory state makes the same steps again (torch keeps the loaded momentum tensors)
    c = make_distiller(trajs, seed=98, batch_syn=4)
    c.load_state_dict(state)
    assert [c.step() for _ in range(2)] == steps


def test_nan_stops_with_a_clear_reason():
    trajs = fake_trajectories()
    trajs[0][1:] = float("nan")
    trajs[1][1:] = float("nan")
    d = make_distiller(trajs)
    with pytest.raises(DivergenceError, match="matching loss is .*nan.* at iteration 0"):
        d.step()


def test_sampler_refuses_windows_beyond_the_experts():
    with pytest.raises(ValueError, match=r"max_start_epoch \(3\) - 1 \+ expert_epochs \(2\) = 4 .* experts' 3 epochs"):
        EpochSampler(fake_trajectories(), expert_epochs=2, max_start_epoch=3)


def test_sampler_window_reaches_the_last_checkpoint():
    """Experts of 2 epochs have checkpoints 0, 1, 2: start 0 and target 2 fit max_start_epoch 1,
    expert_epochs 2 (MTT's rule: start in [0, max_start_epoch), target = start + expert_epochs)."""
    trajs = [t[:3] for t in fake_trajectories()]  # 2 epochs: checkpoints 0, 1, 2
    sampler = EpochSampler(trajs, expert_epochs=2, max_start_epoch=1)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        start, target, info = sampler.sample(g)
        assert info["start_epoch"] == 0
        assert torch.equal(start, trajs[info["expert"]][0]) and torch.equal(target, trajs[info["expert"]][2])
    four = fake_trajectories()  # 3 epochs: starts 0 and 1 both reach a checkpoint with expert_epochs 2
    seen = {EpochSampler(four, 2, 2).sample(g)[2]["start_epoch"] for _ in range(40)}
    assert seen == {0, 1}
    with pytest.raises(ValueError, match="experts' 2 epochs"):
        EpochSampler(trajs, expert_epochs=2, max_start_epoch=2)
    with pytest.raises(ValueError, match="experts' 2 epochs"):
        EpochSampler(trajs, expert_epochs=3, max_start_epoch=1)
