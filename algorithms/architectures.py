"""The architectures of cross-architecture evaluation, beside MTT's ConvNet (:mod:`.networks`).

The dataset-distillation literature (DC, DSA, DM, MTT; the ``get_network`` of the DC and MTT
code) trains networks other than the distilling ConvNet on a synthetic set to see whether it
transfers: an MLP, LeNet, AlexNet, VGG-11 and ResNet-18, the last three also with BatchNorm.
They are written here from those descriptions:

- ``MLP``: flatten -> 128 -> 128 -> classes, ReLU between.
- ``LeNet``: conv5x5(6) -> ReLU -> maxpool -> conv5x5(16) -> ReLU -> maxpool -> 120 -> 84 -> classes.
- ``AlexNet``: the small AlexNet of DC: conv5x5(128) / conv5x5(192) / conv3x3(256, 192, 192), max
  pooling after the first, second and fifth, one linear classifier; no normalisation, or
  BatchNorm after every convolution (``alexnet_bn``).
- ``VGG``-11: eight conv3x3 (64, 128, 256, 256, 512 x 4), five max poolings, one linear
  classifier; instance norm (``GroupNorm(C, C)``, as DC) or BatchNorm (``vgg11_bn``).
- ``ResNet``-18: conv3x3(64) stem without pooling (CIFAR style), four stages of two basic blocks
  (64, 128, 256, 512; strided 3x3 convolutions downsample), global average pooling, one linear
  classifier; instance norm (as DC's ResNet18) or BatchNorm (``resnet18_bn``, DC/DM's ResNet18BN).

Input sizes follow the ConvNet's rule: a 28x28 input (MNIST) is zero-padded to 32x32 by the
first convolution (its padding grows by 2), so that MNIST has the feature-map sizes of CIFAR;
the MLP takes the 28x28 pixels as they are. Other sizes (digits' 8x8, a folder's own size)
are taken as they come when the architecture's poolings leave at least one pixel (ResNet-18:
a 2x2 map in its last stage), else the constructor raises a ValueError naming the architecture
and the size. At 8 px (digits) that leaves the ConvNet, the MLP and AlexNet; LeNet needs 16 px,
ResNet-18 9 px and VGG-11 32 px.

``width_mult`` scales every layer's width (channels, hidden units; at least 1 each), for small
test networks; 1 is the literature's network.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = ("instancenorm", "batchnorm", "none")


def first_conv_size(im_size: int) -> tuple[int, int]:
    """(size the first convolution works at, extra zero padding to get there): 28 px inputs are
    padded to 32 px as MTT's ConvNet does; any other size is kept."""
    if im_size < 1:
        raise ValueError(f"image size must be positive, got {im_size}")
    return (32, 2) if im_size == 28 else (im_size, 0)


def norm_layer(norm: str, channels: int) -> nn.Module:
    """Instance norm (GroupNorm with one channel per group, affine, as DC/MTT), BatchNorm or none."""
    if norm == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r} ({' | '.join(NORMS)})")


def _scaled(width: int, mult: float) -> int:
    return max(1, int(round(width * mult)))


def _too_small(name: str, im_size: int, need: int, why: str) -> ValueError:
    return ValueError(f"{name} cannot take {im_size}x{im_size} inputs: {why}; it needs at least "
                      f"{need}x{need} px")


class MLP(nn.Module):
    """Two hidden layers of 128 units with ReLU; the image is flattened as it is."""

    def __init__(self, channels: int, num_classes: int, im_size: int, width_mult: float = 1.0):
        super().__init__()
        if im_size < 1:
            raise ValueError(f"image size must be positive, got {im_size}")
        hidden = _scaled(128, width_mult)
        self.features = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(channels * im_size * im_size, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
        )
        self.num_feat = hidden
        self.classifier = nn.Linear(hidden, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class LeNet(nn.Module):
    """LeNet-5 with ReLU and max pooling. At 32 px the first 5x5 convolution is unpadded
    (32 -> 28), at 28 px padded by 2 (28 -> 28), so both end at 16x5x5 features."""

    def __init__(self, channels: int, num_classes: int, im_size: int, width_mult: float = 1.0):
        super().__init__()
        size, extra = first_conv_size(im_size)
        after = ((size - 4) // 2 - 4) // 2
        if after < 1:
            raise _too_small("lenet", im_size, 16, "its two unpadded 5x5 convolutions and two 2x2 poolings "
                             "leave no pixel")
        c1, c2 = _scaled(6, width_mult), _scaled(16, width_mult)
        h1, h2 = _scaled(120, width_mult), _scaled(84, width_mult)
        self.features = nn.Sequential(
            nn.Conv2d(channels, c1, kernel_size=5, padding=extra), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(c1, c2, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Flatten(1),
            nn.Linear(c2 * after * after, h1), nn.ReLU(),
            nn.Linear(h1, h2), nn.ReLU(),
        )
        self.num_feat = h2
        self.classifier = nn.Linear(h2, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class AlexNet(nn.Module):
    """DC's small AlexNet: five convolutions (5x5, 5x5, 3x3 x 3, all size-preserving), 2x2 max
    pooling after the first, second and last, then one linear classifier on the flattened map
    (192 x 4 x 4 at 32 px). ``norm``: none (AlexNet) or batchnorm (AlexNetBN)."""

    def __init__(self, channels: int, num_classes: int, im_size: int, norm: str = "none",
                 width_mult: float = 1.0):
        super().__init__()
        size, extra = first_conv_size(im_size)
        after = size // 8
        if after < 1:
            raise _too_small("alexnet" + ("_bn" if norm == "batchnorm" else ""), im_size, 8,
                             "its three 2x2 poolings leave no pixel")
        w1, w2, w3, w4 = (_scaled(w, width_mult) for w in (128, 192, 256, 192))
        spec = [(channels, w1, 5, 2 + extra, True), (w1, w2, 5, 2, True), (w2, w3, 3, 1, False),
                (w3, w4, 3, 1, False), (w4, w4, 3, 1, True)]
        layers: list[nn.Module] = []
        for cin, cout, k, pad, pool in spec:
            layers += [nn.Conv2d(cin, cout, kernel_size=k, padding=pad), norm_layer(norm, cout), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(2, 2))
        layers.append(nn.Flatten(1))
        self.features = nn.Sequential(*layers)
        self.num_feat = w4 * after * after
        self.classifier = nn.Linear(self.num_feat, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


VGG11_LAYOUT = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """VGG-11 (configuration A) for small images: conv3x3 -> norm -> ReLU, 2x2 max pooling where
    the layout says ``M``, one linear classifier on the flattened map (512 x 1 x 1 at 32 px).
    ``norm``: instancenorm (DC's VGG11) or batchnorm (VGG11BN)."""

    def __init__(self, channels: int, num_classes: int, im_size: int, norm: str = "instancenorm",
                 width_mult: float = 1.0, layout: tuple = VGG11_LAYOUT):
        super().__init__()
        size, extra = first_conv_size(im_size)
        pools = sum(1 for v in layout if v == "M")
        after = size // 2 ** pools
        if after < 1:
            raise _too_small("vgg11" + ("_bn" if norm == "batchnorm" else ""), im_size, 2 ** pools,
                             f"its {pools} 2x2 poolings leave no pixel")
        layers: list[nn.Module] = []
        c = channels
        for v in layout:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            w = _scaled(v, width_mult)
            layers += [nn.Conv2d(c, w, kernel_size=3, padding=1 + (extra if not layers else 0)),
                       norm_layer(norm, w), nn.ReLU()]
            c = w
        layers.append(nn.Flatten(1))
        self.features = nn.Sequential(*layers)
        self.num_feat = c * after * after
        self.classifier = nn.Linear(self.num_feat, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (the first strided when downsampling) with a residual connection; a
    1x1 strided convolution and a norm on the shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)
        self.norm1 = norm_layer(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, kernel_size=3, stride=1, padding=1, bias=False)
        self.norm2 = norm_layer(norm, cout)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                                          norm_layer(norm, cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-18 for small images (DC's ResNet18 / ResNet18BN): a 3x3 stem at full resolution,
    stages of basic blocks (64, 128, 256, 512 channels, the last three downsampling by 2),
    global average pooling, one linear classifier. ``norm``: instancenorm or batchnorm."""

    def __init__(self, channels: int, num_classes: int, im_size: int, norm: str = "instancenorm",
                 width_mult: float = 1.0, blocks: tuple[int, ...] = (2, 2, 2, 2)):
        super().__init__()
        size, extra = first_conv_size(im_size)
        last = size
        for _ in blocks[1:]:
            last = (last + 1) // 2  # a 3x3 stride-2 convolution with padding 1: ceil(size / 2)
        if last < 2:
            raise _too_small("resnet18" + ("_bn" if norm == "batchnorm" else ""), im_size,
                             2 ** (len(blocks) - 1) + 1,
                             f"its last stage would work on {last}x{last} maps, where instance norm outputs a "
                             "constant and BatchNorm fails on a batch of one")
        widths = [_scaled(w, width_mult) for w in (64, 128, 256, 512)]
        self.stem = nn.Sequential(nn.Conv2d(channels, widths[0], kernel_size=3, padding=1 + extra, bias=False),
                                  norm_layer(norm, widths[0]), nn.ReLU())
        stages: list[nn.Module] = []
        c = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stage = []
            for b in range(n):
                stage.append(BasicBlock(c, w, 2 if (b == 0 and i > 0) else 1, norm))
                c = w
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.num_feat = c
        self.classifier = nn.Linear(c, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
