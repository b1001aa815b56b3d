"""MCT's convexified trajectories and the two gradient modes (no Ray, no MLflow)."""
import math

import pytest
import torch

from algorithms.augment import DSA, DSAConfig
from algorithms.mct import ConvexSampler, ConvexTrajectory, layer_bounds, waypoint_epochs
from algorithms.mtt import tesla_matching_backward, unrolled_matching_loss
from algorithms.networks import flatten_params, manifest_of, seeded_network

MANIFEST = [("a", (3, 4)), ("b", (5,)), ("c", (2, 2))]
P = 12 + 5 + 4


def random_walk(k=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    steps = torch.randn(k, P, generator=g) * torch.linspace(1.0, 0.2, k)[:, None]
    return torch.cat([torch.zeros(1, P), torch.cumsum(steps, 0)]) + torch.randn(P, generator=g)


def test_waypoint_epochs():
    assert waypoint_epochs(50, 2) == [0, 50]
    assert waypoint_epochs(50, 4) == [0, 17, 34, 50]  # MCT's trajectory_compression.py: K // 3 spacing
    assert waypoint_epochs(50, 3) == [0, 25, 50]
    assert waypoint_epochs(50, 5) == [0, 12, 24, 36, 50]
    assert waypoint_epochs(4, 4) == [0, 1, 2, 4]
    assert waypoint_epochs(10, 11) == list(range(11))
    with pytest.raises(ValueError):
        waypoint_epochs(10, 12)


@pytest.mark.parametrize("w", [2, 3, 4])
def test_beta_starts_at_0_ends_at_1_and_never_decreases(w):
    c = ConvexTrajectory.from_checkpoints(random_walk(), MANIFEST, num_waypoints=w)
    assert c.beta.shape == (3, 11)
    for a, b in zip(c.epochs[:-1], c.epochs[1:]):
        seg = c.beta[:, a + 1:b + 1]
        assert torch.all(seg[:, 1:] >= seg[:, :-1]) and torch.all(seg >= 0)
        torch.testing.assert_close(seg[:, -1], torch.ones(3))


def test_point_at_integer_time_is_the_formula():
    traj = random_walk()
    c = ConvexTrajectory.from_checkpoints(traj, MANIFEST, num_waypoints=2)
    t = traj.double()
    for e in [0, 3, 7, 10]:
        expected = torch.empty(P, dtype=torch.float64)
        for s, f in layer_bounds(MANIFEST):
            steps = (t[1:, s:f] - t[:-1, s:f]).norm(dim=1)
            beta = steps[:e].sum() / steps.sum()
            expected[s:f] = (1 - beta) * t[0, s:f] + beta * t[10, s:f]
        torch.testing.assert_close(c.point(e), expected.float(), rtol=1e-6, atol=1e-6)
    assert torch.equal(c.point(0), traj[0]) and torch.equal(c.point(10), traj[10])


def test_fractional_time_interpolates_beta():
    c = ConvexTrajectory.from_checkpoints(random_walk(), MANIFEST)
    torch.testing.assert_close(c.point(3.25), 0.75 * c.point(3) + 0.25 * c.point(4), rtol=1e-5, atol=1e-6)


def test_all_waypoints_reproduce_the_checkpoints_exactly():
    traj = random_walk()
    c = ConvexTrajectory.from_checkpoints(traj, MANIFEST, num_waypoints=11)
    for e in range(11):
        assert torch.equal(c.point(e), traj[e])


def test_uniform_beta_and_smoothing():
    traj = random_walk()
    u = ConvexTrajectory.from_checkpoints(traj, MANIFEST, beta="uniform")
    torch.testing.assert_close(u.point(4), 0.6 * traj[0] + 0.4 * traj[10])
    s = ConvexTrajectory.from_checkpoints(traj, MANIFEST, num_waypoints=3, smooth=True)
    torch.testing.assert_close(s.waypoints[1], (traj[4] + traj[6]) / 2)
    torch.testing.assert_close(s.waypoints[2], (traj[9] + traj[10]) / 2)
    assert torch.equal(s.waypoints[0], traj[0])


def test_continuous_sampling_draws_real_start_times():
    c = ConvexTrajectory.from_checkpoints(random_walk(), MANIFEST)
    g = torch.Generator().manual_seed(0)
    starts = [ConvexSampler([c], 3.5, 4.0).sample(g)[2]["start_epoch"] for _ in range(200)]
    assert all(0 <= s < 4 for s in starts) and len({round(s, 6) for s in starts}) == 200
    ints = [ConvexSampler([c], 3.5, 4.0, continuous=False).sample(g)[2]["start_epoch"] for _ in range(50)]
    assert set(ints) <= {0.0, 1.0, 2.0, 3.0}
    start, target, info = ConvexSampler([c], 3.5, 4.0).sample(g)
    torch.testing.assert_close(start, c.point(info["start_epoch"]))
    torch.testing.assert_close(target, c.point(info["start_epoch"] + 3.5))
    _, target, _ = ConvexSampler([c], 20.0, 4.0).sample(g)  # the target is clipped at K
    assert torch.equal(target, c.point(10))


def tiny(steps, seed=0):
    net = seeded_network({"depth": 1, "width": 4}, 1, 3, 8, seed=0)
    g = torch.Generator().manual_seed(seed)
    start = flatten_params(net)
    target = start + 0.05 * torch.randn(start.shape, generator=g)
    images = torch.randn(6, 1, 8, 8, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    dsa = DSA(DSAConfig())
    plan = [(torch.randperm(6, generator=g)[:4], dsa.sample(4, 8, g)) for _ in range(steps)]
    return net, manifest_of(net), start, target, images, labels, plan, dsa


def grads(mode, steps):
    net, man, start, target, images, labels, plan, dsa = tiny(steps)
    x = images.clone().requires_grad_(True)
    lr = torch.tensor(0.1, requires_grad=True)
    if mode == "full":
        loss = unrolled_matching_loss(net, man, start, target, x, labels, lr, plan, dsa)
        loss.backward()
    else:
        loss = tesla_matching_backward(net, man, start, target, x, labels, lr, plan, dsa)
    return loss.detach(), x.grad, lr.grad


def test_tesla_equals_full_backprop_for_one_student_step():
    lf, xf, rf = grads("full", 1)
    lt, xt, rt = grads("tesla", 1)
    torch.testing.assert_close(lt, lf)
    torch.testing.assert_close(xt, xf, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(rt, rf, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("steps,min_cos", [(5, 0.9), (20, 0.8)])
def test_tesla_is_close_to_full_backprop_for_more_steps(steps, min_cos):
    lf, xf, rf = grads("full", steps)
    lt, xt, rt = grads("tesla", steps)
    torch.testing.assert_close(lt, lf, rtol=1e-4, atol=1e-6)  # same forward pass
    cos = torch.nn.functional.cosine_similarity(xf.flatten(), xt.flatten(), dim=0).item()
    print(f"\n[tesla vs full, {steps} steps] image-gradient cosine {cos:.4f}, syn_lr grad {rt.item():.4g} vs {rf.item():.4g}")
    assert cos > min_cos
    assert math.copysign(1, rt.item()) == math.copysign(1, rf.item())
