"""``resources.precision``: bf16 runs the distillation steps under torch.autocast. The spec key,
its place in the hash, the context itself, and how far a bf16 step lands from the fp32 one."""
import pytest
import torch
import torch.nn.functional as F

from algorithms.base import autocast
from algorithms.dc import DCConfig, DCDistiller
from algorithms.networks import seeded_network
from orchestrator.datasets import load_dataset
from orchestrator.spec import SpecError, validate
from orchestrator.trial import run_step
from tests.conftest import tiny_spec


def test_bf16_runs_convolutions_in_bfloat16_and_fp32_as_written():
    x, w = torch.randn(2, 1, 8, 8), torch.randn(4, 1, 3, 3)
    with autocast("cpu", "bf16"):
        assert F.conv2d(x, w).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert F.conv2d(x, w).dtype == torch.float32
    with pytest.raises(ValueError, match="precision must be fp32 or bf16, not 'fp16'"):
        autocast("cpu", "fp16")


def test_the_spec_key_is_checked_and_only_a_non_default_changes_the_hash():
    base = validate(tiny_spec())
    assert base.resources["precision"] == "fp32"
    assert validate(tiny_spec(resources={"precision": "fp32"})).hash == base.hash  # sweeps from before resume
    assert validate(tiny_spec(resources={"precision": "bf16"})).hash != base.hash
    with pytest.raises(SpecError, match=r"resources\.precision: must be one of fp32, bf16"):
        validate(tiny_spec(resources={"precision": "half"}))


class _Probe:
    iteration = 0

    def step(self):
        return {"bf16": float(torch.is_autocast_enabled("cpu") and
                              torch.get_autocast_dtype("cpu") == torch.bfloat16)}


def test_the_trial_step_runs_in_the_spec_precision():
    assert run_step(_Probe(), torch.device("cpu"), "bf16") == {"bf16": 1.0}
    assert run_step(_Probe(), torch.device("cpu"), "fp32") == {"bf16": 0.0}


def test_a_bf16_gradient_matching_step_is_close_to_the_fp32_one():
    """Same seed, same network and batches: the matching loss agrees to 3% (1.4% here) and the images move in
    nearly the same direction (bf16 rounds the convolutions, not the algorithm)."""
    digits = load_dataset("digits")
    x, y = digits.x_train, digits.y_train
    net = seeded_network({"name": "convnet", "depth": 2, "width": 32}, 1, 10, 8, seed=0)
    runs = {}
    for precision in ("fp32", "bf16"):
        d = DCDistiller(net, x, y, 10, DCConfig(ipc=1, batch_real=64), seed=3)
        start = d.images.detach().clone()
        m = run_step(d, torch.device("cpu"), precision)
        runs[precision] = (m["loss"], (d.images.detach() - start).flatten())
    (loss32, move32), (loss16, move16) = runs["fp32"], runs["bf16"]
    assert loss16 == pytest.approx(loss32, rel=0.03)
    assert not torch.equal(move16, move32)  # it did run in bf16
    assert F.cosine_similarity(move16, move32, dim=0) > 0.9


def test_bf16_is_refused_where_the_cpu_would_emulate_it(monkeypatch, write_spec, tmp_path):
    """On a CPU without bfloat16 units (AVX2 only) autocast emulates bf16 and a step takes tens of
    times longer (DM on MNIST IPC 10: ~100 s instead of 7 s). A local launch stops before Ray starts,
    naming the spec and the key; a trial (a cluster's worker) stops at its start."""
    from click.testing import CliRunner

    import algorithms.base as base
    from orchestrator.cli import main

    monkeypatch.setattr(base, "native_bf16", lambda device: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = write_spec(tiny_spec(resources={"precision": "bf16"}))
    res = CliRunner().invoke(main, ["launch", str(spec), "--root", str(tmp_path / "runs")])
    assert res.exit_code == 2, res.output
    assert f"{spec}: resources.precision is bf16" in res.output and "fp32" in res.output
    assert not (tmp_path / "runs").exists()  # nothing written, Ray never started
    with pytest.raises(ValueError, match=r"resources\.precision is bf16.*no bfloat16 units"):
        base.check_precision("bf16", "cpu")
    base.check_precision("fp32", "cpu")  # fp32 runs anywhere
    monkeypatch.setattr(base, "native_bf16", lambda device: True)
    base.check_precision("bf16", "cpu")

