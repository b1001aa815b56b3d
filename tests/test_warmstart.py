"""``algorithms.<name>.init_from``: a distillation that starts from an exported set or from a
trial's set in MLflow (and a sweep that continues another one's set), its checks, its hash and its
lineage."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

from algorithms.base import SyntheticSet
from algorithms.dm import mean_embedding_distance
from algorithms.networks import fresh_params, functional_embed, manifest_of
from orchestrator import methods
from orchestrator.artifacts import read_synthetic, save_synthetic
from orchestrator.datasets import load_dataset
from orchestrator.spec import SpecError, validate
from orchestrator.sweep import check_budgets
from orchestrator.tasks import task_for
from orchestrator.tracking import workspace
from orchestrator.warmstart import build_started, iterations_behind, load_init_sets

from .conftest import TINY

DM_POINT = {"algorithm": "dm", "budget": 1, "iterations": 80, "hp": {"batch_real": 64, "dsa": False}}


def dm_spec(init_from=None, name="warm", budgets=(1,), **over) -> dict:
    algo = {"budgets": list(budgets), "iterations": 8, "hyperparameters": {"batch_real": 64, "dsa": False}}
    if init_from is not None:
        algo["init_from"] = str(init_from)
    return {**{k: v for k, v in TINY.items() if k not in ("algorithms", "experts")}, "name": name,
            "algorithms": {"dm": algo}, "baselines": [], **over}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def dm_set(digits, steps: int, path, seed: int = 5, start=None):
    """A DM digits set after ``steps`` steps from real images (or from the spec-less ``start``
    file), exported to ``path`` as a trial would, with its iteration."""
    spec = validate(dm_spec(start)).to_dict()
    point = {**DM_POINT, "iterations": steps}
    init = load_init_sets(validate(dm_spec(start)), digits)
    d, record = build_started(point, spec, digits, task_for("digits"), {}, torch.device("cpu"), init, seed)
    for _ in range(steps):
        d.step()
    extra = {"budget": 1, "iteration": steps, "spec_hash": "h", **({"start": record} if record else {})}
    save_synthetic(path, d.synthetic(), digits.info, "dm", extra, {"name": "convnet", "depth": 1, "width": 8})
    return d


def dm_objective(images: torch.Tensor, digits, nets: int = 12) -> float:
    """DM's loss summed over classes, averaged over fixed random networks and all real images of
    each class: the objective without the sampling noise of a step."""
    net = methods.BuildContext(budget=1, hp={}, iterations=0, data=digits, task=task_for("digits"),
                               model={"name": "convnet", "depth": 1, "width": 8}, spec={}, expert_files={},
                               device=torch.device("cpu"), seed=0).image_network()
    manifest, total = manifest_of(net), 0.0
    with torch.no_grad():
        for s in range(nets):
            params = fresh_params(net, 1000 + s)
            for c in range(digits.info.num_classes):
                real = digits.x_train[digits.y_train == c]
                total += float(mean_embedding_distance(functional_embed(net, params, real, manifest),
                                                       functional_embed(net, params, images[c:c + 1], manifest)))
    return total / nets


def test_a_continued_distillation_goes_on_from_the_set(digits, tmp_path):
    first = dm_set(digits, 5, tmp_path / "a.safetensors")
    cont = dm_set(digits, 5, tmp_path / "b.safetensors", seed=6, start=tmp_path / "a.safetensors")
    fresh = dm_set(digits, 5, tmp_path / "c.safetensors", seed=6)
    real = dm_objective(_real_start(digits), digits)
    after5, after10, fresh5 = (dm_objective(d.synthetic().images, digits) for d in (first, cont, fresh))
    # 5 steps lower the objective (58 -> 15.5-16.4 over seeds), 5 more from the exported set lower
    # it again (11-12); a start that ignored the file would be the fresh run: 5 steps from real
    # images (15.0-16.6)
    assert after5 < 0.5 * real, (real, after5)
    assert after10 < 0.85 * min(after5, fresh5), (after5, after10, fresh5)
    tensors, meta = read_synthetic(tmp_path / "b.safetensors")
    start = json.loads(meta["start"])
    assert start["init"] == "set" and start["iterations_behind"] == 5 and start["iteration"] == 5
    assert start["path"] == str(tmp_path / "a.safetensors") and len(start["sha256"]) == 64
    assert start["start"]["init"] == "real"  # the real rows behind the chain stay on record
    assert iterations_behind(meta) == 10


def _real_start(digits) -> torch.Tensor:
    d, _ = build_started(DM_POINT, validate(dm_spec()).to_dict(), digits, task_for("digits"), {},
                         torch.device("cpu"), {}, 5)
    return d.synthetic().images


def test_the_start_is_the_files_images_and_learned_step_size(digits, tmp_path):
    images = torch.randn(10, 1, 8, 8)
    labels = torch.arange(10)
    save_synthetic(tmp_path / "s.safetensors", SyntheticSet(images, labels, 0.0123), digits.info, "mtt",
                   {"iteration": 7}, {"name": "convnet"})
    spec = validate(dm_spec(tmp_path / "s.safetensors"))
    init = load_init_sets(spec, digits)[("dm", 1)]
    d, record = build_started(DM_POINT, spec.to_dict(), digits, task_for("digits"), {}, torch.device("cpu"),
                              {("dm", 1): init}, 3)
    assert torch.equal(d.synthetic().images, images) and d.init_index is None
    assert record["iterations_behind"] == 7 and "start" not in record
    # MTT keeps the set's learned step size (its optimisers start without momentum)
    from algorithms.mtt import EpochSampler, MTTConfig, MTTDistiller

    net = methods.BuildContext(budget=1, hp={}, iterations=0, data=digits, task=task_for("digits"),
                               model={"name": "convnet", "depth": 1, "width": 8}, spec={}, expert_files={},
                               device=torch.device("cpu"), seed=0).image_network()
    traj = [torch.randn(4, sum(p.numel() for p in net.parameters()))]
    mtt = MTTDistiller(net, EpochSampler(traj, 1, 2), digits.x_train, digits.y_train, 10,
                       MTTConfig(ipc=1, syn_steps=2, expert_epochs=1, max_start_epoch=2), seed=0)
    mtt.warm_start(init.images, init.lr)
    assert torch.equal(mtt.images.detach(), images) and mtt.syn_lr.item() == pytest.approx(0.0123)
    mtt.step()
    with pytest.raises(ValueError, match="iteration 1"):
        mtt.warm_start(init.images, init.lr)


def test_the_hash_follows_the_files_content_not_its_path(digits, tmp_path):
    dm_set(digits, 2, tmp_path / "a.safetensors")
    shutil.copy(tmp_path / "a.safetensors", tmp_path / "copy.safetensors")
    dm_set(digits, 3, tmp_path / "other.safetensors")
    h = {p: validate(dm_spec(tmp_path / p)).hash for p in ("a.safetensors", "copy.safetensors", "other.safetensors")}
    assert h["a.safetensors"] == h["copy.safetensors"] != h["other.safetensors"]
    assert validate(dm_spec()).hash not in h.values()
    assert "init_from" not in validate(dm_spec()).algorithms["dm"]  # specs without it keep their hash


def test_a_start_that_does_not_fit_is_refused_with_the_key_and_the_file(digits, tmp_path, write_spec):
    def problems(raw):
        with pytest.raises(SpecError) as e:
            check_budgets(validate(raw, "spec.yaml"), digits)
        return "\n".join(e.value.problems)

    with pytest.raises(SpecError, match=r"algorithms\.dm\.init_from: .*nowhere.safetensors: no such file"):
        validate(dm_spec(tmp_path / "nowhere.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SpecError, match=r"algorithms\.dm\.init_from: .*junk.safetensors: not a readable"):
        validate(dm_spec(tmp_path / "junk.safetensors"))
    path = tmp_path / "s.safetensors"
    dm_set(digits, 1, path)
    with pytest.raises(SpecError, match=r"a set of 'digits'.*spec's dataset is 'mnist'"):
        validate({**dm_spec(path), "dataset": {"name": "mnist"}})
    with pytest.raises(SpecError, match="dataset.zca"):
        validate({**dm_spec(path), "dataset": {"name": "digits", "zca": True}})
    assert "budget 2 needs 2 images per class" in problems(dm_spec(path, budgets=(2,)))
    # shuffled labels: the distillers keep their images class by class
    tensors, meta = read_synthetic(path)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    save_synthetic(path, SyntheticSet(tensors["images"][perm], tensors["labels"][perm], 0.01), digits.info, "dm")
    assert "not in class order" in problems(dm_spec(path))
    # another normalisation: the pixels are in another scale
    from dataclasses import replace

    save_synthetic(path, SyntheticSet(tensors["images"], tensors["labels"], 0.01),
                   replace(digits.info, mean=(0.5,)), "dm")
    assert "metadata field 'mean'" in problems(dm_spec(path))
    nan = tensors["images"].clone()
    nan[3, 0, 2, 2] = float("nan")
    save_synthetic(path, SyntheticSet(nan, tensors["labels"], 0.01), digits.info, "dm")
    assert "the set holds a NaN or infinite value (tensor 'images')" in problems(dm_spec(path))
    seq = {"name": "w", "dataset": {"name": "ml-100k"}, "algorithms": {"farzi": {"budgets": [5], "init_from": str(path)}}}
    with pytest.raises(SpecError, match=r"algorithms\.farzi\.init_from: .*s.safetensors: metadata field 'format' is "
                                        r"'distill-orchestrator/synthetic-v1': not a set of sequences, which farzi distils"):
        validate(seq)  # an image set cannot start Farzi


def test_a_mapping_starts_the_budgets_it_names_and_no_other(digits, tmp_path):
    """``init_from: {budget: FILE}``: each named budget from its own file, the others as the method
    starts (real images); a key that is not a budget is refused; one path for two budgets cannot
    fit both."""
    path = tmp_path / "s.safetensors"
    dm_set(digits, 3, path)
    raw = dm_spec(budgets=(1, 2))
    raw["algorithms"]["dm"]["init_from"] = {1: str(path)}
    spec = validate(raw)
    inits = load_init_sets(spec, digits)
    assert list(inits) == [("dm", 1)]
    file_images = read_synthetic(path)[0]["images"]
    for budget, from_file in ((1, True), (2, False)):
        d, record = build_started({**DM_POINT, "budget": budget}, spec.to_dict(), digits, task_for("digits"), {},
                                  torch.device("cpu"), inits, 3)
        assert (record["init"] == "set") is from_file and (d.init_index is None) is from_file
        if from_file:
            assert torch.equal(d.synthetic().images, file_images)
    raw["algorithms"]["dm"]["init_from"] = {10: str(path)}
    with pytest.raises(SpecError, match=r"algorithms\.dm\.init_from\.10: is not one of the budgets \[1, 2\]"):
        validate(raw)
    raw["algorithms"]["dm"]["init_from"] = str(path)
    with pytest.raises(SpecError, match=r"budget 2 needs 2 images per class.*\{2: FILE\}"):
        check_budgets(validate(raw), digits)


def test_a_trials_set_in_mlflow_starts_as_its_exported_file_would(digits, tmp_path, monkeypatch, write_spec):
    """``init_from: runs:/RUN_ID[/PATH]``: the trial's set is downloaded from the tracking store and
    starts the distillation as the same file exported would (same hash, same images), with the URI
    in the lineage; what cannot be read is refused naming the key, the URI and why, and a store that
    is not there is not created."""
    from orchestrator.tracking import ROLE_TAG
    from orchestrator.trial import LATEST_ARTIFACT, SYNTHETIC_ARTIFACT

    monkeypatch.setenv("ORCHESTRATE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "synthetic.safetensors"
    dm_set(digits, 3, path)
    uri = workspace(tmp_path / "runs").tracking_uri
    client = MlflowClient(uri)
    exp = client.create_experiment("first", artifact_location=(tmp_path / "artifacts").as_uri())

    def trial(artifact, finished=True, role="trial"):
        run = client.create_run(exp, tags={ROLE_TAG: role}).info.run_id
        if artifact:
            client.log_artifact(run, str(path), artifact.rsplit("/", 1)[0])
        if finished:
            client.set_terminated(run)
        return run

    done, running, sweep, empty = trial(SYNTHETIC_ARTIFACT), trial(LATEST_ARTIFACT, False), trial(None, role="sweep"), \
        trial(None)
    by_file, by_run = validate(dm_spec(path)), validate(dm_spec(f"runs:/{done}"), tracking_uri=uri)
    assert by_run.hash == by_file.hash
    entry = by_run.algorithms["dm"]["init_from"][1]
    assert entry["uri"] == f"runs:/{done}" and Path(entry["path"]).read_bytes() == path.read_bytes()
    assert Path(entry["path"]).parent == tmp_path / "cache" / "runs" / done
    init = load_init_sets(by_run, digits)[("dm", 1)]
    assert torch.equal(init.images, read_synthetic(path)[0]["images"])
    assert init.record()["path"] == f"runs:/{done}"
    latest = validate(dm_spec(f"runs:/{running}/{LATEST_ARTIFACT}"), tracking_uri=uri)  # a running trial's set
    assert latest.hash == by_file.hash
    from orchestrator.cli import main

    spec_file = write_spec(dm_spec(f"runs:/{done}"), "from_run.yaml")
    res = CliRunner().invoke(main, ["validate", str(spec_file), "--tracking-uri", uri])
    assert res.exit_code == 0 and f"valid (spec hash {by_file.hash})" in res.output, res.output
    res = CliRunner().invoke(main, ["validate", str(spec_file), "--root", str(tmp_path / "runs")])  # its store
    assert res.exit_code == 0 and f"valid (spec hash {by_file.hash})" in res.output, res.output
    res = CliRunner().invoke(main, ["validate", str(spec_file), "--root", str(tmp_path / "other")])
    assert res.exit_code == 2 and "no MLflow tracking database at" in res.output, res.output
    assert not (tmp_path / "other").exists()

    def refused(value, tracking_uri=uri):
        with pytest.raises(SpecError) as e:
            validate(dm_spec(value), "spec.yaml", tracking_uri)
        (problem,) = e.value.problems
        assert problem.startswith(f"spec.yaml: algorithms.dm.init_from: {value}: "), problem
        return problem

    assert "none is given here" in refused(f"runs:/{done}", None)
    assert "run nope is not in" in refused("runs:/nope")
    assert f"RUNNING: a trial logs its final set when it finishes; name the set of its latest evaluation, " \
           f"runs:/{running}/{LATEST_ARTIFACT}" in refused(f"runs:/{running}")
    assert "is a sweep, whose trials hold the sets" in refused(f"runs:/{sweep}")
    assert f"has no artifact '{SYNTHETIC_ARTIFACT}'" in refused(f"runs:/{empty}")
    nowhere = tmp_path / "elsewhere" / "mlflow.db"
    assert "no MLflow tracking database at" in refused(f"runs:/{done}", f"sqlite:///{nowhere}")
    assert not nowhere.exists()


@pytest.mark.slow
def test_a_sweep_continues_from_another_sweeps_set(tmp_path, ray_cluster, write_spec, monkeypatch):
    """A sweep starts from another's trial (``init_from: runs:/RUN_ID``). The set's evaluation at
    iteration 0 of the continued sweep is the first sweep's final evaluation (same images, same
    evaluation seeds), and the lineage adds up."""
    from orchestrator.cli import main

    monkeypatch.setenv("ORCHESTRATE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "runs"
    first = write_spec(dm_spec(name="first"), "first.yaml")
    res = CliRunner().invoke(main, ["launch", str(first), "--root", str(root)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    client = MlflowClient(workspace(root).tracking_uri)

    def trial(name):
        exp = client.get_experiment_by_name(name)
        (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`orchestrate.role` = 'trial'")
        return run

    run = trial("first")
    out = tmp_path / "first.safetensors"
    res = CliRunner().invoke(main, ["export", run.info.run_id, "-o", str(out), "--root", str(root)])
    assert res.exit_code == 0, res.output
    # the second sweep names the first's trial in MLflow (runs:/RUN_ID), read from --root's store: the
    # same start as the exported file, so the same spec hash
    second = write_spec(dm_spec(f"runs:/{run.info.run_id}", name="second"), "second.yaml")
    res = CliRunner().invoke(main, ["launch", str(second), "--root", str(root)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert f"spec hash {validate(dm_spec(out, name='second')).hash}" in res.output
    cont = trial("second")
    at = {m.step: m.value for m in client.get_metric_history(cont.info.run_id, "eval/acc_mean")}
    assert at[0] == pytest.approx(run.data.metrics["acc_mean"], abs=1e-9)
    start = json.loads(open(client.download_artifacts(cont.info.run_id, "start.json", str(tmp_path))).read())
    assert start["init"] == "set" and start["iterations_behind"] == 8 and start["run_id"] == run.info.run_id
    assert start["path"] == f"runs:/{run.info.run_id}"
    again = tmp_path / "second.safetensors"
    CliRunner().invoke(main, ["export", cont.info.run_id, "-o", str(again), "--root", str(root)])
    assert iterations_behind(read_synthetic(again)[1]) == 16


# -- Farzi: a set of latent sequences F and decoder M --------------------------------------------------------------
FARZI_MODEL = {"name": "sasrec", "dim": 8, "blocks": 1, "heads": 1, "max_len": 8}
FARZI_HP = {"seq_len": 6, "latent_dim": 4, "inner_steps": 3, "inner_lr": 0.01, "real_batch": 8, "max_start_epoch": 1,
            "init": "real", "outer_lr": 0.05, "outer_schedule": "constant"}


@pytest.fixture(scope="module")
def movielens(tmp_path_factory):
    """A generated MovieLens-format u.data (tests/test_farzi_e2e.py's) and its data."""
    from .test_farzi_e2e import write_movielens

    root = tmp_path_factory.mktemp("ml")
    write_movielens(root)
    from orchestrator.sequences import load_sequences

    return root, load_sequences("ml-100k", root)


def farzi_spec(root, init_from=None, **hp) -> dict:
    algo = {"budgets": [4], "iterations": 5, "hyperparameters": {**FARZI_HP, **hp}}
    if init_from is not None:
        algo["init_from"] = str(init_from)
    return {"name": "warm-farzi", "seed": 1, "dataset": {"name": "ml-100k", "root": str(root)}, "model": FARZI_MODEL,
            "experts": {"count": 1, "epochs": 2, "lr": 0.01, "batch_size": 16}, "algorithms": {"farzi": algo},
            "baselines": [], "evaluation": {"networks": 1, "epochs": 2, "batch_size": 8, "lr": 0.01}}


def farzi_set(movielens, steps: int, path=None, seed: int = 3, start=None):
    """A Farzi distiller after ``steps`` outer steps from real sequences (or from the ``start``
    file), built as a trial builds it (experts: one made-up trajectory), its set exported to
    ``path`` with its iteration and start record."""
    from algorithms.networks import flatten_params
    from algorithms.seqmodels import seeded_seq_model
    from orchestrator.artifacts import save_sequences

    root, data = movielens
    spec = validate(farzi_spec(root, start))
    task = task_for("ml-100k")
    vocab, pad = data.info.vocab_size, data.info.pad_id
    theta = flatten_params(seeded_seq_model(FARZI_MODEL, vocab, pad, 0))
    trajectory = torch.stack([theta + 0.01 * i for i in range(3)])
    point = {"algorithm": "farzi", "budget": 4, "iterations": 5, "hp": spec.algorithms["farzi"]["hyperparameters"]}
    ctx = methods.BuildContext(budget=4, hp=dict(point["hp"]), iterations=5, data=data, task=task,
                               model=FARZI_MODEL, spec=spec.to_dict(), expert_files={}, device=torch.device("cpu"),
                               seed=seed, preloaded={"full": [trajectory]})
    d = methods.get("farzi").build(ctx)
    init = load_init_sets(spec, data).get(("farzi", 4))
    record = methods.get("farzi").start_record(d, task, data, FARZI_MODEL)
    if init is not None:
        from orchestrator.warmstart import warm_start

        warm_start(d, init)
        record = init.record()
    losses = [d.step()["loss"] for _ in range(steps)]
    if path is not None:
        save_sequences(path, d.synthetic(), data, "farzi", {"budget": 4, "iteration": steps, "spec_hash": "h",
                                                            **({"start": record} if record else {})})
    return d, losses


def test_farzi_continues_from_its_exported_latent_set(movielens, tmp_path):
    """init_from starts Farzi from a file's F and M (not its own start); from there its outer loss
    is that of the trained set, below a fresh start's on the same problems; the lineage adds up."""
    first, first_losses = farzi_set(movielens, 6, tmp_path / "a.safetensors")
    tensors, _ = read_synthetic(tmp_path / "a.safetensors")
    cont, cont_losses = farzi_set(movielens, 3, tmp_path / "b.safetensors", start=tmp_path / "a.safetensors")
    _, fresh_losses = farzi_set(movielens, 3)
    assert cont.init_index is None and first.init_index is not None
    # the same seed draws the same problems: fresh repeats the first run's first steps exactly, and the
    # continued set (6 steps behind it, which lowered the loss 3.46 -> 3.40) scores below it on each of
    # them (3.37-3.39 against 3.42-3.46)
    assert fresh_losses == first_losses[:3] and first_losses[-1] < first_losses[0], first_losses
    assert all(c < f for c, f in zip(cont_losses, fresh_losses)), (cont_losses, fresh_losses)
    meta = read_synthetic(tmp_path / "b.safetensors")[1]
    start = json.loads(meta["start"])
    assert start["init"] == "set" and start["iterations_behind"] == 6 and start["start"]["init"] == "real"
    assert iterations_behind(meta) == 9
    # warm-started, before any step: the file's F and M exactly
    d, _ = farzi_set(movielens, 0, start=tmp_path / "a.safetensors")
    assert torch.equal(d.synthetic().F.float(), tensors["F"]) and torch.equal(d.synthetic().M.float(), tensors["M"])


def test_a_farzi_start_that_does_not_fit_is_refused_with_the_key_and_the_field(movielens, tmp_path):
    from algorithms.farzi import FarziSet
    from orchestrator.artifacts import save_sequences

    root, data = movielens
    path = tmp_path / "a.safetensors"
    d, _ = farzi_set(movielens, 1, path)

    def problems(raw):
        with pytest.raises(SpecError) as e:
            load_init_sets(validate(raw, "spec.yaml"), data)
        (p,) = e.value.problems
        assert p.startswith(f"spec.yaml: algorithms.farzi.init_from: {path}: "), p
        return p

    assert load_init_sets(validate(farzi_spec(root, path)), data)  # fits
    assert "F of (4, 6, 4), but budget 4 at seq_len 5 and latent_dim 4 is (4, 5, 4)" in problems(
        farzi_spec(root, path, seq_len=5))
    assert "the set fixes latent_dim" in problems(farzi_spec(root, path, latent_dim=[4, 8]))
    assert "tensor 'temperature' is 1, but the spec's temperature is 0.5" in problems(
        farzi_spec(root, path, temperature=0.5))
    syn = d.synthetic()
    save_sequences(path, FarziSet(syn.F, syn.M[:, :-1], syn.temperature, syn.pad_id, syn.lr), data, "farzi")
    assert f"M of (4, {data.info.vocab_size - 1}), but latent_dim 4 onto {data.info.vocab_size} tokens" in problems(
        farzi_spec(root, path))
    bad_M = syn.M.clone()
    bad_M[0, 1] = float("inf")
    save_sequences(path, FarziSet(syn.F, bad_M, syn.temperature, syn.pad_id, syn.lr), data, "farzi")
    assert "the set holds a NaN or infinite value (tensor 'M')" in problems(farzi_spec(root, path))
    save_sequences(path, syn.F.new_zeros(4, 6).long() + 1, data, "random")  # real sequences: a baseline's set
    with pytest.raises(SpecError, match=r"holds sequences, not F, M, temperature: real sequences \(a baseline\)"):
        validate(farzi_spec(root, path))
    farzi_set(movielens, 1, path)
    with pytest.raises(SpecError, match=r"algorithms\.dm\.init_from: .*not a set of images, which dm distils"):
        validate(dm_spec(path))
