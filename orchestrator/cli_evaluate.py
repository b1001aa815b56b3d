"""``orchestrate evaluate | ui``: a synthetic set evaluated on its own, the MLflow UI on the store."""
from __future__ import annotations

import os
import sys

import click

from .cli_common import (SetSource, _check_tracking, _ctrl_c, _fail, _load, _shared_workspace, console, fetch_set,
                         root_option, storage_option, uri_option)
from .datasets import DatasetFormatError, DatasetNotFoundError
from .tracking import workspace


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


@click.command()
@click.argument("file", type=SetSource())
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
@click.option("--aug", type=click.Choice(["dsa", "dc", "none"]), default=None,
              help="Augmentation while training on the set: DSA's, DC's own per-image one (how DC's authors "
                   "evaluate DC sets), or none (default: the spec's evaluation, else dsa).")
@click.option("--dsa-strategy", default=None, metavar="FAMILIES",
              help="DSA's families with --aug dsa, e.g. color_crop_cutout_scale_rotate (DC/DSA's choice for digits: "
                   "no flip); default: the spec's evaluation.dsa_strategy, else color_crop_cutout_flip_scale_rotate.")
@click.option("--dc-strategy", default=None, metavar="FAMILIES",
              help="DC's families with --aug dc, of crop, scale, rotate, noise; default: the spec's "
                   "evaluation.dc_strategy, else crop_scale_rotate (DC's authors' choice for MNIST).")
@click.option("--lr", type=float, default=None, callback=_positive_lr,
              help="Step size to train on the set with (default: the file's lr; sequences: the spec's evaluation.lr).")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Seed of the first network (the others: +1, +2, ...); default: the sweep's evaluation seed "
                   "(spec seed x 1000 + 17; 17 without a spec).")
@click.option("--against", "against", multiple=True, type=SetSource(), metavar="FILE",
              help="Another set of the same dataset to compare with (repeatable): trained with the same models, "
                   "protocol and seeds, and the set's paired difference from it (and from the random subset) on "
                   "the same test cases, with its standard errors.")
@click.option("--random/--no-random", "random_subset", default=True, show_default=True,
              help="Train the random real subset of the set's size under the same protocol and seeds; "
                   "--no-random leaves it out (its row says so), e.g. to compare sets with --against when the "
                   "baseline is known: a third fewer networks with one --against.")
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
def evaluate(file, dataset, data_root, spec_path, models, networks, epochs, aug, dsa_strategy, dc_strategy, lr, seed,
             against, random_subset, fmt, log_run, workers, address, root, tracking_uri, storage):
    """Evaluate the synthetic set FILE (safetensors, the export format; or a trial's set in MLflow,
    runs:/RUN_ID[/ARTIFACT_PATH], read from --root's store or --tracking-uri) on its own: K fresh networks
    per model trained on it, next to a random real subset of the same size under the same protocol
    and seeds, and the full-data accuracy of the spec's stored experts; with --against, other sets
    under the same seeds. Under the table, the set's paired difference from each row on the same
    test cases, with its standard error. Exit 2 when a file does not fit its dataset."""
    import json

    from . import evaluate as ev
    from . import storage as _storage
    from .tracking import TrackingStoreError, open_tracking_store, root_folder, tracking_uri_for

    joined = address or os.environ.get("RAY_ADDRESS")
    if joined and workers is not None and workers > 1:
        how = "--address" if address else "RAY_ADDRESS (set inside a Ray job)"
        _fail(f"--workers {workers} starts a local Ray, but this run joins the cluster at {joined} ({how}), whose "
              f"free resources decide: drop --workers (or give --workers 1 to train here, one after another)")
    store = tracking_uri_for(root, tracking_uri)
    spec = _load(spec_path, store) if spec_path else None
    downloaded: dict[str, str] = {}  # runs:/ URIs given for FILE or --against: the file -> the URI
    file = fetch_set(file, store, downloaded)
    against = [fetch_set(a, store, downloaded) for a in against]
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
        store_root = _storage.normalise(where) if where else root_folder(root)
        trajectories = _storage.join(store_root, "trajectories")
    opts = ev.EvalOptions(dataset=dataset, data_root=data_root, spec=spec, models=models, networks=networks,
                          epochs=epochs, aug=aug, dsa_strategy=dsa_strategy, dc_strategy=dc_strategy, lr=lr, seed=seed,
                          trajectories=trajectories, workers=workers,
                          address=address, against=tuple(against), random=random_subset)
    say = (lambda line: click.echo(line, err=True))
    try:
        report = ev.evaluate_file(file, opts, say=say)
    except ev.EvaluateError as e:
        _fail(str(e))
    except (DatasetNotFoundError, DatasetFormatError) as e:
        _fail(str(e))
    for r in (report, *report["rows"]):  # a set read from MLflow is named by its URI
        if r.get("file") in downloaded:
            r["uri"] = downloaded[r["file"]]
    if ws is not None:
        params = {"file": report.get("uri", report["file"]), "dataset": report["dataset"], "data_root": data_root,
                  "spec": spec_path,
                  "models": ",".join(report["models"]), "networks": report["protocol"]["networks"],
                  "epochs": report["protocol"]["epochs"], "aug": report["protocol"].get("aug", "none"),
                  "dsa_strategy": report["protocol"].get("dsa_strategy"),
                  "dc_strategy": report["protocol"].get("dc_strategy"),
                  "lr": report["lr"]["set"], "random_lr": report["lr"]["random"], "seed": report["protocol"]["seed"],
                  "batch_size": report["protocol"]["batch_size"], "random_subset": random_subset,
                  "against": ",".join(r.get("uri", r["file"]) for r in report["rows"] if r["trained_on"] == "other")
                  or None,
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


@click.command()
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
