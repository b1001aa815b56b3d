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

from .augment import DEFAULT_STRATEGY, DSAConfig, check_strategy
from .base import (ImageSetState, SyntheticSet, check_config, check_finite, compiled, hp, one_of, positive,
                   unit_interval)
from .dc import (EVAL_LR, ClassSampler, broadcast_sample, check_ipc, draw_seed, init_images,
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


class DMDistiller(ImageSetState):
    """DM. ``net`` is a template with an ``embed`` method: every iteration embeds with a fresh
    initialisation of it (:func:`fresh_params`, seeded from the distiller's generator).
    ``compile``: the embedding through :func:`torch.compile` (see the module's docstring)."""

    def __init__(self, net: nn.Module, x_real: torch.Tensor, y_real: torch.Tensor, num_classes: int,
                 cfg: DMConfig, seed: int = 0, device: str | torch.device = "cpu", dsa: DSAConfig | None = None,
                 compile: bool = False):
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
        self.iteration = 0

    def _class_loss(self, params: torch.Tensor, c: int) -> torch.Tensor:
        ipc = self.cfg.ipc
        x_real = self.real.batch(c, self.cfg.batch_real, self.gen)
        x_syn = self.images[c * ipc:(c + 1) * ipc]
        if self.augment is not None:
            s = siamese_sample(self.augment, x_syn.shape[-1], self.gen)
            x_real = self.augment.apply(x_real, broadcast_sample(s, len(x_real)))
            x_syn = self.augment.apply(x_syn, broadcast_sample(s, len(x_syn)))
        with torch.no_grad():
            emb_real = self.embed(self.net, params, x_real, self.manifest)
        emb_syn = self.embed(self.net, params, x_syn, self.manifest)
        return mean_embedding_distance(emb_real, emb_syn)

    def step(self) -> dict[str, float]:
        params = fresh_params(self.net, draw_seed(self.gen)).to(self.device)  # no gradient: never trained
        self.opt_img.zero_grad(set_to_none=True)
        total = 0.0
        for c in range(self.num_classes):  # one backward per class: the sum's gradient, less memory
            loss = self._class_loss(params, c)
            check_finite("distribution-matching loss", loss, self.iteration)
            torch.autograd.backward(loss, inputs=[self.images])
            total += loss.item()
        check_finite("image gradient", self.images.grad, self.iteration)
        self.opt_img.step()
        self.iteration += 1
        return {"loss": total}  # summed over classes (the minimised objective)

    def synthetic(self) -> SyntheticSet:
        return SyntheticSet(self.images.detach().cpu().clone(), self.labels.cpu().clone(), EVAL_LR)
