"""The schema of a spec: for each section, key -> (types, default, check), and the checks of
single values it names (a positive number, the GPUs per trial, the scheduler and search sections,
a safe name); with the helpers that read a value against it (:func:`_is`, :func:`_unknown`).
Event-sequence datasets replace the image sections with ``SEQ_SCHEMA`` (``Task.schema``)."""
from __future__ import annotations

import difflib

from algorithms.augment import DEFAULT_STRATEGY, check_dc_strategy, check_strategy

from . import methods
from .tasks import TASKS as _TASKS

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


PRECISIONS = ("fp32", "bf16")

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
                # DSA's families while the experts train (digits: color_crop_cutout_scale_rotate, no flip)
                "dsa_strategy": (str, DEFAULT_STRATEGY, check_strategy),
                "seed": (int, 0, _nonneg),
                # which forms of each expert the store keeps: full trajectories and/or MCT's compact form
                "keep": (list, ["full"], lambda v: None if v and set(v) <= {"full", "convex"} and len(set(v)) == len(v)
                         else "must be a non-empty list of 'full' and/or 'convex'"),
                "convex_waypoints": (int, 2, lambda v: None if v >= 2 else "must be >= 2"),
                "convex_beta": (str, "path", lambda v: None if v in ("path", "uniform") else "must be path or uniform"),
                "convex_smooth": (bool, False, None)},
    "evaluation": {"networks": (int, 5, _pos), "epochs": (int, 300, _pos), "interval": (int, 100, _nonneg),
                   "batch_size": (int, 256, _pos), "dsa": (bool, True, None),
                   # DSA's families in the evaluation (DC/DSA drop flip for digits: color_crop_cutout_scale_rotate)
                   "dsa_strategy": (str, DEFAULT_STRATEGY, check_strategy),
                   # DC's own per-image augmentation with these families instead of DSA's (null: DSA's, as
                   # `dsa` says): DC's authors evaluate DC sets on MNIST with crop_scale_rotate
                   "dc_strategy": ((str, type(None)), None, lambda v: None if v is None else check_dc_strategy(v)),
                   # cross-architecture: the final evaluation also trains these (acc_mean/<name> in MLflow)
                   "models": (list, [], lambda v: _eval_models(v)),
                   # the networks of one evaluation as Ray tasks on free resources (the same numbers)
                   "parallel": (bool, True, None)},
    "resources": {"cpus_per_trial": (NUM, 1, _pos), "gpus_per_trial": ((str, int, float, dict), "auto", _gpus),
                  "cpus_per_expert": (NUM, 1, _pos),
                  # the distillation steps under torch.autocast: bf16 halves the memory traffic and uses
                  # AMX/tensor cores (DC 1.8x, MTT 1.2x on a Xeon with AMX); evaluation and experts stay fp32.
                  # Refused where it would be emulated (an AVX2-only CPU): algorithms.base.check_precision
                  "precision": (str, "fp32", lambda v: None if v in PRECISIONS else
                                f"must be one of {', '.join(PRECISIONS)}"),
                  # the distillation step through torch.compile where the method's step allows it (DM's:
                  # 1.6x on a CPU); how a step runs, not what it computes: not part of the spec's hash
                  "compile": (bool, False, None),
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
                   "batch_size": (int, 64, _pos), "lr": (NUM, 1e-3, _pos), "weight_decay": (NUM, 0.0, _nonneg),
                   "parallel": (bool, True, None)},
}


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
       # and a checkpoint whenever the last one is older than this (seconds; null: by iterations only)
       "checkpoint_interval_s": ((int, float, type(None)), 600, lambda v: None if v is None or v > 0
                                 else "must be > 0 or null"),
       "baselines": (list, ["random"], lambda v: _baselines(v)),
       # ASHA early stopping: {name: asha, grace_period: iterations, reduction_factor: 3}; null = none
       "scheduler": ((dict, type(None)), None, _scheduler),
       # Optuna (Ray Tune's OptunaSearch) instead of grid + random sampling: {name: optuna, seed: 0}
       "search": ((dict, type(None)), None, _search),
       # a wall-clock budget for each launch's trials (seconds): then they stop as with Ctrl-C, and
       # launching the same spec again resumes the sweep with the budget anew
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
