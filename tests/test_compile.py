"""``resources.compile``: DM's step through torch.compile. The spec key (only for methods whose step
compiles; not part of the hash, so a sweep resumes with it switched), the way it reaches the
distiller, its record in MLflow, the missing-compiler error, and that a compiled step computes what
the eager one does."""
import json

import pytest
import torch

from algorithms.base import compiled
from algorithms.dm import DMConfig, DMDistiller
from algorithms.networks import functional_embed, seeded_network
from orchestrator import methods
from orchestrator.datasets import load_dataset
from orchestrator.spec import SpecError, validate
from orchestrator.tasks import task_for
from tests.conftest import tiny_spec

DM = {"dm": {"budgets": [1], "iterations": 4, "hyperparameters": {"batch_real": 32}}}


def test_the_spec_key_is_checked_and_never_part_of_the_hash():
    base = validate(tiny_spec(algorithms=DM))
    assert base.resources["compile"] is False
    on = validate(tiny_spec(algorithms=DM, resources={"compile": True}))
    assert on.resources["compile"] is True
    assert on.hash == base.hash  # a sweep resumes with compile switched on or off
    with pytest.raises(SpecError, match=r"resources\.compile: must be bool, got str"):
        validate(tiny_spec(algorithms=DM, resources={"compile": "yes"}))


def test_compile_is_refused_for_a_method_whose_step_takes_a_double_backward():
    """MTT (and DC, DSA, MCT, Farzi) differentiate through gradients: no dead flag, an error naming
    the key and the method."""
    with pytest.raises(SpecError, match=r"resources\.compile: mtt cannot run through torch\.compile.*"
                                        r"Only dm compiles"):
        validate(tiny_spec(resources={"compile": True}))
    both = {**DM, "dc": {"budgets": [1], "iterations": 2}}
    with pytest.raises(SpecError, match=r"resources\.compile: dc cannot"):
        validate(tiny_spec(algorithms=both, resources={"compile": True}))
    assert [n for n in methods.names(baseline=False) if methods.get(n).compiles] == ["dm"]


def test_the_spec_key_reaches_the_distiller():
    digits = load_dataset("digits")
    for flag in (False, True):
        spec = validate(tiny_spec(algorithms=DM, resources={"compile": flag}))
        point, = [p for p in spec.trial_points() if p["algorithm"] == "dm"]
        d = methods.build_point(point, spec.to_dict(), digits, task_for("digits"), {}, torch.device("cpu"))
        assert (d.embed is functional_embed) is not flag


def test_a_missing_cpu_compiler_is_named_before_the_first_step():
    import torch._inductor.config as inductor

    with inductor.patch({"cpp.cxx": ("no-such-c++-compiler",)}):
        with pytest.raises(RuntimeError, match=r"resources\.compile is true, but torch\.compile finds no C\+\+ "
                                               r"compiler.*set resources\.compile: false"):
            compiled(functional_embed, "cpu")
    assert compiled(functional_embed, "cpu") is not functional_embed  # with the compiler back


def test_a_gpu_without_triton_or_a_c_compiler_is_named_before_the_first_step(monkeypatch):
    """On CUDA, inductor emits Triton kernels, whose launchers Triton builds with a C compiler
    ($CC, else gcc, else clang): either missing is said at build time (checked here with both
    faked, so on a machine without a GPU)."""
    import shutil

    from torch.utils import _triton

    from algorithms.base import c_compiler

    monkeypatch.setattr(_triton, "has_triton", lambda: False)
    with pytest.raises(RuntimeError, match=r"needs Triton for its GPU kernels.*set resources\.compile: false"):
        compiled(functional_embed, "cuda")
    monkeypatch.setattr(_triton, "has_triton", lambda: True)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert c_compiler() is None
    with pytest.raises(RuntimeError, match=r"Triton finds no C compiler.*\$CC, then gcc, then clang.*"
                                           r"set resources\.compile: false"):
        compiled(functional_embed, "cuda")
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name == "clang" else None)
    assert c_compiler() == "/usr/bin/clang"
    monkeypatch.setenv("CC", "/opt/cc")
    assert c_compiler() == "/opt/cc"  # $CC first, as Triton reads it
    assert compiled(functional_embed, "cuda") is not functional_embed  # wrapped; nothing runs on a GPU yet


def test_a_trial_records_from_which_iteration_its_steps_compiled(tmp_path):
    """The compile history (``COMPILE_TAG``) as the code history: a switch on resume adds
    [iteration, value]; a run from before the tag, resumed past 0, never compiled until then."""
    from mlflow import MlflowClient

    from orchestrator.tracking import COMPILE_TAG, record_change, workspace

    client = MlflowClient(workspace(tmp_path / "root").tracking_uri)
    exp = client.create_experiment("compile")
    run = client.create_run(exp).info.run_id
    assert record_change(client, run, COMPILE_TAG, False, 0) == [[0, False]]
    assert record_change(client, run, COMPILE_TAG, False, 40) == [[0, False]]
    assert record_change(client, run, COMPILE_TAG, True, 40) == [[0, False], [40, True]]
    assert json.loads(client.get_run(run).data.tags[COMPILE_TAG]) == [[0, False], [40, True]]
    old = client.create_run(exp).info.run_id
    assert record_change(client, old, COMPILE_TAG, True, 30, start=[[0, False]]) == [[0, False], [30, True]]


@pytest.mark.slow
def test_a_compiled_dm_step_computes_the_eager_one():
    """Same seed, same networks and batches: three compiled steps give the eager losses and images
    to float32 rounding (inductor sums in another order), and the embedding did go through
    dynamo (a graph was compiled). ~30 s: inductor builds C++ kernels."""
    import torch._dynamo

    digits = load_dataset("digits")
    net = seeded_network({"name": "convnet", "depth": 2, "width": 16}, 1, 10, 8, seed=0)
    runs = {}
    torch._dynamo.reset()
    for flag in (False, True):
        d = DMDistiller(net, digits.x_train, digits.y_train, 10, DMConfig(ipc=2, batch_real=64), seed=4, compile=flag)
        losses = [d.step()["loss"] for _ in range(3)]
        runs[flag] = (losses, d.images.detach().clone())
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    (eager_loss, eager_x), (comp_loss, comp_x) = runs[False], runs[True]
    assert graphs >= 1
    assert comp_loss == pytest.approx(eager_loss, rel=1e-4)
    assert torch.allclose(comp_x, eager_x, atol=1e-4)
    assert (comp_x - eager_x).abs().max() < 1e-2 * (eager_x - DMDistiller(
        net, digits.x_train, digits.y_train, 10, DMConfig(ipc=2, batch_real=64), seed=4).images.detach()).abs().max()
