"""Shared storage by URI: the trajectory store, Tune's experiments and the MLflow artifacts on
``file://`` and on S3. S3 is a moto server on 127.0.0.1 with made-up credentials (set here,
never real ones): unit tests of the store, then a real sweep launched with ``--storage s3://...``
and launched again (it resumes: nothing trained or run twice)."""
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from orchestrator import storage
from orchestrator.artifacts import read_synthetic
from orchestrator.cli import main
from orchestrator.store import CorruptTrajectoryError, TrajectoryStore, open_trajectory, write_trajectory
from orchestrator.tracking import workspace

from .conftest import TINY
from .test_store import MANIFEST, checkpoints

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (a free port), and the environment the AWS SDKs read:
    fake credentials, the endpoint, no config files, no instance metadata lookups."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           "ORCHESTRATE_CACHE": str(tmp_path_factory.mktemp("cache"))}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION", "AWS_ENDPOINT_URL_S3",
                      "MLFLOW_S3_ENDPOINT_URL", "ORCHESTRATE_STORAGE"):
                mp.delenv(k, raising=False)
            for k, v in env.items():
                mp.setenv(k, v)
            yield SimpleNamespace(client=boto3.client("s3"), env=env)
    finally:
        server.stop()


def keys(s3, bucket, prefix=""):
    """The objects under ``prefix``, less the empty folder markers pyarrow leaves ("dir/")."""
    out = s3.client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in out.get("Contents", []) if not o["Key"].endswith("/"))


def test_workspace_storage_defaults_to_the_root_and_takes_uris(tmp_path, monkeypatch):
    monkeypatch.delenv("ORCHESTRATE_STORAGE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ws = workspace(tmp_path / "runs")
    assert ws.trajectories == tmp_path / "runs" / "trajectories" and ws.tune == tmp_path / "runs" / "tune"
    assert ws.artifact_root == (tmp_path / "runs" / "artifacts").as_uri() and not ws.remote
    ws = workspace(tmp_path / "runs", storage=f"file://{tmp_path}/shared/")
    assert ws.trajectories == tmp_path / "shared" / "trajectories" and not ws.remote
    assert ws.tracking_uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"  # the database stays in --root
    monkeypatch.setenv("ORCHESTRATE_STORAGE", "s3://bucket/team/runs/")
    ws = workspace(tmp_path / "runs")
    assert ws.remote and ws.trajectories == "s3://bucket/team/runs/trajectories"
    assert ws.tune == "s3://bucket/team/runs/tune" and ws.artifact_root == "s3://bucket/team/runs/artifacts"
    assert workspace(tmp_path / "runs", "http://127.0.0.1:5000").artifact_root is None  # the server decides
    with pytest.raises(storage.StorageError, match=r"AWS_ENDPOINT_URL"):
        workspace(tmp_path / "runs", storage="s3://bucket/runs?endpoint_override=localhost:9000")


def test_store_on_a_file_uri_is_the_local_store(tmp_path):
    store = TrajectoryStore(f"file://{tmp_path}/traj")
    assert store.root == tmp_path / "traj" and not store.remote
    cks = checkpoints(20)
    uri = f"file://{store.expert_path('k', 'd', 0)}"
    digest, nbytes = write_trajectory(uri, cks, MANIFEST, {"seed": 1})
    assert nbytes == store.expert_path("k", "d", 0).stat().st_size
    before = pa.total_allocated_bytes()
    t = open_trajectory(uri)  # memory-mapped, zero copy, verified
    assert pa.total_allocated_bytes() == before and not t._flat.flags.owndata
    assert torch.equal(t.params, torch.stack([c.params for c in cks])) and t.meta["params_sha256"] == digest
    valid, todo, problems = store.check("k", "d", 2)
    assert [r.index for r in valid] == [0] and todo == [1] and problems == []


def test_store_round_trip_on_s3_verifies_and_caches(s3, tmp_path, monkeypatch):
    s3.client.create_bucket(Bucket="unit")
    store = TrajectoryStore("s3://unit/runs/trajectories/")
    assert store.remote and store.root == "s3://unit/runs/trajectories"
    cks = [checkpoints(8, seed=i) for i in range(3)]
    for i in range(3):
        digest, nbytes = write_trajectory(store.expert_path("k", "d", i), cks[i], MANIFEST, {"seed": i})
    store.describe("k", "d", {"what": "unit"})
    prefix = "runs/trajectories/d-k/"
    assert keys(s3, "unit") == [prefix + n for n in ("expert_00000.arrow", "expert_00001.arrow",
                                                     "expert_00002.arrow", "key.json")]  # no temporaries left
    head = s3.client.head_object(Bucket="unit", Key=prefix + "expert_00002.arrow")
    assert head["ContentLength"] == nbytes
    valid, todo, problems = store.check("k", "d", 4)
    assert [r.index for r in valid] == [0, 1, 2] and todo == [3] and problems == []
    assert valid[2].sha256 == digest and valid[2].nbytes == nbytes
    assert valid[1].path == "s3://unit/runs/trajectories/d-k/expert_00001.arrow"
    t = open_trajectory(valid[1].path)
    assert torch.equal(t.params, torch.stack([c.params for c in cks[1]])) and t.path == valid[1].path
    assert not t._flat.flags.owndata  # memory-mapped from the node's copy
    cache = Path(os.environ["ORCHESTRATE_CACHE"])
    assert len(list(cache.glob("*.arrow"))) == 3  # one copy per expert, reused by later reads
    assert store.nbytes("k", "d") == sum(r.nbytes for r in valid)
    store.write_manifest("k", "d", {"full": valid})
    body = json.loads(s3.client.get_object(Bucket="unit", Key=prefix + "manifest.json")["Body"].read())
    assert [r["path"] for r in body["forms"]["full"]] == ["expert_00000.arrow", "expert_00001.arrow",
                                                          "expert_00002.arrow"]

    # a corrupt object: the error names the object, the store moves it aside and asks for it again
    raw = s3.client.get_object(Bucket="unit", Key=prefix + "expert_00001.arrow")["Body"].read()
    s3.client.put_object(Bucket="unit", Key=prefix + "expert_00001.arrow", Body=raw[:-100])
    with pytest.raises(CorruptTrajectoryError, match=r"s3://unit/runs/trajectories/d-k/expert_00001.arrow: not a "):
        open_trajectory(valid[1].path)
    valid2, todo, problems = store.check("k", "d", 3)
    assert [r.index for r in valid2] == [0, 2] and todo == [1] and "expert_00001.arrow" in problems[0]
    aside = [k for k in keys(s3, "unit", prefix) if ".corrupt-" in k]
    assert len(aside) == 1 and aside[0].startswith(prefix + "expert_00001.arrow.corrupt-")
    # a flipped parameter byte (same footer) in a download is caught by the checksum
    raw = s3.client.get_object(Bucket="unit", Key=prefix + "expert_00002.arrow")["Body"].read()
    i = raw.index(cks[2][3].params[5:7].numpy().tobytes())
    s3.client.put_object(Bucket="unit", Key=prefix + "expert_00002.arrow",
                         Body=raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1:])
    monkeypatch.setenv("ORCHESTRATE_CACHE", str(tmp_path / "fresh-cache"))  # a node without a copy
    with pytest.raises(CorruptTrajectoryError, match=r"expert_00002.arrow: checksum mismatch"):
        open_trajectory(valid[2].path)
    assert not list((tmp_path / "fresh-cache").glob("*"))  # a download that does not verify is not kept


class FailingMove:
    """A filesystem whose moves fail: the upload of the temporary worked, the commit did not."""

    def __init__(self, fs):
        self._fs = fs

    def move(self, src, dst):
        raise OSError("connection reset during CopyObject")

    def __getattr__(self, name):
        return getattr(self._fs, name)


def test_an_interrupted_write_leaves_nothing_under_the_final_key(s3, monkeypatch):
    s3.client.create_bucket(Bucket="crash")
    store = TrajectoryStore("s3://crash/t")
    path = store.expert_path("k", "d", 0)

    real_upload = storage._upload

    def half_then_fail(fs, p, data):  # the connection drops half way through the upload
        out = fs.open_output_stream(p)
        out.write(memoryview(data)[: len(data) // 2])
        out.close()  # what pyarrow's stream does when it is closed or collected after an error
        raise OSError("connection reset by peer")

    monkeypatch.setattr(storage, "_upload", half_then_fail)
    with pytest.raises(OSError, match="connection reset by peer"):
        write_trajectory(path, checkpoints(), MANIFEST, {})
    assert keys(s3, "crash") == []  # no object under the final key, and the partial temporary is gone
    monkeypatch.setattr(storage, "_upload", real_upload)

    real_resolve = storage.resolve
    monkeypatch.setattr(storage, "resolve", lambda uri: (FailingMove(real_resolve(uri)[0]), real_resolve(uri)[1]))
    with pytest.raises(OSError, match="CopyObject"):
        write_trajectory(path, checkpoints(), MANIFEST, {})
    assert keys(s3, "crash") == []
    monkeypatch.setattr(storage, "resolve", real_resolve)
    assert store.check("k", "d", 1) == ([], [0], [])  # missing, so it is trained again
    write_trajectory(path, checkpoints(), MANIFEST, {})
    assert keys(s3, "crash") == ["t/d-k/expert_00000.arrow"]


def test_unusable_storage_stops_before_anything_runs(s3, tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(TINY))
    res = CliRunner().invoke(main, ["experts", str(spec), "--root", str(tmp_path / "r"), "--storage", "s3://"])
    assert res.exit_code == 2 and "no bucket" in res.output
    res = CliRunner().invoke(main, ["launch", str(spec), "--root", str(tmp_path / "r"),
                                    "--storage", "s3://no-such-bucket/runs"])
    assert res.exit_code == 2 and "s3://no-such-bucket/runs" in res.output and "cannot be used" in res.output


# -- a real sweep on S3 ---------------------------------------------------------------------------
S3_SPEC = {**TINY, "name": "tiny-s3", "experts": {**TINY["experts"], "count": 1},
           "algorithms": {"mtt": {**TINY["algorithms"]["mtt"], "iterations": 4}},
           "evaluation": {"networks": 1, "epochs": 5, "interval": 2}}
STORAGE = "s3://sweep/runs"


@pytest.fixture(scope="module")
def sweep(s3, tmp_path_factory):
    """``orchestrate launch --storage s3://sweep/runs`` in a process of its own: its own local Ray,
    whose workers get the endpoint and credentials from the environment, as on a cluster (the
    session's Ray was started before this module set them)."""
    s3.client.create_bucket(Bucket="sweep")
    d = tmp_path_factory.mktemp("s3-sweep")
    spec, root = d / "tiny-s3.yaml", d / "runs"
    spec.write_text(yaml.safe_dump(S3_SPEC))
    cmd = [sys.executable, "-m", "orchestrator.cli", "launch", str(spec), "--root", str(root),
           "--storage", STORAGE, "--num-cpus", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "ORCHESTRATE_CACHE": str(d / "node-cache")}

    t0 = time.time()
    first = subprocess.run(cmd, env=env, cwd=d, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    return SimpleNamespace(spec=spec, root=root, first=first, t_first=time.time() - t0)


def sweep_runs(root, role):
    client = MlflowClient(workspace(root).tracking_uri)
    exp = client.get_experiment_by_name("tiny-s3")
    return client, client.search_runs([exp.experiment_id], filter_string=f"tags.`orchestrate.role` = '{role}'")


@pytest.mark.slow
def test_a_sweep_on_s3_keeps_experts_tune_state_and_artifacts_in_the_bucket(s3, sweep, tmp_path, ray_cluster):
    print(f"first launch on S3: {sweep.t_first:.1f} s")
    root = sweep.root
    assert "(1 trained, 0 reused)" in sweep.first.stdout
    # nothing shared is written to the local folder: it only holds the MLflow database (and the
    # launch locks, which are local: see orchestrator/locks.py)
    assert sorted(p.name for p in root.iterdir()) == ["locks", "mlflow.db"]
    objects = keys(s3, "sweep")
    assert not [k for k in objects if ".tmp-" in k]

    # the expert: in the bucket, and it verifies (checksum) when read back through the store
    experts = [k for k in objects if k.startswith("runs/trajectories/") and k.endswith(".arrow")]
    assert len(experts) == 1 and experts[0].endswith("/expert_00000.arrow")
    set_dir = experts[0].rsplit("/", 1)[0]
    manifest = json.loads(s3.client.get_object(Bucket="sweep", Key=set_dir + "/manifest.json")["Body"].read())
    dataset, key = set_dir.rsplit("/", 1)[1].split("-", 1)
    valid, todo, problems = TrajectoryStore(f"{STORAGE}/trajectories").check(key, dataset, 1)
    assert todo == [] and problems == [] and valid[0].sha256 == manifest["forms"]["full"][0]["sha256"]
    assert open_trajectory(valid[0].path).num_epochs == S3_SPEC["experts"]["epochs"]

    # Tune's experiment (state, trials, checkpoints) and the sweep's sidecar are in the bucket
    tune_keys = [k for k in objects if k.startswith("runs/tune/tiny-s3/")]
    assert "runs/tune/tiny-s3/orchestrate.json" in tune_keys and "runs/tune/tiny-s3/tuner.pkl" in tune_keys
    assert any(k.rsplit("/", 1)[1].startswith("experiment_state") for k in tune_keys)
    assert any("/checkpoint_" in k for k in tune_keys)
    from ray import tune

    fs, path = storage.resolve(f"{STORAGE}/tune/tiny-s3")
    assert tune.Tuner.can_restore(path, storage_filesystem=fs)

    # MLflow: the artifacts of the parent and of each trial are in the bucket
    client, parents = sweep_runs(root, "sweep")
    _, children = sweep_runs(root, "trial")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.data.tags["algorithm"] for c in children) == ["mtt", "random"]
    for run in [*parents, *children]:
        assert run.info.artifact_uri.startswith(f"{STORAGE}/artifacts/tiny-s3/")
    for c in children:
        assert c.info.status == "FINISHED"
        prefix = c.info.artifact_uri[len("s3://sweep/"):]
        # the final set; a trial with periodic evaluations also keeps the set of its latest one
        latest = ["synthetic_latest"] if c.data.tags["algorithm"] == "mtt" else []
        stored = keys(s3, "sweep", prefix)
        # and the training images both start from (the baseline's draw is the real start's)
        assert [k for k in stored if "/cases/" not in k] == [f"{prefix}/start.json", *(
            f"{prefix}/{folder}/{f}" for folder in ["synthetic", *latest]
            for f in ("cases.safetensors", "synthetic.safetensors", "synthetic_grid.png"))]
        assert f"{prefix}/cases/iteration_000000.safetensors" in stored  # every evaluation's outcomes
    # the per-case outcomes beside the sets pair the two trials from the bucket
    from orchestrator.compare import compare_runs

    ids = sorted(c.info.run_id for c in children)
    paired = compare_runs(client.tracking_uri, ids)["paired"]
    assert paired["reference"] == ids[0] and set(paired["stats"]) == {ids[1]} and not paired["skipped"]
    out = tmp_path / "mtt.safetensors"
    mtt = next(c for c in children if c.data.tags["algorithm"] == "mtt")
    res = CliRunner().invoke(main, ["export", mtt.info.run_id, "-o", str(out), "--root", str(root)])
    assert res.exit_code == 0, res.output
    tensors, meta = read_synthetic(out)
    assert tensors["images"].shape == (10, 1, 8, 8) and meta["algorithm"] == "mtt"

    # launched again (in this process, on the session's Ray, whose workers have no S3 credentials:
    # any trial that ran again would fail): it resumes the finished sweep, nothing trained, run or
    # stored twice
    expert_key = experts[0]
    stamp = s3.client.head_object(Bucket="sweep", Key=expert_key)["LastModified"]
    ends = {c.info.run_id: c.info.end_time for c in children}
    t0 = time.time()
    second = CliRunner().invoke(main, ["launch", str(sweep.spec), "--root", str(root), "--storage", STORAGE],
                                catch_exceptions=False)
    print(f"second launch (resume) on S3: {time.time() - t0:.1f} s")
    assert second.exit_code == 0, second.output
    assert "(0 trained, 1 reused)" in second.output and "resuming sweep 'tiny-s3'" in second.output
    assert s3.client.head_object(Bucket="sweep", Key=expert_key)["LastModified"] == stamp
    _, parents2 = sweep_runs(root, "sweep")
    _, children2 = sweep_runs(root, "trial")
    assert [p.info.run_id for p in parents2] == [parents[0].info.run_id] and parents2[0].info.status == "FINISHED"
    assert {c.info.run_id: c.info.end_time for c in children2} == ends  # no trial ran again
    assert all(len(client.get_metric_history(c.info.run_id, "acc_mean")) == 1 for c in children2)
    again = keys(s3, "sweep")
    assert [k for k in again if k.endswith(".safetensors")] == [k for k in objects if k.endswith(".safetensors")]
    assert [k for k in again if k.startswith("runs/trajectories/")] == \
        [k for k in objects if k.startswith("runs/trajectories/")]

    # --fresh moves the sweep's Tune folder aside in the bucket (object by object) and starts over
    from orchestrator.progress import Progress
    from orchestrator.spec import load_spec
    from orchestrator.sweep import _prepare

    before = keys(s3, "sweep", "runs/tune/tiny-s3/")
    exp_dir, state = _prepare(load_spec(str(sweep.spec)), workspace(root, storage=STORAGE), True, Progress())
    assert exp_dir == f"{STORAGE}/tune/tiny-s3" and state is None
    assert keys(s3, "sweep", "runs/tune/tiny-s3/") == []
    moved = keys(s3, "sweep", "runs/tune/tiny-s3.replaced-")
    assert len(before) > 5 and [k.split("/", 3)[3] for k in moved] == [k.split("/", 3)[3] for k in before]
