"""Networks and the flat-parameter view used by every distiller.

The ConvNet is the one of MTT (Cazenavette et al. 2022): ``depth`` blocks of
conv3x3 -> instance norm (``GroupNorm(C, C)``) -> ReLU -> 2x2 average pooling, then one
linear classifier on the flattened feature map (no global pooling). ``norm: batchnorm`` gives
DC's ConvNetBN (the same parameters; BatchNorm's running statistics are buffers).

:data:`REGISTRY` maps a model ``name`` to its builder: the ConvNet (``convnet``,
``convnet_bn``) and the architectures of cross-architecture evaluation in
:mod:`.architectures` (``mlp``, ``lenet``, ``alexnet``, ``alexnet_bn``, ``vgg11``,
``vgg11_bn``, ``resnet18``, ``resnet18_bn``).

Distillers treat a network's parameters as one flat float32 vector plus a manifest of
``(name, shape)``; :func:`functional_forward` runs the module from such a vector with
``torch.func.functional_call`` so that gradients flow into the vector.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch.func import functional_call

from . import architectures as arch

Manifest = list[tuple[str, tuple[int, ...]]]


@dataclass(frozen=True)
class ConvNetConfig:
    channels: int
    num_classes: int
    im_size: int
    width: int = 128
    depth: int = 3
    norm: str = "instancenorm"  # instancenorm | batchnorm | none
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
            elif cfg.norm == "batchnorm":
                layers.append(nn.BatchNorm2d(cfg.width))
            elif cfg.norm != "none":
                raise ValueError(f"unknown norm {cfg.norm!r} (instancenorm | batchnorm | none)")
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


Builder = Callable[[dict, int, int, int], nn.Module]
# the keys of a model spec that only the ConvNet reads: the other architectures ignore them (a
# spec's model section carries the ConvNet's defaults whatever the name)
CONVNET_KEYS = ("width", "depth", "norm", "pooling")
# the keys the other architectures read
ARCH_KEYS = ("width_mult",)


def _convnet(spec: dict, channels: int, num_classes: int, im_size: int) -> nn.Module:
    return ConvNet(ConvNetConfig(channels=channels, num_classes=num_classes, im_size=im_size, **spec))


def _convnet_bn(spec: dict, channels: int, num_classes: int, im_size: int) -> nn.Module:
    """The ConvNet with BatchNorm whatever ``norm`` the spec gives (DC's ConvNetBN)."""
    return _convnet({**spec, "norm": "batchnorm"}, channels, num_classes, im_size)


def _arch_options(name: str, spec: dict) -> dict:
    unknown = sorted(k for k in spec if k not in CONVNET_KEYS and k not in ARCH_KEYS)
    if unknown:
        raise ValueError(f"model {name!r} takes no option {', '.join(map(repr, unknown))} (its options: "
                         f"{', '.join(ARCH_KEYS)}; the ConvNet's {', '.join(CONVNET_KEYS)} are ignored)")
    opts = {k: spec[k] for k in ARCH_KEYS if k in spec}
    mult = opts.get("width_mult", 1.0)
    if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not mult > 0:
        raise ValueError(f"model {name!r}: width_mult must be a positive number, got {mult!r}")
    return opts


def _arch(name: str, cls: type[nn.Module], **fixed) -> Builder:
    def build(spec: dict, channels: int, num_classes: int, im_size: int) -> nn.Module:
        return cls(channels, num_classes, im_size, **fixed, **_arch_options(name, spec))
    build.__name__ = f"build_{name}"
    build.__doc__ = f"{cls.__name__}{fixed or ''} from a model spec (``width_mult``; ConvNet keys ignored)."
    return build


# name -> builder(spec without its name, channels, num_classes, im_size); one entry per architecture
REGISTRY: dict[str, Builder] = {
    "convnet": _convnet,
    "convnet_bn": _convnet_bn,
    "mlp": _arch("mlp", arch.MLP),
    "lenet": _arch("lenet", arch.LeNet),
    "alexnet": _arch("alexnet", arch.AlexNet, norm="none"),
    "alexnet_bn": _arch("alexnet_bn", arch.AlexNet, norm="batchnorm"),
    "vgg11": _arch("vgg11", arch.VGG, norm="instancenorm"),
    "vgg11_bn": _arch("vgg11_bn", arch.VGG, norm="batchnorm"),
    "resnet18": _arch("resnet18", arch.ResNet, norm="instancenorm"),
    "resnet18_bn": _arch("resnet18_bn", arch.ResNet, norm="batchnorm"),
}
MODELS = tuple(REGISTRY)  # the ``name`` values :func:`build_network` builds


def build_network(model: dict, channels: int, num_classes: int, im_size: int) -> nn.Module:
    """Build a network from a model spec dict such as ``{"name": "convnet", "depth": 3}`` or
    ``{"name": "resnet18_bn"}`` (no name: the ConvNet). The ConvNet takes the keys of
    :class:`ConvNetConfig`; the other architectures take ``width_mult`` and ignore the
    ConvNet's keys. A size an architecture cannot take raises a ValueError naming both."""
    spec = dict(model)
    name = spec.pop("name", "convnet")
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(MODELS)})")
    return REGISTRY[name](spec, channels, num_classes, im_size)


def has_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` holds a BatchNorm layer (its output then depends on train/eval mode and,
    in train mode, on the whole batch)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


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
    """Run ``module`` on ``x`` with its parameters taken from the flat vector ``flat``.

    Only for networks without BatchNorm (MTT's student, DC's matching network): the flat vector
    holds parameters only, and BatchNorm's batch statistics and running buffers would make the
    result depend on the mode and the batch. A BatchNorm network raises a ValueError."""
    _refuse_batchnorm(module, "functional_forward")
    return functional_call(module, unflatten(flat, manifest or manifest_of(module)), (x,))


def ensemble_forward(module: nn.Module, flats: torch.Tensor | Sequence[torch.Tensor], x: torch.Tensor,
                     manifest: Manifest | None = None) -> torch.Tensor:
    """``module`` on ``x`` as the ensemble of the flat parameter vectors ``flats``: the log of their
    mean softmax over the last dimension (logits of the mean distribution); a single vector (alone
    or in a list) gives its own logits, as :func:`functional_forward`."""
    if isinstance(flats, torch.Tensor):
        return functional_forward(module, flats, x, manifest)
    if len(flats) == 1:
        return functional_forward(module, flats[0], x, manifest)
    man = manifest or manifest_of(module)
    logp = torch.stack([functional_forward(module, f, x, man).log_softmax(-1) for f in flats])
    return logp.logsumexp(0) - math.log(len(flats))


def _refuse_batchnorm(module: nn.Module, what: str) -> None:
    if has_batchnorm(module):
        raise ValueError(f"{what}: {type(module).__name__} has BatchNorm layers, which flat-parameter "
                         f"training does not support (their statistics are not in the flat vector); use a "
                         f"model without BatchNorm (e.g. convnet, not convnet_bn), or call the module itself")


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
    _refuse_batchnorm(module, "functional_embed")
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
def correct(module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024,
            flat: torch.Tensor | None = None) -> torch.Tensor:
    """Whether ``module`` (or the flat parameters ``flat``) classifies each example of (x, y) right:
    a bool tensor ``[len(x)]`` on the CPU, in eval mode (BatchNorm uses its running statistics, so
    the result does not depend on ``batch_size``); the module's train/eval mode is restored
    afterwards. ``flat`` needs a network without BatchNorm (see :func:`functional_forward`)."""
    was_training = module.training
    module.eval()
    device = flat.device if flat is not None else next(module.parameters()).device
    hits = []
    man = manifest_of(module) if flat is not None else None
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device)
        out = functional_forward(module, flat, xb, man) if flat is not None else module(xb)
        hits.append(out.argmax(1).cpu() == y[i : i + batch_size])
    module.train(was_training)
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)


def accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024,
             flat: torch.Tensor | None = None) -> float:
    """Top-1 accuracy of ``module`` (or of ``flat``) on (x, y): the mean of :func:`correct`."""
    return int(correct(module, x, y, batch_size, flat).sum()) / max(1, len(x))

