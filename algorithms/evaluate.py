"""Downstream evaluation of a (synthetic or real) training set, MTT's protocol.

A fresh network is trained on the set with SGD (momentum 0.9, weight decay 5e-4), the step
size being the learned ``syn_lr`` (or the experts' lr for real subsets), the step size
divided by 10 after half of the epochs, and DSA on every batch (or DC's own augmentation,
``EvalConfig.dc_strategy``, the DC authors' evaluation of DC sets); its final test accuracy is
reported. K networks with different seeds give mean and standard deviation.

Every network trains with one torch thread (:data:`EVAL_THREADS`), whoever runs it: CPU kernels
sum in a different order with another thread count, so the same seed with 2 threads gives other
weights in the last bits (and now and then another test accuracy). With one thread everywhere a
network's result depends only on its seed and the data: a trial, ``orchestrate evaluate`` and a
Ray worker training it in parallel (``evaluate_set``'s ``run``) agree exactly, whatever
``cpus_per_trial`` or the machine's cores.
"""
from __future__ import annotations

import contextlib
import functools
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .augment import DEFAULT_STRATEGY, DSA, DCAugConfig, DCAugment, DSAConfig
from .networks import accuracy, correct, seeded_network


@dataclass(frozen=True)
class EvalConfig:
    networks: int = 5
    epochs: int = 300
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dsa: bool = True
    # DSA's families while training on the set; DC/DSA's authors drop flip for digits (MNIST, SVHN)
    dsa_strategy: str = DEFAULT_STRATEGY
    # DC's own per-image augmentation with these families instead of DSA (``dsa`` is then ignored):
    # DC's authors evaluate DC sets on MNIST with crop_scale_rotate (:class:`augment.DCAugConfig`)
    dc_strategy: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_section(cls, ev: dict, **changes) -> EvalConfig:
        """The protocol of a spec's ``evaluation`` section (networks, epochs, batch size and the
        augmentation), with ``changes`` on top."""
        return cls(**{"networks": ev["networks"], "epochs": ev["epochs"], "batch_size": ev["batch_size"],
                      "dsa": ev["dsa"], "dsa_strategy": ev["dsa_strategy"], "dc_strategy": ev.get("dc_strategy"),
                      **changes})


@dataclass
class EvalResult:
    accs: list[float]
    hits: list[torch.Tensor] | None = None  # per network, which test images it gets right (``per_case``)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accs)

    @property
    def std(self) -> float:
        return statistics.pstdev(self.accs) if len(self.accs) > 1 else 0.0


def train_network(model: dict, info, images: torch.Tensor, labels: torch.Tensor, lr: float, cfg: EvalConfig,
                  seed: int, device: str | torch.device = "cpu") -> torch.nn.Module:
    """One fresh network of seed ``seed`` trained on (images, labels) under the protocol ``cfg``."""
    net = seeded_network(model, info.channels, info.num_classes, info.size, seed).to(device)
    gen = torch.Generator().manual_seed(seed + 104729)
    augment = DCAugment(DCAugConfig(strategy=cfg.dc_strategy)) if cfg.dc_strategy else \
        DSA(DSAConfig(strategy=cfg.dsa_strategy)) if cfg.dsa else None
    opt = torch.optim.SGD(net.parameters(), lr=float(lr), momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    images, labels = images.detach().to(device), labels.to(device)
    decay_at = cfg.epochs // 2 + 1
    net.train()
    for epoch in range(1, cfg.epochs + 1):
        if epoch == decay_at:
            for group in opt.param_groups:
                group["lr"] *= 0.1
        perm = torch.randperm(len(images), generator=gen).to(device)
        for i in range(0, len(images), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            xb = images[idx]
            if augment is not None:
                xb = augment(xb, gen)
            loss = F.cross_entropy(net(xb), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net


def train_on_set(model: dict, info, images: torch.Tensor, labels: torch.Tensor, lr: float,
                 x_test: torch.Tensor, y_test: torch.Tensor, cfg: EvalConfig, seed: int,
                 device: str | torch.device = "cpu") -> float:
    """Train one fresh network on (images, labels) and return its final test accuracy."""
    return accuracy(train_network(model, info, images, labels, lr, cfg, seed, device), x_test, y_test)


EVAL_THREADS = 1  # torch threads of every evaluation network (see the module's docstring)

# A runner maps jobs (zero-argument callables) to their results, in the jobs' order; ``on_done``,
# when given, is called with (index, result) as each job finishes (in any order).
Runner = Callable[..., list]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block, then back to what they were."""
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _train_network(model: dict, info, images: torch.Tensor, labels: torch.Tensor, lr: float,
                   x_test: torch.Tensor, y_test: torch.Tensor, cfg: EvalConfig, seed: int, *,
                   device: str | torch.device = "cpu", per_case: bool = False) -> float | tuple[float, torch.Tensor]:
    with torch_threads(EVAL_THREADS):
        net = train_network(model, info, images, labels, lr, cfg, seed, device)
        if not per_case:
            return accuracy(net, x_test, y_test)
        hits = correct(net, x_test, y_test)
        return int(hits.sum()) / max(1, len(hits)), hits


def network_job(model: dict, info, images: torch.Tensor, labels: torch.Tensor, lr: float,
                x_test: torch.Tensor, y_test: torch.Tensor, cfg: EvalConfig, seed: int,
                device: str | torch.device = "cpu", per_case: bool = False) -> functools.partial:
    """One evaluation network as a job: a picklable zero-argument callable (a ``functools.partial``
    of a module-level function, ``device`` and ``per_case`` keywords) returning its test accuracy,
    or with ``per_case`` (accuracy, which test images it classifies right: bool ``[len(x_test)]``),
    trained with :data:`EVAL_THREADS` torch threads. The set travels on the CPU (detached); the job
    moves it to ``device``, so a job shipped to another process computes exactly what it computes here."""
    return functools.partial(_train_network, model, info, images.detach().cpu(), labels.detach().cpu(), float(lr),
                             x_test, y_test, cfg, seed, device=device, per_case=per_case)


def sequential(jobs: Sequence[Callable[[], Any]], on_done: Callable[[int, Any], None] | None = None) -> list:
    """The default runner: the jobs one after another, in this process."""
    out = []
    for i, job in enumerate(jobs):
        out.append(job())
        if on_done is not None:
            on_done(i, out[-1])
    return out


def evaluate_set(model: dict, info, images: torch.Tensor, labels: torch.Tensor, lr: float,
                 x_test: torch.Tensor, y_test: torch.Tensor, cfg: EvalConfig, seed: int = 0,
                 device: str | torch.device = "cpu", run: Runner | None = None, per_case: bool = False
                 ) -> EvalResult:
    """Train ``cfg.networks`` fresh networks (seeds ``seed``, ``seed+1``, ...) and test each
    (``per_case``: also which test images each gets right, :attr:`EvalResult.hits`).

    ``run`` runs the networks' jobs (:func:`network_job`) and returns their results in order:
    :func:`sequential` by default; ``orchestrator.parallel.RayRunner`` trains them as Ray tasks
    on a cluster's free resources. Each network depends only on its seed, so every runner gives
    the same numbers."""
    jobs = [network_job(model, info, images, labels, lr, x_test, y_test, cfg, seed + k, device, per_case=per_case)
            for k in range(cfg.networks)]
    results = list((run or sequential)(jobs))
    if not per_case:
        return EvalResult(results)
    return EvalResult([acc for acc, _ in results], [hits for _, hits in results])


def paired_difference(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None) -> tuple[float, float]:
    """``a - b`` for two predictors scored on the same test cases (``a``, ``b``: per-case values,
    ``weight``: per-case weights, default 1; :func:`correct`, :func:`algorithms.seqtrain.task_cases`): the difference of their weighted
    means and its standard error over the test cases, sum((d_i - delta w_i)^2) / (n - 1) * n, square
    root, over sum(w), which is the usual std(d) / sqrt(n) with unit weights. NaN for fewer than
    two cases. It is the test set's sampling noise of the difference: the networks the values come
    from are held fixed."""
    d = (a - b).double()
    w = torch.ones_like(d) if weight is None else weight.double()
    n = len(d)
    if n < 2:
        return float("nan"), float("nan")
    delta = float(d.sum() / w.sum())
    se = float(((d - delta * w).pow(2).sum() / (n - 1) * n).sqrt() / w.sum())
    return delta, se


def random_real_index(y: torch.Tensor, per_class: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """The training rows of ``per_class`` random real images of every class, grouped by class
    (0,…,0,1,…): what :func:`random_real_subset` draws with the same generator."""
    return _draw_per_class(y, [per_class] * num_classes, generator, "fewer than {n} per class")


def random_real_subset(x: torch.Tensor, y: torch.Tensor, per_class: int, num_classes: int,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` random real images of every class (the baseline of the same budget)."""
    idx = random_real_index(y, per_class, num_classes, generator)
    return x[idx].clone(), y[idx].clone()


def random_subset_like(x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random real images with the per-class counts of ``labels`` (class ``c``: as many as
    ``labels`` holds), drawn class by class as :func:`random_real_subset` draws them: with the
    same count for every class and the same generator, the same images."""
    counts = torch.bincount(labels.to(torch.int64).flatten(), minlength=num_classes).tolist()
    idx = _draw_per_class(y, counts, generator, "fewer than the set's {n}")
    return x[idx].clone(), y[idx].clone()


def init_images(x_real: torch.Tensor, y_real: torch.Tensor, ipc: int, num_classes: int, pix_init: str,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A distiller's starting set: ``ipc`` images per class, grouped by class (0,…,0,1,…), random
    real ones (``pix_init`` 'real') or N(0, 1) noise ('noise'); and the training rows the real
    ones are (:func:`random_real_index`), None for noise."""
    if pix_init == "real":
        idx = random_real_index(y_real, ipc, num_classes, generator)
        return x_real[idx].clone(), y_real[idx].clone(), idx
    if pix_init != "noise":
        raise ValueError(f"pix_init must be 'real' or 'noise', not {pix_init!r}")
    labels = torch.arange(num_classes).repeat_interleave(ipc)
    return torch.randn((len(labels), *x_real.shape[1:]), generator=generator), labels, None


def _draw_per_class(y: torch.Tensor, counts: list[int], generator: torch.Generator, short: str) -> torch.Tensor:
    """The rows of ``counts[c]`` random real images of each class c, class by class (a class of
    count 0 draws nothing from the generator); ``short`` words the error of a class with too few
    images."""
    picks = []
    for c, n in enumerate(counts):
        if n == 0:
            continue
        idx = torch.nonzero(y == c).flatten()
        if len(idx) < n:
            raise ValueError(f"class {c} has {len(idx)} training images, {short.format(n=n)}")
        picks.append(idx[torch.randperm(len(idx), generator=generator)[:n]])
    return torch.cat(picks) if picks else torch.zeros(0, dtype=torch.int64)
