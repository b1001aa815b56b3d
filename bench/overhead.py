"""Orchestration overhead per trial: Tune scheduling, checkpoints and MLflow logging.

Sweeps of near-zero-work MTT trials on digits (1 distillation iteration of 2 student steps, one
evaluation network trained for 1 epoch, no baselines) run through ``launch`` exactly as
``orchestrate launch`` does (Ray, Tune, one MLflow child run per trial with params, metrics, the
synthetic set and its PNG). The experts are trained first and not timed. After an untimed warm-up sweep, two sweep sizes
(``--trials`` and a third of it) separate what a sweep pays once (Tune's start, the parent run, the summary plot) from what each further trial costs:

- ``wall per trial`` of the larger sweep: wall(N) / N, fixed costs included, an upper bound on
  the issue's "seconds per trial";
- ``marginal wall per trial`` = (wall(N) - wall(N/3)) / (N - N/3): what one more trial adds to a
  sweep's wall time with ``--cpus`` trials at once (noisy on a loaded machine: the fixed costs
  vary by seconds from sweep to sweep);
- ``fixed cost per sweep`` = wall(N/3) - marginal x N/3;
- ``work``: the same trial's computation in this process without Ray or MLflow (median of 5);
- ``Tune alone``: the same two sizes of a bare Tune sweep (same settings, actors reused, a
  trainable that only reports once with a checkpoint: no work, no MLflow, no data), the floor
  that Tune itself puts under any per-trial number on this machine;
- ``MLflow child run open -> closed``: the median time from a trial's run creation to its close;
- the fraction of a *typical* digits trial: the quickstart's MTT trial at IPC 10 (200 iterations,
  3 evaluations of 3 networks x 300 epochs), timed in this process from a few iterations and one
  evaluation and extrapolated linearly.

    python bench/overhead.py --quick --json /tmp/overhead.json
"""
from __future__ import annotations

import os
import pathlib
import statistics
import sys
import tempfile
import time

import torch
from common import bench_console, bench_parser, machine_info, print_load, quick_defaults, write_results
from rich.markup import escape
from rich.table import Table

from orchestrator.methods import trial_seed
from orchestrator.progress import Progress
from orchestrator.spec import load_spec, validate
from orchestrator.sweep import launch, load_data, ray_session, train_experts
from orchestrator.tracking import workspace
from orchestrator.trial import TrialContext, _evaluate, build_distiller


def tiny_spec(trials: int):
    return validate({
        # one sweep per size (a second launch of the same name would resume it)
        "name": f"bench-overhead-{trials}", "seed": 0, "checkpoint_interval": 1000, "baselines": [],
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
    d = build_distiller(point, ctx, torch.device("cpu"), seed=trial_seed(ctx.spec, point))
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


def _bare_trial(config):
    import tempfile as tf

    from ray import tune
    with tf.TemporaryDirectory() as d:
        pathlib.Path(d, "state").write_bytes(b"x" * 1024)
        tune.report({"acc": config["x"], "iteration": 1}, checkpoint=tune.Checkpoint.from_directory(d))


def tune_floor(trials: int, root: str) -> float:
    """Wall seconds of a bare Tune sweep with the same settings (grid of ``trials`` points, 1 CPU
    each, actors reused, one report with a checkpoint per trial) and no work, no MLflow: what
    Tune itself costs per trial on this machine."""
    from ray import tune
    tuner = tune.Tuner(tune.with_resources(_bare_trial, {"cpu": 1}),
                       param_space={"x": tune.grid_search(list(range(trials)))},
                       tune_config=tune.TuneConfig(reuse_actors=True),
                       run_config=tune.RunConfig(name=f"floor-{trials}", storage_path=root, verbose=0,
                                                 checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    t0 = time.perf_counter()
    tuner.fit()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = bench_parser(__doc__, "sweeps of 6 and 18 trials, typical trial from 3 iterations (about 2 minutes on 2 cores)")
    ap.add_argument("--trials", type=int, default=None, help="trials in the larger sweep (default 45, --quick 18)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (trials at once; default 2)")
    ap.add_argument("--typical-iters", type=int, default=None, help="timed iterations of the typical trial")
    args = ap.parse_args(argv)
    quick_defaults(args, trials=(18, 45), typical_iters=(3, 10))
    sizes = (max(2, args.trials // 3), args.trials)
    load_start = os.getloadavg()
    console = bench_console(120)
    root = tempfile.mkdtemp(prefix="bench-overhead-")
    ws = workspace(root)
    walls, floors, child_runs, outs = {}, {}, [], []
    with ray_session(num_cpus=args.cpus):
        # a first sweep pays for the trial workers' start (imports of torch, MLflow, the data):
        # a small untimed one warms them, so that both sizes below see the same warm Ray
        warm = tiny_spec(2)
        train_experts(warm, ws, None)
        launch(warm, ws, Progress())
        tune_floor(2, os.path.join(root, "floor"))
        for n in sizes:
            spec = tiny_spec(n)
            data = load_data(spec)
            experts = train_experts(spec, ws, None)
            t0 = time.perf_counter()
            out = launch(spec, ws, Progress())
            walls[n] = time.perf_counter() - t0
            if out.errors:
                console.print(f"[red]{len(out.errors)} trials failed: {escape(str(out.errors[:2]))}[/red]")
                return 1
            outs.append(out)
            floors[n] = tune_floor(n, os.path.join(root, "floor"))

    from mlflow import MlflowClient
    client = MlflowClient(ws.tracking_uri)
    for out in outs:
        child_runs += client.search_runs([out.experiment_id], f"tags.`mlflow.parentRunId` = '{out.parent_run_id}'")
    in_trial = statistics.median((r.info.end_time - r.info.start_time) / 1000 for r in child_runs)
    (s_n, l_n) = sizes
    marginal = (walls[l_n] - walls[s_n]) / (l_n - s_n)
    fixed = walls[s_n] - marginal * s_n
    floor_marginal = (floors[l_n] - floors[s_n]) / (l_n - s_n)
    floor_fixed = floors[s_n] - floor_marginal * s_n
    ctx = context(spec, ws, experts, data)
    work = statistics.median(trial_work(spec, ctx, spec.trial_points()[0], 1, 1) for _ in range(5))
    typical = typical_trial(workspace(tempfile.mkdtemp(prefix="bench-overhead-qs-")), args.typical_iters)
    concurrency = min(args.cpus, s_n)

    t = Table(title=f"orchestration overhead: sweeps of {s_n} and {l_n} trials, {concurrency} at once")
    for col in ("quantity", "orchestrate", "bare Tune"):
        t.add_column(col, justify="left" if col == "quantity" else "right")
    rows = [(f"sweep wall time, {s_n} trials", walls[s_n], floors[s_n]),
            (f"sweep wall time, {l_n} trials", walls[l_n], floors[l_n]),
            (f"wall per trial, {l_n} trials (fixed costs included: an upper bound)", walls[l_n] / l_n,
             floors[l_n] / l_n),
            ("marginal wall per trial", marginal, floor_marginal),
            ("fixed cost per sweep", fixed, floor_fixed),
            ("marginal trial-slot seconds per trial (x concurrency)", marginal * concurrency,
             floor_marginal * concurrency),
            ("trial work without Ray/MLflow (median of 5)", work, None),
            ("MLflow child run open -> closed (median)", in_trial, None),
            ("typical digits trial (quickstart MTT IPC 10, extrapolated)", typical["seconds"], None)]
    for name, v, f in rows:
        t.add_row(name, f"{v:.2f}", "" if f is None else f"{f:.2f}")
    console.print(t)
    frac = marginal * concurrency / typical["seconds"]
    console.print(f"one more trial adds {marginal:.2f} s of wall time ({marginal - floor_marginal:+.2f} s over bare "
                  f"Tune); its slot time {marginal * concurrency:.2f} s is {100 * frac:.1f}% of a typical digits "
                  f"trial ({typical['seconds']:.0f} s); {len(child_runs)} MLflow child runs")
    print_load(console, load_start)
    if args.json:
        import ray
        machine = machine_info("cpu", load_start, versions={"ray": ray.__version__})
        write_results(console, args.json, "overhead", machine,
                      {"trials": list(sizes), "cpus": args.cpus, "quick": args.quick},
                      wall_s={str(k): v for k, v in walls.items()},
                      tune_floor_wall_s={str(k): v for k, v in floors.items()}, concurrency=concurrency,
                      marginal_wall_per_trial_s=marginal, fixed_cost_s=fixed,
                      wall_per_trial_upper_bound_s=walls[l_n] / l_n,
                      tune_floor_marginal_wall_per_trial_s=floor_marginal, tune_floor_fixed_cost_s=floor_fixed,
                      trial_work_s=work, child_run_median_s=in_trial, typical_trial=typical,
                      overhead_fraction_of_typical=frac, child_runs=len(child_runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
