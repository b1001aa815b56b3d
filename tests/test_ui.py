"""`orchestrate ui` serves the MLflow UI on the store, on 127.0.0.1 only; what MLflow's UI shows of
a sweep, checked in headless Chromium (the training view, the trials, the dataset)."""
import html
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp) of sockets listening on ``port``."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        p = Path(table)
        if not p.exists():
            continue
        for line in p.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.rsplit(":", 1)
            if state == "0A" and int(hexport, 16) == port:
                out.add(addr)
    return out


@contextmanager
def ui_server(root: Path):
    """``orchestrate ui --root root`` on a free port of 127.0.0.1, up (it answers); yields the port
    and the process. The server and its workers are stopped after."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--root", str(root),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        body = None
        while time.time() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    body = r.read().decode()
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()
                time.sleep(1)
        assert body is not None and "mlflow" in body.lower()
        yield port, proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the MLflow server and its workers
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow  # starts an MLflow server (seconds)
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp to see the bound address")
def test_ui_serves_the_store_on_loopback(tmp_path):
    with ui_server(tmp_path / "runs") as (port, _):
        assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1, nothing else
        assert (tmp_path / "runs" / "mlflow.db").exists()


# -- what the UI is given: the experiment kind, the dataset input, the runs' names ---------------------
def test_experiments_are_tagged_as_model_training_new_and_old(tmp_path):
    from mlflow import MlflowClient

    from orchestrator.tracking import EXPERIMENT_KIND_TAG, ensure_experiment, open_tracking_store, workspace

    ws = workspace(tmp_path / "runs")
    open_tracking_store(ws)
    client = MlflowClient(ws.tracking_uri)
    new = ensure_experiment(client, "new", ws.artifact_root)
    assert client.get_experiment(new).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    old = client.create_experiment("old")  # a store written before the tag: a launch or a resume tags it
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert ensure_experiment(client, "old", ws.artifact_root) == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    client.set_experiment_tag(old, EXPERIMENT_KIND_TAG, "finetuning")  # someone's own choice stays
    ensure_experiment(client, "old", ws.artifact_root)
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "finetuning"


def test_the_dataset_input_names_the_data_its_digest_and_its_source(tmp_path):
    from mlflow import MlflowClient

    from orchestrator.tracking import dataset_input, ensure_experiment, log_dataset, open_tracking_store, workspace

    digest = "ab" * 32
    digits = dataset_input({"name": "digits", "root": None}, digest)
    assert (digits.dataset.name, digits.dataset.digest, digits.dataset.source_type) == ("digits", "ab" * 8, "code")
    assert "sklearn digits" in digits.dataset.source
    assert [(t.key, t.value) for t in digits.tags] == [("mlflow.data.context", "training")]
    folder = dataset_input({"name": "MNIST", "root": str(tmp_path / "mnist")}, digest)
    assert (folder.dataset.name, folder.dataset.source_type) == ("MNIST", "local")
    assert str(tmp_path / "mnist") in folder.dataset.source

    ws = workspace(tmp_path / "runs")
    open_tracking_store(ws)
    client = MlflowClient(ws.tracking_uri)
    run = client.create_run(ensure_experiment(client, "e", ws.artifact_root)).info.run_id
    log_dataset(client, run, digits)
    log_dataset(client, run, digits)  # a restarted trial logs it again: still one input
    (logged,) = client.get_run(run).inputs.dataset_inputs
    assert (logged.dataset.name, logged.dataset.digest) == ("digits", "ab" * 8)


def test_run_names_tell_the_trials_of_a_sweep_apart():
    from orchestrator.trial import run_name

    spec = {"num_samples": 1, "algorithms": {"mtt": {"hyperparameters": {"lr_img": [30, 100], "syn_steps": 3,
                                                                         "lr_lr": {"loguniform": [1e-7, 1e-5]}},
                                                     "per_budget": {10: {"syn_steps": [10, 20]}}}}}
    point = {"algorithm": "mtt", "budget": 1, "hp": {"lr_img": 30, "syn_steps": 3, "lr_lr": 3.2123e-06}}
    assert run_name(point, spec, "abc_00003") == "mtt-ipc1 lr_img=30 lr_lr=3.21e-06"
    assert run_name({**point, "budget": 10, "hp": {**point["hp"], "syn_steps": 20}}, spec, "x") == \
        "mtt-ipc10 lr_img=30 syn_steps=20 lr_lr=3.21e-06"
    plain = {"num_samples": 1, "algorithms": {"mtt": {"hyperparameters": {"syn_steps": 3}, "per_budget": {}}}}
    assert run_name({"algorithm": "mtt", "budget": 1, "hp": {"syn_steps": 3}}, plain, "abc_00001") == "mtt-ipc1"
    assert run_name({"algorithm": "random", "budget": 1, "hp": {}}, {**plain, "num_samples": 3}, "abc_00004") == \
        "random-ipc1 #00004"
    # event sequences count their budget in sequences (mu), not images per class
    seqs = {**plain, "dataset": {"name": "ml-100k"}, "algorithms": {"farzi": {"hyperparameters": {}}}}
    assert run_name({"algorithm": "farzi", "budget": 50, "hp": {}}, seqs, "x") == "farzi-mu50"
    assert run_name({"algorithm": "random", "budget": 50, "hp": {}}, seqs, "x") == "random-mu50"
    assert run_name({"algorithm": "mtt", "budget": 1, "hp": {}}, {**plain, "dataset": {"name": "mnist"}}, "x") == "mtt-ipc1"


# -- the UI in a browser -----------------------------------------------------------------------------
CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def render(url: str, profile: Path, expect: list[str], attempts: int = 4) -> str:
    """The text of the page at ``url`` once headless Chromium ran its scripts (``--dump-dom``),
    tags and scripts removed; rendered again (with more time) until every string of ``expect`` is
    in it or the attempts are spent (the UI fetches its data after the first paint)."""
    text = ""
    for attempt in range(attempts):
        cmd = [CHROMIUM, "--headless", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
               f"--virtual-time-budget={15000 * (attempt + 1)}", "--dump-dom", url]
        if os.geteuid() == 0:
            cmd.insert(1, "--no-sandbox")  # Chromium refuses to sandbox itself as root
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        dom = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", out.stdout, flags=re.S)
        text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))
        if all(e in text for e in expect):
            break
    return text


@pytest.mark.slow  # a sweep on Ray, an MLflow server and a browser (about two minutes)
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium to render MLflow's UI (Debian/Ubuntu: apt-get install "
                                             "chromium; .ci/run installs it)")
def test_mlflow_ui_shows_the_training_runs_and_their_dataset(tmp_path, ray_cluster):
    from click.testing import CliRunner
    from mlflow import MlflowClient

    from orchestrator.cli import main
    from orchestrator.tracking import workspace

    from .conftest import tiny_spec

    spec, root = tmp_path / "tiny.yaml", tmp_path / "runs"
    spec.write_text(yaml.safe_dump(tiny_spec()))
    launched = CliRunner().invoke(main, ["launch", str(spec), "--root", str(root)], catch_exceptions=False)
    assert launched.exit_code == 0, launched.output
    client = MlflowClient(workspace(root).tracking_uri)
    exp = client.get_experiment_by_name("tiny")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    parent = next(n for n, r in runs.items() if r.data.tags["orchestrate.role"] == "sweep")
    assert sorted(n for n in runs if n != parent) == ["mtt-ipc1", "random-ipc1"]
    digest = runs[parent].data.tags["orchestrate.dataset_digest"][:16]
    dataset = f"digits ({digest})"

    with ui_server(root) as (port, _):
        base, profile = f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}", tmp_path / "chromium"
        ml = "workflowType=machine_learning"  # MLflow 3.17's switch between its GenAI and training views
        # the experiment's page lands on its runs, in the training view: not the GenAI overview
        # ("Traces 0") nor its evaluation runs
        landing = render(f"{base}?{ml}", profile, ["Model registry", parent])
        assert f"Runs - Experiment {exp.experiment_id} - MLflow" in landing, landing[:2000]
        assert "Model registry" in landing and "Traces 0" not in landing and "Evaluation runs" not in landing
        assert parent in landing and dataset in landing  # the Dataset column of the sweep's run
        # sorted by the trials' metric, the runs table lists the trials themselves (sorted by
        # creation, MLflow nests them under the sweep's run, folded)
        order = urllib.parse.quote("metrics.`acc_mean`")
        table = render(f"{base}/runs?{ml}&orderByKey={order}&orderByAsc=false", profile,
                       ["mtt-ipc1", "random-ipc1"])
        assert "Sort: acc_mean" in table and "Traces 0" not in table, table[:2000]
        for name in ("mtt-ipc1", "random-ipc1", parent):
            assert name in table, name
        assert table.count(f"{dataset} training") == 3, table[:3000]  # every run, with its context
        # a trial's own page: its dataset and its place (training runs, not evaluations)
        mtt = runs["mtt-ipc1"].info.run_id
        page = render(f"{base}/runs/{mtt}?{ml}", profile, ["Datasets"])
        assert f"Datasets {dataset} training" in page, page[:3000]
        assert f"Parent run {parent}" in page and "Evaluations" not in page
