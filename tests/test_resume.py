"""A trial resumes from the checkpoint it has on storage when the snapshot names a deleted one."""
from __future__ import annotations

import pyarrow.fs as pafs
import torch

from orchestrator.artifacts import load_state, save_state, state_complete
from orchestrator.resume import repair_missing_checkpoint

FS = pafs.LocalFileSystem()


def _ckpt(trial, k, value):
    d = trial / f"checkpoint_{k:06d}"
    d.mkdir(parents=True)
    save_state({"x": torch.full((100,), float(value)), "iteration": value}, d)
    return d


def test_state_complete_rejects_a_copy_cut_off(tmp_path):
    d = _ckpt(tmp_path, 1, 1)
    assert state_complete(FS, str(d))
    data = (d / "state.safetensors").read_bytes()
    (d / "state.safetensors").write_bytes(data[:-4])
    assert not state_complete(FS, str(d))
    (d / "state.safetensors").write_bytes(data)
    (d / "state.json").unlink()
    assert not state_complete(FS, str(d))


def test_the_newest_complete_checkpoint_takes_the_missing_name(tmp_path):
    trial = tmp_path / "mtt-ipc1_00001"
    _ckpt(trial, 5, 5)
    cut = _ckpt(trial, 6, 6)  # newest, but its copy was cut off
    (cut / "state.safetensors").write_bytes((cut / "state.safetensors").read_bytes()[:20])
    missing = trial / "checkpoint_000004"
    moved = repair_missing_checkpoint(FS, str(missing), state_complete)
    assert moved == str(trial / "checkpoint_000005")
    assert state_complete(FS, str(missing)) and not (trial / "checkpoint_000005").exists()
    assert load_state(missing)["iteration"] == 5


def test_an_existing_checkpoint_is_left_alone(tmp_path):
    trial = tmp_path / "t"
    k = _ckpt(trial, 4, 4)
    _ckpt(trial, 5, 5)
    assert repair_missing_checkpoint(FS, str(k), state_complete) is None
    assert load_state(k)["iteration"] == 4
    # nothing complete to move: Tune reports its own error
    assert repair_missing_checkpoint(FS, str(tmp_path / "u" / "checkpoint_000001"), state_complete) is None


def test_a_trial_records_which_code_ran_it_from_which_iteration(tmp_path):
    """record_code: a new run starts its history at 0; the same code resuming adds nothing; other code
    resuming adds [iteration, commit]; a run made before runs recorded their code (only the creating
    launch's tag), resumed past 0, gets that commit at 0 and a [null, null] gap for the unknown resumes."""
    import json

    from mlflow import MlflowClient

    from orchestrator.tracking import COMMIT_TAG, COMMITS_TAG, record_code, workspace

    client = MlflowClient(workspace(tmp_path / "root").tracking_uri)
    exp = client.create_experiment("code")
    run = client.create_run(exp, tags={COMMIT_TAG: "aaa"}).info.run_id
    assert record_code(client, run, "aaa", 0) == [[0, "aaa"]]
    assert record_code(client, run, "aaa", 270) == [[0, "aaa"]]  # resumed by the same code
    assert record_code(client, run, "bbb+dirty", 270) == [[0, "aaa"], [270, "bbb+dirty"]]
    assert json.loads(client.get_run(run).data.tags[COMMITS_TAG]) == [[0, "aaa"], [270, "bbb+dirty"]]
    old = client.create_run(exp, tags={COMMIT_TAG: "aaa"}).info.run_id
    assert record_code(client, old, "ccc", 590) == [[0, "aaa"], [None, None], [590, "ccc"]]
