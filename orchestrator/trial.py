"""One Tune trial: distil (or evaluate a baseline) for one (algorithm, budget, hyperparameters).

The trial owns one MLflow child run (found again, not duplicated, when Tune retries or restores
the trial), reports ``loss``, ``syn_lr`` and periodic evaluation accuracy with
``ray.tune.report``, and checkpoints the distiller state and the synthetic set so that a
restarted trial continues where it stopped. A NaN or infinite value ends the trial with its
reason in MLflow (run status FAILED) without stopping the sweep.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from ray import tune

from algorithms.base import DivergenceError, autocast, check_precision

from . import methods
from .artifacts import CASES_FILE, load_state, save_cases, save_state
from .malloc import tune_malloc
from .tasks import Task, task_for
from .warmstart import build_started
from .tracking import (COMMIT_TAG, COMPILE_TAG, DIGEST_TAG, RunLogger, dataset_input, find_or_create_child, log_dataset,
                       record_change, record_code)

SYNTHETIC_ARTIFACT = "synthetic/synthetic.safetensors"
# the set of the evaluation that scored best on the task's validation split (``Task.selection``;
# sequences), written when an evaluation improves on it: the one a trial stands behind
SELECTED_ARTIFACT = "synthetic_selected/synthetic.safetensors"
# the set of the trial's latest periodic evaluation, rewritten at each one: what a trial that is still
# running (or was cut off) can be exported and published by; a finished trial's latest set is its final one
LATEST_ARTIFACT = "synthetic_latest/synthetic.safetensors"
# which real data the start of the trial's sets read (``Method.start_record``: the training images of a
# real start or of the random baseline, Farzi's users or stream tokens), when it read any; the sets'
# metadata carry it too (``start``)
START_ARTIFACT = "start.json"


def cases_artifact(iteration: int) -> str:
    """Where a trial keeps the per-case outcomes of its evaluation at ``iteration`` (every one, so
    that any two evaluations of a trial can be paired: ``orchestrate compare RUN@0 RUN@500``)."""
    return f"cases/iteration_{iteration:06d}.safetensors"


def set_artifact(finished: bool, selected: bool = False) -> str:
    """Which logged set stands for a trial: the one chosen on validation (``selected``), else the
    final set of a finished trial, else the set of its latest evaluation."""
    return SELECTED_ARTIFACT if selected else SYNTHETIC_ARTIFACT if finished else LATEST_ARTIFACT


@dataclass
class TrialContext:
    """What every trial of a sweep shares; travels once through Ray's object store."""
    data: Any  # the task's data (orchestrator.datasets.ImageData, sequences.RecData / LMData)
    spec: dict[str, Any]
    spec_hash: str
    expert_files: dict[str, list[str]]  # store form -> one file per expert ({}: the spec needs none)
    expert_sha256: list[str]
    store_key: str
    experts_acc: tuple[float, float]  # full-data result of the experts (images: test accuracy)
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    tags: dict[str, str] = field(default_factory=dict)
    full_data: dict[str, list[float]] = field(default_factory=dict)  # the task's full-data metric -> [mean, std]
    init_sets: dict[tuple[str, int], Any] = field(default_factory=dict)  # (algorithm, budget) -> warmstart.InitSet

    @property
    def task(self) -> Task:
        return task_for(self.spec["dataset"]["name"])


def trial_name(point: dict, prefix: str = "ipc") -> str:
    """``<algorithm>-<prefix><budget>``: ``mtt-ipc10`` (images per class), ``farzi-mu50`` (sequences)."""
    return f"{point['algorithm']}-{prefix}{point['budget']}"


def run_name(point: dict, spec: dict, trial_id: str) -> str:
    """The name of a trial's MLflow run: :func:`trial_name`, then the hyperparameters that the
    spec varies for the point (a grid's lists, sampled distributions) and, when every point runs
    ``num_samples`` > 1 times, the trial's number, so that the rows of a runs table differ:
    ``mtt-ipc10``, ``mtt-ipc10 lr_img=30``, ``mtt-ipc10 lr_lr=3.2e-06 #00003``."""
    algo = spec.get("algorithms", {}).get(point["algorithm"]) or {}
    per_budget = algo.get("per_budget") or {}
    hp = {**(algo.get("hyperparameters") or {}),
          **(per_budget.get(point["budget"]) or per_budget.get(str(point["budget"])) or {})}
    shown = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in point["hp"].items()
             if isinstance(hp.get(k), (list, dict))]
    repeats = (spec.get("num_samples") or 1) > 1
    prefix = task_for(spec["dataset"]["name"]).budget_prefix if spec.get("dataset") else "ipc"
    return " ".join([trial_name(point, prefix), *shown, *([f"#{trial_id[-5:]}"] if repeats else [])])


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_distiller(point: dict, ctx: TrialContext, device: torch.device, seed: int):
    """The distiller of a trial point, built by its method from the registry and started as the
    spec says (``init_from``: from an exported set)."""
    return build_started(point, ctx.spec, ctx.data, ctx.task, ctx.expert_files, device, ctx.init_sets, seed)[0]


def _evaluate(ctx: TrialContext, syn, device, final: bool = False) -> dict[str, tuple[float, float]]:
    """Train fresh networks on the set; metric -> (mean, std) over the networks (``final``: the
    trial's last evaluation, with the other architectures of ``evaluation.models``)."""
    return ctx.task.evaluate(ctx.spec, ctx.data, syn, device, final=final)


def _evaluate_cases(ctx: TrialContext, syn, device, final: bool = False):
    """:func:`_evaluate` and the headline metric's per-case outcomes (``CaseOutcomes`` or None)."""
    return ctx.task.evaluate_cases(ctx.spec, ctx.data, syn, device, final=final)


def stat_key(metric: str, stat: str, prefix: str = "") -> str:
    """The MLflow/Tune key of a metric's statistic: ``acc`` -> ``acc_mean``; another architecture's
    ``acc/resnet18_bn`` -> ``acc_mean/resnet18_bn`` (MLflow groups the architectures by prefix)."""
    base, _, arch = metric.partition("/")
    return f"{prefix}{base}_{stat}" + (f"/{arch}" if arch else "")


def _stats(evals: dict, prefix: str = "") -> dict[str, float]:
    return {stat_key(k, s, prefix): v[i] for k, v in evals.items() for i, s in enumerate(("mean", "std"))}


def primary_metric(ctx: TrialContext) -> tuple[str, bool]:
    """The metric that picks the best evaluation, and whether higher is better."""
    return ctx.task.headline(ctx.data)


def _log_outputs(log: RunLogger, ctx: TrialContext, syn, algorithm: str, point: dict, iteration: int,
                 evaluation: dict, artifact: str = SYNTHETIC_ARTIFACT, cases=None, start: dict | None = None) -> None:
    """Export ``syn`` (the set of ``iteration``) as the run's ``artifact``; the file carries its own
    ``evaluation`` (metric -> [mean, std] over the evaluation networks) in its metadata, and ``start``
    (``Method.start_record``: the real data its start read) when there is one. ``cases``
    (``CaseOutcomes`` of that evaluation) go beside it as ``CASES_FILE``."""
    extra = {"budget": point["budget"], "iteration": iteration, "spec_hash": ctx.spec_hash,
             "store_key": ctx.store_key, "run_id": log.run_id,
             "evaluation": {k: [float(v[0]), float(v[1])] for k, v in evaluation.items()},
             **({"start": start} if start is not None else {})}
    folder = artifact.rpartition("/")[0]
    with tempfile.TemporaryDirectory() as tmp:
        files = list(ctx.task.export(Path(tmp), syn, ctx.data, algorithm, extra, ctx.spec["model"]))
        if cases is not None:
            files.append(_cases_file(Path(tmp) / CASES_FILE, ctx, log, cases, iteration))
        for f in files:
            log.artifact(f, folder)


def _cases_file(path: Path, ctx: TrialContext, log: RunLogger, cases, iteration: int) -> Path:
    return save_cases(path, cases, {"dataset": ctx.spec["dataset"]["name"], "iteration": iteration,
                                    "run_id": log.run_id, "spec_hash": ctx.spec_hash,
                                    "model": json.dumps(ctx.spec["model"], sort_keys=True)})


def _log_cases(log: RunLogger, ctx: TrialContext, cases, iteration: int) -> None:
    """The per-case outcomes of the evaluation at ``iteration`` under :func:`cases_artifact`."""
    if cases is None:
        return
    folder, _, name = cases_artifact(iteration).rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        log.artifact(_cases_file(Path(tmp) / name, ctx, log, cases, iteration), folder)


def run_trial(config: dict, ctx: TrialContext) -> None:
    """The Tune function trainable."""
    point = config["trial"]
    spec = ctx.spec
    tune_malloc()
    torch.set_num_threads(max(1, int(spec["resources"]["cpus_per_trial"])))
    device = _device()
    tctx = tune.get_context()
    trial_id = tctx.get_trial_id() or "local"
    seed = methods.trial_seed(spec, point)

    restored: dict[str, Any] | None = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            restored = load_state(d)

    from mlflow import MlflowClient

    client = MlflowClient(ctx.tracking_uri)
    tags = {"algorithm": point["algorithm"], "dataset": spec["dataset"]["name"], "budget": point["budget"],
            "orchestrate.spec_hash": ctx.spec_hash, "orchestrate.store_key": ctx.store_key,
            "orchestrate.trial_name": tctx.get_trial_name() or trial_name(point, ctx.task.budget_prefix),
            # one digest over the checksums of every expert file the trial may read
            "orchestrate.experts_sha256": hashlib.sha256("".join(ctx.expert_sha256).encode()).hexdigest()[:16],
            **ctx.tags}
    run_id = restored["run_id"] if restored else \
        find_or_create_child(client, ctx.experiment_id, ctx.parent_run_id, trial_id, run_name(point, spec, trial_id),
                             tags)[0]
    if restored:
        client.update_run(run_id, status="RUNNING")
    # which code runs the trial from which iteration (a resumed sweep continues under today's code)
    resumed_at = int(restored["distiller"].get("iteration", 0)) if restored else 0
    record_code(client, run_id, ctx.tags.get(COMMIT_TAG, "unknown"), resumed_at)
    if methods.get(point["algorithm"]).compiles:  # and with or without torch.compile (a resume may switch it)
        record_change(client, run_id, COMPILE_TAG, bool(spec["resources"].get("compile")), resumed_at,
                      start=[[0, False]] if resumed_at else None)  # before it was recorded: never compiled
    log = RunLogger(ctx.tracking_uri, run_id)
    # the dataset as an MLflow input (once per run); the experiment's row of it (same name and
    # digest) is the parent run's, whose source the driver resolved
    log_dataset(client, run_id, dataset_input(spec["dataset"], ctx.tags.get(DIGEST_TAG) or ctx.data.digest()))
    log.params({"algorithm": point["algorithm"], "budget": point["budget"], "iterations": point["iterations"],
                "dataset": spec["dataset"]["name"], **{f"hp.{k}": v for k, v in point["hp"].items()},
                **{f"eval.{k}": v for k, v in spec["evaluation"].items() if k != "parallel"},  # scheduling only
                **{f"model.{k}": v for k, v in spec["model"].items()},
                "precision": spec["resources"].get("precision", "fp32")})
    full = ctx.full_data
    common = {f"full_data_{k}_{s}": v[i] for k, v in full.items() for i, s in enumerate(("mean", "std"))}
    try:
        _run_distillation(point, ctx, log, common, device, seed, restored)
    except DivergenceError as e:
        log.tags({"orchestrate.failure_reason": str(e)})
        log.finish("FAILED")
        tune.report({"diverged": 1.0, "failure_reason": str(e)})
    except (SystemExit, KeyboardInterrupt):
        # Tune ends the trial from outside (an early-stopping scheduler, the time budget, Ctrl-C):
        # keep every step computed so far; the driver closes the run with the reason (or a
        # resumed sweep continues it)
        log.flush()
        raise
    except BaseException as e:
        log.tags({"orchestrate.failure_reason": f"{type(e).__name__}: {e}"})
        log.finish("FAILED")
        raise


def _final_metrics(ctx: TrialContext, evals: dict[str, tuple[float, float]]) -> dict[str, float]:
    """``<metric>_mean``, ``<metric>_std`` and, for sequences, ``<metric>_pct_of_full`` (100 = the
    full-data result; for perplexity full / ours, so that above 100 is better, as for the others)."""
    out = {}
    for k, (mean, std) in evals.items():
        out[stat_key(k, "mean")], out[stat_key(k, "std")] = mean, std
        full = ctx.full_data.get(k)
        pct = ctx.task.pct_of_full(k, mean, full[0]) if full else None
        if pct is not None:
            out[f"{k}_pct_of_full"] = pct
    return out


def _run_distillation(point: dict, ctx: TrialContext, log: RunLogger, common: dict, device, seed: int,
                      restored: dict | None) -> None:
    spec = ctx.spec
    check_precision(spec["resources"].get("precision", "fp32"), device)  # bf16 where it is native only
    # the real data the start read (the same after a restart: the start is rebuilt from the seed),
    # or the exported set it started from (init_from); a restored trial then loads its state
    distiller, start = build_started(point, spec, ctx.data, ctx.task, ctx.expert_files, device, ctx.init_sets, seed)
    if start is not None:
        log.client.log_dict(log.run_id, start, START_ARTIFACT)
    history: dict[str, Any] = {"evals": []}  # [(iteration, {metric: [mean, std]})]
    if restored:
        distiller.load_state_dict(restored["distiller"])
        history = restored["history"]
    primary, higher = primary_metric(ctx)
    selection = ctx.task.selection(ctx.data)
    iterations, interval = point["iterations"], spec["evaluation"]["interval"]
    # a checkpoint every checkpoint_interval iterations, and whenever the last is checkpoint_interval_s old
    ckpt_every, ckpt_age = spec["checkpoint_interval"], spec.get("checkpoint_interval_s")
    precision = spec["resources"].get("precision", "fp32")
    t0, first = time.perf_counter(), distiller.iteration
    # A restarted trial replays the iterations after its last checkpoint. Metrics are flushed to
    # MLflow just before each checkpoint, so the run may already hold some of them: those steps
    # are not logged again (the replay recomputes the same values from the same state and RNG).
    logged = {"loss": _last_step(log, "loss"), "eval": _last_step(log, f"eval/{primary}_mean")}
    latest: dict[str, Any] = {"cases": None}  # the per-case outcomes of the latest evaluation run here

    def evaluate_if_due(it: int) -> None:
        if (it >= iterations or (interval and it % interval == 0)) and \
                (not history["evals"] or history["evals"][-1][0] != it):
            syn = distiller.synthetic()
            evals, cases = _evaluate_cases(ctx, syn, device, final=it >= iterations)
            latest["cases"] = cases
            _log_cases(log, ctx, cases, it)
            history["evals"].append((it, {k: list(v) for k, v in evals.items()}))
            if it > logged["eval"]:
                log.metrics(_stats(evals, "eval/"), step=it)
            if selection and selection[0] in evals:  # a new best on validation: its set is the trial's
                value, best = evals[selection[0]][0], history.get("selected")
                if best is None or (value > best[1] if selection[1] else value < best[1]):
                    history["selected"] = [it, value]
                    _log_outputs(log, ctx, syn, point["algorithm"], point, it, evals, SELECTED_ARTIFACT, cases, start)
            if it < iterations:
                _log_outputs(log, ctx, syn, point["algorithm"], point, it, evals, LATEST_ARTIFACT, cases, start)

    evaluate_if_due(distiller.iteration)
    last_ckpt = time.perf_counter()  # (a restored trial starts from its checkpoint)
    while distiller.iteration < iterations:
        t_iter = time.perf_counter()
        m = run_step(distiller, device, precision)
        it = distiller.iteration
        if it > logged["loss"]:
            log.metrics({**{k: v for k, v in m.items() if k != "expert"},
                         "sec_per_iter": time.perf_counter() - t_iter}, step=it)
        # the result of iteration `it` carries the evaluation of iteration `it` when one is due
        # there (schedulers decide on it), else the last one before
        evaluate_if_due(it)
        if it >= iterations:
            break  # the final result goes with the final metrics and checkpoint below
        last = history["evals"][-1][1] if history["evals"] else {}  # none yet with interval 0
        metrics = {**{k: m[k] for k in ("loss", "syn_lr") if k in m}, "iteration": it,
                   "sec_per_iter": (time.perf_counter() - t0) / (it - first),
                   **_stats(last, "eval_")}
        if it % ckpt_every == 0 or (ckpt_age is not None and time.perf_counter() - last_ckpt >= ckpt_age):
            _report_with_checkpoint(metrics, distiller, history, log)
            last_ckpt = time.perf_counter()
        else:
            tune.report(metrics)
    # the final evaluation is the last entry of history
    it_final, last = history["evals"][-1]
    pick = max if higher else min
    best_it, best = pick(history["evals"], key=lambda e: e[1][primary][0])
    final = {**_final_metrics(ctx, {k: tuple(v) for k, v in last.items()}),
             f"{primary}_best_over_evals_mean": best[primary][0], f"{primary}_best_over_evals_std": best[primary][1],
             f"{primary}_best_over_evals_iteration": best_it, **common}
    if history.get("selected"):  # the set chosen on validation: when, and its test metrics
        sel_it = history["selected"][0]
        sel = next(e for i, e in history["evals"] if i == sel_it)
        final.update({"selected_iteration": sel_it,
                      **{f"{k}_selected_{s}": sel[k][j] for k in sel if not k.startswith("valid_")
                         for j, s in enumerate(("mean", "std"))}})
    syn = distiller.synthetic()
    final["final_syn_lr"] = syn.lr
    if _last_step(log, f"{primary}_mean") < it_final:  # a replay after a kill past this point logs it once
        log.metrics(final, step=it_final)
    log.tags({"orchestrate.best_over_evals": f"{primary}_best_over_evals_* is the best over periodic evaluations "
                                             f"(test-set selection, as MTT reports); {primary}_mean is the final one"})
    if history.get("selected"):
        log.tags({"orchestrate.selected_by": f"{selection[0]} ({'max' if selection[1] else 'min'})",
                  "orchestrate.selected": f"{SELECTED_ARTIFACT} is the set of iteration {history['selected'][0]}, "
                                          f"the best {selection[0]} over the evaluations; <metric>_selected_* are its "
                                          f"test metrics"})
    _log_outputs(log, ctx, syn, point["algorithm"], point, it_final, last, cases=latest["cases"], start=start)
    log.flush()
    _report_with_checkpoint({**final, **_stats(last, "eval_"), "iteration": distiller.iteration}, distiller,
                            history, log, finish=True)


def run_step(distiller, device: torch.device, precision: str) -> dict[str, float]:
    """One distillation step in the spec's ``resources.precision`` (bf16: under torch.autocast)."""
    with autocast(device, precision):
        return distiller.step()


def _last_step(log: RunLogger, key: str) -> int:
    """The last step of metric ``key`` already in the run (-1: none)."""
    history = log.client.get_metric_history(log.run_id, key)
    return max((m.step for m in history), default=-1)


def _report_with_checkpoint(metrics: dict, distiller, history: dict, log: RunLogger, finish: bool = False) -> None:
    log.flush()
    with tempfile.TemporaryDirectory() as tmp:
        save_state({"distiller": distiller.state_dict(), "history": history, "run_id": log.run_id}, tmp)
        if finish:
            log.finish("FINISHED")
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
