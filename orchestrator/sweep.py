"""A launch: Ray up, experts in the store, one Tune trial per point of the spec, MLflow runs.

``launch(spec, workspace)`` is what ``orchestrate launch`` calls; ``train_experts`` is what
``orchestrate experts`` calls. Both reuse stored experts.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import ray
from mlflow import MlflowClient
from ray import tune
from ray.tune import Callback
from ray.tune.trainable.function_trainable import wrap_function

from .experts import ExpertSet, ensure_experts, expert_key
from .artifacts import state_complete
from .malloc import worker_env
from .progress import Progress
from .resume import (SIDECAR, LaunchError, ResumeTrustError, _prepare, _start_parent, _tune_path, check_resume,  # noqa: F401
                     check_resume_trust, sweep_dir, with_checkpoint_repair)
from .schedulers import GroupedASHA, _scheduler, eval_metric, gpus_for, trial_resources, tune_value  # noqa: F401 (pickled sweeps)
from .summary import summarise_sweep
from . import locks, storage
from .spec import Spec
from .store import TrajectoryStore, atomic_write_bytes, git_commit, library_versions
from .tracking import COMMIT_TAG, RunLogger, Workspace, ensure_experiment
from .trial import TrialContext, run_trial, trial_name
from .warmstart import load_init_sets


@dataclass
class SweepResult:
    parent_run_id: str
    experiment_id: str
    experts: ExpertSet
    errors: list[str]
    interrupted: bool = False  # trials left unfinished (Ctrl-C or the time budget): the same spec resumes
    budget_reached: bool = False  # the spec's time_budget_s stopped this launch


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Join the cluster at ``address`` (``auto`` or HOST:PORT; inside a Ray job, ``RAY_ADDRESS``),
    or start a new local Ray with no dashboard, every port of it on 127.0.0.1 (see
    :func:`_loopback_only`; a cluster that is joined keeps its own settings). Without an address a
    stale ``ray start`` on this machine is never joined by accident (Ray's own default would). A Ray
    session that is already up (tests, notebooks) is used as it is."""
    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's legacy reporter honours verbose=0: our bars show progress
    address = address or os.environ.get("RAY_ADDRESS") or None
    restore = None if address else _loopback_only()
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            env = worker_env()  # a trial's thread allocates as a main thread does (orchestrator/malloc.py)
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     _node_ip_address=LOOPBACK, runtime_env={"env_vars": env} if env else None)
        try:
            yield
        finally:
            ray.shutdown()
    finally:
        if restore is not None:
            restore()


LOOPBACK = "127.0.0.1"
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's switch for a node that is never part of a cluster


def _loopback_only():
    """Make the local Ray that is about to start listen on 127.0.0.1 only, and return what undoes it.

    Ray's processes bind their gRPC servers (GCS, raylet's node and object managers, every worker,
    the dashboard and runtime-env agents, the metrics agent) to the node's IP address when it is
    the loopback address and to every interface otherwise, and ``ray.init`` turns a
    ``_node_ip_address`` of 127.0.0.1 into the machine's routable address, except when Ray clusters
    are off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, Ray's default on macOS and Windows, where it
    keeps a local Ray on loopback). So clusters are turned off for this process while the session
    lasts (Ray read the variable when it was imported: its constant is set too) and for the processes
    it starts (the variable, which they inherit)."""
    from ray._private import ray_constants

    saved_env, saved_const = os.environ.get(LOCAL_ONLY_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOCAL_ONLY_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False

    def restore():
        ray_constants.ENABLE_RAY_CLUSTER = saved_const
        if saved_env is None:
            os.environ.pop(LOCAL_ONLY_ENV, None)
        else:
            os.environ[LOCAL_ONLY_ENV] = saved_env

    return restore


def load_data(spec: Spec):
    """The spec's dataset, read by its task: images (``ImageData``) or event sequences
    (``RecData`` / ``LMData``)."""
    return spec.task.load(spec)


def check_budgets(spec: Spec, data) -> dict:
    """Refuse budgets that the data cannot fill (a SpecError naming the file and the key): the
    CLI calls it before Ray starts, :func:`launch` again for callers of the API. Returns the
    starts read from files (``init_from``, :func:`load_init_sets`), checked against the data."""
    spec.task.check_budgets(spec, data)
    return load_init_sets(spec, data)


def check_budgets_if_data_here(spec: Spec) -> bool:
    """:func:`check_budgets` where the data may not be on this machine (``orchestrate submit``:
    the job reads it on the cluster). Returns whether the check ran: data that is not here (or
    not readable here) is the cluster's business, where the launch checks it before Ray's work."""
    from .datasets import DatasetFormatError, DatasetNotFoundError

    try:
        data = load_data(spec)
    except (DatasetNotFoundError, DatasetFormatError, OSError):
        return False
    check_budgets(spec, data)
    return True


def train_experts(spec: Spec, ws: Workspace, progress: Progress | None = None, data=None) -> ExpertSet:
    """The spec's experts in the store (``data``: the spec's dataset, when the caller loaded it)."""
    data = load_data(spec) if data is None else data
    return _locked_experts(spec, data, ws, progress)


def _locked_experts(spec: Spec, data, ws: Workspace, progress: Progress | None) -> ExpertSet:
    """:func:`ensure_experts` under the lock of the expert set (one per store key, see
    :mod:`orchestrator.locks`): a launch that needs experts another process is training waits for
    them, then reuses them, rather than training them a second time."""
    store = TrajectoryStore(ws.trajectories)
    key = expert_key(spec, data)
    if not spec.needs_experts():  # DC, DSA, DM and the random subset read no trajectories
        return ExpertSet(key, spec.dataset["name"], "", {}, trained=0)
    say = progress.info if progress is not None else print
    with locks.hold(locks.experts_lock_path(ws.root, spec.dataset["name"], key),
                    f"the experts {store.dir(key, spec.dataset['name'])}", wait=True, on_wait=say):
        return ensure_experts(spec, data, store, progress)


class _TrialProgress(Callback):
    """Keeps a bar of finished trials and a line per running trial on the driver. Tune pickles
    its callbacks with the experiment; the display itself is looked up in ``_ACTIVE``, so a
    restored sweep shows its progress too."""

    def __init__(self):
        self.progress, self.done, self.bars = None, None, {}

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def setup(self, **info):
        self.progress = _ACTIVE.get("progress")
        if self.progress is not None:
            self.done = self.progress.task("trials", total=_ACTIVE.get("total", 0))

    def on_step_end(self, iteration, trials, **info):
        # Tune's first step generates the search space's variants (all of a grid's, minutes for a
        # huge one) before it reads its stop flag: Ctrl-C stops gracefully only after it
        _ACTIVE["tune_ready"] = True

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.progress is None:
            return
        point = trial.config["trial"]
        self.bars[trial.trial_id] = self.progress.task(f"  {_name(point)} {trial.trial_id[-5:]}",
                                                       total=max(1, point["iterations"]))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        bar = self.bars.get(trial.trial_id)
        if bar is not None and "iteration" in result:
            bar.update(completed=result["iteration"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.progress is None:
            return
        self.done.advance()
        bar = self.bars.get(trial.trial_id)
        if bar is not None:
            bar.update(completed=max(1, trial.config["trial"]["iterations"]))

    def on_trial_error(self, iteration, trials, trial, **info):
        if self.progress is None:
            return
        self.done.advance()
        self.progress.warn(f"trial {trial.trial_id} ({_name(trial.config['trial'])}) failed")


class _CloseStoppedRuns(Callback):
    """A trial that Tune stops from outside (an early-stopping scheduler, the sweep's time
    budget) ends without closing its MLflow run: the driver closes it as KILLED, with the reason."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str):
        self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id

    def on_trial_complete(self, iteration, trials, trial, **info):
        client = MlflowClient(self.tracking_uri)
        found = client.search_runs([self.experiment_id], filter_string=f"tags.`orchestrate.trial_id` = "
                                   f"'{trial.trial_id}' and tags.`mlflow.parentRunId` = '{self.parent_run_id}'")
        for run in found:
            if run.info.status == "RUNNING":
                it = (trial.last_result or {}).get("iteration")
                client.set_tag(run.info.run_id, "orchestrate.stopped_early",
                               f"stopped by the Tune scheduler or the sweep's time budget at iteration {it}")
                client.set_terminated(run.info.run_id, "KILLED")


_ACTIVE: dict[str, Any] = {}  # the driver's display, for callbacks that Tune unpickles on restore


def launch(spec: Spec, ws: Workspace, progress: Progress, callbacks: list[Callback] | None = None,
           fresh: bool = False, data=None) -> SweepResult:
    """Run the whole sweep of ``spec``; Ray must be initialised (see :func:`ray_session`).

    A sweep is identified by the spec's name: launching a spec whose sweep exists resumes it with
    ``Tuner.restore`` (finished trials are not rerun, unfinished ones continue from their last
    checkpoint, errored ones are retried from theirs, every trial keeps its MLflow child run);
    ``fresh`` starts over. ``callbacks`` are extra Tune callbacks (driver side). ``data``: the
    spec's dataset when the caller loaded it already (the CLI does, before Ray starts)."""
    data = load_data(spec) if data is None else data
    init_sets = check_budgets(spec, data)
    exp_dir, resume = _prepare(spec, ws, fresh, progress)
    experts = _locked_experts(spec, data, ws, progress)
    full = spec.task.full_data(spec, data, experts)

    client = MlflowClient(ws.tracking_uri)
    experiment_id = ensure_experiment(client, spec.name, ws.artifact_root)
    versions = library_versions() | {"ray": ray.__version__}
    lineage = {"orchestrate.spec_hash": spec.hash, "orchestrate.store_key": experts.key,
               "orchestrate.dataset_digest": data.digest(),
               COMMIT_TAG: git_commit() or "unknown",
               **{f"orchestrate.version.{k}": v for k, v in versions.items()}}
    if resume is not None:
        parent_id = resume["parent_run_id"]
        client.update_run(parent_id, status="RUNNING")
        progress.info(f"resuming sweep {spec.name!r} (MLflow run {parent_id}) from {exp_dir}")
    else:
        parent_id = _start_parent(spec, ws, client, experiment_id, experts, full, lineage, exp_dir)
    plog = RunLogger(ws.tracking_uri, parent_id)
    if getattr(data, "zca", None) is not None:
        _store_zca(data, ws, plog)

    ctx = TrialContext(data=data, spec=spec.to_dict(), spec_hash=spec.hash, expert_files=experts.files,
                       expert_sha256=[r.sha256 for recs in experts.forms.values() for r in recs], store_key=experts.key,
                       experts_acc=experts.accuracy, tracking_uri=ws.tracking_uri, experiment_id=experiment_id,
                       parent_run_id=parent_id, tags=lineage, full_data=full,
                       init_sets=init_sets)
    has_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    cpus, gpus = spec.resources["cpus_per_trial"], spec.resources["gpus_per_trial"]
    parallel = spec.evaluation.get("parallel", True)
    trainable = tune.with_resources(with_checkpoint_repair(wrap_function(tune.with_parameters(run_trial, ctx=ctx)),
                                                           state_complete),
                                    lambda config: trial_resources(cpus, gpus_for(gpus, config["trial"]["budget"],
                                                                                  has_gpu), parallel))
    points = [{**pt, "hp": {k: tune_value(v) for k, v in pt["hp"].items()}} for pt in spec.trial_points()]
    total = spec.num_samples if spec.search else len(points) * spec.num_samples
    _ACTIVE.update(progress=progress, total=total, prefix=spec.task.budget_prefix)
    if resume is not None and resume["tune_state"]:
        path, fs = _tune_path(exp_dir)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        metric, mode = eval_metric(spec, data)
        if spec.search:  # Optuna samples the one (algorithm, budget) point's distributions and lists
            from ray.tune.search.optuna import OptunaSearch

            (name, algo), = spec.algorithms.items()
            budget = algo["budgets"][0]
            hp = {**algo["hyperparameters"], **algo["per_budget"].get(budget, {})}
            space = {"trial": {"algorithm": name, "budget": budget, "iterations": algo["iterations"],
                               "hp": {k: tune_value(v, choice_lists=True) for k, v in hp.items()}}}
            search = OptunaSearch(metric=metric, mode=mode, seed=spec.search.get("seed", spec.seed))
        else:
            space, search = {"trial": tune.grid_search(points)}, None
        storage_path, storage_fs = _tune_path(ws.tune)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(num_samples=spec.num_samples, search_alg=search,
                                        max_concurrent_trials=spec.resources["max_concurrent_trials"],
                                        # time_budget_s is this launch's (_time_budget), not Tune's: Tune's
                                        # stopper ends the stopped trials as finished, and its pickle keeps
                                        # the spent budget, so a resumed sweep would stop at once
                                        scheduler=_scheduler(spec, data),
                                        reuse_actors=True,  # no worker start (imports: seconds) per trial
                                        trial_name_creator=_trial_label, trial_dirname_creator=_trial_label),
            run_config=tune.RunConfig(name=spec.name, storage_path=storage_path, storage_filesystem=storage_fs,
                                      verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                      callbacks=[_TrialProgress(), _CloseStoppedRuns(ws.tracking_uri, experiment_id,
                                                                                     parent_id),
                                                 *(callbacks or [])]),
        )
    try:
        with _ctrl_c_during_fit(), _time_budget(spec.time_budget_s, progress) as budget:
            results = tuner.fit()
    except KeyboardInterrupt:  # stopped at once (Tune's set-up, or a second Ctrl-C): the sweep is resumable
        with contextlib.suppress(Exception):  # no run left RUNNING (a resumed trial reopens its own)
            for c in client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                                        f"attributes.status = 'RUNNING'", max_results=50000):
                client.set_terminated(c.info.run_id, "KILLED")
            client.set_terminated(parent_id, "KILLED")
        raise
    finally:
        _ACTIVE.clear()
    errors = [f"{r.path}: {r.error}" for r in results if r.error is not None]
    # Interrupted (Ctrl-C, time budget): Tune counts the stopped trials as terminated, but their
    # MLflow runs are still open, and trials that never started have none.
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=50000)
    open_runs = [c.info.run_id for c in children if c.info.status == "RUNNING"]
    unfinished = len(open_runs) + max(0, total - len(children))
    plog.tags({"orchestrate.tune_experiment": results.experiment_path})
    with tempfile.TemporaryDirectory() as tmp:  # results.csv and the plot against budget, on the parent run
        try:
            summarise_sweep(ws.tracking_uri, parent_id, Path(tmp))
        except Exception as e:  # noqa: BLE001 - a summary problem must not lose the sweep's status
            progress.warn(f"could not write the sweep summary: {type(e).__name__}: {e}")
    if unfinished:  # resumable: the same spec continues it
        why = f"its time budget ({spec.time_budget_s:g} s, time_budget_s) ran out" if budget else "it was interrupted"
        progress.warn(f"sweep stopped with {unfinished} of {total} trials unfinished ({why}); "
                      f"launch the same spec again to resume it")
        for run_id in open_runs:
            client.set_terminated(run_id, "KILLED")  # reopened (RUNNING) when the trial resumes
        plog.finish("KILLED")
    else:
        plog.finish("FAILED" if errors else "FINISHED")
    return SweepResult(parent_id, experiment_id, experts, errors, interrupted=bool(unfinished),
                       budget_reached=bool(budget))


@contextmanager
def _time_budget(seconds: float | None, progress: Progress) -> Iterator[list[float]]:
    """The spec's ``time_budget_s`` for this launch's ``Tuner.fit()``: when it runs out, the trials
    are stopped as a first Ctrl-C stops them (Tune's stop request, the SIGUSR1 handler's: their
    state is saved and they stay unfinished), so the same command resumes the sweep with the budget
    anew. (Tune's own ``time_budget_s`` ends the stopped trials as finished, never resumed, and
    pickles the spent budget with the sweep.) Yields a list that holds the time it fired, if it did.
    Tune acts on the request once its loop has taken a step (see :func:`_ctrl_c_during_fit`): until
    then the watcher checks each second. Outside the main thread Tune takes no stop request, and
    the launch says so when the budget runs out."""
    fired: list[float] = []
    if not seconds:
        yield fired
        return
    done = threading.Event()
    main = threading.current_thread() is threading.main_thread()

    def watch() -> None:
        if done.wait(seconds):
            return
        while not done.is_set():
            stop = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
            # Tune installs its handlers from the main thread only: a handler found from another
            # launch's thread is not this Tune's
            if _ACTIVE.get("tune_ready") and not main:
                progress.warn(f"time budget of {seconds:g} s reached, but this launch runs outside the main "
                              "thread, where Tune takes no stop request: its trials run on")
                return
            if _ACTIVE.get("tune_ready") and callable(stop):
                fired.append(time.time())
                progress.warn(f"time budget of {seconds:g} s reached: stopping the trials (their state is saved)")
                # Tune's handler, run in the main thread as a signal's is: called from here, it sets
                # Tune's stop event, then fails (signal.signal outside the main thread) with a
                # traceback on the console
                signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
                return
            done.wait(1.0)

    thread = threading.Thread(target=watch, name="time-budget", daemon=True)
    thread.start()
    try:
        yield fired
    finally:
        done.set()
        thread.join(timeout=5)


@contextmanager
def _ctrl_c_during_fit() -> Iterator[None]:
    """Ctrl-C (SIGINT) during ``Tuner.fit()``, in every phase of it.

    Tune's own handler (``ray.tune.tune._setup_signal_catching``) only sets a flag that its trial
    loop reads between steps, then puts the previous handler back. Everything Tune does before
    its loop (building the controller, restoring the experiment state, generating the variants of
    the search space, which for a huge grid takes minutes) goes on regardless: the first Ctrl-C
    is swallowed there. And after a fit() that ends without a SIGINT its handler stays installed,
    so that a Ctrl-C later in the launch sets a flag nobody reads any more.

    Measured (Ray 2.60, a grid of 200,000 points): the first step of Tune's loop generates every
    variant of the grid (``variant_generator._grid_search_generator``) and a Ctrl-C 15 s in was
    still not acted on 5 minutes later.

    So Tune's SIGINT handler is turned off (``TUNE_DISABLE_SIGINT_HANDLER``; it keeps its SIGUSR1
    one, the same stop request) and ours decides: once Tune's loop has completed a step (trials
    may be running), the first Ctrl-C asks Tune to stop the trials gracefully (their state is
    saved, their MLflow runs are closed, the launch exits 130 with the resume hint); before that,
    or a second Ctrl-C, raises KeyboardInterrupt at once (the sweep stays resumable: Tune's state
    as last saved, or none and its trials start again under the same parent run). The previous
    handler and the variable are put back after fit(), whatever happens."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread: Tune's behaviour as it is
        return
    asked = []

    def on_sigint(sig, frame):
        stop = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
        if _ACTIVE.get("tune_ready") and not asked and callable(stop):
            asked.append(time.time())
            sys.stderr.write("\nCtrl-C: stopping the trials (their state is saved); Ctrl-C again stops at once\n")
            stop(sig, frame)
            return
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    usr1 = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
    env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if usr1 is not None:
            signal.signal(signal.SIGUSR1, usr1)
        if env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = env


def _name(point: dict) -> str:
    """The trial's name with the running sweep's budget prefix (ipc, or mu for sequences)."""
    return trial_name(point, _ACTIVE.get("prefix", "ipc"))


def _trial_label(t) -> str:
    return f"{_name(t.config['trial'])}_{t.trial_id}"



def _store_zca(data, ws: Workspace, plog: RunLogger) -> None:
    """The fitted ZCA transform beside the experts, under the whitened data's digest
    (``trajectories/zca-<digest>.safetensors``), and on the sweep's parent run: what whitened
    every image the sweep saw, with the digest it is known by."""
    from safetensors.torch import save as st_save

    blob = st_save({k: v.contiguous() for k, v in data.zca.state_dict().items()},
                   metadata={"dataset": data.info.name, "digest": data.digest(), "source": data.source or ""})
    name = f"zca-{data.digest()[:16]}.safetensors"
    if storage.is_remote(ws.trajectories):
        storage.atomic_write(storage.join(ws.trajectories, name), blob)
    else:
        Path(ws.trajectories).mkdir(parents=True, exist_ok=True)
        if not (Path(ws.trajectories) / name).exists():
            atomic_write_bytes(Path(ws.trajectories) / name, blob)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / name).write_bytes(blob)
        plog.artifact(Path(tmp) / name, "zca")
