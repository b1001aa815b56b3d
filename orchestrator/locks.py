"""Locks that keep two launches from doing the same work at once, on one machine.

``fcntl.flock`` on a file under ``<root>/locks/``: the kernel releases the lock when its holder
exits, however it exits (SIGKILL included), so a lock left by a dead process is no lock and
nothing needs cleaning up. The file's content (pid, host, start time, command) is only
informative: it names the holder in the message of whoever finds the lock taken.

- one lock per sweep (``sweep-<name>-<hash of its Tune folder>.lock``): a second ``orchestrate
  launch`` of the same sweep exits at once (:class:`LockHeld`, exit code 3), naming the holder;
- one lock per expert set (``experts-<dataset>-<store key>.lock``): a second launch of another
  spec that needs the same experts, or ``orchestrate experts``, *waits* for the first to finish
  training them, then finds them in the store and reuses them. Waiting is the friendlier choice
  here: the second sweep is different work that can go on once the experts exist; failing would
  make the user relaunch it by hand.

The lock is on the local root. Two launches on different machines that share one remote store
(``--storage s3://...``) are not excluded by it; cluster jobs are kept apart by ``orchestrate
submit``'s check of the running jobs' metadata (see :mod:`orchestrator.jobs`).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

LOCK_DIR = "locks"


class LockHeld(RuntimeError):
    """The lock is held by another live process (the message names it)."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80]


def sweep_lock_path(root: Path, sweep_name: str, tune_dir: str) -> Path:
    """One lock file per sweep: its name and where its Tune folder is."""
    digest = hashlib.sha256(str(tune_dir).encode()).hexdigest()[:8]
    return Path(root) / LOCK_DIR / f"sweep-{_safe(sweep_name)}-{digest}.lock"


def experts_lock_path(root: Path, dataset: str, key: str) -> Path:
    return Path(root) / LOCK_DIR / f"experts-{_safe(dataset)}-{_safe(key)}.lock"


def read_holder(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "another process (its details are not written yet)"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)) if started else "?"
    return f"pid {holder['pid']} on {holder.get('host', '?')}, started {when}: {holder.get('command', '?')}"


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _write_holder(fd: int, what: str) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "what": what,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)


@contextmanager
def hold(path: Path, what: str, wait: bool = False,
         on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock ``path`` for the ``with`` block. Taken: raise :class:`LockHeld` at once, or
    with ``wait`` block until it is free (saying so once through ``on_wait``; Ctrl-C interrupts
    the wait)."""
    path = Path(path)
    fd = _open(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(path)
            message = f"{what} is in use by {describe(holder)} (lock {path})"
            if not wait:
                raise LockHeld(message, holder) from None
            if on_wait is not None:
                on_wait(f"waiting: {message}")
            fcntl.flock(fd, fcntl.LOCK_EX)  # the kernel hands it over when the holder ends or exits
        _write_holder(fd, what)
        yield
    finally:
        os.close(fd)  # releases the lock (the file stays: deleting it would race with a waiter)
