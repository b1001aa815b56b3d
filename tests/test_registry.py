"""The method registry and the tasks: every registered method through the distiller protocol,
no method name in the orchestrator's code, and a user's own method validated like a built-in."""
from __future__ import annotations

import ast
import pathlib
import sys
import textwrap

import pytest
import torch

from orchestrator import methods
from orchestrator.artifacts import load_state, save_state
from orchestrator.experts import write_forms
from orchestrator.spec import SpecError, validate
from orchestrator.trial import TrialContext, build_distiller

from .conftest import tiny_spec
from .test_farzi_e2e import TINY as FARZI, write_movielens

REPO = pathlib.Path(__file__).resolve().parents[1]
QUICK = {  # a few seconds per method on digits / a generated MovieLens
    "mtt": {"syn_steps": 3, "expert_epochs": 1, "max_start_epoch": 2},
    "mct": {"syn_steps": 3, "expert_epochs": 1, "max_start_epoch": 2},
    "dc": {"batch_real": 16}, "dsa": {"batch_real": 16}, "dm": {"batch_real": 16},
    "farzi": FARZI["algorithms"]["farzi"]["hyperparameters"],
}


def test_no_method_name_is_compared_in_the_orchestrator():
    """The orchestrator drives methods through the registry: no ``== "mtt"``, no ``in ("mct",
    "farzi")``, no table keyed by method names, outside the built-in entries themselves. (The
    augmentation named ``dsa`` is not a method.)"""
    names = set(methods.names())
    found = []
    for p in sorted((REPO / "orchestrator").glob("*.py")):
        if p.name == "builtin_methods.py":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                consts = {c.value for o in operands for c in ([o] if isinstance(o, ast.Constant) else
                                                               getattr(o, "elts", []))
                          if isinstance(c, ast.Constant) and isinstance(c.value, str)}
                other = " ".join(ast.unparse(o) for o in operands if not isinstance(o, ast.Constant))
                if names & consts and "aug" not in other:
                    found.append(f"{p.name}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                if len(names & keys) >= 2:
                    found.append(f"{p.name}:{node.lineno}: a table keyed by method names")
    assert not found, "\n".join(found)


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    """One trial context per task kind, with 2 small experts in the store's forms."""
    d = tmp_path_factory.mktemp("registry")
    write_movielens(d / "ml")
    out = {}
    for kind, raw in (("image", tiny_spec(experts={"keep": ["full", "convex"]})),
                      ("sequence", {**FARZI, "dataset": {"name": "ml-100k", "root": str(d / "ml")}})):
        spec = validate(raw)
        data = spec.task.load(spec)
        files: dict[str, list[str]] = {}
        for i in range(2):
            ckpts, manifest = spec.task.train_expert(data, spec.model, spec.expert_training(), 100 + i, "cpu")
            paths = {f: str(d / f"{kind}-{i}-{f}.arrow") for f in spec.expert_forms()}
            write_forms(i, ckpts, manifest, paths, spec.convex_options(), {"seed": i})
            for f, path in paths.items():
                files.setdefault(f, []).append(path)
        out[kind] = TrialContext(data=data, spec=spec.to_dict(), spec_hash=spec.hash, expert_files=files,
                                 expert_sha256=[], store_key="k", experts_acc=(0.0, 0.0), tracking_uri="",
                                 experiment_id="", parent_run_id="")
    return out


def _cases():
    for name in methods.names():
        m = methods.get(name)
        for kind in (("image", "sequence") if m.kind == "any" else (m.kind,)):
            yield pytest.param(name, kind, id=f"{name}-{kind}")


def _point(name, kind, ctx):
    m = methods.get(name)
    hp = {**m.hyperparameters(ctx.spec["experts"]), **QUICK.get(name, {})}
    return {"algorithm": name, "budget": 1 if kind == "image" else 4, "iterations": 0 if m.baseline else 5, "hp": hp}


def _tensors(syn):
    return [v for v in vars(syn).values() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("name,kind", list(_cases()))
def test_every_method_follows_the_protocol_and_resumes_to_an_identical_step(contexts, name, kind, tmp_path):
    """``step`` returns finite scalars and moves the set; ``synthetic`` is what the task
    evaluates and exports; a ``state_dict`` written as a checkpoint and loaded into a fresh
    distiller gives the same next step as the uninterrupted one. A method that does not learn
    its step size evaluates at the one it declares."""
    ctx = contexts[kind]
    m, point = methods.get(name), _point(name, kind, contexts[kind])
    d = build_distiller(point, ctx, torch.device("cpu"), seed=3)
    assert d.iteration == 0
    syn = d.synthetic()
    if not m.learns_lr and m.fixed_lr(point["hp"]) is not None:
        assert syn.lr == m.fixed_lr(point["hp"])
    if m.baseline:  # nothing to learn: evaluated once, at iteration 0
        with pytest.raises(RuntimeError):
            d.step()
        again = build_distiller(point, ctx, torch.device("cpu"), seed=3).synthetic()
        assert all(torch.equal(a, b) for a, b in zip(_tensors(syn), _tensors(again)))  # paired: same draw
        return
    before = [t.clone() for t in _tensors(syn)]
    metrics = d.step()
    assert d.iteration == 1 and all(isinstance(v, (int, float)) for v in metrics.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, _tensors(d.synthetic())))
    save_state({"distiller": d.state_dict()}, tmp_path)
    resumed = build_distiller(point, ctx, torch.device("cpu"), seed=3)
    resumed.load_state_dict(load_state(tmp_path)["distiller"])
    assert resumed.iteration == 1
    m1, m2 = d.step(), resumed.step()
    assert m1.keys() == m2.keys() and all(m1[k] == pytest.approx(m2[k], rel=1e-6, abs=1e-9) for k in m1)
    for a, b in zip(_tensors(d.synthetic()), _tensors(resumed.synthetic())):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    x = syn.training_input() if kind == "sequence" else syn.images  # what the task trains its networks on
    assert x.shape[0] == (point["budget"] if kind == "sequence" else point["budget"] * ctx.data.info.num_classes)


def test_methods_that_read_no_experts_train_none():
    spec = validate(tiny_spec(algorithms={"dm": {"budgets": [1]}, "dc": {"budgets": [1]}}))
    assert not spec.needs_experts()
    assert validate(tiny_spec()).needs_experts()


def test_dc_budgets_without_the_authors_loops_need_both_loops():
    with pytest.raises(SpecError, match=r"algorithms\.dc\.hyperparameters\.outer_loop: the authors define"):
        validate(tiny_spec(algorithms={"dc": {"budgets": [1, 3]}}))
    spec = validate(tiny_spec(algorithms={"dc": {"budgets": [3], "hyperparameters": {"outer_loop": 3,
                                                                                      "inner_loop": 5}}}))
    assert spec.algorithms["dc"]["hyperparameters"]["outer_loop"] == 3


def _readme_method() -> str:
    """The example of the README's "Adding a method": tested here as users will copy it."""
    text = (REPO / "README.md").read_text()
    start = text.index("```python\n# my_methods.py")
    return text[start + len("```python\n"):text.index("```", start + 10)]


USER_METHOD = _readme_method()


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_methods.py").write_text(textwrap.dedent(USER_METHOD))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_methods:MeansMethod"
    sys.modules.pop("my_methods", None)


def test_a_method_named_by_import_path_is_validated_like_a_built_in(user_module):
    spec = validate(tiny_spec(algorithms={user_module: {"budgets": [1], "iterations": 3}}))
    assert spec.algorithms[user_module]["hyperparameters"] == {"lr_img": 0.5} and not spec.needs_experts()
    with pytest.raises(SpecError) as e:
        validate(tiny_spec(algorithms={user_module: {"budgets": [1], "hyperparameters": {"lr_img": -1,
                                                                                          "lr_imgs": 2}}}))
    msg = str(e.value)
    assert f"algorithms.{user_module}.hyperparameters.lr_img: must be > 0, got -1" in msg
    assert f"algorithms.{user_module}.hyperparameters.lr_imgs: unknown key (did you mean 'lr_img'?)" in msg
    with pytest.raises(SpecError, match="cannot import 'no_such_module:X'"):
        validate(tiny_spec(algorithms={"no_such_module:X": {"budgets": [1]}}))


def test_an_entry_point_names_a_method(user_module, monkeypatch):
    from importlib.metadata import EntryPoint

    ep = EntryPoint(name="means", value=user_module, group=methods.ENTRY_POINT_GROUP)
    monkeypatch.setattr(methods, "_entry_points", lambda: {"means": ep})
    assert "means" in methods.names()
    spec = validate(tiny_spec(algorithms={"means": {"budgets": [1], "iterations": 2}}))
    assert type(spec.methods()["means"]).__name__ == "MeansMethod"


@pytest.mark.slow
def test_a_users_method_sweeps_next_to_the_baseline(tmp_path):
    """A method defined in the user's own module (not installed, on PYTHONPATH) runs through
    ``orchestrate launch`` like a built-in: no experts trained, its trial and the random subset
    in MLflow, its set evaluated at its declared step size."""
    import os
    import subprocess

    import yaml
    from mlflow import MlflowClient

    from orchestrator.tracking import workspace

    (tmp_path / "my_methods.py").write_text(textwrap.dedent(USER_METHOD))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(name="user-method", algorithms={
        "my_methods:MeansMethod": {"budgets": [1], "iterations": 4}}, evaluation={"networks": 1, "epochs": 150})))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "launch", str(spec), "--root",
                          str(tmp_path / "runs"), "--num-cpus", "2"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "experts: none" in res.stdout + res.stderr or not (tmp_path / "runs" / "trajectories").exists() or \
        not any((tmp_path / "runs" / "trajectories").rglob("*.arrow"))
    client = MlflowClient(workspace(tmp_path / "runs").tracking_uri)
    exp = client.get_experiment_by_name("user-method")
    runs = client.search_runs([exp.experiment_id], "tags.`orchestrate.role` = 'trial'")
    by = {r.data.tags["algorithm"]: r for r in runs}
    assert set(by) == {"random", "my_methods:MeansMethod"}
    mine = by["my_methods:MeansMethod"]
    assert mine.info.status == "FINISHED" and mine.data.metrics["final_syn_lr"] == pytest.approx(0.01)
    assert sorted(m.step for m in client.get_metric_history(mine.info.run_id, "loss")) == [1, 2, 3, 4]
    # the class means of digits train a network far above chance (10%)
    assert mine.data.metrics["acc_mean"] > 0.5


def test_orchestrate_methods_lists_kinds_experts_step_sizes_and_defaults():
    import json

    from click.testing import CliRunner

    from orchestrator.cli import main

    res = CliRunner().invoke(main, ["methods", "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert set(rows) >= {"random", "mtt", "mct", "dc", "dsa", "dm", "farzi"}
    assert rows["dm"]["kind"] == "image" and rows["dm"]["experts"] == "no" and rows["dm"]["evaluated_at"] == "lr 0.01"
    assert rows["mtt"]["experts"] == "yes" and rows["mtt"]["evaluated_at"] == "learned step size"
    assert rows["farzi"]["kind"] == "sequence" and rows["farzi"]["hyperparameters"]["latent_dim"]["default"] == 16
    assert "dsa" not in rows["dc"]["hyperparameters"]  # fixed by the method: DC is dsa=false, DSA dsa=true
    assert rows["random"]["baseline"] is True
    table = CliRunner().invoke(main, ["methods"])
    assert table.exit_code == 0 and "syn_steps" in table.output and "Distribution Matching" in table.output


@pytest.mark.slow
def test_cross_architecture_evaluation_at_the_final_evaluation_only(contexts):
    """``evaluation.models``: the final evaluation also trains each listed architecture (same
    seeds and protocol), as ``acc/<model>``; periodic ones only the spec's model. A model that
    cannot take the dataset's images is refused before anything runs, naming the key."""
    from dataclasses import replace

    from orchestrator.trial import _final_metrics

    ctx = contexts["image"]
    spec = {**ctx.spec, "evaluation": {**ctx.spec["evaluation"], "networks": 1, "epochs": 30,
                                       "models": ["mlp", "alexnet_bn"]}}
    syn, _ = ctx.task.random_set(spec, ctx.data, 5, torch.Generator().manual_seed(0))
    assert set(ctx.task.evaluate(spec, ctx.data, syn, "cpu")) == {"acc"}
    final = ctx.task.evaluate(spec, ctx.data, syn, "cpu", final=True)
    assert set(final) == {"acc", "acc/mlp", "acc/alexnet_bn"} and min(m for m, _ in final.values()) > 0.3, final
    keys = _final_metrics(replace(ctx, spec=spec), final)
    assert {"acc_mean", "acc_mean/mlp", "acc_std/alexnet_bn"} <= set(keys)
    with pytest.raises(SpecError, match=r"evaluation\.models: lenet cannot be built for digits \(1x8x8\)"):
        from orchestrator.sweep import check_budgets
        s = validate(tiny_spec(evaluation={"models": ["lenet"]}))
        check_budgets(s, s.task.load(s))
    with pytest.raises(SpecError, match=r"evaluation\.models: unknown model 'vit'"):
        validate(tiny_spec(evaluation={"models": ["vit"]}))
    assert validate(tiny_spec()).hash == validate(tiny_spec(evaluation={"models": []})).hash


@pytest.mark.parametrize("name,kind", [c for c in _cases() if not methods.get(c.values[0]).baseline])
def test_every_method_steps_under_bf16_autocast_and_keeps_its_set_in_its_dtype(contexts, name, kind):
    """``resources.precision: bf16`` runs a trial's steps under torch.autocast: every learning
    method's step still returns finite numbers and moves its set, whose tensors keep their dtype
    (the set, its optimiser and the evaluation stay in full precision)."""
    import math

    from orchestrator.trial import run_step

    ctx = contexts[kind]
    point = _point(name, kind, ctx)
    d = build_distiller(point, ctx, torch.device("cpu"), seed=3)
    before = [t.clone() for t in _tensors(d.synthetic())]
    metrics = run_step(d, torch.device("cpu"), "bf16")
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    after = _tensors(d.synthetic())
    assert [t.dtype for t in after] == [t.dtype for t in before]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("name,kind", [c for c in _cases() if c.id != "farzi-sequence"])  # Farzi: test_farzi
def test_a_real_start_and_the_random_baseline_name_the_training_rows_they_hold(contexts, name, kind):
    """``Method.start_record`` of a set that starts from real data (``pix_init: real``, the image
    methods' default) or is a random real subset: JSON-ready rows of the training data, in its own
    terms, that are exactly what the set holds before its first step. The random baseline holds
    the images a real start at the same seed draws (the paired comparison); a noise start reads
    none."""
    import json

    ctx = contexts[kind]
    m, point = methods.get(name), _point(name, kind, ctx)
    d = build_distiller(point, ctx, torch.device("cpu"), seed=3)
    rec = json.loads(json.dumps(m.start_record(d, ctx.task, ctx.data, ctx.spec["model"])))
    syn = d.synthetic()
    if kind == "image":
        assert set(rec) == {"init", "train_images"} and rec["init"] == "real"
        rows = torch.tensor(rec["train_images"])
        assert len(rows.unique()) == point["budget"] * ctx.data.info.num_classes
        assert torch.equal(syn.images.detach(), ctx.data.x_train[rows]) and torch.equal(syn.labels, ctx.data.y_train[rows])
        random = build_distiller({**point, "algorithm": "random", "iterations": 0, "hp": {}}, ctx, torch.device("cpu"), seed=3)
        assert methods.get("random").start_record(random, ctx.task, ctx.data, ctx.spec["model"]) == rec
        if "pix_init" in point["hp"]:
            noise = build_distiller({**point, "hp": {**point["hp"], "pix_init": "noise"}}, ctx, torch.device("cpu"), seed=3)
            assert m.start_record(noise, ctx.task, ctx.data, ctx.spec["model"]) is None
        else:
            assert m.baseline
    else:  # the random subset of a sequence task: rows of its training sequences, users by original id
        real = ctx.task.seq_task(ctx.data, ctx.spec["model"]["max_len"]).train
        assert rec["init"] == "real" and len(set(rec["rows"])) == point["budget"]
        assert torch.equal(syn.sequences, real[torch.tensor(rec["rows"])])
        ids = ctx.data.user_original_ids.tolist()
        assert [ids.index(u) for u in rec["users"]] == rec["rows"]
