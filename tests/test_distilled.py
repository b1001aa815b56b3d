"""The published sets in ``distilled/``: every file is in the index and the README table with its
checksum, reads under the export contract, the folder stays under 5 MB, and (slow, with the data)
an independent evaluation lands near the number the table states. Also bench/fidelity.py's
publishing helpers on entries made here."""
import hashlib
import json
import sys
from pathlib import Path

import pytest

from .conftest import REPO, real_data

sys.path.insert(0, str(REPO / "bench"))  # the bench scripts import their helpers as ``common``
fidelity = pytest.importorskip("fidelity")

FOLDER = REPO / "distilled"


def _index() -> list[dict]:
    path = FOLDER / "index.json"
    if not path.is_file():
        pytest.skip("distilled/ has no index.json yet: no set is published")
    return json.loads(path.read_text())


def test_every_published_file_is_indexed_in_the_readme_and_intact():
    from orchestrator.artifacts import read_synthetic

    entries = _index()
    files = {p.name for p in FOLDER.glob("*.safetensors")}
    assert files == {e["file"] for e in entries}, "distilled/ and its index.json list different files"
    readme = (FOLDER / "README.md").read_text()
    assert readme == fidelity.readme_text(entries), "distilled/README.md is not the table of index.json"
    for e in entries:
        data = (FOLDER / e["file"]).read_bytes()
        assert len(data) == e["bytes"] and hashlib.sha256(data).hexdigest() == e["sha256"], e["file"]
        tensors, meta = read_synthetic(FOLDER / e["file"])
        assert meta["dataset"] == e["dataset"] and meta["algorithm"] == e["method"]
        # the recipe the row names (its spec with its overrides) is still the one that made the set
        assert meta["spec_hash"] == e["spec_hash"] in fidelity.entry_hashes(e), e["file"]
    assert sum(p.stat().st_size for p in FOLDER.iterdir() if p.is_file()) < fidelity.PUBLISH_LIMIT


@pytest.mark.slow
def test_the_short_published_sets_evaluate_independently_near_their_stated_numbers():
    """``bench/fidelity.py --verify distilled/ --quick``'s check, as CI runs it: a fresh network per
    set, the cheapest of each metric (an MNIST IPC 1 set at 300 epochs, scored on every 4th test
    image; ML-100k), of a seed no sweep network had, under the sweep's protocol, lands near the
    number the table states. A CI fidelity test stays within a minute (issue 11); the full check of
    every set is ``--verify distilled/`` (minutes): the IPC 10 set, the sets evaluated over 1000
    epochs, and every test image."""
    entries = _index()
    for name in {e["dataset"] for e in entries} - {"digits"}:
        real_data(name)  # skip (or fail under ORCHESTRATE_REQUIRE_DATA) with the reason when absent
    rows = fidelity.verify(FOLDER, quick=True, workers=2)
    assert sorted(r["metric"] for r in rows) == ["acc", "hr10"], "the quick check: images and sequences"
    assert {r["metric"]: r["test_images"] for r in rows} == {"acc": f"every {fidelity.QUICK_TEST_STRIDE}th", "hr10": "all"}
    for r in rows:
        assert r["ok"], (r["file"], r["metric"], r["independent"], r["stated_mean"], r["tolerance"])


def test_verify_finds_a_set_whose_table_overstates_it(tmp_path, write_spec, monkeypatch, capsys):
    """--verify: a digits set whose table states what it scores holds; a set stated 30 points above
    what it scores does not, and the command exits 2 naming it. --quick keeps the cheapest set of
    each metric only."""
    import torch

    from algorithms.base import SyntheticSet
    from algorithms.evaluate import EvalConfig, network_job, random_real_subset
    from orchestrator.artifacts import save_synthetic
    from orchestrator.datasets import load_dataset
    from orchestrator.spec import load_spec
    from tests.conftest import tiny_spec

    spec_path = write_spec(tiny_spec(model={"depth": 1, "width": 8}, evaluation={"networks": 2, "epochs": 15}))
    spec = load_spec(spec_path)
    digits = load_dataset("digits")
    folder = tmp_path / "distilled"
    folder.mkdir()
    entries, truth = [], []
    for name, per_class in (("digits-mtt-ipc1.safetensors", 1), ("digits-mtt-ipc10.safetensors", 10)):
        x, y = random_real_subset(digits.x_train, digits.y_train, per_class, 10, torch.Generator().manual_seed(3))
        save_synthetic(folder / name, SyntheticSet(x, y, 0.02), digits.info, "mtt", {"run_id": "r0"}, model=spec.model)
        data = (folder / name).read_bytes()
        truth.append(network_job(spec.model, digits.info, x, y, 0.02, digits.x_test, digits.y_test,
                                 EvalConfig.from_section(spec.evaluation, networks=1), seed=fidelity.INDEPENDENT_SEED)())
        entries.append(_entry(name, len(data), dataset="digits", spec=str(spec_path), budget=per_class, set_std=0.0,
                              set_mean=truth[-1] + (0.01 if per_class == 1 else 0.3)))  # IPC 10: overstated
    (folder / "index.json").write_text(json.dumps(entries))
    rows = {r["file"]: r for r in fidelity.verify(folder, workers=1)}
    assert rows["digits-mtt-ipc1.safetensors"]["independent"] == pytest.approx(truth[0], abs=1e-9)
    assert rows["digits-mtt-ipc1.safetensors"]["ok"]
    ipc10 = rows["digits-mtt-ipc10.safetensors"]
    assert not ipc10["ok"] and ipc10["independent"] < ipc10["stated_mean"] - ipc10["tolerance"]
    assert [r["file"] for r in fidelity.verify(folder, quick=True, workers=1)] == ["digits-mtt-ipc1.safetensors"]
    monkeypatch.setattr(sys, "argv", ["fidelity.py", "--verify", str(folder), "--workers", "1"])
    with pytest.raises(SystemExit) as exit_:
        fidelity.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "digits-mtt-ipc10.safetensors" in err and "digits-mtt-ipc1.safetensors" not in err


def test_verify_checks_a_perplexity_set_within_five_percent(tmp_path, write_spec, monkeypatch):
    """A language-model set (PTB format, generated): perplexity is checked relative to the stated
    number (5 %, or 3 std), lower being better: the set stated at what it scores holds, one stated
    at 2/3 of it does not."""
    import dataclasses
    import random

    import torch

    from algorithms.farzi import FarziSet
    from algorithms.seqtrain import SeqTrainConfig, seq_network_job
    from orchestrator.artifacts import save_sequences
    from orchestrator.sequences import load_sequences, seq_task
    from orchestrator.spec import load_spec
    from tests.test_sequences import write_ptb

    rng = random.Random(0)
    words = [f"w{i}" for i in range(24)]
    text = lambda n: "".join(" " + " ".join(rng.choices(words, k=12)) + " \n" for _ in range(n))  # noqa: E731
    write_ptb(tmp_path / "data" / "ptb", text(40), text(8), text(8))
    monkeypatch.setenv("ORCHESTRATE_DATA", str(tmp_path / "data"))
    spec_path = write_spec({"name": "lm", "dataset": {"name": "ptb", "root": str(tmp_path / "data" / "ptb")},
                            "model": {"name": "transformer_lm", "dim": 8, "blocks": 1, "heads": 1, "max_len": 8},
                            "experts": {"count": 1, "epochs": 1},
                            "algorithms": {"farzi": {"budgets": [4], "iterations": 1,
                                                     "hyperparameters": {"seq_len": 8, "latent_dim": 4, "max_start_epoch": 1}}},
                            "evaluation": {"networks": 1, "epochs": 3, "batch_size": 2, "lr": 0.01}})
    spec = load_spec(spec_path)
    data = load_sequences("ptb", str(tmp_path / "data" / "ptb"))
    V = data.info.vocab_size
    g = torch.Generator().manual_seed(0)
    syn = FarziSet(torch.randn(4, 8, 4, generator=g), torch.randn(4, V, generator=g), 1.0, None, 0.01)
    folder = tmp_path / "distilled"
    folder.mkdir()
    ev = spec.evaluation
    task = seq_task(data, 8)
    truth = seq_network_job(spec.model, dataclasses.replace(task, valid_inputs=None),
                            syn.probs().detach(), SeqTrainConfig(epochs=3, lr=ev["lr"], batch_size=2,
                                                                 weight_decay=ev["weight_decay"]),
                            fidelity.INDEPENDENT_SEED)()["ppl"]
    entries = []
    for name, stated in (("ptb-farzi-mu4.safetensors", truth * 1.03), ("ptb-farzi-mu4b.safetensors", truth / 1.5)):
        save_sequences(folder / name, syn, data, "farzi")
        entries.append(_entry(name, (folder / name).stat().st_size, dataset="ptb", method="farzi", budget=4,
                              metric="ppl", higher_is_better=False, set_mean=stated, set_std=0.0, spec=str(spec_path)))
    (folder / "index.json").write_text(json.dumps(entries))
    rows = {r["file"]: r for r in fidelity.verify(folder, workers=1)}
    ok, off = rows["ptb-farzi-mu4.safetensors"], rows["ptb-farzi-mu4b.safetensors"]
    assert ok["independent"] == pytest.approx(truth, rel=1e-9) and ok["ok"]
    assert ok["tolerance"] == pytest.approx(0.05 * truth * 1.03)
    assert not off["ok"] and off["independent"] > off["stated_mean"] + off["tolerance"]
    # CI's --quick check stays within a minute: an LM's minutes are left to the full check, and said
    with pytest.raises(fidelity.ReportError, match=r"lists no set that --quick checks \(acc, hr10\)"):
        fidelity.verify(folder, quick=True, workers=1)


def _entry(file="mnist-mtt-ipc1.safetensors", nbytes=31_000, **kw):
    return {"file": file, "bytes": nbytes, "sha256": "0" * 64, "set_mean": 0.8876, "set_std": 0.0123,
            "set_iteration": 2000, "selected_by": None, "dataset": "mnist", "method": "mtt", "budget": 1,
            "metric": "acc", "higher_is_better": True, "final_mean": 0.8876, "final_std": 0.0123,
            "best_mean": 0.8912, "best_iteration": 1750, "random_mean": 0.6706, "random_std": 0.031,
            "pct_of_full": None, "iterations": 2000,
            "published": fidelity.published("mnist", "mtt", 1), "spec": "search_spaces/reference/mnist_ipc1.yaml",
            "spec_hash": "07f51aaeb6cf0912", "git_commit": "b668f8c0123456789", "run_id": "r1", "sweep": "s1", **kw}


def test_readme_rows_state_the_numbers_and_their_provenance():
    text = fidelity.readme_text([_entry(), _entry(file="mnist-mct-ipc1.safetensors", method="mct")])
    rows = [line for line in text.splitlines() if line.startswith("| [")]
    assert [r.split("]")[0] for r in rows] == ["| [mnist-mct-ipc1.safetensors", "| [mnist-mtt-ipc1.safetensors"]
    mtt = rows[1]
    for needle in ("acc 88.8 ± 1.2 (2000, final)", "| 88.8 ± 1.2 |", "89.1 (1750)", "67.1 ± 3.1", "88.7 (DSA, to reach)", "DatasetCondensation",
                   "`search_spaces/reference/mnist_ipc1.yaml`", "b668f8c012", "| 2000 |", "(30 KB)"):
        assert needle in mtt, needle
    # a trial resumed under later code: each commit from the iteration it ran on, and the gap of the
    # resumes made before runs recorded their code
    hist = [[0, "b668f8c0123456789"], [None, None], [590, "c0ffee0123456789+dirty"]]
    row = next(x for x in fidelity.readme_text([_entry(git_commit=hist[-1][1], git_commits=hist)]).splitlines()
               if x.startswith("| ["))
    assert row.endswith("| b668f8c012@0, …, c0ffee0123+dirty@590 |"), row
    assert fidelity.code_history({"orchestrate.git_commits": json.dumps(hist)}) == hist
    assert fidelity.code_history({}) is None


def test_a_set_continued_from_another_says_the_iterations_behind_it(tmp_path):
    """A set whose trial started from an exported set (init_from): the index takes the iterations
    behind the start from the file's ``start`` metadata, the README row shows them and the start."""
    import torch
    from safetensors.torch import save

    start = {"init": "set", "sha256": "ab14bfd926" + "0" * 54, "path": "distilled/x.safetensors",
             "iteration": 1565, "iterations_behind": 1565}
    data = save({"images": torch.zeros(1)}, metadata={"start": json.dumps(start), "iteration": "2000"})
    assert fidelity.started_from(data) == {"iterations_before": 1565,
                                           "init_from": {"sha256": start["sha256"], "path": start["path"]}}
    real = save({"images": torch.zeros(1)}, metadata={"start": json.dumps({"init": "real", "train_images": [1]})})
    assert fidelity.started_from(real) == {} and fidelity.started_from(b"junk") == {}
    row = next(x for x in fidelity.readme_text([_entry(**fidelity.started_from(data))]).splitlines()
               if x.startswith("| ["))
    assert "| 2000 + 1565 before (from ab14bfd926) |" in row, row


def test_set_names_and_the_size_limit(tmp_path):
    img = {"dataset": "mnist", "method": "mct", "budget": 10, "metric": "acc"}
    seq = {"dataset": "ml-100k", "method": "farzi", "budget": 50, "metric": "hr10"}
    assert fidelity.set_name(img) == "mnist-mct-ipc10.safetensors"
    assert fidelity.set_name(seq) == "ml-100k-farzi-mu50.safetensors"
    index = {"a": _entry("a", 3 * 2**20), "b": _entry("b", 1 * 2**20)}
    assert fidelity.check_size(tmp_path, index, {"a": 2**20}) == 2 * 2**20  # replacing a shrinks the folder
    with pytest.raises(fidelity.ReportError, match="5.5 MB, over its 5 MB limit"):
        fidelity.check_size(tmp_path, index, {"c": int(1.5 * 2**20)})


def _published_digits_set(tmp_path, write_spec):
    """A folder publishing one digits set (a real subset, IPC 1) of a tiny spec: (folder, spec path, x, y)."""
    import torch

    from algorithms.base import SyntheticSet
    from algorithms.evaluate import random_real_subset
    from orchestrator.artifacts import save_synthetic
    from orchestrator.datasets import load_dataset
    from orchestrator.spec import load_spec
    from tests.conftest import tiny_spec

    spec_path = write_spec(tiny_spec(model={"depth": 1, "width": 8}, evaluation={"networks": 2, "epochs": 20}))
    digits = load_dataset("digits")
    x, y = random_real_subset(digits.x_train, digits.y_train, 1, 10, torch.Generator().manual_seed(3))
    folder = tmp_path / "distilled"
    folder.mkdir()
    save_synthetic(folder / "digits-mtt-ipc1.safetensors", SyntheticSet(x, y, 0.02), digits.info, "mtt",
                   {"run_id": "r0"}, model=load_spec(spec_path).model)
    data = (folder / "digits-mtt-ipc1.safetensors").read_bytes()
    entry = _entry("digits-mtt-ipc1.safetensors", len(data), dataset="digits", spec=str(spec_path))
    (folder / "index.json").write_text(json.dumps([entry]))
    return folder, spec_path, x, y


def test_also_evaluate_records_another_protocol_once_and_the_readme_shows_it(tmp_path, write_spec, monkeypatch):
    """--also-strategy: a published digits set is evaluated again without flips (the spec's
    networks, epochs and seeds, and a random subset), recorded in the index and the README's second
    table; a second call finds it done and trains nothing."""
    from algorithms.evaluate import EvalConfig, evaluate_set
    from orchestrator.datasets import load_dataset
    from orchestrator.spec import eval_seed
    from orchestrator.spec import load_spec

    folder, spec_path, x, y = _published_digits_set(tmp_path, write_spec)
    digits = load_dataset("digits")
    strategy = "color_crop_cutout_scale_rotate"
    [out] = fidelity.also_evaluate(folder, [strategy], fidelity.bench_console(120))
    [p] = out["protocols"]
    spec = load_spec(spec_path)
    assert (p["dsa_strategy"], p["networks"], p["epochs"], p["seed"]) == (strategy, 2, 20, eval_seed({"seed": spec.seed}))
    direct = evaluate_set(spec.model, digits.info, x, y, 0.02, digits.x_test, digits.y_test,
                          EvalConfig(networks=2, epochs=20, batch_size=spec.evaluation["batch_size"],
                                     dsa_strategy=strategy), seed=p["seed"])
    assert p["mean"] == pytest.approx(direct.mean, abs=1e-9)  # the set, under that protocol, with the sweep's seeds
    assert 0.1 < p["random_mean"] < 1 and p["random_std"] is not None
    assert json.loads((folder / "index.json").read_text()) == [out]
    readme = (folder / "README.md").read_text()
    assert readme == fidelity.readme_text([out]) and "other evaluation protocols" in readme
    assert f"| digits-mtt-ipc1.safetensors | DSA `{strategy}` | 2 x 20 | {100 * p['mean']:.1f} ± " in readme

    # the same protocol with more epochs is another protocol: evaluated once more, recorded beside
    [more] = fidelity.also_evaluate(folder, [strategy], fidelity.bench_console(120), epochs=[30])
    assert [(q["dsa_strategy"], q["epochs"]) for q in more["protocols"]] == [(strategy, 20), (strategy, 30)]
    longer = evaluate_set(spec.model, digits.info, x, y, 0.02, digits.x_test, digits.y_test,
                          EvalConfig(networks=2, epochs=30, batch_size=spec.evaluation["batch_size"],
                                     dsa_strategy=strategy), seed=p["seed"])
    assert more["protocols"][1]["mean"] == pytest.approx(longer.mean, abs=1e-9)
    assert f"| digits-mtt-ipc1.safetensors | DSA `{strategy}` | 2 x 30 | " in (folder / "README.md").read_text()

    # DC's own augmentation (dc:FAMILIES), how DC's authors evaluate DC sets: one more protocol, for the
    # methods asked for only
    untouched = json.loads((folder / "index.json").read_text())
    assert fidelity.also_evaluate(folder, ["dc:crop_scale_rotate"], fidelity.bench_console(120),
                                  methods=["dc"]) == untouched
    [dc] = fidelity.also_evaluate(folder, ["dc:crop_scale_rotate"], fidelity.bench_console(120), methods=["mtt"])
    q = dc["protocols"][2]
    assert (q["aug"], q["dc_strategy"], q["epochs"]) == ("dc", "crop_scale_rotate", 20)
    dc_direct = evaluate_set(spec.model, digits.info, x, y, 0.02, digits.x_test, digits.y_test,
                             EvalConfig(networks=2, epochs=20, batch_size=spec.evaluation["batch_size"],
                                        dc_strategy="crop_scale_rotate"), seed=p["seed"])
    assert q["mean"] == pytest.approx(dc_direct.mean, abs=1e-9) and dc_direct.accs != direct.accs
    assert "| digits-mtt-ipc1.safetensors | DC `crop_scale_rotate` | 2 x 20 | " in (folder / "README.md").read_text()
    with pytest.raises(fidelity.ReportError, match="dc:crop_color.*color"):
        fidelity.also_evaluate(folder, ["dc:crop_color"], fidelity.bench_console(120))
    more = dc

    monkeypatch.setattr("orchestrator.evaluate.evaluate_file", lambda *a, **k: pytest.fail("evaluated twice"))
    assert fidelity.also_evaluate(folder, [strategy], fidelity.bench_console(120)) == [more]
    # the sweep's own protocol (the spec's families, with flip, over its 20 epochs) is the table's numbers
    own = spec.evaluation["dsa_strategy"]
    assert own != strategy and fidelity.sweep_protocol(spec.evaluation) == ("dsa", own, 20)
    assert fidelity.also_evaluate(folder, [own], fidelity.bench_console(120)) == [more]
    assert fidelity.also_evaluate(folder, [strategy], fidelity.bench_console(120), epochs=[30, None]) == [more]


def test_also_evaluate_trains_the_random_subset_once_for_sets_of_one_spec_and_budget(tmp_path, write_spec,
                                                                                       monkeypatch):
    """Two published sets of the same spec and budget (DC's and DM's at IPC 1, say) are compared with
    the same random subset: it is trained for the first and reused for the second (which trains only
    its own networks), and both rows record the same numbers, those of a run that trains it."""
    import shutil

    import orchestrator.evaluate as ev

    folder, _, _, _ = _published_digits_set(tmp_path, write_spec)
    [entry] = json.loads((folder / "index.json").read_text())
    shutil.copy(folder / entry["file"], folder / "digits-dm-ipc1.safetensors")
    other = {**entry, "file": "digits-dm-ipc1.safetensors", "method": "dm"}
    (folder / "index.json").write_text(json.dumps([entry, other]))
    asked, real = [], ev.evaluate_file

    def spy(path, opts, **kw):
        asked.append((Path(path).name, opts.random))
        return real(path, opts, **kw)

    monkeypatch.setattr(ev, "evaluate_file", spy)
    strategy = "color_crop_cutout_scale_rotate"
    first, second = fidelity.also_evaluate(folder, [strategy], fidelity.bench_console(120), epochs=[12])
    assert asked == [(entry["file"], True), ("digits-dm-ipc1.safetensors", False)]
    p, q = first["protocols"][0], second["protocols"][0]
    assert 0.05 < p["random_mean"] < 1 and (q["random_mean"], q["random_std"]) == (p["random_mean"], p["random_std"])
    assert q["mean"] == p["mean"]  # the same images, the same seeds: its own networks did train
    alone = real(folder / "digits-dm-ipc1.safetensors",
                 ev.EvalOptions(dataset="digits", spec=load_spec_of(entry), epochs=12, aug="dsa",
                                dsa_strategy=strategy, workers=1))
    rnd = next(r for r in alone["rows"] if r["trained_on"] == "random")
    assert (rnd["acc_mean"], rnd["acc_std"]) == (q["random_mean"], q["random_std"])  # what it would have trained
    # another budget or protocol is another random subset: a new epochs count trains it again
    asked.clear()
    fidelity.also_evaluate(folder, [strategy], fidelity.bench_console(120), epochs=[13])
    assert asked == [(entry["file"], True), ("digits-dm-ipc1.safetensors", False)]


def load_spec_of(entry):
    from orchestrator.spec import load_spec

    return load_spec(fidelity.REPO / entry["spec"])


def test_reevaluate_records_a_protocol_for_sets_whose_sweep_is_gone(tmp_path, write_spec, monkeypatch, capsys):
    """--reevaluate DIR --also-strategy S [--also-epochs N]: the sets already published in DIR are
    evaluated again as --publish's --also-strategy evaluates them, with no sweep or store to read
    (ROOT does not exist); its numbers are the sweep's networks and seeds under that protocol, and
    the index and README record them. Without --also-strategy, or with a SPEC, it is refused."""
    from algorithms.evaluate import EvalConfig, evaluate_set
    from orchestrator.datasets import load_dataset
    from orchestrator.spec import eval_seed, load_spec

    folder, spec_path, x, y = _published_digits_set(tmp_path, write_spec)
    spec, digits = load_spec(spec_path), load_dataset("digits")
    strategy = "color_crop_cutout_scale_rotate"
    out = tmp_path / "re.json"
    argv = ["fidelity.py", "--reevaluate", str(folder), "--also-strategy", strategy, "--also-epochs", "25",
            "--workers", "1", "--root", str(tmp_path / "no-such-root"), "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    fidelity.main()
    [entry] = json.loads((folder / "index.json").read_text())
    [p] = entry["protocols"]
    assert (p["dsa_strategy"], p["epochs"], p["networks"], p["seed"]) == (strategy, 25, 2, eval_seed({"seed": spec.seed}))
    direct = evaluate_set(spec.model, digits.info, x, y, 0.02, digits.x_test, digits.y_test,
                          EvalConfig(networks=2, epochs=25, batch_size=spec.evaluation["batch_size"],
                                     dsa_strategy=strategy), seed=p["seed"])
    assert p["mean"] == pytest.approx(direct.mean, abs=1e-9)
    assert f"| digits-mtt-ipc1.safetensors | DSA `{strategy}` | 2 x 25 | {100 * p['mean']:.1f} ± " in \
        (folder / "README.md").read_text()
    assert json.loads(out.read_text())["published_sets"] == [entry]
    said = capsys.readouterr().out
    assert f"{100 * p['mean']:.2f} ± " in said and "network 2/2" in said  # each network as it ends
    assert not (tmp_path / "no-such-root").exists()  # no store was opened or made
    for bad, why in ((argv[:3], "give --also-strategy S"), (argv + [str(spec_path)], "give no SPEC")):
        monkeypatch.setattr(sys, "argv", bad)
        with pytest.raises(SystemExit) as exit_:
            fidelity.main()
        assert exit_.value.code == 2 and why in capsys.readouterr().err


def test_a_running_trial_is_exported_and_published_by_its_latest_evaluated_set(tmp_path):
    """`orchestrate export --latest` writes a running trial's latest evaluated set (a finished one's
    final set); --publish skips a trial still running, --unfinished publishes that set, scored by the
    evaluation it carries, marked `N of M (running)`; once the trial has finished, publishing again
    replaces it by the final set."""
    import torch
    from click.testing import CliRunner
    from mlflow import MlflowClient

    from orchestrator.cli import main

    from algorithms.base import SyntheticSet
    from orchestrator.artifacts import save_synthetic
    from orchestrator.datasets import dataset_info
    from orchestrator.tracking import workspace
    from orchestrator.trial import LATEST_ARTIFACT, SYNTHETIC_ARTIFACT

    ws = workspace(tmp_path / "root")
    client = MlflowClient(ws.tracking_uri)
    exp = client.create_experiment("pub", artifact_location=(tmp_path / "root" / "artifacts").as_uri())
    run = client.create_run(exp).info.run_id
    info = dataset_info("digits")

    def log(artifact: str, iteration: int, acc: list[float], fill: float):
        syn = SyntheticSet(torch.full((10, 1, 8, 8), fill), torch.arange(10), 0.01)
        f = save_synthetic(tmp_path / "synthetic.safetensors", syn, info, "dm",
                           {"iteration": iteration, "evaluation": {"acc": acc}})
        client.log_artifact(run, str(f), artifact.rpartition("/")[0])
        return f.read_bytes()

    latest = log(LATEST_ARTIFACT, 500, [0.8969, 0.0039], 0.5)

    def export(*args):
        out = tmp_path / "export.safetensors"
        res = CliRunner().invoke(main, ["export", run, "-o", str(out), "--force", "--root", str(tmp_path / "root"),
                                        *args])
        return res, out.read_bytes() if res.exit_code == 0 else None

    res, data = export("--latest")
    assert res.exit_code == 0 and data == latest, res.output
    assert "iteration 500, acc 0.8969 ± 0.0039" in res.output
    res, _ = export()  # no final set before the trial ends
    assert res.exit_code == 1 and "synthetic/synthetic.safetensors" in res.output
    res, _ = export("--latest", "--selected")
    assert res.exit_code == 2 and "give one of them" in res.output
    history = {"sec_per_iter": [(i, 5.0) for i in range(1, 511)], "eval/acc_mean": [(0, 0.661), (250, 0.897)],
               "eval/acc_std": [(0, 0.008), (250, 0.004)]}  # metrics buffered until the next checkpoint
    row = {"run_id": run, "sweep": "s1", "algorithm": "dm", "dataset": "digits", "budget": 1, "iterations": 5000,
           "status": "RUNNING", "random_acc_mean": 0.66, "random_acc_std": 0.01}
    rows = fidelity.report_rows([row], {run: history}, {run: (0, None)}, 1000, spec="s.yaml")
    folder = tmp_path / "distilled"
    console = fidelity.bench_console(120)
    assert fidelity.publish(rows, ws, folder, console) == []  # a running trial is not published by default
    [e] = fidelity.publish(rows, ws, folder, console, unfinished=True)
    assert (folder / e["file"]).read_bytes() == latest
    assert (e["set_mean"], e["set_std"], e["set_iteration"]) == (0.8969, 0.0039, 500)
    assert (e["iterations"], e["iterations_planned"], e["status"], e["final_mean"]) == (510, 5000, "RUNNING", None)
    line = next(x for x in (folder / "README.md").read_text().splitlines() if x.startswith("| [digits-dm"))
    assert "| 510 of 5000 (running) | acc 89.7 ± 0.4 (500, latest) |" in line, line

    # publishing the same file again keeps what it was measured at under other protocols (another file drops it)
    index = json.loads((folder / "index.json").read_text())
    index[0]["protocols"] = [{"aug": "dsa", "dc_strategy": None, "dsa_strategy": "color_crop_cutout_scale_rotate",
                              "networks": 5, "epochs": 1000, "seed": 17, "mean": 0.9, "std": 0.01,
                              "random_mean": 0.66, "random_std": 0.01}]
    (folder / "index.json").write_text(json.dumps(index))
    [e] = fidelity.publish(rows, ws, folder, console, unfinished=True)
    assert e["protocols"] == index[0]["protocols"]

    final = log(SYNTHETIC_ARTIFACT, 5000, [0.91, 0.002], 0.7)
    client.set_terminated(run, "FINISHED")
    assert export("--latest")[1] == final  # a finished trial's latest set is its final one
    done = {**row, "status": "FINISHED", "acc_mean": 0.91, "acc_std": 0.002}
    history["eval/acc_mean"].append((5000, 0.91))
    history["eval/acc_std"].append((5000, 0.002))
    history["sec_per_iter"] = [(i, 5.0) for i in range(1, 5001)]
    rows = fidelity.report_rows([done], {run: history}, {run: (0, 1)}, 1000, spec="s.yaml")
    [e] = fidelity.publish(rows, ws, folder, console, unfinished=True)
    assert (folder / e["file"]).read_bytes() == final
    assert (e["set_mean"], e["set_iteration"], e["status"]) == (0.91, 5000, "FINISHED") and "protocols" not in e
    assert "| 5000 | acc 91.0 ± 0.2 (5000, final) |" in (folder / "README.md").read_text()

    # a set written before sets carried their evaluation cannot be scored: refused, naming the run
    run2 = client.create_run(exp).info.run_id
    (tmp_path / "old").mkdir()
    old = save_synthetic(tmp_path / "old" / "synthetic.safetensors",
                         SyntheticSet(torch.zeros(10, 1, 8, 8), torch.arange(10), 0.01), info, "dm", {"iteration": 250})
    client.log_artifact(run2, str(old), LATEST_ARTIFACT.rpartition("/")[0])
    rows = fidelity.report_rows([{**row, "run_id": run2}], {run2: history}, {run2: (0, None)}, 1000)
    with pytest.raises(fidelity.ReportError, match=f"run {run2}.*carries no evaluation"):
        fidelity.publish(rows, ws, folder, console, unfinished=True)
