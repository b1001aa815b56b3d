"""The method registry: what a spec's ``algorithms:`` and ``baselines:`` keys name.

A method is one object (a subclass of :class:`Method`): a name, a config dataclass whose fields
declare the hyperparameters with their checks (``algorithms.base.hp``), the kind of task it
applies to, the expert forms it reads (none for DC, DSA and DM), a feasibility check against the
experts and the model, the step size its sets are evaluated with, and ``build(ctx)`` returning a
distiller (``algorithms.base.Distiller``). The orchestrator drives every method through this
interface and never by its name; the random real subset is one too.

Methods come from three places, in this order: the built-ins below, the entry-point group
``distill_orchestrator.methods`` of installed packages, and an import path given in a spec
(``algorithms: {"my_pkg.my_module:MyMethod": {...}}``).
"""
from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from importlib.metadata import entry_points
from typing import Any, Callable, ClassVar

import torch

from algorithms.base import Distiller, field_check, hp_kinds, hyperparameters

ENTRY_POINT_GROUP = "distill_orchestrator.methods"
Err = Callable[[str, str], None]  # err(spec key, message)


@dataclass
class BuildContext:
    """What ``Method.build`` gets for one trial."""
    budget: int
    hp: dict[str, Any]  # the point's hyperparameters, with integers made whole
    iterations: int
    data: Any  # the task's data (ImageData, RecData, LMData)
    task: Any  # orchestrator.tasks.Task
    model: dict[str, Any]  # the spec's model section
    spec: dict[str, Any]
    expert_files: dict[str, list[str]]  # store form -> one file per expert ({} without experts)
    device: torch.device
    seed: int
    preloaded: dict[str, list] = field(default_factory=dict)  # form -> experts already in memory (benches)
    compile: bool = False  # resources.compile: the step through torch.compile (methods with ``compiles``)

    def config(self, method: "Method"):
        return method.make_config(self.budget, self.hp)

    def image_network(self, seed: int | None = None) -> torch.nn.Module:
        from algorithms.networks import seeded_network

        info = self.data.info
        return seeded_network(self.model, info.channels, info.num_classes, info.size,
                              self.seed if seed is None else seed)

    def full_trajectories(self) -> list[torch.Tensor]:
        from .store import open_trajectory

        if "full" in self.preloaded:
            return list(self.preloaded["full"])
        if "full" not in self.expert_files:
            raise ValueError(f"this method reads full expert trajectories, but the experts keep only "
                             f"{sorted(self.expert_files)}")
        return [open_trajectory(p).params for p in self.expert_files["full"]]


class Method(ABC):
    """Subclass, set the class attributes and implement :meth:`build` (see the README's
    "Adding a method")."""

    name: ClassVar[str] = ""
    config: ClassVar[type | None] = None  # a dataclass; every field but ``budget_field`` is a hyperparameter
    kind: ClassVar[str] = "image"  # the task kind it applies to: image | sequence
    budget_field: ClassVar[str] = "ipc"  # the config field that receives the budget
    fixed: ClassVar[dict[str, Any]] = {}  # config fields the method sets itself (not in specs)
    baseline: ClassVar[bool] = False  # a reference row (spec key ``baselines``), not a distiller to tune
    learns_lr: ClassVar[bool] = True  # its sets carry a learned step size; otherwise fixed_lr's
    # its step can run through torch.compile (``resources.compile``, ``BuildContext.compile``): one
    # backward only; torch.compile takes no double backward (DC's, DSA's, MTT's, Farzi's steps)
    compiles: ClassVar[bool] = False
    description: ClassVar[str] = ""

    # -- hyperparameters -------------------------------------------------------------------------
    def hyperparameters(self, experts: dict[str, Any] | None = None) -> dict[str, Any]:
        """The hyperparameters a spec may set, with their defaults (``experts``: the spec's
        experts section, for defaults that follow it)."""
        if self.config is None:
            return {}
        return {k: v for k, v in hyperparameters(self.config, self.budget_field).items() if k not in self.fixed}

    def hp_fields(self) -> dict[str, Any]:
        """name -> dataclass field of every hyperparameter."""
        if self.config is None:
            return {}
        return {f.name: f for f in fields(self.config) if f.name != self.budget_field and f.name not in self.fixed}

    def hp_kinds(self) -> dict[str, tuple[str, bool]]:
        return {} if self.config is None else hp_kinds(self.config)

    def integer_hps(self) -> tuple[str, ...]:
        return tuple(k for k, f in self.hp_fields().items() if field_check(f)[1])

    def make_config(self, budget: int, hp: dict[str, Any]):
        """The config for one trial: integers made whole (Tune may sample 20.0), fixed fields set."""
        hp = dict(hp)
        for k in self.integer_hps():
            if isinstance(hp.get(k), float) and math.isfinite(hp[k]):
                hp[k] = int(round(hp[k]))
        return self.config(**{self.budget_field: budget, **hp, **self.fixed})

    # -- what it needs -------------------------------------------------------------------------
    def expert_forms(self, hp: dict[str, Any], experts: dict[str, Any]) -> list[str]:
        """The store forms it reads (``full``, or a compact convex form); [] when it needs no experts."""
        return ["full"]

    def check(self, prefix: str, budget: int, hp: dict[str, Any], experts: dict[str, Any], model: dict[str, Any],
              err: Err) -> None:
        """Report combinations that cannot run at ``budget`` (windows beyond the experts, forms
        not kept, ...) with ``err(key, message)``; ``prefix`` is the spec key of ``hp``. ``hp`` values may be grids or distributions: use
        :func:`bounds` for their extremes."""

    def fixed_lr(self, hp: dict[str, Any]) -> float | None:
        """The step size its sets are evaluated with when it does not learn one."""
        return None

    @abstractmethod
    def build(self, ctx: BuildContext) -> Distiller:
        """The distiller of one trial."""

    def start_record(self, distiller: Distiller, task: Any, data: Any, model: dict[str, Any]) -> dict[str, Any] | None:
        """Which real data the start of ``distiller`` (built by :meth:`build`) read, JSON-ready: what
        a trial logs as ``start.json`` and its exported sets carry (metadata ``start``). None: the
        start reads no real data. By default: ``{"init": "real"}`` and the training rows the
        distiller's ``init_index`` names (None when it has none), in the data's own terms
        (``Task.rows_record``; image tasks: ``train_images``)."""
        rows = getattr(distiller, "init_index", None)
        return None if rows is None else {"init": "real", **task.rows_record(data, rows, model)}


def trial_seed(spec: dict[str, Any], point: dict[str, Any]) -> int:
    """The seed of a trial point's distiller (its initial set, its sampling)."""
    return spec["seed"] * 7919 + point["budget"]


def build_point(point: dict[str, Any], spec: dict[str, Any], data: Any, task: Any,
                expert_files: dict[str, list[str]], device: torch.device, seed: int | None = None) -> Distiller:
    """The distiller of one trial point (``Spec.trial_points``) of ``spec`` (``Spec.to_dict()``),
    built by its method from the registry: what a sweep's trial runs, and ``bench/direct.py``."""
    return get(point["algorithm"]).build(BuildContext(
        budget=point["budget"], hp=dict(point["hp"]), iterations=point["iterations"], data=data, task=task,
        model=spec["model"], spec=spec, expert_files=expert_files, device=device,
        seed=trial_seed(spec, point) if seed is None else seed, compile=bool(spec["resources"].get("compile"))))


def bounds(v: Any) -> list[float]:
    """The extreme values a hyperparameter can take in a spec (a value, a grid, a distribution);
    malformed parts, which the validator reports, are skipped."""
    if isinstance(v, list):
        return [x for item in v for x in bounds(item)]
    if isinstance(v, dict):
        if len(v) != 1:
            return []
        (kind, args), = v.items()
        if not isinstance(args, list):
            return []
        if kind == "randint":
            return [args[0], args[1] - 1] if len(args) == 2 and all(
                isinstance(a, int) and not isinstance(a, bool) for a in args) else []
        return bounds(args)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return [v] if ok else []


# -- the registry ---------------------------------------------------------------------------------
_BUILTIN: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: a built-in method (or one a plug-in registers at import)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}: a method needs a name")
    _BUILTIN[cls.name] = cls()
    return cls


class UnknownMethod(LookupError):
    pass


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _from_import_path(path: str) -> Method:
    module, _, attr = path.partition(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UnknownMethod(f"cannot import {path!r}: {e}") from None
    return _instance(obj, path)


def _instance(obj: Any, where: str) -> Method:
    method = obj() if isinstance(obj, type) else obj
    if not isinstance(method, Method):
        raise UnknownMethod(f"{where} is {type(method).__name__}, not a subclass of orchestrator.methods.Method")
    if method.config is not None and method.budget_field not in {f.name for f in fields(method.config)}:
        raise UnknownMethod(f"{where}: its config {method.config.__name__} has no budget field "
                            f"{method.budget_field!r}")
    return method


def get(name: str) -> Method:
    """The method a spec names: built-in, entry point, or ``module:attribute``."""
    _load_builtins()
    if name in _BUILTIN:
        return _BUILTIN[name]
    eps = _entry_points()
    if name in eps:
        try:
            return _instance(eps[name].load(), f"entry point {name!r}")
        except ImportError as e:
            raise UnknownMethod(f"entry point {name!r} ({eps[name].value}) cannot be loaded: {e}") from None
    if ":" in name:
        return _from_import_path(name)
    raise UnknownMethod(f"unknown algorithm; known: {', '.join(names())} (or a plug-in as module.path:Class, "
                        f"or an entry point of {ENTRY_POINT_GROUP!r})")


def names(baseline: bool | None = None) -> list[str]:
    _load_builtins()
    out = [*_BUILTIN, *(n for n in _entry_points() if n not in _BUILTIN)]
    if baseline is None:
        return out
    return [n for n in out if _safe(n) is not None and _safe(n).baseline == baseline]


def _safe(name: str) -> Method | None:
    try:
        return get(name)
    except UnknownMethod:
        return None


def is_baseline(name: str | None) -> bool:
    """Whether results rows of ``name`` are a reference (the random subset); unknown names (a
    plug-in not installed where results are read) are not."""
    m = _safe(name) if name else None
    return bool(m and m.baseline)


def _load_builtins() -> None:
    if not _BUILTIN:
        importlib.import_module("orchestrator.builtin_methods")
