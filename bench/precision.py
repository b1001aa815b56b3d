"""Seconds per distillation step in fp32 and in bf16 (``resources.precision``), per method.

A trial runs each step through :func:`orchestrator.trial.run_step`, under ``torch.autocast``
when the spec asks for bf16. This builds each method through the registry, as a trial does, on
MNIST at 1 image per class with the reference specs' model (ConvNet-3, width 128) and
hyperparameters (``search_spaces/reference/``), and times the same steps in both precisions from
the same seed: one warm-up step, then the median of ``--steps`` steps. ``loss rel. diff`` is how
far the first bf16 step's loss lies from the fp32 one's (same network, same batches): bf16
rounds the convolutions' inputs, not the algorithm. MTT runs on random-walk trajectories of the
experts' shape (timing only: its loss is not comparable to a real run's, its cost is).

On a CPU, bf16 pays where the hardware has it (AMX, AVX512-BF16: the machine line says which
CPU); elsewhere it can be slower than fp32. On a GPU, use ``--device cuda``.

    python bench/precision.py --quick --json /tmp/bench_precision.json
    python bench/precision.py --threads 2 --methods dc dsa dm mtt
"""
from __future__ import annotations

import os
import statistics
import time

import torch
from rich.table import Table

from algorithms.networks import flatten_params, seeded_network
from orchestrator import methods
from orchestrator.datasets import load_dataset
from orchestrator.methods import BuildContext
from orchestrator.spec import load_spec
from orchestrator.tasks import task_for
from orchestrator.trial import run_step

from common import (  # bench/common.py: run as a script, this folder is first on sys.path
    REPO, bench_console, bench_parser, machine_info, print_load, quick_defaults, shared_data, write_results,
)

# MCT's step is MTT's (the same unrolled student on a different target), so MTT stands for both
REFERENCE = {"dc": "mnist_baselines_ipc1.yaml", "dsa": "mnist_baselines_ipc1.yaml", "dm": "mnist_baselines_ipc1.yaml",
             "mtt": "mnist_ipc1.yaml"}


def random_walks(model: dict, info, count: int, epochs: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        rows = [flatten_params(seeded_network(model, info.channels, info.num_classes, info.size, seed + i))]
        for _ in range(epochs):
            rows.append(rows[-1] + 0.01 * torch.randn(rows[0].shape, generator=gen))
        out.append(torch.stack(rows))
    return out


def bench_method(name: str, data, args) -> dict:
    spec = load_spec(REPO / "search_spaces" / "reference" / REFERENCE[name])
    algo, model = spec.algorithms[name], spec.model
    preloaded = {}
    if spec.needs_experts():
        preloaded["full"] = random_walks(model, data.info, spec.experts["count"], spec.experts["epochs"], args.seed)
    row = {"method": name, "hp": algo["hyperparameters"]}
    for precision in ("fp32", "bf16"):
        ctx = BuildContext(budget=1, hp=dict(algo["hyperparameters"]), iterations=0, data=data,
                           task=task_for(data.info.name), model=model, spec={}, expert_files={},
                           device=torch.device(args.device), seed=args.seed, preloaded=preloaded)
        dist = methods.get(name).build(ctx)
        first = run_step(dist, ctx.device, precision)["loss"]  # warm-up, and the loss compared
        times = []
        for _ in range(args.steps):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run_step(dist, ctx.device, precision)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        row[precision] = {"median_s": statistics.median(times), "times_s": times, "first_loss": first}
    row["speedup"] = row["fp32"]["median_s"] / row["bf16"]["median_s"]
    row["loss_rel_diff"] = abs(row["bf16"]["first_loss"] - row["fp32"]["first_loss"]) / abs(row["fp32"]["first_loss"])
    return row


def main() -> None:
    ap = bench_parser(__doc__, "DC, DM and MTT, 2 timed steps each (about 2.5 minutes on one core)")
    ap.add_argument("--methods", nargs="+", choices=sorted(REFERENCE), default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per method and precision")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a trial's cpus_per_trial)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    quick_defaults(args, methods=(["dc", "dm", "mtt"], ["dc", "dsa", "dm", "mtt"]), steps=(2, 5))
    torch.set_num_threads(args.threads)
    console = bench_console(110)
    load_start = os.getloadavg()
    root = shared_data("mnist")
    if not root.exists():
        raise SystemExit(f"bench/precision.py needs MNIST in {root} (see ../shared/data/mnist/SOURCE.md, "
                         f"or set ORCHESTRATE_DATA)")
    data = load_dataset("mnist", root)
    rows = []
    for name in args.methods:
        rows.append(bench_method(name, data, args))
        console.print(f"  {name}: fp32 {rows[-1]['fp32']['median_s']:.2f} s, bf16 {rows[-1]['bf16']['median_s']:.2f} s")
    table = Table(title=f"seconds per step, MNIST IPC 1, ConvNet-3 w128, {args.threads} thread(s), {args.device}")
    for col in ("method", "fp32 s/step", "bf16 s/step", "speedup", "loss rel. diff (1st step)"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table.add_row(r["method"], f"{r['fp32']['median_s']:.2f}", f"{r['bf16']['median_s']:.2f}",
                      f"{r['speedup']:.2f}x", f"{100 * r['loss_rel_diff']:.2f}%")
    console.print(table)
    machine = machine_info(args.device, load_start)
    console.print(f"[dim]{machine['cpu_model']}, torch {machine['torch']}[/dim]")
    print_load(console, load_start)
    if args.json:
        write_results(console, args.json, "precision", machine,
                      {"methods": args.methods, "steps": args.steps, "threads": args.threads, "device": args.device},
                      rows=rows)


if __name__ == "__main__":
    main()
