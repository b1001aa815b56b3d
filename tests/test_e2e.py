"""End to end: a tiny spec through `orchestrate launch`, with Ray, Tune, the Arrow store and
MLflow for real (2 CPUs, digits, seconds of work per trial)."""
import json
import os
import signal

import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient
from ray.tune import Callback

from algorithms.base import native_bf16
from orchestrator.artifacts import read_synthetic
from orchestrator.cli import main
from orchestrator.datasets import dataset_info
from orchestrator.progress import Progress
from orchestrator.spec import validate
from orchestrator.sweep import launch
from orchestrator.trial import LATEST_ARTIFACT, SYNTHETIC_ARTIFACT
from orchestrator.tracking import workspace

from .conftest import TINY

pytestmark = pytest.mark.slow  # every test launches a sweep on Ray


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, ray_cluster):
    d = tmp_path_factory.mktemp("e2e")
    spec = d / "tiny.yaml"
    spec.write_text(yaml.safe_dump(TINY))
    root = d / "runs"
    first = CliRunner().invoke(main, ["launch", str(spec), "--root", str(root)], catch_exceptions=False)
    return spec, root, first


def runs_of(root, role):
    client = MlflowClient(workspace(root).tracking_uri)
    exp = client.get_experiment_by_name("tiny")
    return client, client.search_runs([exp.experiment_id], filter_string=f"tags.`orchestrate.role` = '{role}'")


def test_launch_logs_one_parent_and_one_child_per_trial(tiny, tmp_path):
    spec, root, first = tiny
    assert first.exit_code == 0, first.output
    assert "orchestrate ui" in first.output and "mlflow.db" in first.output
    client, parents = runs_of(root, "sweep")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.metrics["full_data_acc_mean"] > 0.5
    assert "spec.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    _, children = runs_of(root, "trial")
    assert sorted(c.data.tags["algorithm"] for c in children) == ["mtt", "random"]
    for c in children:
        assert c.info.status == "FINISHED"
        assert c.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert c.data.tags["orchestrate.store_key"] == parent.data.tags["orchestrate.store_key"]
        assert c.data.tags["orchestrate.spec_hash"] == parent.data.tags["orchestrate.spec_hash"]
        # the code that ran the trial, from iteration 0: the launch's commit
        assert json.loads(c.data.tags["orchestrate.git_commits"]) == [[0, parent.data.tags["orchestrate.git_commit"]]]
        assert 0 < c.data.metrics["acc_mean"] <= 1 and "acc_std" in c.data.metrics
        files = [a.path for a in client.list_artifacts(c.info.run_id, "synthetic")]
        assert files == ["synthetic/cases.safetensors", "synthetic/synthetic.safetensors",
                         "synthetic/synthetic_grid.png"]
        # artifacts live beside the database, not in the working directory
        assert c.info.artifact_uri.startswith((root / "artifacts").resolve().as_uri())
    mtt = next(c for c in children if c.data.tags["algorithm"] == "mtt")
    loss = client.get_metric_history(mtt.info.run_id, "loss")
    assert sorted(m.step for m in loss) == [1, 2, 3, 4, 5, 6]
    evals = client.get_metric_history(mtt.info.run_id, "eval/acc_mean")
    assert sorted(m.step for m in evals) == [0, 3, 6]
    # each set carries its own evaluation; the latest periodic one (3) stays logged beside the final (6)
    stds = {m.step: m.value for m in client.get_metric_history(mtt.info.run_id, "eval/acc_std")}
    for artifact, step in ((SYNTHETIC_ARTIFACT, 6), (LATEST_ARTIFACT, 3)):
        _, meta = read_synthetic(client.download_artifacts(mtt.info.run_id, artifact, str(tmp_path)))
        assert json.loads(meta["iteration"]) == step
        mean = next(m.value for m in evals if m.step == step)
        assert json.loads(meta["evaluation"])["acc"] == pytest.approx([mean, stds[step]], abs=1e-9)
    assert "acc_best_over_evals_mean" in mtt.data.metrics and "final_syn_lr" in mtt.data.metrics
    # the real start (pix_init real) and the baseline name the same training images: a paired comparison
    starts = [json.loads(open(client.download_artifacts(c.info.run_id, "start.json", str(tmp_path / c.info.run_id))).read())
              for c in children]
    assert starts[0] == starts[1] and starts[0]["init"] == "real" and len(set(starts[0]["train_images"])) == 10
    _, meta = read_synthetic(client.download_artifacts(mtt.info.run_id, SYNTHETIC_ARTIFACT, str(tmp_path / "s")))
    assert json.loads(meta["start"]) == starts[0]


def test_results_and_export(tiny, tmp_path):
    spec, root, _ = tiny
    out = CliRunner().invoke(main, ["results", "--root", str(root), "--format", "json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert len(rows) == 2
    for field in ("run_id", "algorithm", "dataset", "budget", "acc_mean", "acc_std"):
        assert all(field in r for r in rows)
    mtt = next(r for r in rows if r["algorithm"] == "mtt")
    assert mtt["random_acc_mean"] is not None and mtt["full_data_acc_mean"] is not None
    csv_out = CliRunner().invoke(main, ["results", "--root", str(root), "--format", "csv"]).output
    assert csv_out.splitlines()[0].startswith("run_id,sweep,algorithm,dataset,budget,status,acc_mean,acc_std")
    assert len(csv_out.splitlines()) == 3
    table = CliRunner().invoke(main, ["results", "--root", str(root)]).output
    assert mtt["run_id"] in table

    info = dataset_info("digits")
    for r in rows:
        f = tmp_path / f"{r['algorithm']}.safetensors"
        res = CliRunner().invoke(main, ["export", r["run_id"], "-o", str(f), "--root", str(root)])
        assert res.exit_code == 0, res.output
        tensors, meta = read_synthetic(f)
        assert tensors["images"].shape == (10, 1, 8, 8) and tensors["images"].dtype == torch.float32
        assert tensors["labels"].tolist() == list(range(10)) and tensors["lr"].shape == ()
        assert meta["dataset"] == "digits" and meta["algorithm"] == r["algorithm"]
        mean, std = json.loads(meta["mean"]), json.loads(meta["std"])
        assert mean == list(info.mean) and std == list(info.std)
        if r["algorithm"] == "random":  # real images map back to pixel intensities in [0, 1]
            pixels = tensors["images"] * std[0] + mean[0]
            assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    bad = CliRunner().invoke(main, ["export", "0" * 32, "-o", str(tmp_path / "x.safetensors"), "--root", str(root)])
    assert bad.exit_code != 0


def test_bench_direct_reproduces_the_sweep_without_ray_or_mlflow(tiny, tmp_path):
    """bench/direct.py runs the spec's trials with the sweep's own components in one process: the same
    experts (checksums), and the same evaluations at the same iterations as the sweep's trials."""
    import sys

    from .conftest import REPO

    spec, root, _ = tiny
    sys.path.insert(0, str(REPO / "bench"))
    import direct

    out = tmp_path / "direct"
    assert direct.main([str(spec), "--out", str(out), "--threads", "1", "--device", "cpu"]) == 0
    client, children = runs_of(root, "trial")
    for c in children:
        name = f"{c.data.tags['algorithm']}-ipc1"
        curve = json.loads((out / name / "curve.json").read_text())
        logged = {m.step: m.value for m in client.get_metric_history(c.info.run_id, "eval/acc_mean")}
        ours = {e["iteration"]: e["acc"][0] for e in curve["evals"]}
        assert ours == pytest.approx(logged, abs=1e-9), name
        assert curve["iterations_done"] == curve["iterations_planned"] == (6 if name.startswith("mtt") else 0)
        assert (curve["git_commit"] or "unknown") == c.data.tags["orchestrate.git_commit"]  # the same checkout
        assert (curve["spec"], curve["set"], curve["spec_hash"]) == (str(spec), [], c.data.tags["orchestrate.spec_hash"])
        for metric, values in curve["steps"].items():  # each step's metrics, as the trial logged them
            if metric != "expert":
                logged_steps = [m.value for m in sorted(client.get_metric_history(c.info.run_id, metric),
                                                        key=lambda m: m.step)]
                assert values == pytest.approx(logged_steps, rel=1e-6), (name, metric)
        assert (set(curve["steps"]) >= {"loss", "syn_lr", "start_epoch"} and len(curve["steps"]["loss"]) == 6
                if name.startswith("mtt") else curve["steps"] == {})
        _, meta = read_synthetic(out / name / "synthetic.safetensors")
        assert json.loads(meta["evaluation"])["acc"][0] == pytest.approx(logged[max(logged)], abs=1e-9)
        assert set(json.loads(meta["evaluation"])) == {"acc"}  # metric -> [mean, std], as a trial writes it
        trial_start = client.download_artifacts(c.info.run_id, "start.json", str(tmp_path / c.info.run_id))
        assert json.loads(meta["start"]) == json.loads(open(trial_start).read())  # the same start, named alike
    # and fidelity.py reads the folder as it reads the sweep: the final set, its recipe checked, the random baseline
    import fidelity

    [row] = fidelity.direct_rows([out])
    mtt = next(c for c in children if c.data.tags["algorithm"] == "mtt")
    rand = next(c for c in children if c.data.tags["algorithm"] == "random")
    m = row["metrics"]["acc"]
    assert (row["status"], row["set"], row["spec_hash"]) == ("FINISHED", [], mtt.data.tags["orchestrate.spec_hash"])
    assert m["final_mean"] == pytest.approx(mtt.data.metrics["acc_mean"], abs=1e-9)
    assert m["random_mean"] == pytest.approx(rand.data.metrics["acc_mean"], abs=1e-9)
    from orchestrator.store import open_trajectory

    def params(folder):  # expert file -> the checksum of its parameters per epoch
        return {p.name: open_trajectory(p).meta["params_sha256"] for p in folder.rglob("expert_*.arrow")}

    assert params(root / "trajectories") and params(out / "trajectories") == params(root / "trajectories")


def test_second_launch_reuses_the_experts(tiny, tmp_path):
    # its own root: the launches below add runs that the tests of the shared sweep must not see
    spec, root = tiny[0], tmp_path / "runs"
    first = CliRunner().invoke(main, ["launch", str(spec), "--root", str(root)], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    files = sorted((root / "trajectories").glob("*/expert_*.arrow"))
    assert len(files) == 2
    before = {f: (f.stat().st_mtime_ns, f.stat().st_ino) for f in files}
    second = CliRunner().invoke(main, ["launch", str(spec), "--root", str(root)], catch_exceptions=False)
    assert second.exit_code == 0, second.output
    assert "(0 trained, 2 reused)" in second.output
    assert {f: (f.stat().st_mtime_ns, f.stat().st_ino) for f in files} == before
    # the same spec resumes its (finished) sweep: same parent run, no trial runs again
    client, parents = runs_of(root, "sweep")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    _, children = runs_of(root, "trial")
    assert len(children) == 2
    assert all(len(client.get_metric_history(c.info.run_id, "acc_mean")) == 1 for c in children)
    # --fresh starts over: a new parent run; the old sweep folder is kept aside
    third = CliRunner().invoke(main, ["launch", str(spec), "--root", str(root), "--fresh"], catch_exceptions=False)
    assert third.exit_code == 0, third.output
    _, parents = runs_of(root, "sweep")
    assert len(parents) == 2
    assert len(list((root / "tune").glob("tiny.replaced-*"))) == 1
    # a changed spec under the same name is refused with exit code 2 (nothing touched)
    changed = spec.with_name("changed.yaml")
    changed.write_text(yaml.safe_dump({**TINY, "seed": 4}))
    res = CliRunner().invoke(main, ["launch", str(changed), "--root", str(root)])
    assert res.exit_code == 2 and "already exists" in res.output and "--fresh" in res.output


def test_experts_command_trains_only_experts_and_retrains_a_corrupt_one(tiny, tmp_path):
    spec, _, _ = tiny
    root = tmp_path / "only-experts"
    res = CliRunner().invoke(main, ["experts", str(spec), "--root", str(root)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "2 experts in" in res.output and "(2 trained now)" in res.output
    files = sorted((root / "trajectories").glob("*/expert_*.arrow"))
    assert len(files) == 2 and not (root / "mlflow.db").exists()
    files[1].write_bytes(files[1].read_bytes()[:-64])  # truncate one
    res = CliRunner().invoke(main, ["experts", str(spec), "--root", str(root)], catch_exceptions=False)
    assert "(1 trained now)" in res.output
    assert len(list(files[1].parent.glob("expert_00001.arrow.corrupt-*"))) == 1


class KillTrialOnce(Callback):
    """Kills the worker of the mtt trial with SIGKILL when it reports iteration 5; counts the mtt
    trial's checkpoints before that."""

    def __init__(self):
        self.killed = False
        self.checkpoints = 0

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if not self.killed and trial.config["trial"]["algorithm"] == "mtt":
            self.checkpoints += 1

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not self.killed and trial.config["trial"]["algorithm"] == "mtt" and result.get("iteration") == 5:
            self.killed = True
            os.kill(result["pid"], signal.SIGKILL)


def test_a_killed_trial_continues_from_its_checkpoint(tmp_path, ray_cluster):
    """Checkpoints by age (checkpoint_interval_s), none by iterations (checkpoint_interval 1000): a
    trial killed at iteration 5 had some, and continues from one."""
    spec = validate({**TINY, "name": "tiny-kill", "checkpoint_interval": 1000, "checkpoint_interval_s": 1e-6},
                    "tiny-kill.yaml")
    ws = workspace(tmp_path / "runs")
    killer = KillTrialOnce()
    out = launch(spec, ws, Progress(), callbacks=[killer])
    assert killer.killed and out.errors == []
    assert killer.checkpoints >= 3  # one per iteration by age (Tune may handle the last after the kill)
    client = MlflowClient(ws.tracking_uri)
    children = client.search_runs([out.experiment_id], f"tags.`mlflow.parentRunId` = '{out.parent_run_id}'")
    assert len(children) == 2  # the retried trial kept its run
    mtt = next(c for c in children if c.data.tags["algorithm"] == "mtt")
    assert mtt.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(mtt.info.run_id, "loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]  # resumed: nothing lost, nothing logged twice
    # resumed by the same code: its history names that code once
    assert json.loads(mtt.data.tags["orchestrate.git_commits"]) == [[0, mtt.data.tags["orchestrate.git_commit"]]]


def test_mct_sweep_reads_the_compact_form_only(tmp_path, ray_cluster):
    """(Its steps also run in bf16, ``resources.precision``, recorded as the run's ``precision``,
    where this CPU has bf16 units; elsewhere a launch in bf16 is refused: test_precision.py.)"""
    precision = "bf16" if native_bf16("cpu") else "fp32"
    raw = {**TINY, "name": "tiny-mct",
           "resources": {**TINY.get("resources", {}), "precision": precision},
           "experts": {**TINY["experts"], "keep": ["convex"]},
           "algorithms": {"mct": {"budgets": [1], "iterations": 4,
                                  "hyperparameters": {"syn_steps": 3, "expert_epochs": 2.5, "max_start_epoch": 3.5,
                                                      "grad_mode": "tesla"}}}}
    spec = tmp_path / "mct.yaml"
    spec.write_text(yaml.safe_dump(raw))
    root = tmp_path / "runs"
    res = CliRunner().invoke(main, ["launch", str(spec), "--root", str(root)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    files = sorted(p.name for p in (root / "trajectories").glob("*/expert_*"))
    assert files == ["expert_00000.convex-w2-path.arrow", "expert_00001.convex-w2-path.arrow"]  # no full trajectory
    client, children = runs_of_experiment(root, "tiny-mct")
    mct = next(c for c in children if c.data.tags["algorithm"] == "mct")
    assert mct.info.status == "FINISHED" and mct.data.params["hp.grad_mode"] == "tesla"
    assert mct.data.params["precision"] == precision
    starts = [m.value for m in client.get_metric_history(mct.info.run_id, "start_epoch")]
    assert len(starts) == 4 and all(0 <= s < 3.5 for s in starts) and any(s != int(s) for s in starts)
    assert [a.path for a in client.list_artifacts(mct.info.run_id, "synthetic")] == [
        "synthetic/cases.safetensors", "synthetic/synthetic.safetensors", "synthetic/synthetic_grid.png"]


def runs_of_experiment(root, name):
    client = MlflowClient(workspace(root).tracking_uri)
    exp = client.get_experiment_by_name(name)
    return client, client.search_runs([exp.experiment_id], filter_string="tags.`orchestrate.role` = 'trial'")
