"""Scores of results rows (gain over the random subset, gap to full data, DD-Ranking score) and
per-architecture columns: on hand-made rows, then on fake trials logged to a temporary SQLite
MLflow store, through `orchestrate results` (table, json, csv) and `summarise_sweep`."""
import csv
import io
import json
import math

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from rich.console import Console

from orchestrator import results as res
from orchestrator.results_tables import table as results_table
from orchestrator import summary
from orchestrator.cli import main
from orchestrator.tracking import PARENT_TAG, ROLE_TAG, ensure_experiment, workspace
from tests.conftest import results_row

E = math.e


def by_hand(acc, rnd, full, w=0.5):
    """DD-Ranking's definition written out: IOR, HLR, alpha, then the normalisation."""
    ior, hlr = acc - rnd, full - acc
    alpha = w * ior - (1 - w) * hlr
    return (E ** alpha - E ** -1) / (E - E ** -1)


row = results_row


# ------------------------------------------------------------------------------------------------
# the formulas


def test_ddrs_by_hand():
    # acc 0.80, random 0.60, full 0.90: IOR 0.20, HLR 0.10, alpha = 0.5*0.20 - 0.5*0.10 = 0.05
    assert res.ddrs(0.80, 0.60, 0.90) == pytest.approx((math.exp(0.05) - math.exp(-1)) / (E - math.exp(-1)))
    assert res.ddrs(0.80, 0.60, 0.90) == pytest.approx(0.290755, abs=1e-6)
    assert res.ddrs(0.80, 0.60, 0.90) == pytest.approx(by_hand(0.80, 0.60, 0.90))
    # alpha = 0 (gain over random = gap to full): (1 - e^-1) / (e - e^-1)
    assert res.ddrs(0.70, 0.60, 0.80) == pytest.approx((1 - math.exp(-1)) / (E - math.exp(-1)))
    assert res.ddrs(0.70, 0.60, 0.80) == pytest.approx(0.268941, abs=1e-6)
    # the ends of alpha's range [-1, 1] map to 0 and 1; another weight moves the score
    assert res.ddrs(0.0, 1.0, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert res.ddrs(1.0, 0.0, 0.0) == pytest.approx(1.0)
    assert res.ddrs(0.80, 0.60, 0.90, w=1.0) == pytest.approx(by_hand(0.80, 0.60, 0.90, w=1.0))
    # worse than random and far from full: below the alpha = 0 score
    assert res.ddrs(0.50, 0.60, 0.90) < res.ddrs(0.70, 0.60, 0.80)


def test_ddrs_refuses_percent():
    with pytest.raises(ValueError, match="fractions"):
        res.ddrs(80.0, 60.0, 90.0)
    with pytest.raises(ValueError, match="w = 2"):
        res.ddrs(0.8, 0.6, 0.9, w=2)


def test_scores_of_image_rows():
    rows = res.attach_baselines([
        row("random", 1, acc=0.60, full_data_acc_mean=0.90, run_id="r1"),
        row("mtt", 1, acc=0.80, full_data_acc_mean=0.90, run_id="a"),
        row("mtt", 10, acc=0.95, full_data_acc_mean=0.90, run_id="b"),  # no random subset of budget 10
        row("mtt", 1, acc=0.70, run_id="c"),  # no full-data number
        row("mtt", 1, status="FAILED", full_data_acc_mean=0.90, run_id="d"),  # no accuracy
        row("mtt", 1, acc=0.75, full_data_acc_mean=0.90, sweep="s2", run_id="e"),  # another sweep: no random
    ])
    res.attach_scores(rows)
    by = {r["run_id"]: r for r in rows}
    a = by["a"]
    assert a["gain_over_random"] == pytest.approx(0.80 - 0.60)
    assert a["gap_to_full"] == pytest.approx(0.90 - 0.80)
    assert a["ddrs"] == pytest.approx(by_hand(0.80, 0.60, 0.90))
    assert res.scores(a) == {"gain_over_random": a["gain_over_random"], "gap_to_full": a["gap_to_full"],
                             "ddrs": a["ddrs"]}
    assert by["r1"]["gain_over_random"] == 0.0 and by["r1"]["gap_to_full"] == pytest.approx(0.30)
    b = by["b"]  # beyond full data: a negative gap; no baseline: no gain and no DDRS
    assert b["gain_over_random"] is None and b["gap_to_full"] == pytest.approx(-0.05) and b["ddrs"] is None
    c = by["c"]
    assert c["gain_over_random"] == pytest.approx(0.10) and c["gap_to_full"] is None and c["ddrs"] is None
    assert res.scores(by["d"]) == {"gain_over_random": None, "gap_to_full": None, "ddrs": None}
    assert by["e"]["gain_over_random"] is None and by["e"]["ddrs"] is None
    # what trial code can pass: only the three means
    assert res.scores({"acc_mean": 0.7, "random_acc_mean": 0.6, "full_data_acc_mean": 0.8})["ddrs"] == \
        pytest.approx((1 - math.exp(-1)) / (E - math.exp(-1)))
    assert res.scores({}) == dict.fromkeys(res.SCORE_FIELDS)
    assert res.scores({"acc_mean": float("nan"), "random_acc_mean": 0.5})["gain_over_random"] is None


def test_scores_of_sequence_rows():
    rows = res.attach_baselines([
        row("random", 50, dataset="ml-100k", hr10_mean=0.04, full_data_hr10_mean=0.12, run_id="rr"),
        row("farzi", 50, dataset="ml-100k", hr10_mean=0.06, full_data_hr10_mean=0.12, run_id="h"),
        row("random", 50, dataset="ptb", ppl_mean=400.0, full_data_ppl_mean=150.0, run_id="rp"),
        row("farzi", 50, dataset="ptb", ppl_mean=300.0, full_data_ppl_mean=150.0, run_id="p"),
    ])
    by = {r["run_id"]: res.scores(r) for r in rows}
    # recommendation: HR@10 (a fraction), higher is better
    assert by["h"]["gain_over_random"] == pytest.approx(0.02) and by["h"]["gap_to_full"] == pytest.approx(0.06)
    assert by["h"]["ddrs"] == pytest.approx(by_hand(0.06, 0.04, 0.12))
    # language modelling: perplexity, lower is better; positive gain = better than random; no DDRS
    assert by["p"] == {"gain_over_random": pytest.approx(100.0), "gap_to_full": pytest.approx(150.0), "ddrs": None}


# ------------------------------------------------------------------------------------------------
# tables, json, csv on hand-made rows


def render(t, width=200):
    console = Console(width=width, record=True)
    console.print(t)
    return console.export_text()


def test_table_shows_scores_and_dashes():
    rows = res.attach_baselines([
        row("random", 1, acc=0.60, full_data_acc_mean=0.90, run_id="r1"),
        row("mtt", 1, acc=0.80, full_data_acc_mean=0.90, run_id="trial-a"),
        row("mtt", 10, acc=0.95, run_id="trial-b"),
    ])
    text = render(results_table(rows))
    assert "gain" in text and "gap" in text and "DDRS" in text
    line_a = next(line for line in text.splitlines() if "trial-a" in line)
    assert "+20.0" in line_a and "10.0" in line_a and f"{by_hand(0.8, 0.6, 0.9):.3f}" in line_a
    line_b = next(line for line in text.splitlines() if "trial-b" in line)
    assert line_b.split().count("-") >= 5  # best, random, full, gain, gap, DDRS: none known
    seq = res.attach_baselines([
        row("random", 50, dataset="ptb", ppl_mean=400.0, ppl_std=3.0, full_data_ppl_mean=150.0, run_id="rp"),
        row("farzi", 50, dataset="ptb", ppl_mean=300.0, ppl_std=3.0, full_data_ppl_mean=150.0, run_id="p"),
    ])
    text = render(results_table(seq))
    assert "% of full" in text and "+100.00" in text and "150.00" in text


def test_json_and_csv_carry_scores_of_hand_made_rows():
    rows = res.attach_baselines([row("random", 1, acc=0.60, full_data_acc_mean=0.90, run_id="r1"),
                                 row("mtt", 1, acc=0.80, full_data_acc_mean=0.90, run_id="a")])
    out = {r["run_id"]: r for r in json.loads(res.to_json(rows))}
    assert out["a"]["gain_over_random"] == pytest.approx(0.2) and out["a"]["ddrs"] == pytest.approx(by_hand(.8, .6, .9))
    written = {r["run_id"]: r for r in csv.DictReader(io.StringIO(res.to_csv(rows)))}
    assert float(written["a"]["gap_to_full"]) == pytest.approx(0.1)
    assert float(written["a"]["ddrs"]) == pytest.approx(by_hand(.8, .6, .9))
    # sortable by a score
    assert [r["run_id"] for r in res.sort_rows(res.attach_scores(rows), "-ddrs")] == ["a", "r1"]


# ------------------------------------------------------------------------------------------------
# a fake sweep in a temporary SQLite MLflow store: cross-architecture metrics, CLI, summary

ARCH_METRICS = {  # (algorithm, budget) -> metrics; resnet18_bn / vgg11 are the other architectures
    ("random", 1): {"acc_mean": 0.60, "acc_std": 0.02, "acc_mean/resnet18_bn": 0.40, "acc_std/resnet18_bn": 0.03,
                    "acc_mean/vgg11": 0.35, "acc_std/vgg11": 0.04},
    ("mtt", 1): {"acc_mean": 0.80, "acc_std": 0.01, "acc_mean/resnet18_bn": 0.55, "acc_std/resnet18_bn": 0.02,
                 "acc_mean/vgg11": 0.50, "acc_std/vgg11": 0.03},
    ("random", 10): {"acc_mean": 0.90, "acc_std": 0.01},
    ("mtt", 10): {"acc_mean": 0.93, "acc_std": 0.01, "acc_mean/resnet18_bn": 0.85, "acc_std/resnet18_bn": 0.02},
    ("dm", 10): {},  # failed: nothing logged
}
FULL = {"full_data_acc_mean": 0.97, "full_data_acc_std": 0.005}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("scores") / "runs"
    ws = workspace(root)
    client = MlflowClient(ws.tracking_uri)
    exp = ensure_experiment(client, "scores", ws.artifact_root)
    parent = client.create_run(exp, run_name="scores-sweep", tags={ROLE_TAG: "sweep", "dataset": "digits"}).info.run_id
    ids = {}
    for (algo, budget), metrics in ARCH_METRICS.items():
        run = client.create_run(exp, run_name=f"{algo}-{budget}", tags={
            ROLE_TAG: "trial", PARENT_TAG: parent, "algorithm": algo, "dataset": "digits", "budget": str(budget)})
        rid = run.info.run_id
        client.log_param(rid, "iterations", 0 if algo == "random" else 5)
        client.log_param(rid, "model.name", "convnet")
        for k, v in {**metrics, **(FULL if metrics else {})}.items():
            client.log_metric(rid, k, v)
        client.set_terminated(rid, "FINISHED" if metrics else "FAILED")
        ids[(algo, budget)] = rid
    client.set_terminated(parent, "FINISHED")
    return root, ws.tracking_uri, parent, ids


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_collect_scores_and_architectures(store):
    _, uri, parent, _ = store
    rows = {(r["algorithm"], r["budget"]): r for r in res.collect(uri, sweep=parent)}
    assert res.architectures(list(rows.values())) == ["resnet18_bn", "vgg11"]
    mtt = rows[("mtt", 1)]
    assert mtt["acc_mean/resnet18_bn"] == 0.55 and mtt["acc_std/vgg11"] == 0.03
    assert mtt["random_acc_mean/resnet18_bn"] == 0.40 and mtt["random_acc_std/vgg11"] == 0.04
    assert mtt["gain_over_random"] == pytest.approx(0.20) and mtt["gap_to_full"] == pytest.approx(0.17)
    assert mtt["ddrs"] == pytest.approx(by_hand(0.80, 0.60, 0.97))
    m10 = rows[("mtt", 10)]  # its random subset has no resnet18_bn: None, not missing
    assert m10["acc_mean/resnet18_bn"] == 0.85 and m10["random_acc_mean/resnet18_bn"] is None
    assert m10["acc_mean/vgg11"] is None and m10["ddrs"] == pytest.approx(by_hand(0.93, 0.90, 0.97))
    assert rows[("dm", 10)]["ddrs"] is None and rows[("dm", 10)]["gain_over_random"] is None


def test_results_json_csv_table(store):
    root, _, _, ids = store
    out = cli("results", "--root", root, "--format", "json")
    assert out.exit_code == 0, out.output
    rows = {(r["algorithm"], r["budget"]): r for r in json.loads(out.output)}
    mtt = rows[("mtt", 1)]
    for f in ("gain_over_random", "gap_to_full", "ddrs", "acc_mean/resnet18_bn", "acc_std/resnet18_bn",
              "acc_mean/vgg11", "random_acc_mean/vgg11"):
        assert f in mtt, f
    assert mtt["ddrs"] == pytest.approx(by_hand(0.80, 0.60, 0.97)) and mtt["acc_mean/vgg11"] == 0.50

    out = cli("results", "--root", root, "--format", "csv")
    assert out.exit_code == 0, out.output
    reader = csv.DictReader(io.StringIO(out.output))
    header = reader.fieldnames
    assert header[:6] == ["run_id", "sweep", "algorithm", "dataset", "budget", "status"]
    for f in ("gain_over_random", "gap_to_full", "ddrs", "acc_mean/resnet18_bn", "random_acc_std/vgg11"):
        assert f in header, f
    assert header.index("ddrs") < header.index("acc_mean/resnet18_bn") < header.index("hr10_mean")
    written = {(r["algorithm"], int(r["budget"])): r for r in reader}
    assert float(written[("mtt", 1)]["gain_over_random"]) == pytest.approx(0.20)
    assert written[("dm", 10)]["ddrs"] == "" and written[("mtt", 10)]["acc_mean/vgg11"] == ""

    table = cli("results", "--root", root)
    assert table.exit_code == 0, table.output
    main_table, cross = table.output.split("cross-architecture")
    print(table.output)
    for col in ("gain", "gap", "DDRS"):
        assert col in main_table, col
    line = next(line for line in main_table.splitlines() if ids[("mtt", 1)] in line)  # the id is never wrapped
    assert "+20.0" in line and "17.0" in line and f"{by_hand(0.80, 0.60, 0.97):.3f}" in line
    assert "resnet18_bn" not in main_table  # the architectures have their own table
    header = next(line for line in cross.splitlines() if "resnet18_bn" in line)
    assert header.index("convnet (spec)") < header.index("resnet18_bn") < header.index("vgg11")
    lines = {a: next((line for line in cross.splitlines() if ids[a] in line), None) for a in ids}
    assert lines[("random", 10)] is None and lines[("dm", 10)] is None  # no other architecture: not shown
    cells = {a: [c.strip() for c in line.split("│")] for a, line in lines.items() if line}
    # the spec's model, resnet18_bn, vgg11; a trial's gain over the random subset on each architecture
    assert cells[("mtt", 1)][4:7] == ["80.0 ± 1.0 (+20.0)", "55.0 ± 2.0 (+15.0)", "50.0 ± 3.0 (+15.0)"]
    assert cells[("random", 1)][4:7] == ["60.0 ± 2.0", "40.0 ± 3.0", "35.0 ± 4.0"]
    assert cells[("mtt", 10)][4:7] == ["93.0 ± 1.0 (+3.0)", "85.0 ± 2.0", "-"]  # no random on resnet18_bn
    # sorting by a score through the CLI
    srt = json.loads(cli("results", "--root", root, "--sort", "-ddrs", "--format", "json").output)
    assert [r["ddrs"] is None for r in srt] == [False, False, False, False, True]
    assert [r["ddrs"] for r in srt[:4]] == sorted((r["ddrs"] for r in srt[:4]), reverse=True)


def test_summary_csv_and_plot(store, tmp_path):
    _, uri, parent, _ = store
    csv_path, png = summary.summarise_sweep(uri, parent, tmp_path / "summary")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    written = {(r["algorithm"], int(r["budget"])): r for r in csv.DictReader(io.StringIO(csv_path.read_text()))}
    assert float(written[("mtt", 1)]["ddrs"]) == pytest.approx(by_hand(0.80, 0.60, 0.97))
    assert float(written[("mtt", 1)]["acc_mean/resnet18_bn"]) == 0.55
    # and on each finished trial's own run in MLflow
    client = MlflowClient(uri)
    mtt1 = written[("mtt", 1)]["run_id"]
    m = client.get_run(mtt1).data.metrics
    assert m["gain_over_random"] == pytest.approx(0.20) and m["gap_to_full"] == pytest.approx(0.17)
    assert m["ddrs"] == pytest.approx(by_hand(0.80, 0.60, 0.97))


def test_plot_without_baseline_or_gain(tmp_path):
    rows = [row("mtt", b, acc=0.5 + b / 100, full_data_acc_mean=0.9) for b in (1, 10, 50)]
    png = summary._plot_vs_budget(rows, {}, tmp_path / "nogain.png", "no random subset")
    assert png.stat().st_size > 5000
    rows = res.attach_baselines(rows + [row("random", b, acc=0.4 + b / 100) for b in (1, 10, 50)])
    png = summary._plot_vs_budget(rows, {}, tmp_path / "gain.png", "with gains")
    assert png.stat().st_size > 5000
