"""bench/direct.py --time-limit / --resume: a run stopped by its time limit and resumed gives the
numbers of a run never stopped (the quickstart spec at --quick size, digits, seconds a run)."""
import json
import subprocess
import sys

import pytest
import torch

from orchestrator.artifacts import read_synthetic

from .conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import direct  # noqa: E402

TRIALS = ["random-ipc1", "random-ipc10", "mtt-ipc1", "mtt-ipc10"]


def run(out, store, *extra):
    return direct.main(["--quick", "--out", str(out), "--store", str(store), "--threads", "1", *map(str, extra)])


def curve(folder, trial):
    return json.loads((folder / trial / "curve.json").read_text())


@pytest.mark.slow
def test_a_run_stopped_by_its_time_limit_resumes_to_the_same_numbers(tmp_path, capsys):
    store = tmp_path / "store"
    assert run(tmp_path / "whole", store) == 0
    cut = tmp_path / "cut"
    # a limit of 0 s: the baselines (no steps) finish, the first distillation stops after its first step
    assert run(cut, store, "--time-limit", 0) == 0
    said = capsys.readouterr().out
    assert "--time-limit reached at iteration 1 of 4" in said and "not started: mtt-ipc10" in said
    stopped = curve(cut, "mtt-ipc1")
    assert stopped["checkpoint"] == 1 and [e["iteration"] for e in stopped["evals"]] == [0]
    assert len(stopped["steps"]["loss"]) == 1 and not (cut / "mtt-ipc10").exists()
    assert (cut / "mtt-ipc1" / "state" / "state.safetensors").exists()

    assert run(cut, store, "--resume") == 0
    assert "mtt-ipc1: resumed at iteration 1 of 4" in capsys.readouterr().out
    for trial in TRIALS:
        whole, resumed = curve(tmp_path / "whole", trial), curve(cut, trial)
        assert [(e["iteration"], e["acc"]) for e in resumed["evals"]] == \
            [(e["iteration"], e["acc"]) for e in whole["evals"]], trial
        assert resumed["steps"] == whole["steps"] and len(resumed["sec_per_step"]) == len(whole["sec_per_step"])
        assert resumed["iterations_done"] == whole["iterations_done"]
        a, meta_a = read_synthetic(tmp_path / "whole" / trial / "synthetic.safetensors")
        b, meta_b = read_synthetic(cut / trial / "synthetic.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a) and meta_a == meta_b, trial
    assert [it for it, _ in curve(cut, "mtt-ipc1")["resumed"]] == [1]
    # a finished trial resumed stays as it is
    before = (cut / "mtt-ipc10" / "curve.json").read_bytes()
    assert run(cut, store, "--resume", "--methods", "mtt") == 0
    assert (cut / "mtt-ipc10" / "curve.json").read_bytes() == before


@pytest.mark.slow
def test_resume_refuses_another_recipe_and_a_broken_checkpoint(tmp_path, capsys):
    store, out = tmp_path / "store", tmp_path / "out"
    assert run(out, store, "--methods", "random") == 0
    capsys.readouterr()
    # how often a trial checkpoints is not its recipe: a run resumes after it changes
    assert run(out, store, "--methods", "random", "--resume", "--set", "checkpoint_interval=7") == 0
    assert "a checkpoint of spec hash" not in capsys.readouterr().out
    assert run(out, store, "--methods", "random", "--resume", "--set", "evaluation.epochs=21") == 2
    said = " ".join(capsys.readouterr().out.split())
    assert f"{out / 'random-ipc1' / 'state'}: a checkpoint of spec hash" in said and "(the spec or a --set differs)" in said
    (out / "random-ipc1" / "state" / "state.json").write_text("{not json")
    assert run(out, store, "--methods", "random", "--resume") == 2
    said = " ".join(capsys.readouterr().out.split())
    assert "not a readable checkpoint" in said and "remove it to start the trial over" in said
    with pytest.raises(SystemExit) as e:
        direct.main(["--quick", "--resume"])
    assert e.value.code == 2 and "--resume continues the trials in --out" in capsys.readouterr().err


@pytest.mark.slow
def test_device_run_continues_a_run_over_short_commands(tmp_path):
    """bench/device_run.sh: each call resumes direct-runs/NAME, stops at DEVICE_LIMIT_S with a
    checkpoint, and packs what came of it, without the experts' store, into one file $OUT/NAME.tar.gz
    (the device tool brings back at most 8 files, none more than 2 folders below $OUT) beside
    $OUT/NAME.json; unpacked into direct-runs/NAME, the next call goes on from there."""
    import os
    import shutil
    import subprocess
    import tarfile

    repo = tmp_path / "repo"  # a copy of the scripts it runs, so that direct-runs/ lands there
    shutil.copytree(REPO / "bench", repo / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    for d in ("algorithms", "orchestrator", "search_spaces"):
        (repo / d).symlink_to(REPO / d)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "DEVICE_LIMIT_S": "0", "PYTHON": sys.executable}

    def call(**extra):
        shutil.rmtree(out, ignore_errors=True)  # the tool empties $OUT before each command
        return subprocess.run(["bash", "bench/device_run.sh", "q", "--quick", "--threads", "1"], cwd=repo,
                              env={**env, **extra}, capture_output=True, text=True, timeout=300)

    def came_back():  # what the device tool returns: plain files at most 2 folders below $OUT, at most 8
        files = [p for p in out.rglob("*") if p.is_file()]
        assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files), files
        return files

    first = call()
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in came_back()) == ["q.json", "q.tar.gz"]
    assert json.loads((out / "q.json").read_text())["config"]["stopped_by_time_limit"] is True
    with tarfile.open(out / "q.tar.gz") as tar:
        names = tar.getnames()
    assert "./mtt-ipc1/state/state.safetensors" in names and not any("trajectories" in n for n in names)
    # a fresh machine: the run comes back only from the file, unpacked as the script says
    fresh = repo / "direct-runs" / "q"
    shutil.rmtree(fresh)
    fresh.mkdir()
    with tarfile.open(out / "q.tar.gz") as tar:
        tar.extractall(fresh, filter="data")
    second = call(DEVICE_LIMIT_S="600")
    assert second.returncode == 0, second.stderr
    assert "tar -C direct-runs/q -xzf" in second.stdout
    done = json.loads((out / "q.json").read_text())
    assert done["config"]["stopped_by_time_limit"] is False
    assert [r["iterations"] for r in done["rows"]] == [0, 0, 4, 4]
    assert "mtt-ipc1: resumed at iteration 1 of 4" in " ".join(second.stdout.split())  # from the file's checkpoint
    bad = subprocess.run(["bash", "bench/device_run.sh", "../x", "--quick"], cwd=repo, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "plain folder name" in bad.stderr


@pytest.mark.slow
def test_a_diverged_trial_is_reported_on_resume_not_replayed(tmp_path, capsys):
    store, out = tmp_path / "store", tmp_path / "out"
    blow_up = ["--methods", "mtt", "--set", "algorithms.mtt.iterations=4",
               "--set", "algorithms.mtt.hyperparameters.lr_img=1.0e+30"]
    assert run(out, store, *blow_up) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "mtt-ipc1 diverged: matching loss is [nan]" in said  # the message whole (no markup eaten)
    first = curve(out, "mtt-ipc1")
    assert first["diverged"].startswith("iteration 1:") and first["checkpoint"] == 1
    assert run(out, store, *blow_up, "--resume") == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "mtt-ipc1 diverged before: iteration 1: matching loss is [nan]" in said
    assert curve(out, "mtt-ipc1")["steps"] == first["steps"]  # nothing stepped again


# the package hidden from a Python that runs a bench script as a lent GPU machine does: from a checkout,
# with PyTorch but without `pip install` (so without the package on the path), Ray or MLflow
WITHOUT_THE_PACKAGE = """
import importlib.util, runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in (type(f).__module__ + repr(f)).lower()]
sys.path[:] = [p for p in sys.path if p not in ("", {repo!r})]
if importlib.util.find_spec("orchestrator") is not None:
    print("INSTALLED"); sys.exit(0)
sys.modules["ray"] = sys.modules["mlflow"] = None
sys.path.insert(0, {bench!r})  # what `python bench/direct.py` puts first
sys.argv = ["direct.py", "--help"]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_a_bench_script_runs_from_a_checkout_without_the_package_installed(tmp_path):
    code = WITHOUT_THE_PACKAGE.format(repo=str(REPO), bench=str(REPO / "bench"), script=str(REPO / "bench" / "direct.py"))
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    if res.stdout.strip() == "INSTALLED":
        pytest.skip("the package is installed as a regular (not editable) one: it cannot be hidden here")
    assert res.returncode == 0, res.stderr
    assert "--time-limit" in res.stdout
