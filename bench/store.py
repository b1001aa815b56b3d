"""Trajectory storage: Arrow store files against ``torch.save`` of the same tensors.

One expert trajectory is ``checkpoints`` flat float32 parameter vectors (initialisation and
one per epoch). Synthetic checkpoints shaped like real ones are written for two models:

* ``quickstart``: the quickstart ConvNet (depth 2, width 32) on the ``--dataset`` input shape
  (digits 1x8x8 by default: 10,986 parameters);
* ``mtt-cifar``: MTT's CIFAR ConvNet (depth 3, width 128, 3x32x32, 10 classes: 320,010).

The parameters start at the network's seeded initialisation and take a small random step per
epoch (random float32 data: nothing here compresses, and no format compresses anyway).

Formats (each file holds one expert):

* ``arrow``: :func:`orchestrator.store.write_trajectory`, read with
  :func:`orchestrator.store.open_trajectory` (``verify=False``; memory-mapped, zero copy);
* ``arrow+verify``: the same file opened with ``verify=True`` (SHA-256 of all parameters);
* ``torch``: ``torch.save`` of the ``[checkpoints, P]`` tensor, ``torch.load(weights_only=True)``;
* ``torch-mmap``: the same file, ``torch.load(weights_only=True, mmap=True)``;
* ``torch-list``: ``torch.save`` of the list of per-epoch flat tensors (like MTT's buffers).

Measured (medians over repeats; files were just written, so reads are *warm*: the page cache
cannot be dropped here):

* ``bytes``: file size; ``overhead`` = bytes / raw float32 bytes;
* ``write_s``: writing one expert durably (Arrow's writer fsyncs and checksums; the torch
  writes are followed by an fsync too, so both are durable);
* ``open_s``: until a usable ``[checkpoints, P]`` tensor (or list) exists (lazy for mmap);
* ``read_full_s``: open and read the whole trajectory into an in-memory torch tensor
  (mmap views are copied with ``clone()``, the list is stacked);
* ``read_row_s``: fetch one random epoch row from an opened trajectory and copy it, as
  ``MTTDistiller.step`` does (the hot path of distillation);
* ``open_row_s``: open a file and fetch one random row (a fresh reader needing one row);
* ``peak_rss_full_mb`` / ``peak_rss_open_row_mb``: process peak RSS growth during those two
  operations (Linux ``/proc/self/clear_refs`` + ``VmHWM``; mapped file pages count as RSS);
  ``arrow_alloc_mb``: ``pyarrow.total_allocated_bytes()`` growth while the trajectory is open.

The ratio columns are the format's value divided by the ``arrow`` row of the same model
(torch ÷ arrow: above 1 means Arrow is smaller / faster).

    python bench/store.py --quick --json /tmp/bench_store.json
"""
from __future__ import annotations

import gc
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pyarrow as pa
import torch
from rich.console import Console
from rich.table import Table

from algorithms.experts import Checkpoint
from algorithms.networks import flatten_params, manifest_of, num_params, seeded_network
from orchestrator.datasets import dataset_info
from orchestrator.store import open_trajectory, write_trajectory

from common import (  # bench/common.py: run as a script, this folder is first on sys.path
    bench_console, bench_parser, machine_info, print_load, quick_defaults, release_memory, reset_peak, status_kb,
    write_results,
)

FORMATS = ("arrow", "arrow+verify", "torch", "torch-mmap", "torch-list")


# -- memory ---------------------------------------------------------------------------------------
def peak_rss_growth_mb(op: Callable[[], object]) -> float | None:
    """Peak RSS growth (MB) while ``op`` runs and its result is alive; None if not measurable."""
    release_memory()
    if not reset_peak():
        return None
    before = status_kb("VmRSS")
    result = op()
    peak = status_kb("VmHWM")
    del result
    gc.collect()
    if before is None or peak is None:
        return None
    return max(0, peak - before) / 1024


def arrow_alloc_mb(path: Path, verify: bool) -> float:
    gc.collect()
    before = pa.total_allocated_bytes()
    traj = open_trajectory(path, verify=verify)
    grown = pa.total_allocated_bytes() - before
    del traj
    return grown / 2**20


# -- data -----------------------------------------------------------------------------------------
def synthetic_checkpoints(model: dict, channels: int, num_classes: int, size: int, count: int,
                          seed: int) -> tuple[list[Checkpoint], list]:
    """``count`` checkpoints: the seeded initialisation, then a small random step per epoch."""
    net = seeded_network(model, channels, num_classes, size, seed)
    gen = torch.Generator().manual_seed(seed)
    theta = flatten_params(net)
    out = [Checkpoint(0, theta.clone(), math.nan, math.nan)]
    for e in range(1, count):
        theta = theta + 0.01 * torch.randn(theta.shape, generator=gen)
        out.append(Checkpoint(e, theta.clone(), 2.3 / e, math.nan if e < count - 1 else 0.5))
    return out, manifest_of(net)


def fsync_path(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


# -- the benchmark of one model ---------------------------------------------------------------
def median_time(op: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``op`` (the cyclic GC is paused; results are freed by refcount)."""
    times = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = op()
            times.append(time.perf_counter() - t0)
            del result
    finally:
        gc.enable()
    return statistics.median(times)


def bench_model(name: str, model: dict, shape: tuple[int, int, int], args, workdir: Path,
                console: Console) -> list[dict]:
    channels, size, num_classes = shape
    ckpts, manifest = synthetic_checkpoints(model, channels, num_classes, size, args.checkpoints, args.seed)
    p = num_params(manifest)
    e = len(ckpts)
    raw_bytes = e * p * 4
    stacked = torch.stack([c.params for c in ckpts])
    as_list = [c.params.clone() for c in ckpts]
    console.print(f"[bold]{name}[/bold]: {model} on {channels}x{size}x{size}, {num_classes} classes: "
                  f"{p:,} parameters x {e} checkpoints = {raw_bytes / 1e6:.2f} MB of float32")

    arrow_path = workdir / f"{name}.arrow"
    torch_path = workdir / f"{name}.pt"
    list_path = workdir / f"{name}-list.pt"
    info = {"dataset": "synthetic", "model": model, "seed": args.seed}

    def write_arrow():
        return write_trajectory(arrow_path, ckpts, manifest, info)

    def write_torch():
        torch.save(stacked, torch_path)
        fsync_path(torch_path)

    def write_list():
        torch.save(as_list, list_path)
        fsync_path(list_path)

    write_s = {"arrow": median_time(write_arrow, args.repeats), "torch": median_time(write_torch, args.repeats),
               "torch-list": median_time(write_list, args.repeats)}
    write_s["arrow+verify"], write_s["torch-mmap"] = write_s["arrow"], write_s["torch"]
    files = {"arrow": arrow_path, "arrow+verify": arrow_path, "torch": torch_path, "torch-mmap": torch_path,
             "torch-list": list_path}

    # open -> the object a distiller indexes; full -> an in-memory [E, P] tensor
    opens: dict[str, Callable[[], object]] = {
        "arrow": lambda: open_trajectory(arrow_path, verify=False).params,
        "arrow+verify": lambda: open_trajectory(arrow_path, verify=True).params,
        "torch": lambda: torch.load(torch_path, weights_only=True),
        "torch-mmap": lambda: torch.load(torch_path, weights_only=True, mmap=True),
        "torch-list": lambda: torch.load(list_path, weights_only=True),
    }
    fulls: dict[str, Callable[[], torch.Tensor]] = {
        "arrow": lambda: opens["arrow"]().clone(),
        "arrow+verify": lambda: opens["arrow+verify"]().clone(),
        "torch": opens["torch"],
        "torch-mmap": lambda: opens["torch-mmap"]().clone(),
        "torch-list": lambda: torch.stack(opens["torch-list"]()),
    }

    rng = random.Random(args.seed)
    rows = []
    for fmt in FORMATS:
        full = fulls[fmt]()
        if not torch.equal(full, stacked):  # correctness before timing
            raise RuntimeError(f"{name}/{fmt}: read back different parameters")
        del full
        open_s = median_time(opens[fmt], args.repeats)
        read_full_s = median_time(fulls[fmt], args.repeats)

        # hot path: rows of an already opened trajectory, copied as MTTDistiller.step does
        traj = opens[fmt]()
        row_times = []
        for epoch in [rng.randrange(e) for _ in range(args.row_fetches)]:
            t0 = time.perf_counter()
            row = traj[epoch].to("cpu", torch.float32, copy=True)
            row_times.append(time.perf_counter() - t0)
        del row, traj
        read_row_s = statistics.median(row_times)

        def open_row(fmt=fmt):
            return opens[fmt]()[rng.randrange(e)].to("cpu", torch.float32, copy=True)

        open_row_s = median_time(open_row, args.repeats)
        peak_full = peak_rss_growth_mb(fulls[fmt])
        peak_row = peak_rss_growth_mb(open_row)
        alloc = arrow_alloc_mb(arrow_path, fmt == "arrow+verify") if fmt.startswith("arrow") else None
        nbytes = files[fmt].stat().st_size
        rows.append({"model": name, "format": fmt, "params": p, "checkpoints": e, "bytes": nbytes,
                     "bytes_per_expert": nbytes, "overhead": nbytes / raw_bytes, "write_s": write_s[fmt],
                     "open_s": open_s, "read_full_s": read_full_s, "read_row_s": read_row_s,
                     "open_row_s": open_row_s, "peak_rss_full_mb": peak_full, "peak_rss_open_row_mb": peak_row,
                     "arrow_alloc_mb": alloc})
    base = rows[0]
    for r in rows:
        for k in ("bytes", "read_full_s", "read_row_s", "open_row_s"):
            r[f"{k}_vs_arrow"] = r[k] / base[k] if base[k] else None
    return rows


def _t(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _mb(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def print_table(console: Console, rows: list[dict], args) -> None:
    table = Table(title=f"One expert trajectory ({args.checkpoints} checkpoints), warm reads, "
                        f"median of {args.repeats} ({args.row_fetches} row fetches)")
    for col, just in (("model", "left"), ("format", "left"), ("MB", "right"), ("overhead", "right"),
                      ("write", "right"), ("open", "right"), ("read full", "right"), ("row (hot)", "right"),
                      ("open+row", "right"), ("peak RSS full MB", "right"), ("peak RSS open+row MB", "right"),
                      ("bytes ×", "right"), ("full ×", "right"), ("row ×", "right"), ("open+row ×", "right")):
        table.add_column(col, justify=just)
    last = None
    for r in rows:
        if last is not None and r["model"] != last:
            table.add_section()
        last = r["model"]
        table.add_row(r["model"], r["format"], f"{r['bytes'] / 1e6:.2f}", f"{r['overhead']:.4f}",
                      _t(r["write_s"]), _t(r["open_s"]), _t(r["read_full_s"]), _t(r["read_row_s"]),
                      _t(r["open_row_s"]), _mb(r["peak_rss_full_mb"]), _mb(r["peak_rss_open_row_mb"]),
                      f"{r['bytes_vs_arrow']:.3f}", f"{r['read_full_s_vs_arrow']:.2f}",
                      f"{r['read_row_s_vs_arrow']:.2f}", f"{r['open_row_s_vs_arrow']:.2f}")
    console.print(table)
    console.print("× columns: format ÷ arrow (no verify) of the same model; for torch formats that is torch ÷ arrow. "
                  "Arrow allocates nothing on open (memory-mapped): "
                  + ", ".join(f"{r['model']}/{r['format']} {r['arrow_alloc_mb']:.2f} MB" for r in rows
                              if r["arrow_alloc_mb"] is not None))


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__, "fewer repeats and row fetches (well under a minute)")
    ap.add_argument("--dataset", default="digits",
                    help="input shape of the quickstart model (digits: 1x8x8, mnist: 1x28x28, cifar10: 3x32x32)")
    ap.add_argument("--checkpoints", type=int, default=51, help="checkpoints per expert (default 51 = 50 epochs + init)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 9, --quick 5)")
    ap.add_argument("--row-fetches", type=int, default=None, help="random row fetches (default 500, --quick 200)")
    ap.add_argument("--dir", default=None, help="folder for the files (default: a temporary folder)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1, as a trial with cpus_per_trial: 1; on a busy "
                         "machine a 2-thread copy of one row waits milliseconds for the second thread)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    load_start = os.getloadavg()
    torch.set_num_threads(max(1, args.threads))
    quick_defaults(args, repeats=(5, 9), row_fetches=(200, 500))

    console = bench_console(200)
    torch.manual_seed(args.seed)
    info = dataset_info(args.dataset)
    models = [
        ("quickstart", {"name": "convnet", "depth": 2, "width": 32}, (info.channels, info.size, info.num_classes)),
        ("mtt-cifar", {"name": "convnet", "depth": 3, "width": 128}, (3, 32, 10)),
    ]
    with tempfile.TemporaryDirectory(prefix="bench-store-", dir=args.dir) as tmp:
        rows = []
        for name, model, (c, s, k) in models:
            rows += bench_model(name, model, (c, s, k), args, Path(tmp), console)
    print_table(console, rows, args)

    print_load(console, load_start)
    if args.json:
        write_results(
            console, args.json, "store", machine_info("cpu", load_start, versions={"pyarrow": pa.__version__}),
            {"dataset_shape": args.dataset, "checkpoints": args.checkpoints, "repeats": args.repeats,
             "row_fetches": args.row_fetches, "seed": args.seed, "threads": args.threads, "quick": args.quick,
             "reads": "warm (page cache not dropped)"},
            rows=rows,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
