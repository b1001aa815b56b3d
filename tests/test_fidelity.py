"""bench/fidelity.py's report rows, built from rows and metric histories made here (no Ray, no MLflow run)."""
import sys

import pytest

from orchestrator.results import attach_baselines

from .conftest import REPO

sys.path.insert(0, str(REPO / "bench"))  # the bench scripts import their helpers as ``common``
fidelity = pytest.importorskip("fidelity")


def trial(algorithm, dataset, budget, sweep="s1", status="FINISHED", **metrics):
    return {"run_id": f"{algorithm}-{dataset}-{budget}-{sweep}", "sweep": sweep, "algorithm": algorithm,
            "dataset": dataset, "budget": budget, "status": status, "iterations": 0 if algorithm == "random" else 100,
            "failure_reason": None, **metrics}


def test_published_lookup():
    assert fidelity.published("mnist", "dc", 10)["value"] == 97.4
    assert fidelity.published("MNIST", "DSA", 50)["value"] == 99.2
    cifar = fidelity.published("cifar10", "mtt", 1)
    assert cifar["value"] == 46.3 and cifar["kind"] == "published" and "Cazenavette" in cifar["source"]
    # no MTT/MCT paper number on MNIST: DSA's of the same budget, labelled as the level to reach
    for method, budget, value in (("mtt", 1, 88.7), ("mct", 10, 97.8)):
        reach = fidelity.published("mnist", method, budget)
        assert reach["value"] == value and reach["method"] == "dsa" and reach["kind"].startswith("level to reach")
    farzi = fidelity.published("ml-100k", "farzi", 50)  # a claim for any budget, as % of full data
    assert farzi["value"] == [98.0, 120.0] and farzi["unit"] == "% of full"
    assert fidelity.published("digits", "mtt", 1) is None
    assert fidelity.published("cifar10", "mct", 1) is None
    assert fidelity.published("cifar10", "mtt", 20) is None
    assert fidelity.published("ptb", "farzi", 10) is None


def test_best_of_history():
    means = [(0, 0.50), (250, 0.81), (500, 0.79), (750, 0.81)]
    stds = [(0, 0.02), (250, 0.01), (500, 0.03), (750, 0.04)]
    assert fidelity.best_of(means, stds) == (0.81, 0.01, 250)  # the max, the earlier on a tie, its std
    assert fidelity.best_of([(0, 300.0), (10, 250.0), (20, 260.0)], [], higher=False) == (250.0, None, 10)
    assert fidelity.best_of([], []) is None


def test_report_rows_images():
    rows = attach_baselines([
        trial("random", "mnist", 1, acc_mean=0.60, acc_std=0.02),
        trial("random", "mnist", 10, acc_mean=0.90, acc_std=0.01),
        trial("random", "mnist", 1, sweep="other", acc_mean=0.10, acc_std=0.0),
        trial("mtt", "mnist", 1, acc_mean=0.85, acc_std=0.01, full_data_acc_mean=0.98, full_data_acc_std=0.001),
        trial("mct", "mnist", 10, status="RUNNING", full_data_acc_mean=0.98),
        trial("mtt", "digits", 1, acc_mean=0.70, acc_std=0.03),
    ])
    h_mtt = {"eval/acc_mean": [(0, 0.6), (50, 0.88), (100, 0.85)], "eval/acc_std": [(0, 0.02), (50, 0.005), (100, 0.01)],
             "sec_per_iter": [(i, 1.0) for i in range(1, 101)]}
    h_mct = {"eval/acc_mean": [(0, 0.9), (50, 0.93)], "eval/acc_std": [(0, 0.0), (50, 0.01)],
             "sec_per_iter": [(i, 1.0) for i in range(1, 63)]}
    histories = {"mtt-mnist-1-s1": h_mtt, "mct-mnist-10-s1": h_mct}
    times = {"mtt-mnist-1-s1": (1_000_000, 1_090_000), "mct-mnist-10-s1": (2_000_000, None)}
    out = fidelity.report_rows(rows, histories, times, now_ms=2_030_000, spec="ref.yaml")
    by = {(r["dataset"], r["method"], r["budget"]): r for r in out}
    assert sorted(by) == [("digits", "mtt", 1), ("mnist", "mct", 10), ("mnist", "mtt", 1)]  # no random rows

    mtt = by[("mnist", "mtt", 1)]
    acc = mtt["metrics"]["acc"]
    assert (acc["final_mean"], acc["final_std"]) == (0.85, 0.01)
    assert (acc["best_mean"], acc["best_std"], acc["best_iteration"]) == (0.88, 0.005, 50)
    assert (acc["random_mean"], acc["random_std"]) == (0.60, 0.02)  # same sweep, dataset and budget
    assert acc["pct_of_full"] == pytest.approx(100 * 0.85 / 0.98)
    assert (mtt["iterations_done"], mtt["iterations_planned"]) == (100, 100)
    assert mtt["wall_s"] == 90 and not mtt["running"]
    assert mtt["steps_s"] == 100  # the steps' own seconds (wall time also counts stops and evaluations)
    assert mtt["published"]["value"] == 88.7 and mtt["published"]["method"] == "dsa"
    assert mtt["spec"] == "ref.yaml"

    mct = by[("mnist", "mct", 10)]  # running: no final yet, the best so far, wall up to now
    acc = mct["metrics"]["acc"]
    assert acc["final_mean"] is None and acc["best_mean"] == 0.93 and acc["random_mean"] == 0.90
    assert mct["running"] and mct["wall_s"] == 30 and mct["iterations_done"] == 62
    assert mct["published"]["value"] == 97.8

    digits = by[("digits", "mtt", 1)]  # no random subset of digits in the sweep, no published number
    assert digits["metrics"]["acc"]["random_mean"] is None and digits["published"] is None
    assert digits["metrics"]["acc"]["best_mean"] is None and digits["wall_s"] is None

    table, notes = fidelity.table(out)
    assert table.row_count == 3 and list(notes) == [fidelity.DC_README]


def test_report_rows_sequences_and_grid():
    seq = {"full_data_hr10_mean": 0.12, "full_data_hr10_std": 0.0, "full_data_ndcg10_mean": 0.06}
    rows = attach_baselines([
        trial("random", "ml-100k", 50, hr10_mean=0.047, hr10_std=0.006, ndcg10_mean=0.023, ndcg10_std=0.001),
        {**trial("farzi", "ml-100k", 50, hr10_mean=0.054, hr10_std=0.001, ndcg10_mean=0.028, ndcg10_std=0.002,
                 hr10_pct_of_full=45.0, **seq), "run_id": "a"},
        {**trial("farzi", "ml-100k", 50, hr10_mean=0.060, hr10_std=0.002, ndcg10_mean=0.030, ndcg10_std=0.002,
                 hr10_pct_of_full=50.0, **seq), "run_id": "b"},
    ])
    hist = {"b": {"eval/hr10_mean": [(0, 0.02), (30, 0.065), (60, 0.06)], "eval/hr10_std": [(30, 0.003)],
                  "eval/ndcg10_mean": [(0, 0.01), (30, 0.031)], "sec_per_iter": [(60, 1.0)]}}
    out = fidelity.report_rows(rows, hist, {"b": (0, 5000)}, now_ms=10_000)
    assert len(out) == 1
    r = out[0]
    assert r["run_id"] == "b" and r["trials"] == 2  # the better final of the grid's two trials
    assert r["metric"] == "hr10" and list(r["metrics"]) == ["hr10", "ndcg10", "hr10_s100", "ndcg10_s100"]
    hr, nd = r["metrics"]["hr10"], r["metrics"]["ndcg10"]
    assert (hr["final_mean"], hr["best_mean"], hr["best_iteration"], hr["random_mean"]) == (0.060, 0.065, 30, 0.047)
    assert hr["pct_of_full"] == 50.0  # as logged
    assert nd["best_mean"] == 0.031 and nd["random_mean"] == 0.023
    assert nd["pct_of_full"] == pytest.approx(50.0)  # computed from the full-data result
    assert r["published"]["value"] == [98.0, 120.0] and r["wall_s"] == 5
    assert fidelity.table(out)[0].row_count == 2  # HR@10 and NDCG@10 lines


def test_a_sequence_set_chosen_on_validation_is_the_one_indexed_with_its_test_numbers():
    """A Farzi trial whose validation HR@10 peaked at iteration 0: its row carries that evaluation's
    test numbers, the index entry scores the published file by them (not by the final evaluation)
    with % of full from them, and the README row says which iteration and by what it was chosen."""
    seq = {"full_data_hr10_mean": 0.16, "full_data_hr10_std": 0.005}
    rows = attach_baselines([
        trial("random", "ml-100k", 50, hr10_mean=0.061, hr10_std=0.005),
        {**trial("farzi", "ml-100k", 50, hr10_mean=0.135, hr10_std=0.004, hr10_pct_of_full=84.4,
                 hr10_selected_mean=0.146, hr10_selected_std=0.005, ndcg10_selected_mean=0.075,
                 selected_iteration=0, selected_by="valid_hr10 (max)", **seq), "run_id": "f"},
    ])
    r, = fidelity.report_rows(rows, {}, {}, now_ms=1)
    assert r["selected_iteration"] == 0 and r["metrics"]["hr10"]["selected_mean"] == 0.146
    assert r["metrics"]["ndcg10"]["selected_mean"] == 0.075
    r["iterations_done"] = 500
    e = fidelity.index_entry(r, "ml-100k-farzi-mu50.safetensors", b"x")
    assert (e["set_mean"], e["set_std"], e["set_iteration"], e["selected_by"]) == (0.146, 0.005, 0, "valid_hr10 (max)")
    assert (e["final_mean"], e["iterations"]) == (0.135, 500) and e["pct_of_full"] == pytest.approx(91.25)
    row, = [line for line in fidelity.readme_text([e]).splitlines() if line.startswith("| [")]
    for needle in ("| HR@10 14.6 ± 0.5 (0, by valid_hr10 (max)) |", "| 13.5 ± 0.4 |", "| 91% |"):
        assert needle in row, (needle, row)
    image = fidelity.index_entry({**r, "selected_iteration": None}, "x.safetensors", b"x")  # no validation split
    assert (image["set_mean"], image["set_iteration"], image["selected_by"]) == (0.135, 500, None)


def test_a_running_sequence_trial_shows_the_evaluation_its_validation_history_chooses_so_far():
    """Until a trial ends (and logs ``selected_iteration``), the report picks from its
    ``eval/valid_hr10_mean`` history the first best step and shows the test numbers logged there."""
    rows = attach_baselines([trial("farzi", "ml-100k", 50, status="RUNNING", full_data_hr10_mean=0.16)])
    hist = {"eval/valid_hr10_mean": [(0, 0.189), (100, 0.174), (200, 0.189)],
            "eval/hr10_mean": [(0, 0.146), (100, 0.138), (200, 0.140)], "eval/hr10_std": [(0, 0.005), (100, 0.006)],
            "eval/ndcg10_mean": [(0, 0.075), (100, 0.073)]}
    r, = fidelity.report_rows(rows, {rows[0]["run_id"]: hist}, {}, now_ms=1)
    assert r["selected_iteration"] == 0 and r["selected_by"] == "valid_hr10 (max)"  # as the trial's tag will say
    hr, nd = r["metrics"]["hr10"], r["metrics"]["ndcg10"]
    assert (hr["selected_mean"], hr["selected_std"], nd["selected_mean"]) == (0.146, 0.005, 0.075)
    assert hr["best_mean"] == 0.146 and hr["final_mean"] is None
    done, = fidelity.report_rows([{**rows[0], "status": "FINISHED"}], {rows[0]["run_id"]: hist}, {}, now_ms=1)
    assert done["selected_iteration"] is None  # a finished trial's choice is the one it logged (none here)


def test_bench_direct_folders_are_reported_and_published_with_their_recipe_checked(tmp_path, write_spec):
    """--direct: a bench/direct.py --out folder becomes one row per distilled trial (the random trial of
    the same protocol is its baseline); the spec with the curve's overrides must give the spec hash the
    set carries, so a recipe that did not make the set is refused; a run cut off is published only with
    --unfinished, by its latest evaluated set, and the README names the overrides and the script."""
    import json

    import torch

    from algorithms.base import SyntheticSet
    from orchestrator.artifacts import read_synthetic, save_synthetic, set_evaluation
    from orchestrator.datasets import dataset_info
    from tests.conftest import tiny_spec

    spec_path = write_spec(tiny_spec())
    sets = ["algorithms.mtt.iterations=8"]
    spec_hash = fidelity.entry_spec(str(spec_path), sets).hash
    assert spec_hash != fidelity.entry_spec(str(spec_path)).hash
    info, out = dataset_info("digits"), tmp_path / "direct"

    def trial_dir(name, algorithm, evals, done, planned, file_hash=spec_hash, trial_sets=sets):
        file_hash = file_hash or fidelity.entry_spec(str(spec_path), trial_sets).hash
        folder = out / name
        folder.mkdir(parents=True)
        # the evaluation record as bench/direct.py wrote it before it kept the pairs alone: still read
        evaluation = {**evals[-1], "seconds": 1.5}
        save_synthetic(folder / "synthetic.safetensors", SyntheticSet(torch.zeros(10, 1, 8, 8), torch.arange(10), 0.01),
                       info, algorithm, {"budget": 1, "iteration": evals[-1]["iteration"], "spec_hash": file_hash,
                                         "evaluation": evaluation})
        (folder / "curve.json").write_text(json.dumps({
            "trial": name, "spec": str(spec_path), "set": trial_sets, "spec_hash": file_hash, "algorithm": algorithm,
            "budget": 1, "iterations_planned": planned, "iterations_done": done, "evals": evals,
            "full_data": {"acc": [0.98, 0.01]}, "diverged": None, "selected": None, "git_commit": "abc+dirty",
            "sec_per_step": [0.5] * done}))

    trial_dir("random-ipc1", "random", [{"iteration": 0, "acc": [0.55, 0.02]}], 0, 0)
    trial_dir("mtt-ipc1", "mtt", [{"iteration": 0, "acc": [0.55, 0.02]}, {"iteration": 4, "acc": [0.71, 0.03]}], 4, 8)
    _, meta = read_synthetic(out / "mtt-ipc1" / "synthetic.safetensors")
    assert set_evaluation(meta) == {"acc": [0.71, 0.03]}
    [row] = fidelity.direct_rows([out])
    m = row["metrics"]["acc"]
    assert (row["method"], row["status"], row["iterations_done"], row["iterations_planned"]) == ("mtt", "CUT OFF", 4, 8)
    assert (m["final_mean"], m["best_mean"], m["best_iteration"], m["random_mean"]) == (None, 0.71, 4, 0.55)
    assert (row["spec_hash"], row["set"], row["git_commit"], row["sweep"]) == (spec_hash, sets, "abc+dirty", "direct:direct")

    folder = tmp_path / "distilled"
    console = fidelity.bench_console(120)
    assert fidelity.publish([row], None, folder, console) == []  # cut off: only with --unfinished
    [e] = fidelity.publish([row], None, folder, console, unfinished=True)
    assert (folder / e["file"]).read_bytes() == (out / "mtt-ipc1" / "synthetic.safetensors").read_bytes()
    assert (e["set_mean"], e["set_iteration"], e["status"], e["set"]) == (0.71, 4, "CUT OFF", sets)
    line = next(x for x in (folder / "README.md").read_text().splitlines() if x.startswith("| [digits-mtt"))
    assert "| 4 of 8 (cut off) | acc 71.0 ± 3.0 (4, latest) |" in line, line
    assert f"`{spec_path}` with `algorithms.mtt.iterations=8` (`bench/direct.py`) | abc+dirty |" in line, line

    # several folders: the best set per (dataset, method, budget), scored by its latest evaluation; the
    # random baseline may come from a run that evaluated at another interval (same numbers)
    out = tmp_path / "again"
    trial_dir("random-ipc1", "random", [{"iteration": 0, "acc": [0.5, 0.02]}], 0, 0, None,
              sets + ["evaluation.interval=5"])
    trial_dir("mtt-ipc1", "mtt", [{"iteration": 0, "acc": [0.5, 0.02]}, {"iteration": 4, "acc": [0.69, 0.03]}], 4, 8)
    [row] = fidelity.direct_rows([tmp_path / "direct", out])
    assert (row["sweep"], row["metrics"]["acc"]["best_mean"]) == ("direct:direct", 0.71)
    trial_dir("mtt-ipc2", "mtt", [{"iteration": 8, "acc": [0.74, 0.01]}], 8, 8)
    [row] = fidelity.direct_rows([tmp_path / "direct", out])
    assert (row["sweep"], row["status"], row["metrics"]["acc"]["final_mean"]) == ("direct:again", "FINISHED", 0.74)
    [row] = fidelity.direct_rows([out])  # its only random trial evaluated at another interval: still the baseline
    assert row["metrics"]["acc"]["random_mean"] == 0.5

    # a recipe that did not make the set is refused, naming the file
    other = tmp_path / "other"
    out = other
    trial_dir("mtt-ipc1", "mtt", [{"iteration": 8, "acc": [0.8, 0.01]}], 8, 8, file_hash="0123456789abcdef")
    with pytest.raises(fidelity.ReportError, match="mtt-ipc1/synthetic.safetensors: made by spec 0123456789abcdef"):
        fidelity.direct_rows([other])


def test_a_sweep_launched_under_the_specs_older_hash_is_not_reported_as_drift():
    """A sweep launched before checkpoint_interval left the hash carries the spec's older hash (the
    second of ``Spec.hashes``): the same recipe. Any other hash is another version of the spec."""
    from rich.console import Console

    console = Console(record=True, width=200)
    sweep = {"spec": "x.yaml", "sweep_run_id": "r", "status": "RUNNING", "trials": 2, "spec_hash": "new",
             "spec_hashes": ["new", "old"]}
    fidelity.print_report(console, [], [{**sweep, "sweep_spec_hash": h} for h in ("new", "old", "other", None)], "/r")
    said = console.export_text().splitlines()
    assert [line for line in said if line.startswith("x.yaml")] == [
        "x.yaml: sweep r (running, 2 trials)", "x.yaml: sweep r (running, 2 trials)",
        "x.yaml: sweep r (running, 2 trials) (launched from another version of the spec: hash other, now new)",
        "x.yaml: sweep r (running, 2 trials)"]
