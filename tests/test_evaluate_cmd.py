"""`orchestrate evaluate FILE.safetensors`: a set in the export contract evaluated on its own, on
digits with a 1-block ConvNet of width 8 and a few epochs (seconds), and on a generated
MovieLens-format folder for sequence sets."""
import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from algorithms.base import SyntheticSet
from algorithms.evaluate import EvalConfig, evaluate_set, random_real_subset, random_subset_like
from algorithms.experts import ExpertConfig, train_expert
from algorithms.networks import manifest_of, seeded_network
from orchestrator.artifacts import file_model, read_synthetic, save_sequences, save_synthetic
from orchestrator.cli import main
from orchestrator.datasets import load_dataset
from orchestrator.evaluate import EvaluateError
from orchestrator.evaluate_images import parse_models
from tests.conftest import tiny_spec

SMALL = {"name": "convnet", "depth": 1, "width": 8, "norm": "instancenorm", "pooling": "avgpooling"}
FAST = ["--networks", "2", "--epochs", "3"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def real_set(digits, per_class=1, seed=5, lr=0.02) -> SyntheticSet:
    x, y = random_real_subset(digits.x_train, digits.y_train, per_class, 10, torch.Generator().manual_seed(seed))
    return SyntheticSet(x, y, lr)


@pytest.fixture
def set_file(tmp_path, digits):
    """A set of real digits images (1 per class) written with save_synthetic, the small ConvNet recorded."""
    return save_synthetic(tmp_path / "set.safetensors", real_set(digits), digits.info, "mtt", {"run_id": "r0"},
                          model=SMALL)


def evaluate(*args, catch=True):
    return CliRunner().invoke(main, ["evaluate", *map(str, args)], catch_exceptions=catch)


def report_of(res) -> dict:
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


# -- the table, the JSON, equality with evaluate_set ---------------------------------------------------------
def test_table_shows_the_set_and_the_random_subset(set_file):
    res = evaluate(set_file, *FAST)
    assert res.exit_code == 0, res.output
    rows = {line.split("│")[2].strip(): line for line in res.stdout.splitlines() if line.startswith("│")}
    assert set(rows) == {"the set", "random real subset", "full data (experts)"}
    for what in ("the set", "random real subset"):
        assert "±" in rows[what] and "convnet" in rows[what] and "0.02" in rows[what]
    assert rows["full data (experts)"].count(" - ") >= 2  # no --spec: not known
    assert "the random subset at lr 0.02 (no --spec: the set's lr, the file's lr)" in res.stdout
    assert ("model convnet: convnet (depth 1, width 8, norm instancenorm, pooling avgpooling), the file's model"
            in res.stdout)
    assert "protocol: 2 fresh networks per row, 3 epochs, SGD momentum 0.9" in res.stdout


def test_json_numbers_equal_evaluate_set_with_the_same_seeds(set_file, digits):
    rep = report_of(evaluate(set_file, *FAST, "--format", "json"))
    syn, rnd, full = rep["rows"]
    assert (syn["trained_on"], rnd["trained_on"], full["trained_on"]) == ("synthetic", "random", "full_data")
    assert len(syn["acc"]) == 2 and len(rnd["acc"]) == 2 and syn["seeds"] == [17, 18] == rnd["seeds"]
    assert full["networks"] == 0 and "acc_mean" not in full
    cfg = EvalConfig(networks=2, epochs=3)
    tensors, _ = read_synthetic(set_file)
    direct = evaluate_set(SMALL, digits.info, tensors["images"], tensors["labels"], float(tensors["lr"]),
                          digits.x_test, digits.y_test, cfg, seed=17)
    assert syn["acc"] == direct.accs and syn["acc_mean"] == direct.mean and syn["acc_std"] == direct.std
    # the random subset is the sweep's random baseline of budget 1 (seed 0 * 7919 + 1), at the set's lr here
    x, y = random_real_subset(digits.x_train, digits.y_train, 1, 10, torch.Generator().manual_seed(1))
    base = evaluate_set(SMALL, digits.info, x, y, float(tensors["lr"]), digits.x_test, digits.y_test, cfg, seed=17)
    assert rnd["acc"] == base.accs and rnd["lr"] == pytest.approx(0.02)
    assert rep["random_subset"]["seed"] == 1 and rep["per_class"] == [1] * 10
    assert rep["protocol"]["aug"] == "dsa" and rep["protocol"]["epochs"] == 3 and rep["source_run_id"] == "r0"
    assert rep["models"] == {"convnet": SMALL} and rep["metrics"] == ["acc"]


def test_seed_and_aug_options(set_file, digits):
    rep = report_of(evaluate(set_file, "--networks", "1", "--epochs", "2", "--seed", "40", "--aug", "none",
                             "--lr", "0.05", "--format", "json"))
    tensors, _ = read_synthetic(set_file)
    direct = evaluate_set(SMALL, digits.info, tensors["images"], tensors["labels"], 0.05, digits.x_test,
                          digits.y_test, EvalConfig(networks=1, epochs=2, dsa=False), seed=40)
    assert rep["rows"][0]["acc"] == direct.accs and rep["lr"]["set_from"] == "--lr"


def test_dsa_strategy_option_and_spec_key(set_file, digits, write_spec, tmp_path):
    """DC/DSA's authors drop flip for digits: --dsa-strategy (or the spec's evaluation.dsa_strategy)
    sets DSA's families; the default is the strategy with flip, as before."""
    tensors, _ = read_synthetic(set_file)
    args = (SMALL, digits.info, tensors["images"], tensors["labels"], float(tensors["lr"]), digits.x_test, digits.y_test)
    no_flip = "color_crop_cutout_scale_rotate"
    direct = {s: evaluate_set(*args, EvalConfig(networks=2, epochs=3, dsa_strategy=s), seed=17).accs
              for s in (no_flip, "flip")}
    assert direct[no_flip] != direct["flip"]  # the families change what the networks see
    rep = report_of(evaluate(set_file, *FAST, "--dsa-strategy", no_flip, "--format", "json"))
    assert rep["rows"][0]["acc"] == direct[no_flip] and rep["protocol"]["dsa_strategy"] == no_flip
    default = report_of(evaluate(set_file, *FAST, "--format", "json"))
    assert default["protocol"]["dsa_strategy"] == "color_crop_cutout_flip_scale_rotate"
    assert default["rows"][0]["acc"] == evaluate_set(*args, EvalConfig(networks=2, epochs=3), seed=17).accs
    spec = write_spec(tiny_spec(evaluation={"dsa_strategy": "flip"}))
    rep = report_of(evaluate(set_file, *FAST, "--spec", spec, "--root", tmp_path / "runs", "--seed", "17",
                             "--format", "json"))
    assert rep["protocol"]["dsa_strategy"] == "flip" and rep["rows"][0]["acc"] == direct["flip"]
    res = evaluate(set_file, *FAST, "--dsa-strategy", "crop_mirror")
    assert res.exit_code == 2 and "--dsa-strategy crop_mirror" in res.output and "mirror" in res.output


def test_dc_augmentation_option_and_spec_key(set_file, digits, write_spec, tmp_path):
    """--aug dc trains on the set with DC's own per-image augmentation (how DC's authors evaluate DC
    sets; crop_scale_rotate unless --dc-strategy or the spec's evaluation.dc_strategy says otherwise):
    the numbers of evaluate_set with EvalConfig.dc_strategy, other than DSA's."""
    tensors, _ = read_synthetic(set_file)
    args = (SMALL, digits.info, tensors["images"], tensors["labels"], float(tensors["lr"]), digits.x_test, digits.y_test)
    direct = {s: evaluate_set(*args, EvalConfig(networks=2, epochs=3, dc_strategy=s), seed=17).accs
              for s in ("crop_scale_rotate", "rotate")}
    assert direct["crop_scale_rotate"] != evaluate_set(*args, EvalConfig(networks=2, epochs=3), seed=17).accs
    rep = report_of(evaluate(set_file, *FAST, "--aug", "dc", "--format", "json"))
    assert rep["protocol"]["aug"] == "dc" and rep["protocol"]["dc_strategy"] == "crop_scale_rotate"
    assert rep["rows"][0]["acc"] == direct["crop_scale_rotate"]
    assert "DC's augmentation (crop_scale_rotate)" in evaluate(set_file, *FAST, "--aug", "dc").output
    rep = report_of(evaluate(set_file, *FAST, "--aug", "dc", "--dc-strategy", "rotate", "--format", "json"))
    assert rep["rows"][0]["acc"] == direct["rotate"]
    spec = write_spec(tiny_spec(evaluation={"dc_strategy": "rotate"}))  # the spec's key selects DC's augmentation
    rep = report_of(evaluate(set_file, *FAST, "--spec", spec, "--root", tmp_path / "runs", "--seed", "17",
                             "--format", "json"))
    assert rep["protocol"]["aug"] == "dc" and rep["rows"][0]["acc"] == direct["rotate"]
    res = evaluate(set_file, *FAST, "--aug", "dc", "--dc-strategy", "crop_color")
    assert res.exit_code == 2 and "--dc-strategy crop_color" in res.output and "color" in res.output


def test_a_sweeps_evaluation_follows_the_specs_dc_strategy(digits):
    """The trials' evaluation (the image task) trains with DC's augmentation when the spec's
    evaluation.dc_strategy names one: the same numbers as evaluate_set with it."""
    from orchestrator.spec import eval_seed, validate
    from orchestrator.tasks import ImageClassification

    spec = validate(tiny_spec(evaluation={"dc_strategy": "crop_scale_rotate", "networks": 2, "epochs": 3,
                                          "parallel": False}, model=SMALL)).to_dict()
    syn = real_set(digits)
    got = ImageClassification().evaluate(spec, digits, syn, torch.device("cpu"))["acc"]
    want = evaluate_set(SMALL, digits.info, syn.images, syn.labels, syn.lr, digits.x_test, digits.y_test,
                        EvalConfig(networks=2, epochs=3, batch_size=spec["evaluation"]["batch_size"],
                                   dc_strategy="crop_scale_rotate"), seed=eval_seed(spec))
    assert got == (want.mean, want.std)
    dsa = evaluate_set(SMALL, digits.info, syn.images, syn.labels, syn.lr, digits.x_test, digits.y_test,
                       EvalConfig(networks=2, epochs=3), seed=eval_seed(spec))
    assert dsa.accs != want.accs


def test_several_models(set_file):
    rep = report_of(evaluate(set_file, "--networks", "1", "--epochs", "1", "--models", "convnet,ConvNetW4,convnetNN",
                             "--format", "json"))
    assert rep["models"] == {"convnet": SMALL, "convnetw4": {**SMALL, "width": 4},
                             "convnetnn": {**SMALL, "norm": "none"}}
    assert [r["model"] for r in rep["rows"]] == ["convnet"] * 3 + ["convnetw4"] * 3 + ["convnetnn"] * 3



@pytest.mark.slow
def test_other_architectures_train_on_the_set(tmp_path, digits):
    """Cross-architecture evaluation (DC's --eval_mode M, MTT's Table 3): a set of 10 real digits
    per class trains networks it was not made with, BatchNorm ones included, well above chance."""
    f = save_synthetic(tmp_path / "ten.safetensors", real_set(digits, per_class=10), digits.info, "random",
                       model=SMALL)
    rep = report_of(evaluate(f, "--networks", "1", "--epochs", "60", "--models", "mlp,alexnet_bn,convnet_bn",
                             "--format", "json"))
    assert set(rep["models"]) == {"mlp", "alexnet_bn", "convnet_bn"}
    acc = {r["model"]: r["acc_mean"] for r in rep["rows"] if r["trained_on"] == "synthetic"}
    assert set(acc) == {"mlp", "alexnet_bn", "convnet_bn"} and min(acc.values()) > 0.5, acc

def test_parse_models():
    assert parse_models(None, SMALL) == [("convnet", SMALL)]
    assert parse_models("convnetD2, convnetMP,convnetd2", SMALL) == [
        ("convnetd2", {**SMALL, "depth": 2}), ("convnetmp", {**SMALL, "pooling": "maxpooling"})]
    with pytest.raises(EvaluateError, match="unknown model 'vit_b16'; known: convnet.*resnet18_bn.*convnetD<depth>"):
        parse_models("convnet,vit_b16", SMALL)
    # cross-architecture: the registry's other networks with their own defaults
    assert parse_models("convnet,resnet18_bn,lenet", SMALL) == [
        ("convnet", SMALL), ("resnet18_bn", {"name": "resnet18_bn"}), ("lenet", {"name": "lenet"})]
    assert parse_models(None, {"name": "lenet"}) == [("lenet", {"name": "lenet"})]


def test_random_subset_like_matches_the_sweeps_baseline(digits):
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    x1, y1 = random_real_subset(digits.x_train, digits.y_train, 3, 10, g1)
    x2, y2 = random_subset_like(digits.x_train, digits.y_train, torch.arange(10).repeat(3), 10, g2)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    _, y = random_subset_like(digits.x_train, digits.y_train, torch.tensor([0, 0, 0, 4]), 10, g1)
    assert y.tolist() == [0, 0, 0, 4]


# -- the model recorded in the file (forward-compatible export) ---------------------------------------------
def test_save_synthetic_records_the_model_and_files_without_it_still_read(tmp_path, digits):
    syn = real_set(digits)
    with_model = save_synthetic(tmp_path / "a.safetensors", syn, digits.info, "mtt", model=SMALL)
    without = save_synthetic(tmp_path / "b.safetensors", syn, digits.info, "mtt")
    _, meta = read_synthetic(with_model)
    assert json.loads(meta["model"]) == SMALL and file_model(meta, with_model) == SMALL
    tensors, meta = read_synthetic(without)
    assert "model" not in meta and file_model(meta, without) is None and tensors["images"].shape == (10, 1, 8, 8)
    # without a model and a spec: the schema's default ConvNet (depth 3, width 128)
    rep = report_of(evaluate(without, "--networks", "1", "--epochs", "1", "--format", "json"))
    assert rep["models"]["convnet"] == {"name": "convnet", "depth": 3, "width": 128, "norm": "instancenorm",
                                        "pooling": "avgpooling"}
    assert "default ConvNet" in rep["model_from"]


def test_trial_outputs_record_the_spec_model(tmp_path, digits, monkeypatch):
    from orchestrator import trial

    seen = {}

    class Log:
        run_id = "run-x"

        def artifact(self, path, directory=None):
            if str(path).endswith(".safetensors"):
                seen["meta"] = read_synthetic(path)[1]

    ctx = trial.TrialContext(data=digits, spec={"dataset": {"name": "digits"}, "model": SMALL}, spec_hash="h",
                             expert_files={}, expert_sha256=[], store_key="k", experts_acc=(0.9, 0.0),
                             tracking_uri="", experiment_id="", parent_run_id="")
    trial._log_outputs(Log(), ctx, real_set(digits), "mtt", {"budget": 1}, 3, {"acc": (0.5, 0.25)})
    assert json.loads(seen["meta"]["model"]) == SMALL and seen["meta"]["run_id"] == "run-x"
    assert json.loads(seen["meta"]["evaluation"]) == {"acc": [0.5, 0.25]} and seen["meta"]["iteration"] == "3"
    assert "start" not in seen["meta"]  # a start that read no real data (or a method that does not say)
    start = {"init": "real", "rows": [4, 1], "users": [5, 2]}  # Method.start_record's, carried by every export
    trial._log_outputs(Log(), ctx, real_set(digits), "mtt", {"budget": 1}, 3, {"acc": (0.5, 0.25)}, start=start)
    assert json.loads(seen["meta"]["start"]) == start


# -- errors: exit 2, naming the file and the tensor or field ------------------------------------------------
def _write(path, tensors, meta):
    save_file(tensors, str(path), metadata=meta)
    return path


def _meta(**changes):
    meta = {"dataset": "digits", "algorithm": "mtt", "mean": "[0.305383]", "std": "[0.376119]",
            "format": "distill-orchestrator/synthetic-v1", "model": json.dumps(SMALL)}
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


def _tensors(n=10, shape=(1, 8, 8), labels=None, **changes):
    t = {"images": torch.zeros(n, *shape), "labels": torch.arange(n) % 10 if labels is None else labels,
         "lr": torch.tensor(0.01)}
    t.update(changes)
    return {k: v for k, v in t.items() if v is not None}


ERRORS = {
    "not safetensors": (None, None, [], "not a readable safetensors file"),
    "missing tensor": (_tensors(lr=None), _meta(), [], "tensor 'lr' is missing"),
    "wrong dtype": (_tensors(labels=(torch.arange(10) % 10).int()), _meta(), [],
                    "tensor 'labels' is torch.int32, expected torch.int64"),
    "float64 images": (_tensors(images=torch.zeros(10, 1, 8, 8, dtype=torch.float64)), _meta(), [],
                       "tensor 'images' is torch.float64"),
    "image shape": (_tensors(shape=(3, 8, 8)), _meta(), [],
                    ("tensor 'images' has shape (10, 3, 8, 8), images of 3x8x8 (channels x height x width), "
                     "but digits images are 1x8x8")),
    "image size": (_tensors(shape=(1, 28, 28)), _meta(), [], "tensor 'images' has shape (10, 1, 28, 28)"),
    "labels outside": (_tensors(labels=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 12])), _meta(), [],
                       "tensor 'labels' holds values outside digits's 10 classes (0..9): 12"),
    "negative label": (_tensors(labels=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, -1])), _meta(), [],
                       "tensor 'labels' holds values outside digits's 10 classes (0..9): -1"),
    "class count": (_tensors(labels=torch.arange(10) % 5), _meta(), [],
                    "tensor 'labels' has 5 classes, but digits has 10 (no image of class 5, 6, 7, 8, 9)"),
    "dataset option": (_tensors(), _meta(), ["--dataset", "mnist"],
                       "the set is of dataset 'digits' (metadata field 'dataset'), but --dataset is 'mnist'"),
    "unknown dataset": (_tensors(), _meta(dataset="svhn"), [],
                        "metadata field 'dataset' is 'svhn', not a known image dataset"),
    "missing field": (_tensors(), _meta(std=None), [], "metadata field 'std' is missing"),
    "bad mean": (_tensors(), _meta(mean="[0.1, 0.2]"), [], "metadata field 'mean' must be a JSON list of 1"),
    "bad model": (_tensors(), _meta(model="convnet"), [], "metadata field 'model' must be the JSON of a model"),
    "unbuildable model": (_tensors(), _meta(model=json.dumps({**SMALL, "depth": 5})), [],
                          ("metadata field 'model': convnet (depth 5, width 8, norm instancenorm, pooling "
                           "avgpooling) cannot be built for digits")),
    "unknown recorded model": (_tensors(), _meta(model=json.dumps({"name": "vit_b16"})), [],
                               ("metadata field 'model' names the model 'vit_b16', which algorithms/networks.py "
                                "cannot build (known: convnet, ")),
    "lr not a step": (_tensors(lr=torch.tensor(-1.0)), _meta(), [], "tensor 'lr' is -1.0, not a step size"),
    "lr not a scalar": (_tensors(lr=torch.ones(2)), _meta(), [], "tensor 'lr' must be a float scalar"),
    "unknown model": (_tensors(), _meta(), ["--models", "convnet,vit_b16"],
                      "--models: unknown model 'vit_b16'; known: convnet"),
    "model too big for the images": (_tensors(), _meta(), ["--models", "convnet,resnet18"],
                                     "--models resnet18: resnet18 cannot be built for digits (1x8x8): resnet18 "
                                     "cannot take 8x8 inputs"),
    "sequence set without spec": ({"sequences": torch.ones(2, 3, dtype=torch.int64)},
                                  {"dataset": "ml-100k", "algorithm": "random", "task": "recommendation",
                                   "vocab_size": "10", "pad_id": "0", "format": "distill-orchestrator/sequences-v1"},
                                  [], "a sequence set (ml-100k): give --spec SPEC"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_exit_2_naming_the_file_and_the_field(tmp_path, case):
    tensors, meta, args, needle = ERRORS[case]
    path = tmp_path / "bad.safetensors"
    if tensors is None:
        path.write_bytes(b"this is not a safetensors file at all")
    else:
        _write(path, tensors, meta)
    res = evaluate(path, *args, "--networks", "1", "--epochs", "1", catch=False)
    assert res.exit_code == 2, res.output
    assert needle in res.output, res.output
    if not args or args[0] != "--models":
        assert str(path) in res.output
    assert "network 1/1" not in res.output  # refused before anything trained


def test_renormalises_a_set_written_in_other_units(tmp_path, digits):
    """A set whose mean/std metadata differ from the dataset's is mapped to its normalisation
    (images * std + mean are pixels), and evaluates as the same set in the dataset's units."""
    syn = real_set(digits)
    pixels = syn.images * 0.376119 + 0.305383
    other = _write(tmp_path / "other.safetensors",
                   {"images": ((pixels - 0.5) / 0.25).float(), "labels": syn.labels, "lr": torch.tensor(0.02)},
                   _meta(mean="[0.5]", std="[0.25]"))
    same = save_synthetic(tmp_path / "same.safetensors", syn, digits.info, "mtt", model=SMALL)
    a = report_of(evaluate(other, "--networks", "1", "--epochs", "2", "--format", "json"))
    b = report_of(evaluate(same, "--networks", "1", "--epochs", "2", "--format", "json"))
    assert a["renormalised"] and not b["renormalised"]
    assert a["rows"][0]["acc"] == pytest.approx(b["rows"][0]["acc"], abs=0.02)


# -- with a spec: its protocol, the experts' lr and their full-data accuracy --------------------------------
def _store_experts(spec_path, root, data):
    """The spec's experts written into the store as `orchestrate experts` would (without Ray)."""
    from orchestrator.experts import expert_key, expert_seed, write_forms
    from orchestrator.spec import load_spec
    from orchestrator.store import TrajectoryStore

    s = load_spec(spec_path)
    store = TrajectoryStore(root / "trajectories")
    key, name = expert_key(s, data), s.dataset["name"]
    info = data.info
    records = []
    for i in range(s.experts["count"]):
        seed = expert_seed(s.experts["seed"], i)
        cks = list(train_expert(s.model, data, ExpertConfig(**s.expert_training()), seed=seed))
        net = seeded_network(s.model, info.channels, info.num_classes, info.size, seed)
        records.append(write_forms(i, cks, manifest_of(net), {"full": str(store.expert_path(key, name, i))}, {},
                                   {"store_key": key, "seed": seed})["full"])
    store.write_manifest(key, name, {"full": records})
    return [r.final_test_acc for r in records]


def test_spec_gives_protocol_experts_lr_and_full_data(tmp_path, digits, write_spec):
    # seed 3, depth 1 width 8, experts lr 0.03 (2 epochs here), evaluation: 2 networks x 10 epochs
    spec = write_spec(tiny_spec(experts={"epochs": 2, "batch_size": 256}))
    set_path = save_synthetic(tmp_path / "set.safetensors", real_set(digits), digits.info, "mtt")  # no model
    root = tmp_path / "runs"
    no_experts = report_of(evaluate(set_path, "--spec", spec, "--root", root, "--epochs", "1", "--networks", "1",
                                    "--format", "json"))
    assert no_experts["rows"][2]["networks"] == 0 and "no experts of the spec in" in no_experts["full_data_note"]
    assert not root.exists()  # looking for experts creates nothing
    accs = _store_experts(spec, root, digits)
    rep = report_of(evaluate(set_path, "--spec", spec, "--root", root, "--epochs", "2", "--format", "json"))
    syn, rnd, full = rep["rows"]
    assert rep["models"]["convnet"] == SMALL and "the spec's model" in rep["model_from"]
    assert rep["protocol"]["networks"] == 2 and rep["protocol"]["seed"] == 3 * 1000 + 17
    assert rnd["lr"] == 0.03 and "experts.lr" in rep["lr"]["random_from"] and syn["lr"] == pytest.approx(0.02)
    assert rep["random_subset"]["seed"] == 3 * 7919 + 1
    assert full["acc"] == accs and full["acc_mean"] == pytest.approx(sum(accs) / len(accs))
    table = evaluate(set_path, "--spec", spec, "--root", root, "--epochs", "1", "--networks", "1")
    full_line = next(line for line in table.stdout.splitlines() if "full data (experts)" in line)
    assert f"{100 * sum(accs) / len(accs):.1f} ±" in full_line and "2 experts" in full_line
    # another model than the experts': no full-data number for it
    rep = report_of(evaluate(set_path, "--spec", spec, "--root", root, "--epochs", "1", "--networks", "1",
                             "--models", "convnetW4", "--format", "json"))
    assert rep["rows"][2]["networks"] == 0 and "not this model" in rep["rows"][2]["note"]


def test_spec_of_another_dataset_is_refused(tmp_path, set_file, write_spec):
    spec = write_spec(tiny_spec(dataset={"name": "mnist"}))
    res = evaluate(set_file, "--spec", spec)
    assert res.exit_code == 2 and "metadata field 'dataset'" in res.output and "'mnist'" in res.output


# -- --log: an MLflow run --------------------------------------------------------------------------------------
@pytest.mark.slow  # MLflow creates its SQLite schema: about 10 s on 2 busy cores
def test_log_records_an_mlflow_run(tmp_path, set_file):
    from mlflow import MlflowClient

    root = tmp_path / "runs"
    res = evaluate(set_file, *FAST, "--log", "--root", root, "--format", "json")
    rep = report_of(res)
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("evaluate")
    run = client.get_run(rep["mlflow_run_id"])
    assert run.info.experiment_id == exp.experiment_id and run.info.status == "FINISHED"
    m = run.data.metrics
    syn, rnd, _ = rep["rows"]
    assert m["acc_mean"] == syn["acc_mean"] and m["acc_std"] == syn["acc_std"]
    assert m["random_acc_mean"] == rnd["acc_mean"] and m["random_acc_std"] == rnd["acc_std"]
    assert [x.value for x in client.get_metric_history(run.info.run_id, "convnet/synthetic/acc")] == syn["acc"]
    p = run.data.params
    assert p["networks"] == "2" and p["epochs"] == "3" and p["aug"] == "dsa" and p["models"] == "convnet"
    assert run.data.tags["orchestrate.role"] == "evaluate" and run.data.tags["orchestrate.source_run_id"] == "r0"
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "synthetic")}
    assert arts == {"synthetic/set.safetensors"}
    assert "evaluation.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "logged to MLflow run" in res.output


def test_a_trials_set_in_mlflow_evaluates_as_its_file_does(tmp_path, set_file, digits, monkeypatch):
    """FILE and --against may name trials' sets in MLflow (runs:/RUN_ID[/PATH], read from --root's
    store): the same numbers as the files, named by their URIs in the report, the table and the
    logged run; a run that is not there exits 2 naming it."""
    from mlflow import MlflowClient

    from orchestrator.tracking import ROLE_TAG, workspace
    from orchestrator.trial import LATEST_ARTIFACT

    monkeypatch.setenv("ORCHESTRATE_CACHE", str(tmp_path / "cache"))
    other = save_synthetic(tmp_path / "other.safetensors", real_set(digits, seed=9, lr=0.03), digits.info, "dc",
                           {"run_id": "r1"}, model=SMALL)
    root = tmp_path / "runs"
    client = MlflowClient(workspace(root).tracking_uri)
    exp = client.create_experiment("sweep", artifact_location=(tmp_path / "artifacts").as_uri())
    runs = []
    for path, folder, finished in ((set_file, "synthetic", True), (other, LATEST_ARTIFACT.split("/")[0], False)):
        run = client.create_run(exp, tags={ROLE_TAG: "trial"}).info.run_id
        client.log_artifact(run, str(path), folder)
        if finished:
            client.set_terminated(run)
        runs.append(run)
    done = f"runs:/{runs[0]}/synthetic/{set_file.name}"
    running = f"runs:/{runs[1]}/{LATEST_ARTIFACT.split('/')[0]}/{other.name}"
    by_file = report_of(evaluate(set_file, *FAST, "--against", other, "--no-random", "--format", "json"))
    res = evaluate(done, *FAST, "--against", running, "--no-random", "--format", "json", "--log", "--root", root)
    by_run = report_of(res)
    assert [r.get("acc") for r in by_run["rows"]] == [r.get("acc") for r in by_file["rows"]]
    assert by_run["rows"][0]["acc"] and by_run["rows"][-1]["acc"]
    assert by_run["uri"] == done and by_run["rows"][-1]["uri"] == running
    assert by_run["sha256"] == by_file["sha256"]
    params = client.get_run(by_run["mlflow_run_id"]).data.params
    assert params["file"] == done and params["against"] == running
    res = evaluate(done, *FAST, "--against", running, "--no-random", "--root", root)
    assert res.exit_code == 0 and running in res.stdout and done in res.stdout, res.output
    res = evaluate("runs:/nope", *FAST, "--root", root)
    assert res.exit_code == 2 and "runs:/nope: run nope is not in" in res.output, res.output


def test_log_to_a_broken_store_fails_before_training(tmp_path, set_file):
    root = tmp_path / "runs"
    root.mkdir()
    (root / "mlflow.db").write_bytes(b"not a database, not at all" * 100)
    res = evaluate(set_file, *FAST, "--log", "--root", root)
    assert res.exit_code == 2 and str(root / "mlflow.db") in res.output and "network 1/" not in res.output


# -- sequence sets --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def movielens(tmp_path_factory):
    """A generated MovieLens-format folder (130 items: enough for the 100 sampled negatives) and a
    tiny SASRec spec on it."""
    import yaml

    from orchestrator.sequences import load_sequences
    from tests.test_farzi_e2e import TINY as FARZI_TINY
    from tests.test_farzi_e2e import write_movielens

    d = tmp_path_factory.mktemp("evaluate-ml")
    write_movielens(d / "ml", items=130)
    spec = d / "spec.yaml"
    spec.write_text(yaml.safe_dump({**FARZI_TINY, "dataset": {"name": "ml-100k", "root": str(d / "ml")},
                                    "evaluation": {**FARZI_TINY["evaluation"], "networks": 2, "epochs": 1}}))
    return d, spec, load_sequences("ml-100k", d / "ml")


def farzi_file(data, path):
    """A random Farzi set (4 soft sequences of 8, latent 4) of ``data`` written to ``path``: (set, file)."""
    from algorithms.farzi import FarziSet

    g = torch.Generator().manual_seed(0)
    syn = FarziSet(torch.randn(4, 8, 4, generator=g), torch.randn(4, data.info.vocab_size, generator=g), 0.5, 0, 0.01)
    return syn, save_sequences(path, syn, data, "farzi")[0]


def test_sequence_sets_evaluate_with_the_spec_model(movielens, tmp_path):
    from algorithms.seqtrain import SeqTrainConfig, evaluate_sequences
    from orchestrator.sequences import seq_task

    _, spec, data = movielens
    syn, farzi = farzi_file(data, tmp_path / "farzi.safetensors")
    rep = report_of(evaluate(farzi, "--spec", spec, "--root", tmp_path / "runs", "--format", "json"))
    syn_row, rnd_row, full_row = rep["rows"]
    assert rep["metrics"] == ["hr10", "ndcg10", "hr10_s100", "ndcg10_s100"] and len(syn_row["hr10"]) == 2
    task = seq_task(data, 12)
    cfg = SeqTrainConfig(epochs=1, lr=0.01, batch_size=8)
    direct = evaluate_sequences(rep["models"]["sasrec"], task, syn.probs().detach(), cfg, 2, 1017)
    assert syn_row["hr10_mean"] == direct.metrics["hr10"] and syn_row["ndcg10_s100"] == [
        r["ndcg10_s100"] for r in direct.per_network]
    real = task.train[torch.randperm(len(task.train), generator=torch.Generator().manual_seed(1 * 7919 + 4))[:4]]
    base = evaluate_sequences(rep["models"]["sasrec"], task, real, cfg, 2, 1017)
    assert rnd_row["hr10"] == [r["hr10"] for r in base.per_network] and full_row["networks"] == 0
    # real sequences (the baseline's file) evaluate too, and the table shows the metrics
    real_file, _ = save_sequences(tmp_path / "real.safetensors", task.train[:3], data, "random")
    res = evaluate(real_file, "--spec", spec, "--networks", "1")
    assert res.exit_code == 0, res.output
    assert "hr10 (%)" in res.stdout and "ndcg10_s100 (%)" in res.stdout and "random real subset" in res.stdout


def test_sequence_shape_errors(movielens, tmp_path):
    _, spec, data = movielens
    V = data.info.vocab_size
    meta = {"dataset": "ml-100k", "algorithm": "farzi", "task": "recommendation", "vocab_size": str(V),
            "pad_id": "0", "format": "distill-orchestrator/sequences-v1"}
    cases = [
        ({"F": torch.zeros(4, 8, 4), "M": torch.zeros(4, V + 3), "temperature": torch.tensor(0.5)}, meta,
         f"tensor 'M' has shape (4, {V + 3}): {V + 3} columns, but ml-100k's vocabulary has {V} ids"),
        ({"F": torch.zeros(4, 8, 4), "M": torch.zeros(3, V), "temperature": torch.tensor(0.5)}, meta,
         f"F (4, 8, 4) and M (3, {V}) do not match"),
        ({"F": torch.zeros(4, 20, 4), "M": torch.zeros(4, V), "temperature": torch.tensor(0.5)}, meta,
         "tensor 'F' has shape (4, 20, 4): sequences of 20 positions, longer than the model's max_len 12"),
        ({"F": torch.zeros(4, 8, 4), "M": torch.zeros(4, V)}, meta, "tensor 'temperature' is missing"),
        ({"F": torch.zeros(4, 8, 4), "M": torch.zeros(4, V), "temperature": torch.tensor(0.5)},
         {**meta, "vocab_size": str(V + 1)}, f"metadata field 'vocab_size' is {V + 1}"),
        ({"sequences": torch.full((2, 5), V + 7, dtype=torch.int64)}, meta,
         f"tensor 'sequences' holds ids outside ml-100k's vocabulary (0..{V - 1}): {V + 7}"),
        ({"sequences": torch.ones(2, 5, dtype=torch.int32)}, meta, "tensor 'sequences' is torch.int32"),
    ]
    for i, (tensors, m, needle) in enumerate(cases):
        path = _write(tmp_path / f"bad{i}.safetensors", tensors, m)
        res = evaluate(path, "--spec", spec, catch=False)
        assert res.exit_code == 2 and needle in res.output and str(path) in res.output, (needle, res.output)
        assert "network 1/" not in res.output


# -- paired differences: the set against the random subset and --against files, on the same test cases -----------
def test_paired_difference_is_the_mean_difference_and_its_standard_error():
    from algorithms.evaluate import paired_difference

    a, b = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0])
    d = a - b
    assert paired_difference(a, b) == pytest.approx((float(d.mean()), float(d.std()) / 5 ** 0.5))
    assert paired_difference(a, a) == (0.0, 0.0)
    # weighted (language models: per chunk, summed cross-entropy over its targets): the ratio of sums, and the
    # standard error of that ratio, which is the unweighted one when every weight is the same
    w = torch.tensor([3.0, 3.0, 3.0, 3.0, 3.0])
    delta, se = paired_difference(3 * a, 3 * b, w)
    assert (delta, se) == pytest.approx(paired_difference(a, b))
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])
    delta, se = paired_difference(a * w, b * w, w)
    ratio = float(((a - b) * w).sum() / w.sum())
    resid = (a - b) * w - ratio * w
    assert delta == pytest.approx(ratio)
    assert se == pytest.approx(float((resid.pow(2).sum() / 4 * 5).sqrt() / w.sum()))
    assert all(x != x for x in paired_difference(a[:1], b[:1]))


def test_task_cases_add_up_to_the_headline_metric():
    """Per test case outcomes whose weighted mean is the metric: HR@10 for users, ln perplexity for chunks."""
    from algorithms.evaluate import paired_difference
    from algorithms.networks import flatten_params
    from algorithms.seqmodels import seeded_seq_model
    from algorithms.seqtrain import SeqTask, lm_metrics, task_cases, task_metrics

    g = torch.Generator().manual_seed(0)
    spec = {"name": "transformer_lm", "dim": 8, "blocks": 1, "heads": 1, "max_len": 6}
    chunks = torch.randint(0, 20, (9, 6), generator=g)
    lm = SeqTask("language_model", 20, None, chunks, chunks, None, None)
    m1, m2 = seeded_seq_model(spec, 20, None, 1), seeded_seq_model(spec, 20, None, 2)
    p1, p2 = flatten_params(m1), flatten_params(m2)
    (v1, w1), (v2, _) = task_cases(m1, p1, lm), task_cases(m2, p2, lm)
    assert len(v1) == 9 and float(w1.sum()) == 9 * 5
    assert float(v1.sum() / w1.sum()) == pytest.approx(math.log(lm_metrics(m1, p1, lm)["ppl"]), rel=1e-9)
    delta, _ = paired_difference(v1, v2, w1)
    assert delta == pytest.approx(math.log(lm_metrics(m1, p1, lm)["ppl"] / lm_metrics(m2, p2, lm)["ppl"]), rel=1e-9)
    rec_spec = {"name": "sasrec", "dim": 8, "blocks": 1, "heads": 1, "max_len": 6}
    items = torch.randint(1, 15, (12, 6), generator=g)
    rec = SeqTask("recommendation", 15, 0, items, items, torch.randint(1, 15, (12,), generator=g), None, k=3)
    m = seeded_seq_model(rec_spec, 15, 0, 3)
    hits, w = task_cases(m, flatten_params(m), rec)
    assert set(hits.tolist()) <= {0.0, 1.0} and float(w.sum()) == 12
    assert float(hits.mean()) == pytest.approx(task_metrics(m, flatten_params(m), rec)["hr10"])


def _cases_of(digits, path, seeds, lr=None):
    """Which test images each network of ``seeds`` gets right, trained on the file as the command does."""
    from algorithms.evaluate import network_job

    tensors, _ = read_synthetic(path)
    cfg = EvalConfig(networks=len(seeds), epochs=3)
    lr = float(tensors["lr"]) if lr is None else lr
    runs = [network_job(SMALL, digits.info, tensors["images"], tensors["labels"], lr, digits.x_test,
                        digits.y_test, cfg, s, per_case=True)() for s in seeds]
    return [acc for acc, _ in runs], torch.stack([h.double() for _, h in runs]).mean(0)


def test_against_trains_another_set_with_the_same_seeds_and_pairs_them(tmp_path, set_file, digits):
    from algorithms.evaluate import paired_difference

    other = save_synthetic(tmp_path / "other.safetensors", real_set(digits, seed=9, lr=0.03), digits.info, "dc",
                           {"run_id": "r1"}, model=SMALL)
    rep = report_of(evaluate(set_file, *FAST, "--against", other, "--against", set_file, "--format", "json"))
    syn, rnd, full, o1, o2 = rep["rows"]
    assert (o1["trained_on"], o1["other_index"], o2["other_index"]) == ("other", 0, 1) and o1["seeds"] == [17, 18]
    assert o1["file"] == str(other.resolve()) and o1["lr"] == pytest.approx(0.03) and o1["lr_from"] == "the file's lr"
    accs, hits_other = _cases_of(digits, other, [17, 18])
    assert o1["acc"] == accs  # the same numbers as those networks trained alone
    _, hits_set = _cases_of(digits, set_file, [17, 18])
    paired = {p["against"]: p for p in rep["paired"]}
    assert set(paired) == {"random", "other1", "other2"}  # the experts' accuracies carry no per-image outcome
    p = paired["other1"]
    assert (p["delta"], p["se_cases"]) == pytest.approx(paired_difference(hits_set, hits_other))
    assert p["delta"] == pytest.approx(syn["acc_mean"] - o1["acc_mean"]) and p["cases"] == len(digits.y_test)
    seed_diffs = [x - y for x, y in zip(syn["acc"], o1["acc"])]
    assert p["se_networks"] == pytest.approx(abs(seed_diffs[0] - seed_diffs[1]) / 2) and p["seed_pairs"] == 2
    assert p["se"] == pytest.approx(math.hypot(p["se_cases"], p["se_networks"]))
    # the set against itself: the same networks, so no difference at all, and no noise either
    assert (paired["other2"]["delta"], paired["other2"]["se"]) == (0.0, 0.0) and o2["acc"] == syn["acc"]
    assert paired["random"]["delta"] == pytest.approx(syn["acc_mean"] - rnd["acc_mean"])
    # the table names the file and prints the differences under it
    res = evaluate(set_file, *FAST, "--against", other)
    assert res.exit_code == 0, res.output
    assert "other.safetensors" in res.stdout.split("protocol:")[0]
    line = next(x for x in res.stdout.splitlines() if x.startswith("paired, the set minus other.safetensors"))
    assert f"acc {100 * p['delta']:+.2f} points (SE {100 * p['se']:.2f}" in line
    assert f"over the {len(digits.y_test)} test images" in line and "over 2 seed pairs" in line


def test_no_random_trains_no_subset_and_keeps_the_other_rows_and_their_pairing(tmp_path, set_file, digits):
    other = save_synthetic(tmp_path / "other.safetensors", real_set(digits, seed=9, lr=0.03), digits.info, "dc",
                           {"run_id": "r1"}, model=SMALL)
    full = report_of(evaluate(set_file, *FAST, "--against", other, "--format", "json"))
    res = evaluate(set_file, *FAST, "--against", other, "--no-random", "--format", "json")
    rep = report_of(res)
    syn, rnd, _, o1 = rep["rows"]
    assert "random subset" not in res.stderr  # no network of it was trained ("..., network 1/2 ...")
    assert rnd["trained_on"] == "random" and rnd["networks"] == 0 and "acc" not in rnd
    assert rep["random_subset"]["note"] == "not trained (--no-random)"
    # the set and the --against file: the very numbers of the run that also trained the subset
    assert syn["acc"] == full["rows"][0]["acc"] and o1["acc"] == full["rows"][3]["acc"]
    paired = {p["against"]: p for p in rep["paired"]}
    assert set(paired) == {"other1"}
    assert paired["other1"]["delta"] == next(p for p in full["paired"] if p["against"] == "other1")["delta"]
    table = evaluate(set_file, *FAST, "--no-random")
    assert table.exit_code == 0 and "random subset: not trained (--no-random)" in table.stdout


def test_against_refuses_a_set_of_another_dataset_or_kind(tmp_path, set_file, digits, movielens):
    _, _, data = movielens
    seqs, _ = save_sequences(tmp_path / "seqs.safetensors", torch.ones(2, 5, dtype=torch.long), data, "random")
    res = evaluate(set_file, *FAST, "--against", seqs)
    assert res.exit_code == 2 and str(seqs) in res.output and "'ml-100k'" in res.output
    assert "a paired comparison needs the same test set" in res.output and "network 1/" not in res.output
    fake = save_synthetic(tmp_path / "fake.safetensors", real_set(digits), digits.info, "mtt", {}, model=SMALL)
    tensors, meta = read_synthetic(fake)
    save_file(tensors, str(fake), {**meta, "zca": "true"})
    res = evaluate(set_file, *FAST, "--against", fake)
    assert res.exit_code == 2 and str(fake) in res.output and "'zca'" in res.output


def test_sequence_sets_pair_with_the_random_subset_and_against_files(movielens, tmp_path):
    from algorithms.evaluate import paired_difference
    from algorithms.seqtrain import SeqTrainConfig, seq_network_job
    from orchestrator.sequences import seq_task

    _, spec, data = movielens
    syn, farzi = farzi_file(data, tmp_path / "farzi.safetensors")
    task = seq_task(data, 12)
    real_file, _ = save_sequences(tmp_path / "real.safetensors", task.train[5:9], data, "random")
    rep = report_of(evaluate(farzi, "--spec", spec, "--root", tmp_path / "runs", "--against", real_file,
                             "--format", "json"))
    syn_row, rnd_row, full_row, other_row = rep["rows"]
    assert other_row["trained_on"] == "other" and other_row["lr_from"] == rep["lr"]["set_from"]
    cfg = SeqTrainConfig(epochs=1, lr=0.01, batch_size=8)
    import dataclasses

    test_only = dataclasses.replace(task, valid_inputs=None, valid_targets=None, valid_seen=None)

    def hits(x):
        runs = [seq_network_job(rep["models"]["sasrec"], test_only, x, cfg, s, per_case=True)() for s in (1017, 1018)]
        return [m for m, _ in runs], torch.stack([c[0] for _, c in runs]).mean(0)

    metrics, h_other = hits(task.train[5:9])
    assert other_row["hr10"] == [m["hr10"] for m in metrics]
    _, h_set = hits(syn.probs().detach())
    p = {q["against"]: q for q in rep["paired"]}
    assert set(p) == {"random", "other1"} and rep["paired_unit"] == "users"
    assert (p["other1"]["delta"], p["other1"]["se_cases"]) == pytest.approx(paired_difference(h_set, h_other))
    assert p["other1"]["metric"] == "hr10" and p["other1"]["cases"] == len(task.test_targets)


def test_no_random_leaves_out_the_random_sequences(movielens, tmp_path):
    _, spec, data = movielens
    _, farzi = farzi_file(data, tmp_path / "farzi.safetensors")
    res = evaluate(farzi, "--spec", spec, "--root", tmp_path / "runs", "--no-random", "--format", "json")
    rep = report_of(res)
    assert "random sequences" not in res.stderr and rep["random_subset"]["note"] == "not trained (--no-random)"
    assert [r["trained_on"] for r in rep["rows"]][:2] == ["synthetic", "random"] and rep["rows"][1]["networks"] == 0
    assert not any(p["against"] == "random" for p in rep.get("paired", ()))


def test_mlflow_metrics_name_every_row_and_each_paired_difference():
    from orchestrator.evaluate import metrics_of

    def row(trained_on, mean, **extra):
        return {"model": "convnet", "trained_on": trained_on, "acc_mean": mean, "acc_std": 0.01, **extra}

    rep = {"models": {"convnet": {}}, "metrics": ["acc"],
           "rows": [row("synthetic", 0.9), row("random", 0.6), row("full_data", None),
                    row("other", 0.8, other_index=0), row("other", 0.7, other_index=1)],
           "paired": [{"model": "convnet", "row": 1, "against": "random", "metric": "acc", "delta": 0.3, "se": 0.02},
                      {"model": "convnet", "row": 4, "against": "other2", "metric": "acc", "delta": 0.2, "se": 0.03}]}
    m = metrics_of(rep)
    assert m["acc_mean"] == 0.9 and m["random_acc_mean"] == 0.6 and "full_data_acc_mean" not in m
    assert m["other1_acc_mean"] == 0.8 and m["other2_acc_mean"] == 0.7
    assert (m["paired_random_acc_delta"], m["paired_random_acc_se"]) == (0.3, 0.02)
    assert (m["paired_other2_acc_delta"], m["paired_other2_acc_se"]) == (0.2, 0.03)
