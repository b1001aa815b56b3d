"""Expert-pool throughput: experts per minute with 1 and 2 Ray workers on the same work.

The work is the orchestrator's own expert pool, :func:`orchestrator.experts.ensure_experts`,
run on a spec derived from the embedded quickstart (``orchestrator.spec.load_spec()``): the
quickstart model (ConvNet depth 2, width 32) and training config (SGD lr 0.03, batch 32, DSA),
``--experts`` experts of ``--epochs`` epochs each. For each worker count N, Ray is started
with ``ray.init(num_cpus=N)``; every expert task takes one CPU slot and one torch thread
(``cpus_per_expert: 1``, the pool calls ``torch.set_num_threads(1)`` in the task). Every
repeat trains into a fresh temporary :class:`~orchestrator.store.TrajectoryStore` root, so no
expert is ever reused. Ray is shut down between the two configurations.

Before the timed repeats of a configuration, N warm-up tasks (one tiny expert each, run
concurrently) make the N worker processes import torch and initialise its kernels, so the
timings measure training and storing rather than process start-up (``--no-warmup`` keeps that
cost in). The time of one repeat is the wall time of ``ensure_experts`` on the driver.

Reported: experts/min (median over repeats) for 1 and 2 workers and their ratio (ideal 2.0 on
two free cores; other load on the machine lowers it). The checksums of the trajectories of the
two configurations are compared too: the same seeds must give bit-identical experts.

    python bench/experts.py --quick --json /tmp/bench_experts.json
    python bench/experts.py --dataset mnist --data-root ../shared/data/mnist --epochs 2
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
import tempfile
import time

os.environ["RAY_AUTH_MODE"] = "disabled"  # before ray is imported (orchestrator.experts imports it)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from common import (  # noqa: E402  (bench/common.py: run as a script, this folder is first on sys.path)
    bench_console, bench_parser, machine_info, print_load, quick_defaults, write_results,
)
from orchestrator.datasets import load_dataset  # noqa: E402
from orchestrator.experts import ensure_experts  # noqa: E402
from orchestrator.spec import Spec, load_spec, validate  # noqa: E402
from orchestrator.store import TrajectoryStore  # noqa: E402

WORKER_COUNTS = (1, 2)


def bench_spec(args) -> Spec:
    """The quickstart spec with the benchmark's dataset, expert count and epochs."""
    raw = copy.deepcopy(load_spec().raw)
    raw["dataset"] = {"name": args.dataset, **({"root": args.data_root} if args.data_root else {})}
    raw["experts"] = {**raw.get("experts", {}), "count": args.experts, "epochs": args.epochs, "seed": args.seed}
    raw["resources"] = {**(raw.get("resources") or {}), "cpus_per_expert": 1}
    # The spec check refuses max_start_epoch + expert_epochs beyond experts.epochs, so shrink
    # the (unused here) MTT start range when the benchmark trains short experts.
    for algo in raw.get("algorithms", {}).values():
        hp = algo.setdefault("hyperparameters", {})
        span = hp.get("expert_epochs", 2)
        hp["expert_epochs"] = min(span, max(1, args.epochs - 1))
        hp["max_start_epoch"] = max(1, min(hp.get("max_start_epoch", 10), args.epochs - hp["expert_epochs"]))
    return validate(raw, "bench/experts.py")


def _warm_up(data_ref, model: dict, seed: int) -> int:
    """One tiny expert (1 epoch on 64 images) so that this worker has imported and initialised torch."""
    from types import SimpleNamespace

    import orchestrator.experts  # noqa: F401  (what the pool's tasks import: ray, rich, yaml, pyarrow)
    from algorithms.experts import ExpertConfig, train_expert

    torch.set_num_threads(1)
    data = data_ref
    small = SimpleNamespace(info=data.info, x_train=data.x_train[:64], y_train=data.y_train[:64],
                            x_test=data.x_test[:64], y_test=data.y_test[:64])
    for _ in train_expert(model, small, ExpertConfig(epochs=1, batch_size=32), seed=seed):
        pass
    time.sleep(0.5)  # keep this worker busy so the N warm-up tasks land on N different workers
    return os.getpid()


def run_config(workers: int, spec: Spec, data, repeats: int, warmup: bool, console: Console) -> dict:
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        warm_pids: list[int] = []
        if warmup:
            task = ray.remote(num_cpus=1)(_warm_up)
            ref = ray.put(data)
            warm_pids = ray.get([task.remote(ref, spec.model, 10_000 + i) for i in range(workers)])
        times, digests, accs = [], None, []
        for r in range(repeats):
            with tempfile.TemporaryDirectory(prefix=f"bench-experts-w{workers}-") as root:
                store = TrajectoryStore(root)
                t0 = time.perf_counter()
                result = ensure_experts(spec, data, store, progress=None)
                dt = time.perf_counter() - t0
                if result.trained != spec.experts["count"]:
                    raise RuntimeError(f"expected {spec.experts['count']} experts trained, got {result.trained}")
                nbytes = store.nbytes(result.key, result.dataset)
            run_digests = [rec.sha256 for rec in sorted(result.records, key=lambda rec: rec.index)]
            if digests is None:
                digests = run_digests
            elif digests != run_digests:
                console.print(f"[yellow]warning:[/yellow] repeat {r} with {workers} worker(s) gave other trajectories")
            times.append(dt)
            accs.append(result.accuracy[0])
            console.print(f"  {workers} worker(s), repeat {r + 1}/{repeats}: {dt:6.2f} s "
                          f"({60 * spec.experts['count'] / dt:5.1f} experts/min)")
        med = statistics.median(times)
        return {"workers": workers, "times_s": times, "median_s": med,
                "experts_per_min": 60.0 * spec.experts["count"] / med,
                "store_bytes": nbytes, "mean_test_acc": statistics.fmean(accs),
                "sha256": digests, "warm_worker_pids": warm_pids}
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__, "fewer epochs and repeats (about a minute on 2 cores)")
    ap.add_argument("--dataset", default="digits", help="digits (default, bundled) or mnist")
    ap.add_argument("--data-root", default=None, help="folder of the dataset files (e.g. ../shared/data/mnist)")
    ap.add_argument("--experts", type=int, default=4, help="experts per run (default 4)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per expert (default 30, --quick 8)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per worker count (default 3, --quick 2)")
    ap.add_argument("--seed", type=int, default=0, help="experts' base seed")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="do not warm the workers up before timing (include process start-up)")
    args = ap.parse_args(argv)
    load_start = os.getloadavg()
    quick_defaults(args, epochs=(8, 30), repeats=(2, 3))

    console = bench_console(110)
    torch.manual_seed(args.seed)
    data = load_dataset(args.dataset, args.data_root)
    data.digest()  # computed once here, not inside the timed runs
    spec = bench_spec(args)
    console.print(f"[bold]expert pool[/bold]: {args.experts} experts x {args.epochs} epochs of "
                  f"{spec.model} on {args.dataset} ({len(data.x_train)} train images), "
                  f"training {spec.expert_training()}; {args.repeats} repeats; warm-up: {args.warmup}")

    results = {}
    for n in WORKER_COUNTS:
        results[n] = run_config(n, spec, data, args.repeats, args.warmup, console)

    r1, r2 = results[1], results[2]
    speedup = r2["experts_per_min"] / r1["experts_per_min"]
    identical = r1["sha256"] == r2["sha256"]

    table = Table(title=f"Expert pool throughput ({args.dataset}, {args.experts} experts x {args.epochs} epochs, "
                        f"median of {args.repeats})")
    table.add_column("Ray workers", justify="right")
    table.add_column("median s", justify="right")
    table.add_column("runs s", justify="right")
    table.add_column("experts/min", justify="right")
    table.add_column("vs 1 worker", justify="right")
    table.add_column("mean test acc", justify="right")
    for n in WORKER_COUNTS:
        r = results[n]
        table.add_row(str(n), f"{r['median_s']:.2f}", " ".join(f"{t:.2f}" for t in r["times_s"]),
                      f"{r['experts_per_min']:.1f}", f"{r['experts_per_min'] / r1['experts_per_min']:.2f}x",
                      f"{r['mean_test_acc']:.3f}")
    console.print(table)
    console.print(f"speedup (2 workers / 1 worker): [bold]{speedup:.2f}x[/bold] (ideal {WORKER_COUNTS[-1]}.00x); "
                  f"identical trajectories across worker counts: {identical}; "
                  f"store size per run: {r1['store_bytes'] / 1e6:.2f} MB")

    print_load(console, load_start)
    if args.json:
        write_results(
            console, args.json, "experts",
            machine_info("cuda" if torch.cuda.is_available() else "cpu", load_start, versions={"ray": ray.__version__}),
            {"dataset": args.dataset, "experts": args.experts, "epochs": args.epochs, "repeats": args.repeats,
             "warmup": args.warmup, "seed": args.seed, "model": spec.model, "training": spec.expert_training(),
             "quick": args.quick},
            experts_per_min_1=r1["experts_per_min"],
            experts_per_min_2=r2["experts_per_min"],
            speedup=speedup,
            identical_trajectories=identical,
            runs=[results[n] for n in WORKER_COUNTS],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
