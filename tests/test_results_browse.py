"""Browsing results: filters, the best trial per group and sorting on hand-made rows; then
`orchestrate results` / `orchestrate compare` / `summarise_sweep` on a tiny digits sweep."""
import copy
import csv
import io
import json

import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from orchestrator import results as res
from orchestrator.results_tables import table as results_table
from orchestrator import summary
from orchestrator.cli import main
from orchestrator.tracking import workspace
from tests.conftest import TINY, results_row


def row(algorithm="mtt", budget=1, status="FINISHED", acc=None, run_id=None, **extra):
    return results_row(algorithm, budget, acc, status, run_id=run_id or f"{algorithm}-{budget}-{acc}", **extra)


@pytest.fixture
def rows():
    return [
        row("random", 1, acc=0.30, run_id="r1"),
        row("mtt", 1, acc=0.50, run_id="a"),
        row("mtt", 1, acc=0.70, run_id="b"),
        row("mtt", 1, acc=0.70, run_id="c"),  # ties with b: the earlier row wins
        row("mtt", 1, status="FAILED", run_id="d", failure_reason="diverged"),
        row("mtt", 10, acc=0.80, run_id="e"),
        row("mct", 10, status="FAILED", run_id="f"),  # a group with no metric at all
        row("mtt", 1, acc=0.90, sweep="s2", run_id="g"),  # another sweep: its own group
        # sequence rows: no acc; recommendation ranks by hr10 (higher), language modelling by ppl (lower)
        row("farzi", 50, dataset="ml-100k", run_id="h1", hr10_mean=0.05, hr10_std=0.01),
        row("farzi", 50, dataset="ml-100k", run_id="h2", hr10_mean=0.08, hr10_std=0.01),
        row("farzi", 50, dataset="ptb", run_id="p1", ppl_mean=300.0, ppl_std=5.0),
        row("farzi", 50, dataset="ptb", run_id="p2", ppl_mean=250.0, ppl_std=5.0),
        row("farzi", 50, dataset="ptb", run_id="p3", status="FAILED"),
    ]


def ids(rs):
    return [r["run_id"] for r in rs]


def test_filter_rows(rows):
    assert ids(res.filter_rows(rows)) == ids(rows)
    assert ids(res.filter_rows(rows, algorithms=["mct", "RANDOM"])) == ["r1", "f"]
    assert ids(res.filter_rows(rows, budgets=[10])) == ["e", "f"]
    assert ids(res.filter_rows(rows, statuses=["failed"])) == ["d", "f", "p3"]
    assert ids(res.filter_rows(rows, datasets=["ptb"], statuses=["FINISHED"])) == ["p1", "p2"]
    assert ids(res.filter_rows(rows, algorithms=["mtt"], budgets=[1], datasets=["digits"])) == ["a", "b", "c", "d", "g"]
    assert res.filter_rows(rows, algorithms=["nope"]) == []


def test_best_per_group(rows):
    best = res.best_per_group(rows)
    # one per (sweep, dataset, algorithm, budget), in the order of the groups' first rows
    assert ids(best) == ["r1", "b", "e", "f", "g", "h2", "p2"]
    assert res.best_per_group([]) == []
    # FAILED without a metric never beats a finished trial, wherever it stands
    assert ids(res.best_per_group([rows[4], rows[1]])) == ["a"]
    # the tie goes to the earlier row either way round
    assert ids(res.best_per_group([rows[3], rows[2]])) == ["c"]


def test_headline_metric(rows):
    assert res.headline_metric(rows[:3]) == ("acc", True)
    assert res.headline_metric(rows[8:10]) == ("hr10", True)
    assert res.headline_metric(rows[12:] + rows[10:12]) == ("ppl", False)
    assert res.row_metric(rows[4]) is None


def test_sort_rows(rows):
    digits = rows[:8]
    asc = res.sort_rows(digits, "acc_mean")
    assert ids(asc) == ["r1", "a", "b", "c", "e", "g", "d", "f"]  # stable on the tie, missing values last
    desc = res.sort_rows(digits, "-acc_mean")
    assert ids(desc) == ["g", "e", "b", "c", "a", "r1", "d", "f"]  # still stable, missing still last
    assert ids(res.sort_rows(digits, ["-budget", "algorithm"])) == ["f", "e", "a", "b", "c", "d", "g", "r1"]
    assert ids(res.sort_rows(rows, "ppl_mean")[:3]) == ["p2", "p1", "r1"]
    assert ids(res.sort_rows(rows, [])) == ids(rows)
    with pytest.raises(ValueError, match="hyperparameters.*allowed: run_id"):
        res.sort_rows(rows, "hyperparameters")


def test_tables_of_filtered_rows(rows):
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(results_table(res.filter_rows(rows, algorithms=["random"])))  # only the baseline: shown, not empty
    assert "r1" in console.export_text()
    console.print(results_table(res.filter_rows(rows, datasets=["ptb"])))
    ptb = console.export_text()
    assert "p2" in ptb
    assert next(line for line in ptb.splitlines() if "p3" in line).count("FAILED") == 1  # nothing logged: shown too
    console.print(results_table(res.filter_rows(rows, datasets=["digits"])))  # the scores' columns (tests/test_scores.py)
    text = console.export_text()
    assert all(col in text for col in ("gain", "gap", "DDRS"))


# ------------------------------------------------------------------------------------------------
# end to end on a tiny digits sweep

SMALL = copy.deepcopy(TINY)
SMALL.update({"name": "tiny-browse",
              "experts": {**TINY["experts"], "count": 1, "epochs": 2},
              "algorithms": {"mtt": {"budgets": [1], "iterations": 2,
                                     "hyperparameters": {"syn_steps": 2, "expert_epochs": 1, "max_start_epoch": 1}}},
              "evaluation": {"networks": 1, "epochs": 2, "interval": 0}})


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, ray_cluster):
    d = tmp_path_factory.mktemp("browse")
    spec = d / "tiny.yaml"
    spec.write_text(yaml.safe_dump(SMALL))
    root = d / "runs"
    out = CliRunner().invoke(main, ["launch", str(spec), "--root", str(root)], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    uri = workspace(root).tracking_uri
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny-browse")
    parent = client.search_runs([exp.experiment_id], filter_string="tags.`orchestrate.role` = 'sweep'")[0]
    return root, uri, parent.info.run_id


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.slow
def test_results_filters_best_and_sort(sweep):
    root, _, parent = sweep
    out = cli("results", "--root", root, "--algorithm", "mtt", "--format", "json")
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert [r["algorithm"] for r in rows] == ["mtt"] and rows[0]["random_acc_mean"] is not None
    both = json.loads(cli("results", "--root", root, "--sweep", parent, "--best", "--status", "finished",
                          "--sort", "-acc_mean", "--format", "json").output)
    assert sorted(r["algorithm"] for r in both) == ["mtt", "random"]
    assert [r["acc_mean"] for r in both] == sorted((r["acc_mean"] for r in both), reverse=True)
    assert json.loads(cli("results", "--root", root, "--budget", 10, "--format", "json").output) == []
    table = cli("results", "--root", root, "--algorithm", "random")
    assert table.exit_code == 0 and "random" in table.output
    bad = cli("results", "--root", root, "--sort", "-nope")
    assert bad.exit_code == 2 and "'nope'" in bad.output and "acc_mean" in bad.output and "Usage" in bad.output
    missing = cli("results", "--root", root, "--sweep", "0" * 32)
    assert missing.exit_code == 1 and "0" * 32 in missing.output


@pytest.mark.slow
def test_compare(sweep):
    root, uri, parent = sweep
    rows = res.collect(uri, sweep=parent)
    a, b = (r["run_id"] for r in rows)
    out = cli("compare", a, b, "--root", root, "--format", "json")
    assert out.exit_code == 0, out.output
    cmp = json.loads(out.output)
    assert [r["run_id"] for r in cmp["runs"]] == [a, b]
    by_name = {(r["section"], r["name"]): r for r in cmp["rows"]}
    algo = by_name[("param", "algorithm")]
    assert algo["differs"] and sorted(algo["values"].values()) == ["mtt", "random"]
    assert not by_name[("param", "dataset")]["differs"] and not by_name[("run", "sweep")]["differs"]
    assert by_name[("metric", "acc_mean")]["values"][a] == rows[0]["acc_mean"]
    mtt = next(r["run_id"] for r in rows if r["algorithm"] == "mtt")
    rnd = next(r["run_id"] for r in rows if r["algorithm"] == "random")
    assert by_name[("metric", "loss")]["values"][mtt] is not None  # only mtt has a loss: a differing row
    assert by_name[("metric", "loss")]["values"][rnd] is None and by_name[("metric", "loss")]["differs"]
    diff = json.loads(cli("compare", a, b, "--root", root, "--format", "json", "--only-diff").output)
    assert diff["rows"] and all(r["differs"] for r in diff["rows"])
    assert ("param", "algorithm") in {(r["section"], r["name"]) for r in diff["rows"]}
    table = cli("compare", a, b, "--root", root, "--only-diff")
    assert table.exit_code == 0 and "algorithm" in table.output and "≠" in table.output
    csv_rows = list(csv.reader(io.StringIO(cli("compare", a, b, "--root", root, "--format", "csv").output)))
    assert csv_rows[0] == ["section", "name", "differs", a, b]
    assert ["param", "algorithm", "True"] == csv_rows[[r[:2] for r in csv_rows].index(["param", "algorithm"])][:3]
    # each trial logged its test images' outcomes beside its set: the paired difference is the
    # difference of the two accuracies (one network each, the same seed), on the same test images
    paired = cmp["paired"]
    assert paired["reference"] == a and not paired["skipped"] and paired["unit"] == "images"
    accs = {r["run_id"]: r["acc_mean"] for r in rows}
    st = paired["stats"][b]
    assert st["delta"] == pytest.approx(accs[b] - accs[a], abs=1e-12) and st["cases"] == 360 and st["se_cases"] > 0
    assert by_name[("paired", "acc_delta")]["values"] == {a: None, b: st["delta"]}
    assert "evaluated on the same 360 test images" in " ".join(cli("compare", a, b, "--root", root).output.split())
    # and `results --paired`: the trial's gain over its random subset with that standard error
    mtt_id = next(r["run_id"] for r in rows if r["algorithm"] == "mtt")
    rnd_id = next(r["run_id"] for r in rows if r["algorithm"] == "random")
    by_id = {r["run_id"]: r for r in json.loads(cli("results", "--root", root, "--paired", "--format", "json").stdout)}
    gain = by_id[mtt_id]
    se = paired["stats"][b]["se"]
    assert gain["gain_se"] == pytest.approx(se) and by_id[rnd_id]["gain_z"] is None
    assert gain["gain_z"] == pytest.approx(gain["gain_over_random"] / se)
    assert " z " in cli("results", "--root", root, "--paired").output
    unknown = cli("compare", a, "f" * 32, "--root", root)
    assert unknown.exit_code == 1 and "f" * 32 in unknown.output and "error" in unknown.output


@pytest.mark.slow
def test_summarise_sweep(sweep, tmp_path):
    _, uri, parent = sweep
    paths = summary.summarise_sweep(uri, parent, tmp_path / "summary")
    assert [p.name for p in paths] == ["results.csv", "accuracy_vs_budget.png"]
    csv_path, png = paths
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert csv_path.read_bytes().decode() == res.to_csv(res.attach_paired(uri, res.collect(uri, sweep=parent)))
    written = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert sorted(r["algorithm"] for r in written) == ["mtt", "random"]
    client = MlflowClient(uri)
    mtt = next(r for r in written if r["algorithm"] == "mtt")  # its gain, paired on the test images, in MLflow too
    assert float(mtt["gain_z"]) == pytest.approx(client.get_run(mtt["run_id"]).data.metrics["gain_z"])
    assert float(mtt["gain_se"]) > 0 and next(r for r in written if r["algorithm"] == "random")["gain_z"] == ""
    assert sorted(a.path for a in client.list_artifacts(parent, "summary")) == [
        "summary/accuracy_vs_budget.png", "summary/results.csv"]
    with pytest.raises(LookupError, match="0" * 32):
        summary.summarise_sweep(uri, "0" * 32, tmp_path / "none")


def test_summary_plot_of_sequence_rows_skips_failed_trials(tmp_path):
    rows = [row("random", b, dataset="ptb", ppl_mean=400.0 - b, ppl_std=3.0, full_data_ppl_mean=150.0,
                full_data_ppl_std=4.0) for b in (10, 100)]
    rows += [row("farzi", b, dataset="ptb", ppl_mean=300.0 - b, ppl_std=3.0, full_data_ppl_mean=150.0,
                 full_data_ppl_std=4.0) for b in (10, 100)]
    rows += [row("farzi", 1000, dataset="ptb", status="FAILED")]
    png = summary._plot_vs_budget(rows, {}, tmp_path / "p.png", "ptb")
    assert png.stat().st_size > 5000
    empty = summary._plot_vs_budget([row(status="FAILED")], {"full_data_acc_mean": 0.9}, tmp_path / "e.png", "none")
    assert empty.stat().st_size > 2000
