"""DC: Dataset Condensation with Gradient Matching (Zhao, Mopuri & Bilen, ICLR 2021), and DSA:
Dataset Condensation with Differentiable Siamese Augmentation (Zhao & Bilen, ICML 2021).

Every outer iteration draws a freshly initialised network θ. Then, ``outer_loop`` times: for
each class c, the gradient of the cross-entropy on a real batch of class c (``batch_real``
images) and on the synthetic images of class c (kept in the graph) are compared layer by layer,

    D(∇_real, ∇_syn) = Σ_layers Σ_out (1 − cos(∇_real[out, :], ∇_syn[out, :]))

(a parameter tensor with two or more dimensions is reshaped to [out, −1]; one-dimensional
tensors, biases and normalisation scales, count 0: the authors' ``'ours'`` metric); the sum
over classes is minimised by one SGD step on the images. Unless it is the last outer loop, the
network is then trained ``inner_loop`` epochs on the (detached) synthetic set, so that later
matchings happen along a training trajectory. The network is trained only there; the images
only by the matching.

DSA is the same procedure with differentiable augmentation (``algorithms/augment.py``): the real
and the synthetic batch of a class go through the *same* transformation, one parameter set for
both batches and all their images (the authors seed their augmentation identically for the two
batches and copy the first sample's parameters to the whole batch); the inner training augments
every image with its own parameters, as the authors' training epochs do.

The authors' settings (``main.py`` and ``utils.py`` of github.com/VICO-UoE/DatasetCondensation):
``lr_img`` 0.1 with momentum 0.5 for the images, the network trained with plain SGD at
``lr_net`` 0.01 in batches of ``batch_train`` 256, real batches of ``batch_real`` 256 per class,
``outer_loop``/``inner_loop`` 1/1 at 1 image per class, 10/50 at 10, 50/10 at 50 (``get_loops``),
1000 outer iterations. A distilled set is evaluated with lr 0.01 (the authors' ``lr_net``): that
fixed step size travels in the :class:`SyntheticSet`; it is not learned. DC's ``main.py``
initialises the images with noise by default; DSA's documented runs use ``--init real``, the
default here (``pix_init``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .augment import DEFAULT_STRATEGY, DSA, AugSample, DSAConfig, check_strategy
from .base import (ImageSetState, SyntheticSet, check_config, check_finite, hp, one_of, positive,
                   positive_or_none, unit_interval)
from .evaluate import init_images
from .networks import Manifest, fresh_params, functional_forward, manifest_of

EVAL_LR = 0.01  # the step size a DC/DSA/DM set is evaluated with (the authors' lr_net); not learned

# (outer_loop, inner_loop) per images-per-class, the authors' get_loops
LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


def loops_for(ipc: int) -> tuple[int, int]:
    """The authors' (outer_loop, inner_loop) for ``ipc`` images per class."""
    if ipc not in LOOPS:
        raise ValueError(f"ipc: the authors define outer_loop/inner_loop only for ipc in {sorted(LOOPS)}, "
                         f"not {ipc}; set outer_loop and inner_loop in the config")
    return LOOPS[ipc]


def check_ipc(cfg: Any) -> None:
    if isinstance(cfg.ipc, bool) or not isinstance(cfg.ipc, int) or cfg.ipc < 1:
        raise ValueError(f"{type(cfg).__name__}.ipc must be an integer >= 1, not {cfg.ipc!r}")


@dataclass(frozen=True)
class DCConfig:
    ipc: int
    dsa: bool = hp(False, doc="false: DC; true: DSA (differentiable siamese augmentation)")
    dsa_strategy: str = hp(DEFAULT_STRATEGY, check_strategy, added=True,
                           doc="DSA families joined by _ (digits: color_crop_cutout_scale_rotate, no flip)")
    outer_loop: int | None = hp(None, positive_or_none("the authors' value for the ipc"), integer=True,
                                doc="matchings per network; null: the authors' get_loops")
    inner_loop: int | None = hp(None, lambda v: None if v is None or v >= 0 else
                                "must be >= 0 or null (the authors' value for the ipc)", integer=True,
                                doc="network training epochs between matchings; null: the authors' get_loops")
    lr_img: float = hp(0.1, positive, doc="learning rate of the pixels (SGD)")
    momentum: float = hp(0.5, unit_interval, doc="momentum of the pixels' SGD")
    lr_net: float = hp(0.01, positive, doc="the network's SGD step size in the inner training")
    batch_real: int = hp(256, positive, integer=True, doc="real images per class and matching")
    batch_train: int = hp(256, positive, integer=True, doc="synthetic images per inner training step")
    pix_init: str = hp("real", one_of("real", "noise"), doc="initial images: real ones, or noise")

    def __post_init__(self):
        check_ipc(self)
        check_config(self)
        if (self.outer_loop is None or self.inner_loop is None) and self.ipc not in LOOPS:
            raise ValueError(f"DCConfig.outer_loop/inner_loop: the authors' defaults cover ipc in {sorted(LOOPS)}, "
                             f"not {self.ipc}; set both")

    def loops(self) -> tuple[int, int]:
        """(outer_loop, inner_loop): the config's, or the authors' defaults for its ipc."""
        outer, inner = LOOPS.get(self.ipc, (None, None))
        return (self.outer_loop if self.outer_loop is not None else outer,
                self.inner_loop if self.inner_loop is not None else inner)

    def to_dict(self) -> dict:
        return asdict(self)


def gradient_distance(g_syn: Sequence[torch.Tensor], g_real: Sequence[torch.Tensor]) -> torch.Tensor:
    """The authors' layer-wise gradient distance (``'ours'``): for every parameter tensor with
    two or more dimensions, reshaped to [out, −1], the sum over output units of
    1 − cos(real row, synthetic row) (the product of the norms plus 1e-6 as denominator, as the
    authors); one-dimensional tensors (biases, normalisation parameters) count 0."""
    if len(g_syn) != len(g_real):
        raise ValueError(f"{len(g_syn)} synthetic gradient tensors against {len(g_real)} real ones")
    total = None
    for gs, gr in zip(g_syn, g_real):
        if gs.shape != gr.shape:
            raise ValueError(f"gradient shapes differ: {tuple(gs.shape)} and {tuple(gr.shape)}")
        if gs.dim() < 2:
            continue
        gs, gr = gs.reshape(gs.shape[0], -1), gr.reshape(gr.shape[0], -1)
        cos = (gs * gr).sum(-1) / (gs.norm(dim=-1) * gr.norm(dim=-1) + 1e-6)
        d = (1 - cos).sum()
        total = d if total is None else total + d
    if total is None:
        ref = g_syn[0] if len(g_syn) else torch.zeros(())
        return ref.new_zeros(())
    return total


def split_grad(flat_grad: torch.Tensor, manifest: Manifest) -> list[torch.Tensor]:
    """Views of a flat gradient shaped like the parameters of ``manifest``."""
    out, i = [], 0
    for _, shape in manifest:
        n = math.prod(shape)
        out.append(flat_grad[i : i + n].view(shape))
        i += n
    return out


def siamese_sample(augment: DSA, size: int, generator: torch.Generator) -> AugSample:
    """One augmentation parameter set (batch mode) to apply to the real and the synthetic batch
    of a class alike; :func:`broadcast_sample` fits it to each batch's size."""
    return augment.sample(1, size, generator)


def broadcast_sample(sample: AugSample, n: int) -> AugSample:
    return AugSample(sample.families, {k: v.expand(n, *v.shape[1:]) for k, v in sample.params.items()})


def siamese_augment(cfg: DSAConfig | None) -> DSA:
    """The augmentation of the matching: the given families and strengths, one parameter set per
    batch (``batchmode``) whatever the config says, as the authors' Siamese mode."""
    cfg = cfg or DSAConfig()
    return DSA(DSAConfig(**{**asdict(cfg), "batchmode": True}))


class ClassSampler:
    """Real images by class, and the authors' real batches: ``n`` distinct random images of a
    class (all of them when the class has fewer), drawn from the distiller's generator."""

    def __init__(self, x_real: torch.Tensor, y_real: torch.Tensor, num_classes: int, device: torch.device):
        self.x = x_real.to(device, torch.float32)
        y = y_real.cpu()
        self.indices = [torch.nonzero(y == c).flatten() for c in range(num_classes)]
        empty = [c for c, idx in enumerate(self.indices) if len(idx) == 0]
        if empty:
            raise ValueError(f"classes {empty} have no real training images")

    def pick(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """The indices (on the CPU) of the batch :meth:`batch` would return, from the same draw."""
        idx = self.indices[c]
        return idx[torch.randperm(len(idx), generator=generator)[:n]]

    def batch(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.x[self.pick(c, n, generator).to(self.x.device)]

    def batch_sizes(self, n: int) -> list[int]:
        """How many images :meth:`batch` returns for each class."""
        return [min(n, len(idx)) for idx in self.indices]


def draw_seed(generator: torch.Generator) -> int:
    return int(torch.randint(2 ** 62, (1,), generator=generator))


class DCDistiller(ImageSetState):
    """DC (``cfg.dsa`` false) or DSA (true). ``net`` is a template: every outer iteration starts
    from a fresh initialisation of it (:func:`fresh_params`, seeded from the distiller's
    generator); the distiller runs it functionally from a flat parameter vector."""

    def __init__(self, net: nn.Module, x_real: torch.Tensor, y_real: torch.Tensor, num_classes: int,
                 cfg: DCConfig, seed: int = 0, device: str | torch.device = "cpu", dsa: DSAConfig | None = None):
        self.net, self.cfg, self.num_classes = net.to(device), cfg, num_classes
        self.manifest: Manifest = manifest_of(net)
        self.device = torch.device(device)
        self.outer_loop, self.inner_loop = cfg.loops()
        self.gen = torch.Generator().manual_seed(seed)
        dsa = dsa or DSAConfig(strategy=cfg.dsa_strategy)
        self.match_augment = siamese_augment(dsa) if cfg.dsa else None
        self.train_augment = DSA(dsa) if cfg.dsa else None
        self.real = ClassSampler(x_real, y_real, num_classes, self.device)
        images, labels, self.init_index = init_images(x_real, y_real, cfg.ipc, num_classes, cfg.pix_init, self.gen)
        self.images = images.to(self.device, torch.float32).requires_grad_(True)
        self.labels = labels.to(self.device)
        self.opt_img = torch.optim.SGD([self.images], lr=cfg.lr_img, momentum=cfg.momentum)
        self.iteration = 0

    def _ce_grad(self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor, create_graph: bool) -> torch.Tensor:
        ce = F.cross_entropy(functional_forward(self.net, params, x, self.manifest), y)
        return torch.autograd.grad(ce, params, create_graph=create_graph)[0]

    def _match_class(self, params: torch.Tensor, c: int) -> torch.Tensor:
        """The gradient distance of class c at ``params`` (in the graph of the images)."""
        ipc = self.cfg.ipc
        x_real = self.real.batch(c, self.cfg.batch_real, self.gen)
        x_syn = self.images[c * ipc:(c + 1) * ipc]
        if self.match_augment is not None:
            s = siamese_sample(self.match_augment, x_syn.shape[-1], self.gen)
            x_real = self.match_augment.apply(x_real, broadcast_sample(s, len(x_real)))
            x_syn = self.match_augment.apply(x_syn, broadcast_sample(s, len(x_syn)))
        y_real = torch.full((len(x_real),), c, dtype=torch.long, device=self.device)
        y_syn = torch.full((len(x_syn),), c, dtype=torch.long, device=self.device)
        g_real = self._ce_grad(params, x_real, y_real, create_graph=False).detach()
        g_syn = self._ce_grad(params, x_syn, y_syn, create_graph=True)
        return gradient_distance(split_grad(g_syn, self.manifest), split_grad(g_real, self.manifest))

    def _train_network(self, params: torch.Tensor) -> torch.Tensor:
        """``inner_loop`` epochs of plain SGD on the detached synthetic set (augmented with DSA)."""
        images, n = self.images.detach(), len(self.labels)
        p = params.detach()
        for _ in range(self.inner_loop):
            for idx in torch.randperm(n, generator=self.gen).split(self.cfg.batch_train):
                x = images[idx.to(self.device)]
                if self.train_augment is not None:
                    x = self.train_augment.apply(x, self.train_augment.sample(len(idx), x.shape[-1], self.gen))
                p = p.requires_grad_(True)
                g = self._ce_grad(p, x, self.labels[idx.to(self.device)], create_graph=False)
                p = (p - self.cfg.lr_net * g).detach()
        check_finite("network parameters (inner training)", p, self.iteration)
        return p

    def step(self) -> dict[str, float]:
        params = fresh_params(self.net, draw_seed(self.gen)).to(self.device)
        losses = []
        for ol in range(self.outer_loop):
            params = params.detach().requires_grad_(True)
            self.opt_img.zero_grad(set_to_none=True)
            total = 0.0
            for c in range(self.num_classes):  # one backward per class: the sum's gradient, less memory
                dist = self._match_class(params, c)
                check_finite("gradient-matching loss", dist, self.iteration)
                torch.autograd.backward(dist, inputs=[self.images])
                total += dist.item()
            check_finite("image gradient", self.images.grad, self.iteration)
            self.opt_img.step()
            losses.append(total)
            if ol < self.outer_loop - 1:
                params = self._train_network(params)
        self.iteration += 1
        # loss: the matching objective (summed over classes) averaged over the outer loops;
        # loss_first: at the fresh initialisation, comparable from one iteration to the next
        return {"loss": sum(losses) / len(losses), "loss_first": losses[0]}

    def synthetic(self) -> SyntheticSet:
        return SyntheticSet(self.images.detach().cpu().clone(), self.labels.cpu().clone(), EVAL_LR)
