"""One Tune trial: distil (or evaluate a baseline) for one (algorithm, budget, hyperparameters).

The trial owns one MLflow child run (found again, not duplicated, when Tune retries or restores
the trial), reports ``loss``, ``syn_lr`` and periodic evaluation accuracy with
``ray.tune.report``, and checkpoints the distiller state and the synthetic set so that a
restarted trial continues where it stopped. A NaN or infinite value ends the trial with its
reason in MLflow (run status FAILED) without stopping the sweep.
"""
from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from ray import tune

from algorithms.base import DivergenceError, SyntheticSet
from algorithms.evaluate import EvalConfig, evaluate_set, random_real_subset
from algorithms.farzi import FarziConfig, FarziDistiller, FarziSet
from algorithms.mct import ConvexSampler, ConvexTrajectory, MCTConfig
from algorithms.mtt import EpochSampler, MTTConfig, MTTDistiller
from algorithms.networks import seeded_network
from algorithms.seqmodels import seeded_seq_model
from algorithms.seqtrain import SeqTask, SeqTrainConfig, evaluate_sequences

from .artifacts import image_grid, load_state, save_sequences, save_state, save_synthetic
from .sequences import seq_task
from .spec import INTEGER_HPS, eval_seed, is_sequence
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
    experts_acc: tuple[float, float]  # full-data result of the experts (images: test accuracy)
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    tags: dict[str, str] = field(default_factory=dict)
    full_data: dict[str, list[float]] = field(default_factory=dict)  # sequences: metric -> [mean, std]

    @property
    def spec_sequences(self) -> bool:
        return is_sequence(self.spec["dataset"]["name"])


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
    elif algorithm == "farzi":
        task = _seq_task(ctx)
        model = seeded_seq_model(spec["model"], task.vocab_size, task.pad_id, seed)
        trajectories = [open_trajectory(p).params for p in ctx.expert_files["full"]]
        return FarziDistiller(model, trajectories, task.train, task.vocab_size, task.pad_id,
                              FarziConfig(budget=point["budget"], **hp), seed=seed, device=device,
                              iterations=point["iterations"])
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


def _evaluate(ctx: TrialContext, syn, device) -> dict[str, tuple[float, float]]:
    """Train fresh networks on the set; metric -> (mean, std) over the networks."""
    d, spec = ctx.data, ctx.spec
    ev = spec["evaluation"]
    if isinstance(syn, (FarziSet, torch.Tensor)):  # Farzi data, or real sequences (the random baseline)
        task = _seq_task(ctx)
        x = syn.probs() if isinstance(syn, FarziSet) else syn
        cfg = SeqTrainConfig(epochs=ev["epochs"], lr=ev["lr"], batch_size=ev["batch_size"],
                             weight_decay=ev["weight_decay"])
        res = evaluate_sequences(spec["model"], task, x.detach().cpu(), cfg, ev["networks"], eval_seed(spec), device)
        return {k: (res.metrics[k], res.std[k]) for k in res.metrics}
    cfg = EvalConfig(networks=ev["networks"], epochs=ev["epochs"], batch_size=ev["batch_size"], dsa=ev["dsa"])
    res = evaluate_set(spec["model"], d.info, syn.images, syn.labels, syn.lr, d.x_test, d.y_test, cfg,
                       seed=eval_seed(spec), device=device)
    return {"acc": (res.mean, res.std)}


_TASKS: dict[tuple[int, int], SeqTask] = {}


def _seq_task(ctx: TrialContext) -> SeqTask:
    """The sequence task of a trial (built once per worker process and dataset)."""
    key = (id(ctx.data), ctx.spec["model"]["max_len"])
    if key not in _TASKS:
        _TASKS[key] = seq_task(ctx.data, ctx.spec["model"]["max_len"])
    return _TASKS[key]


def primary_metric(ctx: TrialContext) -> tuple[str, bool]:
    """The metric that picks the best evaluation, and whether higher is better."""
    if not ctx.spec_sequences:
        return "acc", True
    return ("hr10", True) if _seq_task(ctx).kind == "recommendation" else ("ppl", False)


def _log_outputs(log: RunLogger, ctx: TrialContext, syn, algorithm: str, point: dict,
                 iteration: int) -> None:
    info = ctx.data.info
    extra = {"budget": point["budget"], "iteration": iteration, "spec_hash": ctx.spec_hash,
             "store_key": ctx.store_key, "run_id": log.run_id}
    with tempfile.TemporaryDirectory() as tmp:
        if ctx.spec_sequences:
            f, samples = save_sequences(Path(tmp) / "synthetic.safetensors", syn, ctx.data, algorithm, extra,
                                        model=ctx.spec["model"])
            log.artifact(f, "synthetic")
            log.artifact(samples, "synthetic")
            return
        f = save_synthetic(Path(tmp) / "synthetic.safetensors", syn, info, algorithm, extra, model=ctx.spec["model"])
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
    full = ctx.full_data or {"acc": list(ctx.experts_acc)}
    common = {f"full_data_{k}_{s}": v[i] for k, v in full.items() for i, s in enumerate(("mean", "std"))}
    try:
        if point["algorithm"] == "random":
            _run_random(point, ctx, log, common, device, seed)
        else:
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


def _run_random(point: dict, ctx: TrialContext, log: RunLogger, common: dict, device, seed: int) -> None:
    """The random-real-subset baseline. With the same seed, a distiller initialised from real
    images starts from exactly these images, so the comparison is paired. For sequences: the
    budget's number of real training sequences, drawn at random."""
    data, spec = ctx.data, ctx.spec
    g = torch.Generator().manual_seed(seed)
    if ctx.spec_sequences:
        real = _seq_task(ctx).train
        syn = real[torch.randperm(len(real), generator=g)[: point["budget"]]]
    else:
        images, labels = random_real_subset(data.x_train, data.y_train, point["budget"], data.info.num_classes, g)
        syn = SyntheticSet(images, labels, spec["experts"]["lr"])
    evals = _evaluate(ctx, syn, device)
    final = {**_final_metrics(ctx, evals), **common}
    if _last_step(log, next(iter(final))) < 0:  # rerun after a kill between this and the report: once
        log.metrics(final, step=0)
    _log_outputs(log, ctx, syn, "random", point, 0)
    log.finish("FINISHED")
    tune.report({**final, **{f"eval_{k}_{s}": v[i] for k, v in evals.items() for i, s in enumerate(("mean", "std"))},
                 "iteration": 0})


def _final_metrics(ctx: TrialContext, evals: dict[str, tuple[float, float]]) -> dict[str, float]:
    """``<metric>_mean``, ``<metric>_std`` and, for sequences, ``<metric>_pct_of_full`` (100 = the
    full-data result; for perplexity full / ours, so that above 100 is better, as for the others)."""
    out = {}
    for k, (mean, std) in evals.items():
        out[f"{k}_mean"], out[f"{k}_std"] = mean, std
        full = ctx.full_data.get(k)
        if full and full[0] and mean:
            out[f"{k}_pct_of_full"] = 100 * (full[0] / mean if k == "ppl" else mean / full[0])
    return out


def _run_distillation(point: dict, ctx: TrialContext, log: RunLogger, common: dict, device, seed: int,
                      restored: dict | None) -> None:
    spec = ctx.spec
    distiller = build_distiller(point, ctx, device, seed)
    history: dict[str, Any] = {"evals": []}  # [(iteration, {metric: [mean, std]})]
    if restored:
        distiller.load_state_dict(restored["distiller"])
        history = restored["history"]
    primary, higher = primary_metric(ctx)
    iterations, interval = point["iterations"], spec["evaluation"]["interval"]
    ckpt_every = spec["checkpoint_interval"]
    t0, first = time.perf_counter(), distiller.iteration
    # A restarted trial replays the iterations after its last checkpoint. Metrics are flushed to
    # MLflow just before each checkpoint, so the run may already hold some of them: those steps
    # are not logged again (the replay recomputes the same values from the same state and RNG).
    logged = {"loss": _last_step(log, "loss"), "eval": _last_step(log, f"eval/{primary}_mean")}

    def evaluate_if_due(it: int) -> None:
        if (it >= iterations or (interval and it % interval == 0)) and \
                (not history["evals"] or history["evals"][-1][0] != it):
            evals = _evaluate(ctx, distiller.synthetic(), device)
            history["evals"].append((it, {k: list(v) for k, v in evals.items()}))
            if it > logged["eval"]:
                log.metrics({f"eval/{k}_{s}": v[i] for k, v in evals.items()
                             for i, s in enumerate(("mean", "std"))}, step=it)

    evaluate_if_due(distiller.iteration)
    while distiller.iteration < iterations:
        t_iter = time.perf_counter()
        m = distiller.step()
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
                   **{f"eval_{k}_{s}": v[i] for k, v in last.items() for i, s in enumerate(("mean", "std"))}}
        if it % ckpt_every == 0:
            _report_with_checkpoint(metrics, distiller, history, log)
        else:
            tune.report(metrics)
    # the final evaluation is the last entry of history
    it_final, last = history["evals"][-1]
    pick = max if higher else min
    best_it, best = pick(history["evals"], key=lambda e: e[1][primary][0])
    final = {**_final_metrics(ctx, {k: tuple(v) for k, v in last.items()}),
             f"{primary}_best_over_evals_mean": best[primary][0], f"{primary}_best_over_evals_std": best[primary][1],
             f"{primary}_best_over_evals_iteration": best_it, **common}
    syn = distiller.synthetic()
    final["final_syn_lr"] = syn.lr
    if _last_step(log, f"{primary}_mean") < it_final:  # a replay after a kill past this point logs it once
        log.metrics(final, step=it_final)
    log.tags({"orchestrate.best_over_evals": f"{primary}_best_over_evals_* is the best over periodic evaluations "
                                             f"(test-set selection, as MTT reports); {primary}_mean is the final one"})
    _log_outputs(log, ctx, syn, point["algorithm"], point, it_final)
    log.flush()
    _report_with_checkpoint({**final, **{f"eval_{k}_{s}": v[i] for k, v in last.items()
                                         for i, s in enumerate(("mean", "std"))},
                             "iteration": distiller.iteration}, distiller, history, log, finish=True)


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
