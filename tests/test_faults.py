"""Faults on a simulated multi-node cluster (``ray.cluster_utils.Cluster``: a head without GPUs
and two worker nodes with one logical GPU each). A worker node removed in the middle of expert
training: its expert is trained again on another node, every file verifies and no partial file is
left. A worker node removed in the middle of a sweep: its trial is retried from its last
checkpoint on another node and keeps its one MLflow run, complete, with no step logged twice."""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.store import open_trajectory
from orchestrator.tracking import workspace

from .conftest import TINY

REPO = Path(__file__).resolve().parent.parent

FAULTS = textwrap.dedent("""
    import glob, json, os, sys, threading, time
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray.cluster_utils import Cluster
    from ray.tune import Callback
    from orchestrator.progress import Progress
    from orchestrator.spec import validate
    from orchestrator.sweep import launch, train_experts
    from orchestrator.tracking import workspace

    raw, root, at = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    spec, ws = validate(raw), workspace(root)
    # (no node_ip_address=127.0.0.1: ray.init resolves a loopback address to the machine's IP,
    # where a GCS bound to loopback is not found; Ray's default, as in the other simulated clusters)
    LOCAL = {"include_dashboard": False}
    WORKER = {"num_cpus": 2, "num_gpus": 1}
    t0 = time.time()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, **LOCAL})
    workers = [cluster.add_node(**WORKER) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    out = {"workers": [w.node_id for w in workers], "t_cluster": time.time() - t0}

    def wait(condition, what, deadline_s=300):
        end = time.time() + deadline_s
        while not condition():
            if time.time() > end:
                raise SystemExit(f"timed out waiting for {what}")
            time.sleep(0.05)

    # 1. experts: remove a worker while each GPU trains an expert, add a fresh node
    t1, done = time.time(), {}
    def experts():
        try:
            done["set"] = train_experts(spec, ws)
        except BaseException as e:
            done["error"] = repr(e)
    thread = threading.Thread(target=experts)
    thread.start()
    wait(lambda: ray.available_resources().get("GPU", 0) == 0 or not thread.is_alive(), "both GPUs busy")
    out["files_before_removal"] = sorted(glob.glob(os.path.join(ws.trajectories, "*", "expert_*")))
    cluster.remove_node(workers[0])
    out["removed_experts"] = workers[0].node_id
    spare = cluster.add_node(**WORKER)
    thread.join()
    out["experts_error"] = done.get("error")
    out["expert_files"] = done["set"].files["full"] if "set" in done else []
    out["experts_trained"] = done["set"].trained if "set" in done else 0
    out["t_experts"] = time.time() - t1

    # 2. a sweep: remove the node of the first trial to report a checkpointed iteration >= at. The
    # trial waits in tune.report until the controller has run the callbacks, so it is still running
    # on that node, whatever the other trial is doing (waiting, running, or already finished)
    out["spare"] = spare.node_id
    class Faults(Callback):
        def __init__(self):
            self.iterations, self.recovered, self.failures, self.removed = {}, [], {}, None
        def __getstate__(self):  # Tune pickles its callbacks with the experiment
            return {}
        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.iterations.setdefault(trial.trial_id, []).append(result["iteration"])
            if self.removed is None and at <= result["iteration"] < raw["algorithms"]["mtt"]["iterations"]:
                import __main__ as m  # not a global of the class: Tune pickles it with the experiment
                actor = trial.temporary_state.ray_actor
                node_id = m.ray.get(actor.__ray_call__.remote(lambda _: __import__("ray").get_runtime_context().get_node_id()))
                node, = [n for n in (m.workers[1], m.spare) if n.node_id == node_id]
                m.cluster.remove_node(node)
                self.removed = node_id
                m.threading.Thread(target=m.cluster.add_node, kwargs=m.WORKER).start()
        def on_trial_recover(self, iteration, trials, trial, **info):
            self.recovered.append([trial.trial_id, len(self.iterations.get(trial.trial_id, []))])
        def on_trial_complete(self, iteration, trials, trial, **info):
            self.failures[trial.trial_id] = trial.num_failures

    t2, faults = time.time(), Faults()
    res = launch(spec, ws, Progress(), callbacks=[faults])
    out.update(removed_sweep=faults.removed, recovered=faults.recovered, failures=faults.failures,
               iterations=faults.iterations, errors=res.errors, experts_reused=res.experts.trained == 0,
               t_sweep=time.time() - t2)
    print(json.dumps(out))
    ray.shutdown(); cluster.shutdown()
""")


@pytest.mark.slow
def test_lost_nodes_retrain_their_experts_and_retry_their_trials_from_checkpoints(tmp_path):
    iterations, at = 40, 4  # a node goes when a trial reports iteration >= 4 (checkpoints every 2)
    raw = {**TINY, "name": "tiny-faults", "baselines": [], "checkpoint_interval": 2,
           "experts": {**TINY["experts"], "count": 4, "epochs": 25},
           "algorithms": {"mtt": {**TINY["algorithms"]["mtt"], "budgets": [1, 2], "iterations": iterations}},
           "evaluation": {"networks": 1, "epochs": 5, "interval": 0}}
    script = tmp_path / "faults.py"
    script.write_text(FAULTS)
    root = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.time()
    res = subprocess.run([sys.executable, str(script), json.dumps(raw), str(root), str(at)],
                         capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-5000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print({k: round(v, 1) for k, v in out.items() if k.startswith("t_")}, f"total {time.time() - t0:.1f}s")

    # experts: all four trained, none lost, none from the removed node (its expert was trained
    # again elsewhere), spread over both GPUs; every file verifies, nothing partial is left
    assert out["experts_error"] is None and out["experts_trained"] == 4
    assert out["files_before_removal"] == []  # removed mid-training: the node had not finished one
    files = [Path(p) for p in out["expert_files"]]
    assert [f.name for f in files] == [f"expert_{i:05d}.arrow" for i in range(4)]
    nodes = [open_trajectory(f).meta["node_id"] for f in files]  # open_trajectory checks the checksum
    lost, kept = out["removed_experts"], out["workers"][1]
    assert lost not in nodes and kept in nodes and len(set(nodes)) == 2  # the kept worker and the fresh one
    store = files[0].parent
    assert sorted(p.name for p in store.iterdir() if p.name.startswith(".") or ".tmp" in p.name) == []
    assert sorted(p.name for p in store.iterdir()) == sorted([f.name for f in files] + ["key.json", "manifest.json"])

    # sweep: exactly one trial lost its node and was retried from a checkpoint (its first result
    # after the retry is past iteration 1); every trial once in MLflow, finished, complete
    assert out["errors"] == [] and out["experts_reused"] and out["removed_sweep"] in (out["workers"][1], out["spare"])
    assert len(out["recovered"]) == 1
    (retried, n), = out["recovered"]
    assert out["failures"] == {tid: int(tid == retried) for tid in out["iterations"]}
    seen = out["iterations"][retried]  # iterations reported: seen[n] is the first after the retry
    assert seen[:n] == list(range(1, n + 1)) and n >= at
    assert seen[n] % 2 == 1 and 3 <= seen[n] <= n + 1  # continued after a checkpoint (every 2), not from 1
    assert seen[n:] == list(range(seen[n], iterations + 1))
    client = MlflowClient(workspace(root).tracking_uri)
    exp = client.get_experiment_by_name("tiny-faults")
    runs = client.search_runs([exp.experiment_id], "tags.`orchestrate.role` = 'trial'")
    assert sorted(r.data.tags["budget"] for r in runs) == ["1", "2"]  # one run per trial, none duplicated
    for r in runs:
        assert r.info.status == "FINISHED" and "acc_mean" in r.data.metrics
        steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "loss"))
        assert steps == list(range(1, iterations + 1))  # nothing lost, nothing logged twice
        assert len(client.get_metric_history(r.info.run_id, "acc_mean")) == 1
