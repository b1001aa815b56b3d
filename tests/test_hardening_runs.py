"""Hardening of `orchestrate launch` / `experts` (issue "Hardening from an adversarial pass",
items 4, 5, 7-11): what cannot work is refused before Ray starts and names the file or folder,
two launches of one sweep are kept apart, and Ctrl-C ends a launch in any phase with exit 130.

The fast tests replace ``ray_session`` by one that fails the test: they show that the launch
stopped before Ray would have started."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import yaml
from click.testing import CliRunner

from orchestrator import locks
from orchestrator.cli import main
from orchestrator.spec import validate
from orchestrator.store import atomic_write_bytes

from .conftest import TINY

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_ray(monkeypatch):
    """Ray must not start: ``ray_session`` fails the test if it is reached."""
    calls = []

    @contextmanager
    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("Ray was started")
        yield  # pragma: no cover

    monkeypatch.setattr("orchestrator.sweep.ray_session", refuse)
    return calls


def write_spec(tmp_path, **changes):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# -- item 10: a store that cannot be written ------------------------------------------------------
def test_a_failed_atomic_write_raises_its_own_error_not_the_cleanup_one(tmp_path):
    """The temporary file was never created (the folder is read-only): removing it in the
    ``finally`` block fails too, and that second error must not replace the first."""
    real_open = open

    def no_create(path, *a, **k):
        if ".tmp-" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    with mock.patch("builtins.open", no_create), \
            mock.patch("pathlib.Path.unlink", side_effect=PermissionError(13, "unlink refused")):
        with pytest.raises(PermissionError) as e:
            atomic_write_bytes(tmp_path / "x.json", b"{}")
    assert e.value.strerror == "Permission denied" and ".tmp-" in e.value.filename


def test_a_file_in_place_of_the_trajectory_folder_stops_the_launch_before_ray(tmp_path, no_ray):
    root = tmp_path / "runs"
    root.mkdir()
    (root / "trajectories").write_text("not a folder")
    res = invoke("launch", write_spec(tmp_path), "--root", root)
    assert res.exit_code == 2, res.output
    assert f"{root / 'trajectories'}: cannot write there" in res.output and "trajectories/" in res.output
    assert not no_ray and not (root / "tune").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="runs as root: chmod does not stop root from writing")
@pytest.mark.parametrize("command", ["launch", "experts"])
def test_a_read_only_store_is_named_before_ray_starts(tmp_path, no_ray, command):
    root = tmp_path / "runs"
    (root / "trajectories").mkdir(parents=True)
    (root / "trajectories").chmod(0o555)
    try:
        res = invoke(command, write_spec(tmp_path), "--root", root)
    finally:
        (root / "trajectories").chmod(0o755)
    assert res.exit_code == 2, res.output
    assert f"{root / 'trajectories'}: cannot write there (Permission denied)" in res.output
    assert not no_ray


# -- item 9: a corrupt mlflow.db ------------------------------------------------------------------
def test_a_corrupt_tracking_database_is_named_before_ray_starts(tmp_path, no_ray):
    root = tmp_path / "runs"
    root.mkdir()
    db = root / "mlflow.db"
    db.write_bytes(os.urandom(8192))
    res = invoke("launch", write_spec(tmp_path), "--root", root)
    assert res.exit_code == 2, res.output
    assert f"{db}: the MLflow tracking database cannot be read" in res.output and "Traceback" not in res.output
    assert not no_ray and not (root / "tune").exists() and not (root / "trajectories").exists()
    res = invoke("results", "--root", root)  # reading it says the same
    assert res.exit_code == 2 and f"{db}: the MLflow tracking database cannot be read" in res.output


def test_an_sqlite_file_that_is_not_mlflows_is_named(tmp_path):
    import sqlite3

    from orchestrator.tracking import TrackingStoreError, check_tracking_store

    db = tmp_path / "mlflow.db"
    sqlite3.connect(db).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(TrackingStoreError, match="not an MLflow tracking database"):
        check_tracking_store(f"sqlite:///{db}")
    check_tracking_store(f"sqlite:///{tmp_path / 'absent.db'}")  # MLflow creates a missing one
    check_tracking_store("http://127.0.0.1:5000")  # a server is MLflow's business


@pytest.mark.slow  # 4-7 s (subprocesses or training): kept out of the inner loop
def test_a_schema_half_made_by_another_launch_is_waited_for_not_called_corrupt(tmp_path):
    """Two new launches in one root: the second checks the database under the lock the first holds
    while MLflow creates the schema (found in CI: it judged the half-made file "not MLflow's")."""
    import sqlite3
    import threading

    from orchestrator import cli
    from orchestrator.tracking import sqlite_file, workspace

    ws = workspace(tmp_path / "runs")
    spec = validate(dict(TINY), "tiny.yaml")
    db = sqlite_file(ws.tracking_uri)
    sqlite3.connect(db).execute("CREATE TABLE experiments (x)").connection.commit()  # the first launch, half way
    outcome = []

    def second():  # the checks of a launch before Ray starts
        try:
            cli._before_ray(spec, ws, tracking=True)
            outcome.append("ok")
        except BaseException as e:  # noqa: BLE001 - SystemExit from the CLI's error path included
            outcome.append(e)

    with locks.hold(ws.root / "locks" / "mlflow-db.lock", "the first launch's schema creation"):
        t = threading.Thread(target=second)
        t.start()
        t.join(3.0)
        assert t.is_alive() and outcome == []  # waiting for the lock, not judging the half-made file
        db.unlink()  # the first launch ends (here: it leaves MLflow to make the schema afresh)
    t.join(60)
    assert outcome == ["ok"]


# -- item 8: mlflow.db deleted under a sweep -------------------------------------------------------
def _sidecar(root, spec_path, run_id="0" * 32):
    spec = validate(yaml.safe_load(spec_path.read_text()), str(spec_path))
    d = root / "tune" / spec.name
    d.mkdir(parents=True)
    (d / "orchestrate.json").write_text(json.dumps({"parent_run_id": run_id, "experiment_id": "1",
                                                    "spec_hash": spec.hash, "spec_path": str(spec_path)}))
    return d / "orchestrate.json"


def test_a_sweep_whose_parent_run_is_gone_is_refused_before_ray_with_fresh_as_the_way(tmp_path, no_ray):
    spec = write_spec(tmp_path)
    root = tmp_path / "runs"
    sidecar = _sidecar(root, spec)  # as a launch leaves it; mlflow.db was then deleted
    res = invoke("launch", spec, "--root", root)
    assert res.exit_code == 2, res.output
    assert f"{sidecar}: parent_run_id" in res.output and "0" * 32 in res.output
    assert "--fresh" in res.output and "not found" not in res.output
    assert not no_ray
    # --fresh goes past the check (up to Ray, refused here)
    res = invoke("launch", spec, "--root", root, "--fresh")
    assert no_ray and "parent_run_id" not in res.output


def test_a_sweep_resumes_after_its_checkpoint_interval_changes_and_another_spec_is_refused(tmp_path):
    """The sidecar of a sweep launched with checkpoint_interval 2, found by the same spec at 7 or 50
    (a user who wants sparser checkpoints), or the sidecar a launch of this spec wrote before
    checkpoint_interval left the hash: the sweep is this spec's and resumes. A sidecar of another
    spec under the same name is refused, naming both hashes and --fresh."""
    from orchestrator.resume import _prepare
    from orchestrator.tracking import Workspace

    class Quiet:
        def info(self, *args, **kwargs):
            pass

    root = tmp_path / "runs"
    ws = Workspace(root, "")
    then = validate({**TINY, "checkpoint_interval": 2}, "tiny.yaml")
    sidecar = _sidecar(root, write_spec(tmp_path, checkpoint_interval=2))
    for now, written in [(7, then.hash), (50, then.hash), (2, then.hashes[1])]:
        state = json.loads(sidecar.read_text())
        sidecar.write_text(json.dumps({**state, "spec_hash": written}))
        exp_dir, resume = _prepare(validate({**TINY, "checkpoint_interval": now}, "tiny.yaml"), ws, False, Quiet())
        assert Path(exp_dir) == sidecar.parent and resume["spec_hash"] == written and resume["tune_state"] is False
    other = validate({**TINY, "seed": 99}, "other.yaml")
    with pytest.raises(Exception) as e:
        _prepare(other, ws, False, Quiet())
    assert f"hash {then.hashes[1]}, this one {other.hash}" in str(e.value) and "--fresh" in str(e.value)


# -- item 5: budgets the data cannot fill ----------------------------------------------------------
@pytest.mark.parametrize("command", ["launch", "experts"])
def test_budgets_beyond_the_data_are_refused_before_ray_and_write_nothing(tmp_path, no_ray, command):
    spec = write_spec(tmp_path, algorithms={"mtt": {**TINY["algorithms"]["mtt"], "budgets": [1, 500]}})
    root = tmp_path / "runs"
    t0 = time.time()
    res = invoke(command, spec, "--root", root)
    assert res.exit_code == 2, res.output
    assert f"{spec}: algorithms.mtt.budgets: [500] images per class exceed" in res.output
    assert not no_ray and time.time() - t0 < 30
    assert not (root / "trajectories").exists() and not (root / "tune").exists() and not (root / "locks").exists()


def test_submit_refuses_budgets_beyond_the_data_when_the_data_is_here(tmp_path):
    """digits ships with scikit-learn: the client can check the budgets before contacting the
    cluster (nothing listens on the address). Data that is not here is not required."""
    spec = write_spec(tmp_path, algorithms={"mtt": {**TINY["algorithms"]["mtt"], "budgets": [500]}})
    res = invoke("submit", spec, "--address", "http://127.0.0.1:9", "--root", "/srv/runs")
    assert res.exit_code == 2 and f"{spec}: algorithms.mtt.budgets: [500] images per class exceed" in res.output
    elsewhere = write_spec(tmp_path, dataset={"name": "mnist", "root": str(tmp_path / "only-on-the-cluster")})
    res = invoke("submit", elsewhere, "--address", "http://127.0.0.1:9", "--root", "/srv/runs")
    assert res.exit_code == 1 and "cannot reach a Ray job server" in res.output, res.output


def _start_holder(code: str) -> subprocess.Popen:
    """A process that takes a lock (``code`` prints "held" once it has it), started and waited for."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    return proc


# -- item 7: two launches of one sweep ------------------------------------------------------------
def test_a_second_launch_of_a_running_sweep_exits_3_naming_the_holder(tmp_path, no_ray):
    spec = write_spec(tmp_path)
    root = tmp_path / "runs"
    ws_tune = (root / "tune").resolve()
    holder = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from orchestrator import locks
        with locks.hold(locks.sweep_lock_path(Path({str(root.resolve())!r}), "tiny", {str(ws_tune)!r}), "x"):
            print("held", flush=True)
            time.sleep(60)
    """)
    proc = _start_holder(holder)
    try:
        res = invoke("launch", spec, "--root", root)
        assert res.exit_code == 3, res.output
        assert f"pid {proc.pid} on " in res.output and "started" in res.output and "sweep 'tiny'" in res.output
        assert not no_ray
    finally:
        proc.kill()
        proc.wait()
    # the holder is dead: its lock file stays, but is no lock
    lock = locks.sweep_lock_path(root.resolve(), "tiny", str(ws_tune))
    assert lock.exists() and locks.read_holder(lock)["pid"] == proc.pid
    res = invoke("launch", spec, "--root", root)
    assert no_ray, res.output  # got past the lock, up to Ray


def test_the_expert_lock_makes_a_second_trainer_wait_then_go_on(tmp_path):
    path = tmp_path / "locks" / "experts-digits-0123.lock"
    holder = textwrap.dedent(f"""
        import time
        from orchestrator import locks
        with locks.hold({str(path)!r}, "the experts"):
            print("held", flush=True)
            time.sleep(1.5)
    """)
    proc = _start_holder(holder)
    try:
        said = []
        t0 = time.time()
        with locks.hold(path, "the experts", wait=True, on_wait=said.append):
            waited = time.time() - t0
            assert locks.read_holder(path)["pid"] == os.getpid()
        assert len(said) == 1 and f"pid {proc.pid}" in said[0] and waited > 0.5
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(locks.LockHeld):  # without wait, a held lock is an error at once
        with locks.hold(path, "the experts"):
            with locks.hold(path, "the experts"):
                pass


# -- items 11 and 4: Ctrl-C in every phase --------------------------------------------------------
# `orchestrate launch` in a new session, and SIGINT to its process group, as a terminal sends it
LAUNCH_WITH = textwrap.dedent("""
    import signal, sys, time
    # a launch at a terminal, whatever the test runner's own SIGINT: a runner started in the background
    # of a non-interactive shell (`.ci/run &`) ignores SIGINT, and its children would inherit that
    signal.signal(signal.SIGINT, signal.default_int_handler)
    def slow(*args, **kwargs):  # stands for Tune generating a huge grid's variants (its first step)
        print("SLOW PHASE", file=sys.stderr, flush=True)
        time.sleep(120)
    if sys.argv[1] == "slow-variants":
        from ray.tune.search.basic_variant import BasicVariantGenerator
        BasicVariantGenerator.next_trial = slow
    from orchestrator.cli import main
    main(sys.argv[2:])
""")


def _start(tmp_path, raw, patch="none", tag="launch"):
    spec, root, log = tmp_path / f"{tag}.yaml", tmp_path / "runs", tmp_path / f"{tag}.err"
    spec.write_text(yaml.safe_dump(raw))
    script = tmp_path / "launch.py"
    script.write_text(LAUNCH_WITH)
    with open(log, "w") as err, open(log.with_suffix(".out"), "w") as out:  # files: an unread pipe blocks
        proc = subprocess.Popen([sys.executable, str(script), patch, "launch", str(spec), "--root", str(root),
                                 "--num-cpus", "2"], env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path,
                                start_new_session=True, stdout=out, stderr=err)
    return proc, root, log


def _interrupt_when(proc, log, ready, what, deadline_s=300):
    """SIGINT to the launch's process group once ``ready()``; returns (exit code, seconds to exit)."""
    deadline = time.time() + deadline_s
    try:
        while not ready():
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"the launch never reached {what} (exit code {proc.poll()}): "
                                     f"{log.read_text()[-3000:]}")
            time.sleep(0.2)
        time.sleep(1)
        t0 = time.time()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the launch ignored Ctrl-C {what} for 60 s: {log.read_text()[-3000:]}") from None
        return proc.returncode, time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _assert_interrupted(code, seconds, log, what):
    err = log.read_text()
    print(f"Ctrl-C {what}: exit {code} after {seconds:.1f} s")
    assert code == 130, err[-3000:]
    assert "interrupted (Ctrl-C)" in err and "run the same command again" in err, err[-3000:]
    assert "Aborted!" not in err and "Traceback" not in err, err[-3000:]
    assert seconds < 30, f"{seconds:.0f} s to stop"


@pytest.mark.slow
def test_ctrl_c_while_experts_train_exits_130_with_the_resume_hint(tmp_path):
    raw = {**TINY, "name": "tiny-int-experts", "experts": {**TINY["experts"], "epochs": 400}}
    proc, root, log = _start(tmp_path, raw)
    code, seconds = _interrupt_when(proc, log, lambda: list((root / "trajectories").glob("*/key.json")),
                                    "while the experts train")
    _assert_interrupted(code, seconds, log, "while the experts train")
    assert not list((root / "trajectories").glob("*/expert_*.arrow"))  # 400 epochs: none was done


@pytest.mark.slow
def test_ctrl_c_while_waiting_for_another_launchs_experts_exits_130(tmp_path):
    """A launch that waits for the experts another process trains (the expert lock)."""
    from orchestrator.experts import expert_key
    from orchestrator.sweep import load_data

    raw = {**TINY, "name": "tiny-int-wait"}
    spec = validate(raw, "x.yaml")
    lock = locks.experts_lock_path((tmp_path / "runs").resolve(), "digits", expert_key(spec, load_data(spec)))
    with locks.hold(lock, "the experts (held by the test)"):
        proc, root, log = _start(tmp_path, raw)
        code, seconds = _interrupt_when(proc, log, lambda: "waiting: the experts" in log.read_text(),
                                        "while waiting for the experts")
    _assert_interrupted(code, seconds, log, "while waiting for the experts")


@pytest.mark.slow
def test_ctrl_c_while_tune_generates_the_variants_exits_130_at_once(tmp_path):
    """Tune generates every variant of a grid in the first step of its loop (a grid of 200,000
    points: minutes); its own handler only sets a flag read after that step. Here a stand-in,
    120 s long, for that generation."""
    proc, root, log = _start(tmp_path, {**TINY, "name": "tiny-int-tune"}, patch="slow-variants")
    code, seconds = _interrupt_when(proc, log, lambda: "SLOW PHASE" in log.read_text(), "while Tune generates the variants")
    _assert_interrupted(code, seconds, log, "while Tune generates the variants")
    from mlflow import MlflowClient

    from orchestrator.tracking import workspace

    client = MlflowClient(workspace(root).tracking_uri)
    parent, = client.search_runs([client.get_experiment_by_name("tiny-int-tune").experiment_id])
    assert parent.info.status == "KILLED"  # not left RUNNING


@pytest.mark.slow
def test_two_launches_of_one_sweep_and_a_second_sweep_on_the_same_experts(tmp_path):
    """A and C (another spec, the same experts) start together: one trains the experts, the other
    waits for them, then reuses them. B, A's spec again while A runs, exits 3 at once naming A."""
    quick = {"algorithms": {"mtt": {**TINY["algorithms"]["mtt"], "iterations": 2}}, "baselines": [],
             "evaluation": {"networks": 1, "epochs": 2, "interval": 0}}
    # 150 epochs: ~10 s of training on a loaded 2-core machine, many times the ~1 s between A and C reaching it
    raw = {**TINY, **quick, "name": "tiny-two", "experts": {**TINY["experts"], "epochs": 150}}
    root = tmp_path / "runs"
    lock = locks.sweep_lock_path(root.resolve(), "tiny-two", str((root / "tune").resolve()))
    procs = {}
    try:
        procs["a"] = _start(tmp_path, raw, tag="a")[0]
        procs["c"] = _start(tmp_path, {**raw, "name": "tiny-two-other"}, tag="c")[0]
        a = procs["a"]
        deadline = time.time() + 300
        while locks.read_holder(lock).get("pid") != a.pid:  # A holds its sweep's lock
            assert a.poll() is None and time.time() < deadline, (tmp_path / "a.err").read_text()[-3000:]
            time.sleep(0.2)
        t0 = time.time()
        b = subprocess.run([sys.executable, "-m", "orchestrator.cli", "launch", str(tmp_path / "a.yaml"),
                            "--root", str(root)], env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
        print(f"second launch of the sweep refused in {time.time() - t0:.1f} s")
        assert b.returncode == 3, b.stderr[-3000:]
        assert f"the sweep 'tiny-two' is in use by pid {a.pid} on " in b.stderr and "started" in b.stderr
        assert a.poll() is None  # A goes on
        for tag, p in procs.items():
            assert p.wait(timeout=400) == 0, (tmp_path / f"{tag}.err").read_text()[-3000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    out = {t: (tmp_path / f"{t}.out").read_text() + (tmp_path / f"{t}.err").read_text() for t in procs}
    trainer, waiter = ("a", "c") if "(2 trained, 0 reused)" in out["a"] else ("c", "a")
    assert "(2 trained, 0 reused)" in out[trainer] and "(0 trained, 2 reused)" in out[waiter], out
    assert "waiting: the experts" in out[waiter] and f"in use by pid {procs[trainer].pid}" in out[waiter]
    assert len(list((root / "trajectories").glob("*/expert_*.arrow"))) == 2


def test_sigint_during_fit_stops_at_once_before_tunes_loop_then_gracefully_once(monkeypatch):
    """The handler around Tuner.fit(), without Ray: before Tune's first step, Ctrl-C raises at
    once; after it, the first asks Tune's stop (its SIGUSR1 handler), the second raises; Tune's
    handlers and TUNE_DISABLE_SIGINT_HANDLER are put back afterwards."""
    from orchestrator.sweep import _ACTIVE, _ctrl_c_during_fit

    monkeypatch.delenv("TUNE_DISABLE_SIGINT_HANDLER", raising=False)
    before_int, before_usr1 = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1)
    stops = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with _ctrl_c_during_fit():
                assert os.environ["TUNE_DISABLE_SIGINT_HANDLER"] == "1"
                os.kill(os.getpid(), signal.SIGINT)  # Tune still setting up
                time.sleep(1)
        with pytest.raises(KeyboardInterrupt):
            with _ctrl_c_during_fit():
                signal.signal(signal.SIGUSR1, lambda *a: stops.append(1))  # as Tune's fit() does
                _ACTIVE["tune_ready"] = True  # a step of Tune's loop has completed
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
                assert stops == [1]  # graceful: no exception
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
    finally:
        _ACTIVE.clear()
    assert signal.getsignal(signal.SIGINT) is before_int and signal.getsignal(signal.SIGUSR1) is before_usr1
    assert "TUNE_DISABLE_SIGINT_HANDLER" not in os.environ


def test_the_time_budget_asks_tunes_stop_once_its_loop_runs_and_only_then():
    """The watcher behind time_budget_s, without Ray: before the budget runs out nothing happens;
    once it has, it waits for Tune's loop (whose SIGUSR1 handler is the stop request a first Ctrl-C
    makes) and asks it once; from another thread, where Tune takes no request, it says so."""
    import threading

    from orchestrator.sweep import _ACTIVE, _time_budget

    warned, stops = [], []
    progress = mock.Mock(warn=warned.append)
    before_usr1 = signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, lambda *a: stops.append(time.time()))  # as Tune's fit() does
    try:
        with _time_budget(30, progress) as fired:  # not reached
            _ACTIVE["tune_ready"] = True
            time.sleep(0.3)
        assert fired == [] and stops == [] and warned == []
        _ACTIVE.clear()
        with _time_budget(0.2, progress) as fired:
            time.sleep(0.5)
            assert fired == [] and stops == []  # spent, but Tune's loop has not started: nothing to stop yet
            _ACTIVE["tune_ready"] = True
            t_ready = time.time()
            while not stops and time.time() < t_ready + 5:
                time.sleep(0.05)
            time.sleep(1.2)  # a second look of the watcher would ask again
        assert len(stops) == 1 and len(fired) == 1 and t_ready < fired[0] <= stops[0] < t_ready + 1.5, (stops, t_ready)
        assert warned == ["time budget of 0.2 s reached: stopping the trials (their state is saved)"]
        warned.clear()

        def elsewhere():
            with _time_budget(0.1, progress):
                time.sleep(0.5)

        t = threading.Thread(target=elsewhere)
        t.start()
        t.join()
        assert len(stops) == 1 and len(warned) == 1 and "outside the main thread" in warned[0], warned
    finally:
        _ACTIVE.clear()
        signal.signal(signal.SIGUSR1, before_usr1)
