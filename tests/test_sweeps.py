"""Sweeps researchers can trust: a NaN trial fails alone, bad specs stop before anything runs
(exit code 2, one message per problem), fractional GPUs pack trials, and a sweep whose driver is
killed with SIGKILL resumes with nothing lost and nothing run twice."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from orchestrator.cli import main
from orchestrator.progress import Progress
from orchestrator.spec import validate
from orchestrator.sweep import _scheduler, gpus_for, launch
from orchestrator.tracking import workspace

from .conftest import TINY

REPO = Path(__file__).resolve().parent.parent


def children_of(ws, out):
    client = MlflowClient(ws.tracking_uri)
    return client, client.search_runs([out.experiment_id], f"tags.`mlflow.parentRunId` = '{out.parent_run_id}'")


@pytest.mark.slow
def test_a_diverging_trial_fails_alone_with_its_reason(tmp_path, ray_cluster):
    raw = {**TINY, "name": "tiny-nan",
           "algorithms": {"mtt": {**TINY["algorithms"]["mtt"],
                                  "hyperparameters": {**TINY["algorithms"]["mtt"]["hyperparameters"],
                                                      "lr_img": [30, 1.0e38]}}}}
    spec = validate(raw, "tiny-nan.yaml")
    ws = workspace(tmp_path / "runs")
    out = launch(spec, ws, Progress())
    assert out.errors == []  # divergence ends a trial, not the sweep
    client, children = children_of(ws, out)
    by_lr = {c.data.params.get("hp.lr_img"): c for c in children if c.data.tags["algorithm"] == "mtt"}
    bad, good = by_lr["1e+38"], by_lr["30"]
    assert bad.info.status == "FAILED"
    assert "diverged" in bad.data.tags["orchestrate.failure_reason"]
    assert good.info.status == "FINISHED" and "acc_mean" in good.data.metrics
    random = next(c for c in children if c.data.tags["algorithm"] == "random")
    assert random.info.status == "FINISHED"



@pytest.mark.slow
def test_asha_stops_the_weak_trial_of_a_group_and_only_compares_within_it(tmp_path, ray_cluster):
    """One trial at a time, so that ASHA's decisions are deterministic: IPC 1 from real images,
    IPC 1 from noise, then IPC 10 from noise. The IPC 1 noise trial is stopped at the first rung,
    against the real one of its group. The IPC 10 one scores below that rung's median too, so one
    ASHA over all trials would have stopped it; alone in its group it runs to the end. The
    stopped run is closed KILLED with its reason and every step it ran."""
    mtt = TINY["algorithms"]["mtt"]
    raw = {**TINY, "name": "tiny-asha", "baselines": [],
           "algorithms": {"mtt": {"budgets": [1, 10], "iterations": 8,
                                  "hyperparameters": {**mtt["hyperparameters"], "pix_init": "noise"},
                                  "per_budget": {1: {"pix_init": ["real", "noise"]}}}},
           "evaluation": {"networks": 1, "epochs": 10, "interval": 2},
           "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 2},
           "resources": {"max_concurrent_trials": 1}}
    ws = workspace(tmp_path / "runs")
    out = launch(validate(raw, "tiny-asha.yaml"), ws, Progress())
    assert out.errors == []
    client, children = children_of(ws, out)
    runs = {(int(c.data.tags["budget"]), c.data.params["hp.pix_init"]): c for c in children}
    assert sorted(runs) == [(1, "noise"), (1, "real"), (10, "noise")]

    def history(run, key):
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    loss = {k: sorted(history(r, "loss")) for k, r in runs.items()}
    rung = {k: history(r, "eval/acc_mean")[2] for k, r in runs.items()}
    assert rung[(10, "noise")] < (rung[(1, "real")] + rung[(1, "noise")]) / 2 and rung[(1, "noise")] < rung[(1, "real")]
    for k in ((1, "real"), (10, "noise")):
        assert runs[k].info.status == "FINISHED" and loss[k] == list(range(1, 9)) and "acc_mean" in runs[k].data.metrics
    stopped = runs[(1, "noise")]
    assert stopped.info.status == "KILLED" and "orchestrate.failure_reason" not in stopped.data.tags
    assert "stopped by the Tune scheduler" in stopped.data.tags["orchestrate.stopped_early"]
    assert 2 <= len(loss[(1, "noise")]) < 8 and loss[(1, "noise")] == list(range(1, len(loss[(1, "noise")]) + 1))


BAD_SPECS = [
    ("unknown key", {"experts": {"count": 2, "epoch": 3}}, "experts.epoch", "did you mean 'epochs'"),
    ("wrong type", {"experts": {"count": "two"}}, "experts.count", "must be int"),
    ("empty budgets", {"algorithms": {"mtt": {"budgets": []}}}, "algorithms.mtt.budgets", "non-empty list"),
    ("non-positive budget", {"algorithms": {"mtt": {"budgets": [0, 1]}}}, "algorithms.mtt.budgets", "positive"),
    ("unknown algorithm", {"algorithms": {"kip": {"budgets": [1]}}}, "algorithms.kip", "known: random, mtt, mct, dc, dsa, dm, farzi"),
    ("unknown dataset", {"dataset": {"name": "imagenet"}}, "dataset.name", "known:"),
    ("start beyond experts", {"algorithms": {"mtt": {"budgets": [1], "hyperparameters": {"max_start_epoch": 9}}}},
     "algorithms.mtt.hyperparameters.max_start_epoch", "beyond the experts' 4 epochs"),
    ("farzi on images", {"algorithms": {"farzi": {"budgets": [1]}}}, "algorithms.farzi", "does not apply"),
    ("bad scheduler", {"scheduler": {"name": "pbt"}}, "scheduler", "must be asha"),
    ("bad gpus", {"resources": {"gpus_per_trial": {"one": 1}}}, "resources.gpus_per_trial", "mapping budget"),
]


@pytest.mark.parametrize("what, change, key, words", BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_bad_specs_exit_2_naming_the_key_and_touch_nothing(tmp_path, what, change, key, words):
    raw = {**TINY, **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    root = tmp_path / "runs"
    res = CliRunner().invoke(main, ["launch", str(path), "--root", str(root)])
    assert res.exit_code == 2, res.output
    assert f"{path}: {key}:" in res.output and words in res.output, res.output
    assert not root.exists()


def test_two_problems_give_two_messages(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**TINY, "experts": {"count": 0, "epoch": 3}}))
    res = CliRunner().invoke(main, ["launch", str(path), "--root", str(tmp_path / "runs")])
    assert res.exit_code == 2
    assert res.output.count(f"{path}: experts.") == 2


def test_a_missing_dataset_says_how_to_provide_it(tmp_path):
    path = tmp_path / "mnist.yaml"
    path.write_text(yaml.safe_dump({**TINY, "dataset": {"name": "mnist", "root": str(tmp_path / "nowhere")}}))
    res = CliRunner().invoke(main, ["launch", str(path), "--root", str(tmp_path / "runs")])
    assert res.exit_code == 2
    assert "train-images-idx3-ubyte" in res.output and "dataset.root" in res.output
    assert not (tmp_path / "runs" / "trajectories").exists()


def test_a_cpu_trials_cpus_beyond_the_first_are_bundles_for_its_networks():
    """cpus_per_trial >= 2 on the CPU with parallel evaluation: one bundle per whole CPU beyond the
    first, on one node; the trial's total never changes. A GPU trial, sequential evaluation or a
    single CPU keep Tune's one bundle."""
    from ray.tune import PlacementGroupFactory

    from orchestrator.schedulers import trial_resources

    two = trial_resources(2, 0.0, parallel=True)
    assert isinstance(two, PlacementGroupFactory) and two.strategy == "STRICT_PACK"
    assert two.bundles == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert trial_resources(4.5, 0.0, True).bundles == [{"CPU": 1.5}] + [{"CPU": 1.0}] * 3
    assert trial_resources(4.5, 0.0, True).required_resources == {"CPU": 4.5}
    assert trial_resources(1, 0.0, True) == {"cpu": 1, "gpu": 0.0}
    assert trial_resources(1.5, 0.0, True) == {"cpu": 1.5, "gpu": 0.0}
    assert trial_resources(2, 1.0, True) == {"cpu": 2, "gpu": 1.0}
    assert trial_resources(2, 0.0, False) == {"cpu": 2, "gpu": 0.0}


@pytest.mark.slow
def test_gpus_per_trial_forms_and_the_asha_scheduler():
    assert gpus_for("auto", 1, True) == 1 and gpus_for("auto", 1, False) == 0
    assert gpus_for(0.5, 10, True) == 0.5
    steps = {1: 0.25, 10: 0.5, 50: 1}
    assert [gpus_for(steps, b, True) for b in (1, 5, 10, 49, 50, 100)] == [0.25, 0.25, 0.5, 0.5, 1, 1]
    spec = validate({**TINY, "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 2}})
    asha = _scheduler(spec, None)
    assert asha.metric == "eval_acc_mean" and asha._asha == dict(time_attr="iteration", metric="eval_acc_mean", mode="max", max_t=6, stop_last_trials=False, grace_period=2, reduction_factor=2)
    assert _scheduler(validate(TINY), None) is None


FRACTIONAL = textwrap.dedent("""
    import json, os, sys, time
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray.cluster_utils import Cluster
    from ray.tune import Callback
    from orchestrator.progress import Progress
    from orchestrator.spec import validate
    from orchestrator.sweep import launch
    from orchestrator.tracking import workspace

    class Concurrency(Callback):
        def __init__(self):
            self.running, self.peak = set(), 0
        def on_trial_start(self, iteration, trials, trial, **info):
            self.running.add(trial.trial_id); self.peak = max(self.peak, len(self.running))
        def on_trial_complete(self, iteration, trials, trial, **info):
            self.running.discard(trial.trial_id)

    raw, root, gpus = json.loads(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    raw["resources"] = {"cpus_per_trial": 1, "gpus_per_trial": gpus}
    c = Concurrency()
    out = launch(validate(raw), workspace(root), Progress(), callbacks=[c])
    print(json.dumps({"peak": c.peak, "errors": out.errors}))
    ray.shutdown(); cluster.shutdown()
""")


@pytest.mark.slow
def test_fractional_gpus_pack_two_trials_per_gpu(tmp_path):
    """On a simulated cluster with 4 CPUs and one logical GPU, gpus_per_trial 0.5 runs two trials at
    once (1 would run one): the GPU, not the CPUs, limits concurrency."""
    raw = {**TINY, "name": "tiny-gpu", "baselines": [],
           "algorithms": {"mtt": {**TINY["algorithms"]["mtt"], "iterations": 4,
                                  "hyperparameters": {**TINY["algorithms"]["mtt"]["hyperparameters"],
                                                      "lr_img": [10, 20, 30, 40]}}},
           "evaluation": {"networks": 1, "epochs": 4, "interval": 0}}
    script = tmp_path / "frac.py"
    script.write_text(FRACTIONAL)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, str(script), json.dumps(raw), str(tmp_path / "runs"), "0.5"],
                         capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["errors"] == [] and out["peak"] == 2


def _child_runs(root, name):
    client = MlflowClient(workspace(root).tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client, []
    return client, client.search_runs([exp.experiment_id], "tags.`orchestrate.role` = 'trial'")


def _wait_for(root, name, condition, what, proc, deadline_s=400):
    deadline = time.time() + deadline_s
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        client, runs = _child_runs(root, name)
        steps = {r.info.run_id: len(client.get_metric_history(r.info.run_id, "loss")) for r in runs
                 if r.info.status == "RUNNING" and r.data.tags["algorithm"] == "mtt"}
        if condition(runs, steps):
            return {r.info.run_id: r.info.end_time for r in runs if r.info.status == "FINISHED"}
    raise AssertionError(f"the sweep did not get {what} in time (launch exit code {proc.poll()})")


@pytest.mark.slow
def test_a_sweep_stopped_with_ctrl_c_then_killed_resumes_with_nothing_lost_or_run_twice(tmp_path, ray_cluster):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) half way through the first
    distillation trial: exit code 130, every run closed. Relaunched, then SIGKILL half way through
    the second one. Relaunched again, with another checkpoint_interval: every trial of the spec
    exactly once in MLflow, complete, and no trial that had finished ran again. (The launches that
    get signals are processes of their own; the last runs in this process, on the session's Ray.)"""
    # 30 student steps per iteration: a trial lasts seconds even on an idle machine, so that the
    # polling below finds it half way
    raw = {**TINY, "name": "tiny-resume", "checkpoint_interval": 2,
           "algorithms": {"mtt": {**TINY["algorithms"]["mtt"], "budgets": [1, 2], "iterations": 40,
                                  "hyperparameters": {**TINY["algorithms"]["mtt"]["hyperparameters"],
                                                      "syn_steps": 30}}},
           "evaluation": {"networks": 1, "epochs": 5, "interval": 10},
           "resources": {"max_concurrent_trials": 1}}
    spec, root = tmp_path / "resume.yaml", tmp_path / "runs"
    spec.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "orchestrator.cli", "launch", str(spec), "--root", str(root), "--num-cpus", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    log = tmp_path / "launch.err"

    def start():  # stderr to a file: a pipe nobody reads fills up and blocks the launch
        with open(log, "w") as err:
            return subprocess.Popen(cmd, env=env, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
                                    stderr=err)

    def half_way(n_finished):  # checkpoints every 2 iterations are flushed to MLflow
        return lambda runs, steps: (sum(r.info.status == "FINISHED" for r in runs) >= n_finished
                                    and any(n >= 12 for n in steps.values()))

    proc = start()
    try:
        _wait_for(root, "tiny-resume", half_way(2), "half way through the first trial", proc)  # 2 random baselines done
    except AssertionError as e:
        raise AssertionError(f"{e}; the launch said: {log.read_text()[-3000:]}") from None
    finally:
        os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=180)
    err = log.read_text()
    assert proc.returncode == 130, err[-3000:]
    assert "run the same command again to resume" in err
    client, runs = _child_runs(root, "tiny-resume")
    parent = client.search_runs([runs[0].info.experiment_id], "tags.`orchestrate.role` = 'sweep'")
    assert [p.info.status for p in parent] == ["KILLED"]
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED", "KILLED"]  # nothing left RUNNING

    proc = start()
    try:
        state = _wait_for(root, "tiny-resume", half_way(3), "half way through the second trial", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(2)
    # The race CI once hit: Tune (num_to_keep=1) deletes checkpoint k when k+1 arrives and saves
    # the snapshot naming k+1 a moment later; a kill in between leaves the snapshot naming a
    # checkpoint that is gone. Reproduce it: the running trial's checkpoint moves to the next name.
    (running,) = [d for d in (root / "tune" / "tiny-resume").glob("mtt-ipc2_*")]
    (k,) = sorted(running.glob("checkpoint_*"))[-1:]
    k.rename(k.with_name(f"checkpoint_{int(k.name.split('_')[1]) + 1:06d}"))
    # and the user now wants checkpoints every 3 iterations: the same sweep resumes (same numbers)
    spec.write_text(yaml.safe_dump({**raw, "checkpoint_interval": 3}))
    res = CliRunner().invoke(main, cmd[3:])
    assert res.exit_code == 0, res.output[-3000:]
    client, runs = _child_runs(root, "tiny-resume")
    parents = client.search_runs([runs[0].info.experiment_id], "tags.`orchestrate.role` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    # every trial of the spec exactly once: 2 random + 2 mtt
    assert sorted((r.data.tags["algorithm"], r.data.tags["budget"]) for r in runs) == [
        ("mtt", "1"), ("mtt", "2"), ("random", "1"), ("random", "2")]
    assert len(state) == 3  # the baselines and the first mtt trial had finished before the SIGKILL
    for r in runs:
        assert r.info.status == "FINISHED" and "acc_mean" in r.data.metrics
        if r.info.run_id in state:  # finished before the kill: not run again
            assert r.info.end_time == state[r.info.run_id]
        assert len(client.get_metric_history(r.info.run_id, "acc_mean")) == 1
        if r.data.tags["algorithm"] == "mtt":
            steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "loss"))
            assert steps == list(range(1, 41))  # nothing lost, nothing logged twice


@pytest.mark.slow
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # the watcher's stop request
def test_a_time_budget_stops_a_launch_and_the_same_spec_resumes_the_sweep(tmp_path, ray_cluster):
    """time_budget_s bounds one launch: the first stops its trial when the budget runs out (exit 130,
    saying why) and leaves it unfinished, where Tune's own time budget ended it as finished and a
    relaunch ran nothing. Launched again, with the budget raised (not part of the spec hash: the
    same sweep), the trial continues from its checkpoint to the end, every step logged once. (In
    this process, on the session's Ray: the launch runs in the main thread, as the CLI's does.)"""
    raw = {**TINY, "name": "tiny-budget", "baselines": [], "time_budget_s": 5, "checkpoint_interval": 5,
           "algorithms": {"mtt": {**TINY["algorithms"]["mtt"], "iterations": 200,
                                  "hyperparameters": {**TINY["algorithms"]["mtt"]["hyperparameters"], "syn_steps": 10}}},
           "evaluation": {"networks": 1, "epochs": 5, "interval": 100}}
    spec, root = tmp_path / "budget.yaml", tmp_path / "runs"
    spec.write_text(yaml.safe_dump(raw))
    cmd = ["launch", str(spec), "--root", str(root)]
    first = CliRunner().invoke(main, cmd)
    assert first.exit_code == 130, first.output[-3000:]
    said = " ".join(first.output.split())
    assert "time budget of 5 s reached" in said and "the sweep reached its time budget (time_budget_s)" in said
    client, runs = _child_runs(root, "tiny-budget")
    before = None
    if runs:  # the trial had started (on a loaded machine its worker may still have been starting)
        (run,) = runs
        before = len(client.get_metric_history(run.info.run_id, "loss"))
        assert run.info.status == "KILLED" and before < 200
    spec.write_text(yaml.safe_dump({**raw, "time_budget_s": 600}))
    second = CliRunner().invoke(main, cmd)
    assert second.exit_code == 0, second.output[-3000:]
    assert "resuming sweep 'tiny-budget'" in " ".join(second.output.split())
    client, (again,) = _child_runs(root, "tiny-budget")
    assert again.info.status == "FINISHED" and (not runs or again.info.run_id == runs[0].info.run_id)
    steps = sorted(m.step for m in client.get_metric_history(again.info.run_id, "loss"))
    assert steps == list(range(1, 201)), (before, steps[:5], len(steps))  # nothing lost, nothing twice


def test_spec_distributions_become_tune_domains():
    from ray.tune.search.sample import Categorical, Float, Integer

    from orchestrator.sweep import tune_value

    lr = tune_value({"loguniform": [1e-7, 1e-5]})
    assert isinstance(lr, Float) and all(1e-7 <= lr.sample() <= 1e-5 for _ in range(20))
    assert isinstance(tune_value({"randint": [2, 5]}), Integer)
    assert isinstance(tune_value({"choice": [10, {"uniform": [0, 1]}]}), Categorical)
    assert tune_value([1, 2]) == [1, 2] and isinstance(tune_value([1, 2], choice_lists=True), Categorical)
    assert tune_value(30) == 30


@pytest.mark.slow
def test_optuna_search_runs_one_point_and_logs_every_trial(tmp_path, ray_cluster):
    raw = {**TINY, "name": "tiny-optuna", "baselines": [], "num_samples": 3, "search": {"name": "optuna", "seed": 1},
           "algorithms": {"mtt": {**TINY["algorithms"]["mtt"], "iterations": 2,
                                  "hyperparameters": {**TINY["algorithms"]["mtt"]["hyperparameters"],
                                                      "lr_img": {"loguniform": [10, 100]}}}},
           "evaluation": {"networks": 1, "epochs": 4, "interval": 2}}
    spec = validate(raw, "tiny-optuna.yaml")
    ws = workspace(tmp_path / "runs")
    out = launch(spec, ws, Progress())
    assert out.errors == []
    client, children = children_of(ws, out)
    lrs = [float(c.data.params["hp.lr_img"]) for c in children]
    assert len(children) == 3 and len(set(lrs)) == 3 and all(10 <= v <= 100 for v in lrs)
    assert all(c.info.status == "FINISHED" and "acc_mean" in c.data.metrics for c in children)
    bad = {**raw, "baselines": ["random"], "algorithms": {"mtt": {**raw["algorithms"]["mtt"], "budgets": [1, 2]}}}
    with pytest.raises(Exception) as e:
        validate(bad, "bad.yaml")
    assert "bad.yaml: search: Optuna tunes one algorithm at one budget" in str(e.value)
    assert "bad.yaml: baselines: must be [] with search: optuna" in str(e.value)


@pytest.mark.slow
def test_a_stale_ray_cluster_file_is_not_joined_without_an_address(tmp_path):
    """A ``ray start`` (or a crashed simulated cluster) leaves ``ray_current_cluster`` behind; Ray's
    own ``ray.init()`` would try to join it. ``orchestrate`` without ``--address`` starts its own."""
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    try:
        os.makedirs(os.path.join(tmp, "ray"))
        with open(os.path.join(tmp, "ray", "ray_current_cluster"), "w") as f:
            f.write("127.0.0.1:9")  # nothing listens there
        code = ("import ray; from orchestrator.sweep import ray_session\n"
                "with ray_session(None, 1):\n    print(int(ray.cluster_resources()['CPU']))")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(PYTHONPATH=str(REPO), RAY_TMPDIR=tmp)
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and res.stdout.strip().splitlines()[-1] == "1", res.stderr[-3000:]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
