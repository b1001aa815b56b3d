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

``--compile`` adds ``resources.compile``: fp32 steps through torch.compile, for the methods whose
step compiles (``Method.compiles``: DM), timed after a first step that compiles (its extra
seconds in ``compile s``), with the first step's loss against eager fp32's; ``--no-bf16`` leaves
bf16 out (on an AVX2 CPU a bf16 DM step takes minutes, and launches refuse it anyway).

    python bench/precision.py --quick --json /tmp/bench_precision.json
    python bench/precision.py --threads 2 --methods dc dsa dm mtt
    python bench/precision.py --threads 2 --methods dm --budget 10 --compile --no-bf16

``--forward-images N``: DM embeds at most N real images a forward (classes grouped up to it; 0: one
class a forward), instead of its device's default (:func:`algorithms.dm.default_forward_images`: on a
GPU every class of MNIST in one forward, on a CPU one class a forward); run it with 0 and with 2560
to compare the two on a device.
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
    row = {"method": name, "hp": algo["hyperparameters"], "budget": args.budget}
    modes = [("fp32", "fp32", False)] + ([] if args.no_bf16 else [("bf16", "bf16", False)]) + \
        ([("compiled", "fp32", True)] if args.compile and methods.get(name).compiles else [])
    for mode, precision, compile_ in modes:
        ctx = BuildContext(budget=args.budget, hp=dict(algo["hyperparameters"]), iterations=0, data=data,
                           task=task_for(data.info.name), model=model, spec={}, expert_files={},
                           device=torch.device(args.device), seed=args.seed, preloaded=preloaded, compile=compile_)
        dist = methods.get(name).build(ctx)
        if name == "dm" and args.forward_images is not None:
            dist.forward_images = args.forward_images
        if hasattr(dist, "forward_images"):
            row["forward_images"] = dist.forward_images
        t0 = time.perf_counter()
        first = run_step(dist, ctx.device, precision)["loss"]  # warm-up (compiles), and the loss compared
        first_s = time.perf_counter() - t0
        times = []
        for _ in range(args.steps):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run_step(dist, ctx.device, precision)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        row[mode] = {"median_s": statistics.median(times), "times_s": times, "first_loss": first,
                     "first_step_s": first_s}
    for mode in ("bf16", "compiled"):
        if mode in row:
            row[mode]["speedup"] = row["fp32"]["median_s"] / row[mode]["median_s"]
            row[mode]["loss_rel_diff"] = abs(row[mode]["first_loss"] - row["fp32"]["first_loss"]) / \
                abs(row["fp32"]["first_loss"])
    if "compiled" in row:
        row["compiled"]["compile_s"] = row["compiled"]["first_step_s"] - row["compiled"]["median_s"]
    return row


def main() -> None:
    ap = bench_parser(__doc__, "DC, DM and MTT, 2 timed steps each (about 2.5 minutes on one core)")
    ap.add_argument("--methods", nargs="+", choices=sorted(REFERENCE), default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per method and precision")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a trial's cpus_per_trial)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--budget", type=int, default=1, help="images per class (the reference specs' hyperparameters)")
    ap.add_argument("--compile", action="store_true", help="also fp32 through torch.compile (resources.compile)")
    ap.add_argument("--no-bf16", action="store_true", help="fp32 only (and --compile)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--forward-images", type=int, default=None,
                    help="DM: real images one forward embeds at most (0: one class a forward); default: the device's")
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
        console.print("  " + name + ": " + ", ".join(f"{m} {rows[-1][m]['median_s']:.2f} s"
                                                      for m in ("fp32", "bf16", "compiled") if m in rows[-1]))
    shown = [m for m in ("bf16", "compiled") if any(m in r for r in rows)]
    grouping = "" if args.forward_images is None else f", DM forward_images {args.forward_images}"
    table = Table(title=f"seconds per step, MNIST IPC {args.budget}, ConvNet-3 w128, {args.threads} thread(s), "
                        f"{args.device}{grouping}")
    cols = ["method", "fp32 s/step"]
    for m in shown:
        cols += [f"{m} s/step", f"{m} speed vs fp32", f"{m} loss rel. diff (1st step)"]
    if "compiled" in shown:
        cols.append("compile s")
    for col in cols:
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        cells = [r["method"], f"{r['fp32']['median_s']:.2f}"]
        for m in shown:
            cells += [f"{r[m]['median_s']:.2f}", f"{r[m]['speedup']:.2f}x", f"{100 * r[m]['loss_rel_diff']:.5f}%"]\
                if m in r else ["-", "-", "-"]
        if "compiled" in shown:
            cells.append(f"{r['compiled']['compile_s']:.0f}" if "compiled" in r else "-")
        table.add_row(*cells)
    console.print(table)
    machine = machine_info(args.device, load_start)
    console.print(f"[dim]{machine['cpu_model']}, torch {machine['torch']}[/dim]")
    print_load(console, load_start)
    if args.json:
        write_results(console, args.json, "precision", machine,
                      {"methods": args.methods, "steps": args.steps, "threads": args.threads, "device": args.device,
                       "budget": args.budget, "compile": args.compile, "bf16": not args.no_bf16,
                       "forward_images": args.forward_images},
                      rows=rows)


if __name__ == "__main__":
    main()
