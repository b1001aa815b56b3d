import copy

import pytest
import yaml
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.spec import SpecError, default_spec_path, load_spec, validate

BASE = {
    "name": "t",
    "dataset": {"name": "digits"},
    "model": {"depth": 2, "width": 8},
    "experts": {"count": 2, "epochs": 10},
    "algorithms": {"mtt": {"budgets": [1, 5], "iterations": 3,
                           "hyperparameters": {"expert_epochs": 2, "max_start_epoch": 4}}},
}


def with_change(path: str, value, delete=False):
    spec = copy.deepcopy(BASE)
    keys = path.split(".")
    node = spec
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    if delete:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return spec


def test_quickstart_is_valid_and_defaults_are_filled():
    spec = load_spec()
    assert spec.path == str(default_spec_path())
    assert spec.dataset["name"] == "digits" and spec.algorithms["mtt"]["budgets"] == [1, 10]
    assert spec.algorithms["mtt"]["hyperparameters"]["lr_teacher"] == spec.experts["lr"]
    assert len(spec.hash) == 16 and spec.hash == load_spec().hash


@pytest.mark.parametrize("path,value,key,words", [
    ("experts.epoch", 5, "experts.epoch", "did you mean 'epochs'"),
    ("extra", 1, "extra", "unknown key"),
    ("experts.count", "ten", "experts.count", "must be int"),
    ("experts.lr", -1.0, "experts.lr", "must be > 0"),
    ("experts.dsa", 3, "experts.dsa", "must be bool"),
    ("dataset.name", "imagenet", "dataset.name", "unknown dataset"),
    ("algorithms.mtt.budgets", [], "algorithms.mtt.budgets", "non-empty"),
    ("algorithms.mtt.budgets", [0, 1], "algorithms.mtt.budgets", "positive integer"),
    ("algorithms.mtt.iterations", 0, "algorithms.mtt.iterations", "positive integer"),
    ("algorithms.mct2", {"budgets": [1]}, "algorithms.mct2", "unknown algorithm"),
    ("algorithms.mtt.hyperparameters.lr_imgs", 10, "algorithms.mtt.hyperparameters.lr_imgs", "lr_img"),
    ("algorithms.mtt.hyperparameters.max_start_epoch", 9, "algorithms.mtt.hyperparameters.max_start_epoch",
     "beyond the experts' 10 epochs"),
    ("algorithms.mtt.hyperparameters.max_start_epoch", [2, 9], "algorithms.mtt.hyperparameters.max_start_epoch",
     "beyond"),
    ("algorithms.mtt.hyperparameters.lr_lr", {"loguniform": [0, 1]}, "algorithms.mtt.hyperparameters.lr_lr",
     "low > 0"),
    ("algorithms.mtt.hyperparameters.lr_img", {"gaussian": [0, 1]}, "algorithms.mtt.hyperparameters.lr_img",
     "one-key mapping"),
    ("algorithms.mtt.hyperparameters.syn_steps", 2.5, "algorithms.mtt.hyperparameters.syn_steps", "integer"),
    ("resources.gpus_per_trial", -1, "resources.gpus_per_trial", "'auto', a number"),
    ("name", None, "name", "is required"),
])
def test_errors_name_the_file_and_the_key(path, value, key, words):
    spec = with_change(path, value, delete=value is None)
    with pytest.raises(SpecError) as e:
        validate(spec, "my.yaml")
    msg = str(e.value)
    assert f"my.yaml: {key}:" in msg and words in msg, msg


def test_all_problems_are_reported_at_once():
    spec = with_change("experts.epoch", 1)
    spec["model"]["widht"] = 3
    with pytest.raises(SpecError) as e:
        validate(spec, "x.yaml")
    assert len(e.value.problems) == 2


def test_grids_and_distributions_expand_into_trials():
    spec = with_change("algorithms.mtt.hyperparameters.lr_img", [10, 100])
    spec["algorithms"]["mtt"]["hyperparameters"]["lr_lr"] = {"loguniform": [1e-7, 1e-5]}
    points = validate(spec).trial_points()
    assert [(p["algorithm"], p["budget"]) for p in points] == [("random", 1), ("random", 5), ("mtt", 1),
                                                                ("mtt", 1), ("mtt", 5), ("mtt", 5)]
    mtt = [p for p in points if p["algorithm"] == "mtt"]
    assert sorted(p["hp"]["lr_img"] for p in mtt) == [10, 10, 100, 100]
    assert all(p["hp"]["lr_lr"] == {"loguniform": [1e-7, 1e-5]} for p in mtt)  # sampled by Tune


def test_cli_refuses_a_bad_spec_before_anything_runs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_change("experts.epoch", 5)))
    root = tmp_path / "runs"
    result = CliRunner().invoke(main, ["launch", str(bad), "--root", str(root)])
    assert result.exit_code == 2
    assert f"{bad}: experts.epoch: unknown key" in result.output
    assert not root.exists()  # nothing was created


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "nope.yaml")
    p = tmp_path / "broken.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="broken.yaml: not valid YAML"):
        load_spec(p)
    p.write_text("!!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(SpecError, match="not valid YAML"):  # safe_load refuses Python tags
        load_spec(p)


def test_mct_spec_and_the_forms_the_experts_keep():
    spec = copy.deepcopy(BASE)
    spec["algorithms"]["mct"] = {"budgets": [1], "iterations": 2,
                                 "hyperparameters": {"expert_epochs": 12.5, "max_start_epoch": 9.5}}
    s = validate(spec)
    assert s.expert_forms() == ["full"] and "keep" not in s.expert_training()
    spec["experts"]["keep"] = ["convex"]
    with pytest.raises(SpecError) as e:  # MTT needs the full trajectories
        validate(spec)
    assert "experts.keep: mtt matches full trajectories" in str(e.value)
    del spec["algorithms"]["mtt"]
    assert validate(spec).expert_forms() == ["convex-w2-path"]
    spec["algorithms"]["mct"]["hyperparameters"]["waypoints"] = 4
    with pytest.raises(SpecError, match="hyperparameters.waypoints: is 4 but the experts keep only"):
        validate(spec)
    spec["algorithms"]["mct"]["hyperparameters"]["waypoints"] = 2
    spec["algorithms"]["mct"]["hyperparameters"]["max_start_epoch"] = 10.5
    with pytest.raises(SpecError, match=r"max_start_epoch \(10.5\) goes beyond the experts' 10 epochs"):
        validate(spec)


SEQ = {
    "name": "s",
    "dataset": {"name": "ml-100k"},
    "model": {"name": "sasrec", "max_len": 20},
    "experts": {"count": 2, "epochs": 5},
    "algorithms": {"farzi": {"budgets": [10], "iterations": 3, "hyperparameters": {"seq_len": 20}}},
}


def test_farzi_spec_and_shipped_sequence_specs_are_valid():
    s = validate(SEQ)
    assert s.sequences and s.model["dim"] == 64 and s.expert_forms() == ["full"]
    hp = s.algorithms["farzi"]["hyperparameters"]
    assert hp["grad_mode"] == "reverse" and hp["seq_len"] == 20 and "budget" not in hp
    for name in ("farzi_ml100k", "farzi_ptb"):
        spec = load_spec(default_spec_path().with_name(f"{name}.yaml"))
        assert spec.sequences and set(spec.algorithms) == {"farzi"}


@pytest.mark.parametrize("change, key, words", [
    (("dataset", {"name": "digits"}), "algorithms.farzi", "does not apply to the image dataset"),
    (("algorithms", {"mtt": {"budgets": [1]}}), "algorithms.mtt", "does not apply to the event-sequence"),
    (("algorithms", {"farzi": {"budgets": [10], "hyperparameters": {"seq_len": 40}}}),
     "algorithms.farzi.hyperparameters.seq_len", "exceeds model.max_len (20)"),
    (("algorithms", {"farzi": {"budgets": [10], "hyperparameters": {"grad_mode": "tesla"}}}),
     "algorithms.farzi.hyperparameters.grad_mode", "reverse, unrolled"),
    (("algorithms", {"farzi": {"budgets": [0]}}), "algorithms.farzi.budgets", "synthetic sequences"),
    (("model", {"name": "convnet"}), "model.name", "sasrec, transformer_lm"),
    (("experts", {"keep": ["convex"]}), "experts.keep", "full trajectories only"),
    (("evaluation", {"dsa": True}), "evaluation.dsa", "unknown key"),
])
def test_sequence_spec_errors_name_the_key(change, key, words):
    spec = copy.deepcopy(SEQ)
    spec[change[0]] = change[1]
    if change[0] == "dataset":  # an image dataset with the sequence sections: the model is wrong too
        spec["model"] = {"depth": 2}
    with pytest.raises(SpecError) as e:
        validate(spec, "seq.yaml")
    assert any(p.startswith(f"seq.yaml: {key}:") and words in p for p in e.value.problems), e.value.problems


def test_per_budget_hyperparameters_override_the_shared_ones():
    raw = copy.deepcopy(BASE)
    raw["algorithms"]["mtt"]["hyperparameters"]["lr_img"] = [10, 100]
    raw["algorithms"]["mtt"]["per_budget"] = {5: {"lr_img": 1000, "max_start_epoch": 6}}
    spec = validate(raw)
    pts = [(p["budget"], p["hp"]["lr_img"], p["hp"]["max_start_epoch"]) for p in spec.trial_points()
           if p["algorithm"] == "mtt"]
    assert pts == [(1, 10, 4), (1, 100, 4), (5, 1000, 6)]
    raw["algorithms"]["mtt"]["per_budget"] = {7: {"lr_img": 1}, 5: {"max_start_epoch": 9, "lr_im": 1}}
    with pytest.raises(SpecError) as e:
        validate(raw, "pb.yaml")
    msgs = "\n".join(e.value.problems)
    assert "pb.yaml: algorithms.mtt.per_budget.7: is not one of the budgets [1, 5]" in msgs
    assert "pb.yaml: algorithms.mtt.per_budget.5.lr_im: unknown key (did you mean 'lr_img'?)" in msgs
    assert "pb.yaml: algorithms.mtt.per_budget.5.max_start_epoch: max_start_epoch (9) + expert_epochs (2)" in msgs


def test_every_shipped_search_space_is_valid():
    folder = default_spec_path().parent
    names = sorted(p.stem for p in folder.glob("*.yaml"))
    assert {"quickstart", "mnist", "cifar10", "mct_vs_mtt", "farzi_ml100k", "farzi_ptb"} <= set(names)
    for name in names:
        spec = load_spec(folder / f"{name}.yaml")
        assert spec.trial_points(), name
