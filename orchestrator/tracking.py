"""MLflow tracking: where runs live, one parent run per launch, one child run per trial.

The local default is one folder (``./orchestrate-runs``) holding the SQLite database
(``mlflow.db``), the artifacts (``artifacts/``), Tune's results (``tune/``) and the trajectory
store (``trajectories/``). ``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` point at another
store (an ``http://`` server, say); the rest stays in the folder. ``--storage`` or
``ORCHESTRATE_STORAGE`` (a folder or a URI such as ``s3://bucket/runs``, see
:mod:`orchestrator.storage`) moves the trajectories, Tune's results and, with a local database,
the artifacts there; the database stays in the folder.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import DatasetInput, Metric, Param, RunTag
from mlflow.store.db.db_types import DATABASE_ENGINES  # postgresql, mysql, sqlite, mssql

from . import storage as _storage

ROOT_ENV = "ORCHESTRATE_ROOT"
DEFAULT_ROOT = "orchestrate-runs"
PARENT_TAG = "mlflow.parentRunId"
ROLE_TAG = "orchestrate.role"  # sweep | trial
DIGEST_TAG = "orchestrate.dataset_digest"  # SHA-256 of the sweep's data (the data object's digest())
COMMIT_TAG = "orchestrate.git_commit"  # the code of the launch that created the run ("+dirty": uncommitted changes)
# a trial's code history, JSON [[iteration, commit], ...]: which code ran it from which iteration on
# (a sweep resumed under later code continues its trials with it); [null, null] stands for resumes
# made before runs recorded it
COMMITS_TAG = "orchestrate.git_commits"
# [[iteration, true|false], ...]: from which iteration the steps ran through torch.compile
# (resources.compile, which a resumed sweep may switch: it is not part of the spec's hash)
COMPILE_TAG = "orchestrate.compiled"


@dataclass(frozen=True)
class Workspace:
    root: Path
    tracking_uri: str
    storage: Path | str | None = None  # shared storage: a folder (Path) or a remote URI (str); None: root

    @property
    def store_root(self) -> Path | str:
        return self.root if self.storage is None else self.storage

    @property
    def remote(self) -> bool:
        return _storage.is_remote(self.store_root)

    @property
    def trajectories(self) -> Path | str:
        return _storage.join(self.store_root, "trajectories")

    @property
    def tune(self) -> Path | str:
        return _storage.join(self.store_root, "tune")

    @property
    def artifact_root(self) -> str | None:
        """Where new experiments put artifacts: ``<root>/artifacts`` when this process opens the
        database itself (SQLite, or PostgreSQL/MySQL/MSSQL by URI); the server's own choice (its
        ``--artifacts-destination``, proxied) for a tracking server."""
        if self.is_local:
            artifacts = _storage.join(self.store_root, "artifacts")
            return artifacts if self.remote else artifacts.as_uri()
        return None

    @property
    def is_local(self) -> bool:
        """The store is a database (an SQLAlchemy URI) rather than a tracking server (http://...)."""
        return self.tracking_uri.split(":", 1)[0].split("+", 1)[0].lower() in DATABASE_ENGINES


def root_folder(root: str | os.PathLike | None = None) -> Path:
    """The store's folder: ``root``, else ``ORCHESTRATE_ROOT``, else ``./orchestrate-runs``."""
    return Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT).expanduser().resolve()


def tracking_uri_for(root: str | os.PathLike | None = None, tracking_uri: str | None = None) -> str:
    """The tracking URI a command with ``--root``/``--tracking-uri`` uses (``tracking_uri``, else
    ``MLFLOW_TRACKING_URI``, else the SQLite database in the root), without creating anything."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root_folder(root) / 'mlflow.db'}"


def workspace(root: str | os.PathLike | None = None, tracking_uri: str | None = None,
              storage: str | os.PathLike | None = None) -> Workspace:
    """``storage`` (else ``ORCHESTRATE_STORAGE``, else the root folder) holds the shared files;
    raises :class:`orchestrator.storage.StorageError` for a URI that cannot be used."""
    root_path = root_folder(root)
    uri = tracking_uri_for(root, tracking_uri)
    if uri.startswith("sqlite:"):
        make_private_dir(root_path)
    where = storage or os.environ.get(_storage.STORAGE_ENV) or None
    shared = _storage.normalise(where) if where else None
    return Workspace(root_path, uri, None if shared == root_path else shared)


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) with the new folder itself readable and writable by
    its owner only (0700): the store holds what Tune unpickles on resume. An existing folder keeps
    its mode (a user who wants a shared root creates it first, with the mode of their choice)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if not path.is_dir():
            raise


class TrackingStoreError(RuntimeError):
    """A tracking store that cannot be used (the message names the file)."""


def sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of an SQLite tracking URI (``sqlite:///abs/path``); None for other stores."""
    if not tracking_uri.lower().startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(tracking_uri).database
    return Path(database) if database and database != ":memory:" else None


MLFLOW_TABLES = ("experiments", "runs", "alembic_version")  # present in every MLflow schema version


def check_tracking_store(tracking_uri: str, write: bool = True) -> None:
    """Open a local SQLite tracking store read-only and check that it is MLflow's, before anything
    else is started: a corrupt file otherwise surfaces as an SQLAlchemy traceback naming no file,
    later. A missing or empty file is fine (MLflow creates the schema). Other stores (a server,
    PostgreSQL) are left to MLflow. ``write``: the file must be writable too. Raises
    :class:`TrackingStoreError` naming the file."""
    path = sqlite_file(tracking_uri)
    if path is None or not path.exists() or (path.is_file() and path.stat().st_size == 0):
        return
    advice = (f"move it aside (e.g. `mv {path} {path}.broken`) to start a new tracking store, or give another "
              f"--root or --tracking-uri")
    if not path.is_file():
        raise TrackingStoreError(f"{path}: the MLflow tracking database is not a file; {advice}")
    try:
        con = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.Error as e:
        raise TrackingStoreError(f"{path}: the MLflow tracking database cannot be read (sqlite: {e}); {advice}"
                                 ) from e
    missing = [t for t in MLFLOW_TABLES if t not in tables]
    if missing:
        raise TrackingStoreError(f"{path}: an SQLite file, but not an MLflow tracking database (no table "
                                 f"{', '.join(missing)}); {advice}")
    if write and not os.access(path, os.W_OK):
        raise TrackingStoreError(f"{path}: the MLflow tracking database is read-only for this user; make it "
                                 f"writable, or give another --root or --tracking-uri")


def open_tracking_store(ws: "Workspace") -> None:
    """Create (or upgrade) a local SQLite tracking database under a lock (``<root>/locks/``).

    MLflow creates its schema with Alembic migrations when a process first opens the database;
    two launches that do so at once in a new root race, and one dies with
    ``alembic.util.exc.CommandError: Online migration expected to match one row``. Opening it
    under a lock lets the second find the schema made. The file is checked
    (:func:`check_tracking_store`) under the same lock: a schema half made by another launch is not
    a corrupt database. Other stores are MLflow's business."""
    if sqlite_file(ws.tracking_uri) is None:
        check_tracking_store(ws.tracking_uri)
        return
    from .locks import hold

    with hold(ws.root / "locks" / "mlflow-db.lock", f"the tracking database {sqlite_file(ws.tracking_uri)}",
              wait=True):
        check_tracking_store(ws.tracking_uri)
        MlflowClient(ws.tracking_uri).search_experiments(max_results=1)


# The experiment kind MLflow 3 records for a classic training experiment (its UI's
# ``CUSTOM_MODEL_DEVELOPMENT``; an experiment without the tag may be taken for a GenAI one). MLflow
# 3.17's UI no longer reads it to pick its view: a global switch does (the sidebar's "Model
# training", kept in the browser, or ``?workflowType=machine_learning`` in the URL; see README,
# "Browsing results in MLflow's UI"). The tag still says what the experiment is, to MLflow
# versions and tools that read it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def ensure_experiment(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    """The id of experiment ``name``, created (or restored) if needed, with the experiment kind
    tag (:data:`EXPERIMENT_KIND`); an experiment of an older store gets the tag here, one whose
    kind someone set otherwise keeps it."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = f"{artifact_root}/{name}" if artifact_root else None
        try:
            return client.create_experiment(name, artifact_location=location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # created concurrently by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


DATASET_CONTEXT = "training"  # the input tag mlflow.data.context of a run's dataset


def dataset_input(dataset: dict[str, Any], digest: str) -> DatasetInput:
    """The spec's dataset (its ``dataset`` section) as an MLflow dataset input: its name, the
    first 16 hex digits of its data digest (``orchestrate.dataset_digest`` holds all 64; MLflow
    keeps at most 36) and its source, the data root it was read from (relative roots resolved in
    this process, as the loaders do) or, for ``digits``, sklearn's bundled copy. MLflow's UI shows
    it in the runs table's Dataset column and on the run page."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import get_registered_sources
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from .datasets import data_root

    name = str(dataset["name"])
    key = name.strip().lower()  # the loaders' key (orchestrator.datasets.data_root)
    if key == "digits":
        source = CodeDatasetSource({"mlflow.source.name": "sklearn digits (sklearn.datasets.load_digits)"})
    else:
        local = next(s for s in get_registered_sources() if s._get_source_type() == "local")
        source = local(str(data_root(key, dataset.get("root"))))
    entity = Dataset(**MetaDataset(source, name=name, digest=digest[:16]).to_dict())  # name, digest, source(_type)
    return DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, DATASET_CONTEXT)])


def log_dataset(client: MlflowClient, run_id: str, dataset: DatasetInput, attempts: int = 2) -> None:
    """Log ``dataset`` as an input of the run (a dataset already logged to the run is not logged
    twice). Another process may create the same dataset (name and digest) in the experiment at the
    same moment, and the database then refuses the second insert: the next attempt finds it."""
    for attempt in range(attempts):
        try:
            client.log_inputs(run_id, datasets=[dataset])
            return
        except Exception:  # noqa: BLE001 - the race above; the last attempt raises
            if attempt == attempts - 1:
                raise
            time.sleep(0.5)


def _param_value(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


class RunLogger:
    """Logs to one MLflow run through the client API (safe from any Ray worker). Metrics are
    buffered and sent in batches."""

    def __init__(self, tracking_uri: str, run_id: str, batch: int = 200):
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self._metrics: list[Metric] = []
        self._batch = batch

    def params(self, values: dict[str, Any]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, _param_value(v)) for k, v in values.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def tags(self, values: dict[str, Any]) -> None:
        tags = [RunTag(k, _param_value(v)) for k, v in values.items()]
        if tags:
            self.client.log_batch(self.run_id, tags=tags)

    def metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._metrics += [Metric(k, float(v), now, int(step)) for k, v in values.items()]
        if len(self._metrics) >= self._batch:
            self.flush()

    def flush(self) -> None:
        while self._metrics:
            chunk, self._metrics = self._metrics[:1000], self._metrics[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def artifact(self, path: str | Path, directory: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), directory)

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status)


def record_code(client: MlflowClient, run_id: str, commit: str, iteration: int) -> list:
    """Append ``[iteration, commit]`` to the run's :data:`COMMITS_TAG` when the code differs from
    the last entry, and return the history. A run resumed past iteration 0 without the tag (made by
    a version that did not record it) starts its history with its creating launch's commit and a
    ``[null, null]`` gap: the resumes in between are not known."""
    tags = client.get_run(run_id).data.tags
    start = [[0, tags[COMMIT_TAG]], [None, None]] if iteration > 0 and tags.get(COMMIT_TAG) else []
    return record_change(client, run_id, COMMITS_TAG, commit, iteration, tags, start)


def record_change(client: MlflowClient, run_id: str, tag: str, value: Any, iteration: int,
                  tags: dict[str, str] | None = None, start: list | None = None) -> list:
    """Append ``[iteration, value]`` to the JSON history in the run's tag ``tag`` when ``value``
    differs from the last entry, and return the history (``start`` when the tag is absent: [])."""
    tags = client.get_run(run_id).data.tags if tags is None else tags
    history = json.loads(tags[tag]) if tags.get(tag) else list(start or [])
    if not history or history[-1][1] != value:
        history.append([int(iteration), value])
        client.set_tag(run_id, tag, json.dumps(history))
    return history


def find_or_create_child(client: MlflowClient, experiment_id: str, parent_run_id: str, trial_id: str,
                         run_name: str, tags: dict[str, Any]) -> tuple[str, bool]:
    """The child run of ``parent_run_id`` for Tune trial ``trial_id``: an existing one is
    continued (a retried or restored trial keeps its run), otherwise one is created."""
    found = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and "
                                                             f"tags.`orchestrate.trial_id` = '{trial_id}'")
    if found:
        run_id = found[0].info.run_id
        if found[0].info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        return run_id, False
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={PARENT_TAG: parent_run_id, ROLE_TAG: "trial", "orchestrate.trial_id": trial_id,
                                  **{k: _param_value(v) for k, v in tags.items()}})
    return run.info.run_id, True
