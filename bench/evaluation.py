"""Evaluation networks in parallel: wall time of one evaluation (K = 4 networks), one network after
another against orchestrator.parallel.RayRunner on 2 workers, on digits and on MNIST IPC 1.

The caller is what it is in a sweep: a Ray actor holding one CPU (a Tune trial with
``cpus_per_trial: 1``) in a local Ray of 2 CPUs, so one CPU is free for the runner's tasks: 2
workers, the actor and one task slot. In the actor, :func:`algorithms.evaluate.evaluate_set`
trains K fresh networks on a random real subset of IPC 1 (one image per class, the evaluation
protocol: SGD, DSA, one torch thread per network), sequentially (``run`` left at its default)
and through a ``RayRunner`` (K = 4 on 2 workers: two here, two as tasks), and the control below,
each repeat running the modes in the reverse order of the one before, each run starting once
Ray's view of free CPUs shows the slot free again (it lags behind a task that just ended; a
trial's evaluations are far apart). Before timing, one untimed parallel evaluation (1 epoch)
starts the task worker (a fresh Ray worker imports torch: seconds, tens on a loaded machine, paid
once per trial in a sweep; ``--no-warmup`` includes it in the first repeat).

Models: digits, the quickstart's ConvNet (depth 2, width 32); MNIST, MTT's ConvNet-3 (width 128,
search_spaces/mnist.yaml). The test accuracy is part of each network's time: on MNIST the forward
pass over the 10,000 test images is most of it on a CPU (``--mnist-test N``: the first N test
images; ``--quick`` takes 300). MNIST is read from ``$ORCHESTRATE_DATA/mnist``, else
``../shared/data/mnist`` beside the repository (``--data-root`` to point elsewhere); without it the
MNIST rows are skipped, saying so.

``--trial-cpus 2``: the caller is a trial of ``cpus_per_trial: 2`` on that cluster, placed as the
sweep places it (``orchestrator.schedulers.trial_resources``: two bundles of one CPU, the actor in
the first): the cluster has no free CPU, and the runner's tasks go to the trial's second bundle.
Before the runner counted a trial's own bundles, such a trial trained every network itself, one
after another: ``sequential`` is that.

A control, ``static``: the same K networks split 2 + 2 by hand, the back half as one Ray task (one
after another there), the front half in the actor; no resource check, no reclaiming. Its ratio is
what two workers give on this machine at this moment, the runner aside: the runner's own cost is
the gap between the two ratios.

Reported: the median wall time of each mode, the ratios sequential / parallel (ideal 2.0 with 2
workers and an even K) and sequential / static, where the parallel runs trained their networks
(tasks / here / reclaimed), whether all modes gave the same accuracies (they must, bit for bit),
and the load average: on a machine with other work the ratios fall short of 2.

    python bench/evaluation.py --quick --json /tmp/bench_evaluation.json
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

os.environ["RAY_AUTH_MODE"] = "disabled"  # before ray is imported
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# Ray's workers import this checkout (not another install of the project)
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])

import ray  # noqa: E402
import torch  # noqa: E402
from rich.table import Table  # noqa: E402

from common import (  # noqa: E402  (bench/common.py: run as a script, this folder is first on sys.path)
    bench_console, bench_parser, machine_info, print_load, quick_defaults, shared_data, write_results,
)

NETWORKS = 4
MODES = ("sequential", "parallel", "static")  # static: the control (a fixed 2 + 2 split, no runner)
WORKERS = 2  # the caller (an actor of one CPU) and one task slot: a local Ray of 2 CPUs
GROUP = {"pg": None}  # --trial-cpus 2: the trial's placement group (its second bundle is the task slot)
SPECS = {"digits": "search_spaces/quickstart.yaml", "mnist": "search_spaces/mnist.yaml"}


class Trial:
    """The caller, as a Tune trial: an actor of one CPU that evaluates a set."""

    def __init__(self, dataset: str, root: str | None, test_images: int | None, epochs: int, seed: int):
        from algorithms.evaluate import EvalConfig, random_real_subset
        from orchestrator.datasets import load_dataset
        from orchestrator.spec import load_spec

        torch.set_num_threads(1)  # a trial of cpus_per_trial 1 (the networks pin one thread anyway)
        spec = load_spec(REPO / SPECS[dataset])
        data = load_dataset(dataset, root)
        x, y = random_real_subset(data.x_train, data.y_train, 1, data.info.num_classes,
                                  torch.Generator().manual_seed(seed))
        n = test_images or len(data.y_test)
        self.args = (spec.model, data.info, x, y, float(spec.experts["lr"]), data.x_test[:n], data.y_test[:n])
        self.cfg = EvalConfig(networks=NETWORKS, epochs=epochs, batch_size=spec.evaluation["batch_size"])
        self.describe = {"model": spec.model, "test_images": n, "train_images": len(y), "epochs": epochs,
                         "lr": float(spec.experts["lr"])}

    def info(self) -> dict:
        return self.describe

    def evaluate(self, mode: str, epochs: int | None = None) -> dict:
        from dataclasses import replace

        from algorithms.evaluate import evaluate_set
        from orchestrator.parallel import RayRunner

        cfg = self.cfg if epochs is None else replace(self.cfg, epochs=epochs)
        runner = {"parallel": RayRunner(), "static": _static_split}.get(mode)
        t0 = time.perf_counter()
        res = evaluate_set(*self.args, cfg, seed=17, run=runner)
        return {"seconds": time.perf_counter() - t0, "accs": res.accs,
                "stats": runner.stats if mode == "parallel" else {"local": NETWORKS}}


def _run_jobs(jobs: list) -> list:
    from algorithms.evaluate import sequential

    return sequential(jobs)


def _static_split(jobs: list) -> list:
    """The control: the back half of the jobs as one Ray task (one after another there), the front
    half here; no resource check, no reclaiming: what 2 workers give on this machine, the runner aside."""
    from ray.util import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    half = len(jobs) // 2
    pg = get_current_placement_group()  # a trial of 2 CPUs: its second bundle; else the cluster's free CPU
    strategy = "DEFAULT" if pg is None else PlacementGroupSchedulingStrategy(pg, -1, placement_group_capture_child_tasks=False)
    ref = ray.remote(num_cpus=1)(_run_jobs).options(scheduling_strategy=strategy).remote(jobs[half:])
    here = [job() for job in jobs[:half]]
    return here + ray.get(ref)


def settle(timeout: float = 10.0) -> None:
    """Wait until Ray's view of free CPUs shows the task slot free again (it lags behind a task
    that just ended): each run starts as a trial's evaluation does, long after the last one."""
    pg = GROUP["pg"]
    key = "CPU" if pg is None else f"CPU_group_{pg.id.hex()}"
    end = time.monotonic() + timeout
    while ray.available_resources().get(key, 0.0) < WORKERS - 1 and time.monotonic() < end:
        time.sleep(0.1)


def bench_dataset(name: str, root: str | None, args, console) -> dict:
    test_images = args.mnist_test if name == "mnist" else None
    epochs = args.epochs if name == "digits" else args.mnist_epochs
    opts = {}
    if GROUP["pg"] is not None:  # as Tune places a trial: in the first bundle, capturing its child tasks
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(GROUP["pg"], 0,
                                                                       placement_group_capture_child_tasks=True)
    trial = ray.remote(num_cpus=1)(Trial).options(**opts).remote(name, root, test_images, epochs, args.seed)
    try:
        info = ray.get(trial.info.remote())
        console.print(f"[bold]{name}[/bold]: {NETWORKS} networks x {epochs} epochs of {info['model']} on "
                      f"{info['train_images']} images (IPC 1), tested on {info['test_images']} images")
        if args.warmup:
            ray.get(trial.evaluate.remote("parallel", epochs=1))
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for r in range(args.repeats):
            order = MODES if r % 2 == 0 else MODES[::-1]
            for mode in order:
                settle()
                out = ray.get(trial.evaluate.remote(mode))
                runs[mode].append(out)
                s = out["stats"]
                where = "" if mode != "parallel" else \
                    f" ({s['remote']} as tasks, {s['local']} here, {s['reclaimed']} reclaimed)"
                console.print(f"  repeat {r + 1}/{args.repeats} {mode:10s} {out['seconds']:7.2f} s{where}")
    finally:
        ray.kill(trial)
    med = {mode: statistics.median(o["seconds"] for o in runs[mode]) for mode in MODES}
    seq, par = med["sequential"], med["parallel"]
    accs = {tuple(o["accs"]) for mode in runs for o in runs[mode]}
    return {"dataset": name, **info, "sequential_s": [o["seconds"] for o in runs["sequential"]],
            "parallel_s": [o["seconds"] for o in runs["parallel"]], "static_s": [o["seconds"] for o in runs["static"]],
            "sequential_median_s": seq, "parallel_median_s": par, "static_median_s": med["static"],
            "ratio": seq / par, "static_ratio": seq / med["static"], "identical": len(accs) == 1,
            "accs": runs["sequential"][0]["accs"], "parallel_stats": [o["stats"] for o in runs["parallel"]]}


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__, "digits 100 epochs, MNIST 30 epochs on 300 test images, 2 repeats (under 3 minutes "
                               "on 2 loaded cores)")
    ap.add_argument("--datasets", default="digits,mnist", help="comma-separated: digits, mnist (default both)")
    ap.add_argument("--data-root", default=None, help="MNIST's folder (default $ORCHESTRATE_DATA/mnist, else "
                                                      "../shared/data/mnist beside the repository)")
    ap.add_argument("--epochs", type=int, default=None, help="digits epochs per network (default 300, --quick 100)")
    ap.add_argument("--mnist-epochs", type=int, default=None, help="MNIST epochs per network (default 300, --quick 30)")
    ap.add_argument("--mnist-test", type=int, default=None,
                    help="MNIST test images each network is tested on (default all 10000, --quick 300)")
    ap.add_argument("--repeats", type=int, default=None, help="timed evaluations per mode (default 3, --quick 2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random real subset")
    ap.add_argument("--trial-cpus", type=int, choices=(1, 2), default=1,
                    help="the caller's cpus_per_trial: 1 (one CPU of the cluster free for tasks) or 2 (the trial "
                         "holds both, placed as the sweep places it; tasks go to its second bundle)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="do not start the task worker before timing (its start counts in the first repeat)")
    args = ap.parse_args(argv)
    load_start = os.getloadavg()
    quick_defaults(args, epochs=(100, 300), mnist_epochs=(30, 300), mnist_test=(300, None), repeats=(2, 3))
    console = bench_console(150)

    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in datasets if d not in SPECS]
    if unknown:
        ap.error(f"--datasets: unknown {unknown}; known: {', '.join(SPECS)}")
    roots: dict[str, str | None] = {"digits": None}
    skipped = {}
    if "mnist" in datasets:
        folder = Path(args.data_root) if args.data_root else shared_data("mnist")
        files = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"]
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            skipped["mnist"] = (f"MNIST not found: {', '.join(missing)} missing under {folder} (put it in "
                                f"../shared/data/mnist beside the repository, set ORCHESTRATE_DATA, or give --data-root)")
            console.print(f"[yellow]skipping MNIST[/yellow]: {skipped['mnist']}")
            datasets.remove("mnist")
        else:
            roots["mnist"] = str(folder)

    ray.init(address="local", num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)
    try:
        if args.trial_cpus == 2:
            from orchestrator.schedulers import trial_resources

            GROUP["pg"] = trial_resources(2, 0.0, parallel=True).to_placement_group()
            ray.get(GROUP["pg"].ready())
        rows = [bench_dataset(d, roots[d], args, console) for d in datasets]
    finally:
        ray.shutdown()

    caller = ("a trial of 1 CPU, 1 CPU free on the cluster" if args.trial_cpus == 1 else
              "a trial of 2 CPUs (two bundles) filling the cluster")
    table = Table(title=f"One evaluation of K = {NETWORKS} networks: sequential vs parallel on {WORKERS} workers "
                        f"({caller}; median of {args.repeats})")
    for col in ("dataset", "model", "epochs", "test imgs", "seq s", "par s", "seq / par", "static 2+2 s",
                "seq / static", "par: tasks/here/reclaimed", "same accs"):
        table.add_column(col, justify="left" if col in ("dataset", "model") else "right")
    for r in rows:
        m = r["model"]
        where = " ".join(f"{s['remote']}/{s['local']}/{s['reclaimed']}" for s in r["parallel_stats"])
        table.add_row(r["dataset"], f"ConvNet-{m['depth']} w{m['width']}", str(r["epochs"]), str(r["test_images"]),
                      f"{r['sequential_median_s']:.2f}", f"{r['parallel_median_s']:.2f}", f"{r['ratio']:.2f}x",
                      f"{r['static_median_s']:.2f}", f"{r['static_ratio']:.2f}x",
                      where, "yes" if r["identical"] else "[red]NO[/red]")
    for d, why in skipped.items():
        table.add_row(d, "-", "-", "-", "-", "-", "-", "-", "-", "-", f"skipped: {why}")
    console.print(table)
    console.print(f"ideal ratio {WORKERS:.2f}x with {WORKERS} workers and K = {NETWORKS}; "
                  f"load average (1, 5, 15 min) at start {', '.join(f'{v:.2f}' for v in load_start)}, "
                  f"at end {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print_load(console, load_start)
    if args.json:
        write_results(console, args.json, "evaluation",
                      machine_info("cpu", load_start, versions={"ray": ray.__version__}),
                      {"networks": NETWORKS, "workers": WORKERS, "datasets": args.datasets, "epochs": args.epochs,
                       "mnist_epochs": args.mnist_epochs, "mnist_test": args.mnist_test, "repeats": args.repeats,
                       "warmup": args.warmup, "seed": args.seed, "quick": args.quick, "trial_cpus": args.trial_cpus},
                      rows=rows, skipped=skipped,
                      ratio={r["dataset"]: r["ratio"] for r in rows},
                      static_ratio={r["dataset"]: r["static_ratio"] for r in rows},
                      identical=all(r["identical"] for r in rows))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
