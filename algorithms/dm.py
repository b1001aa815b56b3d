"""DM: Dataset Condensation with Distribution Matching (Zhao & Bilen, WACV 2023).

Every iteration draws a freshly initialised network and never trains it: it only embeds
(``embed``, the features before the classifier). For each class c, a real batch of class c and
the synthetic images of class c go through the same differentiable Siamese augmentation (one
parameter set for both batches, as in DSA) and are embedded; the loss

    L = Σ_c ‖ mean(embed(real_c)) − mean(embed(syn_c)) ‖²

(the squared distance of the class means: an MMD with a linear kernel in the random network's
feature space) is minimised by one SGD step on the synthetic images. No inner training, no
bilevel optimisation, no experts.

The authors' settings (``main_DM.py`` of github.com/VICO-UoE/DatasetCondensation): ``lr_img``
1.0 with momentum 0.5, real batches of ``batch_real`` 256 per class, the images initialised from
real ones, DSA with ``color_crop_cutout_flip_scale_rotate`` (ParamDiffAug's strengths: the
defaults of :class:`DSAConfig`), 20000 iterations. A distilled set is evaluated with lr 0.01 (the
authors' ``lr_net``), the fixed step size in its :class:`SyntheticSet`.

Classes are embedded in groups: the real images of a group go through one forward, its synthetic
ones through another, and one backward serves the group (the class means are the same, only the
batches larger). On a GPU a step of this size is bound by launching kernels, not by arithmetic, so
:func:`default_forward_images` puts every class in one group up to :data:`GPU_FORWARD_PIXELS` pixels of real
images a forward (MNIST IPC 10: one forward of 2560 images instead of ten of 256; on a step of
width 4 and 2 real images a class, whose time is the host's alone: 1944 operator calls instead of
5363, 9 convolutions instead of 90, 3 reads of a device value instead of 21, and 0.024 s instead of
0.050 on one AVX2 core). On a CPU, where the arithmetic
dominates, a class is a group: larger batches are no faster there, and all ten classes at once are
3x slower (MNIST IPC 10, fp32, two AVX2 cores, ``bench/precision.py --forward-images N``, 2026-12-04:
2.9-3.8 s a step one class a forward, 3.2 s two, 10.8-11.1 s all ten, whose 1 GB activations the
allocator maps afresh every step). On the GPU the gain is expected, not yet measured. The random draws
are the same in either case (per class, in class order), so the grouping changes no recipe: steps
agree to rounding, and a run may resume on another device.

A DM step only differentiates once (the images' gradient of an embedding), so it compiles:
``compile=True`` runs the embedding through :func:`torch.compile` (inductor fuses the instance
norm, ReLU and pooling after each convolution, which on a CPU cost as much as the convolutions:
a step 1.6x faster on MNIST IPC 10 on two AVX2 cores, ``bench/precision.py --compile``). The compiled kernels sum
in another order: the same step to ~1e-7 relative, not bit for bit.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from .augment import DEFAULT_STRATEGY, AugSample, DSA, DSAConfig, check_strategy
from .base import (ImageSetState, SyntheticSet, check_config, check_finite, compiled, hp, one_of, positive,
                   unit_interval)
from .dc import (EVAL_LR, ClassSampler, check_ipc, draw_seed, init_images,
                 siamese_augment, siamese_sample)
from .networks import Manifest, fresh_params, functional_embed, manifest_of


@dataclass(frozen=True)
class DMConfig:
    ipc: int
    lr_img: float = hp(1.0, positive, doc="learning rate of the pixels (SGD)")
    momentum: float = hp(0.5, unit_interval, doc="momentum of the pixels' SGD")
    batch_real: int = hp(256, positive, integer=True, doc="real images per class and iteration")
    pix_init: str = hp("real", one_of("real", "noise"), doc="initial images: real ones, or noise")
    dsa: bool = hp(True, doc="the same augmentation on the real and the synthetic batch of a class")
    dsa_strategy: str = hp(DEFAULT_STRATEGY, check_strategy, added=True,
                           doc="DSA families joined by _ (digits: color_crop_cutout_scale_rotate, no flip)")

    def __post_init__(self):
        check_ipc(self)
        check_config(self)

    def to_dict(self) -> dict:
        return asdict(self)


def mean_embedding_distance(emb_real: torch.Tensor, emb_syn: torch.Tensor) -> torch.Tensor:
    """‖mean(emb_real) − mean(emb_syn)‖² over the batch dimension."""
    return ((emb_real.mean(0) - emb_syn.mean(0)) ** 2).sum()


GPU_FORWARD_PIXELS = 2 ** 22  # real pixels (images x height x width) one forward embeds at most on a GPU


def default_forward_images(device: torch.device, pixels: int) -> int:
    """How many real images of ``pixels`` pixels (height x width) one forward of a DM step embeds
    at most: on a GPU as many as fit
    :data:`GPU_FORWARD_PIXELS` (MNIST: 5349, CIFAR: 4096, 64 px: 1024), so that a step launches few
    large kernels; on a CPU 0, one class a forward (see the module's docstring)."""
    return GPU_FORWARD_PIXELS // pixels if device.type == "cuda" else 0


def class_groups(sizes: list[int], limit: int) -> list[range]:
    """Consecutive classes whose real batches (``sizes``) sum to at most ``limit`` images (a class
    alone when it is larger; ``limit`` 0: one class a group)."""
    groups, start, total = [], 0, 0
    for c, n in enumerate(sizes):
        if c > start and total + n > limit:
            groups.append(range(start, c))
            start, total = c, 0
        total += n
    groups.append(range(start, len(sizes)))
    return groups


def augment_by_class(augment: DSA, x: torch.Tensor, samples: list[AugSample], sizes: list[int]) -> torch.Tensor:
    """``x`` holds consecutive blocks of ``sizes`` rows, one per class; block k gets ``samples[k]``
    (one parameter set for the whole block, as :func:`broadcast_sample`). Classes that drew the same
    families go through one :meth:`DSA.apply` with per-row parameters: every family transforms each
    row on its own, so this equals applying each sample to its block."""
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    by_families: dict[tuple[str, ...], list[int]] = {}
    for k, s in enumerate(samples):
        by_families.setdefault(s.families, []).append(k)
    blocks: list[torch.Tensor | None] = [None] * len(samples)
    for families, ks in by_families.items():
        rows = torch.cat([x[bounds[k]:bounds[k + 1]] for k in ks])
        params = {name: torch.cat([samples[k].params[name].expand(sizes[k], *v.shape[1:]) for k in ks])
                  for name, v in samples[ks[0]].params.items()}
        for k, block in zip(ks, augment.apply(rows, AugSample(families, params)).split([sizes[k] for k in ks])):
            blocks[k] = block
    return torch.cat(blocks)


class DMDistiller(ImageSetState):
    """DM. ``net`` is a template with an ``embed`` method: every iteration embeds with a fresh
    initialisation of it (:func:`fresh_params`, seeded from the distiller's generator).
    ``compile``: the embedding through :func:`torch.compile` (see the module's docstring).
    ``forward_images``: how many real images one forward embeds at most (classes grouped up to it;
    0: one class a forward); by default :func:`default_forward_images` of the device."""

    def __init__(self, net: nn.Module, x_real: torch.Tensor, y_real: torch.Tensor, num_classes: int,
                 cfg: DMConfig, seed: int = 0, device: str | torch.device = "cpu", dsa: DSAConfig | None = None,
                 compile: bool = False, forward_images: int | None = None):
        if not callable(getattr(net, "embed", None)):
            raise TypeError(f"DM needs a network with embed(x); {type(net).__name__} has none")
        self.net, self.cfg, self.num_classes = net.to(device), cfg, num_classes
        self.manifest: Manifest = manifest_of(net)
        self.device = torch.device(device)
        self.embed = compiled(functional_embed, self.device) if compile else functional_embed
        self.gen = torch.Generator().manual_seed(seed)
        self.augment = siamese_augment(dsa or DSAConfig(strategy=cfg.dsa_strategy)) if cfg.dsa else None
        self.real = ClassSampler(x_real, y_real, num_classes, self.device)
        images, labels, self.init_index = init_images(x_real, y_real, cfg.ipc, num_classes, cfg.pix_init, self.gen)
        self.images = images.to(self.device, torch.float32).requires_grad_(True)
        self.labels = labels.to(self.device)
        self.opt_img = torch.optim.SGD([self.images], lr=cfg.lr_img, momentum=cfg.momentum)
        self.forward_images = default_forward_images(self.device, self.images.shape[-2] * self.images.shape[-1]) \
            if forward_images is None else forward_images
        self.iteration = 0

    def _group_loss(self, params: torch.Tensor, classes: range) -> torch.Tensor:
        """The loss summed over ``classes``, from one forward of their real images (a batch of each
        class, augmented as its synthetic images are: one parameter set per class) and one of their
        synthetic ones. The draws are per class, in class order, whatever the group."""
        ipc, side = self.cfg.ipc, self.images.shape[-1]
        picks, samples = [], []
        for c in classes:
            picks.append(self.real.pick(c, self.cfg.batch_real, self.gen))
            if self.augment is not None:
                samples.append(siamese_sample(self.augment, side, self.gen))
        sizes = [len(p) for p in picks]
        x_real = self.real.x[torch.cat(picks).to(self.real.x.device)]
        x_syn = self.images[classes.start * ipc:classes.stop * ipc]
        if self.augment is not None:
            x_real = augment_by_class(self.augment, x_real, samples, sizes)
            x_syn = augment_by_class(self.augment, x_syn, samples, [ipc] * len(classes))
        with torch.no_grad():
            means_real = torch.stack([e.mean(0) for e in self.embed(self.net, params, x_real, self.manifest).split(sizes)])
        means_syn = self.embed(self.net, params, x_syn, self.manifest).view(len(classes), ipc, -1).mean(1)
        return ((means_real - means_syn) ** 2).sum()

    def step(self) -> dict[str, float]:
        params = fresh_params(self.net, draw_seed(self.gen)).to(self.device)  # no gradient: never trained
        self.opt_img.zero_grad(set_to_none=True)
        total = 0.0
        groups = class_groups(self.real.batch_sizes(self.cfg.batch_real), self.forward_images)
        for classes in groups:  # one backward per group: the sum's gradient, less memory
            loss = self._group_loss(params, classes)
            check_finite("distribution-matching loss", loss, self.iteration)
            torch.autograd.backward(loss, inputs=[self.images])
            total += loss.item()
        check_finite("image gradient", self.images.grad, self.iteration)
        self.opt_img.step()
        self.iteration += 1
        return {"loss": total}  # summed over classes (the minimised objective)

    def synthetic(self) -> SyntheticSet:
        return SyntheticSet(self.images.detach().cpu().clone(), self.labels.cpu().clone(), EVAL_LR)
