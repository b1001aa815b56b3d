"""`orchestrate submit | status | logs` against a real cluster: `ray start --head` with its job
server (the dashboard, on 127.0.0.1), a tiny spec submitted as a Ray job, followed to the end."""
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.jobs import launch_entrypoint

from .conftest import TINY

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # `ray` and `orchestrate` of this environment

JOB_SPEC = {**TINY, "name": "tiny-job", "baselines": [], "experts": {**TINY["experts"], "count": 1},
            "algorithms": {"mtt": {**TINY["algorithms"]["mtt"], "iterations": 4}},
            "evaluation": {"networks": 1, "epochs": 5, "interval": 2}}
BAD_SPEC = {**TINY, "experts": {"count": 1, "epoch": 3}}


def orchestrate(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def test_entrypoint_quotes_paths_with_spaces():
    cmd = launch_entrypoint("my spec.yaml", "/data/my runs", "http://mlflow:5000", "s3://b/my runs", fresh=True)
    assert shlex.split(cmd) == ["orchestrate", "launch", "--address", "auto", "--root", "/data/my runs",
                                "--tracking-uri", "http://mlflow:5000", "--storage", "s3://b/my runs", "--fresh",
                                "--", "my spec.yaml"]
    assert shlex.split(launch_entrypoint("a'b;rm -x.yaml", "/r")) == [
        "orchestrate", "launch", "--address", "auto", "--root", "/r", "--", "a'b;rm -x.yaml"]


def test_submit_refuses_bad_input_before_contacting_any_cluster(tmp_path):
    """Nothing listens on the address: each error must come from the local checks (exit 2)."""
    nowhere = "http://127.0.0.1:9"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(BAD_SPEC))
    r = orchestrate("submit", bad, "--address", nowhere, "--root", "/srv/runs")
    assert r.exit_code == 2 and f"{bad}: experts.epoch" in r.stderr, r.output
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(JOB_SPEC))
    r = orchestrate("submit", good, "--address", nowhere, "--root", "runs")
    assert r.exit_code == 2 and "must be an absolute path on the cluster" in r.stderr, r.output
    r = orchestrate("submit", good, "--address", nowhere, "--root", "/srv/runs", "--tracking-uri",
                    "http://me:secret@mlflow:5000")
    assert r.exit_code == 2 and "holds a password" in r.stderr and "secret" not in r.output, r.output
    r = orchestrate("submit", good, "--address", nowhere, "--root", "/srv/runs", "--storage", "shared")
    assert r.exit_code == 2 and "--storage 'shared' must be a URI or an absolute path" in r.stderr, r.output
    r = orchestrate("submit", good, "--address", nowhere, "--root", "/srv/runs", env={"RAY_JOB_HEADERS": "{nope"})
    assert r.exit_code == 1 and "RAY_JOB_HEADERS is not JSON" in r.stderr, r.output
    # a start read from MLflow (init_from: runs:/...) is read where the spec is checked: here, from the
    # --tracking-uri the job logs to; without one (the job's SQLite store in --root, on the cluster) it
    # cannot be, and a password in the URI is refused before anything is read with it
    from_run = tmp_path / "from_run.yaml"
    algos = {name: {**a, "init_from": "runs:/0123abcd"} for name, a in JOB_SPEC["algorithms"].items()}
    from_run.write_text(yaml.safe_dump({**JOB_SPEC, "algorithms": algos}))
    r = orchestrate("submit", from_run, "--address", nowhere, "--root", "/srv/runs")
    assert r.exit_code == 2 and "runs:/0123abcd: a run's set is read from its MLflow tracking store, and none is " \
        "given here (--tracking-uri" in r.stderr, r.output
    r = orchestrate("submit", from_run, "--address", nowhere, "--root", "/srv/runs", "--tracking-uri",
                    "http://me:secret@127.0.0.1:9")
    assert r.exit_code == 2 and "holds a password" in r.stderr and "secret" not in r.output, r.output
    r = orchestrate("submit", good, "--address", nowhere, "--root", "/srv/runs")  # all well: now it connects
    assert r.exit_code == 1 and "cannot reach a Ray job server at http://127.0.0.1:9" in r.stderr, r.output


def test_num_cpus_with_a_cluster_address_is_a_clear_error():
    r = orchestrate("launch", "--address", "127.0.0.1:9", "--num-cpus", "2")
    assert r.exit_code == 2 and "--num-cpus 2 sizes a new local Ray" in r.stderr and "127.0.0.1:9" in r.stderr
    r = orchestrate("experts", "--num-cpus", "2", env={"RAY_ADDRESS": "10.0.0.1:6379"})
    assert r.exit_code == 2 and "RAY_ADDRESS" in r.stderr, r.output


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _group_alive(pgid):
    """Processes of group ``pgid`` that are not zombies."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


@pytest.fixture(scope="module")
def head():
    """`ray start --head` in a session of its own (every Ray process of it in one process group,
    stopped by that group's id: `ray stop` would stop every Ray on the machine), in a temporary
    folder of its own (short: Ray's socket paths must stay under 107 characters), every port
    free, dashboard and job server on 127.0.0.1, no token authentication."""
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    gcs, dashboard, client_server, agent = _free_ports(4)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
           "--ray-client-server-port", str(client_server), "--dashboard-agent-listen-port", str(agent),
           "--num-cpus", "2", "--num-gpus", "0", "--temp-dir", temp, "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"ray start failed:\n{out[-4000:]}"
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        proc.kill()
        for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            if not _group_alive(proc.pid):
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.time() + wait_s
            while _group_alive(proc.pid) and time.time() < deadline:
                time.sleep(0.5)
        shutil.rmtree(temp, ignore_errors=True)
        assert not _group_alive(proc.pid), "Ray processes of the test cluster outlived their SIGKILL"


def _wait_terminal(url, job, deadline_s=420):
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        r = orchestrate("status", job, "--address", url)
        assert r.exit_code == 0, r.output
        state = dict(line.split(None, 1) for line in r.stdout.splitlines() if line.strip())["status"]
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            return state
        time.sleep(2)
    raise AssertionError(f"job {job} did not end in {deadline_s} s")


@pytest.mark.slow
def test_a_submitted_launch_runs_on_the_cluster_and_is_followed_by_status_and_logs(head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head)
    spec, root = tmp_path / "my spec.yaml", tmp_path / "runs dir"
    spec.write_text(yaml.safe_dump(JOB_SPEC))

    r = orchestrate("submit", spec, "--address", head, "--root", root)
    assert r.exit_code == 0, r.output
    job = r.stdout.strip()
    assert job.startswith("raysubmit_") and f"orchestrate logs {job} --follow" in r.stderr
    info = client.get_job_info(job)
    assert info.metadata["orchestrate.spec"] == "tiny-job" and info.runtime_env["working_dir"].startswith("gcs://")
    assert shlex.split(info.entrypoint) == ["orchestrate", "launch", "--address", "auto", "--root", str(root),
                                            "--", "my spec.yaml"]
    # the same sweep again while it runs: refused, nothing submitted
    again = orchestrate("submit", spec, "--address", head, "--root", root)
    assert again.exit_code == 1 and f"job {job}" in again.stderr and "already running" in again.stderr, again.output
    assert [j.submission_id for j in client.list_jobs()] == [job]
    # a bad spec: exit 2, nothing submitted
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(BAD_SPEC))
    r = orchestrate("submit", bad, "--address", head, "--root", root)
    assert r.exit_code == 2 and "experts.epoch" in r.stderr and len(client.list_jobs()) == 1, r.output

    state = _wait_terminal(head, job)
    logs = orchestrate("logs", job, "--follow", "--address", head)  # ended: the whole log, then exit 0
    assert state == "SUCCEEDED", logs.output[-5000:]
    assert logs.exit_code == 0 and "tiny-job: digits" in logs.stdout and "results are in MLflow" in logs.stdout
    plain = orchestrate("logs", job, "--address", head)
    assert plain.exit_code == 0 and "tiny-job: digits" in plain.stdout and "Running entrypoint" in plain.stdout

    res = orchestrate("results", "--root", root, "--format", "json")
    rows = json.loads(res.stdout)
    assert [(r["algorithm"], r["budget"], r["status"]) for r in rows] == [("mtt", 1, "FINISHED")]
    assert 0 < rows[0]["acc_mean"] <= 1 and rows[0]["full_data_acc_mean"] > 0.5  # the expert trained on digits

    listing = orchestrate("status", "--address", head)
    assert listing.exit_code == 0 and job in listing.stdout and "tiny-job" in listing.stdout
    assert "SUCCEEDED" in listing.stdout

    for cmd in ("status", "logs"):
        r = orchestrate(cmd, "raysubmit_nope", "--address", head)
        assert r.exit_code == 1 and "no job 'raysubmit_nope' on the Ray cluster" in r.stderr, r.output
