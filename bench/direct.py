"""A spec's trials in this process, without Ray or MLflow: the sweep's own components on one device.

For a machine where PyTorch runs but Ray and MLflow are not installed (a GPU box lent for minutes),
or to time a spec's trials without the scheduler. The pieces are those of ``orchestrate launch``:
the spec is validated as launch validates it (after the ``--set`` overrides); the experts are
trained with the spec's seeds and written in every kept form to a trajectory store
(``orchestrator.experts.train_and_write``; ``--store``, reused by the next run with the same spec);
each trial point (``Spec.trial_points``: baselines first, grids expanded; sampled distributions
are refused) is built by its method from the registry with the trial's seed
(``orchestrator.methods.build_point``), stepped in the spec's ``resources.precision``, and
evaluated by its task (``Task.evaluate``: the spec's networks, seeds and protocol) at iteration 0,
every ``evaluation.interval`` iterations and at the end. What it leaves out: Tune's scheduling and
MLflow. ``--resume`` continues each trial from its last checkpoint in ``--out`` (of the same spec hash,
overrides included; a finished trial is not run again), with the same numbers as a run never cut off
(the state holds the random generators); ``--time-limit S`` stops after the first step past S
seconds with a checkpoint, so that a machine lent for minutes ends a run cleanly and the next one
resumes it. Without ``--resume`` a trial starts over.

Written under ``--out``, per trial ``<out>/<trial name>/``: ``curve.json`` (the spec, the overrides,
the spec hash and the code's commit (``+dirty``: with uncommitted changes), so that a curve cut off
still names its recipe; every evaluation so far, seconds per step, each step's metrics as a trial
reports them (``steps``: name -> one value per iteration: the matching loss, ``syn_lr``, ...), the
full-data result; rewritten after each evaluation and checkpoint, so a run cut off keeps what it
measured), ``state/``, the trial's checkpoint (the distiller's state and that curve, safetensors +
JSON, swapped in whole; every ``checkpoint_interval`` iterations of the spec, at each evaluation
and when ``--time-limit`` stops the run) and
``synthetic.safetensors``, the set of the latest evaluation in the export contract with its
``iteration`` and ``evaluation`` in the metadata, as a trial logs it (sequences: also
``synthetic_selected.safetensors``, the best on the validation split so far). ``--json`` writes
every trial in one file. The table gives per trial: iterations, the first and last
evaluation, the best, seconds per step and the wall time.

    python bench/direct.py search_spaces/reference/mnist_ipc10.yaml --out /tmp/direct --device cuda \\
        --set algorithms.mtt.iterations=1000 --methods mtt,random
    python bench/direct.py search_spaces/reference/mnist_ipc10.yaml --out direct-runs --resume --time-limit 480
    python bench/direct.py --quick
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from common import REPO, bench_console, bench_parser, machine_info, write_json, write_results
from rich.markup import escape
from rich.table import Table

sys.path.insert(0, str(REPO))
from algorithms.base import DivergenceError, autocast, check_precision  # noqa: E402
from orchestrator import methods  # noqa: E402
from orchestrator.artifacts import load_state, save_state  # noqa: E402
from orchestrator.experts import ExpertSet, expert_key, expert_seed, train_and_write  # noqa: E402
from orchestrator.spec import SpecError, read_yaml, validate  # noqa: E402
from orchestrator.store import TrajectoryStore, git_commit  # noqa: E402
from orchestrator.warmstart import build_started, load_init_sets  # noqa: E402

QUICK_SPEC = REPO / "search_spaces" / "quickstart.yaml"
# --quick: the quickstart spec at a size that runs in well under a minute on one CPU core
QUICK_SET = ["experts.count=2", "experts.epochs=3", "algorithms.mtt.hyperparameters.max_start_epoch=1", "evaluation.networks=1", "evaluation.epochs=20",
             "evaluation.interval=2"]
QUICK_ITERATIONS = 4


class DirectError(Exception):
    """A spec or an override that cannot be run here (the message names it)."""


def apply_set(raw: dict, item: str) -> None:
    """``a.b.c=VALUE`` (VALUE read as YAML) sets ``raw["a"]["b"]["c"]``; the path must exist up to
    its last key, so that a typo is an error rather than a new key the validator may not see."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise DirectError(f"--set {item}: expected KEY.PATH=VALUE")
    *path, last = key.split(".")
    node = raw
    for i, k in enumerate(path):
        if not isinstance(node, dict) or k not in node:
            raise DirectError(f"--set {item}: the spec has no {'.'.join(path[:i + 1])}")
        node = node[k]
    if not isinstance(node, dict):
        raise DirectError(f"--set {item}: {'.'.join(path)} is not a mapping")
    node[last] = yaml.safe_load(value)


def load(spec_path: str, sets: list[str]):
    """The spec of ``spec_path`` with the overrides, validated as ``orchestrate launch`` does."""
    raw = read_yaml(Path(spec_path).read_text(), spec_path)
    if not isinstance(raw, dict):
        raise DirectError(f"{spec_path}: not a mapping")
    raw = copy.deepcopy(raw)
    for item in sets:
        apply_set(raw, item)
    try:
        return validate(raw, spec_path)
    except SpecError as e:
        raise DirectError(str(e)) from None


def ensure_experts(spec, data, store: TrajectoryStore, device: str, console) -> ExpertSet:
    """The spec's experts in every kept form: valid stored ones are reused, the others trained here
    one after another (what ``orchestrator.experts.ensure_experts`` does with Ray tasks)."""
    name, key, forms = spec.dataset["name"], expert_key(spec, data), spec.expert_forms()
    if not spec.needs_experts():
        return ExpertSet(key, name, str(store.dir(key, name)), {}, trained=0)
    what = {"dataset": {"name": name, "digest": data.digest(), **data.info.to_dict()}, "model": spec.model,
            "training": spec.expert_training(), "seed": spec.experts["seed"]}
    store.describe(key, name, what)
    records: dict[str, dict] = {f: {} for f in forms}
    todo: set[int] = set()
    for form in forms:
        valid, missing, problems = store.check(key, name, spec.experts["count"], form)
        for p in problems:
            console.print(f"[yellow]{p}[/yellow]")
        records[form].update({r.index: r for r in valid})
        todo |= set(missing)
    for i in sorted(todo):
        t0 = time.perf_counter()
        paths = {f: str(store.expert_path(key, name, i, f)) for f in forms}
        out = train_and_write(data, spec.model, spec.expert_training(), expert_seed(spec.experts["seed"], i), i,
                              paths, spec.convex_options(), {**what, "store_key": key}, device)
        for form, rec in out.items():
            records[form][i] = rec
        console.print(f"expert {i}: {time.perf_counter() - t0:.1f} s, final test metric "
                      f"{next(iter(out.values())).final_test_acc:.4f}")
    ordered = {f: [records[f][i] for i in range(spec.experts["count"])] for f in forms}
    store.write_manifest(key, name, ordered)
    return ExpertSet(key, name, str(store.dir(key, name)), ordered, trained=len(todo))


def trial_name(spec, point: dict) -> str:
    return f"{point['algorithm']}-{spec.task.budget_prefix}{point['budget']}"


class TimeLimit(Exception):
    """``--time-limit`` ran out: the trial checkpointed, the run stops."""


def checkpoint(folder: Path, out: dict, distiller) -> None:
    """The trial's state (the distiller's and ``out``) as ``folder/state``, written beside it and
    swapped in whole, then ``curve.json``: a run killed at any point leaves one whole checkpoint."""
    out["checkpoint"] = distiller.iteration
    tmp, old, state = folder / "state.tmp", folder / "state.old", folder / "state"
    shutil.rmtree(tmp, ignore_errors=True)
    save_state({"distiller": distiller.state_dict(), "curve": out}, tmp)
    shutil.rmtree(old, ignore_errors=True)
    if state.exists():
        os.replace(state, old)
    os.replace(tmp, state)
    shutil.rmtree(old, ignore_errors=True)
    write_json(str(folder / "curve.json"), out)


def restore(folder: Path, out: dict, distiller, hashes: tuple[str, ...] = ()) -> bool:
    """Continue from ``folder/state`` (:func:`checkpoint`) when there is one: the distiller's state
    and the curve so far into ``out``; DirectError where it is of another recipe (a spec hash
    other than ``out``'s and ``hashes``: the spec's :attr:`~orchestrator.spec.Spec.hashes`) or
    unreadable."""
    state = folder / "state"
    if not (state / "state.json").exists():
        return False
    try:
        saved = load_state(state)
        prev = saved["curve"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DirectError(f"{state}: not a readable checkpoint ({e}); remove it to start the trial over") from e
    mine = (out["spec_hash"], out["algorithm"], out["budget"], out["hp"])
    theirs = (prev.get("spec_hash"), prev.get("algorithm"), prev.get("budget"), prev.get("hp"))
    if mine[1:] != theirs[1:] or theirs[0] not in (mine[0], *hashes):
        raise DirectError(f"{state}: a checkpoint of spec hash {theirs[0]} ({theirs[1]}, budget {theirs[2]}), but "
                          f"this run's is {mine[0]} (the spec or a --set differs): give another --out, or remove "
                          f"the folder to start over")
    distiller.load_state_dict(saved["distiller"])
    for k in ("evals", "sec_per_step", "steps", "selected", "iterations_done", "wall_s", "diverged", "resumed"):
        if k in prev:
            out[k] = prev[k]
    out["resumed"] = [*out.get("resumed", []), [distiller.iteration, git_commit()]]
    return True


def run_point(spec, point: dict, data, experts: ExpertSet, device: torch.device, folder: Path,
              full: dict, console, sets: list[str] = (), resume: bool = False,
              deadline: float | None = None) -> dict[str, Any]:
    """Distil and evaluate one trial point as a trial does; ``curve.json`` and the set of the latest
    evaluation are rewritten in ``folder`` after each evaluation. ``sets``: the ``--set`` overrides,
    recorded with the spec so that a curve cut off still says which recipe made it. ``resume``:
    continue from the trial's checkpoint in ``folder``; ``deadline`` (``time.perf_counter()``):
    checkpoint and raise :class:`TimeLimit` after the first step past it."""
    task, sd = spec.task, spec.to_dict()
    if any(isinstance(v, dict) for v in point["hp"].values()):
        raise DirectError(f"{spec.path}: {trial_name(spec, point)} samples a hyperparameter from a distribution; "
                          f"this runs fixed values and grids only (set one with --set)")
    folder.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    distiller, start = build_started(point, sd, data, task, experts.files, device, load_init_sets(spec, data))  # as a trial's
    iterations, interval = point["iterations"], spec.evaluation["interval"]
    precision = spec.resources.get("precision", "fp32")
    try:
        check_precision(precision, device)  # bf16 where it is native only, as a trial
    except ValueError as e:
        raise DirectError(f"{spec.path}: {e}") from None
    out = {"trial": trial_name(spec, point), "spec": str(spec.path), "set": list(sets), "spec_hash": spec.hash,
           "store_key": experts.key, "algorithm": point["algorithm"], "budget": point["budget"],
           "hp": point["hp"], "iterations_planned": iterations, "iterations_done": 0, "precision": precision,
           "compile": bool(spec.resources.get("compile")),
           "device": str(device), "git_commit": git_commit(), "evals": [], "sec_per_step": [], "steps": {},
           "full_data": full,
           "diverged": None, "selected": None}
    selection = task.selection(data)  # sequences: the set a trial stands behind is the best on validation
    if resume and restore(folder, out, distiller, spec.hashes):
        t_start -= out.get("wall_s") or 0.0  # wall time counts across the resumed runs
        console.print(f"{out['trial']}: resumed at iteration {distiller.iteration} of {iterations}", highlight=False)
        if out["diverged"]:
            console.print(f"[red]{out['trial']} diverged before[/red]: {escape(out['diverged'])}")
            return out
    ckpt_every = spec.checkpoint_interval

    def evaluate(it: int) -> None:
        syn = distiller.synthetic()
        t0 = time.perf_counter()
        evals = task.evaluate(sd, data, syn, device, final=it >= iterations)
        out["evals"].append({"iteration": it, "seconds": time.perf_counter() - t0,
                             **{k: [float(v[0]), float(v[1])] for k, v in evals.items()}})
        out["iterations_done"], out["wall_s"] = it, time.perf_counter() - t_start
        names = [""]
        if selection and selection[0] in evals:
            value, best = evals[selection[0]][0], out["selected"]
            if best is None or (value > best[1] if selection[1] else value < best[1]):
                out["selected"] = [it, value]
                names.append("_selected")
        for suffix in names:  # the task's export, then moved into place whole
            with tempfile.TemporaryDirectory() as tmp:
                for f in task.export(Path(tmp), syn, data, point["algorithm"],
                                     {"budget": point["budget"], "iteration": it, "spec_hash": spec.hash,
                                      "store_key": experts.key,
                                      "evaluation": {k: [float(v[0]), float(v[1])] for k, v in evals.items()},
                                      **({"start": start} if start is not None else {})},
                                     spec.model):
                    os.replace(f, folder / f"{f.stem}{suffix}{f.suffix}")
        checkpoint(folder, out, distiller)
        metric = task.headline(data)[0]
        steps = out["sec_per_step"][-interval:] if interval else out["sec_per_step"]
        console.print(f"{out['trial']} {it}/{iterations}: {metric} {evals[metric][0]:.4f} ± {evals[metric][1]:.4f}"
                      + (f", {statistics.median(steps):.3f} s/step" if steps else ""), highlight=False)

    it0 = distiller.iteration  # 0, or where a resumed trial's checkpoint left it
    due = it0 == 0 or it0 >= iterations or (interval and it0 % interval == 0)
    if due and (not out["evals"] or out["evals"][-1]["iteration"] != it0):
        evaluate(it0)
    try:
        while distiller.iteration < iterations:
            t0 = time.perf_counter()
            with autocast(device, precision):
                metrics = distiller.step()
            for k, v in metrics.items():  # what a trial reports to Tune each iteration: loss, syn_lr, ...
                out["steps"].setdefault(k, []).append(float(v))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            out["sec_per_step"].append(time.perf_counter() - t0)
            it = distiller.iteration
            if it >= iterations or (interval and it % interval == 0):
                evaluate(it)
            elif it % ckpt_every == 0:
                out["wall_s"] = time.perf_counter() - t_start
                checkpoint(folder, out, distiller)
            if deadline is not None and time.perf_counter() > deadline and it < iterations:
                out["wall_s"] = time.perf_counter() - t_start
                checkpoint(folder, out, distiller)
                console.print(f"{out['trial']}: --time-limit reached at iteration {it} of {iterations}; "
                              f"checkpointed (--resume continues it)", highlight=False)
                raise TimeLimit(out["trial"])
    except DivergenceError as e:
        out["diverged"] = f"iteration {distiller.iteration}: {e}"
        out["wall_s"] = time.perf_counter() - t_start
        checkpoint(folder, out, distiller)  # so that --resume reports it instead of replaying it
        console.print(f"[red]{out['trial']} diverged[/red]: {escape(str(e))}")
    return out


def summary(out: dict, metric: str, higher: bool) -> dict[str, Any]:
    evals = [e for e in out["evals"] if metric in e]
    first, last = (evals[0], evals[-1]) if evals else (None, None)
    best = (max if higher else min)(evals, key=lambda e: e[metric][0]) if evals else None
    steps = out["sec_per_step"]
    return {"trial": out["trial"], "iterations": out["iterations_done"], "planned": out["iterations_planned"],
            "first": first and first[metric], "last": last and last[metric], "best": best and best[metric],
            "best_iteration": best and best["iteration"], "sec_per_step": statistics.median(steps) if steps else None,
            "wall_s": out.get("wall_s")}


def table(rows: list[dict], metric: str, scale: float) -> Table:
    t = Table(title=f"direct ({metric})")
    for c in ("trial", "iterations", "first (0)", "last", "best (iter)", "s/step (median)", "wall"):
        t.add_column(c, justify="left" if c == "trial" else "right")
    pm = (lambda v: "-" if v is None else f"{scale * v[0]:.2f} ± {scale * v[1]:.2f}")
    for r in rows:
        t.add_row(r["trial"], f"{r['iterations']}/{r['planned']}", pm(r["first"]), pm(r["last"]),
                  "-" if r["best"] is None else f"{scale * r['best'][0]:.2f} ({r['best_iteration']})",
                  "-" if r["sec_per_step"] is None else f"{r['sec_per_step']:.3f}",
                  "-" if r["wall_s"] is None else f"{r['wall_s']:.0f} s")
    return t


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__, f"{QUICK_SPEC.relative_to(REPO)} with 2 experts x 3 epochs, {QUICK_ITERATIONS} "
                               f"iterations, 1 network x 20 epochs (under a minute on a CPU core)")
    ap.add_argument("spec", nargs="?", help="the spec to run (with --quick: none)")
    ap.add_argument("--out", default=None, help="folder of the per-trial curves and sets (default: a temporary one)")
    ap.add_argument("--store", default=None, help="trajectory store of the experts (default: <out>/trajectories)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override a spec value before validation (YAML value), e.g. algorithms.mtt.iterations=1000 "
                         "or evaluation.networks=3; repeatable")
    ap.add_argument("--methods", default=None, help="comma-separated algorithms and baselines to run (default: all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--resume", action="store_true",
                    help="continue each trial from its checkpoint in --out (same spec and overrides); finished "
                         "trials are kept as they are")
    ap.add_argument("--time-limit", type=float, default=None, metavar="S",
                    help="stop after the first step past S seconds (from the start, experts included), with a "
                         "checkpoint that --resume continues; the table covers what ran")
    args = ap.parse_args(argv)
    if args.quick == bool(args.spec):
        ap.error("give a SPEC, or --quick (which runs its own)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available here")
    if args.resume and args.out is None:
        ap.error("--resume continues the trials in --out: give it")
    if args.time_limit is not None and args.time_limit < 0:
        ap.error(f"--time-limit {args.time_limit}: seconds, at least 0")
    deadline = None if args.time_limit is None else time.perf_counter() + args.time_limit
    if args.threads:
        torch.set_num_threads(args.threads)
    console = bench_console(120)
    load0 = os.getloadavg()
    spec_path = str(QUICK_SPEC) if args.quick else args.spec
    sets = [*QUICK_SET, *args.set] if args.quick else args.set
    tmp = tempfile.TemporaryDirectory(prefix="bench-direct-") if args.out is None else None
    out_dir = Path(args.out or tmp.name)
    try:
        spec = load(spec_path, sets)
        if args.quick:
            spec = load(spec_path, sets + [f"algorithms.{a}.iterations={QUICK_ITERATIONS}" for a in spec.algorithms])
        chosen = None if args.methods is None else {m.strip() for m in args.methods.split(",") if m.strip()}
        points = [p for p in spec.trial_points() if chosen is None or p["algorithm"] in chosen]
        if chosen is not None and not points:
            raise DirectError(f"--methods {args.methods}: the spec has none of them (it has "
                              f"{', '.join(spec.baselines + list(spec.algorithms))})")
        device = torch.device(args.device)
        task = spec.task
        t0 = time.perf_counter()
        data = task.load(spec)
        task.check_budgets(spec, data)
        store = TrajectoryStore(args.store or out_dir / "trajectories")
        experts = ensure_experts(spec, data, store, args.device, console) if any(
            methods.get(p["algorithm"]).expert_forms(p["hp"], spec.experts) for p in points) else \
            ExpertSet(expert_key(spec, data), spec.dataset["name"], "", {}, trained=0)
        full = task.full_data(spec, data, experts)
        console.print(f"[bold]{spec.name}[/bold] on {args.device}: {task.describe(data)}; experts "
                      f"{experts.trained} trained, {len(experts.records) - experts.trained} reused "
                      f"({time.perf_counter() - t0:.0f} s with the data); full data {full}", highlight=False)
        metric, higher = task.headline(data)
        outs, stopped = [], False
        for p in points:
            try:
                outs.append(run_point(spec, p, data, experts, device, out_dir / trial_name(spec, p), full, console,
                                      sets, resume=args.resume, deadline=deadline))
            except TimeLimit:
                stopped = True
                outs.append(json.loads((out_dir / trial_name(spec, p) / "curve.json").read_text()))
                left = [trial_name(spec, q) for q in points[len(outs):]]
                console.print(f"stopped by --time-limit {args.time_limit:g} s" + (
                    f"; not started: {', '.join(left)}" if left else ""), highlight=False)
                break
    except (DirectError, FileNotFoundError, ValueError) as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        return 2
    rows = [summary(o, metric, higher) for o in outs]
    console.print(table(rows, metric, 1.0 if metric == "ppl" else 100.0))
    if args.json:
        write_results(console, args.json, "direct", machine_info(args.device, load0, gpu=True),
                      {"spec": spec_path, "set": sets, "methods": args.methods, "spec_hash": spec.hash,
                       "git_commit": git_commit(), "out": str(out_dir),
                       # --time-limit stopped the run: --resume continues it
                       "stopped_by_time_limit": stopped}, rows=rows, trials=outs)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
