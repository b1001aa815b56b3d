"""Farzi (Sachdeva et al. 2023): distil event sequences into a few synthetic *soft* sequences.

Farzi data is a latent tensor ``F [mu, xi, d]`` and a decoder ``M [d, V]``; the synthetic
sequences are ``softmax(F @ M / tau)`` over the vocabulary (the padding id, if any, gets
probability 0). The meta-objective trains a model with Adam for ``T`` steps on the Farzi data,
starting from parameters sampled from expert trajectories on the real data, and minimises the
cross-entropy of the trained model on real sequences with respect to ``F`` and ``M`` (Adam).

The meta-gradient comes from one of two modes:

- ``unrolled``: autograd through the ``T`` Adam steps (``create_graph``); memory grows with T.
- ``reverse``: reverse-mode differentiation of Adam (Maclaurin et al. 2015's reversible learning,
  extended to Adam). The forward pass keeps only ``theta_T, m_T, v_T`` and the minibatch indices;
  the backward pass undoes the Adam updates one step at a time, recomputes each step's gradient
  and takes one Hessian-vector product (for the parameters) and one mixed product (for the data)
  with the same vector. Memory is constant in T (plus ``(theta, m, v)`` every
  ``checkpoint_every`` steps when asked, to bound the rounding error of long reversals).

Derivation (ours; the tests check it against ``unrolled`` to 1e-6 in float64). Forward step t:
``g_t = dL_syn(theta_{t-1}; x_t)``, ``m_t = b1 m_{t-1} + (1-b1) g_t``,
``v_t = b2 v_{t-1} + (1-b2) g_t^2``, ``theta_t = theta_{t-1} - lr mhat_t / (sqrt(vhat_t) + eps)``
with ``mhat = m/(1-b1^t)``, ``vhat = v/(1-b2^t)``. With adjoints ``dtheta`` (of theta_t) and
``dm, dv`` (of m_t, v_t through step t+1), step t of the reverse pass is:

1. ``dm += -lr / ((1-b1^t)(sqrt(vhat)+eps)) * dtheta`` and
   ``dv += lr mhat / (2 (1-b2^t) sqrt(vhat) (sqrt(vhat)+eps)^2) * dtheta`` (0 where vhat = 0);
2. ``theta_{t-1} = theta_t + lr mhat / (sqrt(vhat)+eps)``; recompute ``g_t`` at theta_{t-1};
3. ``u = (1-b1) dm + 2 (1-b2) g_t * dv``;
   ``dtheta += H(theta_{t-1}) u`` and ``dx_t += d/dx (g_t . u)`` (both from one double backward);
4. ``m_{t-1} = (m_t - (1-b1) g_t) / b1``, ``v_{t-1} = (v_t - (1-b2) g_t^2) / b2``;
   ``dm *= b1``, ``dv *= b2``.

The distiller's problem decodes ``softmax(F @ M / tau)`` once per meta-gradient
(``InnerProblem.source``): every inner and reverse step slices that one tensor, the reverse pass
sums ``dx_t`` over the steps in a tensor of the decoded set's shape, and one backward through the
decoder turns the sum into the gradients of ``F`` and ``M``, where decoding per step would cost a
``[mu, xi, V]`` softmax and its backward 2T times.

Truncated backward (``window`` W, the ``backward_steps`` hyperparameter): the forward pass runs all
T steps and the reverse pass stops after step T - W + 1, which is autograd's gradient with the state
after step T - W detached. Its cost is T gradients plus W reverse steps instead of T + T.

``second_moment=False`` drops the ``dv`` path (v treated as a constant of theta), which equals
autograd through Adam with ``g^2`` detached in the second moment.

Dropout in the inner loop (``InnerProblem.step_context``, the ``inner_dropout`` hyperparameter):
step t's model calls run in a context that draws step t's dropout masks from a seed of its own, so
the reverse pass, which recomputes ``g_t`` at ``theta_{t-1}``, meets the very masks the forward
pass used: the inner loss of step t is then a fixed function of (theta, x_t), and every formula
above holds as it stands.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, ContextManager, Sequence

import torch
import torch.nn as nn

from .base import (DivergenceError, at_least, check_config, check_finite, hp, nonneg, one_of, positive,
                   positive_or_none, unit_interval)
from .networks import ensemble_forward, functional_forward, manifest_of
from .seqmodels import last_item_loss, sequence_loss, soft_loss, teacher_loss

GRAD_MODES = ("reverse", "unrolled")
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


# -- Adam, forward and reverse ------------------------------------------------------------------
@dataclass(frozen=True)
class AdamHP:
    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (not infinite) derivative at 0: parameters that never get a gradient
    (v = m = 0) must not turn the meta-gradient into NaN."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def adam_update(m: torch.Tensor, v: torch.Tensor, t: int, hp: AdamHP) -> torch.Tensor:
    """The step ``lr * mhat / (sqrt(vhat) + eps)`` subtracted from the parameters at step t."""
    return hp.lr * (m / (1 - hp.beta1 ** t)) / (safe_sqrt(v / (1 - hp.beta2 ** t)) + hp.eps)


@dataclass
class InnerProblem:
    """The bilevel problem as functions of flat parameters.

    ``data(batch)`` builds the synthetic minibatch of one inner step from ``data_params``
    (differentiably); ``loss(theta, x)`` is the inner (synthetic) loss, ``outer(theta)`` the
    outer (real) loss; ``batches`` holds one entry per inner step, replayed by the reverse pass.
    ``step_context(t)``, when given, is entered around every inner-loss call of step t (1-based),
    forward and reverse: e.g. :func:`seeded_dropout`, so that both passes draw the same masks.

    ``source()``, when given, is the whole synthetic set decoded from ``data_params``
    (differentiably), of which ``data(batch)`` is the slice ``source()[batch]`` (all of it for
    ``None``). The meta-gradients then decode once per call instead of once per inner step and
    per reverse step: every step reads the same decoded tensor, and its adjoint, summed over the
    steps, is pulled back to ``data_params`` once (on PTB's 10 000 words the decode and its
    backward were ~20 % of an outer step). The same meta-gradient, up to rounding."""
    data: Callable[[Any], torch.Tensor]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    outer: Callable[[torch.Tensor], torch.Tensor]
    data_params: Sequence[torch.Tensor]
    batches: Sequence[Any]
    step_context: Callable[[int], ContextManager] | None = None
    source: Callable[[], torch.Tensor] | None = None

    def step(self, t: int) -> ContextManager:
        """The context of inner step ``t``'s loss (none unless ``step_context`` is given)."""
        return self.step_context(t) if self.step_context is not None else contextlib.nullcontext()


@contextlib.contextmanager
def seeded_dropout(model: nn.Module, seed: int):
    """``model`` in training mode (its dropout on) with the random state seeded by ``seed``, and
    the caller's random state and the model's mode restored afterwards: the same seed, shapes and
    device give the same dropout masks, which is what lets the reverse pass replay a step."""
    devices = [d for d in {p.device for p in model.parameters()} if d.type == "cuda"]
    was = model.training
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model.train()
        try:
            yield
        finally:
            model.train(was)


@dataclass
class MetaResult:
    outer_loss: float
    grads: list[torch.Tensor]  # d outer / d data_params
    theta: torch.Tensor  # theta_T (detached)
    inner_first: float  # inner loss at step 1 and at step T
    inner_last: float


def inner_grad(prob: InnerProblem, theta: torch.Tensor, batch, dtype: torch.dtype,
               t: int = 1, data: Callable[[Any], torch.Tensor] | None = None) -> tuple[torch.Tensor, float]:
    """The inner gradient of step ``t`` at ``theta`` (evaluated in the model's ``dtype``) with no graph
    kept; the minibatch from ``data`` (default ``prob.data``)."""
    with torch.enable_grad():
        th = theta.detach().to(dtype).requires_grad_(True)
        with torch.no_grad():
            x = (data or prob.data)(batch)
        with prob.step(t):
            loss = prob.loss(th, x)
        (g,) = torch.autograd.grad(loss, th)
    return g.to(theta.dtype), float(loss.detach())


class _Decoded:
    """The synthetic data of one meta-gradient call: with ``prob.source``, decoded once (``full``,
    its graph back to ``data_params``) and sliced per step from a leaf copy (``leaf``) whose
    gradient the steps sum; without it, ``prob.data`` per step."""

    def __init__(self, prob: InnerProblem, graph: bool):
        self.prob, self.full, self.leaf = prob, None, None
        if prob.source is not None:
            with torch.enable_grad():
                self.full = prob.source()
            self.leaf = self.full if graph else self.full.detach().requires_grad_(True)

    def __call__(self, batch) -> torch.Tensor:
        if self.full is None:
            return self.prob.data(batch)
        return self.leaf if batch is None else self.leaf[batch]

    @property
    def targets(self) -> list[torch.Tensor]:
        """What a reverse step differentiates the data term by: the decoded leaf, else the parameters."""
        return [self.leaf] if self.full is not None else list(self.prob.data_params)

    def pull_back(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """``grads`` (of :attr:`targets`) as gradients of ``data_params``."""
        if self.full is None:
            return grads
        (dx,) = grads
        out = torch.autograd.grad(self.full, list(self.prob.data_params), grad_outputs=dx.to(self.full.dtype),
                                  allow_unused=True)
        return [torch.zeros_like(p) if d is None else d for p, d in zip(self.prob.data_params, out)]


def hvp(loss_fn: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Hessian-vector product ``(d^2 loss / d theta^2) u`` by double backward."""
    with torch.enable_grad():
        th = theta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(th), th, create_graph=True)
        (hu,) = torch.autograd.grad((g * u).sum(), th)
    return hu


def unrolled_meta_grad(theta0: torch.Tensor, prob: InnerProblem, hp: AdamHP, second_moment: bool = True,
                       state_dtype: torch.dtype | None = None, window: int = 0) -> MetaResult:
    """Reference: autograd through the unrolled Adam steps (memory grows with the steps).
    The model runs in ``theta0``'s dtype; Adam's state (parameters and moments) in ``state_dtype``
    (default: the same), as :func:`reverse_meta_grad` does. ``window`` W > 0 truncates the backward
    pass to the last W steps: the state after step T - W is taken as a constant (detached)."""
    dtype = theta0.dtype
    steps = len(prob.batches)
    cut = steps - window if 0 < window < steps else 0
    data = _Decoded(prob, graph=True)  # autograd sums the steps' gradients of the one decoded tensor
    with torch.enable_grad():
        theta = theta0.detach().to(state_dtype or dtype).requires_grad_(True)
        m = torch.zeros_like(theta)
        v = torch.zeros_like(theta)
        first = last = math.nan
        for t, batch in enumerate(prob.batches, 1):
            if t == cut + 1 and cut:
                theta, m, v = theta.detach().requires_grad_(True), m.detach(), v.detach()
            x = data(batch)
            with prob.step(t):
                loss = prob.loss(theta.to(dtype), x)
            (g,) = torch.autograd.grad(loss, theta, create_graph=True)
            last = float(loss.detach())
            first = last if t == 1 else first
            m = hp.beta1 * m + (1 - hp.beta1) * g
            g2 = g * g if second_moment else (g * g).detach()
            v = hp.beta2 * v + (1 - hp.beta2) * g2
            theta = theta - adam_update(m, v, t, hp)
        outer = prob.outer(theta.to(dtype))
        grads = torch.autograd.grad(outer, list(prob.data_params), allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(prob.data_params, grads)]
    return MetaResult(float(outer.detach()), grads, theta.detach(), first, last)


def reverse_meta_grad(theta0: torch.Tensor, prob: InnerProblem, hp: AdamHP, second_moment: bool = True,
                      checkpoint_every: int = 0, state_dtype: torch.dtype | None = torch.float64,
                      window: int = 0) -> MetaResult:
    """Reverse-mode Adam: the same meta-gradient as :func:`unrolled_meta_grad` in memory that does
    not grow with the number of steps (see the module docstring for the derivation).

    ``window`` W > 0 reverses only the last W of the T steps (truncated backpropagation, as in
    RaT-BPTT, Feng et al. 2024): the forward pass still runs all T steps, so the outer loss is the
    one after T steps, but the backward pass costs W steps and the state after step T - W counts
    as a constant. 0 (or W >= T) reverses every step.

    The model (gradients, Hessian-vector products) runs in ``theta0``'s dtype; Adam's state and the
    reversal run in ``state_dtype`` (float64 by default: undoing ``v_t = b2 v_{t-1} + (1-b2) g^2``
    cancels digits, and float32 state makes long reversals diverge; the float64 copies of theta, m
    and v cost 3 x 8 bytes per parameter, independent of the steps)."""
    b1, b2, lr, eps = hp.beta1, hp.beta2, hp.lr, hp.eps
    steps = len(prob.batches)
    dtype = theta0.dtype
    # forward: keep only the last state (and, when asked, every checkpoint_every-th one)
    theta = theta0.detach().to(state_dtype or dtype).clone()
    m = torch.zeros_like(theta)
    v = torch.zeros_like(theta)
    cut = steps - window if 0 < window < steps else 0  # the reverse pass stops after step cut + 1
    # the states the reverse pass restores (only those inside the window are ever read)
    saved: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {0: (theta.clone(), m, v)} if not cut else {}
    data = _Decoded(prob, graph=False)
    first = last = math.nan
    for t, batch in enumerate(prob.batches, 1):
        g, loss = inner_grad(prob, theta, batch, dtype, t, data)
        first = loss if t == 1 else first
        last = loss
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        theta = theta - adam_update(m, v, t, hp)
        if checkpoint_every and t % checkpoint_every == 0 and cut <= t < steps:
            saved[t] = (theta.clone(), m.clone(), v.clone())
    theta_T = theta.clone()

    with torch.enable_grad():
        th = theta.detach().to(dtype).requires_grad_(True)
        outer = prob.outer(th)
        (dtheta,) = torch.autograd.grad(outer, th)
        dtheta = dtheta.to(theta.dtype)
    dm = torch.zeros_like(theta)
    dv = torch.zeros_like(theta)
    dparams = [torch.zeros_like(p, dtype=theta.dtype) for p in data.targets]  # summed in the state dtype
    for t in range(steps, cut, -1):
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        mhat, vhat = m / c1, v / c2
        pos = vhat > 0
        s = safe_sqrt(vhat)
        den = s + eps
        dm = dm - (lr / c1) / den * dtheta
        if second_moment:
            coef = lr * mhat / (2 * c2 * torch.where(pos, s, torch.ones_like(s)) * den * den)
            dv = dv + torch.where(pos, coef, torch.zeros_like(coef)) * dtheta
        prev = saved.get(t - 1)
        theta_prev = prev[0] if prev is not None else theta + lr * mhat / den
        with torch.enable_grad():
            th = theta_prev.detach().to(dtype).requires_grad_(True)
            x = data(prob.batches[t - 1])
            with prob.step(t):
                loss = prob.loss(th, x)
            (g,) = torch.autograd.grad(loss, th, create_graph=True)
            u = (1 - b1) * dm
            if second_moment:
                u = u + 2 * (1 - b2) * g.detach().to(dv.dtype) * dv
            outs = torch.autograd.grad((g * u.to(dtype)).sum(), [th, *data.targets], allow_unused=True)
        dtheta = dtheta + outs[0].to(dtheta.dtype)
        for acc, d in zip(dparams, outs[1:]):
            if d is not None:
                acc.add_(d.to(acc.dtype))
        g = g.detach().to(m.dtype)
        if prev is not None:
            theta, m, v = prev
        else:
            theta = theta_prev
            m = (m - (1 - b1) * g) / b1
            v = ((v - (1 - b2) * g * g) / b2).clamp_min(0)
        dm = b1 * dm
        dv = b2 * dv
    dparams = [d.to(p.dtype) for d, p in zip(data.pull_back(dparams), prob.data_params)]
    return MetaResult(float(outer.detach()), dparams, theta_T, first, last)


def meta_gradient(mode: str, theta0: torch.Tensor, prob: InnerProblem, hp: AdamHP, second_moment: bool = True,
                  checkpoint_every: int = 0, state_dtype: torch.dtype | None = torch.float64,
                  window: int = 0) -> MetaResult:
    if mode == "reverse":
        return reverse_meta_grad(theta0, prob, hp, second_moment, checkpoint_every, state_dtype, window)
    if mode == "unrolled":
        return unrolled_meta_grad(theta0, prob, hp, second_moment, state_dtype, window)
    raise ValueError(f"unknown grad_mode {mode!r} ({' | '.join(GRAD_MODES)})")


# -- Farzi data ---------------------------------------------------------------------------------
@dataclass
class FarziSet:
    """Distilled sequences: ``softmax(F @ M / temperature)``; ``pad_id`` gets probability 0."""
    F: torch.Tensor  # [mu, xi, d]
    M: torch.Tensor  # [d, V]
    temperature: float
    pad_id: int | None
    lr: float  # the inner Adam step size it was distilled for

    def probs(self, index=None) -> torch.Tensor:
        return decode(self.F if index is None else self.F[index], self.M, self.temperature, self.pad_id)

    def training_input(self) -> torch.Tensor:
        """What a model trains on (the :class:`algorithms.base.SequenceSet` protocol): the
        distributions over the vocabulary, ``[mu, xi, V]``."""
        return self.probs()

    def detached(self) -> FarziSet:
        return FarziSet(self.F.detach().cpu().clone(), self.M.detach().cpu().clone(), self.temperature,
                        self.pad_id, float(self.lr))

    def top_tokens(self, k: int = 1) -> torch.Tensor:
        """The ``k`` most likely ids per position: ``[mu, xi, k]``."""
        with torch.no_grad():
            return self.probs().topk(k, dim=-1).indices

    def entropy(self) -> float:
        """Mean entropy (nats) of the per-position distributions."""
        with torch.no_grad():
            p = self.probs()
            return float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())


def decode(F: torch.Tensor, M: torch.Tensor, temperature: float, pad_id: int | None) -> torch.Tensor:
    logits = (F @ M) / temperature
    if pad_id is not None:
        logits = logits.index_fill(-1, torch.tensor([pad_id], device=logits.device), float("-inf"))
    return logits.softmax(-1)


def draw_real(real: torch.Tensor, pad_id: int | None, mu: int, xi: int, generator: torch.Generator,
              init: str) -> torch.Tensor:
    """The indices of ``mu`` random real sequences, drawn among those that fill all of their last
    ``xi`` positions when there are at least ``mu`` of them, else the ``mu`` longest."""
    if len(real) < mu:
        raise ValueError(f"init {init!r} needs {mu} real sequences, there are {len(real)}")
    filled = (real[:, -xi:] != (-1 if pad_id is None else pad_id)).sum(1)
    full = (filled == min(xi, real.shape[1])).nonzero().squeeze(1)
    pool = full if len(full) >= mu else filled.argsort(descending=True, stable=True)[:mu]
    return pool[torch.randperm(len(pool), generator=generator)[:mu]]


def real_rows(real: torch.Tensor, pad_id: int | None, mu: int, xi: int, generator: torch.Generator,
              init: str) -> torch.Tensor:
    """The real sequences :func:`draw_real` draws, cut (or left-padded) to their last ``xi``
    positions: ``[mu, xi]`` ids (padding ``pad_id``, or -1 where there is none)."""
    rows = real[draw_real(real, pad_id, mu, xi, generator, init)]
    return rows[:, -xi:] if rows.shape[1] >= xi else torch.nn.functional.pad(
        rows, (xi - rows.shape[1], 0), value=-1 if pad_id is None else pad_id)


def real_init(F: torch.Tensor, M: torch.Tensor, real: torch.Tensor, pad_id: int | None, temperature: float,
              generator: torch.Generator, target: float = 0.9) -> torch.Tensor:
    """``F`` whose decoded sequences start as ``len(F)`` random real sequences: position t of
    synthetic sequence i is the latent vector ``a M[:, j] / ||M[:, j]||^2`` of item j, the item at
    the same distance from the end of real sequence i (real sequences are left-padded, synthetic
    ones are aligned to their end), so that j's logit is ``a / tau``. Positions a shorter real
    sequence does not reach (padding) keep their entries of ``F``.

    How peaked that start can be is bounded by the latent size d: with ``M`` ~ N(0, 1/d) the other
    items' logits are ~ N(0, (a/sqrt(d))^2), so the item's probability is about
    ``1 / (1 + V exp(a^2 / 2d - a))`` (logits in units of tau). ``a`` is the smallest value that
    gives it ``target`` (0.9), ``a = d (1 - sqrt(1 - 2 log(target V / (1 - target)) / d))``, or
    ``a = d``, the most peaked start, when d is too small for that: with 1683 items d = 16 reaches
    ~0.6, d = 64 reaches 0.9 at a ≈ 10.5. (A larger ``a`` than needed saturates the softmax and
    starves F of gradient.)

    The real sequences are drawn among those that fill all ``xi`` positions when there are at least
    ``mu`` of them (else the ``mu`` longest): a synthetic sequence has no padding, and positions left
    at their random entries decode to near-uniform items. On ML-100k (17% of the last-50 positions
    are padding; 551 of 943 users fill them), 3 SASRecs trained on the start of 50 sequences reach
    HR@10 4.81 from full users against 4.28 from any users at d = 16, and 6.65 against 6.12 at
    d = 64 (the same users as hard sequences: 6.47 and 5.94)."""
    mu, xi, d = F.shape
    ids = real_rows(real, pad_id, mu, xi, generator, "real")
    keep = ids != (-1 if pad_id is None else pad_id)
    cols = M.t()[ids.clamp_min(0)]  # [mu, xi, d]
    need = 2 * math.log(target * M.shape[1] / (1 - target)) / d
    a = temperature * (d * (1 - math.sqrt(1 - need)) if need < 1 else d)
    out = F.clone()
    out[keep] = (a * cols / (cols ** 2).sum(-1, keepdim=True).clamp_min(1e-12))[keep]
    return out


def teacher_init(logits_of: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, pad_id: int | None,
                 shape: tuple[int, int, int], temperature: float, generator: torch.Generator,
                 target: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F, M)`` whose decoded sequences start as ``mu`` random real sequences (drawn as in
    :func:`real_init`) read by a trained model: the first real position is its item (probability
    ``target`` where d allows), every later position t is the distribution the model ``logits_of``
    (``[mu, xi] ids -> [mu, xi, V]`` logits) predicts for t from the real items before it, and
    padding decodes to the uniform distribution. The logits of all ``mu * xi`` positions (each
    centred: softmax ignores a constant) are split by their rank-d truncated SVD into
    ``F = U sqrt(S)`` and ``M = sqrt(S) V^T`` (scaled by the temperature), the best rank-d
    approximation in Frobenius norm (exact when d >= min(mu * xi, V)). A SASRec's logits are its
    last hidden state times the item embeddings, of rank at most its width + 1 once centred, so
    little is lost at small d except the first positions' items.

    This puts the knowledge of a model trained on all the data into the targets of the synthetic
    sequences (soft labels, as in knowledge distillation). On ML-100k (SASRec dim 64, 50 x 50),
    3 SASRecs trained on the exact sequences (no SVD) from one full-data expert reach HR@10 14.5 ± 0.3
    (full data 15.8-16.3), against 5.6 ± 0.4 for the same 50 users' hard ids; teacher temperature
    0.5: 13.4, 2: 11.8; an ensemble of 5 experts' mean logits: 14.6. This start at d = 64: 13.9 ± 0.6;
    d = 16: 14.3 ± 0.7. Under the sweep's evaluation (5 SASRecs, 100 epochs) this start at d = 64 gives
    14.57 ± 0.48, and read by the 5 experts' mean distribution (``teacher_experts``: 5) 15.25 ± 0.26."""
    mu, xi, d = shape
    ids = real_rows(real, pad_id, mu, xi, generator, "teacher")
    pad = -1 if pad_id is None else pad_id
    is_pad = ids == pad
    with torch.no_grad():
        pred = logits_of(ids.clamp_min(0)).double()  # pred[:, t] is the model's guess for position t + 1
    V = pred.shape[-1]
    first = torch.zeros(mu, xi, V, dtype=torch.float64)
    others = V - 1 - (pad_id is not None)  # the items besides the real one (the pad id gets 0)
    first.scatter_(-1, ids.clamp_min(0).unsqueeze(-1), math.log(target * others / (1 - target)))
    predicted = torch.zeros_like(first)
    predicted[:, 1:] = pred[:, :-1]
    starts = torch.ones_like(is_pad)
    starts[:, 1:] = is_pad[:, :-1]  # the first real position of a (left-padded) sequence has no prefix
    logits = torch.where(starts.unsqueeze(-1), first, predicted)
    logits[is_pad] = 0.0
    keep = torch.ones(V, dtype=torch.bool)
    if pad_id is not None:
        keep[pad_id] = False
        logits[..., pad_id] = 0.0
    logits[..., keep] -= logits[..., keep].mean(-1, keepdim=True)
    U, S, Vh = torch.linalg.svd(temperature * logits.reshape(mu * xi, V), full_matrices=False)
    k = min(d, len(S))
    root = S[:k].sqrt()
    F = torch.zeros(mu * xi, d, dtype=torch.float64)
    M = torch.randn(d, V, generator=generator, dtype=torch.float64) / math.sqrt(d)  # rows beyond the rank:
    F[:, :k] = U[:, :k] * root                                                   # F's columns 0, M random,
    M[:k] = root.unsqueeze(1) * Vh[:k]                                           # so both still get gradient
    return F.reshape(mu, xi, d).float(), M.float()


@dataclass(frozen=True)
class FarziConfig:
    budget: int  # mu: number of synthetic sequences
    seq_len: int = hp(20, at_least(2), integer=True, doc="xi: length of the synthetic sequences")
    latent_dim: int = hp(16, positive, integer=True, doc="d: rank of the latent factorisation F M")
    temperature: float = hp(1.0, positive, doc="tau of softmax(F M / tau)")
    inner_steps: int = hp(20, positive, integer=True, doc="T: inner Adam steps on the synthetic data")
    inner_lr: float = hp(1e-3, positive, doc="inner Adam step size")
    inner_batch: int = hp(0, nonneg, integer=True, doc="synthetic sequences per inner step; 0: all of them")
    beta1: float = hp(0.9, unit_interval, doc="inner Adam beta1")
    beta2: float = hp(0.999, unit_interval, doc="inner Adam beta2")
    # at 1e-8 the meta-gradient is dominated by coordinates whose tiny gradients Adam divides by their tiny
    # sqrt(v), which differ from network to network: on ML-100k two problems' meta-gradients then share no
    # measurable direction, at 1e-4 they do (bench/farzi_snr.py; search_spaces/reference/farzi_ml100k.yaml)
    eps: float = hp(1e-8, positive, doc="inner Adam epsilon")
    outer_lr: float = hp(0.01, positive, doc="outer Adam step size on (F, M)")
    real_batch: int = hp(128, positive, integer=True, doc="real sequences per meta-gradient")
    max_start_epoch: int = hp(2, positive, integer=True, doc="theta_0 from expert epochs 0..max_start_epoch")
    grad_mode: str = hp("reverse", one_of(*GRAD_MODES),
                        doc="reverse: Farzi's memory-flat reverse-mode Adam; unrolled: autograd through T steps")
    second_moment: bool = hp(True, doc="differentiate through Adam's second moment")
    precision: str = hp("float32", one_of(*sorted(PRECISIONS)), doc="the model in the inner loop")
    reverse_precision: str = hp("float64", one_of(*sorted(PRECISIONS)), doc="Adam's state and its reversal")
    # reverse mode: keep (theta, m, v) every k inner steps (0: never). Without, the reversal drifts on long
    # horizons (measured vs unrolled: rel. error 5e-7 at T=50, 12 at T=75, 57 at T=100; 1e-7 with k=25)
    checkpoint_every: int = hp(25, nonneg, integer=True, doc="reverse mode keeps the state every k inner steps")
    init_scale: float = hp(1.0, positive, doc="std of F at random init; M starts N(0, 1/d)")
    # F's start: "random" (N(0, init_scale)) or "real": each position of synthetic sequence i starts as
    # the item at that position of a random real sequence (F[i, t] = a M[:, item] / ||M[:, item]||^2, a
    # chosen for 90% probability on that item where d allows it; sequences that fill all seq_len
    # positions first: see real_init)
    # "teacher": as "real", but each position after the first holds what the teacher (the first expert's last
    # checkpoint; see teacher_experts) predicts for it from the real items before it (soft labels from a
    # full-data model; F and M from the rank-d SVD of those logits: see teacher_init)
    init: str = hp("random", one_of("random", "real", "teacher"),
                   doc="F's start: random, real sequences' items, or a trained expert's predictions along real sequences")
    outer_schedule: str = hp("constant", one_of("constant", "cosine"), doc="outer learning-rate schedule")
    clip_norm: float | None = hp(None, positive_or_none("no clipping"), doc="clip the meta-gradient's L2 norm")
    # theta_0 samples per outer step: the meta-gradient is theta_0's far more than the real batch's (ML-100k,
    # reference start: cosine 0.93-1.0 between two real batches on one theta_0, -0.1..+0.2 between experts),
    # so one sample is mostly noise; K samples average it (K inner loops per step)
    theta_samples: int = hp(1, positive, integer=True, added=True,
                            doc="problems (theta_0, real batch) whose meta-gradients one outer step averages")
    # the outer objective: "loss", Farzi's, the real data's loss after the T inner steps; "match", MTT's
    # objective in Farzi's parameterisation (the baseline the Farzi paper adapts): the normalised distance
    # ||theta_T - theta*_{s+E}||^2 / ||theta_s - theta*_{s+E}||^2 to the expert's checkpoint expert_epochs
    # after the start s (no real batch). Both share a direction between problems only when the inner
    # Adam's eps is not tiny (bench/farzi_snr.py on ML-100k, epoch-1 starts: match +0.47 / loss +0.36 mean
    # cosine at eps 1e-4, +0.006 / +0.03 at 1e-8)
    objective: str = hp("loss", one_of("loss", "match"), added=True,
                        doc="outer objective: real-data loss after T steps, or MTT's distance to an expert checkpoint")
    expert_epochs: int = hp(2, positive, integer=True, added=True,
                            doc="objective match: the target is this many expert epochs after theta_0")
    # objective loss: which next items of the real batch the outer loss scores. "all": every position
    # (Farzi's); "last": each real sequence's last item given the rest, the position a leave-one-out
    # evaluation ranks. On ML-100k from the teacher start, 25 outer steps: HR@10 14.57 -> 14.66 and 14.72
    # with "last", 14.19 with "all" (bench/README.md, Farzi; both keep T's short-horizon bias)
    # "last_unseen": as "last", the softmax over the items the sequence has not seen (the evaluation ranks
    # the target among unseen items: the plain cross-entropy also pays for the seen items' scores, which
    # the ranking ignores)
    outer_positions: str = hp("all", one_of("all", "last", "last_unseen"), added=True,
                              doc="objective loss: score every next item of the real batch, or each sequence's last "
                                  "(last_unseen: against the items it has not seen)")

    # truncated backward (RaT-BPTT, Feng et al. 2024): the inner loop runs all inner_steps, the meta-gradient
    # flows back through the last backward_steps of them only. The outer loss is then the one at the
    # evaluation's horizon (T = 50's short-horizon bias: bench/README.md, Farzi) for the cost of a window
    backward_steps: int = hp(0, nonneg, integer=True, added=True,
                             doc="reverse only the last W inner steps (0: all of them)")
    # "random": each problem runs N ~ U{max(W, 1)..inner_steps} inner steps (RaT-BPTT's random unroll), so
    # the window covers the whole trajectory over the outer steps; "fixed": always inner_steps
    unroll: str = hp("fixed", one_of("fixed", "random"), added=True,
                     doc="inner steps per problem: always inner_steps, or uniform in backward_steps..inner_steps")
    # the outer loss's targets: "data", the real sequences' own next items (Farzi's); "teacher", the next-item
    # distributions the teacher (the first expert's last checkpoint; see teacher_experts) predicts on the same
    # real sequences (soft targets, at the positions outer_positions names; "last": the prediction after each
    # sequence's final item).
    # On ML-100k the data targets' loss, lowered, carries over to the evaluation's training but not to the
    # test item (bench/README.md, Farzi): a set can fit the real users' own next items in ways that do
    # not generalise; the teacher's distributions are what a model that generalises predicts there
    outer_target: str = hp("data", one_of("data", "teacher"), added=True,
                           doc="outer loss against the real next items, or the trained expert's predictions there")
    # the evaluation trains with the model's dropout; without it, the inner loop trains another model than
    # the one the set is for. true: each inner step's masks come from a seed drawn with the problem, and
    # the reverse pass replays them (seeded_dropout); the outer loss stays without dropout, as a test does.
    # On ML-100k (25 steps at outer lr 0.01, the real items as targets) it lowered HR@10 further: 12.94
    # against 13.30 (bench/README.md, Farzi)
    inner_dropout: bool = hp(False, added=True,
                             doc="train the inner model with the model's dropout, one seeded mask per inner step")
    # "the teacher" of init and outer_target "teacher": the first k experts' last checkpoints, their next-item
    # distributions averaged (an ensemble; 1: the first expert's alone, as before). On ML-100k the last
    # checkpoints of the 5 experts score HR@10 15.80-17.18 alone (the first: 15.80), 16.76 as an ensemble
    # of 5 (NDCG@10 8.40 -> 8.68); init "teacher" from that ensemble trains the evaluation's SASRecs to
    # HR@10 15.25 +- 0.26, from the first expert 14.57 +- 0.48 (full data 16.31)
    teacher_experts: int = hp(1, positive, integer=True, added=True,
                              doc="init/outer_target teacher: average the next-item distributions of the first k "
                                  "experts' last checkpoints")
    # Farzi reads each real sequence without its last id (init and outer loss). On a leave-one-out
    # recommendation split a user's validation input is its whole training history: the very context
    # whose next-item prediction outer_target "teacher" scores at "last" (and at "all"). Without the
    # last item no context the outer loop scores is a validation or test input. On ML-100k the
    # overlap is measurable (the students fit the teacher 0.040 +- 0.015 nats more on the outer
    # loss's users' validation inputs than on held-out users'), its effect on the validation items
    # is not. With this option its own users' validation HR@10 fell against held-out users' in 25
    # steps (two splits pooled: -3.0 +- 1.1 points), but mostly from a start that favoured them by
    # chance; at step 25 its sets differ from the standard recipe's by -1.3 +- 1.3 (bench/README.md,
    # Farzi, farzi_holdout.py)
    real_drop_last: bool = hp(False, added=True,
                              doc="read each real sequence without its last item (no outer-loss context is then a "
                                  "leave-one-out validation input)")

    def __post_init__(self):
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(f"FarziConfig.budget must be an integer >= 1, got {self.budget!r}")
        check_config(self)
        if self.teacher_experts > 1 and self.init != "teacher" and self.outer_target != "teacher":
            raise ValueError(f"FarziConfig.teacher_experts is {self.teacher_experts}, but neither init nor "
                             "outer_target is 'teacher': nothing reads the teacher")
        if self.objective == "match" and self.outer_target != "data":
            raise ValueError("FarziConfig.outer_target 'teacher' scores the real batch of objective 'loss'; "
                             "objective 'match' has none")
        if self.backward_steps > self.inner_steps:
            raise ValueError(f"FarziConfig.backward_steps ({self.backward_steps}) exceeds inner_steps "
                             f"({self.inner_steps}): the window reverses some of the inner steps")

    def to_dict(self) -> dict:
        return asdict(self)


class FarziDistiller:
    """The distiller protocol (``step``, ``synthetic``, ``state_dict``) for Farzi.

    ``model`` is a template (its own parameters are unused); ``trajectories`` are the experts'
    flat parameters per epoch (``[epochs+1, P]`` each); ``real`` holds the real training sequences
    ``[N, L]`` (int64, left-padded with ``pad_id`` for recommendation). ``iterations`` is the
    number of outer steps planned, which the cosine schedule of the outer learning rate needs."""

    def __init__(self, model: nn.Module, trajectories: Sequence[torch.Tensor], real: torch.Tensor,
                 vocab_size: int, pad_id: int | None, cfg: FarziConfig, seed: int = 0,
                 device: str | torch.device = "cpu", iterations: int | None = None):
        max_len = getattr(getattr(model, "cfg", None), "max_len", None)
        if max_len is not None and cfg.seq_len > max_len:
            raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_len {max_len}")
        self.cfg, self.device, self.pad_id = cfg, torch.device(device), pad_id
        self.dtype = PRECISIONS[cfg.precision]
        self.model = copy.deepcopy(model).to(self.device, self.dtype).eval()
        self.manifest = manifest_of(self.model)
        if cfg.inner_dropout and not getattr(getattr(model, "cfg", None), "dropout", 0):
            raise ValueError("inner_dropout: the model has no dropout (model.dropout is 0), so the inner loop would "
                             "train exactly as without it")
        self.trajectories = list(trajectories)
        if cfg.teacher_experts > len(self.trajectories):
            raise ValueError(f"teacher_experts is {cfg.teacher_experts}, but there are "
                             f"{len(self.trajectories)} experts")
        self.teachers = [t[-1].to(self.device, self.dtype) for t in self.trajectories[: cfg.teacher_experts]]
        # real_drop_last: the last column of the (left-padded) rows is each sequence's last id; give rows
        # one longer than the model's max_len to keep max_len ids of context
        self.real = real = real[:, :-1] if cfg.real_drop_last else real
        if max_len is not None and real.shape[1] > max_len:
            raise ValueError(f"the real sequences are {real.shape[1]} long{' without their last id' * cfg.real_drop_last}"
                             f", more than the model's max_len {max_len}")
        self.gen = torch.Generator().manual_seed(seed)
        if cfg.outer_schedule == "cosine" and not iterations:
            raise ValueError("outer_schedule 'cosine' needs the number of outer iterations")
        self.iterations = iterations
        F0 = torch.randn(cfg.budget, cfg.seq_len, cfg.latent_dim, generator=self.gen) * cfg.init_scale
        M0 = torch.randn(cfg.latent_dim, vocab_size, generator=self.gen) / math.sqrt(cfg.latent_dim)
        # which real sequences the start reads (init real/teacher): the draw real_rows makes next
        self.init_index = (draw_real(real, pad_id, cfg.budget, cfg.seq_len,
                                     torch.Generator().set_state(self.gen.get_state()), cfg.init)
                           if cfg.init in ("real", "teacher") else None)
        if cfg.init == "real":
            F0 = real_init(F0, M0, real, pad_id, cfg.temperature, self.gen)
        elif cfg.init == "teacher":
            F0, M0 = teacher_init(lambda ids: self.teacher(ids.to(self.device)).cpu(), real, pad_id,
                                  (cfg.budget, cfg.seq_len, cfg.latent_dim), cfg.temperature, self.gen)
        # F and M live in the model's precision (float64 makes the two grad modes agree to 1e-6)
        self.F = F0.to(self.device, self.dtype).requires_grad_(True)
        self.M = M0.to(self.device, self.dtype).requires_grad_(True)
        self.opt = torch.optim.Adam([self.F, self.M], lr=cfg.outer_lr)
        self.hp = AdamHP(cfg.inner_lr, cfg.beta1, cfg.beta2, cfg.eps)
        self.iteration = 0

    def _forward(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_forward(self.model, theta, x, self.manifest)

    @torch.no_grad()
    def teacher(self, ids: torch.Tensor) -> torch.Tensor:
        """The teacher's next-id logits on ``ids``: the first expert's last checkpoint's, or with
        ``teacher_experts`` k > 1 the log of the mean of the first k experts' distributions."""
        return ensemble_forward(self.model, self.teachers, ids, self.manifest)

    def problem(self, expert: int | None = None, start: int | None = None
                ) -> tuple[torch.Tensor, InnerProblem, dict[str, float]]:
        """Sample theta_0 (expert ``expert``'s epoch ``start`` when given), the inner minibatches and
        the outer objective (a real batch, or the expert's checkpoint ``expert_epochs`` later)."""
        cfg, g = self.cfg, self.gen
        match = cfg.objective == "match"
        e = int(torch.randint(len(self.trajectories), (1,), generator=g)) if expert is None else expert
        traj = self.trajectories[e]
        last = len(traj) - 1 - (cfg.expert_epochs if match else 0)
        if last < 0:
            raise ValueError(f"expert {e} has {len(traj) - 1} epochs: fewer than expert_epochs ({cfg.expert_epochs})")
        if start is None:
            start = int(torch.randint(min(cfg.max_start_epoch, last) + 1, (1,), generator=g))
        elif not 0 <= start <= last:
            raise ValueError(f"start epoch {start} outside 0..{last} for expert {e}")
        theta0 = traj[start].to(self.device, self.dtype)
        steps = cfg.inner_steps
        if cfg.unroll == "random":
            low = max(cfg.backward_steps, 1)
            steps = low + int(torch.randint(cfg.inner_steps - low + 1, (1,), generator=g))
        if cfg.inner_batch and cfg.inner_batch < cfg.budget:
            batches = [torch.randperm(cfg.budget, generator=g)[: cfg.inner_batch] for _ in range(steps)]
        else:
            batches = [None] * steps
        context = None
        if cfg.inner_dropout:  # drawn only then: the problems of a spec without it stay as they were
            seeds = torch.randint(2**62, (steps,), generator=g).tolist()
            context = lambda t: seeded_dropout(self.model, seeds[t - 1])  # noqa: E731
        if match:
            target = traj[start + cfg.expert_epochs].to(self.device, self.dtype)
            span = float(((theta0.double() - target.double()) ** 2).sum())
            if not span > 0:
                raise ValueError(f"expert {e}: epochs {start} and {start + cfg.expert_epochs} are identical")
            outer = lambda th: ((th - target) ** 2).sum() / span  # noqa: E731
        else:
            real = self.real[torch.randperm(len(self.real), generator=g)[: cfg.real_batch]].to(self.device)
            if cfg.outer_target == "teacher":
                soft = self.teacher(real)
                score = lambda logits, ids, pad: teacher_loss(logits, soft, ids, pad, cfg.outer_positions)  # noqa: E731
            else:
                score = {"all": sequence_loss, "last": last_item_loss,
                         "last_unseen": functools.partial(last_item_loss, mask_seen=True)}[cfg.outer_positions]
            outer = lambda th: score(self._forward(th, real), real, self.pad_id)  # noqa: E731
        prob = InnerProblem(
            data=lambda idx: decode((self.F if idx is None else self.F[idx.to(self.device)]).to(self.dtype),
                                    self.M.to(self.dtype), cfg.temperature, self.pad_id),
            loss=lambda th, x: soft_loss(self._forward(th, x), x),
            outer=outer, data_params=[self.F, self.M], batches=batches, step_context=context,
            source=lambda: decode(self.F.to(self.dtype), self.M.to(self.dtype), cfg.temperature, self.pad_id))
        return theta0, prob, {"expert": float(e), "start_epoch": float(start), "inner_steps": float(steps)}

    def step(self) -> dict[str, float]:
        """One outer step: the meta-gradient averaged over ``theta_samples`` problems, then Adam.
        Metrics (outer and inner losses, start epoch, expert) are the means over the problems."""
        cfg = self.cfg
        grads, sums = None, {"loss": 0.0, "inner_loss_first": 0.0, "inner_loss_last": 0.0,
                             "expert": 0.0, "start_epoch": 0.0, "inner_steps": 0.0}
        for _ in range(cfg.theta_samples):
            theta0, prob, info = self.problem()
            res = meta_gradient(cfg.grad_mode, theta0, prob, self.hp, cfg.second_moment, cfg.checkpoint_every,
                                PRECISIONS[cfg.reverse_precision], cfg.backward_steps)
            check_finite("outer loss", torch.tensor(res.outer_loss), self.iteration)
            for p, gr in zip((self.F, self.M), res.grads):
                check_finite(f"meta-gradient of {'F' if p is self.F else 'M'}", gr, self.iteration)
            grads = list(res.grads) if grads is None else [a + b for a, b in zip(grads, res.grads)]
            for k, v in (("loss", res.outer_loss), ("inner_loss_first", res.inner_first),
                         ("inner_loss_last", res.inner_last), *info.items()):
                sums[k] += v
        k = cfg.theta_samples
        grads = grads if k == 1 else [gr / k for gr in grads]
        for p, gr in zip((self.F, self.M), grads):
            p.grad = gr.to(p.dtype)
        with torch.no_grad():
            gnorm = float(torch.sqrt(sum((gr.double() ** 2).sum() for gr in grads)))
        if not math.isfinite(gnorm):
            raise DivergenceError(f"meta-gradient norm is {gnorm} at iteration {self.iteration + 1}")
        if cfg.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_([self.F, self.M], cfg.clip_norm)
        lr = self.outer_lr(self.iteration)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.iteration += 1
        return {**{name: v / k for name, v in sums.items()}, "grad_norm": gnorm, "outer_lr": lr,
                "entropy": self.synthetic().entropy()}

    def outer_lr(self, iteration: int) -> float:
        """The outer Adam step size of 0-based step ``iteration`` (a function of the step alone, so a
        restored distiller continues the schedule exactly)."""
        cfg = self.cfg
        if cfg.outer_schedule == "cosine":
            return cfg.outer_lr * 0.5 * (1 + math.cos(math.pi * min(iteration, self.iterations) / self.iterations))
        return cfg.outer_lr

    def synthetic(self) -> FarziSet:
        return FarziSet(self.F.detach(), self.M.detach(), self.cfg.temperature, self.pad_id, self.cfg.inner_lr)

    def warm_start(self, F: torch.Tensor, M: torch.Tensor) -> None:
        """Start (a new distiller, at iteration 0) from an exported set's latent sequences ``F``
        [budget, seq_len, latent_dim] and decoder ``M`` [latent_dim, vocab] instead of the
        initialisation. The outer Adam keeps its fresh (zero) moments: an exported set carries none."""
        if self.iteration != 0:
            raise ValueError(f"warm_start is for a new distiller; this one is at iteration {self.iteration}")
        for name, given, ours in (("F", F, self.F), ("M", M, self.M)):
            if tuple(given.shape) != tuple(ours.shape):
                raise ValueError(f"warm_start: {name} of shape {tuple(given.shape)}, this distiller holds "
                                 f"{tuple(ours.shape)}")
        with torch.no_grad():
            self.F.copy_(F.to(self.device, self.dtype))
            self.M.copy_(M.to(self.device, self.dtype))
        self.init_index = None  # no real rows: the start is the given set

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "F": self.F.detach().cpu().clone(), "M": self.M.detach().cpu().clone(),
                "opt": copy.deepcopy(self.opt.state_dict()), "generator": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.F.copy_(state["F"].to(self.device))
            self.M.copy_(state["M"].to(self.device))
        self.opt.load_state_dict(copy.deepcopy(state["opt"]))  # torch keeps (and later updates) the loaded moments
        self.gen.set_state(state["generator"])
        self.iteration = int(state["iteration"])
