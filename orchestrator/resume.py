"""Trials that resume from the checkpoint they really have on storage.

Tune keeps one checkpoint per trial (``CheckpointConfig(num_to_keep=1)``): when a trial reports
checkpoint k+1 the driver deletes checkpoint k at once, and the experiment snapshot that names
k+1 is written a moment later. A driver killed in between (SIGKILL, a lost head node) leaves a
snapshot naming a checkpoint that no longer exists, and ``Tuner.restore`` then fails the trial
with "Could not recover from checkpoint as it does not exist on storage anymore" (seen in CI).
The trial's newer checkpoint is complete on storage (a worker persists it before it reports it),
so the trial can continue from there: :func:`repair_missing_checkpoint` moves the newest complete
checkpoint of the trial folder to the path the snapshot names, so that both the restore and the
driver's later deletion of that path find it. Nothing is lost, and the steps between the two
checkpoints are not run twice.
"""
from __future__ import annotations

import logging
import posixpath
import re
from typing import Any, Callable

import pyarrow.fs as pafs

log = logging.getLogger(__name__)
_CHECKPOINT = re.compile(r"checkpoint_(\d+)")


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def repair_missing_checkpoint(fs: pafs.FileSystem, path: str, complete: Callable[[pafs.FileSystem, str], bool]) -> str | None:
    """If checkpoint folder ``path`` is missing, move the newest checkpoint of its trial folder
    that ``complete(fs, candidate)`` accepts onto ``path``. Returns the folder that was moved, or
    None (``path`` exists, or no complete checkpoint is left: Tune then reports its own error)."""
    if _exists(fs, path):
        return None
    trial_dir = posixpath.dirname(path.rstrip("/"))
    try:
        infos = fs.get_file_info(pafs.FileSelector(trial_dir))
    except FileNotFoundError:
        return None
    found = sorted(((int(m.group(1)), i.path) for i in infos
                    if i.type == pafs.FileType.Directory and (m := _CHECKPOINT.fullmatch(i.base_name))), reverse=True)
    for _, candidate in found:
        if complete(fs, candidate):
            fs.move(candidate, path)
            log.warning("checkpoint %s was deleted before the experiment state that names its successor was saved; "
                        "the trial continues from %s, moved to that name", path, candidate)
            return candidate
    return None


def with_checkpoint_repair(trainable_cls: type, complete: Callable[[pafs.FileSystem, str], bool]) -> type:
    """A subclass of the Tune trainable class ``trainable_cls`` whose ``restore`` first repairs a
    missing checkpoint (see :func:`repair_missing_checkpoint`). Its Tune name is unchanged, so
    sweeps started before keep resuming."""

    class Resumable(trainable_cls):  # type: ignore[misc, valid-type]
        def restore(self, checkpoint_path: Any):
            ckpt = getattr(checkpoint_path, "checkpoint", None)  # a _TrainingResult from the driver
            if ckpt is not None:
                repair_missing_checkpoint(ckpt.filesystem, ckpt.path, complete)
            return super().restore(checkpoint_path)

    Resumable.__name__ = Resumable.__qualname__ = trainable_cls.__name__
    return Resumable
