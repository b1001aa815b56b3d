"""The small protocol every distiller follows, so that the orchestrator treats them alike."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Protocol

import torch


class DivergenceError(RuntimeError):
    """Distillation produced a NaN or infinite value; the message says which and when."""


@dataclass
class SyntheticSet:
    images: torch.Tensor  # float32 N,C,H,W in the dataset's normalised input space
    labels: torch.Tensor  # int64 N
    lr: float  # learned step size to train on this set with

    def detached(self) -> "SyntheticSet":
        return SyntheticSet(self.images.detach().cpu().clone(), self.labels.detach().cpu().clone(), float(self.lr))


class Distiller(Protocol):
    iteration: int

    def step(self) -> dict[str, float]:
        """One outer iteration; returns scalar metrics. Raises DivergenceError on NaN/inf."""

    def synthetic(self) -> SyntheticSet: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def check_finite(name: str, value: torch.Tensor, iteration: int) -> None:
    if not bool(torch.isfinite(value).all()):
        raise DivergenceError(f"{name} is {value.detach().flatten()[:4].tolist()} at iteration {iteration}: "
                              "distillation diverged (lower lr_img / lr_lr or syn_steps)")


class ImageSetState:
    """``state_dict`` / ``load_state_dict`` of a distiller whose whole state is its images and
    labels, one image optimiser (``opt_img``), a generator (``gen``) and an iteration count
    (DC, DSA, DM). Restoring copies the optimiser state: ``Optimizer.load_state_dict`` keeps the
    given momentum buffers, which later steps would update in place in the caller's dict."""

    images: torch.Tensor
    labels: torch.Tensor
    opt_img: torch.optim.Optimizer
    gen: torch.Generator
    iteration: int
    device: torch.device

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "images": self.images.detach().cpu().clone(),
                "labels": self.labels.cpu().clone(), "opt_img": copy.deepcopy(self.opt_img.state_dict()),
                "generator": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["images"].shape) != tuple(self.images.shape):
            raise ValueError(f"state has images of shape {tuple(state['images'].shape)}, "
                             f"this distiller {tuple(self.images.shape)}")
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.device))
        self.labels = state["labels"].to(self.device).clone()
        self.opt_img.load_state_dict(copy.deepcopy(state["opt_img"]))
        self.gen.set_state(state["generator"])
        self.iteration = int(state["iteration"])
