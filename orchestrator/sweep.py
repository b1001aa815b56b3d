"""A launch: Ray up, experts in the store, one Tune trial per point of the spec, MLflow runs.

``launch(spec, workspace)`` is what ``orchestrate launch`` calls; ``train_experts`` is what
``orchestrate experts`` calls. Both reuse stored experts.
"""
from __future__ import annotations

import contextlib
import functools
import grp
import json
import os
import pwd
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import ray
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import FIFOScheduler
from ray.tune.trainable.function_trainable import wrap_function

from .experts import ExpertSet, ensure_experts, expert_key
from .artifacts import state_complete
from .progress import Progress
from .resume import with_checkpoint_repair
from .results import summarise_sweep
from . import locks, storage
from .spec import Spec, SpecError
from .store import TrajectoryStore, atomic_write_bytes, library_versions
from .tracking import ROLE_TAG, RunLogger, Workspace, ensure_experiment
from .trial import TrialContext, run_trial, trial_name


@dataclass
class SweepResult:
    parent_run_id: str
    experiment_id: str
    experts: ExpertSet
    errors: list[str]
    interrupted: bool = False


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
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     _node_ip_address=LOOPBACK)
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


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return (out.stdout.strip() or None) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def load_data(spec: Spec):
    """The spec's dataset, read by its task: images (``ImageData``) or event sequences
    (``RecData`` / ``LMData``)."""
    return spec.task.load(spec)


class LaunchError(RuntimeError):
    """A state of the store that stops a launch before anything runs (the message names the file
    and what to do); ``orchestrate`` exits with code 2."""


def check_budgets(spec: Spec, data) -> None:
    """Refuse budgets that the data cannot fill (a SpecError naming the file and the key): the
    CLI calls it before Ray starts, :func:`launch` again for callers of the API."""
    spec.task.check_budgets(spec, data)


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


def check_resume(spec: Spec, ws: Workspace, fresh: bool) -> None:
    """Before Ray starts: a sweep to resume must still have its MLflow parent run.

    The sidecar ``tune/<name>/orchestrate.json`` names the parent run. When the tracking store
    lost it (``mlflow.db`` deleted or replaced), the launch is refused with what happened and
    ``--fresh``. Recreating a parent run and resuming would not be sound: the child runs of the
    finished trials went with the database, and Tune, resuming, would not run those trials again,
    so the sweep would end "finished" with their results missing from MLflow and from its table.
    Starting over (``--fresh``: the old Tune folder is moved aside) is the honest way."""
    if fresh:
        return
    exp_dir = sweep_dir(spec, ws)
    state = _read_sidecar(exp_dir)
    if state is None or state.get("spec_hash") != spec.hash or not state.get("parent_run_id"):
        return  # nothing to resume, or another spec under this name: _prepare says so
    check_resume_trust(exp_dir)  # before anything reads Tune's pickles (and before Ray starts)
    run_id, sidecar = state["parent_run_id"], storage.join(exp_dir, SIDECAR)
    try:
        run = MlflowClient(ws.tracking_uri).get_run(run_id)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise LaunchError(
            f"{sidecar}: parent_run_id: the sweep {spec.name!r} logs to MLflow run {run_id}, which is not in "
            f"the tracking store {ws.tracking_uri} (was the database deleted or replaced?). Its trials' runs are "
            f"gone with it, so the sweep cannot be resumed: re-launch with --fresh to start it over (the old Tune "
            f"folder is moved aside), or point --tracking-uri/--root at the store that holds the run") from None
    if run.info.lifecycle_stage == "deleted":
        raise LaunchError(
            f"{sidecar}: parent_run_id: the sweep {spec.name!r} logs to MLflow run {run_id}, which was deleted in "
            f"{ws.tracking_uri}; restore it (`mlflow runs restore --run-id {run_id}`) to resume the sweep, or "
            f"re-launch with --fresh to start it over")


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
        self.bars[trial.trial_id] = self.progress.task(f"  {trial_name(point)} {trial.trial_id[-5:]}",
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
        self.progress.warn(f"trial {trial.trial_id} ({trial_name(trial.config['trial'])}) failed")


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


SIDECAR = "orchestrate.json"  # beside Tune's experiment state: which MLflow parent run the sweep logs to
_ACTIVE: dict[str, Any] = {}  # the driver's display, for callbacks that Tune unpickles on restore


def sweep_dir(spec: Spec, ws: Workspace) -> Path | str:
    """Tune's experiment folder of a sweep: one per spec name, so that a re-launch finds it
    (a URI string when the workspace's storage is remote). A name that would put it anywhere but
    directly inside ``ws.tune`` raises :class:`SpecError` (validation refuses such names; this
    guards specs built in code)."""
    return _inside_tune(spec, ws, storage.join(ws.tune, spec.name))


def _inside_tune(spec: Spec, ws: Workspace, loc: Path | str) -> Path | str:
    """``loc`` when it resolves to a folder directly inside ``ws.tune`` (symbolic links and
    ``..`` followed), else :class:`SpecError` naming the spec's ``name``."""
    if storage.is_remote(loc):
        inside = storage.parent(loc) == str(ws.tune).rstrip("/") and storage.name(loc) not in ("", ".", "..")
    else:
        inside = Path(loc).resolve().parent == Path(ws.tune).resolve()
    if not inside:
        raise SpecError([f"{spec.path}: name: {spec.name!r} puts the sweep folder at {loc}, outside {ws.tune}; "
                         "a name is one folder name (letters, digits, '-', '_', '.')"])
    return loc


def _tune_path(loc: Path | str) -> tuple[str, Any]:
    """(path, filesystem) as Tune takes them: a local path and None (Tune's own), or the path
    inside the resolved remote filesystem and that filesystem (so that the endpoint and region
    resolved here are the ones Tune and its trial workers use)."""
    if not storage.is_remote(loc):
        return str(loc), None
    fs, path = storage.resolve(loc)
    return path, fs


def _read_sidecar(exp_dir: Path | str) -> dict | None:
    try:
        if storage.is_remote(exp_dir):
            return json.loads(storage.read_bytes(storage.join(exp_dir, SIDECAR)))
        return json.loads((exp_dir / SIDECAR).read_text())
    except (OSError, ValueError):
        return None


class ResumeTrustError(SpecError):
    """Tune's saved state of a sweep could have been written by someone else (exit code 2)."""

    def __init__(self, message: str):
        self.problems = [message]
        ValueError.__init__(self, message)


@functools.lru_cache(maxsize=None)
def _private_group(gid: int, uid: int) -> bool:
    """Group ``gid`` has one member, user ``uid`` (a user private group, as with umask 002): its
    write permission lets nobody else write. The rule of Debian's OpenSSH for group-writable keys."""
    try:
        group, owner = grp.getgrgid(gid), pwd.getpwuid(uid)
    except KeyError:
        return False
    primary = [p.pw_uid for p in pwd.getpwall() if p.pw_gid == gid]
    if any(u != uid for u in primary) or group.gr_mem not in ([], [owner.pw_name]):
        return False
    return bool(primary or group.gr_mem)


def _name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _trust_problem(st: os.stat_result, me: int) -> str | None:
    """Why a file or folder with status ``st`` could have been written by a user other than ``me``."""
    if st.st_uid not in (me, 0):
        return f"owned by {_name(st.st_uid)}"
    if st.st_mode & stat.S_IWOTH:
        return f"writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    if st.st_mode & stat.S_IWGRP and not _private_group(st.st_gid, st.st_uid):
        try:
            group = grp.getgrgid(st.st_gid).gr_name
        except KeyError:
            group = str(st.st_gid)
        return f"writable by group {group} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def check_resume_trust(exp_dir: Path | str) -> None:
    """Refuse to resume a sweep whose Tune folder someone else could have written.

    ``Tuner.restore`` unpickles ``tuner.pkl`` and more (the trials in ``experiment_state-*.json``
    carry cloudpickled fields; searcher and callback states are pickles): whoever can write them
    runs code as the user who resumes. So, as ssh does with its keys, the Tune folder, its parent
    and everything in it must be owned by this user (or root) and writable by nobody else (a group
    whose only member is the owner is fine). Raises :class:`ResumeTrustError`. Remote storage
    (s3://, gs://) cannot be checked here: its access control is the bucket's."""
    if storage.is_remote(exp_dir):
        return
    exp_dir, me = Path(exp_dir), os.geteuid()
    problems = []

    def check(path: Path, follow: bool) -> None:
        try:
            st = path.stat() if follow else path.lstat()
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):  # the link's own owner, then what it points to
            if st.st_uid not in (me, 0):
                problems.append(f"{path}: a symbolic link owned by {_name(st.st_uid)}")
            return check(path, True)
        why = _trust_problem(st, me)
        if why:
            problems.append(f"{path}: {why}")

    check(exp_dir.parent, True)
    check(exp_dir, True)
    for folder, dirs, files in os.walk(exp_dir):
        for name in dirs + files:
            check(Path(folder, name), False)
    if problems:
        shown = "\n  ".join(problems[:5]) + (f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ResumeTrustError(
            f"refusing to resume the sweep in {exp_dir}: Ray Tune restores it by unpickling its files (tuner.pkl, "
            f"experiment_state-*.json, ...), which runs any code written into them, so they must be writable by "
            f"you alone (as ssh requires of its keys), and these are not:\n  {shown}\n"
            f"If you trust their contents, make them yours and remove the write permission of group and others "
            f"(chown -R {_name(me).split(' ')[0]} {exp_dir}; chmod -R go-w {exp_dir}; chmod go-w {exp_dir.parent}); otherwise "
            f"launch with --fresh, which moves the folder aside without reading it.")


def _prepare(spec: Spec, ws: Workspace, fresh: bool, progress: Progress) -> tuple[Path | str, dict | None]:
    """Decide between resuming and starting: returns the experiment folder and the state of the
    sweep to resume (None: start a new one). ``fresh`` moves an existing sweep aside (nothing is
    deleted: its folder is renamed and its MLflow runs stay)."""
    exp_dir = sweep_dir(spec, ws)
    remote = storage.is_remote(exp_dir)
    if fresh and (storage.exists(exp_dir) if remote else exp_dir.exists()):
        aside = _inside_tune(spec, ws, storage.join(storage.parent(exp_dir),
                                                    f"{spec.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"))
        if remote:  # object stores have no folder rename: every object is moved (server-side copies)
            storage.move(exp_dir, aside)
        else:
            os.replace(exp_dir, aside)
        progress.info(f"--fresh: the previous sweep {spec.name!r} was moved to {aside}")
    state = _read_sidecar(exp_dir)
    if state is None:
        return exp_dir, None
    check_resume_trust(exp_dir)
    if state.get("spec_hash") != spec.hash:
        raise SpecError([f"{spec.path}: a sweep named {spec.name!r} already exists in {exp_dir} with another spec "
                         f"(hash {state.get('spec_hash')}, this one {spec.hash}); re-launch with --fresh to start "
                         f"over (the old sweep is kept aside), or give this spec another name"])
    if not tune.Tuner.can_restore(*_tune_path(exp_dir)):
        # the driver stopped before Tune saved any state: no trial ran, start the Tune part again
        return exp_dir, {**state, "tune_state": False}
    return exp_dir, {**state, "tune_state": True}


def launch(spec: Spec, ws: Workspace, progress: Progress, callbacks: list[Callback] | None = None,
           fresh: bool = False, data=None) -> SweepResult:
    """Run the whole sweep of ``spec``; Ray must be initialised (see :func:`ray_session`).

    A sweep is identified by the spec's name: launching a spec whose sweep exists resumes it with
    ``Tuner.restore`` (finished trials are not rerun, unfinished ones continue from their last
    checkpoint, errored ones are retried from theirs, every trial keeps its MLflow child run);
    ``fresh`` starts over. ``callbacks`` are extra Tune callbacks (driver side). ``data``: the
    spec's dataset when the caller loaded it already (the CLI does, before Ray starts)."""
    data = load_data(spec) if data is None else data
    check_budgets(spec, data)
    exp_dir, resume = _prepare(spec, ws, fresh, progress)
    experts = _locked_experts(spec, data, ws, progress)
    full = spec.task.full_data(spec, data, experts)

    client = MlflowClient(ws.tracking_uri)
    experiment_id = ensure_experiment(client, spec.name, ws.artifact_root)
    versions = library_versions() | {"ray": ray.__version__}
    lineage = {"orchestrate.spec_hash": spec.hash, "orchestrate.store_key": experts.key,
               "orchestrate.dataset_digest": data.digest(),
               "orchestrate.git_commit": _git_commit() or "unknown",
               **{f"orchestrate.version.{k}": v for k, v in versions.items()}}
    if resume is not None:
        parent_id = resume["parent_run_id"]
        client.update_run(parent_id, status="RUNNING")
        progress.info(f"resuming sweep {spec.name!r} (MLflow run {parent_id}) from {exp_dir}")
    else:
        parent_id = _start_parent(spec, ws, client, experiment_id, experts, full, lineage, exp_dir)
    plog = RunLogger(ws.tracking_uri, parent_id)

    ctx = TrialContext(data=data, spec=spec.to_dict(), spec_hash=spec.hash, expert_files=experts.files,
                       expert_sha256=[r.sha256 for recs in experts.forms.values() for r in recs], store_key=experts.key,
                       experts_acc=experts.accuracy, tracking_uri=ws.tracking_uri, experiment_id=experiment_id,
                       parent_run_id=parent_id, tags=lineage, full_data=full)
    has_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    cpus, gpus = spec.resources["cpus_per_trial"], spec.resources["gpus_per_trial"]
    trainable = tune.with_resources(with_checkpoint_repair(wrap_function(tune.with_parameters(run_trial, ctx=ctx)),
                                                           state_complete),
                                    lambda config: {"cpu": cpus, "gpu": gpus_for(gpus, config["trial"]["budget"],
                                                                                  has_gpu)})
    points = [{**pt, "hp": {k: tune_value(v) for k, v in pt["hp"].items()}} for pt in spec.trial_points()]
    total = spec.num_samples if spec.search else len(points) * spec.num_samples
    _ACTIVE.update(progress=progress, total=total)
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
                                        scheduler=_scheduler(spec, data), time_budget_s=spec.time_budget_s,
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
        with _ctrl_c_during_fit():
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
        progress.warn(f"sweep stopped with {unfinished} of {total} trials unfinished; "
                      f"launch the same spec again to resume it")
        for run_id in open_runs:
            client.set_terminated(run_id, "KILLED")  # reopened (RUNNING) when the trial resumes
        plog.finish("KILLED")
    else:
        plog.finish("FAILED" if errors else "FINISHED")
    return SweepResult(parent_id, experiment_id, experts, errors, interrupted=bool(unfinished))


def tune_value(v, choice_lists: bool = False):
    """A spec's hyperparameter value for Tune: ``{loguniform: [a, b]}``, ``uniform``, ``randint``
    and ``choice`` become Tune distributions (sampled per trial, ``num_samples`` times); with
    ``choice_lists`` (Optuna) a list is a choice too, otherwise lists were expanded into a grid."""
    if isinstance(v, dict) and len(v) == 1:
        (kind, args), = v.items()
        if kind == "choice":
            return tune.choice([tune_value(a) for a in args])
        if kind in ("uniform", "loguniform", "randint"):
            return getattr(tune, kind)(*args)
    if choice_lists and isinstance(v, list):
        return tune.choice(v)
    return v


def gpus_for(gpus, budget: int, has_gpu: bool) -> float:
    """GPUs of one trial: ``auto`` (one when the cluster has GPUs, else none), a number (0.5 packs
    two trials per GPU), or a mapping budget -> number read as steps (a budget gets the value of
    the largest key not above it; budgets below every key get the smallest key's)."""
    if gpus == "auto":
        return 1.0 if has_gpu else 0.0
    if isinstance(gpus, dict):
        keys = sorted(int(k) for k in gpus)
        below = [k for k in keys if k <= budget]
        return float(gpus[below[-1] if below else keys[0]])
    return float(gpus)


def eval_metric(spec: Spec, data) -> tuple[str, str]:
    """The periodic evaluation's headline, as every trial result carries it, and its direction."""
    metric, higher = spec.task.headline(data)
    return f"eval_{metric}_mean", ("max" if higher else "min")


class GroupedASHA(FIFOScheduler):
    """ASHA early stopping within each (algorithm, budget) group.

    A sweep over budgets must not stop an IPC 1 trial because IPC 50 trials score higher, nor
    an MCT trial because of MTT's: each group gets its own ``ASHAScheduler`` (Tune's, unchanged)
    and this class only routes each trial to the one of its group. Trials run in submission
    order (FIFO), as with a single ASHA."""

    def __init__(self, **asha: Any):
        super().__init__()
        self._asha, self._groups, self._of = asha, {}, {}

    @property
    def metric(self):
        return self._asha["metric"]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return metric in (None, self._asha["metric"]) and mode in (None, self._asha["mode"])

    def group(self, trial) -> tuple[str, int]:
        point = trial.config["trial"]
        return point["algorithm"], point["budget"]

    def on_trial_add(self, tune_controller, trial):
        from ray.tune.schedulers import ASHAScheduler

        key = self.group(trial)
        if key not in self._groups:
            self._groups[key] = ASHAScheduler(**self._asha)
        self._of[trial.trial_id] = self._groups[key]
        self._groups[key].on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        asha = self._of.get(trial.trial_id)
        return asha.on_trial_result(tune_controller, trial, result) if asha else self.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result):
        asha = self._of.pop(trial.trial_id, None)
        if asha is not None:
            asha.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        asha = self._of.pop(trial.trial_id, None)
        if asha is not None:
            asha.on_trial_remove(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial):
        self.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "ASHA per (algorithm, budget): " + "; ".join(
            f"{a} {b}: stopped {s._num_stopped}" for (a, b), s in sorted(self._groups.items()))


def _scheduler(spec: Spec, data):
    """ASHA on the evaluation metric (the last evaluation, reported with every result), with
    distillation iterations as the time axis, within each (algorithm, budget) group; baselines
    report once and are never stopped."""
    if not spec.scheduler:
        return None
    metric, mode = eval_metric(spec, data)
    sc = spec.scheduler
    max_t = sc.get("max_t") or max(a["iterations"] for a in spec.algorithms.values())
    # stop_last_trials=False: a trial that reaches max_t ends by itself, after its final evaluation
    return GroupedASHA(time_attr="iteration", metric=metric, mode=mode, max_t=max_t, stop_last_trials=False,
                       grace_period=sc.get("grace_period", max(1, spec.evaluation["interval"])),
                       reduction_factor=sc.get("reduction_factor", 3))


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


def _trial_label(t) -> str:
    return f"{trial_name(t.config['trial'])}_{t.trial_id}"


def _start_parent(spec: Spec, ws: Workspace, client: MlflowClient, experiment_id: str, experts: ExpertSet,
                  full: dict, lineage: dict, exp_dir: Path | str) -> str:
    """The sweep's parent run (spec as an artifact, full-data metrics, lineage), recorded in the
    sidecar file of the Tune experiment so that a re-launch continues the same run."""
    parent = client.create_run(experiment_id, run_name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                               tags={ROLE_TAG: "sweep", "dataset": spec.dataset["name"],
                                     "orchestrate.spec_path": spec.path, "orchestrate.sweep_dir": str(exp_dir),
                                     **lineage})
    parent_id = parent.info.run_id
    plog = RunLogger(ws.tracking_uri, parent_id)
    plog.metrics({**{f"full_data_{k}_{s}": v[i] for k, v in full.items() for i, s in enumerate(("mean", "std"))},
                  "experts_trained": experts.trained, "experts_count": len(experts.records)}, step=0)
    plog.params({"dataset": spec.dataset["name"], "experts.count": spec.experts["count"],
                 "experts.epochs": spec.experts["epochs"], "experts.dir": experts.directory or "none (no method of the spec reads experts)"})
    plog.flush()
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "spec.yaml"
        p.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
        plog.artifact(p)
        if Path(spec.path).exists():
            plog.artifact(spec.path, "source")
    sidecar = json.dumps({"parent_run_id": parent_id, "experiment_id": experiment_id, "spec_hash": spec.hash,
                          "spec_path": spec.path}).encode()
    if storage.is_remote(exp_dir):
        storage.atomic_write(storage.join(exp_dir, SIDECAR), sidecar)
    else:
        exp_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(exp_dir / SIDECAR, sidecar)
    return parent_id
