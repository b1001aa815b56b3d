"""Resuming a sweep: where its Tune state lives, whether it may be restored (the sidecar that
names its MLflow parent run, the trust check of the pickled files), and trials that resume from
the checkpoint they really have on storage.

A trial's checkpoint on storage
-------------------------------

Tune keeps one checkpoint per trial (``CheckpointConfig(num_to_keep=1)``): when a trial reports
checkpoint k+1 the driver deletes checkpoint k at once, and the experiment snapshot that names
k+1 is written a moment later. A driver killed in between (SIGKILL, a lost head node) leaves a
snapshot naming a checkpoint that no longer exists, and ``Tuner.restore`` then fails the trial
with "Could not recover from checkpoint as it does not exist on storage anymore" (seen in CI).
The trial's newer checkpoint is complete on storage (a worker persists it before it reports it),
so the trial can continue from there: :func:`repair_missing_checkpoint` moves the newest complete
checkpoint of the trial folder to the path the snapshot names, so that both the restore and the
driver's later deletion of that path find it. Nothing is lost, and the steps between the two
checkpoints are not run twice.
"""
from __future__ import annotations

import functools
import grp
import json
import logging
import os
import posixpath
import pwd
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pyarrow.fs as pafs
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from ray import tune

from . import storage
from .experts import ExpertSet
from .progress import Progress
from .spec import Spec, SpecError
from .store import atomic_write_bytes
from .tracking import DIGEST_TAG, ROLE_TAG, RunLogger, Workspace, dataset_input, log_dataset

log = logging.getLogger(__name__)
_CHECKPOINT = re.compile(r"checkpoint_(\d+)")


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def repair_missing_checkpoint(fs: pafs.FileSystem, path: str, complete: Callable[[pafs.FileSystem, str], bool]) -> str | None:
    """If checkpoint folder ``path`` is missing, move the newest checkpoint of its trial folder
    that ``complete(fs, candidate)`` accepts onto ``path``. Returns the folder that was moved, or
    None (``path`` exists, or no complete checkpoint is left: Tune then reports its own error)."""
    if _exists(fs, path):
        return None
    trial_dir = posixpath.dirname(path.rstrip("/"))
    try:
        infos = fs.get_file_info(pafs.FileSelector(trial_dir))
    except FileNotFoundError:
        return None
    found = sorted(((int(m.group(1)), i.path) for i in infos
                    if i.type == pafs.FileType.Directory and (m := _CHECKPOINT.fullmatch(i.base_name))), reverse=True)
    for _, candidate in found:
        if complete(fs, candidate):
            fs.move(candidate, path)
            log.warning("checkpoint %s was deleted before the experiment state that names its successor was saved; "
                        "the trial continues from %s, moved to that name", path, candidate)
            return candidate
    return None


def with_checkpoint_repair(trainable_cls: type, complete: Callable[[pafs.FileSystem, str], bool]) -> type:
    """A subclass of the Tune trainable class ``trainable_cls`` whose ``restore`` first repairs a
    missing checkpoint (see :func:`repair_missing_checkpoint`). Its Tune name is unchanged, so
    sweeps started before keep resuming."""

    class Resumable(trainable_cls):  # type: ignore[misc, valid-type]
        def restore(self, checkpoint_path: Any):
            ckpt = getattr(checkpoint_path, "checkpoint", None)  # a _TrainingResult from the driver
            if ckpt is not None:
                repair_missing_checkpoint(ckpt.filesystem, ckpt.path, complete)
            return super().restore(checkpoint_path)

    Resumable.__name__ = Resumable.__qualname__ = trainable_cls.__name__
    return Resumable


class LaunchError(RuntimeError):
    """A state of the store that stops a launch before anything runs (the message names the file
    and what to do); ``orchestrate`` exits with code 2."""


# -- the sweep's folder, its sidecar and its MLflow parent run ---------------------------------------
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
    if state is None or state.get("spec_hash") not in spec.hashes or not state.get("parent_run_id"):
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



SIDECAR = "orchestrate.json"  # beside Tune's experiment state: which MLflow parent run the sweep logs to



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
    if state.get("spec_hash") not in spec.hashes:
        raise SpecError([f"{spec.path}: a sweep named {spec.name!r} already exists in {exp_dir} with another spec "
                         f"(hash {state.get('spec_hash')}, this one {spec.hash}); re-launch with --fresh to start "
                         f"over (the old sweep is kept aside), or give this spec another name"])
    if not tune.Tuner.can_restore(*_tune_path(exp_dir)):
        # the driver stopped before Tune saved any state: no trial ran, start the Tune part again
        return exp_dir, {**state, "tune_state": False}
    return exp_dir, {**state, "tune_state": True}



def _start_parent(spec: Spec, ws: Workspace, client: MlflowClient, experiment_id: str, experts: ExpertSet,
                  full: dict, lineage: dict, exp_dir: Path | str) -> str:
    """The sweep's parent run (spec as an artifact, full-data metrics, lineage), recorded in the
    sidecar file of the Tune experiment so that a re-launch continues the same run."""
    parent = client.create_run(experiment_id, run_name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                               tags={ROLE_TAG: "sweep", "dataset": spec.dataset["name"],
                                     "orchestrate.spec_path": spec.path, "orchestrate.sweep_dir": str(exp_dir),
                                     **lineage})
    parent_id = parent.info.run_id
    if lineage.get(DIGEST_TAG):  # the dataset as an MLflow input: the runs table's Dataset column
        log_dataset(client, parent_id, dataset_input(spec.dataset, lineage[DIGEST_TAG]))
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
