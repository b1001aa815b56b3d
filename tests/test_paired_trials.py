"""Trials' per-case outcomes and `orchestrate compare`'s paired differences: the tasks score each
evaluation network test case by test case (what the trials log beside their sets), the cases file
round-trips and refuses what is wrong, and compare pairs two runs' logged outcomes on the same
test cases (digits with a 1-block ConvNet, a generated MovieLens folder, hand-made MLflow runs)."""
import io
import json
import math
import re
import statistics

import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient
from safetensors.torch import save_file

from algorithms.evaluate import EvalConfig, evaluate_set, paired_difference
from orchestrator.artifacts import CASES_FILE, CaseOutcomes, read_cases, save_cases
from orchestrator.cli import main
from orchestrator.compare import compare_runs
from orchestrator.evaluate import paired_stats
from orchestrator.spec import eval_seed, validate
from orchestrator.tracking import workspace
from tests.conftest import tiny_spec
from tests.test_evaluate_cmd import SMALL, digits, farzi_file, movielens, real_set  # noqa: F401 (fixtures)


def hits(n: int, p: float, seed: int) -> torch.Tensor:
    return (torch.rand(n, generator=torch.Generator().manual_seed(seed)) < p).double()


# -- the cases file ----------------------------------------------------------------------------------------
def test_cases_file_round_trips_and_names_what_is_wrong(tmp_path):
    acc = CaseOutcomes.of("acc", "images", [7, 8],
                          [(hits(50, 0.8, 1), torch.ones(50)), (hits(50, 0.7, 2), torch.ones(50))])
    path = save_cases(tmp_path / "a.safetensors", acc, {"dataset": "digits", "iteration": 3})
    back, meta = read_cases(path)
    assert torch.equal(back.values, acc.values) and torch.equal(back.weights, torch.ones(50, dtype=torch.float64))
    assert (back.metric, back.unit, back.seeds, meta["dataset"], meta["iteration"]) == ("acc", "images", [7, 8],
                                                                                       "digits", "3")
    assert back.network_metric(1) == pytest.approx(float(hits(50, 0.7, 2).mean()))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # 0/1 outcomes stored as bytes, unit weights left out
        assert list(f.keys()) == ["values"] and f.get_tensor("values").dtype == torch.uint8
    nll = CaseOutcomes.of("ppl", "chunks", [0], [(torch.tensor([30.5, 12.25, 9.0]), torch.tensor([10.0, 4.0, 3.0]))])
    back, _ = read_cases(save_cases(tmp_path / "p.safetensors", nll))
    assert torch.equal(back.weights, nll.weights) and back.network_metric(0) == pytest.approx(51.75 / 17)

    good = {"format": "distill-orchestrator/cases-v1", "metric": "acc", "unit": "images", "seeds": "[1]"}
    bad = [({"values": torch.zeros(1, 4)}, {**good, "format": "x"}, "metadata field 'format' is 'x'"),
           ({"values": torch.zeros(1, 4)}, {k: v for k, v in good.items() if k != "unit"}, "field 'unit' is missing"),
           ({"values": torch.zeros(1, 4)}, {**good, "seeds": "[1"}, "field 'seeds' is not JSON"),
           ({"values": torch.zeros(4)}, good, "tensor 'values' must be [networks, cases]; found (4,)"),
           ({"values": torch.zeros(2, 4)}, good, "metadata field 'seeds' ([1]) do not match values (2, 4)"),
           ({"values": torch.zeros(1, 4), "weights": torch.ones(3)}, good, "tensor 'weights' (3,)")]
    for i, (tensors, meta, needle) in enumerate(bad):
        path = tmp_path / f"bad{i}.safetensors"
        save_file(tensors, str(path), metadata=meta)
        with pytest.raises(ValueError, match="bad") as e:
            read_cases(path)
        assert needle in str(e.value) and str(path) in str(e.value), (needle, str(e.value))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_cases(tmp_path / "junk.safetensors")


# -- the tasks score their networks case by case -----------------------------------------------------------
def test_image_task_cases_are_its_networks_test_images(digits):  # noqa: F811
    from orchestrator.tasks import ImageClassification

    spec = validate(tiny_spec(evaluation={"networks": 2, "epochs": 3, "parallel": False}, model=SMALL)).to_dict()
    syn = real_set(digits)
    metrics, cases = ImageClassification().evaluate_cases(spec, digits, syn, torch.device("cpu"))
    assert metrics == ImageClassification().evaluate(spec, digits, syn, torch.device("cpu"))
    want = evaluate_set(SMALL, digits.info, syn.images, syn.labels, syn.lr, digits.x_test, digits.y_test,
                        EvalConfig(networks=2, epochs=3, batch_size=spec["evaluation"]["batch_size"]),
                        seed=eval_seed(spec))
    assert (cases.metric, cases.unit, cases.seeds) == ("acc", "images", [eval_seed(spec), eval_seed(spec) + 1])
    assert cases.values.shape == (2, len(digits.y_test))
    assert [cases.network_metric(k) for k in range(2)] == pytest.approx(want.accs, abs=1e-12)
    assert metrics["acc"] == pytest.approx((want.mean, want.std))


def test_sequence_task_cases_are_its_users_hits(movielens, tmp_path):  # noqa: F811
    from algorithms.seqtrain import SeqTrainConfig, evaluate_sequences
    from orchestrator.sequences import seq_task
    from orchestrator.tasks import EventSequences

    _, spec_path, data = movielens
    spec = validate({**yaml.safe_load(spec_path.read_text()),
                     "evaluation": {"networks": 2, "epochs": 1, "lr": 0.01, "batch_size": 8,
                                    "parallel": False}}).to_dict()
    syn, _ = farzi_file(data, tmp_path / "f.safetensors")
    metrics, cases = EventSequences().evaluate_cases(spec, data, syn, torch.device("cpu"))
    task = seq_task(data, spec["model"]["max_len"])
    direct = evaluate_sequences(spec["model"], task, syn.training_input().detach(),
                                SeqTrainConfig(epochs=1, lr=0.01, batch_size=8), 2, eval_seed(spec))
    assert (cases.metric, cases.unit, cases.values.shape[0]) == ("hr10", "users", 2)
    assert [cases.network_metric(k) for k in range(2)] == pytest.approx([r["hr10"] for r in direct.per_network])
    assert metrics["hr10"] == pytest.approx((direct.metrics["hr10"], direct.std["hr10"]))


# -- orchestrate compare pairs the runs' logged outcomes ---------------------------------------------------
@pytest.fixture
def store(tmp_path):
    ws = workspace(tmp_path / "root")
    client = MlflowClient(ws.tracking_uri)
    exp = client.create_experiment("pairs", artifact_location=(tmp_path / "root" / "artifacts").as_uri())

    def run(name: str, cases: CaseOutcomes | None = None, status: str = "FINISHED", folder: str = "synthetic",
            **meta) -> str:
        rid = client.create_run(exp, run_name=name).info.run_id
        if cases is not None:
            d = tmp_path / name
            d.mkdir()
            save_cases(d / CASES_FILE, cases, {"dataset": "digits", "iteration": 40, "model": "{}", **meta})
            client.log_artifact(rid, str(d / CASES_FILE), folder)
        client.set_terminated(rid, status) if status != "RUNNING" else None
        return rid

    return tmp_path / "root", ws.tracking_uri, run


def test_compare_pairs_each_run_with_the_first_on_the_same_test_cases(store):
    root, uri, run = store
    n, seeds = 400, [11, 12, 13]

    def acc(*ps, base=0, seeds=seeds):
        return CaseOutcomes.of("acc", "images", seeds,
                               [(hits(n, p, base + k), torch.ones(n)) for k, p in enumerate(ps)])

    ref, better = acc(0.6, 0.62, 0.58), acc(0.7, 0.75, 0.69, base=10)
    a = run("a", ref)
    b = run("b", better)
    c = run("c", acc(0.6, 0.6, 0.6, base=20, seeds=[1, 2, 3]))  # other seeds: no seed pairs
    d = run("d")  # nothing logged
    e = run("e", acc(0.5, 0.5, 0.5, base=30), dataset="mnist")
    f = run("f", acc(0.9, 0.9, 0.9, base=40), status="RUNNING", folder="synthetic_latest")  # a running trial's latest
    cmp = compare_runs(uri, [a, b, c, d, e, f])
    pr = cmp["paired"]
    assert (pr["reference"], pr["metric"], pr["unit"], pr["cases"]) == (a, "acc", "images", n)
    assert set(pr["stats"]) == {b, c, f} and set(pr["skipped"]) == {d, e}
    assert "no synthetic/cases.safetensors" in pr["skipped"][d] and "'mnist'" in pr["skipped"][e]
    # by hand: the per-image mean over networks, its paired difference, and the seed pairs' spread
    delta, se_cases = paired_difference(better.values.mean(0), ref.values.mean(0))
    per_seed = [float(better.values[k].mean() - ref.values[k].mean()) for k in range(3)]
    se_net = statistics.stdev(per_seed) / math.sqrt(3)
    st = pr["stats"][b]
    assert st["delta"] == pytest.approx(delta) and st["se_cases"] == pytest.approx(se_cases)
    assert st["delta"] == pytest.approx(statistics.fmean(per_seed))
    assert st["se_networks"] == pytest.approx(se_net) and st["se"] == pytest.approx(math.hypot(se_cases, se_net))
    assert st["z"] == pytest.approx(delta / st["se"]) and st["seed_pairs"] == 3 and st["z"] > 3
    assert math.isnan(pr["stats"][c]["se_networks"]) and pr["stats"][c]["se"] == pr["stats"][c]["se_cases"]
    rows = {r["name"]: r["values"] for r in cmp["rows"] if r["section"] == "paired"}
    assert rows["acc_delta"] == {a: None, b: st["delta"], c: pr["stats"][c]["delta"], d: None, e: None,
                                 f: pr["stats"][f]["delta"]}

    cli = CliRunner()
    table = cli.invoke(main, ["compare", a, b, c, d, "--root", str(root)])
    assert table.exit_code == 0, table.output
    text = " ".join(table.output.split())
    assert (f"each run's set minus a's (the final or latest set, iteration 40), evaluated on the same {n} test "
            f"images") in text
    assert f"b (iteration 40): acc {100 * delta:+.2f} points (SE {100 * st['se']:.2f}" in text
    assert "Downloading" not in table.output  # no progress bars
    assert "over 3 seed pairs" in text and "not paired, d: no synthetic/cases.safetensors" in text
    raw = cli.invoke(main, ["compare", a, c, "--root", str(root), "--format", "json"]).stdout
    strict = json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert strict["paired"]["stats"][c]["se_networks"] is None
    csv_out = cli.invoke(main, ["compare", a, b, "--root", str(root), "--format", "csv"]).stdout
    assert f"paired,acc_delta,True,,{st['delta']}" in csv_out
    plain = json.loads(cli.invoke(main, ["compare", a, b, "--root", str(root), "--format", "json",
                                         "--no-paired"]).stdout)
    assert "paired" not in plain and all(r["section"] != "paired" for r in plain["rows"])
    sel = json.loads(cli.invoke(main, ["compare", a, b, "--root", str(root), "--format", "json",
                                       "--selected"]).stdout)
    assert sel["paired"]["reference"] is None
    assert "no synthetic_selected/cases.safetensors" in sel["paired"]["skipped"][a]


def test_compare_refuses_to_pair_other_test_cases(store):
    _, uri, run = store
    a = run("a", CaseOutcomes.of("hr10", "users", [1], [(hits(30, 0.2, 1), torch.ones(30))]))
    b = run("b", CaseOutcomes.of("hr10", "users", [1], [(hits(31, 0.2, 2), torch.ones(31))]))
    c = run("c", CaseOutcomes.of("ppl", "chunks", [1], [(torch.ones(30), torch.ones(30))]))
    pr = compare_runs(uri, [a, b, c])["paired"]
    assert not pr["stats"]
    assert "scored on other test cases than the one it is paired with (31 cases against 30" in pr["skipped"][b]
    assert "its outcomes are ppl" in pr["skipped"][c]


def test_results_pair_each_trial_with_its_random_subset(store):
    from orchestrator import results as res
    from orchestrator.results_tables import table

    _, uri, run = store
    n, seeds = 300, [3, 4]

    def acc(*ps, base=0):
        return CaseOutcomes.of("acc", "images", seeds,
                               [(hits(n, p, base + k), torch.ones(n)) for k, p in enumerate(ps)])

    rnd_cases, good_cases = acc(0.6, 0.6), acc(0.8, 0.78, base=10)
    rnd, good, bare = run("random", rnd_cases), run("mtt", good_cases), run("dc")
    other = run("dm-ipc10", acc(0.5, 0.5, base=20))

    def row(rid, algorithm, budget=1, mean=None):
        return {"run_id": rid, "sweep": "s", "dataset": "digits", "budget": budget, "algorithm": algorithm,
                "status": "FINISHED", "failure_reason": None, "acc_mean": mean, "acc_std": 0.0,
                "acc_best_over_evals_mean": None, "acc_best_over_evals_std": None, "full_data_acc_mean": 0.95,
                "full_data_acc_std": 0.0, "hyperparameters": {}}

    every = [row(rnd, "random", mean=float(rnd_cases.values.mean())),
             row(good, "mtt", mean=float(good_cases.values.mean())),
             row(bare, "dc", mean=0.7), row(other, "dm", budget=10, mean=0.5)]
    res.attach_baselines(every)
    res.attach_scores(every)
    shown = [r for r in every if r["algorithm"] != "random"]  # filtered: the baselines are found in every
    res.attach_paired(uri, shown, among=every)
    by = {r["algorithm"]: r for r in shown}
    st = paired_stats(good_cases.pairs(), rnd_cases.pairs(), True)
    assert by["mtt"]["gain_over_random"] == pytest.approx(st["delta"])
    assert by["mtt"]["gain_se"] == pytest.approx(st["se"]) and by["mtt"]["gain_z"] == pytest.approx(st["z"])
    assert by["mtt"]["gain_z"] > 3
    assert by["dc"]["gain_se"] is None and by["dc"]["gain_z"] is None  # logged no outcomes
    assert by["dm"]["gain_z"] is None  # no random subset of budget 10
    from rich.console import Console

    con = Console(width=250, record=True, file=io.StringIO())
    con.print(table(shown))
    text = con.export_text()
    assert re.search(r"┃\s+gain ┃\s+z ┃\s+gap ┃", text) and f"{st['z']:+.1f} │" in text
    assert "paired standard error" in text
    assert "gain_z" in res.to_csv(shown).splitlines()[0]
    assert "gain_z" not in res.to_csv(every[:1]).splitlines()[0]  # rows not paired: no such columns
    ppl = CaseOutcomes.of("ppl", "chunks", [1, 2], [(torch.full((40,), 200.0), torch.full((40,), 50.0))] * 2)
    worse = CaseOutcomes.of("ppl", "chunks", [1, 2], [(torch.full((40,), 250.0) + torch.arange(40.0) / 10,
                                                       torch.full((40,), 50.0))] * 2)
    r0, r1 = run("rnd-ppl", worse), run("farzi-ppl", ppl)
    lm = [row(r0, "random", budget=50), row(r1, "farzi", budget=50)]
    res.attach_paired(uri, lm)
    assert lm[1]["gain_se"] is None and lm[1]["gain_z"] > 0  # lower perplexity than random: a positive z


def test_compare_pairs_two_evaluations_of_one_trial(store, tmp_path):
    """RUN@ITERATION: the outcomes a trial logged at that evaluation (cases/iteration_NNNNNN)."""
    from orchestrator.trial import cases_artifact

    root, uri, run = store
    client = MlflowClient(uri)
    n, seeds = 200, [5, 6]
    at = {it: CaseOutcomes.of("hr10", "users", seeds, [(hits(n, p, it + k), torch.ones(n)) for k, p in
                                                        enumerate(ps)])
          for it, ps in ((0, (0.1, 0.12)), (50, (0.2, 0.21)))}
    rid = run("t", at[50])  # the final set: the evaluation at 50
    for it, cases in at.items():
        d = tmp_path / f"it{it}"
        d.mkdir()
        f = save_cases(d / cases_artifact(it).rpartition("/")[2], cases, {"dataset": "ml-100k", "iteration": it,
                                                                         "model": "{}"})
        client.log_artifact(rid, str(f), "cases")
    assert cases_artifact(50) == "cases/iteration_000050.safetensors"
    cmp = compare_runs(uri, [f"{rid}@0", f"{rid}@50", f"{rid}@7"])
    pr = cmp["paired"]
    assert [i["key"] for i in cmp["runs"]] == [f"{rid}@0", f"{rid}@50", f"{rid}@7"]
    assert [i["iteration"] for i in cmp["runs"]] == [0, 50, 7] and {i["run_id"] for i in cmp["runs"]} == {rid}
    st = paired_stats(at[50].pairs(), at[0].pairs(), True)
    assert pr["stats"][f"{rid}@50"]["delta"] == pytest.approx(st["delta"]) and pr["iterations"][f"{rid}@50"] == 50
    assert "no evaluation at iteration 7 logged its outcomes (cases/iteration_000007.safetensors)" in \
        pr["skipped"][f"{rid}@7"]
    metric_rows = {r["name"]: r["values"] for r in cmp["rows"] if r["section"] == "paired"}
    assert set(metric_rows["hr10_delta"]) == {f"{rid}@0", f"{rid}@50", f"{rid}@7"}
    table = CliRunner().invoke(main, ["compare", f"{rid}@0", f"{rid}@50", "--root", str(root)])
    assert table.exit_code == 0, table.output
    assert f"t@50 (iteration 50): hr10 {100 * st['delta']:+.2f} points" in " ".join(table.output.split())
    bad = CliRunner().invoke(main, ["compare", f"{rid}@x", rid, "--root", str(root)])
    assert bad.exit_code == 2 and f"'{rid}@x': expected RUN_ID or RUN_ID@ITERATION" in bad.output
