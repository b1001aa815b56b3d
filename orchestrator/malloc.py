"""glibc's allocator, set for the tensors of a CPU step.

PyTorch's CPU tensors come from ``malloc``. glibc serves a block over its mmap threshold (at most
32 MB by its own adjustment) with a fresh ``mmap`` and gives it back with ``munmap`` when freed,
and returns the top of its heap to the system once more than its trim threshold lies free there.
A ConvNet-3 on MNIST allocates and frees such blocks at every step: a network trained on 100
images makes 52 MB activations (100 x 128 x 32 x 32 floats), a DM step at ``batch_real`` 256
134 MB ones. Each comes back from the kernel as new pages that it zero-fills page by page: on a
2-core AVX2 machine 30 % of an evaluation network's time and 43 % of a DM or an expert step's
went to those page faults (system time; ``bench/malloc.py`` measures it).

:func:`tune_malloc` raises both thresholds (``mallopt``), so that freed blocks stay in the heap
and the next step reuses them (after its first few steps, while the heap grows to what a step
needs). The price is memory kept: a process holds on to what its steps freed, up to
:data:`TRIM_THRESHOLD` above what it uses, instead of handing it back between steps, and its
peak grows (64-byte-aligned blocks do not fit exactly into the holes freed ones leave: +65 MB for
an evaluation network on ~610 MB, +250 MB for a DM step at IPC 10 on ~630, +300 MB for an
expert's step on ~910). The orchestrator calls it in every process
that steps or trains: the CLI, each trial, each expert task and each evaluation job. It does
nothing where the allocator is not glibc's (macOS, musl), when the user set glibc's own
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` or a ``glibc.malloc.*`` tunable in
``GLIBC_TUNABLES`` (theirs stand), or with
``ORCHESTRATE_MALLOC=default``.

The thresholds reach only the main arena's blocks. glibc gives each new thread an arena of its own
(up to 8 per core) whose heaps hold at most 64 MB, so a larger block asked for there is mapped and
unmapped whatever the threshold says; and Ray Tune runs a trial's function in a thread of its own.
Three DM steps at IPC 10 in such a thread faulted in 3.8 million pages (11 s of system time on two
AVX2 cores) where the same steps in the main thread faulted in none. The number of
arenas is read once, when a process starts (``mallopt`` later does not move threads that already
have one), so the processes that run trials are started with ``MALLOC_ARENA_MAX=1``
(:func:`worker_env`: the local Ray of ``orchestrate launch`` puts it in its workers' environment;
a cluster sets it on its nodes, see ``cluster/``): every thread allocates from the main arena, and
the trial's thread reuses its blocks as the main thread does. The price: a process's threads
share one lock, which costs nothing to a step of one torch thread and 6-16 % to one of two
(``bench/malloc.py``).
"""
from __future__ import annotations

import ctypes
import os
import sys

MMAP_THRESHOLD = 512 * 2**20  # blocks above this still get their own mmap (larger than any step's tensor here)
TRIM_THRESHOLD = 1024 * 2**20  # free memory at the heap's top kept for reuse before it is returned
ENV = "ORCHESTRATE_MALLOC"  # "default": leave glibc's settings as they are
_USERS_OWN = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
ARENA_ENV = "MALLOC_ARENA_MAX"  # glibc's own: read once, at a process's start
# mallopt's parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

_state: dict[str, str] = {}


def tune_malloc() -> str:
    """Set glibc's mmap and trim thresholds for this process, once; returns what was done:
    ``"tuned"``, or why not (``"off"``, ``"user"``, ``"not glibc"``, ``"refused"``)."""
    if "done" in _state:
        return _state["done"]
    how = _not_ours()
    if how is None:
        mallopt = _glibc_mallopt()
        if mallopt is None:
            how = "not glibc"
        else:
            mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
            ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            how = "tuned" if ok else "refused"
    _state["done"] = how
    return how


def _not_ours() -> str | None:
    """Why the allocator is left alone here (``"off"``, ``"user"``, ``"not glibc"``), or None."""
    if os.environ.get(ENV, "").strip().lower() in ("default", "off", "0", "false"):
        return "off"
    if any(k in os.environ for k in _USERS_OWN[:2]) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "user"
    if not sys.platform.startswith("linux"):
        return "not glibc"
    return None


def _glibc_mallopt():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (glibc's alone: musl has mallopt, as a no-op, but not this)
        return libc.mallopt
    except (OSError, AttributeError):
        return None


def worker_env() -> dict[str, str]:
    """The environment to start the processes that run trials with: ``MALLOC_ARENA_MAX=1`` (one
    arena, so that a trial's own thread gets the tuned thresholds too; see the module's docstring),
    or nothing where :func:`tune_malloc` would leave the allocator alone, or where the user set the
    number of arenas (``MALLOC_ARENA_MAX``) themselves."""
    if _not_ours() is not None or ARENA_ENV in os.environ or _glibc_mallopt() is None:
        return {}
    return {ARENA_ENV: "1"}
