"""Evaluation networks in parallel: Ray tasks on the cluster's free resources.

:class:`RayRunner` is a runner for :func:`algorithms.evaluate.evaluate_set` (its ``run``): it maps
a list of jobs (zero-argument callables, :func:`algorithms.evaluate.network_job`) to their results
in order, training some of them as Ray tasks while the calling process trains the others.

It never waits on a task that cannot be scheduled. A trial holds its own CPUs (and GPU) while it
evaluates, and on a full cluster nothing else may be free: so

- it asks for no more task slots than :func:`ray.available_resources` has room for right now
  (one CPU each; with a CUDA ``device``, one CPU and :data:`GPUS_PER_NETWORK` of a GPU), and never
  takes all of the jobs there: the calling process trains its share itself, from the front of the
  list, while the tasks take theirs from the back. With room for s tasks, K jobs are shared as
  evenly as s + 1 workers allow: this process keeps ceil(K / (s + 1)), the s slots get the rest,
  queued in Ray behind one another (a slot's next task needs no word from this process). Before
  each job of its own it looks again and submits one more task per slot freed meanwhile (beyond
  what its own queued tasks will take);
- when its own share is done it waits for the tasks still out at most ``patience``: as long as
  one job of its own took (the longest, at least :data:`MIN_PATIENCE_S`). A task not done by then
  is queued, on a slower node or in a worker still starting; the caller cancels the most recently
  submitted one and trains that job itself (the same seed: the same result), looks at the others
  again, and so on until every job has its result. Waiting one job's time before training it
  here is the ski-rental rule: the caller, idle, never ends more than one job's time later than
  the best choice made knowing when the task would finish;
- a task that failed (its worker or node died, a shared GPU ran out of memory, the job raised)
  is trained here too, with a warning: a job that fails on its own terms raises here as it would
  one network after another;
- a task that is already running when it is reclaimed is not interrupted (see :func:`_call`): it
  finishes, its result unread, and its worker stays warm for the next evaluation.

Where the tasks go. Tune runs a trial in a placement group that captures its child tasks, and
the trial's own bundle has no room for them (the trial uses it whole): captured there, they would
queue forever. A trial of two CPUs or more on the CPU, though, holds its CPUs beyond the first as
bundles of one CPU each (:func:`orchestrator.schedulers.trial_resources`): its distillation steps use
them all (its torch threads), and while it evaluates, they are free for its networks. So a task
goes first to a free CPU of the caller's own placement group (``free()["group"]``, scheduled into
that group's bundles), which the trial holds whatever else runs on the cluster; then to the
cluster's free CPUs (``DEFAULT``, outside the group). A GPU job never takes a group slot (its
bundles have no GPU share).

Results are bit-identical to :func:`algorithms.evaluate.sequential`: a network depends only on its
seed and the data (one torch thread, see :data:`algorithms.evaluate.EVAL_THREADS`), the tensors
travel through Ray's object store unchanged, and a task trains on the caller's device type. On
identical hardware and software, that is: a cluster whose nodes have other CPUs (another vector
instruction set) or other GPUs, or CUDA kernels that are not deterministic, can differ in the last
bits as any two machines do.

Outside Ray (``ray`` not initialised) a runner trains everything in this process, one job after
another, as :func:`~algorithms.evaluate.sequential` does.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

from algorithms.evaluate import sequential

from .malloc import tune_malloc

log = logging.getLogger(__name__)

GPUS_PER_NETWORK = 0.25  # of a GPU, per evaluation network task (small ConvNets: four share one GPU)
MIN_PATIENCE_S = 1.0  # the least wait for a task still out once the caller's share is done (Ray's latency)
LOCAL_RAY_MIN_S = 60.0  # orchestrate evaluate: remaining work (one after another) that pays a local Ray's start


def _call(func: Callable, kwargs: dict, *args) -> Any:
    """The Ray task: one job (its positional arguments last: Ray resolves top-level ObjectRefs
    only). A CUDA device is the task's own GPU (Ray makes it device 0).

    Once running, the job is not interrupted by ``ray.cancel``: Ray cancels a running task with a
    KeyboardInterrupt raised wherever its Python code is, and one that lands in an import (the
    first network of a fresh worker imports much of torch lazily, seconds on a loaded machine)
    leaves half-initialised modules behind, which break every later task of that worker. A
    reclaimed task that was already running finishes instead (its result unread) and leaves its
    worker warm; one still queued is removed by the cancel."""
    tune_malloc()  # this worker's allocator, for the job's tensors (orchestrator.malloc)
    device = kwargs.get("device")
    if device is not None and torch.device(device).type == "cuda":
        kwargs = {**kwargs, "device": "cuda"}
    with _uninterrupted():
        return func(*args, **kwargs)


@contextlib.contextmanager
def _uninterrupted():
    """SIGINT (how Ray's ``cancel`` interrupts a running task) ignored in the block, in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _job_device(job: Callable) -> str:
    """``cuda`` for a job (a ``functools.partial``) whose ``device`` keyword is a CUDA device, else ``cpu``."""
    device = (getattr(job, "keywords", None) or {}).get("device")
    return "cuda" if device is not None and torch.device(device).type == "cuda" else "cpu"


def own_group():
    """The placement group this process runs in (a Tune trial's), or None."""
    from ray.util import get_current_placement_group

    return get_current_placement_group()


def free_resources() -> dict[str, float]:
    """What is free now: the cluster's ``CPU`` and ``GPU`` (placement groups' reserved bundles
    excluded) and ``group``, the free CPUs of the caller's own placement group (0 outside one)."""
    import ray

    free = ray.available_resources()
    pg = own_group()
    group = float(free.get(f"CPU_group_{pg.id.hex()}", 0.0)) if pg is not None else 0.0
    return {"CPU": float(free.get("CPU", 0.0)), "GPU": float(free.get("GPU", 0.0)), "group": group}


class RayRunner:
    """Jobs as Ray tasks on free resources, the rest in this process (see the module's docstring).

    ``free``: what is free now (default :func:`free_resources`; tests pass their own);
    ``group``: the caller's placement group, whose free CPUs (``free()["group"]``) take tasks first
    (default :func:`own_group`);
    ``patience_s``: a fixed wait for the tasks still out once the caller's share is done (default:
    the longest of the caller's own jobs, at least ``min_patience_s``). After a call, ``stats``
    says where the jobs ran: ``remote`` (finished as tasks), ``local``, ``reclaimed`` (submitted,
    then trained here: cancelled, or ``failed`` as tasks), ``submitted`` and ``in_group`` (of those
    submitted, how many into the caller's placement group).
    """

    def __init__(self, gpus_per_network: float = GPUS_PER_NETWORK, patience_s: float | None = None,
                 min_patience_s: float = MIN_PATIENCE_S, free: Callable[[], dict[str, float]] | None = None,
                 group: Callable[[], Any] | None = None):
        self.gpus_per_network = gpus_per_network
        self.patience_s = patience_s
        self.min_patience_s = min_patience_s
        self.free = free or free_resources
        self.group = group or own_group
        self.stats: dict[str, int] = {}

    def __call__(self, jobs: Sequence[Callable[[], Any]], on_done: Callable[[int, Any], None] | None = None) -> list:
        try:
            import ray
        except ImportError:  # the components without Ray (bench/direct.py on a bare GPU machine)
            ray = None
        jobs = list(jobs)
        self.stats = {"submitted": 0, "in_group": 0, "remote": 0, "local": 0, "reclaimed": 0, "failed": 0}
        if ray is None or not ray.is_initialized() or len(jobs) < 2:
            self.stats["local"] = len(jobs)
            return sequential(jobs, on_done)
        return _Call(self, jobs, on_done, ray).run()


class _Call:
    """One call of a :class:`RayRunner`: its queue, its tasks and its results."""

    def __init__(self, runner: RayRunner, jobs: list, on_done, ray):
        self.runner, self.jobs, self.on_done, self.ray = runner, jobs, on_done, ray
        self.results: list[Any] = [None] * len(jobs)
        self.todo = deque(range(len(jobs)))  # this process takes from the left, tasks from the right
        self.pending: dict[Any, int] = {}  # ObjectRef -> job index, in submission order
        self.puts: dict[int, tuple[Any, Any]] = {}  # id(tensor) -> (tensor, its ObjectRef): one put per call
        self.longest = 0.0  # the longest job of this process, seconds
        self.slots = 0  # task slots found free (tasks beyond them wait in Ray's queue behind ours)
        self.task = ray.remote(max_retries=1, retry_exceptions=False)(_call)
        self.pg = runner.group()  # the caller's placement group (a Tune trial's), or None

    def run(self) -> list:
        try:
            first = True
            while self.todo:
                i = self.todo.popleft()
                self.submit(first)  # the first time a share; later, room freed since the last look
                first = False
                self.local(i)
                self.collect(timeout=0)
            deadline = time.monotonic() + self.patience()
            while self.pending:
                left = deadline - time.monotonic()
                if left > 0:
                    self.collect(timeout=left, one=True)  # the next to finish, or the deadline
                self.collect(timeout=0)  # and every other one already done
                if self.pending and time.monotonic() >= deadline:
                    self.reclaim()
        finally:
            # interrupted (Ctrl-C, Tune stopping the trial) or an error: no orphans, and their CPUs
            # back at once (a running one's worker is killed: nothing else will run in it half-done)
            for ref in self.pending:
                self.ray.cancel(ref, force=True)
        return self.results

    def patience(self) -> float:
        r = self.runner
        return r.patience_s if r.patience_s is not None else max(r.min_patience_s, self.longest)

    # -- submitting ---------------------------------------------------------------------------
    def _need(self, i: int) -> dict[str, float]:
        gpu = _job_device(self.jobs[i]) == "cuda"
        return {"CPU": 1.0, **({"GPU": self.runner.gpus_per_network} if gpu else {})}

    def submit(self, share: bool) -> None:
        """Submit jobs from the back of the queue. ``share``: the first look, with the job this
        process took first already out of the queue: of the K jobs, with room for s tasks now, the
        tasks get all but ceil(K / (s + 1)), the rest of them queued in Ray behind the first s
        (each slot then trains about as many as this process; no slot waits for this process to
        hand it the next job). Later looks submit one task per slot freed meanwhile. A slot is a
        free CPU of the caller's placement group (first) or of the cluster."""
        if not self.todo:
            return
        free = self.runner.free()
        group = free.get("group", 0.0) if self.pg is not None else 0.0
        where: list[bool] = []  # per slot found: in the caller's group (True) or on the cluster
        for i in reversed(self.todo):  # how many of the jobs at the back fit in what is free
            need = self._need(i)
            if "GPU" not in need and group + 1e-9 >= need["CPU"]:
                group -= need["CPU"]
                where.append(True)
                continue
            if any(free.get(k, 0.0) + 1e-9 < v for k, v in need.items()):
                break
            for k, v in need.items():
                free[k] -= v
            where.append(False)
        slots = len(where)
        if share:
            self.slots = slots
            if slots:
                total = len(self.todo) + 1
                slots = total - math.ceil(total / (slots + 1))
        else:  # what is free goes first to our tasks queued behind our slots: only the rest is new room
            slots = max(0, slots - max(0, len(self.pending) - self.slots))
            self.slots += slots
        for k in range(slots):
            i = self.todo.pop()
            in_group = where[k % len(where)] and "GPU" not in self._need(i)  # queued ones behind the slots in turn
            self.pending[self._submit(self.jobs[i], self._need(i), in_group)] = i
            self.runner.stats["submitted"] += 1
            self.runner.stats["in_group"] += in_group

    def _submit(self, job, need: dict[str, float], in_group: bool = False):
        if isinstance(job, functools.partial):
            func, args, kwargs = job.func, tuple(self._ref(a) for a in job.args), dict(job.keywords)
        else:
            func, args, kwargs = job, (), {}
        if in_group:  # any bundle of the caller's group with a free CPU (not the trial's own: it is full)
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=-1,
                                                        placement_group_capture_child_tasks=False)
        else:  # not the caller's placement group (a Tune trial's captures child tasks): the cluster's
            strategy = "DEFAULT"
        opts = {"num_cpus": need["CPU"], "num_gpus": need.get("GPU", 0), "name": "eval_network",
                "scheduling_strategy": strategy}
        # tensors travel as top-level ObjectRefs: Ray hands the task their values
        return self.task.options(**opts).remote(func, kwargs, *args)

    def _ref(self, value):
        """A tensor argument put once per call into the object store (the test set is shared by all jobs)."""
        if not isinstance(value, torch.Tensor):
            return value
        if id(value) not in self.puts:
            self.puts[id(value)] = (value, self.ray.put(value))
        return self.puts[id(value)][1]

    # -- results ------------------------------------------------------------------------------
    def local(self, i: int, reclaimed: bool = False) -> None:
        t0 = time.monotonic()
        value = self.jobs[i]()
        if not reclaimed:
            self.longest = max(self.longest, time.monotonic() - t0)
        self.runner.stats["reclaimed" if reclaimed else "local"] += 1
        self.done(i, value)

    def done(self, i: int, value) -> None:
        self.results[i] = value
        if self.on_done is not None:
            self.on_done(i, value)

    def collect(self, timeout: float, one: bool = False) -> None:
        """Take the results of the tasks that finished (waiting up to ``timeout`` for the first)."""
        if not self.pending:
            return
        ready, _ = self.ray.wait(list(self.pending), num_returns=1 if one else len(self.pending), timeout=timeout)
        for ref in ready:
            i = self.pending.pop(ref)
            try:
                value = self.ray.get(ref)
            except self.ray.exceptions.RayError as e:
                # its worker or node died, or the job failed there (a GPU shared with others out of
                # memory, a node without a package): the same job here, which raises the job's
                # own error if it has one
                log.warning("evaluation network %d failed as a Ray task, training it here instead: %s", i,
                            str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
                self.runner.stats["failed"] += 1
                self.local(i, reclaimed=True)
                continue
            self.runner.stats["remote"] += 1
            self.done(i, value)

    def reclaim(self) -> None:
        """Cancel the most recently submitted task still out and train its job here."""
        ref = next(reversed(self.pending))
        i = self.pending.pop(ref)
        self.ray.cancel(ref)
        self.local(i, reclaimed=True)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class EvaluateRunner:
    """``orchestrate evaluate``'s runner: where the networks of a set file train.

    ``workers``: 1, one after another in this process (no Ray); N >= 2, a new local Ray of N - 1
    CPUs, started at once, beside this process (which trains too); None (``auto``):

    - in a Ray session (``address``, ``RAY_ADDRESS`` as inside a Ray job, or Ray already
      initialised in this Python process): :class:`RayRunner` on that cluster's free resources;
    - else on a machine of two CPUs or more: the networks train here one after another while the
      time they took says that the rest would take at most ``min_s`` (:data:`LOCAL_RAY_MIN_S`)
      more; past that, a local Ray with every usable CPU but one (this process's) trains the rest
      beside this process. Starting Ray and its workers takes seconds (tens on a loaded machine):
      a short evaluation does not pay it.

    Every way gives the same numbers (see :mod:`orchestrator.parallel`). After a call, ``how``
    says where the networks trained (the report's ``protocol.runner``).
    """

    def __init__(self, workers: int | None = None, address: str | None = None, min_s: float = LOCAL_RAY_MIN_S):
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, not {workers}")
        self.workers, self.address, self.min_s = workers, address, min_s
        self.how = ""

    def __call__(self, jobs: Sequence[Callable[[], Any]], on_done: Callable[[int, Any], None] | None = None) -> list:
        jobs = list(jobs)
        if self.workers == 1 or len(jobs) < 2:  # needs no Ray (a machine without it can evaluate)
            self.how = "one network after another in this process"
            return sequential(jobs, on_done)
        import ray

        if ray.is_initialized():
            return self._ray(jobs, on_done, "the Ray session of this process")
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        if address:
            return self._session(jobs, on_done, address, None, f"the Ray cluster at {address}")
        if self.workers is not None:
            return self._session(jobs, on_done, None, self.workers - 1,
                                 f"a local Ray of {self.workers - 1} CPUs and this process")
        cpus = usable_cpus()
        if cpus < 2:
            self.how = "one network after another in this process (one CPU)"
            return sequential(jobs, on_done)
        results: list[Any] = []
        t0 = time.monotonic()
        for i, job in enumerate(jobs):
            results.append(job())
            if on_done is not None:
                on_done(i, results[-1])
            left = len(jobs) - len(results)
            if left and (time.monotonic() - t0) / len(results) * left > self.min_s:
                break
        if len(results) == len(jobs):
            self.how = (f"one network after another in this process (all {len(jobs)} in under "
                        f"{self.min_s:.0f} s: no Ray started)")
            return results
        first = len(results)
        shifted = None if on_done is None else (lambda i, r: on_done(first + i, r))
        rest = self._session(jobs[first:], shifted, None, cpus - 1,
                             f"a local Ray of {cpus - 1} CPUs and this process, started after {first} network(s) "
                             f"here said the other {len(jobs) - first} would take over {self.min_s:.0f} s", first)
        return results + rest

    def _session(self, jobs, on_done, address, num_cpus, where: str, before: int = 0) -> list:
        from .sweep import ray_session

        with ray_session(address, num_cpus):
            return self._ray(jobs, on_done, where, before)

    def _ray(self, jobs, on_done, where: str, before: int = 0) -> list:
        runner = RayRunner()
        out = runner(jobs, on_done)
        s = runner.stats
        self.how = (f"{where}: {s['remote']} network(s) as Ray tasks, {before + s['local'] + s['reclaimed']} here"
                    + (f" ({s['reclaimed']} of them reclaimed from tasks not done in time or failed)"
                       if s["reclaimed"] else ""))
        return out
