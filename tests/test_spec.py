import copy
import dataclasses

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
    ("algorithms.mtt.hyperparameters.max_start_epoch", 10, "algorithms.mtt.hyperparameters.max_start_epoch",
     "beyond the experts' 10 epochs"),
    ("algorithms.mtt.hyperparameters.max_start_epoch", [2, 10], "algorithms.mtt.hyperparameters.max_start_epoch",
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
    assert s.task.kind == "sequence" and s.model["dim"] == 64 and s.expert_forms() == ["full"]
    hp = s.algorithms["farzi"]["hyperparameters"]
    assert hp["grad_mode"] == "reverse" and hp["seq_len"] == 20 and "budget" not in hp
    for name in ("farzi_ml100k", "farzi_ptb"):
        spec = load_spec(default_spec_path().with_name(f"{name}.yaml"))
        assert spec.task.kind == "sequence" and set(spec.algorithms) == {"farzi"}


@pytest.mark.parametrize("change, key, words", [
    (("dataset", {"name": "digits"}), "algorithms.farzi", "does not apply to the image dataset"),
    (("algorithms", {"mtt": {"budgets": [1]}}), "algorithms.mtt", "does not apply to the event-sequence"),
    (("algorithms", {"farzi": {"budgets": [10], "hyperparameters": {"seq_len": 40}}}),
     "algorithms.farzi.hyperparameters.seq_len", "exceeds model.max_len (20)"),
    (("algorithms", {"farzi": {"budgets": [10], "hyperparameters": {"grad_mode": "tesla"}}}),
     "algorithms.farzi.hyperparameters.grad_mode", "reverse or unrolled"),
    (("algorithms", {"farzi": {"budgets": [0]}}), "algorithms.farzi.budgets", "synthetic sequences"),
    (("algorithms", {"farzi": {"budgets": [10], "hyperparameters": {"objective": "match", "max_start_epoch": 4}}}),
     "algorithms.farzi.hyperparameters.max_start_epoch", "max_start_epoch (4) + expert_epochs (2) = 6 goes beyond"),
    (("algorithms", {"farzi": {"budgets": [10], "hyperparameters": {"objective": {"choice": ["loss", "match"]},
                                                                     "max_start_epoch": 2, "expert_epochs": 4}}}),
     "algorithms.farzi.hyperparameters.max_start_epoch", "objective match: the target is expert_epochs after"),
    (("algorithms", {"farzi": {"budgets": [10], "hyperparameters": {"inner_steps": [40, 60], "backward_steps": 50}}}),
     "algorithms.farzi.hyperparameters.backward_steps", "50 exceeds inner_steps (40)"),
    (("algorithms", {"farzi": {"budgets": [10], "hyperparameters": {"inner_dropout": [False, True]}}}),
     "algorithms.farzi.hyperparameters.inner_dropout", "model.dropout is 0"),
    (("algorithms", {"farzi": {"budgets": [10], "hyperparameters": {"inner_dropout": "yes"}}}),
     "algorithms.farzi.hyperparameters.inner_dropout", "true"),
    (("algorithms", {"farzi": {"budgets": [10], "hyperparameters": {"objective": "match", "outer_target": "teacher",
                                                                     "max_start_epoch": 1}}}),
     "algorithms.farzi.hyperparameters.outer_target", "objective match has none"),
    (("algorithms", {"farzi": {"budgets": [10], "hyperparameters": {"outer_target": "expert"}}}),
     "algorithms.farzi.hyperparameters.outer_target", "data or teacher"),
    (("algorithms", {"farzi": {"budgets": [10], "hyperparameters": {"teacher_experts": [1, 3]}}}),
     "algorithms.farzi.hyperparameters.teacher_experts", "3, but neither init nor outer_target is teacher"),
    (("algorithms", {"farzi": {"budgets": [10], "hyperparameters": {"init": "teacher", "teacher_experts": 9}}}),
     "algorithms.farzi.hyperparameters.teacher_experts", "9 exceeds experts.count"),
    (("algorithms", {"farzi": {"budgets": [10], "hyperparameters": {"unroll": "truncated"}}}),
     "algorithms.farzi.hyperparameters.unroll", "fixed or random"),
    (("algorithms", {"farzi": {"budgets": [10], "hyperparameters": {"objective": "matching"}}}),
     "algorithms.farzi.hyperparameters.objective", "loss or match"),
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


def test_inner_dropout_with_a_model_that_has_dropout():
    spec = copy.deepcopy(SEQ)
    spec["model"]["dropout"] = 0.2
    spec["algorithms"]["farzi"]["hyperparameters"]["inner_dropout"] = True
    assert validate(spec).algorithms["farzi"]["hyperparameters"]["inner_dropout"] is True
    assert validate(SEQ).algorithms["farzi"]["hyperparameters"].get("inner_dropout", False) is False


def test_per_budget_hyperparameters_override_the_shared_ones():
    raw = copy.deepcopy(BASE)
    raw["algorithms"]["mtt"]["hyperparameters"]["lr_img"] = [10, 100]
    raw["algorithms"]["mtt"]["per_budget"] = {5: {"lr_img": 1000, "max_start_epoch": 6}}
    spec = validate(raw)
    pts = [(p["budget"], p["hp"]["lr_img"], p["hp"]["max_start_epoch"]) for p in spec.trial_points()
           if p["algorithm"] == "mtt"]
    assert pts == [(1, 10, 4), (1, 100, 4), (5, 1000, 6)]
    raw["algorithms"]["mtt"]["per_budget"] = {7: {"lr_img": 1}, 5: {"max_start_epoch": 10, "lr_im": 1}}
    with pytest.raises(SpecError) as e:
        validate(raw, "pb.yaml")
    msgs = "\n".join(e.value.problems)
    assert "pb.yaml: algorithms.mtt.per_budget.7: is not one of the budgets [1, 5]" in msgs
    assert "pb.yaml: algorithms.mtt.per_budget.5.lr_im: unknown key (did you mean 'lr_img'?)" in msgs
    assert "pb.yaml: algorithms.mtt.per_budget.5.max_start_epoch: max_start_epoch (10) - 1 + expert_epochs (2)" in msgs


def test_every_shipped_search_space_is_valid():
    folder = default_spec_path().parent
    names = sorted(p.stem for p in folder.glob("*.yaml"))
    assert {"quickstart", "mnist", "cifar10", "mct_vs_mtt", "farzi_ml100k", "farzi_ptb"} <= set(names)
    for name in names:
        spec = load_spec(folder / f"{name}.yaml")
        assert spec.trial_points(), name


# --- hardening: names, duplicate keys, types, sweep size, the sampler's window ----------------------------

@pytest.mark.parametrize("name", ["../evil", "/tmp/elsewhere", "..", ".", "", "a/b", "a\\b", "two words",
                                  "tab\there", "nul\x00", "semi;colon", "a\u2215b"])
def test_path_like_names_are_refused(name):
    with pytest.raises(SpecError) as e:
        validate(with_change("name", name), "my.yaml")
    (problem,) = e.value.problems
    assert problem.startswith("my.yaml: name: ") and repr(name) in problem, problem


@pytest.mark.parametrize("name", ["t", "mtt-cifar10_ipc.1", ".hidden-ok", "café", "数据集", "Ünïcödé-2"])
def test_safe_names_are_accepted(name):
    assert validate(with_change("name", name)).name == name


def test_cli_refuses_a_path_like_name_before_anything_is_written(tmp_path):
    bad = tmp_path / "spec.yaml"
    bad.write_text(yaml.safe_dump(with_change("name", "../evil")))
    root = tmp_path / "runs"
    result = CliRunner().invoke(main, ["launch", str(bad), "--root", str(root)])
    assert result.exit_code == 2, result.output
    assert f"{bad}: name: " in result.output and "'../evil'" in result.output
    assert not root.exists() and not (tmp_path / "evil").exists()


def _unchecked(name: str):
    """A spec carrying a name that validation would refuse (as a Spec built in code could)."""
    return dataclasses.replace(validate(BASE, "my.yaml"), name=name)


@pytest.mark.parametrize("name", ["../evil", "..", ".", "", "a/../../b"])
def test_sweep_dir_stays_inside_the_tune_folder(tmp_path, name):
    from orchestrator.sweep import sweep_dir
    from orchestrator.tracking import workspace

    ws = workspace(tmp_path / "runs")
    assert sweep_dir(_unchecked("fine"), ws) == ws.tune / "fine"
    with pytest.raises(SpecError) as e:
        sweep_dir(_unchecked(name), ws)
    (problem,) = e.value.problems
    assert problem.startswith("my.yaml: name: ") and "outside" in problem, problem
    remote = dataclasses.replace(ws, storage="s3://bucket/runs")  # nothing is contacted
    assert sweep_dir(_unchecked("fine"), remote) == "s3://bucket/runs/tune/fine"
    with pytest.raises(SpecError, match="my.yaml: name: .*outside"):
        sweep_dir(_unchecked(name), remote)


def test_fresh_never_moves_a_folder_outside_the_store(tmp_path):
    from orchestrator.progress import Progress
    from orchestrator.sweep import _prepare
    from orchestrator.tracking import workspace

    mine = tmp_path / "my-thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("precious")
    ws = workspace(tmp_path / "runs")
    with pytest.raises(SpecError, match="my.yaml: name: "):
        _prepare(_unchecked(str(mine)), ws, True, Progress())
    assert (mine / "chapter1.tex").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-thesis", "runs"]
    # a proper name is still moved aside, next to itself inside tune/
    (ws.tune / "fine").mkdir(parents=True)
    exp_dir, state = _prepare(_unchecked("fine"), ws, True, Progress())
    assert exp_dir == ws.tune / "fine" and state is None
    (aside,) = [p.name for p in ws.tune.iterdir()]
    assert aside.startswith("fine.replaced-")


def test_duplicate_keys_name_both_lines(tmp_path):
    from orchestrator.spec import load_spec

    p = tmp_path / "dup.yaml"
    p.write_text("name: first\n"              # 1
                 "dataset: {name: digits}\n"  # 2
                 "experts:\n"                 # 3
                 "  count: 2\n"               # 4
                 "  epochs: 20\n"             # 5
                 "  count: 3\n"               # 6
                 "algorithms:\n"              # 7
                 "  mtt:\n"                   # 8
                 "    budgets: [1]\n"         # 9
                 "    per_budget: {1: {lr_img: 10}, 1: {lr_img: 20}}\n"  # 10
                 "name: second\n")            # 11
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert e.value.problems == [f"{p}: experts.count: duplicate key, lines 4 and 6",
                                f"{p}: algorithms.mtt.per_budget.1: duplicate key, lines 10 and 10",
                                f"{p}: name: duplicate key, lines 1 and 11"]
    p.write_text(p.read_text().replace("epochs: 20", "epochs: 20\n  dsa: 1"))  # and the other problems with them
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert len(e.value.problems) == 4 and e.value.problems[3] == f"{p}: experts.dsa: must be bool, got int 1"


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    p = tmp_path / "merge.yaml"
    p.write_text("name: m\ndataset: {name: digits}\nexperts: {count: 2, epochs: 10}\n"
                 "model:\n  <<: {depth: 2, width: 16}\n  width: 8\n"
                 "algorithms: {mtt: {budgets: [1], hyperparameters: {max_start_epoch: 4}}}\n")
    assert load_spec(p).model == {"name": "convnet", "depth": 2, "width": 8, "norm": "instancenorm",
                                  "pooling": "avgpooling"}


@pytest.mark.parametrize("text, value", [
    ("1e-6", 1e-6), ("1E5", 1e5), (".5", 0.5), ("-2e+3", -2000.0), ("1.0e5", 1e5), ("+3.5E-2", 0.035),
    ("1.0e-7", 1e-7), ("10", 10), ("-3", -3), ("1e", "1e"), ("e5", "e5"), ("09", "09"), ("1e-6x", "1e-6x"),
])
def test_numbers_are_read_as_yaml_1_2_does(tmp_path, text, value):
    from orchestrator.spec import read_yaml

    got = read_yaml(f"a: {text}\nb: [{text}]\n", "n.yaml")
    assert got == {"a": value, "b": [value]} and type(got["a"]) is type(value)


def test_lr_lr_written_1e_6_is_a_number(tmp_path):
    p = tmp_path / "lr.yaml"
    raw = yaml.safe_dump(BASE).replace("max_start_epoch: 4", "max_start_epoch: 4\n      lr_lr: 1e-6\n"
                                       "      lr_img: {loguniform: [1e1, 1E3]}")
    p.write_text(raw)
    hp = load_spec(p).algorithms["mtt"]["hyperparameters"]
    assert hp["lr_lr"] == 1e-6 and hp["lr_img"] == {"loguniform": [10.0, 1000.0]}


HP = "algorithms.mtt.hyperparameters"


@pytest.mark.parametrize("path, value, words", [
    (f"{HP}.syn_steps", "two", "must be a number, got str 'two'"),
    (f"{HP}.lr_img", [30, "abc"], "must be a number, got str 'abc'"),
    (f"{HP}.lr_img", {"choice": [30, "x"]}, "must be a number, got str 'x'"),
    (f"{HP}.lr_img", [30, None], "must be a number, got null"),
    (f"{HP}.lr_img", [30, [1, 2]], "nested list [1, 2]"),
    (f"{HP}.lr_img", True, "must be a number, got bool True"),
    (f"{HP}.lr_img", {"choice": [30, [1, 2]]}, "plain values, got [1, 2]"),
    (f"{HP}.lr_img", {"uniform": [1, float("inf")]}, "finite"),
    (f"{HP}.lr_lr", float("nan"), "finite"),
    (f"{HP}.max_start_epoch", {"randint": [1, "5"]}, "'5'"),
    (f"{HP}.max_start_epoch", {"uniform": [1, 2], "choice": [1]}, "one-key mapping"),
    (f"{HP}.dsa", "yes", "must be true or false, got str 'yes'"),
    (f"{HP}.dsa", [True, "no"], "must be true or false, got str 'no'"),
    (f"{HP}.dsa", {"uniform": [0, 1]}, "uniform draws numbers"),
    (f"{HP}.pix_init", 3, "must be a string, got int 3"),
    (f"{HP}.pix_init", {"choice": ["real", "nois"]}, "must be real or noise, got 'nois'"),
    (f"{HP}.grad_mode", None, "must be a string, got null"),
    (f"{HP}.batch_syn", "all", "must be a number or null, got str 'all'"),
    ("experts.dsa", "yes", "must be bool, got str 'yes'"),
    ("evaluation.dsa", "yes", "must be bool, got str 'yes'"),
])
def test_wrong_types_name_the_key_and_the_value(path, value, words):
    with pytest.raises(SpecError) as e:
        validate(with_change(path, value), "my.yaml")
    assert any(p.startswith(f"my.yaml: {path}: ") and words in p for p in e.value.problems), e.value.problems


def test_a_bad_element_is_reported_with_every_other_one():
    spec = with_change(f"{HP}.lr_img", [30, None, [1, 2]])
    with pytest.raises(SpecError) as e:
        validate(spec, "my.yaml")
    assert [p.split(": ", 2)[2].split(",")[0] for p in e.value.problems] == \
        ["must be a number", "a grid is a flat list of values"]


def test_null_is_allowed_where_the_default_is_null_and_mct_farzi_types():
    spec = with_change(f"{HP}.batch_syn", [None, 4])
    assert validate(spec).algorithms["mtt"]["hyperparameters"]["batch_syn"] == [None, 4]
    mct = copy.deepcopy(BASE)
    mct["algorithms"] = {"mct": {"budgets": [1], "hyperparameters": {"smooth": "yes", "continuous": 1,
                                                                     "expert_epochs": {"uniform": [1.5, 3]}}}}
    with pytest.raises(SpecError) as e:
        validate(mct, "m.yaml")
    assert sorted(p.split(": ")[1] for p in e.value.problems) == [
        "algorithms.mct.hyperparameters.continuous", "algorithms.mct.hyperparameters.smooth"]
    seq = copy.deepcopy(SEQ)
    seq["algorithms"]["farzi"]["hyperparameters"].update(second_moment="no", precision=64, inner_lr="1e-3")
    with pytest.raises(SpecError) as e:
        validate(seq, "f.yaml")
    msgs = "\n".join(e.value.problems)
    assert "f.yaml: algorithms.farzi.hyperparameters.second_moment: must be true or false, got str 'no'" in msgs
    assert "f.yaml: algorithms.farzi.hyperparameters.precision: must be a string, got int 64" in msgs
    assert "f.yaml: algorithms.farzi.hyperparameters.inner_lr: must be a number, got str '1e-3'" in msgs


def test_sweep_size_is_counted_without_expanding_it():
    raw = copy.deepcopy(BASE)
    raw["algorithms"]["mtt"]["hyperparameters"].update(
        {k: [float(v) for v in range(1, 11)] for k in ("lr_img", "lr_lr", "lr_teacher", "momentum")})
    raw["algorithms"]["mtt"]["hyperparameters"].update(syn_steps=list(range(1, 11)), batch_syn=list(range(1, 11)))
    with pytest.raises(SpecError) as e:
        validate(raw, "big.yaml")
    (problem,) = e.value.problems
    assert problem.startswith("big.yaml: resources.max_trials: ") and "2000002 trials" in problem \
        and "limit of 10000" in problem, problem
    raw["resources"] = {"max_trials": 2_000_002}
    assert validate(raw).trial_count() == 2_000_002


def test_trial_count_matches_the_points_tune_runs():
    raw = copy.deepcopy(BASE)
    raw["num_samples"] = 3
    raw["algorithms"]["mtt"]["hyperparameters"].update(lr_img=[10, 100, 1000], lr_lr={"loguniform": [1e-7, 1e-5]})
    raw["algorithms"]["mtt"]["per_budget"] = {5: {"syn_steps": [2, 4], "lr_img": 50}}
    spec = validate(raw)
    assert spec.trial_count() == len(spec.trial_points()) * 3 == (2 + 3 + 2) * 3
    raw["resources"] = {"max_trials": 20}
    with pytest.raises(SpecError, match=r"resources.max_trials: .*21 trials .*limit of 20"):
        validate(raw, "s.yaml")
    for bad in (0, -1, 2.5, True, "many"):
        raw["resources"] = {"max_trials": bad}
        with pytest.raises(SpecError, match="s.yaml: resources.max_trials: "):
            validate(raw, "s.yaml")


def test_search_sweeps_count_num_samples():
    raw = copy.deepcopy(BASE)
    raw.update(search={"name": "optuna"}, baselines=[], num_samples=10001)
    raw["algorithms"]["mtt"].update(budgets=[1], hyperparameters={"lr_img": [10, 100], "expert_epochs": 2,
                                                                   "max_start_epoch": 4})
    with pytest.raises(SpecError, match="10001 trials"):
        validate(raw, "o.yaml")


@pytest.mark.parametrize("start, ok", [(9, True), (10, False)])
def test_mtt_window_edge_matches_the_sampler(start, ok):
    """Starts are drawn from [0, max_start_epoch): the last start plus expert_epochs must be a checkpoint."""
    spec = with_change(f"{HP}.max_start_epoch", start)  # experts.epochs 10, expert_epochs 2
    if ok:
        assert validate(spec).algorithms["mtt"]["hyperparameters"]["max_start_epoch"] == 9
        return
    with pytest.raises(SpecError) as e:
        validate(spec, "my.yaml")
    assert e.value.problems == [f"my.yaml: {HP}.max_start_epoch: max_start_epoch (10) - 1 + expert_epochs (2) = 11 "
                                "goes beyond the experts' 10 epochs (experts.epochs): starts are drawn from "
                                "[0, max_start_epoch)"]


def test_per_budget_values_are_typed_too_and_max_trials_leaves_the_hash_alone():
    raw = copy.deepcopy(BASE)
    raw["algorithms"]["mtt"]["per_budget"] = {5: {"syn_steps": "two", "lr_img": {"choice": [1, None]}}}
    with pytest.raises(SpecError) as e:
        validate(raw, "pb.yaml")
    assert e.value.problems == [
        "pb.yaml: algorithms.mtt.per_budget.5.syn_steps: must be a number, got str 'two'",
        "pb.yaml: algorithms.mtt.per_budget.5.lr_img: must be a number, got null (in {choice: [1, None]})"]
    # max_trials is a guard, not part of the sweep: a sweep launched before it existed still resumes
    assert validate(BASE).hash == validate(with_change("resources.max_trials", 50)).hash


def test_checkpoint_interval_and_time_budget_leave_the_hash_alone_and_the_old_hash_is_still_accepted():
    """How often a trial saves its state, and how long one launch may run, change none of its
    numbers (a trial replays from the state and random generators it saved), so a sweep resumes
    after they change. Specs that set them before they left the hash keep that hash among
    ``hashes``; a default spec has one."""
    default = validate(BASE)
    assert default.checkpoint_interval == 50 and default.time_budget_s is None
    assert default.hashes == (default.hash,)
    for key, value, default_value in [("checkpoint_interval", v, 50) for v in (1, 5, 50, 1000)] + [
            ("time_budget_s", v, None) for v in (None, 60, 3600.5)]:
        spec = validate(with_change(key, value))
        assert getattr(spec, key) == value and spec.hash == default.hash
        assert len(spec.hashes) == (1 if value == default_value else 2) and spec.hashes[0] == default.hash
    # checkpoints by age, added after: never part of the hash
    assert default.checkpoint_interval_s == 600
    for value in (None, 0.5, 600, 7200):
        spec = validate(with_change("checkpoint_interval_s", value))
        assert spec.checkpoint_interval_s == value and spec.hashes == default.hashes
    with pytest.raises(SpecError) as e:
        validate(with_change("checkpoint_interval_s", 0), "s.yaml")
    assert e.value.problems == ["s.yaml: checkpoint_interval_s: must be > 0 or null"]
    # the second is the hash of before: the whole spec, checkpoint_interval included
    assert validate(with_change("checkpoint_interval", 5)).hashes[1] != validate(with_change("checkpoint_interval", 10)).hashes[1]
    # what a trial computes still changes it
    assert validate(with_change("seed", 1)).hash != default.hash


def test_evaluation_dsa_strategy_is_checked_and_only_a_non_default_changes_the_hash():
    default = validate(BASE)
    assert default.evaluation["dsa_strategy"] == "color_crop_cutout_flip_scale_rotate"
    assert validate(with_change("evaluation.dsa_strategy", "color_crop_cutout_flip_scale_rotate")).hash == default.hash
    digits = validate(with_change("evaluation.dsa_strategy", "color_crop_cutout_scale_rotate"))
    assert digits.hash != default.hash
    with pytest.raises(SpecError) as e:
        validate(with_change("evaluation.dsa_strategy", "crop_mirror"), "s.yaml")
    assert e.value.problems == ["s.yaml: evaluation.dsa_strategy: unknown DSA families ['mirror'] in strategy "
                                "'crop_mirror'; known: ('color', 'crop', 'cutout', 'flip', 'scale', 'rotate')"]


def test_evaluation_dc_strategy_is_checked_and_only_a_non_default_changes_the_hash():
    default = validate(BASE)
    assert default.evaluation["dc_strategy"] is None  # DSA's augmentation, as before
    assert validate(with_change("evaluation.dc_strategy", None)).hash == default.hash
    assert validate(with_change("evaluation.dc_strategy", "crop_scale_rotate")).hash != default.hash
    with pytest.raises(SpecError) as e:
        validate(with_change("evaluation.dc_strategy", "crop_color"), "s.yaml")
    assert e.value.problems == ["s.yaml: evaluation.dc_strategy: unknown DC augmentation families ['color'] in "
                                "strategy 'crop_color'; known: ('crop', 'scale', 'rotate', 'noise')"]


@pytest.mark.parametrize("path", ["experts.dsa_strategy", "algorithms.mtt.hyperparameters.dsa_strategy"])
def test_training_dsa_strategy_default_keeps_the_hash_and_the_experts_store_key(path):
    """Experts and distillers augment with a spec's strategy (DC/DSA's no-flip one for digits); the
    default, written or not, is the spec of before: its hash, its experts (resumes, reuses)."""
    from orchestrator.experts import expert_key

    default = validate(BASE)
    data = type("D", (), {"digest": lambda self: "d"})()
    assert validate(with_change(path, "color_crop_cutout_flip_scale_rotate")).hash == default.hash
    digits = validate(with_change(path, "color_crop_cutout_scale_rotate"))
    assert digits.hash != default.hash
    if path.startswith("experts"):
        assert "dsa_strategy" not in default.expert_training()
        assert digits.expert_training()["dsa_strategy"] == "color_crop_cutout_scale_rotate"
        assert expert_key(digits, data) != expert_key(default, data)
    else:
        assert digits.algorithms["mtt"]["hyperparameters"]["dsa_strategy"] == "color_crop_cutout_scale_rotate"
        assert expert_key(digits, data) == expert_key(default, data)  # the same experts serve both
    with pytest.raises(SpecError) as e:
        validate(with_change(path, "crop_mirror"), "s.yaml")
    [problem] = e.value.problems  # a hyperparameter's message also repeats the value (", got ...")
    assert problem.startswith(f"s.yaml: {path}: unknown DSA families ['mirror'] in strategy 'crop_mirror'; known: ")
