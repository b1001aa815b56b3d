"""What the commands of ``orchestrate`` share: the consoles, the store options and the error exits."""
from __future__ import annotations

import functools
import sys

import click
from rich.console import Console

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


class SetSource(click.Path):
    """A set file that exists, or a trial's set in MLflow (``runs:/RUN_ID[/ARTIFACT_PATH]``, passed on
    as it is: :func:`fetch_set` downloads it)."""

    def __init__(self):
        super().__init__(exists=True, dir_okay=False)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.startswith("runs:/"):
            return value
        return super().convert(value, param, ctx)


def fetch_set(value: str, tracking_uri: str, downloaded: dict[str, str]) -> str:
    """``value`` (a :class:`SetSource`) as a local file: a ``runs:/`` URI is downloaded from the
    store at ``tracking_uri`` into the node's cache, and recorded in ``downloaded`` (file -> URI)."""
    from .warmstart import RUNS_PREFIX, fetch_run_set

    if not value.startswith(RUNS_PREFIX):
        return value
    try:
        path = str(fetch_run_set(value, tracking_uri).resolve())
    except ValueError as e:
        _fail(f"{value}: {e}")
    downloaded[path] = value
    return path


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


def _load(spec_path: str | None, tracking_uri: str | None = None):
    try:
        return load_spec(spec_path, tracking_uri)
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


def _check_tracking(ws) -> None:
    """A local SQLite tracking database that cannot be read is named before MLflow's SQLAlchemy
    traceback (which names no file)."""
    from .tracking import TrackingStoreError, check_tracking_store

    try:
        check_tracking_store(ws.tracking_uri, write=False)
    except TrackingStoreError as e:
        _fail(str(e))
