"""Hardening of the command line (issue "Hardening from an adversarial pass", items 12-16):
`export -o` targets, `results --sweep` input, a local Ray on loopback only, trust in Tune's
pickles on resume, option injection through `submit`'s entrypoint.

The MLflow store is built by hand (a sweep run, a trial run with a synthetic set), not by a sweep."""
import grp
import json
import os
import pickle
import select
import shlex
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from algorithms.base import SyntheticSet
from orchestrator import resume as resume_mod
from orchestrator import sweep as sweep_mod
from orchestrator.artifacts import read_synthetic, save_synthetic
from orchestrator.cli import launch as launch_cmd
from orchestrator.cli import main
from orchestrator.datasets import dataset_info
from orchestrator.progress import Progress
from orchestrator.spec import SpecError, validate
from orchestrator.tracking import PARENT_TAG, ROLE_TAG, ensure_experiment, workspace

from .test_e2e import TINY

REPO = Path(__file__).resolve().parents[1]


def orchestrate(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with one sweep (parent run) and one trial holding a synthetic set: (root, parent id,
    trial id, the artifact's bytes)."""
    root = tmp_path_factory.mktemp("hardening") / "runs"
    ws = workspace(root)
    client = MlflowClient(ws.tracking_uri)
    exp = ensure_experiment(client, "hard", ws.artifact_root)
    parent = client.create_run(exp, run_name="hard-sweep", tags={ROLE_TAG: "sweep", "dataset": "digits"}).info.run_id
    trial = client.create_run(exp, run_name="mtt-1", tags={ROLE_TAG: "trial", PARENT_TAG: parent, "algorithm": "mtt",
                                                           "dataset": "digits", "budget": "1"}).info.run_id
    client.log_metric(trial, "acc_mean", 0.5)
    client.set_terminated(trial, "FINISHED")
    syn = SyntheticSet(torch.randn(10, 1, 8, 8), torch.arange(10), 0.01)
    f = save_synthetic(root.parent / "synthetic.safetensors", syn, dataset_info("digits"), "mtt")
    client.log_artifact(trial, str(f), "synthetic")
    client.set_terminated(parent, "FINISHED")
    return root, parent, trial, f.read_bytes()


# -- 12. export -o ------------------------------------------------------------------------------


def test_export_writes_a_new_file_and_refuses_an_existing_one_unless_forced(store, tmp_path):
    root, _, trial, data = store
    out = tmp_path / "sub" / "set.safetensors"
    r = orchestrate("export", trial, "-o", out, "--root", root)
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == data and f"wrote {out}" in r.stdout
    assert read_synthetic(out)[1]["algorithm"] == "mtt"

    out.write_bytes(b"keep me")
    r = orchestrate("export", trial, "-o", out, "--root", root)
    assert r.exit_code == 2 and f"-o {out}: the file exists; add --force" in r.stderr, r.output
    assert out.read_bytes() == b"keep me"
    r = orchestrate("export", trial, "-o", out, "--root", root, "--force")
    assert r.exit_code == 0 and out.read_bytes() == data, r.output
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_export_never_replaces_a_link_a_pipe_or_a_device(store, tmp_path):
    root, _, trial, _ = store
    pointee = tmp_path / "pointee"
    pointee.write_bytes(b"original")
    link = tmp_path / "link.safetensors"
    link.symlink_to(pointee)
    dangling = tmp_path / "dangling.safetensors"
    dangling.symlink_to(tmp_path / "nowhere")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    targets = {link: "symbolic link", dangling: "symbolic link", fifo: "named pipe"}
    try:  # a device node like /dev/null (needs CAP_MKNOD); never /dev/null itself
        dev = tmp_path / "null"
        os.mknod(dev, stat.S_IFCHR | 0o600, os.makedev(1, 3))
        targets[dev] = "character device"
    except (PermissionError, OSError):
        dev = None
    for target, kind in targets.items():
        for force in ((), ("--force",)):
            r = orchestrate("export", trial, "-o", target, "--root", root, *force)
            assert r.exit_code == 2, (target, force, r.output)
            assert f"-o {target}: it is a {kind}" in r.stderr and "-o -" in r.stderr, r.output
    assert link.is_symlink() and pointee.read_bytes() == b"original"
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    if dev is not None:
        assert stat.S_ISCHR(os.lstat(dev).st_mode)
    r = orchestrate("export", trial, "-o", tmp_path, "--root", root, "--force")  # a folder: click refuses it
    assert r.exit_code == 2 and tmp_path.is_dir()


def test_export_to_stdout_streams_the_bytes_and_reports_on_stderr(store, tmp_path, monkeypatch):
    root, _, trial, data = store
    monkeypatch.chdir(tmp_path)  # the old code wrote a file named '-' here
    r = CliRunner().invoke(main, ["export", trial, "-o", "-", "--root", str(root)])
    assert r.exit_code == 0, r.output
    assert r.stdout_bytes == data
    assert "wrote stdout: images (10, 1, 8, 8)" in r.stderr and "dataset digits" in r.stderr
    assert not (tmp_path / "-").exists()


# -- 13. results --sweep ------------------------------------------------------------------------


def test_results_refuses_sweep_with_all_and_a_trial_id_as_sweep(store):
    root, parent, trial, _ = store
    r = orchestrate("results", "--root", root, "--sweep", "bogus", "--all")
    assert r.exit_code == 2 and "--sweep bogus and --all" in r.stderr, r.output
    r = orchestrate("results", "--root", root, "--sweep", trial, "--format", "json")
    assert r.exit_code == 1, r.output
    assert f"run {trial} is a trial of sweep {parent}, not a sweep: use --sweep {parent}" in r.stderr
    assert r.stdout == ""
    r = orchestrate("results", "--root", root, "--sweep", "0" * 32)
    assert r.exit_code == 1 and f"no run {'0' * 32}" in r.stderr, r.output
    r = orchestrate("results", "--root", root, "--sweep", parent, "--experiment", "other")
    assert r.exit_code == 1 and f"sweep {parent} is in experiment 'hard', not 'other'" in r.stderr, r.output
    # the right id, and --all alone, still work
    r = orchestrate("results", "--root", root, "--sweep", parent, "--format", "json")
    assert r.exit_code == 0 and [x["run_id"] for x in json.loads(r.stdout)] == [trial], r.output
    r = orchestrate("results", "--root", root, "--all", "--format", "json")
    assert r.exit_code == 0 and [x["run_id"] for x in json.loads(r.stdout)] == [trial], r.output


def test_results_names_a_run_that_is_neither_sweep_nor_trial(store):
    root, _, _, _ = store
    client = MlflowClient(workspace(root).tracking_uri)
    other = client.create_run(client.get_experiment_by_name("hard").experiment_id, run_name="by hand").info.run_id
    r = orchestrate("results", "--root", root, "--sweep", other)
    assert r.exit_code == 1 and f"run {other} is not a sweep: its tag orchestrate.role is missing" in r.stderr


# -- 15. Tune's pickles on resume ---------------------------------------------------------------


class _Boom:
    """Unpickling this writes a marker file: what a crafted tuner.pkl could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path(self.marker).write_text, ("pwned",))


def _planted_sweep(tmp_path, name="trust"):
    """A workspace whose Tune folder holds a resumable sweep of a tiny spec, with a crafted tuner.pkl."""
    spec = validate({**TINY, "name": name}, str(tmp_path / f"{name}.yaml"))
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**TINY, "name": name}))
    ws = workspace(tmp_path / "runs")
    exp_dir = Path(sweep_mod.sweep_dir(spec, ws))
    exp_dir.mkdir(parents=True)
    (exp_dir / sweep_mod.SIDECAR).write_text(json.dumps({"parent_run_id": "0" * 32, "experiment_id": "1",
                                                         "spec_hash": spec.hash, "spec_path": spec.path}))
    marker = tmp_path / "marker"
    (exp_dir / "tuner.pkl").write_bytes(pickle.dumps(_Boom(marker)))
    return spec, ws, exp_dir, marker


def test_resume_refuses_a_tune_folder_that_others_can_write(tmp_path):
    spec, ws, exp_dir, marker = _planted_sweep(tmp_path)
    pkl = exp_dir / "tuner.pkl"
    for path, mode, what in ((pkl, 0o666, "writable by others (mode 0666)"),
                             (exp_dir, 0o757, "writable by others (mode 0757)"),
                             (exp_dir.parent, 0o777, "writable by others (mode 0777)")):
        before = stat.S_IMODE(path.stat().st_mode)
        path.chmod(mode)
        with pytest.raises(SpecError) as e:
            sweep_mod._prepare(spec, ws, False, Progress())
        assert isinstance(e.value, sweep_mod.ResumeTrustError)
        msg = str(e.value)
        assert f"refusing to resume the sweep in {exp_dir}" in msg and f"{path}: {what}" in msg, msg
        assert "unpickling" in msg and "--fresh" in msg and f"chmod -R go-w {exp_dir}; chmod go-w {exp_dir.parent}" in msg
        path.chmod(before)
    # the owner's files, writable by the owner only: resumed (Tune's state exists)
    exp, resume = sweep_mod._prepare(spec, ws, False, Progress())
    assert exp == exp_dir and resume["tune_state"] is True and resume["parent_run_id"] == "0" * 32
    assert not marker.exists()  # the check itself never reads the pickle


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user or group needs root")
def test_resume_refuses_files_of_another_user_or_a_shared_group(tmp_path):
    spec, ws, exp_dir, _ = _planted_sweep(tmp_path)
    pkl = exp_dir / "tuner.pkl"
    os.chown(pkl, 54321, -1)
    with pytest.raises(sweep_mod.ResumeTrustError, match=rf"{pkl}: owned by uid 54321"):
        sweep_mod.check_resume_trust(exp_dir)
    os.chown(pkl, 0, -1)
    shared = next((g.gr_gid for g in grp.getgrall() if not resume_mod._private_group(g.gr_gid, 0)), None)
    if shared is None:
        pytest.skip("no group here that has other members than root")
    os.chown(pkl, -1, shared)
    pkl.chmod(0o664)
    with pytest.raises(sweep_mod.ResumeTrustError, match="writable by group"):
        sweep_mod.check_resume_trust(exp_dir)
    pkl.chmod(0o644)
    sweep_mod.check_resume_trust(exp_dir)


def test_launch_with_an_untrusted_tune_folder_exits_2_before_tune_reads_it(tmp_path, monkeypatch):
    """Through the command line, before Ray starts (its start fails the test)."""
    spec, ws, exp_dir, marker = _planted_sweep(tmp_path)
    (exp_dir / "tuner.pkl").chmod(0o666)

    @contextmanager
    def no_ray(*a, **k):
        raise AssertionError("Ray started before the Tune folder was checked")
        yield

    monkeypatch.setattr(sweep_mod, "ray_session", no_ray)
    r = orchestrate("launch", spec.path, "--root", ws.root)
    assert r.exit_code == 2, r.output
    assert f"{exp_dir / 'tuner.pkl'}: writable by others" in r.stderr and not marker.exists()


def test_a_new_root_is_private_and_an_existing_one_keeps_its_mode(tmp_path):
    root = tmp_path / "a" / "runs"
    workspace(root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    workspace(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755


# -- 16. submit's entrypoint --------------------------------------------------------------------


class _FakeJobs:
    def __init__(self):
        self.submitted = []

    def list_jobs(self):
        return []

    def submit_job(self, entrypoint, runtime_env, metadata):
        self.submitted.append(entrypoint)
        return "raysubmit_fake"

    def get_address(self):
        return "http://fake:8265"


@pytest.mark.parametrize("name", ["--fresh", "--help", "-h", "-"])
def test_submit_passes_a_spec_named_like_an_option_as_a_file(tmp_path, monkeypatch, name):
    from orchestrator import jobs

    spec = tmp_path / name
    spec.write_text(yaml.safe_dump({**TINY, "name": "inject"}))
    fake = _FakeJobs()
    monkeypatch.setattr(jobs, "job_client", lambda address: fake)
    r = orchestrate("submit", spec, "--root", "/srv/runs", "--tracking-uri", "-x")
    assert r.exit_code == 0, r.output
    words = shlex.split(fake.submitted[0])
    assert words[:2] == ["orchestrate", "launch"]
    ctx = launch_cmd.make_context("launch", words[2:])  # how the job's `orchestrate launch` reads it
    assert ctx.params["spec"] == name and ctx.params["fresh"] is False
    assert ctx.params["root"] == "/srv/runs" and ctx.params["tracking_uri"] == "-x"
    assert ctx.params["address"] == "auto"


# -- 14. a local Ray listens on loopback only ---------------------------------------------------


def test_ray_session_local_vs_cluster_settings(monkeypatch):
    """Without a cluster address Ray starts on 127.0.0.1 with clusters off (undone afterwards);
    joining a cluster with --address keeps Ray's own settings."""
    import ray
    from ray._private import ray_constants

    calls = []

    def fake_init(**kwargs):
        calls.append((kwargs, os.environ.get(sweep_mod.LOCAL_ONLY_ENV), ray_constants.ENABLE_RAY_CLUSTER))

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(sweep_mod.LOCAL_ONLY_ENV, raising=False)
    before = ray_constants.ENABLE_RAY_CLUSTER
    with sweep_mod.ray_session(None, 1):
        pass
    kwargs, env, enabled = calls[-1]
    assert kwargs["address"] == "local" and kwargs["_node_ip_address"] == "127.0.0.1"
    assert env == "0" and enabled is False
    assert sweep_mod.LOCAL_ONLY_ENV not in os.environ and ray_constants.ENABLE_RAY_CLUSTER == before
    with sweep_mod.ray_session("10.0.0.1:6379"):
        pass
    kwargs, env, enabled = calls[-1]
    assert kwargs == {"address": "10.0.0.1:6379", "log_to_driver": False} and env is None and enabled == before


def _children(pid):
    kids = {}
    for st in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = st.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(st.parent.name))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo += kids.get(p, [])
    return out


def _listening_sockets(pids):
    """(address as in /proc/net/tcp*, port, process name) of the TCP sockets that ``pids`` listen on."""
    inodes = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A":
                addr, port = f[1].rsplit(":", 1)
                inodes[f"socket:[{f[9]}]"] = (addr, int(port, 16))
    out = set()
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link in inodes:
                out.add((*inodes[link], name))
    return out


LOOPBACK_HEX = {"0100007F",  # 127.0.0.1
                "0000000000000000FFFF00000100007F",  # ::ffff:127.0.0.1 (an IPv6 socket bound to 127.0.0.1)
                "00000000000000000000000001000000"}  # ::1

DRIVER = """
import os, sys, ray
from orchestrator.sweep import ray_session

def pid():
    return os.getpid()

with ray_session(None, 1):
    ray.get([ray.remote(pid).remote() for _ in range(2)])
    print("READY", flush=True)
    sys.stdin.readline()
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp to see the bound address")
def test_a_local_ray_listens_on_loopback_only(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=open(tmp_path / "driver.err", "wb"), text=True, env=env, start_new_session=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 300)  # the driver is up (or has exited)
        line = proc.stdout.readline() if ready else ""
        assert line.strip() == "READY", (tmp_path / "driver.err").read_text()[-4000:]
        time.sleep(2)  # agents that bind after the first tasks ran
        socks = _listening_sockets(_children(proc.pid))
        names = {n for _, _, n in socks}
        assert {"gcs_server", "raylet"} <= names, socks
        exposed = sorted((a, p, n) for a, p, n in socks if a not in LOOPBACK_HEX)
        assert not exposed, f"listening beyond loopback: {exposed}"
    finally:
        try:
            proc.stdin.close()  # the driver shuts Ray down
            proc.wait(timeout=60)
        except (subprocess.TimeoutExpired, OSError):
            os.killpg(proc.pid, 9)
