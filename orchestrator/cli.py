"""The ``orchestrate`` command: launch | experts | validate | results | compare | export | evaluate | ui | submit |
status | logs."""
from __future__ import annotations

import functools
import os
import stat
import sys
import tempfile
import time
from pathlib import Path

import click
from rich.console import Console

from .datasets import DatasetFormatError, DatasetNotFoundError
from .progress import Progress
from .spec import SpecError, load_spec
from .tracking import workspace

console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)

root_option = click.option("--root", type=click.Path(file_okay=False), default=None, envvar="ORCHESTRATE_ROOT",
                           help="Folder of the local store (MLflow database and artifacts, Tune results, "
                                "trajectories). Default: ./orchestrate-runs")
uri_option = click.option("--tracking-uri", default=None, envvar="MLFLOW_TRACKING_URI",
                          help="MLflow tracking URI (default: the SQLite database in --root).")
storage_option = click.option(
    "--storage", default=None, envvar="ORCHESTRATE_STORAGE", metavar="URI",
    help="Shared storage for the trajectories, Tune's results and (with a local MLflow database) the artifacts: "
         "a folder, file://, s3://bucket/prefix, gs://... Credentials and endpoint from the environment "
         "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL). Default: --root.")


def _fail(message: str, code: int = 2):
    click.secho("error: ", fg="red", err=True, nl=False)
    click.echo(message, err=True)
    sys.exit(code)


def _shared_workspace(root, tracking_uri, storage):
    """The workspace of a run that writes to the shared storage, which must be reachable."""
    from .storage import StorageError, check_access

    try:
        ws = workspace(root, tracking_uri, storage)
        check_access(ws.store_root)
    except StorageError as e:
        _fail(str(e))
    return ws


def _load(spec_path: str | None):
    try:
        return load_spec(spec_path)
    except SpecError as e:
        _fail(str(e))


RESUME_HINT = "run the same command again to resume it (or add --fresh)"


def _ctrl_c(hint: str = RESUME_HINT):
    """Ctrl-C in whatever phase of the command (data, checks, Ray's start, experts, MLflow, Tune's
    set-up, the wrap-up) ends it with the exit code of a shell's SIGINT, 130, and says how to go
    on, rather than click's "Aborted!" and 1. During the trials the first Ctrl-C stops them
    gracefully (``sweep._ctrl_c_during_fit``) and the launch exits 130 by itself; a second one
    ends up here."""
    def wrap(command):
        @functools.wraps(command)
        def run(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except KeyboardInterrupt:
                click.echo(f"\ninterrupted (Ctrl-C); {hint}", err=True)
                sys.exit(130)
        return run
    return wrap


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


def _check_tracking(ws) -> None:
    """A local SQLite tracking database that cannot be read is named before MLflow's SQLAlchemy
    traceback (which names no file)."""
    from .tracking import TrackingStoreError, check_tracking_store

    try:
        check_tracking_store(ws.tracking_uri, write=False)
    except TrackingStoreError as e:
        _fail(str(e))


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
    from .sweep import LaunchError, check_resume, ray_session, sweep_dir
    from .sweep import launch as run_launch

    _check_cluster_options(address, num_cpus)
    s = _load(spec)
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
    console.print(res.table(rows, title=f"{s.name}: {s.dataset['name']} (sweep run {out.parent_run_id})"))
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
        click.echo(f"the sweep was interrupted; {RESUME_HINT}", err=True)
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
    s = _load(spec)
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
@storage_option
def validate(spec, root, storage):
    """Check SPEC without starting Ray or writing anything: the spec, the data and the budgets it
    must fill (exit 2 with the messages `launch` gives), then the trials a launch would run and the
    experts it would train or reuse from the store of --root."""
    from rich.table import Table

    from . import storage as _storage
    from .experts import expert_key
    from .store import TrajectoryStore
    from .tracking import DEFAULT_ROOT, ROOT_ENV, Workspace

    s = _load(spec)
    try:
        data = _checked_data(s)
    except (DatasetNotFoundError, DatasetFormatError) as e:
        _fail(str(e))
    root_path = Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT).expanduser().resolve()
    ws = Workspace(root_path, "", _storage.normalise(storage) if storage else None)
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


def _check_sort(ctx, param, value):
    from .results import SORT_FIELDS

    for f in value:
        if f.lstrip("-") not in SORT_FIELDS:
            raise click.BadParameter(f"unknown field {f.lstrip('-')!r}; allowed (prefix - for descending): "
                                     f"{', '.join(SORT_FIELDS)}", ctx=ctx, param=param)
    return value


@main.command()
@root_option
@uri_option
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.option("--sweep", default=None, help="Parent run id of a sweep (default: the latest).")
@click.option("--all", "all_sweeps", is_flag=True, help="Every sweep, not only the latest.")
@click.option("--experiment", default=None, help="Only this MLflow experiment (the spec's name).")
@click.option("--algorithm", "algorithms", multiple=True, metavar="NAME",
              help="Only this algorithm (repeatable: any of them).")
@click.option("--dataset", "datasets", multiple=True, metavar="NAME", help="Only this dataset (repeatable).")
@click.option("--budget", "budgets", multiple=True, type=int, metavar="N", help="Only this budget (repeatable).")
@click.option("--status", "statuses", multiple=True,
              type=click.Choice(["RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED"], case_sensitive=False),
              help="Only trials with this MLflow status (repeatable).")
@click.option("--best", is_flag=True, help="Only the best trial per (sweep, dataset, algorithm, budget) by the final "
                                           "metric: acc_mean, hr10_mean or the lowest ppl_mean.")
@click.option("--sort", "sort_fields", multiple=True, metavar="FIELD", callback=_check_sort,
              help="Sort by a row field, e.g. acc_mean; -FIELD: descending (repeatable: first is most "
                   "significant). Default: the stored order.")
def results(root, tracking_uri, fmt, sweep, all_sweeps, experiment, algorithms, datasets, budgets, statuses, best,
            sort_fields):
    """Print the results of a sweep from MLflow, one row per trial."""
    from mlflow import MlflowClient

    from . import results as res

    if sweep and all_sweeps:
        _fail(f"--sweep {sweep} and --all contradict each other: give --sweep for one sweep, --all for every one")
    ws = workspace(root, tracking_uri)
    _check_tracking(ws)
    try:
        if sweep:  # an unknown id, or a run that is not a sweep, is an error, not an empty table
            res.check_sweep(MlflowClient(ws.tracking_uri), sweep, experiment)
        rows = res.collect(ws.tracking_uri, sweep=sweep, experiment=experiment, all_sweeps=all_sweeps)
    except LookupError as e:
        _fail(str(e), 1)
    rows = res.filter_rows(rows, algorithms, datasets, budgets, statuses)
    if best:
        rows = res.best_per_group(rows)
    if sort_fields:
        rows = res.sort_rows(rows, sort_fields)
    if fmt == "json":
        click.echo(res.to_json(rows))
    elif fmt == "csv":
        click.echo(res.to_csv(rows), nl=False)
    else:
        if not rows:
            click.echo(f"no trials found in {ws.tracking_uri}", err=True)
        console.print(res.table(rows))


@main.command()
@click.argument("run_ids", nargs=-1, required=True, metavar="RUN_ID [RUN_ID ...]")
@root_option
@uri_option
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.option("--only-diff", is_flag=True, help="Only the rows whose values differ between the runs.")
def compare(run_ids, root, tracking_uri, fmt, only_diff):
    """Show runs side by side: one column per run, one row per parameter, metric and tag."""
    from .compare import compare_runs, compare_table, compare_to_csv, compare_to_json, only_differing

    ws = workspace(root, tracking_uri)
    _check_tracking(ws)
    try:
        cmp = compare_runs(ws.tracking_uri, list(run_ids))
    except LookupError as e:
        _fail(str(e), 1)
    if only_diff:
        cmp = only_differing(cmp)
    if fmt == "json":
        click.echo(compare_to_json(cmp))
    elif fmt == "csv":
        click.echo(compare_to_csv(cmp), nl=False)
    else:
        console.print(compare_table(cmp, title=f"{len(cmp['runs'])} runs"))


_KINDS = ((stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "folder"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"))


def _export_target_problem(path: Path, force: bool) -> str | None:
    """Why ``export`` must not write to ``path``: only a new file, or with ``force`` an existing
    regular file, is replaced (never what a link points to, a device, a folder or a pipe)."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # a new file (or one that cannot be: said when writing)
        return None
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "special file")
        return (f"-o {path}: it is a {kind}, and export writes regular files only (even with --force); "
                f"to stream the set, write to stdout with -o - and redirect it")
    if not force:
        return f"-o {path}: the file exists; add --force to overwrite it"
    return None


@main.command()
@click.argument("run_id")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="Where to write (.safetensors); - writes to stdout (the summary then goes to stderr).")
@click.option("--force", is_flag=True, help="Overwrite an existing regular file (never a link, device, folder or pipe).")
@root_option
@uri_option
def export(run_id, output, force, root, tracking_uri):
    """Write the synthetic set of trial RUN_ID to a safetensors file (a new one unless --force)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from .artifacts import read_synthetic
    from .store import atomic_write_bytes
    from .trial import SYNTHETIC_ARTIFACT

    to_stdout = output == "-"
    if to_stdout and sys.stdout.isatty():
        _fail("-o - writes binary safetensors to stdout, which is a terminal here: redirect it (> set.safetensors) "
              "or pipe it")
    problem = None if to_stdout else _export_target_problem(Path(output), force)
    if problem:
        _fail(problem)
    ws = workspace(root, tracking_uri)
    client = MlflowClient(ws.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, SYNTHETIC_ARTIFACT, tmp)
        except MlflowException as e:
            _fail(f"run {run_id} has no synthetic set ({SYNTHETIC_ARTIFACT}) in {ws.tracking_uri}: {e.message}", 1)
        try:
            tensors, meta = read_synthetic(local)
        except ValueError as e:
            _fail(str(e), 1)
        data = Path(local).read_bytes()
    if to_stdout:
        out = click.get_binary_stream("stdout")
        out.write(data)
        out.flush()
    else:
        problem = _export_target_problem(Path(output), force)  # again: the download took a while
        if problem:
            _fail(problem)
        try:
            atomic_write_bytes(Path(output), data, replace=force)
        except FileExistsError:
            _fail(f"-o {output}: a file appeared there while exporting; add --force to overwrite it")
        except OSError as e:
            _fail(f"-o {output}: cannot write it: {e.strerror or e}")
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items() if v.ndim)
    lr = f", lr {float(tensors['lr']):.5g}" if "lr" in tensors else ""
    click.echo(f"wrote {'stdout' if to_stdout else output}: {shapes}{lr}, dataset {meta['dataset']}, "
               f"algorithm {meta['algorithm']}", err=to_stdout)


def _positive_lr(ctx, param, value):
    import math

    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"{value} is not a step size: give a number > 0", ctx=ctx, param=param)
    return value


def _workers(ctx, param, value):
    if value is None or str(value).lower() == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise click.BadParameter(f"{value!r}: give auto or a number of networks >= 1", ctx=ctx, param=param)
    return n


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--dataset", default=None, help="The set's dataset (default: the file's 'dataset' metadata; "
                                              "a different name is an error).")
@click.option("--data-root", default=None, type=click.Path(file_okay=False),
              help="Where the dataset's files are (default: the spec's dataset.root, else $ORCHESTRATE_DATA/<name>, "
                   "else ./data/<name>).")
@click.option("--spec", "spec_path", default=None, type=click.Path(dir_okay=False),
              help="Take the model and the evaluation protocol from this spec, the random subset's lr from its "
                   "experts, and the full-data accuracy from its experts stored under --root. Required for "
                   "sequence sets.")
@click.option("--models", default=None, metavar="NAME[,NAME...]",
              help="Models to train on the set: convnet (the file's model, else the spec's, else the default "
                   "ConvNet), convnetD<depth>, convnetW<width>, convnetNN, convnetIN, convnetNP, convnetMP, convnetAP.")
@click.option("--networks", type=click.IntRange(min=1), default=None,
              help="Fresh networks per model (default: the spec's evaluation.networks, else 5).")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Training epochs (default: the spec's evaluation.epochs, else 300).")
@click.option("--aug", type=click.Choice(["dsa", "none"]), default=None,
              help="Augmentation while training on the set (default: dsa, or the spec's evaluation.dsa).")
@click.option("--dsa-strategy", default=None, metavar="FAMILIES",
              help="DSA's families with --aug dsa, e.g. color_crop_cutout_scale_rotate (DC/DSA's choice for digits: "
                   "no flip); default: the spec's evaluation.dsa_strategy, else color_crop_cutout_flip_scale_rotate.")
@click.option("--lr", type=float, default=None, callback=_positive_lr,
              help="Step size to train on the set with (default: the file's lr; sequences: the spec's evaluation.lr).")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Seed of the first network (the others: +1, +2, ...); default: the sweep's evaluation seed "
                   "(spec seed x 1000 + 17; 17 without a spec).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--log", "log_run", is_flag=True,
              help="Record an MLflow run (experiment 'evaluate') in --root's store or at --tracking-uri.")
@click.option("--workers", default="auto", show_default=True, callback=_workers, metavar="auto|N",
              help="Networks (or sequence models) trained at once (the numbers do not change): 1, one after another here; N, a "
                   "local Ray of N-1 CPUs beside this process; auto, the free CPUs/GPUs of the Ray cluster when "
                   "there is one (--address, RAY_ADDRESS), else a local Ray of all CPUs but one once the first "
                   "networks say the rest would take over a minute.")
@click.option("--address", default=None, help="Train the networks on this Ray cluster's free resources: 'auto' or "
                                              "HOST:PORT.")
@root_option
@uri_option
@storage_option
@_ctrl_c("run the command again")
def evaluate(file, dataset, data_root, spec_path, models, networks, epochs, aug, dsa_strategy, lr, seed, fmt,
             log_run, workers, address, root, tracking_uri, storage):
    """Evaluate the synthetic set FILE (safetensors, the export format) on its own: K fresh networks
    per model trained on it, next to a random real subset of the same size under the same protocol
    and seeds, and the full-data accuracy of the spec's stored experts. Exit 2 when the file does
    not fit its dataset."""
    import json

    from . import evaluate as ev
    from . import storage as _storage
    from .tracking import DEFAULT_ROOT, ROOT_ENV, TrackingStoreError, open_tracking_store

    joined = address or os.environ.get("RAY_ADDRESS")
    if joined and workers is not None and workers > 1:
        how = "--address" if address else "RAY_ADDRESS (set inside a Ray job)"
        _fail(f"--workers {workers} starts a local Ray, but this run joins the cluster at {joined} ({how}), whose "
              f"free resources decide: drop --workers (or give --workers 1 to train here, one after another)")
    spec = _load(spec_path) if spec_path else None
    ws = None
    if log_run:  # a store that cannot take the run is named before anything trains
        ws = _shared_workspace(root, tracking_uri, storage)
        try:
            open_tracking_store(ws)
        except TrackingStoreError as e:
            _fail(str(e))
    trajectories = None
    if spec is not None:  # where the spec's experts would be; nothing is created there
        where = storage or os.environ.get(_storage.STORAGE_ENV)
        store_root = (_storage.normalise(where) if where else
                      Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT).expanduser().resolve())
        trajectories = _storage.join(store_root, "trajectories")
    opts = ev.EvalOptions(dataset=dataset, data_root=data_root, spec=spec, models=models, networks=networks,
                          epochs=epochs, aug=aug, dsa_strategy=dsa_strategy, lr=lr, seed=seed,
                          trajectories=trajectories, workers=workers,
                          address=address)
    say = (lambda line: click.echo(line, err=True))
    try:
        report = ev.evaluate_file(file, opts, say=say)
    except ev.EvaluateError as e:
        _fail(str(e))
    except (DatasetNotFoundError, DatasetFormatError) as e:
        _fail(str(e))
    if ws is not None:
        params = {"file": report["file"], "dataset": report["dataset"], "data_root": data_root, "spec": spec_path,
                  "models": ",".join(report["models"]), "networks": report["protocol"]["networks"],
                  "epochs": report["protocol"]["epochs"], "aug": report["protocol"].get("aug", "none"),
                  "dsa_strategy": report["protocol"].get("dsa_strategy"),
                  "lr": report["lr"]["set"], "random_lr": report["lr"]["random"], "seed": report["protocol"]["seed"],
                  "batch_size": report["protocol"]["batch_size"],
                  **{f"model.{name}": json.dumps(m, sort_keys=True) for name, m in report["models"].items()}}
        report["mlflow_run_id"] = ev.log_run(ws.tracking_uri, ws.artifact_root, report,
                                             {k: v for k, v in params.items() if v is not None})
    if fmt == "json":
        click.echo(json.dumps(report, indent=2))
    else:
        console.print(ev.table(report))
        for line in ev.notes(report):
            click.echo(line)
    if ws is not None:
        click.echo(f"logged to MLflow run {report['mlflow_run_id']} (experiment {ev.EXPERIMENT!r}) at "
                   f"{ws.tracking_uri}", err=fmt == "json")


@main.command()
@root_option
@uri_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (127.0.0.1: this machine only).")
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int, help="Server worker processes.")
def ui(root, tracking_uri, host, port, workers):
    """Open the MLflow UI on the store (this process becomes the MLflow server)."""
    ws = workspace(root, tracking_uri)
    if not ws.is_local:
        _fail(f"{ws.tracking_uri} is a tracking server: open it in a browser instead", 1)
    _check_tracking(ws)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", ws.tracking_uri, "--host", host,
           "--port", str(port), "--workers", str(workers)]
    if ws.artifact_root:
        cmd += ["--default-artifact-root", ws.artifact_root]
    click.echo(f"MLflow UI on http://{host}:{port}/#/experiments?workflowType=machine_learning (the model-training "
               f"view; MLflow's sidebar switch \"Model training\" keeps it) (Ctrl-C to stop)", err=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.secho(f"warning: binding to {host} exposes the UI beyond this machine", fg="yellow", err=True)
    # browsing needs no background job runner (MLflow's GenAI jobs); the user may turn it back on
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env)  # signals (Ctrl-C, SIGTERM) now reach MLflow itself


# Ray Jobs (orchestrator/jobs.py): submit a launch to a cluster, follow it
from .jobs import logs, status, submit

for _command in (submit, status, logs):
    main.add_command(_command)

if __name__ == "__main__":
    main()
