"""Helpers shared by the benchmark scripts of this folder: the machine, JSON output, memory.

The scripts run as ``python bench/<name>.py`` from the repository root, so Python puts this
folder first on ``sys.path`` and they import this module as ``common``.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import sys
from pathlib import Path

import torch
from rich.console import Console

REPO = Path(__file__).resolve().parent.parent
# the scripts run from a checkout where the package may not be installed (a lent GPU machine: no pip
# install, no Ray, no MLflow): the repository goes on the path before the first orchestrator import
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from orchestrator.malloc import tune_malloc  # noqa: E402

# every script measures with the allocator settings of the orchestrator's own processes (CLI, trials,
# evaluation jobs): see orchestrator/malloc.py; bench/malloc.py sets ORCHESTRATE_MALLOC=default to compare
tune_malloc()


def shared_data(name: str) -> Path:
    """Where the benchmarks find the real data set ``name``: ``$ORCHESTRATE_DATA/<name>``, else
    ``../shared/data/<name>`` beside the repository (never a path of one machine)."""
    base = os.environ.get("ORCHESTRATE_DATA")
    return (Path(base).expanduser() if base else REPO.parent / "shared" / "data") / name


# -- command line, output -------------------------------------------------------------------------
def bench_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The scripts' argument parser: the first paragraph of ``doc`` as description, ``--quick`` and ``--json``."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    return ap


def quick_defaults(args: argparse.Namespace, **defaults: tuple) -> None:
    """Fill each option left at None: ``name=(with --quick, without)``."""
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)


def bench_console(width: int) -> Console:
    """A rich console: the terminal's width on a terminal, else ``width`` columns (logs, pipes)."""
    return Console(width=None if sys.stdout.isatty() else width)


# -- machine, JSON ------------------------------------------------------------------------------
def machine_info(device: str, load_start: tuple | None = None, *, versions: dict | None = None,
                 gpu: bool = False) -> dict:
    """The machine, and its load average (1, 5, 15 min) at the start and the end: other work skews timings.

    ``versions`` (e.g. ``{"ray": ray.__version__}``) is listed after torch's; with ``gpu``, a
    CUDA ``device`` adds the GPU's name and the CUDA version.
    """
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        **(versions or {}),
        "device": device,
        "loadavg_start": list(load_start) if load_start else None,
        "loadavg_end": list(os.getloadavg()),
    }
    if gpu and device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def print_load(console, load_start: tuple) -> None:
    """Print the 1-minute load average at the start and now (other work on the machine skews timings)."""
    console.print(f"load average (1 min) at start {load_start[0]:.2f}, at end {os.getloadavg()[0]:.2f} "
                  f"on {os.cpu_count()} CPUs (other work on the machine skews the timings)")


def write_json(path: str, obj) -> None:
    """Write ``obj`` as JSON atomically (temporary file in the same folder, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, p)


def write_results(console, path: str, benchmark: str, machine: dict, config: dict, **results) -> None:
    """Write a benchmark's JSON (its name, argv, machine, config, then ``results``) and say so."""
    write_json(path, {"benchmark": benchmark, "argv": sys.argv[1:], "machine": machine, "config": config, **results})
    console.print(f"wrote {path}")


# -- memory ---------------------------------------------------------------------------------------
try:
    _libc = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _libc = None


def status_kb(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...); None if unreadable."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def release_memory() -> None:
    """Collect garbage and give freed heap back (glibc), so that reuse does not hide RSS growth."""
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)


def reset_peak() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
