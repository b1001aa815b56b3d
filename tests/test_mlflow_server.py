"""A real MLflow tracking server: PostgreSQL (the distribution's, started here on 127.0.0.1 in a
temporary folder) as its backend store, proxied artifacts in a temporary folder, and a small sweep
whose trials log to it at the same time through http only (they never see the database's password
nor the artifact folder). Skipped, with the reason, where PostgreSQL is not installed
(``.ci/run`` installs it with apt-get when it can)."""
from __future__ import annotations

import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from orchestrator.cli import main

from .conftest import TINY

REPO = Path(__file__).resolve().parents[1]
DB_USER = "orchestrate_test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path | None:
    """The folder of ``initdb``/``pg_ctl``: the one on PATH, else Debian's newest
    ``/usr/lib/postgresql/<major>/bin`` (the package does not put them on PATH)."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                  key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(dirs[-1]).parent if dirs else None


def _as_user() -> tuple[list[str], int | None, int | None]:
    """PostgreSQL refuses to run as root: as root, run it as the ``postgres`` system user (the
    Debian package creates it); otherwise as ourselves. Returns the command prefix and the
    uid/gid that must own its files (None: ours)."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
    if shutil.which("runuser"):
        prefix = ["runuser", "-u", "postgres", "--"]
    elif shutil.which("setpriv"):
        prefix = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--"]
    else:
        pytest.skip("running as root and neither runuser nor setpriv is there to drop to the 'postgres' user")
    return prefix, pw.pw_uid, pw.pw_gid


@pytest.fixture(scope="session")
def postgres():
    """A throw-away PostgreSQL on 127.0.0.1 (TCP on a free port, its unix socket in its own
    folder), password authentication (scram) for a random password, fsync off. Yields
    ``(port, user, password)`` with a database ``mlflow``; stopped and deleted afterwards."""
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2-binary (the 'test' extra) is not installed")
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb on PATH nor in /usr/lib/postgresql/*/bin); "
                    ".ci/run installs it with apt-get install postgresql")
    prefix, uid, gid = _as_user()
    # not under pytest's (0700) tmp folders: the postgres user must reach it
    base = Path(tempfile.mkdtemp(prefix="orchestrate-pg-", dir="/tmp" if uid is not None else None))
    password = secrets.token_hex(16)
    pwfile = base / "pw"
    pwfile.write_text(password + "\n")
    if uid is not None:
        for p in (base, pwfile):
            os.chown(p, uid, gid)
    data, port = base / "data", free_port()
    run = dict(cwd=base, capture_output=True, text=True, timeout=180)
    started = False
    try:
        r = subprocess.run(prefix + [str(bindir / "initdb"), "-D", str(data), "-U", DB_USER, "--pwfile", str(pwfile),
                                     "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"], **run)
        assert r.returncode == 0, f"initdb failed: {r.stdout[-2000:]}{r.stderr[-2000:]}"
        pwfile.unlink()
        opts = (f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off -c synchronous_commit=off "
                f"-c full_page_writes=off")
        r = subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "postgres.log"),
                                     "-o", opts, "-w", "-t", "120", "start"], **run)
        started = True
        assert r.returncode == 0, f"pg_ctl start failed: {r.stdout[-2000:]}{r.stderr[-2000:]}\n" + \
            (base / "postgres.log").read_text(errors="replace")[-3000:]
        conn = psycopg2.connect(host="127.0.0.1", port=port, user=DB_USER, password=password, dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE mlflow")
        conn.close()
        yield port, DB_USER, password
    finally:
        if started:
            subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           cwd=base, capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(postgres, tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 with the PostgreSQL above as its backend store and proxied
    artifacts (``--serve-artifacts``) in a temporary folder. The database password reaches it
    through ``PGPASSWORD`` (libpq), not its command line; the URI names the driver
    (``+psycopg2``) because SQLAlchemy 2.1 defaults ``postgresql://`` to psycopg 3.
    Yields ``(url, artifacts_dir, db)``, ``db`` being psycopg2's connection arguments."""
    port_db, user, password = postgres
    artifacts = tmp_path_factory.mktemp("mlflow-server") / "artifacts"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PGPASSWORD=password, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no GenAI job runner
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--backend-store-uri", f"postgresql+psycopg2://{user}@127.0.0.1:{port_db}/mlflow",
           "--serve-artifacts", "--artifacts-destination", artifacts.as_uri(),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
    log = tmp_path_factory.mktemp("mlflow-server-log") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, ok = time.time() + 180, False
        while time.time() < deadline and not ok:
            assert proc.poll() is None, "mlflow server exited:\n" + log.read_text(errors="replace")[-4000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    ok = r.status == 200
            except OSError:
                time.sleep(0.5)
        assert ok, "mlflow server did not answer /health in 180 s:\n" + log.read_text(errors="replace")[-4000:]
        yield url, artifacts, {"host": "127.0.0.1", "port": port_db, "user": user, "password": password,
                               "dbname": "mlflow"}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn workers
            proc.wait(timeout=30)
        except ProcessLookupError:  # it had exited already
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


SERVER_SPEC = {**TINY, "name": "tiny-server",
               "experts": {**TINY["experts"], "count": 1},
               "algorithms": {"mtt": {**TINY["algorithms"]["mtt"], "budgets": [1, 2], "iterations": 4}},
               "evaluation": {"networks": 1, "epochs": 5, "interval": 0},  # the final evaluation only
               "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 2}}


@pytest.mark.slow
def test_a_sweep_logs_through_a_tracking_server_backed_by_postgresql(mlflow_server, tmp_path):
    import psycopg2
    from mlflow import MlflowClient

    url, artifacts, db = mlflow_server
    spec = tmp_path / "server.yaml"
    spec.write_text(yaml.safe_dump(SERVER_SPEC))
    # the sweep knows the server's URL only: no database password, no artifact folder
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PG")) and k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    cli = [sys.executable, "-m", "orchestrator.cli"]
    res = subprocess.run(cli + ["launch", str(spec), "--tracking-uri", url, "--root", str(tmp_path / "runs"),
                                "--num-cpus", "2"], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-4000:]
    assert f"results are in MLflow at {url}" in res.stdout and f"a browser at {url}" in res.stdout

    client = MlflowClient(url)
    exp = client.get_experiment_by_name("tiny-server")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # the server's proxied store
    parents = client.search_runs([exp.experiment_id], "tags.`orchestrate.role` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], "tags.`orchestrate.role` = 'trial'")
    # every trial of the spec exactly once: 2 distillations and their 2 baselines
    assert sorted((c.data.tags["algorithm"], c.data.tags["budget"]) for c in children) == [
        ("mtt", "1"), ("mtt", "2"), ("random", "1"), ("random", "2")]
    # two trials at a time (max_concurrent_trials: 2) opened, logged to and closed their runs
    events = sorted([(c.info.start_time, 1) for c in children] + [(c.info.end_time, -1) for c in children])
    open_at_once = max(sum(e for _, e in events[:i + 1]) for i in range(len(events)))
    assert open_at_once == 2
    mtt = [c for c in children if c.data.tags["algorithm"] == "mtt"]
    for c in children:
        assert c.info.status == "FINISHED" and c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert 0 < c.data.metrics["acc_mean"] <= 1
        assert c.info.artifact_uri.startswith("mlflow-artifacts:")
    for c in mtt:
        assert sorted(m.step for m in client.get_metric_history(c.info.run_id, "loss")) == [1, 2, 3, 4]
    # artifacts come back through the server; they live in its --artifacts-destination
    from orchestrator.artifacts import read_synthetic

    for c in children:
        local = client.download_artifacts(c.info.run_id, "synthetic/synthetic.safetensors", str(tmp_path))
        tensors, meta = read_synthetic(local)
        budget = int(c.data.tags["budget"])
        assert tensors["images"].shape == (10 * budget, 1, 8, 8) and meta["run_id"] == c.info.run_id
        stored = list(artifacts.rglob(f"{c.info.run_id}/artifacts/synthetic/synthetic.safetensors"))
        assert len(stored) == 1 and stored[0].read_bytes() == Path(local).read_bytes()
    summary = [a.path for a in client.list_artifacts(parents[0].info.run_id, "summary")]
    assert sorted(summary) == ["summary/accuracy_vs_budget.png", "summary/results.csv"]

    # orchestrate results reads them from the server
    out = CliRunner().invoke(main, ["results", "--tracking-uri", url, "--format", "json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    assert sorted(r["run_id"] for r in rows) == sorted(c.info.run_id for c in children)
    by_id = {c.info.run_id: c for c in children}
    for r in rows:
        assert r["acc_mean"] == pytest.approx(by_id[r["run_id"]].data.metrics["acc_mean"])
        assert r["random_acc_mean"] is not None and r["full_data_acc_mean"] > 0.3

    # and the runs really are in PostgreSQL
    conn = psycopg2.connect(**db)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM runs WHERE experiment_id = %s", (int(exp.experiment_id),))
            assert cur.fetchone()[0] == 5  # the sweep's parent and its 4 trials
            cur.execute("SELECT count(DISTINCT run_uuid) FROM metrics WHERE key = 'acc_mean'")
            assert cur.fetchone()[0] == 4
    finally:
        conn.close()


@pytest.mark.slow
def test_a_database_uri_keeps_artifacts_in_the_root_and_ui_refuses_a_server(postgres, tmp_path, monkeypatch):
    """``--tracking-uri postgresql+psycopg2://...`` (no server): this process opens the database
    (the password from ``PGPASSWORD``) and the artifacts go to ``<root>/artifacts``, as with
    SQLite; ``orchestrate ui`` serves such a store but refuses a tracking server's URL."""
    from mlflow import MlflowClient

    from orchestrator.tracking import RunLogger, ensure_experiment, workspace

    port, user, password = postgres
    monkeypatch.setenv("PGPASSWORD", password)
    ws = workspace(tmp_path / "runs", f"postgresql+psycopg2://{user}@127.0.0.1:{port}/mlflow")
    assert ws.is_local and ws.artifact_root == (tmp_path / "runs" / "artifacts").as_uri()
    client = MlflowClient(ws.tracking_uri)
    exp_id = ensure_experiment(client, "direct-db", ws.artifact_root)
    assert ensure_experiment(client, "direct-db", ws.artifact_root) == exp_id  # found, not created twice
    run = client.create_run(exp_id)
    f = tmp_path / "note.txt"
    f.write_text("hello")
    RunLogger(ws.tracking_uri, run.info.run_id).artifact(f, "notes")
    stored = tmp_path / "runs" / "artifacts" / "direct-db" / run.info.run_id / "artifacts" / "notes" / "note.txt"
    assert stored.read_text() == "hello"

    server = workspace(tmp_path / "runs", "http://127.0.0.1:9")
    assert not server.is_local and server.artifact_root is None
    res = CliRunner().invoke(main, ["ui", "--tracking-uri", "http://127.0.0.1:9"])
    assert res.exit_code == 1 and "open it in a browser" in res.output
