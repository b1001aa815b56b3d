"""The small protocol every distiller follows, so that the orchestrator treats them alike."""
from __future__ import annotations

import contextlib
import copy
import math
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Callable, Protocol

import torch


class DivergenceError(RuntimeError):
    """Distillation produced a NaN or infinite value; the message says which and when."""


@dataclass
class SyntheticSet:
    images: torch.Tensor  # float32 N,C,H,W in the dataset's normalised input space
    labels: torch.Tensor  # int64 N
    lr: float  # learned step size to train on this set with

    def detached(self) -> "SyntheticSet":
        return SyntheticSet(self.images.detach().cpu().clone(), self.labels.detach().cpu().clone(), float(self.lr))


@dataclass
class RealSequences:
    """Real event sequences used as a set (the random baseline of a sequence task)."""
    sequences: torch.Tensor  # int64 [mu, L]
    lr: float

    def training_input(self) -> torch.Tensor:
        return self.sequences

    def detached(self) -> "RealSequences":
        return RealSequences(self.sequences.detach().cpu().clone(), float(self.lr))


class SequenceSet(Protocol):
    """A set of (possibly soft) sequences: what a sequence-task distiller produces."""
    lr: float

    def training_input(self) -> torch.Tensor:
        """int64 ids [mu, L], or distributions over the vocabulary [mu, L, V]."""

    def detached(self) -> "SequenceSet": ...


class Distiller(Protocol):
    """What the orchestrator drives: ``step`` until ``iteration`` reaches the trial's iterations,
    ``synthetic`` for evaluation and export, ``state_dict``/``load_state_dict`` for checkpoints
    (a restored distiller's next ``step`` equals the uninterrupted one's). Optionally
    ``init_index``: the rows of the real training data its start holds (None: none), which the
    orchestrator records with its sets. Optionally ``warm_start(images, lr)``: start (at iteration
    0, before any step) from a given set instead of its own initialisation (``init_from``)."""
    iteration: int

    def step(self) -> dict[str, float]:
        """One outer iteration; returns scalar metrics. Raises DivergenceError on NaN/inf."""

    def synthetic(self) -> SyntheticSet | SequenceSet:
        """Image tasks: a :class:`SyntheticSet`; sequence tasks: a :class:`SequenceSet`."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def autocast(device: torch.device | str, precision: str) -> typing.ContextManager:
    """The context a distillation step runs in: ``fp32`` as written, or ``bf16`` under
    :func:`torch.autocast` (convolutions and matrix products in bfloat16, parameters, images and
    optimiser states stay float32). On a CPU with AMX, or a GPU with tensor cores, a step bound by
    large convolutions and memory traffic gains most (DC on MNIST 1.8x on this project's CPU, DM
    1.4x, MTT's small student batches 1.2x: ``bench/precision.py``)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(f"precision must be fp32 or bf16, not {precision!r}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 in hardware: a GPU that supports it, or a CPU whose
    oneDNN has bf16 kernels (AVX512 cores, AMX). On other CPUs (AVX2 only) autocast emulates
    bf16 and a step is tens of times slower than fp32 (DM on MNIST: ``bench/precision.py``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True  # no way to tell: trust the spec
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the probe: trust the spec
        return True


def c_compiler() -> str | None:
    """The C compiler Triton builds its kernel launchers with, found as Triton (``runtime/build.py``)
    finds it on Linux: ``$CC``, else ``gcc``, else ``clang`` on the PATH; None without one."""
    import os
    import shutil

    return os.environ.get("CC") or next(filter(None, map(shutil.which, ("gcc", "clang"))), None)


def compiled(fn: typing.Callable, device: torch.device | str) -> typing.Callable:
    """``fn`` through :func:`torch.compile` (inductor), for a step that differentiates once
    (torch.compile does not take a double backward: DC's, DSA's and MTT's steps). On a CPU
    inductor builds C++ kernels, on a GPU Triton kernels whose launchers Triton compiles with a C
    compiler: without what the device needs this says so now, not at the first step."""
    kind = torch.device(device).type
    if kind == "cpu":
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except Exception as e:  # noqa: BLE001 (inductor raises several kinds)
            raise RuntimeError(f"resources.compile is true, but torch.compile finds no C++ compiler on this "
                               f"machine for its CPU kernels ({e}): install g++ (or set CXX), or set "
                               f"resources.compile: false") from e
    elif kind == "cuda":
        from torch.utils import _triton

        if not _triton.has_triton():
            raise RuntimeError("resources.compile is true, but torch.compile needs Triton for its GPU kernels and "
                               "this environment has none that works with this GPU: install the triton that "
                               "matches torch (pip install triton), or set resources.compile: false")
        if c_compiler() is None:
            raise RuntimeError("resources.compile is true, but Triton finds no C compiler on this machine to build "
                               "its GPU kernels' launchers (it looks at $CC, then gcc, then clang): install gcc "
                               "(or set CC), or set resources.compile: false")
    return torch.compile(fn)


def check_precision(precision: str, device: torch.device | str) -> None:
    """Refuse ``bf16`` steps on a device that would emulate them (ValueError with the fix)."""
    if precision != "bf16" or native_bf16(device):
        return
    cpu = torch.backends.cpu.get_cpu_capability() if torch.device(device).type == "cpu" else str(device)
    raise ValueError(f"resources.precision is bf16, but this {torch.device(device).type.upper()} ({cpu}) has no "
                     "bfloat16 units (a CPU needs AVX512 or AMX): torch.autocast would emulate them, and a step "
                     "would take tens of times longer than in fp32 (DM on MNIST IPC 10: 100 s instead of 7 s on "
                     "an AVX2 CPU; bench/precision.py measures a machine). Set resources.precision: fp32, or run "
                     "the trials where bf16 is native (a GPU, a CPU with AMX)")


def check_finite(name: str, value: torch.Tensor, iteration: int) -> None:
    if not bool(torch.isfinite(value).all()):
        raise DivergenceError(f"{name} is {value.detach().flatten()[:4].tolist()} at iteration {iteration}: "
                              "distillation diverged (lower lr_img / lr_lr or syn_steps)")


class ImageSetState:
    """``state_dict`` / ``load_state_dict`` of a distiller whose whole state is its images and
    labels, one image optimiser (``opt_img``), a generator (``gen``) and an iteration count
    (DC, DSA, DM). Restoring copies the optimiser state: ``Optimizer.load_state_dict`` keeps the
    given momentum buffers, which later steps would update in place in the caller's dict."""

    images: torch.Tensor
    labels: torch.Tensor
    opt_img: torch.optim.Optimizer
    gen: torch.Generator
    iteration: int
    device: torch.device

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "images": self.images.detach().cpu().clone(),
                "labels": self.labels.cpu().clone(), "opt_img": copy.deepcopy(self.opt_img.state_dict()),
                "generator": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["images"].shape) != tuple(self.images.shape):
            raise ValueError(f"state has images of shape {tuple(state['images'].shape)}, "
                             f"this distiller {tuple(self.images.shape)}")
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.device))
        self.labels = state["labels"].to(self.device).clone()
        self.opt_img.load_state_dict(copy.deepcopy(state["opt_img"]))
        self.gen.set_state(state["generator"])
        self.iteration = int(state["iteration"])

    def warm_start(self, images: torch.Tensor, lr: float | None = None) -> None:
        """Start from ``images`` (the layout of :attr:`images`: class-major, the same labels)
        instead of the initialisation; ``lr`` is not read: these sets are evaluated with the
        method's fixed step size. The image optimiser keeps its fresh (zero) momentum."""
        check_warm_start(self, images)
        with torch.no_grad():
            self.images.copy_(images.to(self.device, torch.float32))
        self.init_index = None  # no real rows: the start is the given set


def check_warm_start(distiller, images: torch.Tensor) -> None:
    if distiller.iteration != 0:
        raise ValueError(f"warm_start is for a new distiller; this one is at iteration {distiller.iteration}")
    if tuple(images.shape) != tuple(distiller.images.shape):
        raise ValueError(f"warm_start: images of shape {tuple(images.shape)}, this distiller holds "
                         f"{tuple(distiller.images.shape)}")


# -- hyperparameters: each config dataclass declares its checks on its fields -----------------------
Check = Callable[[Any], "str | None"]  # a message when the value is wrong, None when it is fine


def hp(default: Any, check: Check | None = None, *, integer: bool = False, doc: str = "",
       added: bool = False) -> Any:
    """A config field that is a hyperparameter: its default, a check of one value (returns the
    problem, or None), whether it must be a whole number, and a line of documentation. The spec
    validator and :func:`check_config` both read them, so a config is checked in one place.
    ``added``: the field came after specs were written; at its default it is left out of a spec's
    hash, so those specs keep their hash (their sweeps resume, their experts are reused)."""
    return field(default=default, metadata={"check": check, "integer": integer, "doc": doc, "added": added})


def positive(v) -> str | None:
    return None if v > 0 else "must be > 0"


def nonneg(v) -> str | None:
    return None if v >= 0 else "must be >= 0"


def at_least(low) -> Check:
    return lambda v: None if v >= low else f"must be >= {low}"


def unit_interval(v) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def one_of(*choices) -> Check:
    said = (" or ".join(map(str, choices)) if len(choices) <= 2 else f"one of {', '.join(map(str, choices))}")
    return lambda v: None if v in choices else f"must be {said}"


def positive_or_none(what: str) -> Check:
    return lambda v: None if v is None or v > 0 else f"must be > 0 or null ({what})"


def field_check(f: Field) -> tuple[Check | None, bool]:
    """(check, integer) of a config field."""
    return f.metadata.get("check"), bool(f.metadata.get("integer"))


def hyperparameters(cfg: type, budget_field: str) -> dict[str, Any]:
    """A config class's hyperparameters with their defaults (every field but the budget)."""
    return {f.name: (f.default if f.default is not MISSING else None) for f in fields(cfg) if f.name != budget_field}


def check_value(f: Field, v: Any) -> str | None:
    """The problem with value ``v`` of field ``f`` (type from the annotation, then its check)."""
    check, integer = field_check(f)
    if v is None:
        return None  # nullability is the validator's (from the annotation)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return check(v) if check else None
    if not math.isfinite(v):
        return "must be finite"
    if integer and not float(v).is_integer():
        return "must be an integer"
    return check(v) if check else None


def hp_kinds(cfg: type) -> dict[str, tuple[str, bool]]:
    """field -> (kind, nullable) from a config's annotations: ``number`` (int or float; whole
    numbers are the ``integer`` flag's), ``bool`` or ``str``; nullable when None is allowed."""
    hints = typing.get_type_hints(cfg)
    out = {}
    for f in fields(cfg):
        args = typing.get_args(hints[f.name]) or (hints[f.name],)
        base = [a for a in args if a is not type(None)]
        kind = ("bool" if base == [bool] else "str" if base == [str] else
                "number" if base and set(base) <= {int, float} else None)
        if kind is None:
            raise TypeError(f"{cfg.__name__}.{f.name}: no hyperparameter kind for {hints[f.name]}")
        out[f.name] = (kind, type(None) in args)
    return out


KIND_NAMES = {"number": "a number", "bool": "true or false", "str": "a string"}


def has_kind(v: Any, kind: str) -> bool:
    return {"number": isinstance(v, (int, float)) and not isinstance(v, bool),
            "bool": isinstance(v, bool), "str": isinstance(v, str)}[kind]


def check_config(cfg: Any) -> None:
    """Raise ValueError naming the field for the first wrong hyperparameter of config ``cfg``
    (its type from the annotation, then the field's check)."""
    kinds = hp_kinds(type(cfg))
    for f in fields(cfg):
        if "check" not in f.metadata:
            continue  # not a hyperparameter (the budget)
        v = getattr(cfg, f.name)
        kind, nullable = kinds[f.name]
        if v is None and nullable:
            continue
        msg = None if has_kind(v, kind) else f"must be {KIND_NAMES[kind]}{' or null' if nullable else ''}"
        msg = msg or check_value(f, v)
        if msg:
            raise ValueError(f"{type(cfg).__name__}.{f.name}: {msg}, got {v!r}")
