"""``orchestrate results | compare | export``: the sweeps' results in MLflow, runs side by side, a
trial's synthetic set written to a file."""
from __future__ import annotations

import os
import stat
import sys
import tempfile
from pathlib import Path

import click

from .cli_common import _check_tracking, _fail, console, root_option, uri_option
from .tracking import workspace


def _check_sort(ctx, param, value):
    from .results import SORT_FIELDS

    for f in value:
        if f.lstrip("-") not in SORT_FIELDS:
            raise click.BadParameter(f"unknown field {f.lstrip('-')!r}; allowed (prefix - for descending): "
                                     f"{', '.join(SORT_FIELDS)}", ctx=ctx, param=param)
    return value


@click.command()
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
@click.option("--paired", is_flag=True,
              help="Add each trial's gain over the random subset measured on the same test cases: its standard "
                   "error (gain_se) and z (gain_z), from the per-case outcomes the trials logged (one small download "
                   "per trial).")
def results(root, tracking_uri, fmt, sweep, all_sweeps, experiment, algorithms, datasets, budgets, statuses, best,
            sort_fields, paired):
    """Print the results of a sweep from MLflow, one row per trial."""
    from mlflow import MlflowClient

    from . import results as res
    from .results_tables import table as results_table

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
    every = rows
    rows = res.filter_rows(rows, algorithms, datasets, budgets, statuses)
    if best:
        rows = res.best_per_group(rows)
    if paired:
        res.attach_paired(ws.tracking_uri, rows, among=every)
    if sort_fields:
        rows = res.sort_rows(rows, sort_fields)
    if fmt == "json":
        click.echo(res.to_json(rows))
    elif fmt == "csv":
        click.echo(res.to_csv(rows), nl=False)
    else:
        if not rows:
            click.echo(f"no trials found in {ws.tracking_uri}", err=True)
        console.print(results_table(rows))


@click.command()
@click.argument("run_ids", nargs=-1, required=True, metavar="RUN_ID[@ITERATION] ...")
@root_option
@uri_option
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.option("--only-diff", is_flag=True, help="Only the rows whose values differ between the runs.")
@click.option("--paired/--no-paired", default=True, show_default=True,
              help="Add each trial's set minus the first run's, on the same test cases, from the per-case outcomes "
                   "trials log with their sets: the difference of the headline metric and its standard errors.")
@click.option("--selected", is_flag=True,
              help="Pair the sets chosen on the validation split (sequence trials) instead of the final ones (or, "
                   "of a trial still running, its latest evaluation's).")
def compare(run_ids, root, tracking_uri, fmt, only_diff, paired, selected):
    """Show runs side by side: one column per run, one row per parameter, metric and tag; and
    (--paired, the default) whether the trials' sets really differ: each one's headline metric
    minus the first run's, on the same test cases, with its standard error. RUN_ID@ITERATION is one
    evaluation of a trial (RUN@0 RUN@500: did its last 500 steps change anything?)."""
    from .compare import (compare_runs, compare_table, compare_to_csv, compare_to_json, only_differing,
                          paired_caption)

    ws = workspace(root, tracking_uri)
    _check_tracking(ws)
    try:
        cmp = compare_runs(ws.tracking_uri, list(run_ids), paired=paired, selected=selected)
    except LookupError as e:
        _fail(str(e), 1)
    except ValueError as e:  # a malformed RUN_ID@ITERATION
        _fail(str(e))
    if only_diff:
        cmp = only_differing(cmp)
    if fmt == "json":
        click.echo(compare_to_json(cmp))
    elif fmt == "csv":
        click.echo(compare_to_csv(cmp), nl=False)
    else:
        console.print(compare_table(cmp, title=f"{len(cmp['runs'])} runs"))
        for line in paired_caption(cmp):
            console.print(line, highlight=False, markup=False)


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


@click.command()
@click.argument("run_id")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="Where to write (.safetensors); - writes to stdout (the summary then goes to stderr).")
@click.option("--force", is_flag=True, help="Overwrite an existing regular file (never a link, device, folder or pipe).")
@click.option("--selected", is_flag=True,
              help="The set of the evaluation that scored best on the validation split (sequence trials) instead of "
                   "the final one.")
@click.option("--latest", is_flag=True,
              help="The set of the trial's latest evaluation: of a trial still running or cut off, the one it was "
                   "last evaluated at; of a finished trial, its final set.")
@root_option
@uri_option
def export(run_id, output, force, selected, latest, root, tracking_uri):
    """Write the synthetic set of trial RUN_ID to a safetensors file (a new one unless --force):
    its final set, with --selected the one chosen on the validation split, or with --latest the
    one of its latest evaluation (a trial still running). The file's metadata carries the set's
    iteration and its evaluation."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from .artifacts import read_synthetic, set_evaluation
    from .store import atomic_write_bytes
    from .trial import set_artifact

    if selected and latest:
        _fail("--selected and --latest name different sets: give one of them")
    to_stdout = output == "-"
    if to_stdout and sys.stdout.isatty():
        _fail("-o - writes binary safetensors to stdout, which is a terminal here: redirect it (> set.safetensors) "
              "or pipe it")
    problem = None if to_stdout else _export_target_problem(Path(output), force)
    if problem:
        _fail(problem)
    ws = workspace(root, tracking_uri)
    client = MlflowClient(ws.tracking_uri)
    finished = True
    if latest:
        try:
            finished = client.get_run(run_id).info.status == "FINISHED"
        except MlflowException as e:
            _fail(f"run {run_id} is not in {ws.tracking_uri}: {e.message}", 1)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = set_artifact(finished, selected)
        try:
            local = client.download_artifacts(run_id, artifact, tmp)
        except MlflowException as e:
            why = (" (only sequence trials choose a set on a validation split)" if selected else
                   " (a trial logs it at each periodic evaluation: none has happened yet, or the trial predates it)"
                   if not finished else "")
            _fail(f"run {run_id} has no synthetic set ({artifact}) in {ws.tracking_uri}{why}: {e.message}", 1)
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
               f"algorithm {meta['algorithm']}" + (f", iteration {meta['iteration']}" if "iteration" in meta else "")
               + "".join(f", {k} {v[0]:.4g} ± {v[1]:.2g}" for k, v in set_evaluation(meta).items()),
               err=to_stdout)
