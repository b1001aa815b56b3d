"""Orchestration overhead per trial: Tune scheduling, worker start, checkpoints and MLflow logging.

A sweep of ``--trials`` near-zero-work MTT trials on digits (1 distillation iteration of 2 student
steps, one evaluation network trained for 1 epoch, no baselines) runs through ``launch`` exactly as
``orchestrate launch`` does (Ray, Tune, one MLflow child run per trial with params, metrics, the
synthetic set and its PNG). The experts are trained first and not timed.

- ``wall``: the sweep's wall time (parent run, Tune, every trial, the summary);
- ``work``: the same trial's computation done in this process without Ray or MLflow (building the
  distiller from the stored trajectories, its step, the evaluation): the median of 5;
- ``overhead per trial`` = wall x concurrency / trials - work, where concurrency is the number of
  trials that run at once (``--cpus`` with 1 CPU per trial);
- the fraction of a *typical* digits trial: the quickstart's MTT trial at IPC 10 (200 iterations,
  3 evaluations of 3 networks x 300 epochs), timed in this process from 5 iterations and one
  evaluation and extrapolated linearly.

    python bench/overhead.py --quick --json /tmp/overhead.json
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import torch
from common import bench_console, bench_parser, machine_info, print_load, quick_defaults, write_results
from rich.table import Table

from orchestrator.progress import Progress
from orchestrator.spec import load_spec, validate
from orchestrator.sweep import launch, load_data, ray_session, train_experts
from orchestrator.tracking import workspace
from orchestrator.trial import TrialContext, _evaluate, build_distiller


def tiny_spec(trials: int):
    return validate({
        "name": "bench-overhead", "seed": 0, "checkpoint_interval": 1000, "baselines": [],
        "dataset": {"name": "digits"}, "model": {"depth": 1, "width": 8},
        "experts": {"count": 1, "epochs": 2, "lr": 0.03, "batch_size": 64},
        "algorithms": {"mtt": {"budgets": [1], "iterations": 1,
                               "hyperparameters": {"syn_steps": 2, "expert_epochs": 1, "max_start_epoch": 1,
                                                   "lr_img": [10 + i for i in range(trials)]}}},
        "evaluation": {"networks": 1, "epochs": 1, "interval": 0},
        "resources": {"cpus_per_trial": 1},
    }, "bench-overhead")


def context(spec, ws, experts, data) -> TrialContext:
    return TrialContext(data=data, spec=spec.to_dict(), spec_hash=spec.hash, expert_files=experts.files,
                        expert_sha256=[], store_key=experts.key, experts_acc=experts.accuracy,
                        tracking_uri=ws.tracking_uri, experiment_id="", parent_run_id="")


def trial_work(spec, ctx: TrialContext, point: dict, iterations: int, evaluations: int) -> float:
    """Seconds of one trial's computation, without Ray or MLflow."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    d = build_distiller(point, ctx, torch.device("cpu"), seed=spec.seed * 7919 + point["budget"])
    for _ in range(iterations):
        d.step()
    for _ in range(evaluations):
        _evaluate(ctx, d.synthetic(), "cpu")
    return time.perf_counter() - t0


def typical_trial(ws, repeats_iter: int) -> dict:
    """The quickstart's MTT trial at IPC 10, extrapolated from a few timed iterations and one evaluation."""
    spec = load_spec()
    data = load_data(spec)
    with ray_session(num_cpus=2):
        experts = train_experts(spec, ws, None)
    ctx = context(spec, ws, experts, data)
    point = next(p for p in spec.trial_points() if p["algorithm"] == "mtt" and p["budget"] == 10)
    torch.set_num_threads(1)
    d = build_distiller(point, ctx, torch.device("cpu"), seed=1)
    d.step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats_iter):
        d.step()
    per_iter = (time.perf_counter() - t0) / repeats_iter
    t0 = time.perf_counter()
    _evaluate(ctx, d.synthetic(), "cpu")
    per_eval = time.perf_counter() - t0
    evals = point["iterations"] // spec.evaluation["interval"] + 1
    return {"sec_per_iter": per_iter, "sec_per_eval": per_eval, "iterations": point["iterations"],
            "evaluations": evals, "seconds": per_iter * point["iterations"] + per_eval * evals}


def main(argv=None) -> int:
    ap = bench_parser(__doc__, "20 trials, typical trial from 3 iterations (under 3 minutes on 2 cores)")
    ap.add_argument("--trials", type=int, default=None, help="trials in the sweep (default 50, --quick 20)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (trials at once; default 2)")
    ap.add_argument("--typical-iters", type=int, default=None, help="timed iterations of the typical trial")
    args = ap.parse_args(argv)
    quick_defaults(args, trials=(20, 50), typical_iters=(3, 10))
    load_start = os.getloadavg()
    console = bench_console(120)
    root = tempfile.mkdtemp(prefix="bench-overhead-")
    ws = workspace(root)
    spec = tiny_spec(args.trials)
    data = load_data(spec)
    with ray_session(num_cpus=args.cpus):
        experts = train_experts(spec, ws, None)
        t0 = time.perf_counter()
        out = launch(spec, ws, Progress())
        wall = time.perf_counter() - t0
    if out.errors:
        console.print(f"[red]{len(out.errors)} trials failed: {out.errors[:2]}[/red]")
        return 1
    ctx = context(spec, ws, experts, data)
    point = spec.trial_points()[0]
    work = statistics.median(trial_work(spec, ctx, point, 1, 1) for _ in range(5))

    from mlflow import MlflowClient
    client = MlflowClient(ws.tracking_uri)
    runs = client.search_runs([out.experiment_id], f"tags.`mlflow.parentRunId` = '{out.parent_run_id}'")
    in_trial = statistics.median((r.info.end_time - r.info.start_time) / 1000 for r in runs)
    concurrency = min(args.cpus, args.trials)
    per_trial = wall * concurrency / args.trials
    overhead = per_trial - work
    typical = typical_trial(workspace(tempfile.mkdtemp(prefix="bench-overhead-qs-")), args.typical_iters)

    t = Table(title=f"orchestration overhead: {args.trials} trials, {concurrency} at once")
    for col in ("quantity", "seconds"):
        t.add_column(col, justify="left" if col == "quantity" else "right")
    rows = [("sweep wall time (parent run, Tune, trials, summary)", wall),
            ("wall per trial x concurrency", per_trial),
            ("trial work without Ray/MLflow (median of 5)", work),
            ("MLflow child run open -> closed (median)", in_trial),
            ("overhead per trial", overhead),
            ("typical digits trial (quickstart MTT IPC 10, extrapolated)", typical["seconds"])]
    for name, v in rows:
        t.add_row(name, f"{v:.2f}")
    console.print(t)
    frac = overhead / typical["seconds"]
    console.print(f"overhead per trial {overhead:.2f} s = {100 * frac:.1f}% of a typical digits trial "
                  f"({typical['seconds']:.0f} s); {len(runs)} MLflow child runs")
    print_load(console, load_start)
    if args.json:
        import ray
        machine = machine_info("cpu", load_start, versions={"ray": ray.__version__})
        write_results(console, args.json, "overhead", machine,
                      {"trials": args.trials, "cpus": args.cpus, "quick": args.quick},
                      wall_s=wall, concurrency=concurrency, per_trial_wall_s=per_trial, trial_work_s=work,
                      child_run_median_s=in_trial, overhead_per_trial_s=overhead, typical_trial=typical,
                      overhead_fraction_of_typical=frac, child_runs=len(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
