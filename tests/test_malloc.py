"""orchestrator.malloc: glibc keeps freed tensor blocks for the next step instead of handing them
back (and zero-filling them again), in every process that steps or trains; users' own settings,
ORCHESTRATE_MALLOC=default and other C libraries leave it alone."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from orchestrator import malloc

FAULTS = """
import json, resource, sys, torch
from orchestrator.malloc import tune_malloc
how = tune_malloc()
torch.ones(1)
before = 0
for i in range(40):  # a 64 MB activation made and freed, as each step of a ConvNet on 100 images does
    if i == 20:  # the steady state: the heap has grown to what the steps need (a few blocks)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 * 2**20)
    x.fill_(1.0)
    del x
print(json.dumps({"how": how, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ORCHESTRATE_MALLOC", *malloc._USERS_OWN)}
    out = subprocess.run([sys.executable, "-c", FAULTS], env={**env, **env_extra}, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # 4-7 s (subprocesses or training): kept out of the inner loop
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    default, tuned = _faults({"ORCHESTRATE_MALLOC": "default"}), _faults({})
    assert default["how"] == "off" and tuned["how"] == "tuned"
    # glibc's default: each 64 MB block is a fresh mmap, its 16384 pages faulted in every time
    assert default["faults"] > 20 * 16384 * 0.9, default
    # tuned: the blocks freed stay in the heap, and the next ones reuse their pages (64-byte-aligned
    # blocks may still grow the heap by a block or two now and then, as the holes they leave allow)
    assert tuned["faults"] < 4 * 16384, tuned


SAME = """
import hashlib, json, torch
from orchestrator.malloc import tune_malloc
from algorithms.evaluate import EvalConfig, train_network
from orchestrator.datasets import load_dataset
torch.set_num_threads(1)
how, d = tune_malloc(), load_dataset("digits")
net = train_network({"name": "convnet", "depth": 2, "width": 32}, d.info, d.x_train[:60], d.y_train[:60], 0.01,
                    EvalConfig(epochs=4), 3)
w = torch.cat([p.detach().flatten() for p in net.parameters()]).numpy().tobytes()
print(json.dumps({"how": how, "sha": hashlib.sha256(w).hexdigest()}))
"""


@pytest.mark.slow  # trains in two fresh processes: ~6 s
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_a_network_trains_to_the_same_bits_either_way():
    """Where blocks come from changes no arithmetic: an evaluation network's weights are identical."""
    env = {k: v for k, v in os.environ.items() if k not in ("ORCHESTRATE_MALLOC", *malloc._USERS_OWN)}
    runs = [json.loads(subprocess.run([sys.executable, "-c", SAME], env={**env, **extra}, capture_output=True,
                                      text=True, check=True).stdout.strip().splitlines()[-1])
            for extra in ({"ORCHESTRATE_MALLOC": "default"}, {})]
    assert [r["how"] for r in runs] == ["off", "tuned"] and runs[0]["sha"] == runs[1]["sha"]


def test_the_users_settings_and_the_opt_out_are_left_alone(monkeypatch):
    def fresh(**env):
        monkeypatch.setattr(malloc, "_state", {})
        for k in ("ORCHESTRATE_MALLOC", *malloc._USERS_OWN):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        return malloc.tune_malloc()

    assert fresh(ORCHESTRATE_MALLOC="default") == "off"
    assert fresh(MALLOC_TRIM_THRESHOLD_="1000") == "user"
    assert fresh(GLIBC_TUNABLES="glibc.malloc.hugetlb=1") == "user"
    assert fresh(GLIBC_TUNABLES="glibc.cpu.x86_shstk=off") == "tuned"  # a tunable of something else
    monkeypatch.setattr(sys, "platform", "darwin")
    assert fresh() == "not glibc"
    monkeypatch.setattr(sys, "platform", "linux")
    calls = []
    monkeypatch.setattr(malloc.ctypes, "CDLL", lambda name: pytest.fail(f"loaded {name} twice") if calls else
                        calls.append(name) or type("libc", (), {"gnu_get_libc_version": 1,
                                                                 "mallopt": staticmethod(lambda k, v: 0)})())
    assert fresh() == "refused" and calls == ["libc.so.6"]  # glibc said no: nothing pretends it worked
    assert malloc.tune_malloc() == "refused" and calls == ["libc.so.6"]  # once per process


def test_the_processes_that_step_or_train_call_it(monkeypatch):
    from click.testing import CliRunner

    from orchestrator import cli, parallel

    seen = []
    monkeypatch.setattr(parallel, "tune_malloc", lambda: seen.append("job"))
    assert parallel._call(lambda a, b=0: a + b, {"b": 2}, 1) == 3 and seen == ["job"]  # each evaluation job
    monkeypatch.setattr(cli, "tune_malloc", lambda: seen.append("cli"))
    res = CliRunner().invoke(cli.main, ["validate", "no-such-spec.yaml"])
    assert seen == ["job", "cli"], res.output  # the CLI, before any command runs
    import inspect

    from orchestrator import experts, trial
    for fn in (trial.run_trial, experts._train_one):  # a trial's and an expert task's first lines
        assert "tune_malloc()" in inspect.getsource(fn).split('"""')[-1].split("torch.set_num_threads")[0]


def test_trial_processes_start_with_one_arena_unless_the_user_chose(monkeypatch):
    def env(**set_env):
        for k in ("ORCHESTRATE_MALLOC", malloc.ARENA_ENV, *malloc._USERS_OWN):
            monkeypatch.delenv(k, raising=False)
        for k, v in set_env.items():
            monkeypatch.setenv(k, v)
        return malloc.worker_env()

    if sys.platform.startswith("linux"):
        assert env() == {"MALLOC_ARENA_MAX": "1"}
    assert env(ORCHESTRATE_MALLOC="default") == {}
    assert env(MALLOC_ARENA_MAX="4") == {}  # the user's number of arenas stands
    assert env(MALLOC_MMAP_THRESHOLD_="1000") == {}  # so do their own allocator settings
    monkeypatch.setattr(sys, "platform", "darwin")
    assert env() == {}


# a 134 MB block (a DM step's activation at batch_real 256) made and freed in a thread of its own, as
# Tune runs a trial's function, after other threads took arenas (as Ray's own threads do)
THREAD_FAULTS = """
import json, resource, threading, torch
from orchestrator.malloc import tune_malloc
how = tune_malloc()
torch.set_num_threads(1)
others = [threading.Thread(target=lambda: [bytearray(1000) for _ in range(100)]) for _ in range(4)]
[t.start() for t in others]; [t.join() for t in others]
out = {}
def trial():
    before = 0
    for i in range(30):
        if i == 14:  # the steady state (64-byte-aligned blocks take a few rounds to find a hole that fits)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.empty(32 * 2**20)
        x.fill_(1.0)
        del x
    out["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
t = threading.Thread(target=trial); t.start(); t.join()
print(json.dumps({"how": how, **out}))
"""


@pytest.mark.slow  # 4-7 s (subprocesses or training): kept out of the inner loop
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_a_trials_own_thread_reuses_its_blocks_with_one_arena():
    env = {k: v for k, v in os.environ.items() if k not in ("ORCHESTRATE_MALLOC", malloc.ARENA_ENV, *malloc._USERS_OWN)}
    runs = [json.loads(subprocess.run([sys.executable, "-c", THREAD_FAULTS], env={**env, **extra}, capture_output=True,
                                      text=True, check=True).stdout.strip().splitlines()[-1])
            for extra in ({}, malloc.worker_env() or pytest.fail("no arena setting on glibc"))]
    per_block = 32 * 2**20 * 4 // 4096  # pages of one 134 MB block
    # the thread's own arena: every block is mapped afresh, its pages faulted in again (the thresholds don't apply)
    assert runs[0]["how"] == "tuned" and runs[0]["faults"] > 16 * per_block * 0.9, runs
    # one arena: the main one, where the thresholds keep the freed block for the next (at most a
    # few blocks' growth of the heap over the 16 steps, as in the main thread)
    assert runs[1]["faults"] < 3 * per_block, runs


TRIAL_ENV = """
import json, os, resource
from ray import tune
from orchestrator.sweep import ray_session
def trial(config):
    import torch
    from orchestrator.malloc import tune_malloc
    tune_malloc()
    torch.set_num_threads(1)
    before = 0
    for i in range(30):
        if i == 14:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.empty(32 * 2**20)
        x.fill_(1.0)
        del x
    tune.report({"arenas": os.environ.get("MALLOC_ARENA_MAX", "unset"),
                 "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before})
os.environ.pop("RAY_ADDRESS", None)
with ray_session(num_cpus=1):
    r = tune.Tuner(trial, run_config=tune.RunConfig(storage_path=os.environ["STORE"], verbose=0)).fit()
    m = r[0].metrics
print(json.dumps({"arenas": m["arenas"], "faults": m["faults"], "driver": os.environ.get("MALLOC_ARENA_MAX", "unset")}))
"""


@pytest.mark.slow  # starts a local Ray in a fresh process: ~20 s
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_a_local_sweeps_trials_run_with_one_arena(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("ORCHESTRATE_MALLOC", malloc.ARENA_ENV, *malloc._USERS_OWN)}
    out = subprocess.run([sys.executable, "-c", TRIAL_ENV], env={**env, "STORE": str(tmp_path)}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    # the trial's process started with it, the trial's thread reused its 134 MB blocks, the driver is untouched
    assert res["arenas"] == "1" and res["faults"] < 3 * 32 * 2**20 * 4 // 4096 and res["driver"] == "unset", res
