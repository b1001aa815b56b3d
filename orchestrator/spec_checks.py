"""The checks of a spec's ``algorithms`` section: each algorithm's budgets and iterations, and its
hyperparameters (a value, a grid or a Tune distribution) against the fields of the method's config
dataclass (type, range, integers), with ``per_budget`` overrides; every problem is reported
through ``err(key, message)``."""
from __future__ import annotations

import math
from typing import Any

from algorithms.base import KIND_NAMES as _KIND_NAMES

from . import methods
from .methods import bounds as _bounds
from .spec_schema import NUM, _is, _unknown
from .warmstart import check_init_from

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")


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


def _check_algorithms(given: Any, experts: dict, err, model: dict, task,
                      dataset_section: dict, tracking_uri: str | None = None) -> dict[str, dict[str, Any]]:
    dataset = dataset_section.get("name", "?")
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
        keys = ("budgets", "iterations", "hyperparameters", "per_budget", "init_from")
        for k in body:
            if k not in keys:
                err(f"{key}.{k}", _unknown(k, keys))
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
        if body.get("init_from") is not None:  # starts from exported sets: budget -> {path, sha256}
            init = check_init_from(f"{key}.init_from", body["init_from"], budgets, method,
                                   dataset_section, err, tracking_uri)
            if init:
                out[name]["init_from"] = init
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
