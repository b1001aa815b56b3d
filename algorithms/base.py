"""The small protocol every distiller follows, so that the orchestrator treats them alike."""
from __future__ import annotations

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
