"""Sweep specs: YAML files validated before anything runs.

Every problem found is reported at once, each naming the file and the key (``experts.epochs``,
``algorithms.mtt.hyperparameters.lr_img``) and what is allowed. A spec is turned into a
:class:`Spec`, whose defaults are filled in, and whose hash identifies it in MLflow.

Hyperparameter values may be a fixed value, a list (a grid: one trial per value), or a Tune
distribution written as a one-key mapping: ``{loguniform: [1e-6, 1e-4]}``, ``{uniform: [a, b]}``,
``{randint: [a, b]}`` (b excluded), ``{choice: [v1, v2]}``.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from algorithms.base import KIND_NAMES as _KIND_NAMES

from . import methods
from .datasets import FOLDER_DATASETS
from .methods import bounds as _bounds
from .tasks import task_for

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")


class SpecError(ValueError):
    """One or more problems in a spec; ``problems`` lists them, each naming file and key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid spec:\n" + "\n".join(f"  - {p}" for p in problems))


def default_spec_path() -> Path:
    """The embedded default, ``search_spaces/quickstart.yaml``."""
    return Path(str(resources.files("search_spaces").joinpath("quickstart.yaml")))


# ---------------------------------------------------------------------------------------------
# The schema: for each section, key -> (types, default, check). ``check`` returns an error
# message or None. ``REQUIRED`` marks keys without default.
REQUIRED = object()
NUM = (int, float)


def _pos(v):
    return None if v > 0 else "must be > 0"


def _nonneg(v):
    return None if v >= 0 else "must be >= 0"


def _prob(v):
    return None if 0 <= v <= 1 else "must be in [0, 1]"


from .tasks import TASKS as _TASKS  # noqa: E402

ALL_DATASETS = sorted({d for t in _TASKS.values() for d in t.datasets()})


def _eval_models(v: list) -> str | None:
    from algorithms.networks import MODELS

    bad = [m for m in v if not isinstance(m, str) or m not in MODELS]
    if bad:
        return f"unknown model {bad[0]!r}; known: {', '.join(MODELS)}"
    if len(set(v)) != len(v):
        return f"a model is listed twice: {v}"
    return None


def _gpus(v):
    """'auto', a number >= 0 (0.5 packs two trials per GPU), or a mapping budget -> number."""
    if v == "auto" or (isinstance(v, NUM) and not isinstance(v, bool) and v >= 0):
        return None
    if isinstance(v, dict) and v and all(isinstance(k, int) and k > 0 for k in v) and \
            all(isinstance(x, NUM) and not isinstance(x, bool) and x >= 0 for x in v.values()):
        return None
    return "must be 'auto', a number >= 0 (0.5: two trials per GPU) or a mapping budget -> number, e.g. {1: 0.25, 50: 1}"


def _scheduler(v):
    if set(v) - {"name", "grace_period", "reduction_factor", "max_t"}:
        return f"unknown keys {sorted(set(v) - {'name', 'grace_period', 'reduction_factor', 'max_t'})}; " \
               "allowed: name, grace_period, reduction_factor, max_t"
    if v.get("name") != "asha":
        return "name must be asha (ASHA early stopping on the evaluation metric, iterations as time)"
    for k in ("grace_period", "reduction_factor", "max_t"):
        if k in v and not (isinstance(v[k], int) and not isinstance(v[k], bool) and v[k] >= (2 if k == "reduction_factor" else 1)):
            return f"{k} must be an integer >= {2 if k == 'reduction_factor' else 1}"
    return None


def _search(v):
    if set(v) - {"name", "seed"}:
        return f"unknown keys {sorted(set(v) - {'name', 'seed'})}; allowed: name, seed"
    if v.get("name") != "optuna":
        return "name must be optuna (grids and Tune distributions need no search section)"
    if "seed" in v and not (isinstance(v["seed"], int) and not isinstance(v["seed"], bool)):
        return "seed must be an integer"
    return None


SCHEMA: dict[str, dict[str, tuple]] = {
    "dataset": {"name": (str, REQUIRED, lambda v: None if v.lower() in ALL_DATASETS else
                         f"unknown dataset {v!r}; known: {', '.join(ALL_DATASETS)}"),
                "root": ((str, type(None)), None, None),
                # ZCA whitening (MTT's CIFAR setting, regularisation 0.1), fitted on the training split
                "zca": (bool, False, None)},
    "model": {"name": (str, "convnet", lambda v: None if v == "convnet" else "unknown model; known: convnet"),
              "depth": (int, 3, _pos), "width": (int, 128, _pos),
              "norm": (str, "instancenorm", lambda v: None if v in ("instancenorm", "none") else
                       "must be instancenorm or none"),
              "pooling": (str, "avgpooling", lambda v: None if v in ("avgpooling", "maxpooling", "none") else
                          "must be avgpooling, maxpooling or none")},
    "experts": {"count": (int, 10, _pos), "epochs": (int, 50, _pos), "lr": (NUM, 0.01, _pos),
                "batch_size": (int, 256, _pos), "momentum": (NUM, 0.0, _nonneg),
                "weight_decay": (NUM, 0.0, _nonneg), "dsa": (bool, True, None), "lr_decay": (bool, False, None),
                "seed": (int, 0, _nonneg),
                # which forms of each expert the store keeps: full trajectories and/or MCT's compact form
                "keep": (list, ["full"], lambda v: None if v and set(v) <= {"full", "convex"} and len(set(v)) == len(v)
                         else "must be a non-empty list of 'full' and/or 'convex'"),
                "convex_waypoints": (int, 2, lambda v: None if v >= 2 else "must be >= 2"),
                "convex_beta": (str, "path", lambda v: None if v in ("path", "uniform") else "must be path or uniform"),
                "convex_smooth": (bool, False, None)},
    "evaluation": {"networks": (int, 5, _pos), "epochs": (int, 300, _pos), "interval": (int, 100, _nonneg),
                   "batch_size": (int, 256, _pos), "dsa": (bool, True, None),
                   # cross-architecture: the final evaluation also trains these (acc_mean/<name> in MLflow)
                   "models": (list, [], lambda v: _eval_models(v)),
                   # the networks of one evaluation as Ray tasks on free resources (the same numbers)
                   "parallel": (bool, True, None)},
    "resources": {"cpus_per_trial": (NUM, 1, _pos), "gpus_per_trial": ((str, int, float, dict), "auto", _gpus),
                  "cpus_per_expert": (NUM, 1, _pos),
                  "max_concurrent_trials": ((int, type(None)), None, lambda v: None if v is None or v > 0
                                            else "must be > 0 or null"),
                  # the most trials a sweep may have (Tune generates them all up front, on the driver)
                  "max_trials": (int, 10000, _pos)},
}
# Keys of the dataset section that only image_folder (a user's folder of images) takes; the other
# datasets' sections, and so their specs' hashes, are as before.
FOLDER_SCHEMA: dict[str, tuple] = {
    "size": (int, REQUIRED, lambda v: None if 2 <= v <= 1024 else
             "must be from 2 to 1024 (the side in pixels the images are resized to, e.g. 32)"),
    "test_fraction": (NUM, 0.2, lambda v: None if 0 < v < 1 else
                      "must be in (0, 1) (the share of each class held out for testing)"),
    "channels": ((int, type(None)), None, lambda v: None if v in (1, 3) else
                 "must be 1 (grayscale), 3 (RGB) or null (from the files)"),
}
# Event-sequence datasets (ml-100k, ml-1m, ptb) replace the image sections' schemas with these.
SEQ_SCHEMA: dict[str, dict[str, tuple]] = {
    "model": {"name": (str, "sasrec", lambda v: None if v in ("sasrec", "transformer_lm") else
                       "unknown sequence model; known: sasrec, transformer_lm"),
              "dim": (int, 64, _pos), "blocks": (int, 2, _pos), "heads": (int, 1, _pos),
              "max_len": (int, 50, lambda v: None if v >= 2 else "must be >= 2"), "dropout": (NUM, 0.0, _prob)},
    "experts": {"count": (int, 5, _pos), "epochs": (int, 20, _pos), "lr": (NUM, 1e-3, _pos),
                "batch_size": (int, 128, _pos), "weight_decay": (NUM, 0.0, _nonneg), "seed": (int, 0, _nonneg),
                "keep": (list, ["full"], lambda v: None if v == ["full"] else
                         "sequence experts keep full trajectories only: ['full']")},
    "evaluation": {"networks": (int, 3, _pos), "epochs": (int, 50, _pos), "interval": (int, 100, _nonneg),
                   "batch_size": (int, 64, _pos), "lr": (NUM, 1e-3, _pos), "weight_decay": (NUM, 0.0, _nonneg)},
}
def eval_seed(spec: dict) -> int:
    """Evaluation networks use the same seeds in every trial of a sweep (paired comparisons): seeds
    ``eval_seed``, ``eval_seed + 1``, ... (``orchestrate evaluate`` uses them too)."""
    return spec["seed"] * 1000 + 17


NAME_BYTES = 200  # a folder name (with ".replaced-YYYYmmdd-HHMMSS" added by --fresh) stays under 255 bytes


def _safe_name(v: str):
    """A spec's name is a folder name (under the store's ``tune/``) and an MLflow experiment name:
    letters (unicode too), digits, ``-``, ``_`` and ``.``; not empty, not ``.`` or ``..``."""
    if v in ("", ".", ".."):
        return f"must be a folder name, not {v!r}: use letters, digits, '-', '_' and '.'"
    bad = "".join(dict.fromkeys(c for c in v if not (c.isalnum() or c in "-_.")))
    if bad:
        return (f"{v!r} is not a safe folder name: {bad!r} not allowed (use letters, digits, '-', '_' and '.'; "
                "no path separators or spaces)")
    if len(v.encode()) > NAME_BYTES:
        return f"{v[:20]!r}... is too long for a folder name ({len(v.encode())} bytes, at most {NAME_BYTES})"
    return None


TOP = {"name": (str, REQUIRED, _safe_name), "description": (str, "", None), "seed": (int, 0, _nonneg),
       "num_samples": (int, 1, _pos), "checkpoint_interval": (int, 50, _pos),
       "baselines": (list, ["random"], lambda v: _baselines(v)),
       # ASHA early stopping: {name: asha, grace_period: iterations, reduction_factor: 3}; null = none
       "scheduler": ((dict, type(None)), None, _scheduler),
       # Optuna (Ray Tune's OptunaSearch) instead of grid + random sampling: {name: optuna, seed: 0}
       "search": ((dict, type(None)), None, _search),
       # a wall-clock budget for the whole sweep (seconds); unfinished trials are stopped, resumable
       "time_budget_s": ((int, float, type(None)), None, lambda v: None if v > 0 else "must be > 0 or null")}



def _baselines(v: list) -> str | None:
    known = methods.names(baseline=True)
    bad = [b for b in v if not (isinstance(b, str) and methods.is_baseline(b))]
    return f"unknown baseline {bad[0]!r}; known: {', '.join(known)}" if bad else None


def _type_name(t) -> str:
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join("null" if x is type(None) else x.__name__ for x in ts)


def _is(v, t) -> bool:
    ts = t if isinstance(t, tuple) else (t,)
    if isinstance(v, bool) and bool not in ts:
        return False  # YAML's true is not a number here
    if isinstance(v, int) and float in ts:
        return True
    return isinstance(v, ts)


def _unknown(key: str, allowed) -> str:
    near = difflib.get_close_matches(key, list(allowed), n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return f"unknown key{hint}; allowed: {', '.join(sorted(allowed))}"


@dataclass
class Spec:
    path: str
    name: str
    description: str
    seed: int
    num_samples: int
    checkpoint_interval: int
    baselines: list[str]
    scheduler: dict[str, Any] | None
    search: dict[str, Any] | None
    time_budget_s: float | None
    dataset: dict[str, Any]
    model: dict[str, Any]
    experts: dict[str, Any]
    evaluation: dict[str, Any]
    resources: dict[str, Any]
    algorithms: dict[str, dict[str, Any]]  # name -> {budgets, iterations, hyperparameters}
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in ("path", "raw")}

    @property
    def hash(self) -> str:
        d = self.to_dict()
        d["resources"].pop("max_trials", None)  # a guard, not part of the sweep: sweeps from before it resume
        if not d["evaluation"].get("models"):  # added later: specs without it keep their hash (and resume)
            d["evaluation"].pop("models", None)
        # how the evaluation networks are scheduled, not what they compute (parallel or not, the
        # same numbers): never part of the sweep, so switching it keeps the hash (and resumes)
        d["evaluation"].pop("parallel", None)
        if not d["dataset"].get("zca"):
            d["dataset"].pop("zca", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def expert_training(self) -> dict[str, Any]:
        """The training config that (with dataset, model and seed) determines the trajectories."""
        return {k: v for k, v in self.experts.items() if k not in ("count", "seed", "keep") and
                not k.startswith("convex_")}

    def convex_options(self) -> dict[str, Any]:
        e = self.experts
        if "convex_waypoints" not in e:  # sequence experts: full trajectories only
            return {}
        return {"num_waypoints": e["convex_waypoints"], "beta": e["convex_beta"], "smooth": e["convex_smooth"]}

    def expert_forms(self) -> list[str]:
        """Store forms the experts are kept in: ``full`` and/or the compact convex form."""
        from .store import convex_form

        if self.experts["keep"] == ["full"]:
            return ["full"]
        c = self.convex_options()
        return [("full" if k == "full" else convex_form(c["num_waypoints"], c["beta"], c["smooth"]))
                for k in self.experts["keep"]]

    @property
    def task(self):
        """The task of the spec's dataset (``orchestrator.tasks``): image classification or event sequences."""
        return task_for(self.dataset["name"])

    def methods(self) -> dict[str, "methods.Method"]:
        """name -> method of every algorithm and baseline of the spec."""
        return {n: methods.get(n) for n in [*self.baselines, *self.algorithms]}

    def needs_experts(self) -> bool:
        """Whether any method of the spec reads expert trajectories (DC, DSA, DM and the random
        subset do not: a spec of only those trains none)."""
        for name, algo in self.algorithms.items():
            m = methods.get(name)
            for budget in algo["budgets"]:
                if m.expert_forms({**algo["hyperparameters"], **algo["per_budget"].get(budget, {})}, self.experts):
                    return True
        return False

    def trial_count(self) -> int:
        """How many trials Tune runs for this spec (computed, not expanded): see :func:`count_trials`."""
        return count_trials(self.algorithms, self.baselines, self.num_samples, self.search)

    def trial_points(self) -> list[dict[str, Any]]:
        """One point per (algorithm, budget, grid point); values may still be Tune distributions.
        Baselines come first so that their rows exist when the distilled trials report."""
        points = []
        budgets = sorted({b for a in self.algorithms.values() for b in a["budgets"]})
        for base in self.baselines:
            points += [{"algorithm": base, "budget": b, "iterations": 0, "hp": {}} for b in budgets]
        for name, algo in self.algorithms.items():
            for budget in algo["budgets"]:
                hp = {**algo["hyperparameters"], **algo.get("per_budget", {}).get(budget, {})}
                grid_keys = [k for k, v in hp.items() if isinstance(v, list)]
                for combo in itertools.product(*(hp[k] for k in grid_keys)):
                    point = {**hp, **dict(zip(grid_keys, combo))}
                    points.append({"algorithm": name, "budget": budget, "iterations": algo["iterations"],
                                   "hp": point})
        return points


class SpecLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader (no Python tags), reading numbers as YAML 1.2 does: ``1e-6``,
    ``1E5``, ``-2e+3`` and ``1.0e5`` are floats (YAML 1.1, PyYAML's default, wants a dot in the
    mantissa and a sign in the exponent, and reads them as strings)."""


# only the forms YAML 1.1 misses (an exponent without a dot or without a sign): the rest resolves as before
SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _duplicate_keys(loader: SpecLoader, root: yaml.Node, source: str) -> list[str]:
    """Every key given twice in one mapping (PyYAML keeps the last silently), with both lines."""
    problems: list[str] = []
    seen: set[int] = set()

    def walk(node: yaml.Node, path: str) -> None:
        if id(node) in seen:  # an alias: walked where its anchor is
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # <<: *anchor may be overridden
                    walk(value_node, path)
                    continue
                if not isinstance(key_node, yaml.ScalarNode):
                    walk(value_node, path)
                    continue
                key = loader.construct_object(key_node)
                label = f"{path}.{key}" if path else str(key)
                line = key_node.start_mark.line + 1
                if key in first:
                    problems.append(f"{source}: {label}: duplicate key, lines {first[key]} and {line}")
                else:
                    first[key] = line
                walk(value_node, label)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{path}[{i}]")

    walk(root, "")
    return problems


def _read(text: str, source: str) -> tuple[Any, list[str]]:
    """The document (a key given twice keeps its last value) and the duplicate-key problems."""
    loader = SpecLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, []
        problems = _duplicate_keys(loader, node, source)
        return loader.construct_document(node), problems
    finally:
        loader.dispose()


def read_yaml(text: str, source: str = "<spec>") -> Any:
    """Parse a spec's text with :class:`SpecLoader`; duplicate keys raise :class:`SpecError`
    (all of them, each naming both lines). YAML syntax errors raise ``yaml.YAMLError``."""
    data, problems = _read(text, source)
    if problems:
        raise SpecError(problems)
    return data


def load_spec(path: str | Path | None = None) -> Spec:
    """Read and validate a spec file (the quickstart when ``path`` is None)."""
    path = Path(path) if path is not None else default_spec_path()
    if not path.exists():
        raise SpecError([f"{path}: no such spec file"])
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError([f"{path}: cannot read the spec: {e}"]) from e
    try:
        raw, duplicates = _read(text, str(path))
    except yaml.YAMLError as e:
        raise SpecError([f"{path}: not valid YAML: {e}"]) from e
    try:
        spec = validate(raw, str(path))
    except SpecError as e:  # every problem at once: the duplicates first
        raise SpecError(duplicates + e.problems) from None
    if duplicates:
        raise SpecError(duplicates)
    return spec


def validate(raw: Any, source: str = "<spec>") -> Spec:
    problems: list[str] = []

    def err(key: str, msg: str) -> None:
        p = f"{source}: {key}: {msg}"
        if p not in problems:  # a window checked at every budget is reported once
            problems.append(p)

    if not isinstance(raw, dict):
        raise SpecError([f"{source}: the spec must be a mapping of sections, not {type(raw).__name__}"])
    sections = set(SCHEMA) | set(TOP) | {"algorithms"}
    for k in raw:
        if k not in sections:
            err(str(k), _unknown(str(k), sections))

    def check_fields(prefix: str, given: Any, schema: dict[str, tuple]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if given is None:
            given = {}
        if not isinstance(given, dict):
            err(prefix, f"must be a mapping, not {type(given).__name__}")
            given = {}
        for k in given:
            if k not in schema:
                err(f"{prefix}.{k}" if prefix else str(k), _unknown(str(k), schema))
        for k, (types, default, check) in schema.items():
            key = f"{prefix}.{k}" if prefix else k
            if k not in given:
                if default is REQUIRED:
                    err(key, "is required")
                else:
                    out[k] = copy.deepcopy(default)
                continue
            v = given[k]
            if not _is(v, types):
                err(key, f"must be {_type_name(types)}, got {type(v).__name__} {v!r}")
                continue
            if isinstance(v, float) and not math.isfinite(v):
                err(key, f"must be finite, got {v!r}")
            elif check is not None and v is not None and (msg := check(v)):
                err(key, msg)
            out[k] = v
        return out

    top = check_fields("", {k: v for k, v in raw.items() if k in TOP}, TOP)
    given_ds = raw.get("dataset")
    ds_name = given_ds.get("name") if isinstance(given_ds, dict) else None
    folder = isinstance(ds_name, str) and ds_name.lower() in FOLDER_DATASETS
    if isinstance(given_ds, dict) and not folder:
        for k in FOLDER_SCHEMA:
            if k in given_ds:
                err(f"dataset.{k}", f"only {', '.join(FOLDER_DATASETS)} takes {k}, not {ds_name!r}")
        given_ds = {k: v for k, v in given_ds.items() if k not in FOLDER_SCHEMA}
    dataset = check_fields("dataset", given_ds, {**SCHEMA["dataset"], **FOLDER_SCHEMA} if folder
                           else SCHEMA["dataset"])
    if isinstance(dataset.get("name"), str):
        dataset["name"] = dataset["name"].lower()
    task = task_for(dataset.get("name", ""))
    if dataset.get("zca") and task.kind != "image":
        err("dataset.zca", f"ZCA whitening is for images; {dataset.get('name')!r} is a {task.label} dataset")
    schemas = {**SCHEMA, **task.schema}
    sec = {"dataset": dataset, **{s: check_fields(s, raw.get(s), schema) for s, schema in schemas.items()
                                  if s != "dataset"}}
    algorithms = _check_algorithms(raw.get("algorithms"), sec["experts"], err, sec["model"], task,
                                   dataset.get("name", "?"))
    if folder:
        _check_folder_size(dataset, sec["model"], err)
    if top.get("search") and algorithms:
        pairs = [(a, b) for a, body in algorithms.items() for b in body["budgets"]]
        if len(pairs) != 1:
            err("search", f"Optuna tunes one algorithm at one budget per sweep; this spec has {len(pairs)} "
                "(algorithm, budget) pairs: split it into one spec per pair")
        if top.get("baselines"):
            err("baselines", "must be [] with search: optuna (every trial comes from the search); run the "
                "random baseline from a grid spec")
    limit = sec["resources"].get("max_trials")
    if algorithms and isinstance(limit, int) and isinstance(top.get("num_samples"), int):
        n = count_trials(algorithms, top.get("baselines") or [], top["num_samples"], top.get("search"))
        if n > limit:
            how = ("num_samples" if top.get("search") else
                   f"{n // top['num_samples']} grid points and baseline rows x num_samples {top['num_samples']}")
            err("resources.max_trials", f"the sweep has {n} trials ({how}), above the limit of {limit}: make the "
                "grid smaller, or raise resources.max_trials (Tune generates every trial up front)")
    if (top.get("search") or top.get("scheduler")) and sec["evaluation"].get("interval") == 0:
        err("evaluation.interval", "must be > 0 with a scheduler or a search: they compare trials on the "
            "periodic evaluation")
    if problems:
        raise SpecError(problems)
    return Spec(path=source, raw=raw, algorithms=algorithms, **top, **sec)


def _check_folder_size(dataset: dict, model: dict, err) -> None:
    """image_folder's ``size`` against the ConvNet: every block with pooling halves the image (28 px
    images are padded to 32, as MNIST's are), and the last block needs at least 1x1."""
    size, depth, pooling = dataset.get("size"), model.get("depth"), model.get("pooling")
    if not (isinstance(size, int) and isinstance(depth, int) and depth > 0) or pooling == "none":
        return
    if (32 if size == 28 else size) >> depth < 1:
        err("dataset.size", f"{size} px is pooled below 1x1 by the {depth} blocks of model.depth "
            f"(each halves it): give at least {2 ** depth} px, or a smaller model.depth")


def count_trials(algorithms: dict, baselines: list, num_samples: int, search: dict | None) -> int:
    """The trials of a sweep without expanding its grid: Optuna runs ``num_samples``; otherwise
    Tune runs every point of :meth:`Spec.trial_points` (one baseline row per budget, and per
    (algorithm, budget) the product of the grid lists' lengths, ``per_budget`` applied)
    ``num_samples`` times."""
    if search:
        return num_samples
    budgets = {b for a in algorithms.values() for b in a["budgets"]}
    points = len(baselines) * len(budgets)
    for algo in algorithms.values():
        for budget in algo["budgets"]:
            hp = {**algo["hyperparameters"], **algo.get("per_budget", {}).get(budget, {})}
            points += math.prod(len(v) for v in hp.values() if isinstance(v, list))
    return points * num_samples


def _short(v: Any, width: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= width else r[:width - 5] + " ...]"


def _check_scalar(key: str, v: Any, kind: tuple[str, bool], check, err, where: str = "") -> bool:
    """One plain value of a hyperparameter: its type (from the config dataclass), then its check."""
    what, nullable = kind
    if v is None:
        if nullable:
            return True
        err(key, f"must be {_KIND_NAMES[what]}, got null{where}")
        return False
    ok = {"number": _is(v, NUM), "bool": isinstance(v, bool), "str": isinstance(v, str)}[what]
    if not ok:
        got = "a mapping" if isinstance(v, dict) else f"{type(v).__name__} {_short(v)}"
        err(key, f"must be {_KIND_NAMES[what]}{' or null' if nullable else ''}, got {got}{where}")
        return False
    if isinstance(v, float) and not math.isfinite(v):
        err(key, f"must be finite, got {v!r}{where}")
        return False
    if check and (msg := check(v)):
        err(key, f"{msg}, got {v!r}{where}")
        return False
    return True


def _check_hp_value(key: str, v: Any, kind: tuple[str, bool], check, err) -> bool:
    """A hyperparameter's value: a plain value, a grid (a flat list of plain values or
    distributions) or a distribution; every element is checked. Returns whether it is valid."""
    if isinstance(v, list):
        if not v:
            err(key, "an empty list gives no trials; give at least one value")
            return False
        where, ok = f" (in the grid {_short(v)})", True
        for item in v:
            if isinstance(item, list):
                err(key, f"a grid is a flat list of values, got the nested list {_short(item)}{where}")
                ok = False
            elif isinstance(item, dict):
                ok = _check_distribution(key, item, kind, check, err) and ok
            else:
                ok = _check_scalar(key, item, kind, check, err, where) and ok
        return ok
    if isinstance(v, dict):
        return _check_distribution(key, v, kind, check, err)
    return _check_scalar(key, v, kind, check, err)


def _check_distribution(key: str, v: dict, kind: tuple[str, bool], check, err) -> bool:
    if len(v) != 1 or next(iter(v)) not in DISTRIBUTIONS:
        err(key, f"a distribution is a one-key mapping, one of {', '.join(DISTRIBUTIONS)}; got {_short(v)}")
        return False
    (dist, args), = v.items()
    if not isinstance(args, list) or not args:
        err(key, f"{dist} needs a list of arguments, e.g. {{{dist}: [low, high]}}, got {_short(args)}")
        return False
    if dist == "choice":
        where, ok = f" (in {{choice: {_short(args)}}})", True
        for item in args:
            if isinstance(item, (list, dict)):
                err(key, f"choice takes plain values, got {_short(item)}{where}")
                ok = False
            else:
                ok = _check_scalar(key, item, kind, check, err, where) and ok
        return ok
    if kind[0] != "number":
        err(key, f"{dist} draws numbers, but this hyperparameter is {_KIND_NAMES[kind[0]]}: use "
            f"{{choice: [...]}} or a list")
        return False
    if len(args) != 2 or not all(_is(a, NUM) and math.isfinite(a) for a in args) or not args[0] < args[1]:
        err(key, f"{dist} needs [low, high], finite numbers with low < high, got {_short(args)}")
        return False
    if dist == "loguniform" and args[0] <= 0:
        err(key, f"loguniform needs low > 0, got {args!r}")
        return False
    if dist == "randint" and not all(isinstance(a, int) for a in args):
        err(key, f"randint needs integer bounds, got {args!r}")
        return False
    ok = True
    for a in ([args[0], args[1] - 1] if dist == "randint" else args):
        if check and (msg := check(a)):
            err(key, f"bound {a}: {msg}")
            ok = False
    return ok


def _check_algorithms(given: Any, experts: dict, err, model: dict, task, dataset: str = "?") -> dict[str, dict[str, Any]]:
    fits = [n for n in methods.names(baseline=False) if methods.get(n).kind in (task.kind, "any")]
    if not isinstance(given, dict) or not given:
        err("algorithms", f"must map at least one algorithm ({', '.join(fits)}) to its budgets")
        return {}
    out = {}
    for name, body in given.items():
        key = f"algorithms.{name}"
        try:
            method = methods.get(str(name))
        except methods.UnknownMethod as e:
            err(key, str(e))
            continue
        if method.baseline:
            err(key, f"{name} is a baseline: list it under baselines")
            continue
        if method.kind not in (task.kind, "any"):
            err(key, f"{name} does not apply to the {task.label} dataset {dataset!r}; use {', '.join(fits)}")
            continue
        if not isinstance(body, dict):
            err(key, "must be a mapping with budgets, iterations and hyperparameters")
            continue
        for k in body:
            if k not in ("budgets", "iterations", "hyperparameters", "per_budget"):
                err(f"{key}.{k}", _unknown(k, ("budgets", "iterations", "hyperparameters", "per_budget")))
        budgets = body.get("budgets")
        if not isinstance(budgets, list) or not budgets:
            err(f"{key}.budgets", f"must be a non-empty list of {task.budget_unit}, e.g. [1, 10]")
            budgets = []
        elif not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in budgets):
            err(f"{key}.budgets", f"every budget must be a positive integer ({task.budget_unit}), got {budgets!r}")
            budgets = []
        iterations = body.get("iterations", 500)
        if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
            err(f"{key}.iterations", f"must be a positive integer, got {iterations!r}")
        allowed = method.hyperparameters(experts)
        hp = dict(allowed)
        hp.update(_check_hps(method, f"{key}.hyperparameters", body.get("hyperparameters"), allowed, err))
        per_budget: dict[int, dict[str, Any]] = {}
        given_pb = body.get("per_budget") or {}
        if not isinstance(given_pb, dict):
            err(f"{key}.per_budget", "must map a budget to the hyperparameters that differ at it, e.g. {10: {lr_lr: 1.0e-5}}")
            given_pb = {}
        for b, over in given_pb.items():
            if b not in budgets:
                err(f"{key}.per_budget.{b}", f"is not one of the budgets {budgets}")
                continue
            per_budget[b] = _check_hps(method, f"{key}.per_budget.{b}", over, allowed, err)
        for b in budgets:
            prefix = f"{key}.per_budget.{b}" if b in per_budget else f"{key}.hyperparameters"
            merged = {**hp, **per_budget.get(b, {})}
            _check_integers(method, prefix, merged, err)
            method.check(prefix, b, merged, experts, model, err)
        out[name] = {"budgets": budgets, "iterations": iterations, "hyperparameters": hp,
                     "per_budget": per_budget}
    return out


def _check_hps(method, prefix: str, given: Any, allowed: dict, err) -> dict[str, Any]:
    """Validate a mapping of hyperparameters of ``method`` against its config's fields; returns them."""
    if given is None:
        return {}
    if not isinstance(given, dict):
        err(prefix, "must be a mapping")
        return {}
    out = {}
    fields_, kinds = method.hp_fields(), method.hp_kinds()
    for k, v in given.items():
        if k not in allowed:
            err(f"{prefix}.{k}", _unknown(k, allowed))
            continue
        check = fields_[k].metadata.get("check")
        _check_hp_value(f"{prefix}.{k}", v, kinds[k], check, err)
        out[k] = v  # kept when wrong too: the spec is refused, and the windows are checked on what was given
    return out


def _check_integers(method, prefix: str, hp: dict, err) -> None:
    for int_key in method.integer_hps():
        bad = [b for b in _bounds(hp.get(int_key)) if not float(b).is_integer()]
        if bad:
            err(f"{prefix}.{int_key}", f"must be an integer, got {bad[0]}")
