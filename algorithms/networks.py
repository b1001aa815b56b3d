"""Networks and the flat-parameter view used by every distiller.

The ConvNet is the one of MTT (Cazenavette et al. 2022): ``depth`` blocks of
conv3x3 -> instance norm (``GroupNorm(C, C)``) -> ReLU -> 2x2 average pooling, then one
linear classifier on the flattened feature map (no global pooling).

Distillers treat a network's parameters as one flat float32 vector plus a manifest of
``(name, shape)``; :func:`functional_forward` runs the module from such a vector with
``torch.func.functional_call`` so that gradients flow into the vector.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.func import functional_call

Manifest = list[tuple[str, tuple[int, ...]]]
MODELS = ("convnet",)  # the ``name`` values :func:`build_network` builds


@dataclass(frozen=True)
class ConvNetConfig:
    channels: int
    num_classes: int
    im_size: int
    width: int = 128
    depth: int = 3
    norm: str = "instancenorm"  # instancenorm | none
    pooling: str = "avgpooling"  # avgpooling | maxpooling | none

    def to_dict(self) -> dict:
        return {"name": "convnet", **asdict(self)}


class ConvNet(nn.Module):
    """MTT's ConvNet. 28x28 single-channel inputs are padded to 32x32 by the first conv, as
    in the reference code, so that MNIST uses the same feature sizes as CIFAR."""

    def __init__(self, cfg: ConvNetConfig):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        c, size = cfg.channels, cfg.im_size
        if size == 28:
            size = 32
        for d in range(cfg.depth):
            pad = 3 if (d == 0 and cfg.im_size == 28) else 1
            layers.append(nn.Conv2d(c, cfg.width, kernel_size=3, padding=pad))
            c = cfg.width
            if cfg.norm == "instancenorm":
                layers.append(nn.GroupNorm(cfg.width, cfg.width, affine=True))
            elif cfg.norm != "none":
                raise ValueError(f"unknown norm {cfg.norm!r} (instancenorm | none)")
            layers.append(nn.ReLU(inplace=False))
            if cfg.pooling == "avgpooling":
                layers.append(nn.AvgPool2d(2, 2))
                size //= 2
            elif cfg.pooling == "maxpooling":
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
            elif cfg.pooling != "none":
                raise ValueError(f"unknown pooling {cfg.pooling!r}")
            if size < 1:
                raise ValueError(f"depth {cfg.depth} pools an {cfg.im_size}x{cfg.im_size} input below 1x1")
        self.features = nn.Sequential(*layers)
        self.num_feat = c * size * size
        self.classifier = nn.Linear(self.num_feat, cfg.num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened feature map, the classifier's input (DM's embedding)."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def build_network(model: dict, channels: int, num_classes: int, im_size: int) -> nn.Module:
    """Build a network from a model spec dict such as ``{"name": "convnet", "depth": 3}``."""
    spec = dict(model)
    name = spec.pop("name", "convnet")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(MODELS)})")
    return ConvNet(ConvNetConfig(channels=channels, num_classes=num_classes, im_size=im_size, **spec))


def seeded_network(model: dict, channels: int, num_classes: int, im_size: int, seed: int) -> nn.Module:
    """A network whose initialisation depends only on ``seed`` (the global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_network(model, channels, num_classes, im_size)


def manifest_of(module: nn.Module) -> Manifest:
    return [(n, tuple(p.shape)) for n, p in module.named_parameters()]


def num_params(manifest: Manifest) -> int:
    total = 0
    for _, shape in manifest:
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def flatten_params(module: nn.Module) -> torch.Tensor:
    """All parameters in ``named_parameters()`` order as one detached flat float32 vector."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).to(torch.float32)


def unflatten(flat: torch.Tensor, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Views of ``flat`` shaped like the parameters (differentiable w.r.t. ``flat``)."""
    if flat.numel() != num_params(manifest):
        raise ValueError(f"flat vector has {flat.numel()} values, manifest needs {num_params(manifest)}")
    out, i = {}, 0
    for name, shape in manifest:
        n = 1
        for s in shape:
            n *= s
        out[name] = flat[i : i + n].view(shape)
        i += n
    return out


def load_flat(module: nn.Module, flat: torch.Tensor) -> None:
    """Copy a flat vector into the module's parameters in place."""
    with torch.no_grad():
        for p, v in zip(module.parameters(), unflatten(flat, manifest_of(module)).values()):
            p.copy_(v)


def functional_forward(module: nn.Module, flat: torch.Tensor, x: torch.Tensor,
                       manifest: Manifest | None = None) -> torch.Tensor:
    """Run ``module`` on ``x`` with its parameters taken from the flat vector ``flat``."""
    return functional_call(module, unflatten(flat, manifest or manifest_of(module)), (x,))


class _Embedding(nn.Module):
    """``module.embed`` as a forward, so that ``functional_call`` can run it."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.net = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.embed(x)


def functional_embed(module: nn.Module, flat: torch.Tensor, x: torch.Tensor,
                     manifest: Manifest | None = None) -> torch.Tensor:
    """``module.embed(x)`` (the features before the classifier) with the parameters taken from
    the flat vector ``flat``; differentiable with respect to ``x`` and ``flat``."""
    if not callable(getattr(module, "embed", None)):
        raise TypeError(f"{type(module).__name__} has no embed(x) method (features before the classifier)")
    params = unflatten(flat, manifest or manifest_of(module))
    return functional_call(_Embedding(module), {f"net.{k}": v for k, v in params.items()}, (x,))


def fresh_params(module: nn.Module, seed: int) -> torch.Tensor:
    """A new default initialisation of ``module``'s parameters as a flat float32 vector on the
    CPU, depending only on ``seed``: every submodule's ``reset_parameters`` runs on a CPU copy
    under a forked RNG (neither ``module`` nor the global RNG is touched)."""
    copy_ = copy.deepcopy(module).to("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in copy_.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
    return flatten_params(copy_)


@torch.no_grad()
def accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024,
             flat: torch.Tensor | None = None) -> float:
    """Top-1 accuracy of ``module`` (or of the flat parameters ``flat``) on (x, y)."""
    was_training = module.training
    module.eval()
    device = flat.device if flat is not None else next(module.parameters()).device
    correct = 0
    man = manifest_of(module) if flat is not None else None
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device)
        out = functional_forward(module, flat, xb, man) if flat is not None else module(xb)
        correct += (out.argmax(1).cpu() == y[i : i + batch_size]).sum().item()
    module.train(was_training)
    return correct / max(1, len(x))

