"""Ray Jobs: ``orchestrate submit | status | logs`` send a launch to a cluster and follow it.

``submit`` validates the spec here (a bad spec never reaches the cluster), then gives the
cluster's job server (part of Ray's dashboard: ``ray[default]``, the ``cluster`` extra) a job
whose runtime_env ``working_dir`` is a folder holding only the spec, and whose entrypoint is
``orchestrate launch --address auto --root ROOT ... -- SPEC``. Inside a job ``RAY_ADDRESS`` is set,
so the launch joins the cluster it runs on. The cluster's nodes need this package installed
(``orchestrate`` on their PATH); ``--root``, ``--storage`` and the spec's paths (``dataset.root``)
are paths on the cluster. Jobs carry ``orchestrate.*`` metadata, which ``status`` uses to list
only ours, and which keeps two launches of one sweep (same spec name and store) from running at once.

Authentication is Ray's own: ``RAY_JOB_HEADERS`` (a JSON object of HTTP headers, as ``ray job``
reads it) and token authentication (``RAY_AUTH_MODE=token`` with ``RAY_AUTH_TOKEN`` or
``RAY_AUTH_TOKEN_PATH``), whose header the Ray SDK adds by itself.
"""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import click
from rich.console import Console
from rich.table import Table

from .spec import SpecError, load_spec

SPEC_KEY = "orchestrate.spec"  # job metadata: the spec's name (marks the jobs that submit made)
SPEC_FILE_KEY = "orchestrate.spec_file"
SPEC_HASH_KEY = "orchestrate.spec_hash"
ROOT_KEY = "orchestrate.root"
STORAGE_KEY = "orchestrate.storage"
ACTIVE = ("PENDING", "RUNNING")
ADDRESS_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # what Ray's SDK reads, in this order

console = Console(width=None if sys.stdout.isatty() else 160)


class JobsError(RuntimeError):
    """A problem talking to the cluster's job server, worded for the command line."""


def _fail(message: str, code: int = 1):
    click.secho("error: ", fg="red", err=True, nl=False)
    click.echo(message, err=True)
    sys.exit(code)


def launch_entrypoint(spec_file: str, root: str, tracking_uri: str | None = None, storage: str | None = None,
                      fresh: bool = False) -> str:
    """The shell command a submitted job runs, quoted with ``shlex`` (spaces in paths survive).

    The spec comes last, after ``--``: a spec file named ``--fresh`` (or ``--help``, ...) is then a
    file name, not an option of ``launch``. Every option value is its own word right after its
    option, which click takes as the value whatever it begins with."""
    args = ["orchestrate", "launch", "--address", "auto", "--root", root]
    if tracking_uri:
        args += ["--tracking-uri", tracking_uri]
    if storage:
        args += ["--storage", storage]
    if fresh:
        args.append("--fresh")
    return shlex.join(args + ["--", spec_file])


def _headers() -> dict | None:
    raw = os.environ.get("RAY_JOB_HEADERS")
    if not raw:
        return None
    try:
        headers = json.loads(raw)
    except ValueError as e:
        raise JobsError(f"RAY_JOB_HEADERS is not JSON ({e.msg}); expected an object like "
                        '{"Authorization": "Bearer ..."}') from None
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise JobsError('RAY_JOB_HEADERS must be a JSON object of strings, like {"Authorization": "Bearer ..."}')
    return headers


@contextmanager
def _without(variables: tuple[str, ...]):
    saved = {v: os.environ.pop(v) for v in variables if v in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def job_client(address: str | None):
    """A ``JobSubmissionClient`` for ``address`` (``http://HEAD:8265``); without one, Ray's own
    choice: ``RAY_API_SERVER_ADDRESS``, ``RAY_ADDRESS``, else the cluster ``ray start`` left on this
    machine. An explicit address wins over those variables (Ray's SDK alone would let them win)."""
    from ray.job_submission import JobSubmissionClient

    headers = _headers()
    where = address or next((os.environ[v] for v in ADDRESS_VARS if os.environ.get(v)), "the local Ray cluster")
    try:
        with _without(ADDRESS_VARS if address else ()):
            return JobSubmissionClient(address, headers=headers)
    except ConnectionError as e:
        raise JobsError(f"cannot reach a Ray job server at {where}: {e} (the job server is the dashboard of the "
                        f"cluster's head node, port 8265 by default; it needs ray[default] there)") from None


@contextmanager
def job_server_errors():
    """What the job server answers as an error (a failed request, an unknown job, refused
    authentication) ends the command with that message and exit code 1, not a traceback."""
    # AuthenticationError is a RayError; failed requests are RuntimeErrors
    from ray.exceptions import RayError

    try:
        yield
    except (RuntimeError, RayError) as e:
        _fail(str(e), 1)


def job_info(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:
        if "404" in str(e):
            raise JobsError(f"no job {job_id!r} on the Ray cluster at {client.get_address()}; "
                            f"`orchestrate status` lists the orchestrate jobs there") from None
        raise JobsError(f"job {job_id!r} at {client.get_address()}: {e}") from None


def orchestrate_jobs(client) -> list:
    """The jobs that ``submit`` sent to this cluster, oldest first."""
    jobs = [j for j in client.list_jobs() if SPEC_KEY in (j.metadata or {})]
    return sorted(jobs, key=lambda j: j.start_time or 0)


def _time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _duration(job) -> str:
    if not job.start_time:
        return "-"
    s = ((job.end_time or time.time() * 1000) - job.start_time) / 1000
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _status(job) -> str:
    return str(getattr(job.status, "value", job.status))


address_option = click.option(
    "--address", default=None, metavar="URL",
    help="The cluster's job server (its dashboard), e.g. http://HEAD:8265. Default: RAY_API_SERVER_ADDRESS or "
         "RAY_ADDRESS, else the cluster that `ray start` runs on this machine.")


@click.command()
@click.argument("spec", required=False, type=click.Path(dir_okay=False))
@address_option
@click.option("--root", default=None, envvar="ORCHESTRATE_ROOT", metavar="DIR",
              help="Absolute folder ON THE CLUSTER for the store (the MLflow database unless --tracking-uri; Tune's "
                   "results and the trajectories unless --storage). Required (or ORCHESTRATE_ROOT): a job's own "
                   "working folder is temporary.")
@click.option("--tracking-uri", default=None, envvar="MLFLOW_TRACKING_URI",
              help="MLflow tracking URI the job logs to, e.g. http://mlflow:5000 (default: the SQLite database in "
                   "--root). Credentials belong in the cluster's environment (MLFLOW_TRACKING_USERNAME, ...), "
                   "never in the URI.")
@click.option("--storage", default=None, envvar="ORCHESTRATE_STORAGE", metavar="URI",
              help="Shared storage as seen from the cluster (as launch --storage): an absolute folder, file://, "
                   "s3://bucket/prefix, gs://... Its credentials come from the cluster's environment.")
@click.option("--fresh", is_flag=True, help="Start the sweep over (as launch --fresh).")
def submit(spec, address, root, tracking_uri, storage, fresh):
    """Send `orchestrate launch SPEC` to a Ray cluster as a job and return at once.

    The spec is checked here first; the job id is printed on stdout (follow it with
    `orchestrate logs JOB_ID --follow`). Without SPEC, the embedded quickstart."""
    for option, uri in (("--tracking-uri", tracking_uri), ("--storage", storage)):
        if uri and "://" in uri and urlsplit(uri).password:
            _fail(f"{option} holds a password: anyone who can list the cluster's jobs would read it in the "
                  f"entrypoint; give the URI without it and put the credentials in the cluster's environment "
                  f"(MLFLOW_TRACKING_USERNAME/PASSWORD, PGPASSWORD, AWS_SECRET_ACCESS_KEY, ...)", 2)
    try:
        s = load_spec(spec, tracking_uri)  # init_from: runs:/... is read here from the store the job logs to
        from .sweep import check_budgets_if_data_here

        check_budgets_if_data_here(s)  # budgets the data cannot fill, when the data is here too (digits is)
    except SpecError as e:
        _fail(str(e), 2)
    if not root:
        _fail("submit needs --root (or ORCHESTRATE_ROOT): an absolute folder on the cluster where the job keeps "
              "its store; the job's own working folder is deleted with the Ray session", 2)
    if not PurePosixPath(root).is_absolute():
        _fail(f"--root {root!r} must be an absolute path on the cluster (the job runs in a temporary folder)", 2)
    if storage and "://" not in storage and not PurePosixPath(storage).is_absolute():
        _fail(f"--storage {storage!r} must be a URI or an absolute path on the cluster", 2)
    spec_file = Path(s.path).name
    entrypoint = launch_entrypoint(spec_file, root, tracking_uri, storage, fresh)
    place = storage or root  # where the sweep's Tune folder is: one launch of a sweep at a time there
    with job_server_errors():
        client = job_client(address)
        busy = [j for j in orchestrate_jobs(client) if _status(j) in ACTIVE and j.metadata.get(SPEC_KEY) == s.name
                and (j.metadata.get(STORAGE_KEY) or j.metadata.get(ROOT_KEY)) == place]
        if busy:
            j = busy[0]
            _fail(f"job {j.submission_id} ({_status(j)}) is already running sweep {s.name!r} in {place}; two launches "
                  f"of one sweep would write the same Tune folder. Follow it with `orchestrate logs "
                  f"{j.submission_id} --follow`, or stop it with `ray job stop {j.submission_id}`", 1)
        with tempfile.TemporaryDirectory(prefix="orchestrate-submit-") as tmp:  # the job's working_dir: the spec only
            shutil.copyfile(s.path, Path(tmp) / spec_file)
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": tmp},
                                       metadata={SPEC_KEY: s.name, SPEC_FILE_KEY: spec_file, SPEC_HASH_KEY: s.hash,
                                                 ROOT_KEY: root, **({STORAGE_KEY: storage} if storage else {})})
    where = client.get_address()
    click.echo(job_id)
    click.echo(f"submitted {s.name} ({s.path}, spec hash {s.hash}) to {where}: {entrypoint}\n"
               f"  follow it: orchestrate logs {job_id} --follow --address {where}\n"
               f"  status:    orchestrate status {job_id} --address {where}\n"
               f"  stop it:   ray job stop {job_id} --address {where}", err=True)


@click.command()
@click.argument("job_id", required=False)
@address_option
def status(job_id, address):
    """The status of job JOB_ID; without it, every job that `orchestrate submit` sent to the cluster."""
    with job_server_errors():
        client = job_client(address)
        if job_id:
            j = job_info(client, job_id)
            meta = j.metadata or {}
            spec = f"{meta[SPEC_KEY]} ({meta.get(SPEC_FILE_KEY)}, spec hash {meta.get(SPEC_HASH_KEY)})" \
                if SPEC_KEY in meta else "- (not submitted by orchestrate)"
            for key, value in (("job", job_id), ("status", _status(j)), ("spec", spec), ("root", meta.get(ROOT_KEY, "-")),
                               ("storage", meta.get(STORAGE_KEY, "-")), ("started", _time(j.start_time)), ("ended", _time(j.end_time)),
                               ("duration", _duration(j)), ("message", j.message or "-"),
                               ("entrypoint", j.entrypoint)):
                click.echo(f"{key:<11}{value}")
            return
        jobs = orchestrate_jobs(client)
    if not jobs:
        click.echo(f"no orchestrate jobs on the Ray cluster at {client.get_address()}", err=True)
        return
    t = Table(title=f"orchestrate jobs at {client.get_address()}")
    for col in ("job", "status", "spec", "root", "started", "duration", "message"):
        t.add_column(col)
    for j in jobs:
        t.add_row(j.submission_id or j.job_id, _status(j), j.metadata[SPEC_KEY], j.metadata.get(ROOT_KEY, "-"),
                  _time(j.start_time), _duration(j), (j.message or "")[:80])
    console.print(t)


async def _tail(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        click.echo(chunk, nl=False)  # as `logs` without --follow: colour codes only to a terminal
        sys.stdout.flush()


@click.command()
@click.argument("job_id")
@click.option("-f", "--follow", is_flag=True,
              help="Keep printing until the job ends, then exit 0 if it succeeded and 1 otherwise.")
@address_option
def logs(job_id, follow, address):
    """The output of job JOB_ID (its driver: progress, the results table)."""
    with job_server_errors():  # also a log stream that breaks off before the job ends
        client = job_client(address)
        job_info(client, job_id)  # an unknown id is an error, not an empty log
        if not follow:
            click.echo(client.get_job_logs(job_id), nl=False)
            return
        asyncio.run(_tail(client, job_id))
        j = job_info(client, job_id)
    if _status(j) != "SUCCEEDED":
        _fail(f"job {job_id} ended {_status(j)}: {(j.message or '-').splitlines()[0]}", 1)
