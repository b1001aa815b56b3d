"""How Tune runs a sweep's trials: spec values as Tune domains, GPUs and the placement group
per trial, the metric trials are compared on, and ASHA early stopping within each (algorithm, budget) group."""
from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.schedulers import FIFOScheduler

from .spec import Spec


def tune_value(v, choice_lists: bool = False):
    """A spec's hyperparameter value for Tune: ``{loguniform: [a, b]}``, ``uniform``, ``randint``
    and ``choice`` become Tune distributions (sampled per trial, ``num_samples`` times); with
    ``choice_lists`` (Optuna) a list is a choice too, otherwise lists were expanded into a grid."""
    if isinstance(v, dict) and len(v) == 1:
        (kind, args), = v.items()
        if kind == "choice":
            return tune.choice([tune_value(a) for a in args])
        if kind in ("uniform", "loguniform", "randint"):
            return getattr(tune, kind)(*args)
    if choice_lists and isinstance(v, list):
        return tune.choice(v)
    return v



def gpus_for(gpus, budget: int, has_gpu: bool) -> float:
    """GPUs of one trial: ``auto`` (one when the cluster has GPUs, else none), a number (0.5 packs
    two trials per GPU), or a mapping budget -> number read as steps (a budget gets the value of
    the largest key not above it; budgets below every key get the smallest key's)."""
    if gpus == "auto":
        return 1.0 if has_gpu else 0.0
    if isinstance(gpus, dict):
        keys = sorted(int(k) for k in gpus)
        below = [k for k in keys if k <= budget]
        return float(gpus[below[-1] if below else keys[0]])
    return float(gpus)


def trial_resources(cpus: float, gpus: float, parallel: bool) -> dict[str, float] | tune.PlacementGroupFactory:
    """What one trial holds, for ``tune.with_resources``: ``cpus`` CPUs and ``gpus`` GPUs.

    A trial on the CPU with ``parallel`` evaluation (``evaluation.parallel``) and two CPUs or more
    holds its whole CPUs beyond the first as bundles of one CPU each, all on its node
    (``STRICT_PACK``, as one bundle would be): its distillation steps use them all (it sets its
    torch threads to ``cpus``), and while it evaluates they are free for its networks, which
    :class:`orchestrator.parallel.RayRunner` sends there as tasks of one CPU (a trial of 2 CPUs:
    two networks at a time instead of one after another, on a full cluster too). Otherwise one
    bundle of ``cpus`` (and ``gpus``), Tune's plain resource dict."""
    extra = int(cpus) - 1 if parallel and not gpus and cpus >= 2 else 0
    if not extra:
        return {"cpu": cpus, "gpu": gpus}
    return tune.PlacementGroupFactory([{"CPU": cpus - extra}] + [{"CPU": 1.0}] * extra, strategy="STRICT_PACK")



def eval_metric(spec: Spec, data) -> tuple[str, str]:
    """What ASHA and Optuna compare, as every trial result carries it, and its direction: the
    periodic evaluation's metric on the validation split where the data has one (sequences: the
    test split then only reports), else its headline (images: test accuracy)."""
    metric, higher = spec.task.selection(data) or spec.task.headline(data)
    return f"eval_{metric}_mean", ("max" if higher else "min")



class GroupedASHA(FIFOScheduler):
    """ASHA early stopping within each (algorithm, budget) group.

    A sweep over budgets must not stop an IPC 1 trial because IPC 50 trials score higher, nor
    an MCT trial because of MTT's: each group gets its own ``ASHAScheduler`` (Tune's, unchanged)
    and this class only routes each trial to the one of its group. Trials run in submission
    order (FIFO), as with a single ASHA."""

    def __init__(self, **asha: Any):
        super().__init__()
        self._asha, self._groups, self._of = asha, {}, {}

    @property
    def metric(self):
        return self._asha["metric"]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return metric in (None, self._asha["metric"]) and mode in (None, self._asha["mode"])

    def group(self, trial) -> tuple[str, int]:
        point = trial.config["trial"]
        return point["algorithm"], point["budget"]

    def on_trial_add(self, tune_controller, trial):
        from ray.tune.schedulers import ASHAScheduler

        key = self.group(trial)
        if key not in self._groups:
            self._groups[key] = ASHAScheduler(**self._asha)
        self._of[trial.trial_id] = self._groups[key]
        self._groups[key].on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        asha = self._of.get(trial.trial_id)
        return asha.on_trial_result(tune_controller, trial, result) if asha else self.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result):
        asha = self._of.pop(trial.trial_id, None)
        if asha is not None:
            asha.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        asha = self._of.pop(trial.trial_id, None)
        if asha is not None:
            asha.on_trial_remove(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial):
        self.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "ASHA per (algorithm, budget): " + "; ".join(
            f"{a} {b}: stopped {s._num_stopped}" for (a, b), s in sorted(self._groups.items()))



def _scheduler(spec: Spec, data):
    """ASHA on the evaluation metric (the last evaluation, reported with every result), with
    distillation iterations as the time axis, within each (algorithm, budget) group; baselines
    report once and are never stopped."""
    if not spec.scheduler:
        return None
    metric, mode = eval_metric(spec, data)
    sc = spec.scheduler
    max_t = sc.get("max_t") or max(a["iterations"] for a in spec.algorithms.values())
    # stop_last_trials=False: a trial that reaches max_t ends by itself, after its final evaluation
    return GroupedASHA(time_attr="iteration", metric=metric, mode=mode, max_t=max_t, stop_last_trials=False,
                       grace_period=sc.get("grace_period", max(1, spec.evaluation["interval"])),
                       reduction_factor=sc.get("reduction_factor", 3))
