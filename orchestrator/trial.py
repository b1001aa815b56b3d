"""One Tune trial: distil (or evaluate a baseline) for one (algorithm, budget, hyperparameters).

The trial owns one MLflow child run (found again, not duplicated, when Tune retries or restores
the trial), reports ``loss``, ``syn_lr`` and periodic evaluation accuracy with
``ray.tune.report``, and checkpoints the distiller state and the synthetic set so that a
restarted trial continues where it stopped. A NaN or infinite value ends the trial with its
reason in MLflow (run status FAILED) without stopping the sweep.
"""
from __future__ import annotations

import hashlib
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from ray import tune

from algorithms.base import DivergenceError, SyntheticSet
from algorithms.evaluate import EvalConfig, evaluate_set, random_real_subset
from algorithms.mct import ConvexSampler, ConvexTrajectory, MCTConfig
from algorithms.mtt import EpochSampler, MTTConfig, MTTDistiller
from algorithms.networks import seeded_network

from .artifacts import image_grid, load_state, save_state, save_synthetic
from .spec import INTEGER_HPS
from .store import convex_form, open_convex, open_trajectory
from .tracking import RunLogger, find_or_create_child

SYNTHETIC_ARTIFACT = "synthetic/synthetic.safetensors"


@dataclass
class TrialContext:
    """What every trial of a sweep shares; travels once through Ray's object store."""
    data: Any  # orchestrator.datasets.ImageData
    spec: dict[str, Any]
    spec_hash: str
    expert_files: dict[str, list[str]]  # store form -> one file per expert
    expert_sha256: list[str]
    store_key: str
    experts_acc: tuple[float, float]
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    tags: dict[str, str] = field(default_factory=dict)


def eval_seed(spec: dict) -> int:
    """Evaluation networks use the same seeds in every trial of a sweep (paired comparisons)."""
    return spec["seed"] * 1000 + 17


def trial_name(point: dict) -> str:
    return f"{point['algorithm']}-ipc{point['budget']}"


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_distiller(point: dict, ctx: TrialContext, device: torch.device, seed: int):
    """The distiller for a trial point, fed by the memory-mapped expert trajectories."""
    data, spec = ctx.data, ctx.spec
    hp = dict(point["hp"])
    algorithm = point["algorithm"]
    for k in INTEGER_HPS.get(algorithm, ()):
        hp[k] = int(round(hp[k]))
    if hp.get("batch_syn") is not None:
        hp["batch_syn"] = int(hp["batch_syn"])
    if algorithm == "mtt":
        cfg = MTTConfig(ipc=point["budget"], **hp)
        trajectories = [open_trajectory(p).params for p in ctx.expert_files["full"]]
        sampler = EpochSampler(trajectories, cfg.expert_epochs, cfg.max_start_epoch)
    elif algorithm == "mct":
        cfg = MCTConfig(ipc=point["budget"], **hp)
        sampler = ConvexSampler(load_convex(ctx, cfg), cfg.expert_epochs, cfg.max_start_epoch, cfg.continuous)
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}")
    info = data.info
    net = seeded_network(spec["model"], info.channels, info.num_classes, info.size, seed)
    return MTTDistiller(net, sampler, data.x_train, data.y_train, info.num_classes, cfg, seed=seed, device=device)


def load_convex(ctx: TrialContext, cfg: MCTConfig) -> list[ConvexTrajectory]:
    """The compact form the trial asks for: read from the store when the experts keep it,
    otherwise derived from the stored full trajectories."""
    form = convex_form(cfg.waypoints, cfg.beta, cfg.smooth)
    if form in ctx.expert_files:
        return [open_convex(p) for p in ctx.expert_files[form]]
    if "full" not in ctx.expert_files:
        raise ValueError(f"the experts keep only {sorted(ctx.expert_files)}, not {form} or full trajectories")
    out = []
    for p in ctx.expert_files["full"]:
        t = open_trajectory(p)
        out.append(ConvexTrajectory.from_checkpoints(t.params, t.manifest, cfg.waypoints, cfg.smooth, cfg.beta))
    return out


def _evaluate(ctx: TrialContext, syn: SyntheticSet, device) -> tuple[float, float]:
    d, spec = ctx.data, ctx.spec
    ev = spec["evaluation"]
    cfg = EvalConfig(networks=ev["networks"], epochs=ev["epochs"], batch_size=ev["batch_size"], dsa=ev["dsa"])
    res = evaluate_set(spec["model"], d.info, syn.images, syn.labels, syn.lr, d.x_test, d.y_test, cfg,
                       seed=eval_seed(spec), device=device)
    return res.mean, res.std


def _log_outputs(log: RunLogger, ctx: TrialContext, syn: SyntheticSet, algorithm: str, point: dict,
                 iteration: int) -> None:
    info = ctx.data.info
    with tempfile.TemporaryDirectory() as tmp:
        f = save_synthetic(Path(tmp) / "synthetic.safetensors", syn, info, algorithm,
                           {"budget": point["budget"], "iteration": iteration, "spec_hash": ctx.spec_hash,
                            "store_key": ctx.store_key, "run_id": log.run_id})
        log.artifact(f, "synthetic")
        g = image_grid(syn.images, syn.labels, info.mean, info.std, Path(tmp) / "synthetic_grid.png")
        log.artifact(g, "synthetic")


def run_trial(config: dict, ctx: TrialContext) -> None:
    """The Tune function trainable."""
    point = config["trial"]
    spec = ctx.spec
    torch.set_num_threads(max(1, int(spec["resources"]["cpus_per_trial"])))
    device = _device()
    tctx = tune.get_context()
    trial_id = tctx.get_trial_id() or "local"
    seed = spec["seed"] * 7919 + point["budget"]

    restored: dict[str, Any] | None = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            restored = load_state(d)

    from mlflow import MlflowClient

    client = MlflowClient(ctx.tracking_uri)
    tags = {"algorithm": point["algorithm"], "dataset": spec["dataset"]["name"], "budget": point["budget"],
            "orchestrate.spec_hash": ctx.spec_hash, "orchestrate.store_key": ctx.store_key,
            "orchestrate.trial_name": tctx.get_trial_name() or trial_name(point),
            # one digest over the checksums of every expert file the trial may read
            "orchestrate.experts_sha256": hashlib.sha256("".join(ctx.expert_sha256).encode()).hexdigest()[:16],
            **ctx.tags}
    run_id = restored["run_id"] if restored else \
        find_or_create_child(client, ctx.experiment_id, ctx.parent_run_id, trial_id, trial_name(point), tags)[0]
    if restored:
        client.update_run(run_id, status="RUNNING")
    log = RunLogger(ctx.tracking_uri, run_id)
    log.params({"algorithm": point["algorithm"], "budget": point["budget"], "iterations": point["iterations"],
                "dataset": spec["dataset"]["name"], **{f"hp.{k}": v for k, v in point["hp"].items()},
                **{f"eval.{k}": v for k, v in spec["evaluation"].items()},
                **{f"model.{k}": v for k, v in spec["model"].items()}})
    common = {"full_data_acc_mean": ctx.experts_acc[0], "full_data_acc_std": ctx.experts_acc[1]}
    try:
        if point["algorithm"] == "random":
            _run_random(point, ctx, log, common, device, seed)
        else:
            _run_distillation(point, ctx, log, common, device, seed, restored)
    except DivergenceError as e:
        log.tags({"orchestrate.failure_reason": str(e)})
        log.finish("FAILED")
        tune.report({"diverged": 1.0, "failure_reason": str(e)})
    except BaseException as e:
        log.tags({"orchestrate.failure_reason": f"{type(e).__name__}: {e}"})
        log.finish("FAILED")
        raise


def _run_random(point: dict, ctx: TrialContext, log: RunLogger, common: dict, device, seed: int) -> None:
    """The random-real-subset baseline. With the same seed, a distiller initialised from real
    images starts from exactly these images, so the comparison is paired."""
    data, spec = ctx.data, ctx.spec
    g = torch.Generator().manual_seed(seed)
    images, labels = random_real_subset(data.x_train, data.y_train, point["budget"], data.info.num_classes, g)
    syn = SyntheticSet(images, labels, spec["experts"]["lr"])
    mean, std = _evaluate(ctx, syn, device)
    final = {"acc_mean": mean, "acc_std": std, **common}
    log.metrics(final, step=0)
    _log_outputs(log, ctx, syn, "random", point, 0)
    log.finish("FINISHED")
    tune.report({**final, "iteration": 0})


def _run_distillation(point: dict, ctx: TrialContext, log: RunLogger, common: dict, device, seed: int,
                      restored: dict | None) -> None:
    spec = ctx.spec
    distiller = build_distiller(point, ctx, device, seed)
    history: dict[str, Any] = {"evals": []}  # [(iteration, mean, std)]
    if restored:
        distiller.load_state_dict(restored["distiller"])
        history = restored["history"]
    iterations, interval = point["iterations"], spec["evaluation"]["interval"]
    ckpt_every = spec["checkpoint_interval"]
    t0, first = time.perf_counter(), distiller.iteration
    while True:
        it = distiller.iteration
        metrics: dict[str, float] = {}
        if it >= iterations or (interval and it % interval == 0):
            if not history["evals"] or history["evals"][-1][0] != it:
                mean, std = _evaluate(ctx, distiller.synthetic(), device)
                history["evals"].append((it, mean, std))
                log.metrics({"eval/acc_mean": mean, "eval/acc_std": std}, step=it)
            metrics.update({"eval_acc_mean": history["evals"][-1][1], "eval_acc_std": history["evals"][-1][2]})
        if it >= iterations:
            break
        t_iter = time.perf_counter()
        m = distiller.step()
        log.metrics({"loss": m["loss"], "syn_lr": m["syn_lr"], "start_epoch": m.get("start_epoch", math.nan),
                     "sec_per_iter": time.perf_counter() - t_iter},
                    step=it + 1)
        metrics.update({"loss": m["loss"], "syn_lr": m["syn_lr"], "iteration": distiller.iteration,
                        "sec_per_iter": (time.perf_counter() - t0) / (distiller.iteration - first)})
        if distiller.iteration % ckpt_every == 0 and distiller.iteration < iterations:
            _report_with_checkpoint(metrics, distiller, history, log)
        else:
            tune.report(metrics)
    # the final evaluation is the last entry of history
    it_final, mean, std = history["evals"][-1]
    best_it, best_mean, best_std = max(history["evals"], key=lambda e: e[1])
    final = {"acc_mean": mean, "acc_std": std, "acc_best_over_evals_mean": best_mean,
             "acc_best_over_evals_std": best_std, "acc_best_over_evals_iteration": best_it,
             "final_syn_lr": distiller.synthetic().lr, **common}
    log.metrics(final, step=it_final)
    log.tags({"orchestrate.best_over_evals": "acc_best_over_evals_* is the max over periodic evaluations "
                                             "(test-set selection, as MTT reports); acc_mean is the final one"})
    _log_outputs(log, ctx, distiller.synthetic(), point["algorithm"], point, it_final)
    log.flush()
    _report_with_checkpoint({**final, "iteration": distiller.iteration}, distiller, history, log, finish=True)


def _report_with_checkpoint(metrics: dict, distiller, history: dict, log: RunLogger, finish: bool = False) -> None:
    log.flush()
    with tempfile.TemporaryDirectory() as tmp:
        save_state({"distiller": distiller.state_dict(), "history": history, "run_id": log.run_id}, tmp)
        if finish:
            log.finish("FINISHED")
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
