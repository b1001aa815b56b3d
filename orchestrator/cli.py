"""The ``orchestrate`` command: launch | experts | validate | results | compare | export | evaluate | ui | submit |
status | logs."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from .cli_common import (RESUME_HINT, _ctrl_c, _fail, _load, _shared_workspace, console, err_console, root_option,
                         storage_option, uri_option)
from .cli_evaluate import evaluate, ui
from .cli_results import compare, export, results
from .datasets import DatasetFormatError, DatasetNotFoundError
from .jobs import logs, status, submit
from .malloc import tune_malloc
from .progress import Progress
from .spec import SpecError
from .tracking import tracking_uri_for


def _before_ray(s, ws, tracking: bool):
    """Everything that can be checked without Ray, so that a launch that cannot succeed stops
    before Ray starts and before anything is written: the data and the budgets it must fill, the
    tracking database (``tracking``; a local SQLite file), the store's folders. Returns the data."""
    from .store import StoreNotWritableError, check_writable
    from .tracking import TrackingStoreError, open_tracking_store

    try:
        data = _checked_data(s)
    except (DatasetNotFoundError, DatasetFormatError) as e:
        _fail(str(e))
    try:
        check_writable(ws.root / "locks", "the launch locks (locks/)")
        if tracking:  # checked, and created when new, under a lock: two new launches in one root race
            open_tracking_store(ws)
        if not ws.remote:  # remote stores are checked by _shared_workspace (check_access)
            check_writable(ws.trajectories, "the expert trajectories (trajectories/)")
            if tracking:
                check_writable(ws.tune, "Ray Tune's sweep folders (tune/)")
    except (TrackingStoreError, StoreNotWritableError) as e:
        _fail(str(e))
    return data


def _checked_data(s):
    """The spec's data, with the budgets it must fill checked (a SpecError exits 2)."""
    from .sweep import check_budgets, load_data

    data = load_data(s)
    try:
        check_budgets(s, data)
    except SpecError as e:
        _fail(str(e))
    return data


def _check_local_precision(s, address: str | None) -> None:
    """A launch whose trials run on this machine's CPU (a new local Ray, no GPU) with bf16 steps that
    this CPU would emulate stops here, before Ray starts (on a cluster the trials check their own
    device)."""
    import torch

    from algorithms.base import check_precision

    if address or os.environ.get("RAY_ADDRESS") or torch.cuda.is_available():
        return
    try:
        check_precision(s.resources.get("precision", "fp32"), "cpu")
    except ValueError as e:
        _fail(f"{s.path}: {e}")


def _check_cluster_options(address: str | None, num_cpus: int | None) -> None:
    """``--num-cpus`` sizes a new local Ray; a cluster that is joined has its own CPUs."""
    joined = address or os.environ.get("RAY_ADDRESS")
    if joined and num_cpus is not None:
        how = "--address" if address else "RAY_ADDRESS (set inside a Ray job)"
        _fail(f"--num-cpus {num_cpus} sizes a new local Ray, but this run joins the cluster at {joined} ({how}); "
              f"a cluster's CPUs are set where its nodes start (ray start --num-cpus N): drop --num-cpus")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Distributed dataset distillation: experts with Ray, sweeps with Ray Tune, results in MLflow."""
    tune_malloc()  # this process's allocator, for the steps and networks it runs itself (orchestrator.malloc)


@main.command()
@click.argument("spec", required=False, type=click.Path(dir_okay=False))
@root_option
@uri_option
@storage_option
@click.option("--address", default=None, help="Join an existing Ray cluster: 'auto' or HOST:PORT.")
@click.option("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all).")
@click.option("--fresh", is_flag=True, help="Start the sweep over instead of resuming the one with the spec's "
                                          "name (the old one is moved aside, nothing is deleted).")
@_ctrl_c()
def launch(spec, root, tracking_uri, storage, address, num_cpus, fresh):
    """Train (or reuse) the experts, run the sweep of SPEC and print the results table.

    Without SPEC, runs the embedded quickstart (search_spaces/quickstart.yaml, digits, CPU).
    Launching a spec whose sweep already exists (same name, same root) resumes it: finished
    trials are kept, unfinished ones continue from their last checkpoint."""
    from . import locks
    from . import results as res
    from .results_tables import table as results_table
    from .sweep import LaunchError, check_resume, ray_session, sweep_dir
    from .sweep import launch as run_launch

    _check_cluster_options(address, num_cpus)
    s = _load(spec, tracking_uri_for(root, tracking_uri))  # init_from: runs:/... reads this store
    _check_local_precision(s, address)
    ws = _shared_workspace(root, tracking_uri, storage)
    t0 = time.time()
    click.echo(f"launch {s.name} ({s.path}), spec hash {s.hash}", err=True)
    try:
        data = _before_ray(s, ws, tracking=True)
        # one launch of a sweep at a time (exit 3); a dead holder's lock is released by the kernel
        with locks.hold(locks.sweep_lock_path(ws.root, s.name, str(ws.tune)), f"the sweep {s.name!r}"):
            check_resume(s, ws, fresh)
            with ray_session(address, num_cpus), Progress(err_console) as progress:
                out = run_launch(s, ws, progress, fresh=fresh, data=data)
    except locks.LockHeld as e:
        _fail(f"{e}; two launches of one sweep would train and log every trial twice into the same Tune folder "
              f"({sweep_dir(s, ws)}). Wait for it to end, or stop it (Ctrl-C, or kill {e.holder.get('pid', 'it')})",
              3)
    except (SpecError, LaunchError) as e:
        _fail(str(e))
    except (DatasetNotFoundError, DatasetFormatError) as e:
        _fail(str(e))
    rows = res.collect(ws.tracking_uri, sweep=out.parent_run_id)
    console.print(results_table(rows, title=f"{s.name}: {s.dataset['name']} (sweep run {out.parent_run_id})"))
    for e in out.errors:
        click.secho(f"trial error: {e}", fg="red", err=True)
    click.echo(f"finished in {time.time() - t0:.0f} s; experts: {out.experts.directory} "
                  f"({out.experts.trained} trained, {len(out.experts.records) - out.experts.trained} reused)")
    click.echo(f"results are in MLflow at {ws.tracking_uri}")
    where = (f" --root {ws.root}" if root else "") + (f" --tracking-uri {ws.tracking_uri}" if tracking_uri else "")
    if ws.is_local:
        browse = f"orchestrate ui{where}"
    else:  # a tracking server serves its own UI (orchestrate ui refuses it)
        browse, where = f"a browser at {ws.tracking_uri}", f" --tracking-uri {ws.tracking_uri}"
    click.echo(f"browse them with: {browse}   or: orchestrate results{where} --format table|json|csv")
    if out.interrupted:
        what = "reached its time budget (time_budget_s)" if out.budget_reached else "was interrupted"
        click.echo(f"the sweep {what}; {RESUME_HINT}", err=True)
        sys.exit(130)
    if out.errors:
        sys.exit(1)


@main.command()
@click.argument("spec", required=False, type=click.Path(dir_okay=False))
@root_option
@storage_option
@click.option("--address", default=None, help="Join an existing Ray cluster: 'auto' or HOST:PORT.")
@click.option("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all).")
@_ctrl_c("run the same command again: the experts already stored are verified and reused")
def experts(spec, root, storage, address, num_cpus):
    """Train only the experts of SPEC (stored experts are verified and reused)."""
    from .sweep import ray_session, train_experts

    _check_cluster_options(address, num_cpus)
    s = _load(spec, tracking_uri_for(root))  # a spec's init_from: runs:/... is read from --root's store
    ws = _shared_workspace(root, None, storage)  # only the trajectory store is used; MLflow is not touched
    try:
        data = _before_ray(s, ws, tracking=False)
        with ray_session(address, num_cpus), Progress(err_console) as progress:
            out = train_experts(s, ws, progress, data=data)
    except (DatasetNotFoundError, DatasetFormatError) as e:
        _fail(str(e))
    mean, std = out.accuracy
    click.echo(f"{len(out.records)} experts in {out.directory} ({out.trained} trained now); "
                  f"full-data test accuracy {100 * mean:.1f} ± {100 * std:.1f} %")


@main.command("methods")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def methods_cmd(fmt):
    """List the methods a spec can name under algorithms (and baselines): each with the kind of
    data it applies to, the experts it reads, the step size its sets are evaluated with, and its
    hyperparameters with their defaults. Plug-ins of the entry-point group
    distill_orchestrator.methods are listed too; a module:Class path works without registering."""
    import json

    from rich.table import Table

    from . import methods

    rows = []
    for name in methods.names():
        try:
            m = methods.get(name)
        except methods.UnknownMethod as e:
            rows.append({"name": name, "error": str(e)})
            continue
        hps = {k: {"default": v, "doc": m.hp_fields()[k].metadata.get("doc", "")}
               for k, v in m.hyperparameters().items()}
        rows.append({"name": name, "kind": m.kind, "baseline": m.baseline, "description": m.description,
                     "experts": "no" if not m.expert_forms(m.hyperparameters(), {"keep": ["full"]}) else "yes",
                     "evaluated_at": "learned step size" if m.learns_lr else
                     (f"lr {m.fixed_lr(m.hyperparameters())}" if m.fixed_lr(m.hyperparameters()) else "its set's lr"),
                     "hyperparameters": hps})
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    for r in rows:
        if "error" in r:
            console.print(f"[bold]{r['name']}[/bold]: cannot be loaded: {r['error']}")
            continue
        role = "baseline" if r["baseline"] else "method"
        head = (f"{r['name']}  ({role}; {r['kind']} data; experts: {r['experts']}; evaluated at "
                f"{r['evaluated_at']})")
        if not r["hyperparameters"]:
            console.print(f"[bold]{head}[/bold]\n  {r['description']}; no hyperparameters\n")
            continue
        t = Table(title=f"{r['name']}  ({role}; {r['kind']} data; experts: {r['experts']}; evaluated at "
                        f"{r['evaluated_at']})", caption=r["description"], title_justify="left")
        t.add_column("hyperparameter")
        t.add_column("default", justify="right")
        t.add_column("meaning")
        for k, h in r["hyperparameters"].items():
            t.add_row(k, repr(h["default"]), h["doc"])
        console.print(t)


@main.command()
@click.argument("spec", required=False, type=click.Path(dir_okay=False))
@root_option
@uri_option
@storage_option
def validate(spec, root, tracking_uri, storage):
    """Check SPEC without starting Ray or writing anything: the spec, the data and the budgets it
    must fill (exit 2 with the messages `launch` gives), then the trials a launch would run and the
    experts it would train or reuse from the store of --root."""
    from rich.table import Table

    from . import storage as _storage
    from .experts import expert_key
    from .store import TrajectoryStore
    from .tracking import Workspace, root_folder

    s = _load(spec, tracking_uri_for(root, tracking_uri))
    try:
        data = _checked_data(s)
    except (DatasetNotFoundError, DatasetFormatError) as e:
        _fail(str(e))
    ws = Workspace(root_folder(root), "", _storage.normalise(storage) if storage else None)
    click.echo(f"{s.path}: valid (spec hash {s.hash}); dataset {s.dataset['name']}: {_data_summary(s, data)}")
    t = Table(title=f"{s.name}: {s.trial_count()} trials")
    for col in ("algorithm", "budget", "iterations", "hyperparameters"):
        t.add_column(col, justify="right" if col in ("budget", "iterations") else "left")
    points = s.trial_points()
    for p in points:
        hp = ", ".join(f"{k}={v}" for k, v in p["hp"].items())
        t.add_row(p["algorithm"], str(p["budget"]), str(p["iterations"]), hp or "-")
    console.print(t)
    if s.trial_count() != len(points):
        click.echo(f"({len(points)} points above; Tune samples the distributions num_samples={s.num_samples} times "
                   f"or Optuna chooses them: {s.trial_count()} trials)")
    if not s.needs_experts():
        click.echo("experts: none (no method of the spec reads expert trajectories)")
        return
    key, name, count = expert_key(s, data), s.dataset["name"], s.experts["count"]
    store = TrajectoryStore(ws.trajectories)
    present = not ws.remote and Path(store.dir(key, name)).is_dir()
    click.echo(f"experts: {count} x {s.experts['epochs']} epochs, store key {key}, in {store.dir(key, name)}")
    if not present and not ws.remote:
        click.echo(f"  none stored: a launch trains all {count}")
        return
    full_missing = None
    for form in s.expert_forms():
        valid, missing, problems = store.check(key, name, count, form, quarantine=False)
        for msg in problems:
            click.echo(f"  {msg}")
        if form == "full":
            full_missing = set(missing)
        how = "trained" if form == "full" or full_missing is None else \
            f"{len(set(missing) - full_missing)} derived from stored full trajectories, the rest trained"
        click.echo(f"  {form}: {len(valid)} stored and valid (reused), {len(missing)} missing ({how})"
                   if missing else f"  {form}: all {count} stored and valid (reused)")


def _data_summary(s, data) -> str:
    return s.task.describe(data)


# results | compare | export (cli_results.py), evaluate | ui (cli_evaluate.py) and the Ray Jobs
# commands (jobs.py: submit a launch to a cluster, follow it)
for _command in (results, compare, export, evaluate, ui, submit, status, logs):
    main.add_command(_command)

if __name__ == "__main__":
    main()
