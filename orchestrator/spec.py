"""Sweep specs: YAML files validated before anything runs.

Every problem found is reported at once, each naming the file and the key (``experts.epochs``,
``algorithms.mtt.hyperparameters.lr_img``) and what is allowed. A spec is turned into a
:class:`Spec`, whose defaults are filled in, and whose hash identifies it in MLflow.

Hyperparameter values may be a fixed value, a list (a grid: one trial per value), or a Tune
distribution written as a one-key mapping: ``{loguniform: [1e-6, 1e-4]}``, ``{uniform: [a, b]}``,
``{randint: [a, b]}`` (b excluded), ``{choice: [v1, v2]}``.

The sections' keys, defaults and checks are in :mod:`orchestrator.spec_schema`, the checks of the
algorithms and their hyperparameters in :mod:`orchestrator.spec_checks`.
"""
from __future__ import annotations

import copy
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

from algorithms.augment import DEFAULT_STRATEGY

from . import methods
from .datasets import FOLDER_DATASETS
from .spec_checks import _check_algorithms
from .spec_schema import FOLDER_SCHEMA, REQUIRED, SCHEMA, TOP, _is, _type_name, _unknown
from .tasks import task_for


class SpecError(ValueError):
    """One or more problems in a spec; ``problems`` lists them, each naming file and key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid spec:\n" + "\n".join(f"  - {p}" for p in problems))


def default_spec_path() -> Path:
    """The embedded default, ``search_spaces/quickstart.yaml``."""
    return Path(str(resources.files("search_spaces").joinpath("quickstart.yaml")))


def eval_seed(spec: dict) -> int:
    """Evaluation networks use the same seeds in every trial of a sweep (paired comparisons): seeds
    ``eval_seed``, ``eval_seed + 1``, ... (``orchestrate evaluate`` uses them too)."""
    return spec["seed"] * 1000 + 17


# top-level settings that change how a launch runs, not a number it produces: not part of the hash
# (checkpoint_interval_s, added after these left it, was never part of it)
RUN_ONLY = ("checkpoint_interval", "time_budget_s")


@dataclass
class Spec:
    path: str
    name: str
    description: str
    seed: int
    num_samples: int
    checkpoint_interval: int
    checkpoint_interval_s: float | None
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
        """What identifies the sweep: a sweep resumes, and a set or a checkpoint is of this recipe,
        only under one of :attr:`hashes`. Settings that change how a run is carried out but not one
        of its numbers stay out of it (they may change between launches of one sweep)."""
        return self._digest(legacy=False)

    @property
    def hashes(self) -> tuple[str, ...]:
        """:attr:`hash`, then the hash this spec had while :data:`RUN_ONLY`'s settings still counted
        (until 2026-12-02) where that differs: sweeps, checkpoints and published sets made then
        still match it. Only a non-default ``checkpoint_interval`` or ``time_budget_s`` makes the
        two differ."""
        return tuple(dict.fromkeys((self.hash, self._digest(legacy=True))))

    def _digest(self, legacy: bool) -> str:
        d = self.to_dict()
        # how often a trial's state is saved and how long one launch may run, not what a trial
        # computes (a trial replays from its last checkpoint with the same state and random
        # generators: the same numbers): at their defaults for the hash, so that a sweep resumes
        # after they change and default specs keep their hash
        if not legacy:
            for key in RUN_ONLY:
                d[key] = TOP[key][1]
        d.pop("checkpoint_interval_s")
        d["resources"].pop("max_trials", None)  # a guard, not part of the sweep: sweeps from before it resume
        if not d["evaluation"].get("models"):  # added later: specs without it keep their hash (and resume)
            d["evaluation"].pop("models", None)
        # how the evaluation networks are scheduled, not what they compute (parallel or not, the
        # same numbers): never part of the sweep, so switching it keeps the hash (and resumes)
        d["evaluation"].pop("parallel", None)
        # DSA's families, added later: the default keeps the hash (and the experts' store key)
        for section in (d["evaluation"], d["experts"]):
            if section.get("dsa_strategy") == DEFAULT_STRATEGY:
                section.pop("dsa_strategy")
        # a method's hyperparameters added after specs were written (``hp(..., added=True)``): at
        # their default they are not part of the hash either
        for name, algo in d["algorithms"].items():
            if "init_from" in algo:  # the starts are the files' contents, wherever they lie
                starts = {b: e["sha256"] for b, e in algo["init_from"].items()}
                # one file for every budget: its sha256 alone, the form from before the mapping
                # (sweeps launched then, e.g. with mnist_dm_ipc10_continued.yaml, resume)
                given = (self.raw.get("algorithms") or {}).get(name) or {}
                one = isinstance(given, dict) and isinstance(given.get("init_from"), str)
                algo["init_from"] = next(iter(starts.values())) if one else starts
            later = {k: f.default for k, f in methods.get(name).hp_fields().items() if f.metadata.get("added")}
            for part in (algo["hyperparameters"], *algo.get("per_budget", {}).values()):
                for k, default in later.items():
                    if k in part and part[k] == default:
                        part.pop(k)
        # torch.compile runs the same step (to the last bits: fused kernels sum in another order),
        # as evaluation.parallel does: switching it keeps the hash, and a sweep resumes with it
        d["resources"].pop("compile", None)
        if d["resources"].get("precision") == "fp32":  # added later: the default keeps the hash
            d["resources"].pop("precision")
        if d["evaluation"].get("dc_strategy") is None:  # added later: the default keeps the hash
            d["evaluation"].pop("dc_strategy", None)
        if not d["dataset"].get("zca"):
            d["dataset"].pop("zca", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def expert_training(self) -> dict[str, Any]:
        """The training config that (with dataset, model and seed) determines the trajectories."""
        return {k: v for k, v in self.experts.items() if k not in ("count", "seed", "keep") and
                not k.startswith("convex_") and not (k == "dsa_strategy" and v == DEFAULT_STRATEGY)}

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


def load_spec(path: str | Path | None = None, tracking_uri: str | None = None) -> Spec:
    """Read and validate a spec file (the quickstart when ``path`` is None); ``tracking_uri``: the
    MLflow store that ``init_from: runs:/...`` reads trials' sets from."""
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
        spec = validate(raw, str(path), tracking_uri)
    except SpecError as e:  # every problem at once: the duplicates first
        raise SpecError(duplicates + e.problems) from None
    if duplicates:
        raise SpecError(duplicates)
    return spec


def validate(raw: Any, source: str = "<spec>", tracking_uri: str | None = None) -> Spec:
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
    algorithms = _check_algorithms(raw.get("algorithms"), sec["experts"], err, sec["model"], task, dataset,
                                   tracking_uri)
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
    if sec["resources"].get("compile") and algorithms:
        rest = [a for a in algorithms if not methods.get(a).compiles]
        if rest:
            able = [n for n in methods.names(baseline=False) if methods.get(n).compiles]
            err("resources.compile", f"{', '.join(rest)} cannot run through torch.compile: "
                f"{'its step differentiates' if len(rest) == 1 else 'their steps differentiate'} through "
                f"gradients (a double backward), which torch.compile does not take. Only "
                f"{', '.join(able)} compiles: set compile: false, or split the spec")
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
