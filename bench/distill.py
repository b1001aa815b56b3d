"""MTT distillation cost: seconds per outer iteration and memory against ``syn_steps``.

MTT backpropagates through ``syn_steps`` unrolled student SGD steps, so time and the memory of
the autograd graph should grow linearly with ``syn_steps``. This measures
:meth:`algorithms.mtt.MTTDistiller.step` for ``syn_steps`` 10, 20 and 40 at IPC 1 and 10
(``--quick``: 3 timed iterations instead of 10), with the quickstart spec's model (ConvNet depth 2,
width 32) and MTT hyperparameters (``orchestrator.spec.load_spec()``), on digits by default.

Experts: ``--experts`` real experts of ``--expert-epochs`` epochs trained with
:func:`algorithms.experts.train_expert` on the quickstart training config (lr 0.03, batch 32,
DSA); ``--trajectories random`` uses random walks of the same shape instead (for MNIST on a
CPU, where training experts takes minutes). ``max_start_epoch`` is cut to fit the short experts.

Per (ipc, syn_steps): one warm-up step, then the median wall time of ``--iterations`` steps.
Then one more step measures memory:

* ``saved MB``: the bytes of all tensors the autograd graph saves during the step, counted
  once per storage, through a ``torch.autograd.graph.saved_tensors_hooks`` pack hook; the
  graph is complete at the end of the forward pass, so this is its peak ("saved-activation MB");
* on CUDA, ``torch.cuda.max_memory_allocated`` growth over the step (``peak_mb`` in the JSON;
  on the CPU ``peak_mb`` is the saved-activation MB);
* ``RSS MB``: process peak RSS growth during the step (Linux ``VmHWM`` reset through
  ``/proc/self/clear_refs``, else ``resource.getrusage`` growth, which only sees new peaks).

Ratios are against ``syn_steps=10`` at the same IPC (2.0 and 4.0 mean exactly linear).

    python bench/distill.py --quick --json /tmp/bench_distill.json
    python bench/distill.py --device cuda
    python bench/distill.py --dataset mnist --data-root ../shared/data/mnist --trajectories random
"""
from __future__ import annotations

import contextlib
import math
import os
import resource
import statistics
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from algorithms.experts import ExpertConfig, train_expert
from algorithms.networks import flatten_params, seeded_network
from orchestrator import methods
from orchestrator.methods import BuildContext
from orchestrator.tasks import task_for
from orchestrator.datasets import load_dataset
from orchestrator.spec import load_spec

from common import (  # bench/common.py: run as a script, this folder is first on sys.path
    bench_console, bench_parser, machine_info, print_load, quick_defaults, release_memory, reset_peak, status_kb,
    write_results,
)


# -- memory ---------------------------------------------------------------------------------------
class PeakRSS:
    """Peak RSS growth (MB) over a block: VmHWM after resetting it, else getrusage growth."""

    def __enter__(self):
        release_memory()
        if reset_peak():
            self.method = "VmHWM"
            self.before = status_kb("VmRSS")
        else:
            self.method = "getrusage"
            self.before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc):
        after = status_kb("VmHWM") if self.method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.mb = None if after is None or self.before is None else max(0, after - self.before) / 1024


class SavedTensors:
    """Sum the bytes of the tensors autograd saves (once per storage) inside the block."""

    def __init__(self):
        self.seen: set[int] = set()
        self.bytes = 0  # once per storage
        self.bytes_all = 0  # every save, duplicates included
        self.count = 0

    def _pack(self, t: torch.Tensor):
        with contextlib.suppress(Exception):  # tensors without a storage (e.g. some wrappers)
            storage = t.untyped_storage()
            nbytes = storage.nbytes()
            self.bytes_all += t.numel() * t.element_size()
            self.count += 1
            key = storage.data_ptr()
            if key not in self.seen:
                self.seen.add(key)
                self.bytes += nbytes
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


# -- experts --------------------------------------------------------------------------------------
def build_trajectories(args, model: dict, training: dict, data, device: str, console: Console) -> list[torch.Tensor]:
    info = data.info
    out = []
    t0 = time.perf_counter()
    for i in range(args.experts):
        seed = args.seed * 1_000_003 + i
        if args.trajectories == "trained":
            cfg = ExpertConfig(**{**training, "epochs": args.expert_epochs})
            ckpts = list(train_expert(model, data, cfg, seed=seed, device=device))
            out.append(torch.stack([c.params for c in ckpts]))
            console.print(f"  expert {i}: {args.expert_epochs} epochs, test acc {ckpts[-1].test_acc:.3f}")
        else:
            gen = torch.Generator().manual_seed(seed)
            theta = flatten_params(seeded_network(model, info.channels, info.num_classes, info.size, seed))
            rows = [theta]
            for _ in range(args.expert_epochs):
                rows.append(rows[-1] + 0.01 * torch.randn(theta.shape, generator=gen))
            out.append(torch.stack(rows))
    console.print(f"  {args.experts} {args.trajectories} trajectories of shape {list(out[0].shape)} "
                  f"in {time.perf_counter() - t0:.1f} s")
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -- one configuration ------------------------------------------------------------------------
def bench_config(ipc: int, syn_steps: int, hp: dict, trajectories, model: dict, data, args, device: str) -> dict:
    # built by the registry's MTT entry, as a trial builds it, on the trajectories in memory
    ctx = BuildContext(budget=ipc, hp={**hp, "syn_steps": syn_steps}, iterations=0, data=data,
                       task=task_for(data.info.name), model=model, spec={}, expert_files={},
                       device=torch.device(device), seed=args.seed, preloaded={"full": trajectories})
    dist = methods.get("mtt").build(ctx)
    losses = [dist.step()["loss"]]  # warm-up
    times = []
    for _ in range(args.iterations):
        sync(device)
        t0 = time.perf_counter()
        losses.append(dist.step()["loss"])
        sync(device)
        times.append(time.perf_counter() - t0)

    # memory of one more step (not timed: the hook costs a little)
    cuda_mb = None
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with PeakRSS() as rss, SavedTensors() as saved:
        losses.append(dist.step()["loss"])
    if device.startswith("cuda"):
        sync(device)
        cuda_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    saved_mb = saved.bytes / 2**20
    return {"syn_steps": syn_steps, "ipc": ipc, "sec_per_iter": statistics.median(times),
            "peak_mb": cuda_mb if cuda_mb is not None else saved_mb, "device": device,
            "saved_mb": saved_mb, "saved_mb_with_duplicates": saved.bytes_all / 2**20,
            "saved_tensors": saved.count, "cuda_peak_mb": cuda_mb, "rss_growth_mb": rss.mb,
            "rss_method": rss.method, "times_s": times, "iterations": args.iterations,
            "final_loss": losses[-1], "losses_finite": all(math.isfinite(v) for v in losses),
            "images": ipc * data.info.num_classes}


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__, "3 timed iterations instead of 10 (under a minute)")
    ap.add_argument("--dataset", default="digits", help="digits (default, bundled) or mnist, cifar10, ...")
    ap.add_argument("--data-root", default=None, help="folder of the dataset files (e.g. ../shared/data/mnist)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--syn-steps", type=int, nargs="+", default=[10, 20, 40], help="default: 10 20 40")
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10], help="images per class (default 1 10)")
    ap.add_argument("--iterations", type=int, default=None, help="timed iterations after 1 warm-up (default 10, --quick 3)")
    ap.add_argument("--experts", type=int, default=2, help="expert trajectories (default 2)")
    ap.add_argument("--expert-epochs", type=int, default=6, help="epochs per expert (default 6)")
    ap.add_argument("--trajectories", choices=("trained", "random"), default="trained",
                    help="train real experts (default) or use random walks of the same shape")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1, as a trial with cpus_per_trial: 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    load_start = os.getloadavg()
    quick_defaults(args, iterations=(3, 10))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available here")
    syn_steps = sorted(set(args.syn_steps))

    console = bench_console(120)
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    spec = load_spec()
    model = dict(spec.model)
    hp = dict(spec.algorithms["mtt"]["hyperparameters"])
    for k, v in hp.items():  # the quickstart fixes every value; a grid or distribution would need a choice
        if isinstance(v, (list, dict)):
            raise SystemExit(f"quickstart hyperparameter {k} is not a single value: {v!r}")
    hp["max_start_epoch"] = max(1, min(int(hp["max_start_epoch"]), args.expert_epochs - int(hp["expert_epochs"])))
    data = load_dataset(args.dataset, args.data_root)
    console.print(f"[bold]MTT step[/bold] on {args.dataset} ({args.device}, {torch.get_num_threads()} thread(s)): "
                  f"model {model}, hp {hp}")
    trajectories = build_trajectories(args, model, spec.expert_training(), data, args.device, console)

    rows = []
    for ipc in args.ipc:
        for s in syn_steps:
            r = bench_config(ipc, s, hp, trajectories, model, data, args, args.device)
            rows.append(r)
            console.print(f"  ipc {ipc:3d} syn_steps {s:3d}: {r['sec_per_iter'] * 1e3:8.1f} ms/iter, "
                          f"saved {r['saved_mb']:.1f} MB")
    for r in rows:
        base = next((b for b in rows if b["ipc"] == r["ipc"] and b["syn_steps"] == syn_steps[0]), None)
        r["time_ratio"] = r["sec_per_iter"] / base["sec_per_iter"]
        r["mem_ratio"] = r["peak_mb"] / base["peak_mb"] if base["peak_mb"] else None

    cuda = args.device.startswith("cuda")
    table = Table(title=f"MTT step on {args.dataset}, {args.device} (median of {args.iterations} after 1 warm-up)")
    cols = ["syn_steps", "ipc", "sec/iter", f"× vs {syn_steps[0]}", "saved MB", f"saved × vs {syn_steps[0]}"]
    cols += ["CUDA peak MB"] if cuda else []
    cols += ["RSS growth MB", "final loss"]
    for c in cols:
        table.add_column(c, justify="right")
    last = None
    for r in rows:
        if last is not None and r["ipc"] != last:
            table.add_section()
        last = r["ipc"]
        base_saved = next(b["saved_mb"] for b in rows if b["ipc"] == r["ipc"] and b["syn_steps"] == syn_steps[0])
        cells = [str(r["syn_steps"]), str(r["ipc"]), f"{r['sec_per_iter']:.4f}", f"{r['time_ratio']:.2f}",
                 f"{r['saved_mb']:.1f}", f"{r['saved_mb'] / base_saved:.2f}" if base_saved else "n/a"]
        cells += [f"{r['cuda_peak_mb']:.1f}"] if cuda else []
        cells += ["n/a" if r["rss_growth_mb"] is None else f"{r['rss_growth_mb']:.1f}", f"{r['final_loss']:.4f}"]
        table.add_row(*cells)
    console.print(table)
    console.print("saved MB: tensors saved by autograd during one step, once per storage (the graph's peak); "
                  f"peak_mb in the JSON is {'the CUDA peak' if cuda else 'saved MB'}.")

    print_load(console, load_start)
    if args.json:
        write_results(
            console, args.json, "distill", machine_info(args.device, load_start, gpu=True),
            {"dataset": args.dataset, "model": model, "hyperparameters": hp, "experts": args.experts,
             "expert_epochs": args.expert_epochs, "trajectories": args.trajectories, "iterations": args.iterations,
             "threads": args.threads, "seed": args.seed, "quick": args.quick},
            rows=rows,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
