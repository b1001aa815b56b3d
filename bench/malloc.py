"""CPU time lost to page faults, with glibc's default allocator settings and with the orchestrator's.

Every process of the orchestrator that steps or trains calls :func:`orchestrator.malloc.tune_malloc`
(the module says why): freed tensor blocks stay in the heap for the next step instead of going
back to the kernel, which zero-fills them page by page when they are asked for again. This runs
the two CPU workloads where that shows, each in a fresh process per setting (the allocator's
settings are per process), with the same seed and work:

- ``eval``: one evaluation network (ConvNet-3, width 128) trained on 100 MNIST-sized images with
  DSA, as ``orchestrate evaluate`` and the trials' evaluations do (one batch of 100 an epoch);
- ``dm``: DM steps at 10 images per class with ``batch_real`` 256, eager fp32;
- ``expert``: SGD steps of an expert (ConvNet-3) on batches of 256 images, as MTT's and MCT's
  experts train (the images are random throughout: the cost is the shapes', not the data's).

Per workload and setting: the median seconds per epoch or step (after a warm-up one), the user
and system CPU seconds and the minor page faults of the timed part, and the process's peak
resident memory; then the speed ratio against glibc's defaults. The settings: ``default``
(``ORCHESTRATE_MALLOC=default``), ``tuned`` (:func:`~orchestrator.malloc.tune_malloc`'s
thresholds) and ``one-arena`` (the thresholds and ``MALLOC_ARENA_MAX=1``, what
:func:`~orchestrator.malloc.worker_env` gives the processes that run trials). ``--thread`` runs the
steps in a thread of their own, started after four other threads took arenas, as Ray Tune runs a
trial's function in a Ray worker: there the thresholds alone do not reach the step's large blocks.

    python bench/malloc.py --quick --json /tmp/bench_malloc.json
    python bench/malloc.py --threads 2 --steps 10
    python bench/malloc.py --thread --workloads dm --threads 2 --steps 8
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from rich.table import Table

from common import (  # bench/common.py: run as a script, this folder is first on sys.path
    REPO, bench_console, bench_parser, machine_info, print_load, quick_defaults, status_kb, write_results,
)

WORKLOADS = ("eval", "dm", "expert")
SETTINGS = ("default", "tuned", "one-arena")


def child(workload: str, steps: int, threads: int, in_thread: bool = False) -> dict:
    """``child_steps`` in this process's main thread, or in a thread of its own (``in_thread``)."""
    if not in_thread:
        return child_steps(workload, steps, threads)
    import threading

    others = [threading.Thread(target=lambda: [bytearray(1000) for _ in range(100)]) for _ in range(4)]
    for t in others:  # Ray's own threads: each allocates, so glibc gives it an arena
        t.start()
    for t in others:
        t.join()
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(child_steps(workload, steps, threads)))
    t.start()
    t.join()
    if not out:
        raise SystemExit(f"bench/malloc.py: the {workload} steps failed in their thread")
    return out


def child_steps(workload: str, steps: int, threads: int) -> dict:
    """One workload in this process under its allocator settings (the parent set them): its numbers."""
    import torch

    from orchestrator.malloc import tune_malloc

    how = tune_malloc()
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    if workload == "eval":
        from algorithms.evaluate import EvalConfig, train_network
        from orchestrator.datasets import dataset_info

        info = dataset_info("mnist")
        x, y = torch.randn(100, 1, 28, 28, generator=g), torch.arange(10).repeat_interleave(10)
        model = {"name": "convnet", "depth": 3, "width": 128}

        def step(_: int) -> None:
            train_network(model, info, x, y, 0.01, EvalConfig(epochs=1, dsa_strategy="color_crop_cutout_scale_rotate"), 17)
    elif workload == "expert":
        import torch.nn.functional as F

        from algorithms.networks import seeded_network

        net = seeded_network({"name": "convnet", "depth": 3, "width": 128}, 1, 10, 28, 0)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        x, y = torch.randn(256, 1, 28, 28, generator=g), torch.randint(10, (256,), generator=g)

        def step(_: int) -> None:
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        from algorithms.dm import DMConfig, DMDistiller
        from algorithms.networks import seeded_network

        net = seeded_network({"name": "convnet", "depth": 3, "width": 128}, 1, 10, 28, 0)
        x_real, y_real = torch.randn(10 * 300, 1, 28, 28, generator=g), torch.arange(10).repeat_interleave(300)
        dm = DMDistiller(net, x_real, y_real, 10, DMConfig(ipc=10, dsa_strategy="color_crop_cutout_scale_rotate"), seed=0)

        def step(_: int) -> None:
            dm.step()
    step(0)  # warm-up: first-call costs (lazy imports, the heap's first growth)
    times = []
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(steps):
        t = time.perf_counter()
        step(i + 1)
        times.append(time.perf_counter() - t)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"malloc": how, "sec": statistics.median(times), "times": times, "user": r1.ru_utime - r0.ru_utime,
            "sys": r1.ru_stime - r0.ru_stime, "minflt": r1.ru_minflt - r0.ru_minflt,
            "peak_rss_mb": (status_kb("VmHWM") or 0) / 1024}


def run(workload: str, setting: str, steps: int, threads: int, in_thread: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ORCHESTRATE_MALLOC", "MALLOC_ARENA_MAX")}
    if setting == "default":
        env["ORCHESTRATE_MALLOC"] = "default"
    elif setting == "one-arena":
        env["MALLOC_ARENA_MAX"] = "1"
    out = subprocess.run([sys.executable, __file__, "--child", workload, "--steps", str(steps),
                          "--threads", str(threads), *(["--thread"] if in_thread else [])],
                         env=env, cwd=REPO, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"bench/malloc.py: the {workload} child ({setting}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = bench_parser(__doc__, "3 epochs, 3 expert steps and 1 DM step per setting (about 2 minutes on one core)")
    ap.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    ap.add_argument("--steps", type=int, default=None, help="timed epochs / steps per setting (default 10; --quick 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each child (default 1)")
    ap.add_argument("--thread", action="store_true",
                    help="step in a thread of the child's own, as a Tune trial's function runs (default: its main thread)")
    ap.add_argument("--child", choices=WORKLOADS, help=None)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, str(REPO))
        print(json.dumps(child(args.child, args.steps, args.threads, args.thread)))
        return
    quick_defaults(args, steps=(3, 10))
    console = bench_console(120)
    load_start = os.getloadavg()
    rows = []
    for w in args.workloads:
        steps = 1 if (w == "dm" and args.quick) else args.steps
        res = {s: run(w, s, steps, args.threads, args.thread) for s in SETTINGS}
        rows.append({"workload": w, "steps": steps, **{s: res[s] for s in SETTINGS},
                     "speed": {s: res["default"]["sec"] / res[s]["sec"] for s in SETTINGS[1:]}})
    where = "a thread of their own" if args.thread else "the main thread"
    table = Table(title=f"glibc's default allocator settings vs orchestrator.malloc ({args.threads} torch "
                        f"thread(s), steps in {where})")
    for col in ("workload", "setting", "s/step (median)", "user s", "sys s", "minor faults", "peak RSS MB", "speed"):
        table.add_column(col, justify="left" if col in ("workload", "setting") else "right")
    for r in rows:
        for s in SETTINGS:
            x = r[s]
            table.add_row(r["workload"] if s == "default" else "", f"{s} ({x['malloc']})", f"{x['sec']:.3f}",
                          f"{x['user']:.2f}", f"{x['sys']:.2f}", f"{x['minflt']:,}", f"{x['peak_rss_mb']:.0f}",
                          f"{r['speed'][s]:.2f}x" if s in r["speed"] else "")
    console.print(table)
    print_load(console, load_start)
    if args.json:
        write_results(console, args.json, "malloc", machine_info("cpu", load_start),
                      {"steps": args.steps, "threads": args.threads, "workloads": args.workloads, "thread": args.thread}, rows=rows)


if __name__ == "__main__":
    main()
