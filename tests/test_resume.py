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
