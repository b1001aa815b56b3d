"""MCT: Matching Convexified Trajectory (Zhong et al. 2024).

An expert's SGD trajectory θ_0 … θ_K is replaced by a convex path between waypoints. For a
parameter tensor l and a segment between waypoints a < b, the progress coefficient is the
cumulative fraction of that tensor's path length,

    β_l(t) = Σ_{a ≤ p < t} ‖θ_{p+1,l} − θ_{p,l}‖ / Σ_{a ≤ p < b} ‖θ_{p+1,l} − θ_{p,l}‖,

and the point at time t is (1 − β_l(t))·θ̂_a,l + β_l(t)·θ̂_b,l; a fractional t interpolates β
linearly between ⌊t⌋ and ⌈t⌉. Two waypoints (0 and K) give the pure form; the released MCT
code uses four. With ``smooth``, interior waypoints are replaced by the mean of their
neighbouring checkpoints and the last one by the mean of the last two (β is still computed on
the raw trajectory). ``beta="uniform"`` is the ablation β = (t − a)/(b − a).

Only the waypoints and the β table are kept, so a 51-checkpoint expert shrinks about 25× with
two waypoints. Start points are sampled continuously along the path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .base import at_least, hp, one_of, positive
from .mtt import MTTConfig
from .networks import Manifest


def waypoint_epochs(num_epochs: int, num_waypoints: int) -> list[int]:
    """Waypoint epochs from 0 to ``num_epochs``, spaced as the released MCT code spaces them
    (``exps/trajectory_compression.py``): every (K+1)//(W−1) epochs, then K. For K = 50 and four
    waypoints that is 0, 17, 34, 50. (The released code adds extra waypoints when that spacing
    does not reach K in W−1 steps, e.g. five on a 4-epoch expert; here there are always W.)"""
    if not 2 <= num_waypoints <= num_epochs + 1:
        raise ValueError(f"waypoints must be between 2 and epochs + 1 = {num_epochs + 1}, got {num_waypoints}")
    step = (num_epochs + 1) // (num_waypoints - 1)
    return [i * step for i in range(num_waypoints - 1)] + [num_epochs]


def layer_bounds(manifest: Manifest) -> list[tuple[int, int]]:
    out, i = [], 0
    for _, shape in manifest:
        n = math.prod(shape)
        out.append((i, i + n))
        i += n
    return out


@dataclass
class ConvexTrajectory:
    """The compact form of one expert: waypoints [W, P], their epochs, and β [L, K+1]."""
    waypoints: torch.Tensor
    epochs: list[int]
    beta: torch.Tensor
    bounds: list[tuple[int, int]]

    @property
    def num_epochs(self) -> int:
        return self.epochs[-1]

    @classmethod
    def from_checkpoints(cls, checkpoints: torch.Tensor, manifest: Manifest, num_waypoints: int = 2,
                         smooth: bool = False, beta: str = "path") -> "ConvexTrajectory":
        """Convexify a full trajectory ``checkpoints`` [K+1, P]."""
        traj = checkpoints.to(torch.float64)
        k = len(traj) - 1
        epochs = waypoint_epochs(k, num_waypoints)
        bounds = layer_bounds(manifest)
        if bounds[-1][1] != traj.shape[1]:
            raise ValueError(f"manifest has {bounds[-1][1]} parameters, checkpoints have {traj.shape[1]}")
        table = torch.zeros(len(bounds), k + 1, dtype=torch.float64)
        steps = torch.stack([(traj[1:, s:e] - traj[:-1, s:e]).norm(dim=1) for s, e in bounds])  # [L, K]
        for a, b in zip(epochs[:-1], epochs[1:]):
            if beta == "path":
                cum = torch.cumsum(steps[:, a:b], dim=1)
                total = cum[:, -1:].clamp_min(torch.finfo(torch.float64).tiny)
                table[:, a + 1:b + 1] = cum / total
            elif beta == "uniform":
                table[:, a + 1:b + 1] = torch.arange(1, b - a + 1, dtype=torch.float64) / (b - a)
            else:
                raise ValueError(f"beta must be 'path' or 'uniform', not {beta!r}")
        way = traj[epochs].clone()
        if smooth:
            for i, e in enumerate(epochs[1:], start=1):
                if e == k:
                    way[i] = (traj[k - 1] + traj[k]) / 2
                else:
                    way[i] = (traj[e - 1] + traj[e + 1]) / 2
        return cls(way.to(torch.float32), epochs, table.to(torch.float32), bounds)

    def _segment(self, t: float) -> int:
        for i in range(len(self.epochs) - 2):
            if t < self.epochs[i + 1]:
                return i
        return len(self.epochs) - 2

    def point(self, t: float) -> torch.Tensor:
        """The convexified parameters at (possibly fractional) epoch ``t`` in [0, K]."""
        if not 0 <= t <= self.num_epochs:
            raise ValueError(f"t={t} is outside [0, {self.num_epochs}]")
        s = self._segment(t)
        a = self.epochs[s]
        # column e of the table holds β at epoch e within the segment that ends at or after e;
        # at a segment's first epoch β is 0
        def beta_at(e: int) -> torch.Tensor:
            return torch.zeros(len(self.bounds)) if e == a else self.beta[:, e]

        lo, hi = math.floor(t), math.ceil(t)
        beta = beta_at(lo) + (beta_at(hi) - beta_at(lo)) * (t - lo)
        out = torch.empty_like(self.waypoints[0])
        for l, (s0, e0) in enumerate(self.bounds):
            out[s0:e0] = torch.lerp(self.waypoints[s][s0:e0], self.waypoints[s + 1][s0:e0], beta[l])
        return out


class ConvexSampler:
    """MCT's sampling: a random expert, a start time uniform in [0, max_start_epoch) (a real
    number; integers with ``continuous=False``), the target ``min(start + expert_epochs, K)``."""

    def __init__(self, trajectories: Sequence[ConvexTrajectory], expert_epochs: float, max_start_epoch: float,
                 continuous: bool = True):
        if not trajectories:
            raise ValueError("no convexified trajectories to sample from")
        k = min(t.num_epochs for t in trajectories)
        if max_start_epoch <= 0 or expert_epochs <= 0 or max_start_epoch > k:
            raise ValueError(f"max_start_epoch ({max_start_epoch}) must be in (0, {k}] and expert_epochs > 0")
        self.trajectories, self.expert_epochs, self.max_start_epoch = trajectories, expert_epochs, max_start_epoch
        self.continuous = continuous

    def sample(self, generator):
        e = int(torch.randint(len(self.trajectories), (1,), generator=generator))
        traj = self.trajectories[e]
        if self.continuous:
            start = float(torch.rand((), generator=generator, dtype=torch.float64)) * self.max_start_epoch
        else:
            start = float(torch.randint(max(1, int(self.max_start_epoch)), (1,), generator=generator))
        target = min(start + self.expert_epochs, traj.num_epochs)
        return traj.point(start), traj.point(target), {"expert": e, "start_epoch": start}


@dataclass(frozen=True)
class MCTConfig(MTTConfig):
    """MTT's hyperparameters plus the convexification and sampling options of MCT. The
    time window may be fractional; the released MCT scripts use long windows (expert_epochs 6-15)."""
    expert_epochs: float = hp(6, positive, doc="length of the window along the convex path (epochs, may be fractional)")
    max_start_epoch: float = hp(4, positive, doc="start points are drawn from [0, max_start_epoch)")
    waypoints: int = hp(2, at_least(2), integer=True, doc="expert checkpoints the convex path passes through")
    beta: str = hp("path", one_of("path", "uniform"), doc="time parameterisation of the path")
    smooth: bool = hp(False, doc="smooth the waypoints (official convexify option)")
    continuous: bool = hp(True, doc="draw start points continuously (false: whole epochs)")
