"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021) as used by MTT.

Every transformation is differentiable with respect to the images, so gradients reach the
synthetic pixels. Random parameters are drawn once per call by :meth:`DSA.sample` and
applied by :meth:`DSA.apply`; applying the same sample to two batches transforms them
identically (the "siamese" property). In mode ``'S'`` (MTT's default) one family out of the
strategy is picked per call and applied with per-sample parameters; in mode ``'M'`` every
family of the strategy is applied in turn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")
# DSA's families by default; DC/DSA's authors drop ``flip`` for digits (MNIST, SVHN), where a
# mirrored 2 or 7 is not the same class: ``color_crop_cutout_scale_rotate``.
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"


@dataclass(frozen=True)
class DSAConfig:
    strategy: str = DEFAULT_STRATEGY
    mode: str = "S"  # S: one family per call; M: all families in sequence
    batchmode: bool = False  # True: one parameter set for the whole batch
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    crop: float = 0.125  # max shift as a fraction of the side
    cutout: float = 0.5  # cutout side as a fraction of the side
    flip: float = 0.5  # probability
    scale: float = 1.2  # scale factor in [1/scale, scale]
    rotate: float = 15.0  # degrees

    def families(self) -> tuple[str, ...]:
        return _families(self.strategy, FAMILIES, "DSA")


def _families(strategy: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    """The families of ``strategy`` (joined by ``_``); ValueError naming the unknown ones."""
    fams = tuple(f for f in strategy.split("_") if f)
    bad = [f for f in fams if f not in known]
    if bad or not fams:
        raise ValueError(f"unknown {what} families {bad} in strategy {strategy!r}; known: {known}")
    return fams


def _strategy_problem(v, config: type, what: str, example: str) -> str | None:
    if not isinstance(v, str):
        return f"must be a string of {what} families joined by '_', e.g. {example}"
    try:
        config(strategy=v).families()
    except ValueError as e:
        return str(e)
    return None


def check_strategy(v) -> str | None:
    """The problem with a strategy string (families joined by ``_``), or None."""
    return _strategy_problem(v, DSAConfig, "DSA", DEFAULT_STRATEGY)


@dataclass
class AugSample:
    """Random parameters for one call: which families, and per-sample tensors for each."""
    families: tuple[str, ...]
    params: dict[str, torch.Tensor] = field(default_factory=dict)


class DSA:
    def __init__(self, config: DSAConfig | None = None):
        self.cfg = config or DSAConfig()
        self._families = self.cfg.families()

    def sample(self, n: int, size: int, generator: torch.Generator | None = None) -> AugSample:
        """Draw parameters for a batch of ``n`` images of side ``size`` (on the CPU)."""
        g, c = generator, self.cfg
        if c.mode == "S":
            fams = (self._families[int(torch.randint(len(self._families), (1,), generator=g))],)
        elif c.mode == "M":
            fams = self._families
        else:
            raise ValueError(f"unknown DSA mode {c.mode!r} (S | M)")
        m = 1 if c.batchmode else n
        p: dict[str, torch.Tensor] = {}

        def rand(*shape):
            t = torch.rand(m, *shape, generator=g)
            return t.expand(n, *shape) if c.batchmode else t

        for f in fams:
            if f == "color":
                p["brightness"] = (rand(1, 1, 1) - 0.5) * c.brightness
                p["saturation"] = rand(1, 1, 1) * c.saturation
                p["contrast"] = rand(1, 1, 1) + c.contrast
            elif f == "crop":
                r = int(size * c.crop + 0.5)
                p["shift"] = (torch.randint(-r, r + 1, (m, 2), generator=g)).expand(n, 2)
            elif f == "cutout":
                k = int(size * c.cutout + 0.5)
                p["cutout_at"] = torch.randint(0, size + (1 - k % 2), (m, 2), generator=g).expand(n, 2)
            elif f == "flip":
                p["flip"] = rand() < c.flip
            elif f == "scale":
                lo = 1.0 / c.scale
                p["scale"] = rand(2) * (c.scale - lo) + lo
            elif f == "rotate":
                p["angle"] = (rand() - 0.5) * 2 * c.rotate / 180 * math.pi
        return AugSample(fams, p)

    def apply(self, x: torch.Tensor, s: AugSample) -> torch.Tensor:
        """Apply the sampled transformation to ``x`` (N,C,H,W); differentiable in ``x``."""
        p = {k: v.to(x.device) for k, v in s.params.items()}
        size = x.shape[-1]
        for f in s.families:
            if f == "crop":  # sizes come from the config, so no value is read back from the device
                x = self._crop(x, p, int(size * self.cfg.crop + 0.5))
            elif f == "cutout":
                x = self._cutout(x, p, int(size * self.cfg.cutout + 0.5))
            else:
                x = getattr(self, f"_{f}")(x, p)
        return x

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(x, self.sample(x.shape[0], x.shape[-1], generator))

    # -- families ---------------------------------------------------------------------------
    @staticmethod
    def _color(x, p):
        x = x + p["brightness"]
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * p["saturation"] + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * p["contrast"] + mean

    @staticmethod
    def _crop(x, p, pad: int):
        n, _, h, w = x.shape
        shift = p["shift"]
        xp = F.pad(x, (pad, pad, pad, pad))
        rows = (torch.arange(h, device=x.device)[None, :] + pad + shift[:, 0:1])  # n,h
        cols = (torch.arange(w, device=x.device)[None, :] + pad + shift[:, 1:2])  # n,w
        idx_n = torch.arange(n, device=x.device)[:, None, None]
        # result[n, c, i, j] = xp[n, c, rows[n, i], cols[n, j]]
        out = xp.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2)

    @staticmethod
    def _cutout(x, p, k: int):
        n, _, h, w = x.shape
        at = p["cutout_at"] - k // 2  # top-left corner, may be negative
        r = torch.arange(h, device=x.device)[None, :]
        c = torch.arange(w, device=x.device)[None, :]
        in_r = (r >= at[:, 0:1]) & (r < at[:, 0:1] + k)  # n,h
        in_c = (c >= at[:, 1:2]) & (c < at[:, 1:2] + k)  # n,w
        mask = ~(in_r[:, :, None] & in_c[:, None, :])
        return x * mask[:, None].to(x.dtype)

    @staticmethod
    def _flip(x, p):
        return torch.where(p["flip"].view(-1, 1, 1, 1), x.flip(3), x)

    @staticmethod
    def _affine(x, theta):
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        return F.grid_sample(x, grid, align_corners=True)

    @classmethod
    def _scale(cls, x, p):
        s = p["scale"]
        zero = torch.zeros_like(s[:, 0])
        theta = torch.stack([torch.stack([s[:, 0], zero, zero], 1),
                             torch.stack([zero, s[:, 1], zero], 1)], 1)
        return cls._affine(x, theta.to(x.dtype))

    @classmethod
    def _rotate(cls, x, p):
        a = p["angle"]
        zero = torch.zeros_like(a)
        theta = torch.stack([torch.stack([torch.cos(a), torch.sin(-a), zero], 1),
                             torch.stack([torch.sin(a), torch.cos(a), zero], 1)], 1)
        return cls._affine(x, theta.to(x.dtype))



# -- DC's augmentation ------------------------------------------------------------------------------
DC_FAMILIES = ("crop", "scale", "rotate", "noise")
# what DC's authors (Zhao, Mopuri & Bilen 2021, ``utils.get_daparam``) train MNIST's evaluation
# networks with when they evaluate a DC set (DSA is off for DC): their published DC numbers on
# MNIST (91.7 at IPC 1) are measured under it, not under DSA's families
DC_MNIST_STRATEGY = "crop_scale_rotate"


@dataclass(frozen=True)
class DCAugConfig:
    """DC's own (not differentiable, not siamese) augmentation of the evaluation: every image gets
    **one** family drawn at random from ``strategy``: ``crop`` shifts it by a whole number of pixels
    in [-crop, crop - 1] per axis (the border filled with the batch's channel mean), ``scale``
    resizes its height and width independently by factors in [1 - scale, 1 + scale] (nearest
    neighbour, centred, zeros around), ``rotate`` turns it by a whole number of degrees in
    [-rotate, rotate - 1] about its centre (cubic, filled with the mean of the channel means),
    ``noise`` adds Gaussian noise of std ``noise``."""
    strategy: str = DC_MNIST_STRATEGY
    crop: int = 4
    scale: float = 0.2
    rotate: int = 45
    noise: float = 0.001

    def families(self) -> tuple[str, ...]:
        return _families(self.strategy, DC_FAMILIES, "DC augmentation")


def check_dc_strategy(v) -> str | None:
    """The problem with a DC augmentation strategy (families joined by ``_``), or None."""
    return _strategy_problem(v, DCAugConfig, "DC augmentation", DC_MNIST_STRATEGY)


class DCAugment:
    """DC's evaluation augmentation (:class:`DCAugConfig`) on a batch, image by image as its
    authors' ``utils.augment`` does it (the rotation is scipy's, as theirs), with every random draw
    taken from ``generator`` instead of numpy's global state. It returns a new tensor."""

    def __init__(self, config: DCAugConfig | None = None):
        self.cfg = config or DCAugConfig()
        self._families = self.cfg.families()

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        from scipy.ndimage import rotate

        cfg, (n, c, h, w) = self.cfg, x.shape
        x = x.detach()
        out = x.clone()
        channel_mean = x.mean(dim=(0, 2, 3))  # the batch's, the authors' fill of a crop
        choice = torch.randint(0, len(self._families), (n,), generator=generator).tolist()
        for i, k in enumerate(choice):
            family = self._families[k]
            if family == "crop":  # a window of the padded image: a shift in [-crop, crop - 1]
                r, q = torch.randint(0, 2 * cfg.crop, (2,), generator=generator).tolist()
                padded = channel_mean.view(c, 1, 1).repeat(1, h + 2 * cfg.crop, w + 2 * cfg.crop).to(x)
                padded[:, cfg.crop:cfg.crop + h, cfg.crop:cfg.crop + w] = x[i]
                out[i] = padded[:, r:r + h, q:q + w]
            elif family == "scale":  # resized (nearest), centred on zeros, cut back to h x w
                u = (1 - cfg.scale + 2 * cfg.scale * torch.rand(2, generator=generator)).tolist()
                sh, sw = int(u[0] * h), int(u[1] * h)  # both from the height, as the authors'
                small = F.interpolate(x[i : i + 1], [sh, sw])[0]
                m = max(sh, sw, h, w)
                canvas = x.new_zeros(c, m, m)
                canvas[:, (m - sh) // 2:(m - sh) // 2 + sh, (m - sw) // 2:(m - sw) // 2 + sw] = small
                out[i] = canvas[:, (m - h) // 2:(m - h) // 2 + h, (m - w) // 2:(m - w) // 2 + w]
            elif family == "rotate":  # whole degrees, the grown image cut back to its centre
                angle = int(torch.randint(-cfg.rotate, cfg.rotate, (1,), generator=generator))
                turned = rotate(x[i].cpu().numpy(), angle=angle, axes=(-2, -1), cval=float(channel_mean.mean()))
                r, q = (turned.shape[-2] - h) // 2, (turned.shape[-1] - w) // 2
                out[i] = torch.from_numpy(turned[:, r:r + h, q:q + w].copy()).to(x)
            else:  # noise
                out[i] = x[i] + cfg.noise * torch.randn(x[i].shape, generator=generator).to(x)
        return out
