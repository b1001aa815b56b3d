"""A tiny Farzi spec through `orchestrate launch`: sequence experts trained by the Ray pool into
the Arrow store, a Farzi trial and its random baseline under Tune, MLflow runs with the metric
curves, F and M as safetensors and readable samples. The data is a generated MovieLens-format
``u.data`` (users walk through items in order, so next-item prediction is learnable)."""
import json

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient
from safetensors import safe_open

from orchestrator.artifacts import read_cases, read_synthetic
from orchestrator.cli import main
from orchestrator.compare import compare_runs
from orchestrator.tracking import workspace

pytestmark = pytest.mark.slow  # every test launches a sweep on Ray


def write_movielens(root, users=60, items=30, length=14, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, users + 1):
        start = int(rng.integers(1, items + 1))
        for t in range(length):
            item = (start + t - 1) % items + 1
            rows.append((u, item, int(rng.integers(1, 6)), 880000000 + 1000 * t + u))
    rng.shuffle(rows)
    root.mkdir(parents=True, exist_ok=True)
    (root / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{ts}\n" for u, i, r, ts in rows))
    (root / "u.item").write_text("".join(f"{i}|Movie {i} (1990)|01-Jan-1990||x|0\n" for i in range(1, items + 1)),
                                 encoding="latin-1")


TINY = {
    "name": "tiny-farzi",
    "seed": 1,
    "checkpoint_interval": 2,
    "dataset": {"name": "ml-100k"},
    "model": {"name": "sasrec", "dim": 16, "blocks": 1, "heads": 1, "max_len": 12},
    "experts": {"count": 2, "epochs": 3, "lr": 0.01, "batch_size": 16},
    "algorithms": {"farzi": {"budgets": [4], "iterations": 4,
                             "hyperparameters": {"seq_len": 8, "latent_dim": 4, "inner_steps": 3, "inner_lr": 0.01,
                                                 "real_batch": 16, "max_start_epoch": 2, "init": "real"}}},
    "evaluation": {"networks": 1, "epochs": 3, "interval": 2, "batch_size": 8, "lr": 0.01},
}


@pytest.fixture(scope="module")
def tiny_farzi(tmp_path_factory, ray_cluster):
    d = tmp_path_factory.mktemp("farzi-e2e")
    write_movielens(d / "ml")
    spec = d / "tiny.yaml"
    spec.write_text(yaml.safe_dump({**TINY, "dataset": {"name": "ml-100k", "root": str(d / "ml")}}))
    root = d / "runs"
    res = CliRunner().invoke(main, ["launch", str(spec), "--root", str(root)], catch_exceptions=False)
    return spec, root, res


def test_farzi_launch_end_to_end(tiny_farzi):
    spec, root, res = tiny_farzi
    assert res.exit_code == 0, res.output
    client = MlflowClient(workspace(root).tracking_uri)
    exp = client.get_experiment_by_name("tiny-farzi")
    parent, = client.search_runs([exp.experiment_id], filter_string="tags.`orchestrate.role` = 'sweep'")
    assert 0 < parent.data.metrics["full_data_hr10_mean"] <= 1
    children = client.search_runs([exp.experiment_id], filter_string="tags.`orchestrate.role` = 'trial'")
    assert sorted(c.data.tags["algorithm"] for c in children) == ["farzi", "random"]
    for c in children:
        assert c.info.status == "FINISHED", c.data.tags.get("orchestrate.failure_reason")
        for k in ("hr10_mean", "ndcg10_mean", "hr10_pct_of_full", "full_data_hr10_mean"):
            assert k in c.data.metrics, (c.data.tags["algorithm"], k)
        assert 0 <= c.data.metrics["ndcg10_mean"] <= c.data.metrics["hr10_mean"] <= 1
        files = sorted(a.path for a in client.list_artifacts(c.info.run_id, "synthetic"))
        assert files == ["synthetic/cases.safetensors", "synthetic/samples.txt", "synthetic/synthetic.safetensors"]
    farzi = next(c for c in children if c.data.tags["algorithm"] == "farzi")
    assert sorted(m.step for m in client.get_metric_history(farzi.info.run_id, "loss")) == [1, 2, 3, 4]
    assert sorted(m.step for m in client.get_metric_history(farzi.info.run_id, "eval/hr10_mean")) == [0, 2, 4]
    # the set chosen on the validation split: the first evaluation with the best valid HR@10, logged
    # beside the final one, with that evaluation's test metrics
    valid = sorted((m.step, m.value) for m in client.get_metric_history(farzi.info.run_id, "eval/valid_hr10_mean"))
    assert [s for s, _ in valid] == [0, 2, 4]
    chosen = min(valid, key=lambda sv: (-sv[1], sv[0]))[0]
    assert farzi.data.metrics["selected_iteration"] == chosen
    assert farzi.data.tags["orchestrate.selected_by"] == "valid_hr10 (max)"
    test_at = dict((m.step, m.value) for m in client.get_metric_history(farzi.info.run_id, "eval/hr10_mean"))
    assert farzi.data.metrics["hr10_selected_mean"] == pytest.approx(test_at[chosen])
    picked = client.download_artifacts(farzi.info.run_id, "synthetic_selected/synthetic.safetensors", str(root / "sel"))
    assert read_synthetic(picked)[1]["iteration"] == str(chosen)
    # beside it, that evaluation's per-user hits: their mean per network is its test HR@10
    cases, meta = read_cases(client.download_artifacts(farzi.info.run_id, "synthetic_selected/cases.safetensors",
                                                       str(root / "sel")))
    assert (cases.metric, cases.unit, meta["iteration"], meta["dataset"]) == ("hr10", "users", str(chosen), "ml-100k")
    hr = [cases.network_metric(k) for k in range(len(cases.seeds))]
    assert sum(hr) / len(hr) == pytest.approx(test_at[chosen]) and cases.values.shape[1] > 10
    # and every evaluation's, so that any two of them pair: the last against the first
    assert sorted(a.path for a in client.list_artifacts(farzi.info.run_id, "cases")) == [
        f"cases/iteration_{it:06d}.safetensors" for it in (0, 2, 4)]
    pr = compare_runs(workspace(root).tracking_uri, [f"{farzi.info.run_id}@0", f"{farzi.info.run_id}@4"])["paired"]
    st = pr["stats"][f"{farzi.info.run_id}@4"]
    assert st["delta"] == pytest.approx(test_at[4] - test_at[0]) and st["cases"] == cases.values.shape[1]
    local = client.download_artifacts(farzi.info.run_id, "synthetic", str(root / "dl"))
    with safe_open(f"{local}/synthetic.safetensors", framework="pt") as f:
        meta = f.metadata()
        assert tuple(f.get_tensor("F").shape) == (4, 8, 4) and tuple(f.get_tensor("M").shape) == (4, 31)
    assert meta["algorithm"] == "farzi" and meta["dataset"] == "ml-100k" and meta["task"] == "recommendation"
    # which users the start read (init real): the run's start.json, and every set it exports carries it
    start = client.download_artifacts(farzi.info.run_id, "start.json", str(root / "start"))
    start = json.loads(open(start).read())
    assert start["init"] == "real" and len(start["rows"]) == len(set(start["users"])) == 4
    assert set(start["users"]) <= set(range(1, 61)) and json.loads(meta["start"]) == start
    assert json.loads(read_synthetic(picked)[1]["start"]) == start
    rand = next(c for c in children if c.data.tags["algorithm"] == "random")
    # the random baseline names the users it drew, and its set carries them too
    rs = json.loads(open(client.download_artifacts(rand.info.run_id, "start.json", str(root / "rstart"))).read())
    assert len(set(rs["users"])) == int(rand.data.tags["budget"]) and set(rs["users"]) <= set(range(1, 61))
    rset = client.download_artifacts(rand.info.run_id, "synthetic/synthetic.safetensors", str(root / "rdl"))
    assert json.loads(read_synthetic(rset)[1]["start"]) == rs
    samples = open(f"{local}/samples.txt").read()
    assert "Movie " in samples and "(1990)" in samples


def test_results_show_sequence_metrics(tiny_farzi):
    spec, root, _ = tiny_farzi
    res = CliRunner().invoke(main, ["results", "--root", str(root), "--format", "json"])
    assert res.exit_code == 0, res.output
    import json
    rows = json.loads(res.output)
    farzi = next(r for r in rows if r["algorithm"] == "farzi")
    assert farzi["budget"] == 4 and farzi["hr10_mean"] is not None and farzi["random_hr10_mean"] is not None
    table = CliRunner().invoke(main, ["results", "--root", str(root)])
    assert "hr10" in table.output and "% of full" in table.output, table.output
    out = root.parent / "farzi.safetensors"
    res = CliRunner().invoke(main, ["export", farzi["run_id"], "-o", str(out), "--root", str(root)])
    assert res.exit_code == 0, res.output
    tensors, meta = read_synthetic(out)
    assert set(tensors) == {"F", "M", "lr", "temperature"} and meta["algorithm"] == "farzi"
    assert meta["iteration"] == "4"  # the final set
    picked = root.parent / "farzi-selected.safetensors"
    res = CliRunner().invoke(main, ["export", farzi["run_id"], "-o", str(picked), "--selected", "--root", str(root)])
    assert res.exit_code == 0, res.output
    assert read_synthetic(picked)[1]["iteration"] == str(farzi["selected_iteration"])
    assert f"iteration {farzi['selected_iteration']}" in res.output
    assert "select" in table.output and f"({farzi['selected_iteration']})" in table.output, table.output
    assert farzi["hr10_selected_mean"] is not None and farzi["selected_by"] == "valid_hr10 (max)"


def test_a_farzi_sweep_continues_from_another_sweeps_trial(tiny_farzi, tmp_path, monkeypatch):
    """init_from: runs:/RUN_ID of the first sweep's Farzi trial: the continued trial's evaluation at
    iteration 0 is the first trial's final one (its F and M, the same evaluation seeds), and its
    start record names the run and the 4 iterations behind it."""
    spec, root, res = tiny_farzi
    assert res.exit_code == 0, res.output
    monkeypatch.setenv("ORCHESTRATE_CACHE", str(tmp_path / "cache"))
    client = MlflowClient(workspace(root).tracking_uri)

    def farzi_trial(name):
        exp = client.get_experiment_by_name(name)
        return next(c for c in client.search_runs([exp.experiment_id], filter_string="tags.`orchestrate.role` = 'trial'")
                    if c.data.tags["algorithm"] == "farzi")

    first = farzi_trial("tiny-farzi")
    raw = yaml.safe_load(spec.read_text())
    raw["name"], raw["baselines"] = "tiny-farzi-continued", []
    raw["algorithms"]["farzi"]["init_from"] = f"runs:/{first.info.run_id}"
    cont_spec = tmp_path / "cont.yaml"
    cont_spec.write_text(yaml.safe_dump(raw))
    out = CliRunner().invoke(main, ["launch", str(cont_spec), "--root", str(root)], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert "(0 trained, 2 reused)" in out.output  # the same experts
    cont = farzi_trial("tiny-farzi-continued")
    at0 = {m.step: m.value for m in client.get_metric_history(cont.info.run_id, "eval/hr10_mean")}[0]
    assert at0 == pytest.approx(first.data.metrics["hr10_mean"], abs=1e-9)
    start = json.loads(open(client.download_artifacts(cont.info.run_id, "start.json", str(tmp_path))).read())
    assert (start["init"], start["path"], start["run_id"], start["iterations_behind"]) == (
        "set", f"runs:/{first.info.run_id}", first.info.run_id, 4)
    assert start["start"]["init"] == "real"  # the users the first trial's start read stay on record


@pytest.mark.parametrize("items, sampled", [(30, False), (130, True)])
def test_sampled_metrics_only_where_every_user_has_100_unseen_items(tmp_path, items, sampled):
    """A tiny catalogue (30 items) cannot give 100 negatives per user: the task has none and the
    metrics are the full-ranking ones, instead of an error at the start of a launch."""
    from algorithms.seqmodels import seeded_seq_model
    from algorithms.seqtrain import task_metrics
    from orchestrator.sequences import clear_cache, load_sequences, seq_task

    write_movielens(tmp_path / "ml", items=items)
    clear_cache()
    task = seq_task(load_sequences("ml-100k", tmp_path / "ml"), 12)
    assert (task.test_negatives is not None) == sampled
    model = seeded_seq_model(TINY["model"], task.vocab_size, task.pad_id, 0)
    from algorithms.networks import flatten_params
    metrics = task_metrics(model, flatten_params(model), task)
    assert ("hr10_s100" in metrics) == sampled and "hr10" in metrics
