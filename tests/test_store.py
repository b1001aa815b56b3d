import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pyarrow as pa
import pytest
import torch

from orchestrator.store import CorruptTrajectoryError, TrajectoryStore, open_trajectory, store_key, write_trajectory

MANIFEST = [("conv.weight", (4, 1, 3, 3)), ("conv.bias", (4,)), ("fc.weight", (10, 16)), ("fc.bias", (10,))]
P = 36 + 4 + 160 + 10


@dataclass
class Ck:
    epoch: int
    params: torch.Tensor
    train_loss: float
    test_acc: float


def checkpoints(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Ck(e, torch.randn(P, generator=g), math.nan if e == 0 else 1.0 / e, 0.5 + e / 100) for e in range(n)]


def test_round_trip_is_bit_exact_and_readable_by_plain_pyarrow(tmp_path):
    cks = checkpoints()
    path = tmp_path / "expert_00000.arrow"
    digest, nbytes = write_trajectory(path, cks, MANIFEST, {"dataset": {"name": "digits"}, "seed": 5})
    assert nbytes == path.stat().st_size and len(digest) == 64
    t = open_trajectory(path)
    assert torch.equal(t.params, torch.stack([c.params for c in cks]))
    assert t.epochs.tolist() == list(range(6)) and t.num_epochs == 5
    assert t.manifest == MANIFEST and t.meta["seed"] == 5 and t.meta["params_sha256"] == digest
    assert "torch" in t.meta["versions"] and t.final_test_acc == pytest.approx(0.55)
    # plain pyarrow, no project code
    with pa.memory_map(str(path)) as src:
        table = pa.ipc.open_file(src).read_all()
    assert table.schema.field("params").type == pa.list_(pa.float32(), P)
    assert json.loads(table.schema.metadata[b"distill.manifest"])[0] == ["conv.weight", [4, 1, 3, 3]]
    assert table.column("epoch").to_pylist() == list(range(6))


def test_reads_are_memory_mapped_without_copies(tmp_path):
    path = tmp_path / "e.arrow"
    write_trajectory(path, checkpoints(20), MANIFEST, {})
    before = pa.total_allocated_bytes()
    t = open_trajectory(path, verify=False)
    row = t[3]
    assert pa.total_allocated_bytes() == before  # nothing was copied into Arrow's memory pool
    assert not t._flat.flags.writeable and not t._flat.flags.owndata
    assert torch.equal(row, checkpoints(20)[3].params)


def test_failed_write_leaves_no_visible_file(tmp_path, monkeypatch):
    path = tmp_path / "expert_00000.arrow"

    def boom(*a, **k):
        raise OSError("disk vanished")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_trajectory(path, checkpoints(), MANIFEST, {})
    assert list(tmp_path.iterdir()) == []


def test_killed_writer_leaves_only_a_hidden_temporary(tmp_path):
    """A writer killed with SIGKILL after writing the data but before the rename."""
    store = TrajectoryStore(tmp_path)
    path = store.expert_path("k", "digits", 0)
    code = textwrap.dedent(f"""
        import os, signal
        from orchestrator.store import write_trajectory
        from tests.test_store import checkpoints, MANIFEST
        os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        write_trajectory({str(path)!r}, checkpoints(), MANIFEST, {{}})
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == -signal.SIGKILL
    names = [p.name for p in path.parent.iterdir()]
    assert len(names) == 1 and names[0].startswith(".expert_00000.arrow.tmp-")  # hidden, never read
    valid, todo, problems = store.check("k", "digits", 1)
    assert valid == [] and todo == [0] and problems == []


def _corrupt(path, offset_from_end=None, offset=None):
    data = bytearray(path.read_bytes())
    i = offset if offset is not None else len(data) - offset_from_end
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corruption_is_detected(tmp_path):
    path = tmp_path / "e.arrow"
    cks = checkpoints()
    write_trajectory(path, cks, MANIFEST, {})
    raw = path.read_bytes()
    # flip a byte inside the parameters: find the bytes of a known float
    needle = cks[3].params[7:9].numpy().tobytes()
    i = raw.index(needle)
    _corrupt(path, offset=i)
    with pytest.raises(CorruptTrajectoryError, match="checksum mismatch"):
        open_trajectory(path)
    # truncated file
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptTrajectoryError, match="not a readable trajectory"):
        open_trajectory(path)


def test_store_check_moves_corrupt_files_aside_and_asks_for_retraining(tmp_path):
    store = TrajectoryStore(tmp_path)
    key = store_key({"name": "d"}, {"m": 1}, {"t": 1}, 0)
    for i in range(3):
        write_trajectory(store.expert_path(key, "d", i), checkpoints(seed=i), MANIFEST, {})
    bad = store.expert_path(key, "d", 1)
    bad.write_bytes(bad.read_bytes()[:-100])
    valid, todo, problems = store.check(key, "d", 4)
    assert [r.index for r in valid] == [0, 2] and todo == [1, 3]
    assert len(problems) == 1 and "expert_00001.arrow" in problems[0]
    kept = [p.name for p in store.dir(key, "d").iterdir() if ".corrupt-" in p.name]
    assert len(kept) == 1  # the corrupt file is kept aside, never silently used or lost
    assert not bad.exists()


def test_store_key_depends_on_everything_that_determines_a_trajectory():
    base = store_key({"name": "digits", "digest": "a"}, {"depth": 2}, {"lr": 0.01}, 0)
    assert base == store_key({"name": "digits", "digest": "a"}, {"depth": 2}, {"lr": 0.01}, 0)
    assert len({base, store_key({"name": "digits", "digest": "b"}, {"depth": 2}, {"lr": 0.01}, 0),
                store_key({"name": "digits", "digest": "a"}, {"depth": 3}, {"lr": 0.01}, 0),
                store_key({"name": "digits", "digest": "a"}, {"depth": 2}, {"lr": 0.02}, 0),
                store_key({"name": "digits", "digest": "a"}, {"depth": 2}, {"lr": 0.01}, 1)}) == 5


def test_compact_convex_form_round_trips_bit_exactly(tmp_path):
    from algorithms.mct import ConvexTrajectory
    from orchestrator.store import open_convex, write_convex

    traj = torch.stack([c.params for c in checkpoints(11)])
    convex = ConvexTrajectory.from_checkpoints(traj, MANIFEST, num_waypoints=4, smooth=True)
    path = tmp_path / "expert_00000.convex-w4-path-smooth.arrow"
    write_convex(path, convex, MANIFEST, {"seed": 1}, test_acc=0.9)
    back = open_convex(path)
    assert torch.equal(back.waypoints, convex.waypoints) and torch.equal(back.beta, convex.beta)
    assert back.epochs == convex.epochs == [0, 3, 6, 10] and back.bounds == convex.bounds
    for t in (0.0, 2.5, 7.0, 9.75, 10.0):
        assert torch.equal(back.point(t), convex.point(t))
    # the beta table is covered by its own checksum
    meta_path = tmp_path / "tampered.arrow"
    with pa.memory_map(str(path)) as src:
        table = pa.ipc.open_file(src).read_all()
    meta = dict(table.schema.metadata)
    c = json.loads(meta[b"distill.convex"])
    c["beta_b64"] = c["beta_b64"][:-8] + ("AAAAAAA=" if not c["beta_b64"].endswith("AAAAAAA=") else "AAAAAAE=")
    meta[b"distill.convex"] = json.dumps(c).encode()
    with pa.OSFile(str(meta_path), "wb") as sink, pa.ipc.new_file(sink, table.schema.with_metadata(meta)) as w:
        w.write_table(table)
    with pytest.raises(CorruptTrajectoryError, match="beta table"):
        open_convex(meta_path)


def test_store_check_verifies_compact_files_too(tmp_path):
    from algorithms.mct import ConvexTrajectory
    from orchestrator.store import convex_form, write_convex

    store = TrajectoryStore(tmp_path)
    form = convex_form(2, "path", False)
    traj = torch.stack([c.params for c in checkpoints(11)])
    for i in range(2):
        write_convex(store.expert_path("k", "d", i, form), ConvexTrajectory.from_checkpoints(traj, MANIFEST),
                     MANIFEST, {}, test_acc=0.75)
    bad = store.expert_path("k", "d", 1, form)
    bad.write_bytes(bad.read_bytes()[:-50])
    valid, todo, problems = store.check("k", "d", 2, form)
    assert [r.index for r in valid] == [0] and valid[0].final_test_acc == pytest.approx(0.75)
    assert todo == [1] and len(problems) == 1
