import copy
import os
import pathlib
import shutil

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

# Two threads, as CI's two cores, also in each of the two pytest-xdist workers of the README's test
# command (-n 2): one thread per worker was slower on two cores (912 s against 814 s for the suite,
# measured with --dist worksteal, 2026-12-04; CI's --dist loadfile only changes which worker takes a
# test), as a worker's in-process training then cannot use the core the other leaves idle
# while it waits on Ray or a subprocess.
torch.set_num_threads(2)

REPO = pathlib.Path(__file__).resolve().parent.parent

# -- the real data sets (MNIST, ML-100k, PTB) --------------------------------------------------
# ``$ORCHESTRATE_DATA`` when set, else ``../shared/data`` beside the repository: CI's clone lives
# elsewhere than a developer's, so no absolute path of one machine. Read once, at import, before
# any test's monkeypatch removes ORCHESTRATE_DATA.
SHARED_DATA = (pathlib.Path(os.environ["ORCHESTRATE_DATA"]).expanduser() if os.environ.get("ORCHESTRATE_DATA")
               else REPO.parent / "shared" / "data")
# Set by .ci/run when the data folder is there: a real-data test that would skip fails instead, so
# that a CI log never shows the skip reason where the folder exists.
REQUIRE_DATA = os.environ.get("ORCHESTRATE_REQUIRE_DATA") == "1"


def real_data(name: str, *files: str) -> pathlib.Path:
    """The folder of the real data set ``name`` holding ``files``; skips the test (with the reason)
    when it is absent, or fails when ``ORCHESTRATE_REQUIRE_DATA=1``."""
    folder = SHARED_DATA / name
    missing = [f for f in files if not (folder / f).is_file()] if folder.is_dir() else [str(folder)]
    if missing:
        reason = (f"real data set {name!r} not found: {', '.join(missing)} missing under {folder} "
                  "(put the data in ../shared/data beside the repository or set ORCHESTRATE_DATA)")
        if REQUIRE_DATA:
            pytest.fail(reason + "; ORCHESTRATE_REQUIRE_DATA=1 says it must be there")
        pytest.skip(reason)
    return folder


# -- a tiny image spec, shared by the end-to-end tests ------------------------------------------
# digits, a 1-block ConvNet of width 8, 2 experts of 4 epochs, one MTT trial of 6 iterations: seconds
TINY = {
    "name": "tiny",
    "seed": 3,
    "checkpoint_interval": 2,
    "dataset": {"name": "digits"},
    "model": {"depth": 1, "width": 8},
    "experts": {"count": 2, "epochs": 4, "lr": 0.03, "batch_size": 64},
    "algorithms": {"mtt": {"budgets": [1], "iterations": 6,
                           "hyperparameters": {"syn_steps": 3, "expert_epochs": 1, "max_start_epoch": 2}}},
    "evaluation": {"networks": 2, "epochs": 10, "interval": 3},
}


def tiny_spec(**changes) -> dict:
    """A deep copy of :data:`TINY`; a mapping given for a section is merged into it, other values replace."""
    raw = copy.deepcopy(TINY)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict) and key != "algorithms":
            raw[key] = {**raw[key], **copy.deepcopy(value)}
        else:
            raw[key] = copy.deepcopy(value)
    return raw


@pytest.fixture
def write_spec(tmp_path):
    """``write_spec(raw, name="spec.yaml") -> path``: a spec mapping written as YAML under tmp_path."""
    def write(raw: dict, name: str = "spec.yaml") -> pathlib.Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path
    return write


@pytest.fixture(scope="session")
def ray_cluster():
    """One new local Ray for the whole session (2 CPUs, no dashboard); never a cluster left running
    on this machine (``/tmp/ray/ray_current_cluster``) by something else."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _nothing_written_into_the_checkout():
    """A test writes under its tmp_path, never into the checkout. MLflow's default artifact root is
    ./mlruns: an experiment created without an artifact location puts its runs' artifacts there."""
    stray = REPO / "mlruns"
    before = stray.exists()
    yield
    if not before and stray.exists():
        shutil.rmtree(stray, ignore_errors=True)
        pytest.fail(f"the test wrote {stray} (MLflow's default artifact root): create its experiments with an "
                    f"artifact_location under tmp_path", pytrace=False)


def pytest_collection_modifyitems(config, items):
    """A test that starts Ray (the ``ray_cluster`` fixture) must be marked ``slow``:
    ``pytest -m "not slow"`` is the inner loop and stays about a minute."""
    unmarked = [item.nodeid for item in items
                if "ray_cluster" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError("these tests start Ray (ray_cluster) but are not marked slow: "
                                + ", ".join(unmarked))


def results_row(algorithm="mtt", budget=1, acc=None, status="FINISHED", dataset="digits", sweep="s1", run_id=None,
                **extra) -> dict:
    """A row of ``orchestrator.results`` as the tests of results, scores and browsing build them:
    every sortable field None, then these values (acc_std 0.01 when there is an accuracy)."""
    from orchestrator import results as res

    r = {f: None for f in res.SORT_FIELDS}
    r.update({"run_id": run_id or f"{algorithm}-{budget}", "sweep": sweep, "algorithm": algorithm,
              "dataset": dataset, "budget": budget, "status": status, "acc_mean": acc,
              "acc_std": None if acc is None else 0.01, "iterations": 2, "hyperparameters": {}})
    r.update(extra)
    return r
