"""Expert training: the trajectories MTT-style distillers match.

As in MTT's ``buffer.py``: plain SGD (lr 0.01, no momentum, no weight decay by default), DSA on
every batch, the flat parameters kept at initialisation and after every epoch. Everything
random (initialisation, shuffling, augmentation) comes from ``seed``, so the same seed on the
same device gives the same trajectory.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from .augment import DEFAULT_STRATEGY, DSA, DSAConfig
from .networks import accuracy, flatten_params, seeded_network


@dataclass(frozen=True)
class ExpertConfig:
    epochs: int = 50
    lr: float = 0.01
    batch_size: int = 256
    momentum: float = 0.0
    weight_decay: float = 0.0
    dsa: bool = True
    lr_decay: bool = False  # x0.1 after epoch epochs//2, as MTT's --decay
    dsa_strategy: str = DEFAULT_STRATEGY  # DSA's families (digits: color_crop_cutout_scale_rotate)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Checkpoint:
    epoch: int
    params: torch.Tensor  # flat float32, on the CPU
    train_loss: float  # mean loss of the epoch that led here (nan at epoch 0)
    test_acc: float  # accuracy of these parameters on the test split (nan if not evaluated)


class ExpertDivergedError(RuntimeError):
    pass


def train_expert(model: dict, data, cfg: ExpertConfig, seed: int, device: str | torch.device = "cpu",
                 eval_every: int = 0) -> Iterator[Checkpoint]:
    """Train one expert and yield its checkpoints, epoch 0 (initialisation) first.

    ``data`` has ``x_train, y_train, x_test, y_test`` tensors and ``info`` (channels,
    num_classes, size). The test accuracy is computed at the last epoch, and every
    ``eval_every`` epochs if that is positive.
    """
    info = data.info
    net = seeded_network(model, info.channels, info.num_classes, info.size, seed).to(device)
    gen = torch.Generator().manual_seed(seed + 7919)
    dsa = DSA(DSAConfig(strategy=cfg.dsa_strategy)) if cfg.dsa else None
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    x, y = data.x_train, data.y_train

    def test_acc(epoch: int) -> float:
        if epoch == cfg.epochs or (eval_every > 0 and epoch % eval_every == 0):
            return accuracy(net, data.x_test, data.y_test)
        return math.nan

    yield Checkpoint(0, flatten_params(net).cpu(), math.nan, test_acc(0))
    for epoch in range(1, cfg.epochs + 1):
        if cfg.lr_decay and epoch == cfg.epochs // 2 + 1:
            for group in opt.param_groups:
                group["lr"] *= 0.1
        net.train()
        perm = torch.randperm(len(x), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(x), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            xb, yb = x[idx].to(device), y[idx].to(device)
            if dsa is not None:
                xb = dsa(xb, gen)
            loss = F.cross_entropy(net(xb), yb)
            if not torch.isfinite(loss):
                raise ExpertDivergedError(f"expert seed {seed}: loss {loss.item()} at epoch {epoch}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        yield Checkpoint(epoch, flatten_params(net).cpu(), total / count, test_acc(epoch))
