"""``orchestrate validate SPEC``: launch's checks without Ray and without writing anything, then the
trials a launch would run and the experts it would train or reuse."""
import json
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.experts import expert_key
from orchestrator.spec import load_spec
from orchestrator.store import TrajectoryStore
from orchestrator.sweep import load_data

from .conftest import TINY, tiny_spec


@pytest.fixture
def no_ray(monkeypatch):
    @contextmanager
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")
        yield  # pragma: no cover

    monkeypatch.setattr("orchestrator.sweep.ray_session", refuse)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_a_bad_spec_exits_2_with_launchs_message(tmp_path, write_spec, no_ray):
    spec = write_spec(tiny_spec(algorithms={"mtt": {**TINY["algorithms"]["mtt"], "budgets": [1, 500]}}))
    root = tmp_path / "runs"
    typo = write_spec(tiny_spec(evaluation={"netwroks": 2}), "typo.yaml")
    res = invoke("validate", typo, "--root", root)
    assert res.exit_code == 2 and "evaluation.netwroks" in res.output, res.output
    for command in ("validate", "launch"):  # the same message from both
        res = invoke(command, spec, "--root", root)
        assert res.exit_code == 2, res.output
        assert f"{spec}: algorithms.mtt.budgets: [500] images per class exceed" in res.output
        if command == "validate":
            assert not root.exists()  # validate writes nothing, not even the root folder


def test_prints_the_trials_and_the_experts_to_train_and_writes_nothing(tmp_path, write_spec, no_ray):
    spec = write_spec(tiny_spec(algorithms={"mtt": {**TINY["algorithms"]["mtt"], "budgets": [1, 2],
                                                    "hyperparameters": {**TINY["algorithms"]["mtt"]["hyperparameters"],
                                                                        "lr_img": [10, 100]}}}))
    root = tmp_path / "runs"
    res = invoke("validate", spec, "--root", root)
    assert res.exit_code == 0, res.output
    assert "tiny: 6 trials" in res.output  # random x 2 budgets + mtt x 2 budgets x 2 lr_img
    assert res.output.count("lr_img=10,") == 2 and res.output.count("lr_img=100,") == 2
    assert "none stored: a launch trains all 2" in res.output
    assert not root.exists()


def test_stored_experts_are_counted_and_a_corrupt_one_is_reported_not_moved(tmp_path, write_spec, no_ray):
    spec_path = write_spec(tiny_spec())
    s = load_spec(spec_path)
    root = tmp_path / "runs"
    store = TrajectoryStore(root / "trajectories")
    key = expert_key(s, load_data(s))
    bad = store.expert_path(key, "digits", 1)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an arrow file")
    res = invoke("validate", spec_path, "--root", root)
    assert res.exit_code == 0, res.output
    assert "full: 0 stored and valid (reused), 2 missing (trained)" in res.output
    assert "it would be rebuilt" in res.output and bad.read_bytes() == b"not an arrow file"
    assert sorted(p.name for p in bad.parent.iterdir()) == ["expert_00001.arrow"]


@pytest.mark.slow  # trains two tiny experts
def test_stored_experts_are_all_found_after_a_launch_with_fewer_experts_rewrote_the_manifest(tmp_path, write_spec):
    """The store's manifest.json is the last launch's: after a launch of the same recipe with a smaller
    experts.count it lists fewer experts than are stored, and the readers (orchestrate evaluate, the
    bench diagnostics) must still find every one on disk."""
    from orchestrator.evaluate import stored_experts
    from orchestrator.experts import expert_seed, train_and_write

    s = load_spec(write_spec(tiny_spec()))  # 2 experts
    data = load_data(s)
    store = TrajectoryStore(tmp_path / "trajectories")
    key = expert_key(s, data)
    recs = [train_and_write(data, s.model, s.expert_training(), expert_seed(s.experts["seed"], i), i,
                            {"full": str(store.expert_path(key, "digits", i))}, {}, {"dataset": {"name": "digits"}},
                            "cpu")["full"] for i in range(2)]
    store.write_manifest(key, "digits", {"full": recs})
    found, _ = stored_experts(s, data, store.root)
    assert [i for i, _, _ in found] == [0, 1]
    manifest = store.dir(key, "digits") / "manifest.json"
    store.write_manifest(key, "digits", {"full": recs[:1]})  # a launch with experts.count 1 came after
    assert [r["index"] for r in json.loads(manifest.read_text())["forms"]["full"]] == [0, 1]  # expert 1 stays
    found, _ = stored_experts(s, data, store.root)
    assert [i for i, _, _ in found] == [0, 1]
    # a manifest written before launches kept the others' entries lists only the last launch's experts
    old = json.loads(manifest.read_text())
    old["forms"]["full"] = old["forms"]["full"][:1]
    manifest.write_text(json.dumps(old))
    found, _ = stored_experts(s, data, store.root)
    assert [i for i, _, _ in found] == [0, 1]  # read from the files (before: only expert 0)
    # an entry whose file is gone is dropped when the next launch writes the manifest
    store.write_manifest(key, "digits", {"full": recs})
    Path(recs[1].path).unlink()
    store.write_manifest(key, "digits", {"full": recs[:1]})
    assert [r["index"] for r in json.loads(manifest.read_text())["forms"]["full"]] == [0]
