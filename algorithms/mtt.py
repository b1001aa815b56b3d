"""MTT: Dataset Distillation by Matching Training Trajectories (Cazenavette et al. 2022).

Each outer iteration takes a start point θ_t and a target θ_{t+M} from an expert trajectory,
trains a student from θ_t for ``syn_steps`` SGD steps on augmented synthetic batches with the
learnable step size ``syn_lr``, and minimises the normalised parameter distance

    L = ||θ_student − θ_{t+M}||² / ||θ_t − θ_{t+M}||²

with respect to the synthetic images and ``syn_lr`` by backpropagating through the unrolled
student steps. Where start and target come from is the job of a *trajectory sampler*
(``sample(generator) -> (start, target, info)``), so other methods reuse this distiller with
another sampler.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Protocol, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .augment import DEFAULT_STRATEGY, DSA, AugSample, DSAConfig, check_strategy
from .base import (SyntheticSet, check_config, check_finite, check_warm_start, hp, nonneg, one_of, positive,
                   positive_or_none)
from .evaluate import init_images
from .networks import Manifest, functional_forward, manifest_of


class TrajectorySampler(Protocol):
    def sample(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]: ...


class EpochSampler:
    """MTT's sampling: a random expert, a start epoch t uniform in {0, …, max_start_epoch−1},
    the target ``expert_epochs`` epochs later. ``trajectories`` are [epochs+1, P] tensors
    (checkpoints 0..epochs), so the last start plus ``expert_epochs`` must be at most ``epochs``."""

    def __init__(self, trajectories: Sequence[torch.Tensor], expert_epochs: int, max_start_epoch: int):
        if not trajectories:
            raise ValueError("no expert trajectories to sample from")
        epochs = min(len(t) for t in trajectories) - 1
        if max_start_epoch < 1 or expert_epochs < 1:
            raise ValueError(f"max_start_epoch ({max_start_epoch}) and expert_epochs ({expert_epochs}) must be >= 1")
        if max_start_epoch - 1 + expert_epochs > epochs:
            raise ValueError(f"max_start_epoch ({max_start_epoch}) - 1 + expert_epochs ({expert_epochs}) = "
                             f"{max_start_epoch - 1 + expert_epochs} goes beyond the experts' {epochs} epochs "
                             "(starts are drawn from [0, max_start_epoch))")
        self.trajectories, self.expert_epochs, self.max_start_epoch = trajectories, expert_epochs, max_start_epoch

    def sample(self, generator):
        e = int(torch.randint(len(self.trajectories), (1,), generator=generator))
        t = int(torch.randint(self.max_start_epoch, (1,), generator=generator))
        traj = self.trajectories[e]
        return traj[t], traj[t + self.expert_epochs], {"expert": e, "start_epoch": t}


@dataclass(frozen=True)
class MTTConfig:
    ipc: int
    syn_steps: int = hp(20, positive, integer=True, doc="student SGD steps on the synthetic set per iteration")
    expert_epochs: int = hp(2, positive, integer=True, doc="epochs between the start and the target checkpoint")
    max_start_epoch: int = hp(10, positive, integer=True, doc="start epochs are drawn from [0, max_start_epoch)")
    lr_img: float = hp(100.0, positive, doc="learning rate of the pixels (SGD)")
    lr_lr: float = hp(1e-5, positive, doc="learning rate of the learned step size syn_lr")
    lr_teacher: float = hp(0.01, positive, doc="initial syn_lr (default: experts.lr)")
    batch_syn: int | None = hp(None, positive_or_none("all images"), integer=True,
                               doc="synthetic images per student step; null: all of them")
    momentum: float = hp(0.5, nonneg, doc="momentum of the pixels' and syn_lr's SGD")
    pix_init: str = hp("real", one_of("real", "noise"), doc="initial images: real ones, or noise")
    dsa: bool = hp(True, doc="differentiable siamese augmentation in the student steps")
    dsa_strategy: str = hp(DEFAULT_STRATEGY, check_strategy, added=True,
                           doc="DSA families joined by _ (digits: color_crop_cutout_scale_rotate, no flip)")
    grad_mode: str = hp("full", one_of("full", "tesla"),
                        doc="full: backpropagate through the unroll; tesla: constant-memory estimator")

    def __post_init__(self):
        check_config(self)

    def to_dict(self) -> dict:
        return asdict(self)


def matching_loss(student_end: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((student_end - target) ** 2).sum() / ((start - target) ** 2).sum()


def unrolled_matching_loss(net: nn.Module, manifest: Manifest, start: torch.Tensor, target: torch.Tensor,
                           images: torch.Tensor, labels: torch.Tensor, syn_lr: torch.Tensor,
                           plan: Sequence[tuple[torch.Tensor, AugSample | None]], augment: DSA | None) -> torch.Tensor:
    """The matching loss after ``len(plan)`` student SGD steps from ``start``, differentiable
    with respect to ``images`` and ``syn_lr`` through every step (full backpropagation; memory
    grows with the number of steps). ``plan`` gives each step's batch indices and augmentation."""
    params = start.detach().clone().requires_grad_(True)
    for idx, aug in plan:
        params = params - syn_lr * _student_grad(net, manifest, params, images, labels, idx, aug, augment, True)
    return matching_loss(params, start, target)


def _student_grad(net, manifest, params, images, labels, idx, aug, augment, create_graph: bool) -> torch.Tensor:
    x = images[idx] if aug is None else augment.apply(images[idx], aug)
    ce = F.cross_entropy(functional_forward(net, params, x, manifest), labels[idx])
    return torch.autograd.grad(ce, params, create_graph=create_graph)[0]


def tesla_matching_backward(net: nn.Module, manifest: Manifest, start: torch.Tensor, target: torch.Tensor,
                            images: torch.Tensor, labels: torch.Tensor, syn_lr: torch.Tensor,
                            plan: Sequence[tuple[torch.Tensor, AugSample | None]], augment: DSA | None) -> torch.Tensor:
    """TESLA's constant-memory estimate of the matching-loss gradient (Cui et al. 2023), added to
    ``images.grad`` and ``syn_lr.grad``; returns the (detached) loss.

    A first pass runs the student steps without a graph and sums the gradients, G = Σ g_i, so
    θ_N = θ_0 − α·G. The loss depends on each g_i through θ_N, with dL/dg_i = −2α(θ_N − θ*)/D
    (D = ‖θ_0 − θ*‖²). A second pass recomputes each g_i(x_i; θ_i) with a graph and
    backpropagates that vector into batch i alone, one step at a time, recomputing θ_i on the
    way, so memory does not grow with the number of steps (at twice the forward compute). The
    dependence of later θ_j on earlier batches is dropped: exact for one step, an approximation
    of full backpropagation for more. α's gradient is exact
    given G: dL/dα = −2⟨θ_N − θ*, G⟩/D.
    """
    lr = syn_lr.detach()
    params = start.detach().clone()
    total = torch.zeros_like(params)
    for idx, aug in plan:
        g = _student_grad(net, manifest, params.requires_grad_(True), images.detach(), labels, idx, aug, augment,
                          create_graph=False)
        total += g
        params = params.detach() - lr * g
    dist = ((start - target) ** 2).sum()
    resid = params - target  # θ_N − θ*
    loss = (resid ** 2).sum() / dist
    if not torch.isfinite(loss):
        return loss
    v = (-2 * lr / dist) * resid
    # second pass: the same steps again (θ_i recomputed on the way, nothing stored per step)
    theta = start.detach().clone()
    for idx, aug in plan:
        theta = theta.requires_grad_(True)
        g = _student_grad(net, manifest, theta, images, labels, idx, aug, augment, create_graph=True)
        torch.autograd.backward((g * v).sum(), inputs=[images])
        theta = theta.detach() - lr * g.detach()
    grad_lr = -2 * (resid * total).sum() / dist
    syn_lr.grad = grad_lr.reshape(syn_lr.shape) if syn_lr.grad is None else syn_lr.grad + grad_lr
    return loss


class MTTDistiller:
    def __init__(self, net: nn.Module, sampler: TrajectorySampler, x_real: torch.Tensor, y_real: torch.Tensor,
                 num_classes: int, cfg: MTTConfig, seed: int = 0, device: str | torch.device = "cpu",
                 dsa: DSAConfig | None = None):
        self.net, self.sampler, self.cfg = net.to(device), sampler, cfg
        self.manifest: Manifest = manifest_of(net)
        self.device = torch.device(device)
        self.gen = torch.Generator().manual_seed(seed)
        self.augment = DSA(dsa or DSAConfig(strategy=cfg.dsa_strategy)) if cfg.dsa else None
        images, labels, self.init_index = init_images(x_real, y_real, cfg.ipc, num_classes, cfg.pix_init, self.gen)
        self.images = images.to(self.device).requires_grad_(True)
        self.labels = labels.to(self.device)
        self.syn_lr = torch.tensor(float(cfg.lr_teacher), device=self.device).requires_grad_(True)
        self.opt_img = torch.optim.SGD([self.images], lr=cfg.lr_img, momentum=cfg.momentum)
        self.opt_lr = torch.optim.SGD([self.syn_lr], lr=cfg.lr_lr, momentum=cfg.momentum)
        self.iteration = 0
        self._queue: list[torch.Tensor] = []

    # -- student batches: a shuffled permutation cut into chunks, refilled when used up -------
    def _next_batch(self) -> torch.Tensor:
        n = len(self.labels)
        bs = self.cfg.batch_syn or n
        if not self._queue:
            self._queue = list(torch.randperm(n, generator=self.gen).split(bs))
        return self._queue.pop(0).to(self.device)

    def _plan(self) -> list[tuple[torch.Tensor, AugSample | None]]:
        """The student's batches and their augmentation parameters for one iteration."""
        size = self.images.shape[-1]
        plan = []
        for _ in range(self.cfg.syn_steps):
            idx = self._next_batch()
            aug = self.augment.sample(len(idx), size, self.gen) if self.augment is not None else None
            plan.append((idx, aug))
        return plan

    def step(self) -> dict[str, float]:
        start, target, info = self.sampler.sample(self.gen)
        start = start.to(self.device, torch.float32, copy=True)
        target = target.to(self.device, torch.float32, copy=True)
        self.opt_img.zero_grad(set_to_none=True)
        self.opt_lr.zero_grad(set_to_none=True)
        args = (self.net, self.manifest, start, target, self.images, self.labels, self.syn_lr, self._plan(),
                self.augment)
        if self.cfg.grad_mode == "full":
            loss = unrolled_matching_loss(*args)
            check_finite("matching loss", loss, self.iteration)
            loss.backward()
        elif self.cfg.grad_mode == "tesla":
            loss = tesla_matching_backward(*args)
            check_finite("matching loss", loss, self.iteration)
        else:
            raise ValueError(f"grad_mode must be 'full' or 'tesla', not {self.cfg.grad_mode!r}")
        check_finite("image gradient", self.images.grad, self.iteration)
        self.opt_img.step()
        self.opt_lr.step()
        check_finite("syn_lr", self.syn_lr, self.iteration)
        self.iteration += 1
        return {"loss": loss.item(), "syn_lr": self.syn_lr.item(), **{k: float(v) for k, v in info.items()}}

    def synthetic(self) -> SyntheticSet:
        return SyntheticSet(self.images.detach().cpu().clone(), self.labels.cpu().clone(), self.syn_lr.item())

    def warm_start(self, images: torch.Tensor, lr: float | None = None) -> None:
        """Start from ``images`` (class-major, the labels of :attr:`labels`) and, when given, the
        learned step size ``lr`` of the set they come from; both optimisers keep their fresh (zero)
        momentum."""
        check_warm_start(self, images)
        with torch.no_grad():
            self.images.copy_(images.to(self.device, self.images.dtype))
            if lr is not None:
                self.syn_lr.fill_(float(lr))
        self.init_index = None  # no real rows: the start is the given set

    def state_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "images": self.images.detach().cpu().clone(),
            "labels": self.labels.cpu().clone(),
            "syn_lr": self.syn_lr.detach().cpu().clone(),
            "opt_img": copy.deepcopy(self.opt_img.state_dict()),
            "opt_lr": copy.deepcopy(self.opt_lr.state_dict()),
            "generator": self.gen.get_state(),
            "queue": [q.cpu() for q in self._queue],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.device))
            self.syn_lr.copy_(state["syn_lr"].to(self.device))
        self.labels = state["labels"].to(self.device)
        # copies: torch keeps the loaded momentum tensors, which later steps update in place
        self.opt_img.load_state_dict(copy.deepcopy(state["opt_img"]))
        self.opt_lr.load_state_dict(copy.deepcopy(state["opt_lr"]))
        self.gen.set_state(state["generator"])
        self.iteration = int(state["iteration"])
        self._queue = [q.to(self.device) for q in state["queue"]]
