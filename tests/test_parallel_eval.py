"""Evaluation networks in parallel (orchestrator.parallel.RayRunner): the same numbers as one
after another, bit for bit, on digits; and a runner that finds no free CPU, or whose tasks cannot
be scheduled, still finishes (in the calling process). A 1-block ConvNet of width 8, a few epochs
on one image per class: the networks take a fraction of a second, Ray's workers most of the time."""
import functools
import contextlib
import time

import pytest
import torch

from algorithms.evaluate import EVAL_THREADS, EvalConfig, evaluate_set, network_job, random_real_subset, sequential
from orchestrator.datasets import load_dataset
from orchestrator.parallel import RayRunner

SMALL = {"name": "convnet", "depth": 1, "width": 8, "norm": "instancenorm", "pooling": "avgpooling"}
CFG = EvalConfig(networks=4, epochs=6, batch_size=8)
SEED = 17


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def small_set(digits):
    x, y = random_real_subset(digits.x_train, digits.y_train, 1, 10, torch.Generator().manual_seed(5))
    return x, y, 0.02


def digest_jobs(digits, small_set) -> list:
    """The evaluation networks' jobs, each returning a digest of its trained weights (and its
    thread count) instead of the test accuracy: equal digests are equal networks, bit for bit."""
    def weights(*args, **kwargs):  # defined here: pickled by value, a worker needs no tests package
        import hashlib

        import algorithms.evaluate as ev

        seen = {}

        def digest(net, x, y):
            seen["threads"] = torch.get_num_threads()
            return hashlib.sha256(b"".join(t.detach().cpu().contiguous().numpy().tobytes()
                                           for t in net.state_dict().values())).hexdigest()

        accuracy, ev.accuracy = ev.accuracy, digest
        try:
            return ev._train_network(*args, **kwargs), seen["threads"]
        finally:
            ev.accuracy = accuracy

    x, y, lr = small_set
    return [functools.partial(weights, *job.args, **job.keywords)
            for job in (network_job(SMALL, digits.info, x, y, lr, digits.x_test, digits.y_test, CFG, SEED + k)
                        for k in range(CFG.networks))]


def wait_for_free_cpus(n: float, timeout: float = 60) -> None:
    """Ray's view of free resources lags behind: wait until it says ``n`` CPUs."""
    import ray

    end = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0.0) != n:
        assert time.monotonic() < end, f"Ray still reports {ray.available_resources().get('CPU', 0.0)} free CPUs"
        time.sleep(0.2)


def in_fresh_interpreter(fn, *args):
    """``fn(*args)`` in a new Python process (spawn), where no Ray session is up: in a full run the
    session's ``ray_cluster`` has started one in this process long before these tests."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def runner_outside_ray() -> tuple:
    import os

    import ray

    os.environ.pop("RAY_ADDRESS", None)
    digits = load_dataset("digits")
    x, y = random_real_subset(digits.x_train, digits.y_train, 1, 10, torch.Generator().manual_seed(5))
    jobs = digest_jobs(digits, (x, y, 0.02))
    runner = RayRunner()
    return runner(jobs) == sequential(jobs), runner.stats["local"], ray.is_initialized()


@pytest.mark.slow  # 4-7 s (subprocesses or training): kept out of the inner loop
def test_outside_ray_a_runner_is_sequential():
    same, local, started = in_fresh_interpreter(runner_outside_ray)
    assert same and local == CFG.networks and not started


# -- orchestrate evaluate ------------------------------------------------------------------------------
@pytest.fixture
def set_file(tmp_path, digits, small_set):
    from algorithms.base import SyntheticSet
    from orchestrator.artifacts import save_synthetic

    x, y, lr = small_set
    return save_synthetic(tmp_path / "set.safetensors", SyntheticSet(x, y, lr), digits.info, "mtt", {"run_id": "r0"},
                          model=SMALL)


def evaluate_json(*args, env=None) -> dict:
    import json

    from click.testing import CliRunner

    from orchestrator.cli import main

    res = CliRunner(env=env).invoke(main, ["evaluate", *map(str, args), "--format", "json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_cli_workers_option(set_file):
    from click.testing import CliRunner

    from orchestrator.cli import main

    res = CliRunner().invoke(main, ["evaluate", str(set_file), "--workers", "0"])
    assert res.exit_code == 2 and "--workers" in res.output and "auto or a number" in res.output
    res = CliRunner(env={"RAY_ADDRESS": "127.0.0.1:1"}).invoke(main, ["evaluate", str(set_file), "--workers", "3"])
    assert res.exit_code == 2 and "joins the cluster at 127.0.0.1:1" in res.output


def short_evaluation(set_file) -> tuple:
    import os

    import ray

    os.environ.pop("RAY_ADDRESS", None)
    auto = evaluate_json(set_file, "--networks", "3", "--epochs", "3")
    started = ray.is_initialized()
    one = evaluate_json(set_file, "--networks", "3", "--epochs", "3", "--workers", "1")
    return auto, one, started or ray.is_initialized()


@pytest.mark.slow  # 4-7 s (subprocesses or training): kept out of the inner loop
def test_cli_short_evaluation_starts_no_ray(set_file):
    """auto: networks of a second or so never pay a local Ray's start; --workers 1 is the same."""
    auto, one, started = in_fresh_interpreter(short_evaluation, set_file)
    assert not started
    assert "no Ray started" in auto["protocol"]["runner"] and auto["protocol"]["threads_per_network"] == 1
    assert [r.get("acc") for r in one["rows"]] == [r.get("acc") for r in auto["rows"]]


@pytest.mark.slow  # 4-7 s (subprocesses or training): kept out of the inner loop
def test_sequential_evaluation_needs_neither_ray_nor_mlflow(set_file):
    """A machine with PyTorch alone (a lent GPU box) evaluates a set file: one network after another
    (``workers=1``) imports neither Ray nor MLflow."""
    import json
    import subprocess
    import sys

    from .conftest import REPO

    code = ("import json, sys\n"
            "sys.modules['ray'] = sys.modules['mlflow'] = None\n"
            "from orchestrator.evaluate import EvalOptions, evaluate_file\n"
            f"r = evaluate_file({str(set_file)!r}, EvalOptions(networks=2, epochs=2, workers=1), device='cpu')\n"
            "print(json.dumps([[row['trained_on'], row.get('acc_mean')] for row in r['rows']]))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = dict(json.loads(res.stdout.strip().splitlines()[-1]))
    assert 0 < rows["synthetic"] <= 1 and 0 < rows["random"] <= 1  # a number: the networks trained


# -- with Ray (slow) ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_parallel_equals_sequential_bit_for_bit(ray_cluster, digits, small_set):
    torch.set_num_threads(2)  # the caller's threads do not matter: every network trains with one
    wait_for_free_cpus(2)
    jobs = digest_jobs(digits, small_set)
    seq = sequential(jobs)
    assert torch.get_num_threads() == 2  # restored after each network
    assert {threads for _, threads in seq} == {EVAL_THREADS}
    assert len({d for d, _ in seq}) == CFG.networks  # four seeds, four networks
    runner = RayRunner(patience_s=120)  # fresh workers start (import torch) slower than these networks train
    done = []
    par = runner(jobs, on_done=lambda i, r: done.append(i))
    assert par == seq
    assert sorted(done) == list(range(CFG.networks))
    assert runner.stats["remote"] >= 1 and runner.stats["local"] >= 1, runner.stats
    assert sum(runner.stats[k] for k in ("remote", "local", "reclaimed")) == CFG.networks

    # and through evaluate_set: the accuracies of the protocol
    x, y, lr = small_set
    args = (SMALL, digits.info, x, y, lr, digits.x_test, digits.y_test, CFG)
    assert evaluate_set(*args, seed=SEED, run=RayRunner(patience_s=120)).accs == evaluate_set(*args, seed=SEED).accs


@contextlib.contextmanager
def both_cpus_held():
    """Two actors of one CPU each hold the test cluster's 2 CPUs (two running trials, say)."""
    import ray

    @ray.remote(num_cpus=1)
    class Holder:
        def ready(self):
            return True

    holders = [Holder.remote() for _ in range(2)]
    try:
        ray.get([h.ready.remote() for h in holders])
        wait_for_free_cpus(0)
        yield
    finally:
        for h in holders:
            ray.kill(h)


@pytest.mark.slow
def test_no_free_cpu_runs_everything_here(ray_cluster, digits, small_set):
    """Both CPUs held (two trials, say): nothing is submitted, the caller trains every network."""
    with both_cpus_held():
        jobs = digest_jobs(digits, small_set)
        runner = RayRunner()
        assert runner(jobs) == sequential(jobs)
        assert runner.stats == {"submitted": 0, "in_group": 0, "remote": 0, "local": CFG.networks, "reclaimed": 0, "failed": 0}


@pytest.mark.slow
def test_tasks_that_cannot_be_scheduled_are_reclaimed(ray_cluster, digits, small_set):
    """Ray says CPUs are free but they are not (another driver took them meanwhile): the tasks
    queue; once the caller's share is done and the patience is over, it cancels them one by one
    and trains their networks itself. The same results, no deadlock."""
    with both_cpus_held():
        jobs = digest_jobs(digits, small_set)
        runner = RayRunner(free=lambda: {"CPU": 2.0, "GPU": 0.0}, patience_s=1.0)
        t0 = time.monotonic()
        assert runner(jobs) == sequential(jobs)
        assert runner.stats == {"submitted": 2, "in_group": 0, "remote": 0, "local": 2, "reclaimed": 2, "failed": 0}, runner.stats
        assert time.monotonic() - t0 < 60


@pytest.mark.slow
def test_a_running_task_that_is_reclaimed_finishes(ray_cluster, tmp_path):
    """Reclaimed while running, a task is not interrupted (an interrupt inside a lazy import would
    leave its worker broken): it finishes in its worker, its result unread."""
    import os

    import ray

    wait_for_free_cpus(2)

    def job(i, folder):  # pickled by value
        import os
        import pathlib
        import time

        time.sleep(2.0)
        (pathlib.Path(folder) / f"{i}-{os.getpid()}").touch()
        return i

    ray.get([ray.remote(num_cpus=1)(lambda: os.getpid()).remote() for _ in range(2)])  # workers up
    wait_for_free_cpus(2)
    runner = RayRunner(patience_s=0.1)
    assert runner([functools.partial(job, i, str(tmp_path)) for i in range(2)]) == [0, 1]
    assert runner.stats["reclaimed"] == 1 and runner.stats["local"] == 1, runner.stats
    end = time.monotonic() + 60
    while not any(p.name.startswith("1-") and p.name != f"1-{os.getpid()}" for p in tmp_path.iterdir()):
        assert time.monotonic() < end, sorted(p.name for p in tmp_path.iterdir())
        time.sleep(0.2)


@pytest.mark.slow
def test_inside_a_placement_group_that_captures_child_tasks(ray_cluster, digits, small_set):
    """As in a Tune trial: the caller is an actor in a placement group bundle of 1 CPU that
    captures its child tasks (Tune's trainable); the runner's tasks go to the cluster's free CPU,
    not into the full bundle."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    wait_for_free_cpus(2)
    jobs = digest_jobs(digits, small_set)

    class Trial:
        def evaluate(self, jobs):
            from orchestrator.parallel import RayRunner

            runner = RayRunner(patience_s=60.0)
            return runner(jobs), runner.stats

    pg = placement_group([{"CPU": 1}])
    ray.get(pg.ready())
    try:
        strategy = PlacementGroupSchedulingStrategy(pg, 0, placement_group_capture_child_tasks=True)
        trial = ray.remote(num_cpus=1)(Trial).options(scheduling_strategy=strategy).remote()
        results, stats = ray.get(trial.evaluate.remote(jobs))
        ray.kill(trial)
    finally:
        remove_placement_group(pg)
    assert results == sequential(jobs)
    assert stats["remote"] >= 1 and stats["reclaimed"] == 0, stats


@pytest.mark.slow
def test_a_trials_own_cpus_train_its_networks_on_a_full_cluster(ray_cluster, digits, small_set):
    """A trial of 2 CPUs as the sweep asks for it (schedulers.trial_resources: two bundles of one CPU,
    STRICT_PACK, Tune capturing child tasks) on the 2-CPU cluster, which it then fills: no CPU is
    free on the cluster, yet its second bundle is free while it evaluates, and the networks train
    there beside the caller (not one after another): the same results, bit for bit."""
    import ray
    from ray.util.placement_group import remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from orchestrator.schedulers import trial_resources

    wait_for_free_cpus(2)
    jobs = digest_jobs(digits, small_set)
    factory = trial_resources(2, 0.0, parallel=True)

    class Trial:
        def evaluate(self, jobs):
            from orchestrator.parallel import RayRunner

            free = ray.available_resources().get("CPU", 0.0)
            runner = RayRunner(patience_s=120.0)  # a fresh worker starts (imports torch) slower than these train
            return runner(jobs), runner.stats, free

    pg = factory.to_placement_group()
    ray.get(pg.ready())
    try:
        strategy = PlacementGroupSchedulingStrategy(pg, 0, placement_group_capture_child_tasks=True)
        trial = ray.remote(num_cpus=1)(Trial).options(scheduling_strategy=strategy).remote()
        results, stats, free = ray.get(trial.evaluate.remote(jobs))
        ray.kill(trial)
    finally:
        remove_placement_group(pg)
    assert free == 0.0  # the cluster is full: before, every network trained in the caller
    assert results == sequential(jobs)
    assert stats["in_group"] >= 1 and stats["remote"] >= 1 and stats["reclaimed"] == 0, stats
    assert stats["remote"] + stats["local"] == CFG.networks, stats


@pytest.mark.slow
def test_cli_in_a_ray_session_gives_the_sequential_numbers(ray_cluster, set_file):
    wait_for_free_cpus(2)
    par = evaluate_json(set_file, "--networks", "3", "--epochs", "6")
    assert "the Ray session of this process" in par["protocol"]["runner"]
    seq = evaluate_json(set_file, "--networks", "3", "--epochs", "6", "--workers", "1")
    assert seq["protocol"]["runner"] == "one network after another in this process"
    assert [r.get("acc") for r in par["rows"]] == [r.get("acc") for r in seq["rows"]]
    assert len(par["rows"][0]["acc"]) == 3 and len(par["rows"][1]["acc"]) == 3


@pytest.mark.slow
def test_a_sweeps_trials_log_the_sequential_numbers(ray_cluster, tmp_path, write_spec, digits):
    """The tiny sweep, one trial at a time, each holding both CPUs of the cluster (as Tune places it
    with sweep.trial_resources: its second CPU a bundle its networks train in): every trial's final
    acc_mean is what evaluate_set computes one network after another on its exported set."""
    from click.testing import CliRunner
    from mlflow import MlflowClient

    from orchestrator.artifacts import read_synthetic
    from orchestrator.cli import main
    from orchestrator.spec import eval_seed, load_spec
    from orchestrator.tracking import workspace
    from tests.conftest import tiny_spec

    wait_for_free_cpus(2)
    path = write_spec(tiny_spec(evaluation={"networks": 3}, resources={"max_concurrent_trials": 1, "cpus_per_trial": 2}))
    root = tmp_path / "runs"
    res = CliRunner().invoke(main, ["launch", str(path), "--root", str(root)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    spec = load_spec(path)
    ev = spec.evaluation
    cfg = EvalConfig(networks=3, epochs=ev["epochs"], batch_size=ev["batch_size"], dsa=ev["dsa"])
    client = MlflowClient(workspace(root).tracking_uri)
    exp = client.get_experiment_by_name(spec.name)
    trials = client.search_runs([exp.experiment_id], filter_string="tags.`orchestrate.role` = 'trial'")
    assert sorted(t.data.tags["algorithm"] for t in trials) == ["mtt", "random"]
    for t in trials:
        local = client.download_artifacts(t.info.run_id, "synthetic/synthetic.safetensors", str(tmp_path))
        tensors, _ = read_synthetic(local)
        # the random subset trains at experts.lr (a float; the file keeps it as float32)
        lr = spec.experts["lr"] if t.data.tags["algorithm"] == "random" else float(tensors["lr"])
        seq = evaluate_set(spec.model, digits.info, tensors["images"], tensors["labels"], lr, digits.x_test,
                           digits.y_test, cfg, seed=eval_seed(spec.to_dict()))
        assert t.data.metrics["acc_mean"] == seq.mean and t.data.metrics["acc_std"] == seq.std, t.data.tags


@pytest.mark.slow
def test_sequence_models_in_parallel_equal_sequential(ray_cluster):
    """Sequence sets (Farzi's soft sequences, the random real ones) take the same runner: each
    evaluation model is one job of one torch thread, identical wherever it trains."""
    from algorithms.farzi import FarziSet
    from algorithms.seqtrain import SeqTask, SeqTrainConfig, evaluate_sequences

    g = torch.Generator().manual_seed(0)
    real = torch.randint(1, 15, (16, 8), generator=g)
    task = SeqTask("recommendation", 15, 0, real, real[:6], torch.randint(1, 15, (6,), generator=g), None)
    spec = {"name": "sasrec", "dim": 8, "blocks": 1, "heads": 1, "max_len": 8, "dropout": 0.3}
    cfg = SeqTrainConfig(epochs=3, lr=0.01, batch_size=4)
    soft = FarziSet(torch.randn(4, 8, 4, generator=g), torch.randn(4, 15, generator=g), 0.5, 0, 0.01).probs()
    wait_for_free_cpus(2)
    for data in (soft, real[:4]):
        runner = RayRunner(patience_s=120)  # fresh workers start (import torch) slower than these train
        par = evaluate_sequences(spec, task, data, cfg, 4, SEED, run=runner)
        seq = evaluate_sequences(spec, task, data, cfg, 4, SEED)
        assert par.per_network == seq.per_network and set(seq.metrics) >= {"hr10", "ndcg10"}
        assert runner.stats["remote"] >= 1 and runner.stats["local"] >= 1, runner.stats
