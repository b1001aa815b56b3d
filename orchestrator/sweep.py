"""A launch: Ray up, experts in the store, one Tune trial per point of the spec, MLflow runs.

``launch(spec, workspace)`` is what ``orchestrate launch`` calls; ``train_experts`` is what
``orchestrate experts`` calls. Both reuse stored experts.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import ray
import yaml
from mlflow import MlflowClient
from ray import tune
from ray.tune import Callback

from .datasets import load_dataset
from .experts import ExpertSet, ensure_experts
from .progress import Bar, Progress
from .sequences import load_sequences, seq_task
from .spec import Spec
from .store import TrajectoryStore, library_versions
from .tracking import ROLE_TAG, RunLogger, Workspace, ensure_experiment
from .trial import TrialContext, run_trial, trial_name


@dataclass
class SweepResult:
    parent_run_id: str
    experiment_id: str
    experts: ExpertSet
    errors: list[str]


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Join the cluster at ``address`` (``auto`` or HOST:PORT), or start a local Ray with no
    dashboard. A Ray session that is already up (tests, notebooks) is used as it is."""
    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's legacy reporter honours verbose=0: our bars show progress
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return (out.stdout.strip() or None) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def load_data(spec: Spec):
    """The spec's dataset: images (``ImageData``) or event sequences (``RecData`` / ``LMData``)."""
    if spec.sequences:
        return load_sequences(spec.dataset["name"], spec.dataset["root"])
    return load_dataset(spec.dataset["name"], spec.dataset["root"])


def _check_budgets(spec: Spec, data) -> None:
    import torch

    from .spec import SpecError

    if spec.sequences:
        n = len(seq_task(data, spec.model["max_len"]).train)
        for name, algo in spec.algorithms.items():
            too_big = [b for b in algo["budgets"] if b > n]
            if too_big:
                raise SpecError([f"{spec.path}: algorithms.{name}.budgets: {too_big} sequences exceed the {n} "
                                 f"training sequences of {spec.dataset['name']}"])
        return
    counts = torch.bincount(data.y_train, minlength=data.info.num_classes)
    smallest = int(counts.min())
    for name, algo in spec.algorithms.items():
        too_big = [b for b in algo["budgets"] if b > smallest]
        if too_big:
            raise SpecError([f"{spec.path}: algorithms.{name}.budgets: {too_big} images per class exceed the "
                             f"{smallest} training images of the smallest class of {spec.dataset['name']}"])


def train_experts(spec: Spec, ws: Workspace, progress: Progress | None = None) -> ExpertSet:
    data = load_data(spec)
    return ensure_experts(spec, data, TrajectoryStore(ws.trajectories), progress)


def full_data_metrics(spec: Spec, data, experts: ExpertSet) -> dict[str, list[float]]:
    """Sequences: every metric of the task for the experts' final parameters (trained on all the
    real data): metric -> [mean, std] over the experts."""
    import statistics

    from algorithms.seqmodels import seeded_seq_model
    from algorithms.seqtrain import task_metrics

    from .store import open_trajectory

    task = seq_task(data, spec.model["max_len"])
    model = seeded_seq_model(spec.model, task.vocab_size, task.pad_id, 0)
    runs = [task_metrics(model, open_trajectory(r.path).params[-1].clone(), task) for r in experts.forms["full"]]
    return {k: [statistics.fmean(r[k] for r in runs), statistics.pstdev([r[k] for r in runs])] for k in runs[0]}


class _TrialProgress(Callback):
    """Keeps a bar of finished trials and a line per running trial on the driver."""

    def __init__(self, progress: Progress, total: int):
        self.progress = progress
        self.done = progress.task("trials", total=total)
        self.bars: dict[str, Bar] = {}

    def __getstate__(self):  # Tune saves its callbacks with the experiment; the display stays here
        return {}

    def __setstate__(self, state):
        self.progress, self.done, self.bars = None, None, {}

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


def launch(spec: Spec, ws: Workspace, progress: Progress, callbacks: list[Callback] | None = None) -> SweepResult:
    """Run the whole sweep of ``spec``; Ray must be initialised (see :func:`ray_session`).
    ``callbacks`` are extra Tune callbacks (driver side)."""
    data = load_data(spec)
    _check_budgets(spec, data)
    experts = ensure_experts(spec, data, TrajectoryStore(ws.trajectories), progress)
    full = full_data_metrics(spec, data, experts) if spec.sequences else {"acc": list(experts.accuracy)}

    client = MlflowClient(ws.tracking_uri)
    experiment_id = ensure_experiment(client, spec.name, ws.artifact_root)
    versions = library_versions() | {"ray": ray.__version__}
    lineage = {"orchestrate.spec_hash": spec.hash, "orchestrate.store_key": experts.key,
               "orchestrate.git_commit": _git_commit() or "unknown",
               **{f"orchestrate.version.{k}": v for k, v in versions.items()}}
    parent = client.create_run(experiment_id, run_name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                               tags={ROLE_TAG: "sweep", "dataset": spec.dataset["name"],
                                     "orchestrate.spec_path": spec.path, **lineage})
    parent_id = parent.info.run_id
    plog = RunLogger(ws.tracking_uri, parent_id)
    plog.metrics({**{f"full_data_{k}_{s}": v[i] for k, v in full.items() for i, s in enumerate(("mean", "std"))},
                  "experts_trained": experts.trained, "experts_count": len(experts.records)}, step=0)
    plog.params({"dataset": spec.dataset["name"], "experts.count": spec.experts["count"],
                 "experts.epochs": spec.experts["epochs"], "experts.dir": experts.directory})
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "spec.yaml"
        p.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
        plog.artifact(p)
        if Path(spec.path).exists():
            plog.artifact(spec.path, "source")

    ctx = TrialContext(data=data, spec=spec.to_dict(), spec_hash=spec.hash, expert_files=experts.files,
                       expert_sha256=[r.sha256 for recs in experts.forms.values() for r in recs], store_key=experts.key,
                       experts_acc=experts.accuracy, tracking_uri=ws.tracking_uri, experiment_id=experiment_id,
                       parent_run_id=parent_id, tags=lineage, full_data=full if spec.sequences else {})
    gpus = spec.resources["gpus_per_trial"]
    if gpus == "auto":
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx),
                                    {"cpu": spec.resources["cpus_per_trial"], "gpu": gpus})
    points = spec.trial_points()
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(points)},
        tune_config=tune.TuneConfig(num_samples=spec.num_samples,
                                    max_concurrent_trials=spec.resources["max_concurrent_trials"],
                                    trial_name_creator=lambda t: f"{trial_name(t.config['trial'])}_{t.trial_id}",
                                    trial_dirname_creator=lambda t: f"{trial_name(t.config['trial'])}_{t.trial_id}"),
        run_config=tune.RunConfig(name=f"{spec.name}-{parent_id[:8]}", storage_path=str(ws.tune), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=1),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  callbacks=[_TrialProgress(progress, len(points) * spec.num_samples),
                                             *(callbacks or [])]),
    )
    results = tuner.fit()
    errors = [f"{r.path}: {r.error}" for r in results if r.error is not None]
    plog.tags({"orchestrate.tune_experiment": results.experiment_path})
    plog.finish("FAILED" if errors else "FINISHED")
    return SweepResult(parent_id, experiment_id, experts, errors)
