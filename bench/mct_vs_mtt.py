"""MCT against MTT on the same experts: accuracy per iteration, iterations to a target, storage, cost.

Both methods distil from the same experts with the same budgets (images per class), iteration
counts, distillation seeds and evaluation protocol; only the trajectory sampler differs (MTT:
``EpochSampler`` on the full trajectories; MCT: ``ConvexSampler`` on their convexified form,
two waypoints and path-length beta, read back from the store as a sweep does). Everything is run
directly (no Ray), as in ``tests/test_quality.py``.

Setup, from ``search_spaces/mct_vs_mtt.yaml`` (``orchestrator.spec.load_spec``): the model
(ConvNet depth 2, width 32), the experts (6 × 30 epochs, SGD lr 0.03, batch 32, DSA; seeds
``base * 1_000_003 + i`` as the orchestrator's expert pool), both methods' hyperparameters
(syn_steps 20, lr_img 30, lr_lr 1e-6; MTT window 2 epochs, MCT window 6 epochs), the budgets
(IPC 1 and 10) and the evaluation (``EvalConfig(networks=3, epochs=300)``). When the experts are
shorter than the spec's (``--expert-epochs``, ``--quick``), ``max_start_epoch`` of *both* methods is
cut to ``epochs − MTT's expert_epochs``, so both sample starts from the same range.

Distillation seed ``i`` (``--seeds``) is ``spec.seed·7919 + ipc + 1000·i`` (seed 0 is the sweep's
trial seed); it fixes the initial real images, so both methods start from the same set and the
iteration-0 evaluation is done once per seed and shared. Evaluation networks always use the
seeds ``spec.seed·1000 + 17, +1, …`` (the sweep's ``eval_seed``): paired comparisons.

Measured:

1. accuracy against iteration: every ``--eval-every`` iterations (and at the end) the set is
   evaluated (mean over the networks); the curve is the mean over seeds, with the std across
   seeds (population std, as ``EvalResult.std``). Curves go to the PNG (one panel per
   dataset × IPC) and to MLflow (one run per method, dataset, IPC, seed; ``eval/acc_mean`` and
   ``eval/acc_std`` by iteration, ``loss`` and ``syn_lr`` every iteration);
2. iterations to a common target: by default (``--target mtt-0.5``) the target is MTT's final
   seed-mean accuracy minus 0.5 points, per dataset and IPC; ``--target mtt-X`` changes the
   margin, a plain number (``--target 85``) is an absolute accuracy in %. ``iters_to_target``
   is the first evaluated iteration whose seed-mean accuracy is ≥ the target (null if never);
   the resolution is ``--eval-every``;
3. final accuracy: mean and std across seeds at the last iteration;
4. storage: every expert is written into a temporary ``TrajectoryStore`` as its full trajectory
   (``write_trajectory``) and as its convex form (``ConvexTrajectory.from_checkpoints`` with
   W=2, beta "path", then ``write_convex``); bytes on disk summed, ratio full ÷ convex. The
   same for ``--storage-epochs`` (50) epoch experts of the same model: trained
   (``--storage-trajectories trained``, the default without ``--quick``) or random walks with
   the same shape (``random``, the ``--quick`` default; the files hold no compression, so their
   size depends on the shape only: the random-walk ratio is always computed too, as a check);
5. cost: seconds per iteration and memory for ``syn_steps`` 10, 20, 40 at IPC ``--speed-ipc``
   (10) in ``full`` and ``tesla`` grad modes, for both methods: one untimed warm-up step, then
   the median of ``--timed-iters`` steps. Memory uses ``bench/distill.py``'s measurement
   (``SavedTensors``, a ``saved_tensors_hooks`` pack hook, bytes once per storage), extended to
   also track the tensors *alive at once*: TESLA frees each student step's graph, so the
   cumulative count of distill.py grows with ``syn_steps`` while the live peak does not.
   ``peak_mb`` is that live saved-activation peak on the CPU (measured during the warm-up
   step), ``torch.cuda.max_memory_allocated`` growth on CUDA (one more step after the timing).

``--quick`` (under 3 minutes on 2 CPU cores): digits, IPC 1, 2 seeds, 60 iterations, evaluation
every 20 with 2 networks, 2 experts × 8 epochs, 2 timed iterations per cost row, 50-epoch
storage from random walks. Defaults (tens of minutes on a CPU): IPC 1 and 10, 3 seeds,
200 iterations, evaluation every 20 with 3 networks, 6 × 30-epoch experts.

    python bench/mct_vs_mtt.py --quick --json /tmp/bench_mct.json
    python bench/mct_vs_mtt.py --json /tmp/bench_mct.json --root ./orchestrate-runs
    python bench/mct_vs_mtt.py --datasets digits,mnist --data-root ../shared/data/mnist
"""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml
from rich.console import Console
from rich.table import Table

from algorithms.evaluate import EvalConfig, evaluate_set
from algorithms.experts import ExpertConfig, train_expert
from algorithms.mct import ConvexTrajectory
from algorithms.mtt import MTTDistiller
from algorithms.networks import manifest_of, seeded_network
from orchestrator.datasets import DatasetNotFoundError, load_dataset
from orchestrator.experts import expert_seed
from orchestrator import methods
from orchestrator.methods import BuildContext
from orchestrator.spec import load_spec
from orchestrator.tasks import task_for
from orchestrator.store import (
    CorruptTrajectoryError, TrajectoryStore, convex_form, open_convex, open_trajectory, store_key, write_convex,
    write_trajectory,
)

from common import (  # bench/common.py: run as a script, this folder is first on sys.path
    bench_console, bench_parser, machine_info, print_load, quick_defaults, shared_data, write_results,
)
from distill import PeakRSS, SavedTensors, build_trajectories, sync  # bench/distill.py

METHODS = ("mtt", "mct")
SPEC_PATH = Path(__file__).resolve().parent.parent / "search_spaces" / "mct_vs_mtt.yaml"
EXPERIMENT = "bench-mct-vs-mtt"
CONVEX = {"num_waypoints": 2, "beta": "path", "smooth": False}


# -- memory: distill.py's saved-tensor count, plus the peak of what is alive at once ---------------
class _Held:
    """A saved tensor as the autograd graph keeps it; tells its owner when the graph drops it."""
    __slots__ = ("t", "key", "owner")

    def __init__(self, t: torch.Tensor, key: int, owner: "LiveSavedTensors"):
        self.t, self.key, self.owner = t, key, owner

    def __del__(self):
        self.owner._release(self.key)


class LiveSavedTensors(SavedTensors):
    """``distill.SavedTensors`` (bytes saved during the block, once per storage) and, in
    ``peak_bytes``, the largest total of saved storages alive at the same time."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [saved tensors holding it, bytes]
        self.live_bytes = 0
        self.peak_bytes = 0

    def _pack(self, t: torch.Tensor):
        super()._pack(t)
        try:
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except Exception:  # no storage (some wrappers): kept as is, not counted
            return t
        entry = self.live.get(key)
        if entry is None:
            self.live[key] = [1, nbytes]
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        else:
            entry[0] += 1
        return _Held(t, key, self)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live_bytes -= entry[1]
            del self.live[key]

    @staticmethod
    def _unpack(h):
        return h.t if isinstance(h, _Held) else h

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self


# -- configuration -------------------------------------------------------------------------------
def method_hp(spec, method: str, expert_epochs: int) -> dict:
    """The spec's fixed hyperparameters of ``method``, start range cut to fit the experts."""
    hp = dict(spec.algorithms[method]["hyperparameters"])
    for k, v in hp.items():
        if isinstance(v, (list, dict)):
            raise SystemExit(f"{SPEC_PATH.name}: {method} hyperparameter {k} is not a single value: {v!r}")
    for k in methods.get(method).integer_hps():
        if hp.get(k) is not None:
            hp[k] = int(round(hp[k]))
    mtt_span = int(spec.algorithms["mtt"]["hyperparameters"]["expert_epochs"]) if "mtt" in spec.algorithms else 2
    cap = max(1, expert_epochs - mtt_span)  # the same start range for both methods
    hp["max_start_epoch"] = type(hp["max_start_epoch"])(max(1, min(hp["max_start_epoch"], cap)))
    return hp


def make_config(method: str, hp: dict, ipc: int, **override):
    return methods.get(method).make_config(ipc, {**hp, **override})


def make_distiller(method: str, cfg, experts: dict, model: dict, data, seed: int, device: str) -> MTTDistiller:
    """The distiller of ``cfg``, built by the method's registry entry (as a trial builds it), fed
    the experts already in memory: full trajectories and their convex form."""
    m = methods.get(method)
    hp = {k: v for k, v in dataclasses.asdict(cfg).items() if k != m.budget_field and k not in m.fixed}
    form = convex_form(CONVEX["num_waypoints"], CONVEX["beta"], CONVEX["smooth"])
    task = task_for(data.info.name)
    ctx = BuildContext(budget=getattr(cfg, m.budget_field), hp=hp, iterations=0, data=data, task=task, model=model,
                       spec={}, expert_files={}, device=torch.device(device), seed=seed,
                       preloaded={"full": experts["full"], form: experts["convex"]})
    return m.build(ctx)


def parse_target(rule: str) -> tuple[str, float]:
    """``mtt-0.5`` -> ("mtt", 0.5): MTT's final mean minus 0.5 points; ``85`` -> ("absolute", 85)."""
    r = rule.strip().lower()
    if r.startswith("mtt-"):
        return "mtt", float(r[4:])
    if r == "mtt":
        return "mtt", 0.0
    return "absolute", float(r)


# -- experts and storage -------------------------------------------------------------------------
def train_experts(name: str, data, model: dict, training: dict, count: int, base_seed: int, device: str,
                  console: Console, reuse: TrajectoryStore | None = None, key: str = "") -> tuple[list[list], float]:
    """Train ``count`` experts, or read them back (checksums verified) from ``reuse`` (``--store``)
    where an earlier run left them under the same store key; new ones are written there."""
    cfg = ExpertConfig(**training)
    out = []
    t0 = time.perf_counter()
    reused = 0
    for i in range(count):
        path = reuse.expert_path(key, name, i, "full") if reuse is not None else None
        if path is not None and path.exists():
            try:
                t = open_trajectory(path)
                out.append([SimpleNamespace(epoch=int(e), params=t.params[j].clone(), train_loss=float(t.train_loss[j]),
                                            test_acc=float(t.test_acc[j])) for j, e in enumerate(t.epochs)])
                reused += 1
                continue
            except CorruptTrajectoryError as e:
                console.print(f"[yellow]  {e}: retraining[/yellow]")
        out.append(list(train_expert(model, data, cfg, seed=expert_seed(base_seed, i), device=device)))
        if path is not None:
            info = data.info
            manifest = manifest_of(seeded_network(model, info.channels, info.num_classes, info.size, 0))
            write_trajectory(path, out[-1], manifest, {"dataset": name, "model": model, "training": training,
                                                       "seed_base": base_seed, "expert_index": i})
    accs = [c[-1].test_acc for c in out]
    console.print(f"  {name}: {count} experts × {cfg.epochs} epochs in {time.perf_counter() - t0:.1f} s "
                  f"({reused} read back from --store), "
                  f"test acc {100 * statistics.fmean(accs):.1f}% (min {100 * min(accs):.1f}%)")
    return out, time.perf_counter() - t0


def write_forms(store: TrajectoryStore, key: str, name: str, trajectories: list[list], manifest, info: dict
                ) -> dict:
    """Write every expert in full and convex form; bytes per form, file paths, exact read-back check."""
    form = convex_form(CONVEX["num_waypoints"], CONVEX["beta"], CONVEX["smooth"])
    full_bytes = convex_bytes = 0
    paths = {"full": [], "convex": []}
    exact = True
    for i, ckpts in enumerate(trajectories):
        meta = {**info, "expert_index": i}
        pf = store.expert_path(key, name, i, "full")
        pc = store.expert_path(key, name, i, form)
        full_bytes += write_trajectory(pf, ckpts, manifest, meta)[1]
        convex = ConvexTrajectory.from_checkpoints(torch.stack([c.params for c in ckpts]), manifest, **CONVEX)
        convex_bytes += write_convex(pc, convex, manifest, {**meta, "convex_options": CONVEX}, ckpts[-1].test_acc)[1]
        back = open_convex(pc)
        exact &= torch.equal(back.waypoints, convex.waypoints) and torch.equal(back.beta, convex.beta)
        paths["full"].append(pf)
        paths["convex"].append(pc)
    assert full_bytes == store.nbytes(key, name, "full") and convex_bytes == store.nbytes(key, name, form)
    epochs = len(trajectories[0]) - 1
    return {"experts": len(trajectories), "epochs": epochs, "params": sum(math.prod(s) for _, s in manifest),
            "full_bytes": full_bytes, "convex_bytes": convex_bytes, "ratio": full_bytes / convex_bytes,
            "full_bytes_per_expert": full_bytes / len(trajectories),
            "convex_bytes_per_expert": convex_bytes / len(trajectories), "convex_form": form,
            "convex_readback_exact": exact, "paths": paths}


def as_checkpoints(traj: torch.Tensor) -> list:
    return [SimpleNamespace(epoch=e, params=traj[e], train_loss=math.nan, test_acc=math.nan) for e in range(len(traj))]


def storage_long(args, model: dict, training: dict, data, manifest, store: TrajectoryStore, kind: str,
                 console: Console) -> dict:
    """Full ÷ convex bytes for ``--storage-epochs`` experts, trained or random walks (distill.py's)."""
    ns = SimpleNamespace(experts=args.storage_experts, seed=args.seed, trajectories=kind,
                         expert_epochs=args.storage_epochs)
    t0 = time.perf_counter()
    trajs = build_trajectories(ns, model, training, data, args.device, console)
    res = write_forms(store, f"long-{kind}", "digits", [as_checkpoints(t) for t in trajs], manifest,
                      {"dataset": "digits", "model": model, "trajectories": kind})
    res.pop("paths")
    res["source"] = kind
    res["seconds"] = time.perf_counter() - t0
    return res


# -- one distillation run ------------------------------------------------------------------------
def run_one(method: str, cfg, experts: dict, model: dict, data, seed: int, args, eval_cfg: EvalConfig,
            eval_seed: int, iter0_cache: dict, logger) -> dict:
    dist = make_distiller(method, cfg, experts, model, data, seed, args.device)
    d = data

    def evaluate(it: int) -> tuple[float, float]:
        syn = dist.synthetic()
        if it == 0:  # both methods start from the same real images: evaluate them once per seed
            hit = iter0_cache.get(seed)
            if hit is not None and torch.equal(hit[0], syn.images) and hit[1] == syn.lr:
                return hit[2]
        r = evaluate_set(model, d.info, syn.images, syn.labels, syn.lr, d.x_test, d.y_test, eval_cfg,
                         seed=eval_seed, device=args.device)
        if it == 0:
            iter0_cache[seed] = (syn.images, syn.lr, (r.mean, r.std))
        return r.mean, r.std

    curve, times, losses = [], [], []
    t_eval = 0.0
    for it in range(args.iterations + 1):
        if it % args.eval_every == 0 or it == args.iterations:
            t0 = time.perf_counter()
            mean, std = evaluate(it)
            t_eval += time.perf_counter() - t0
            curve.append({"iteration": it, "acc_mean": mean, "acc_std_networks": std})
            logger.metrics({"eval/acc_mean": mean, "eval/acc_std": std}, step=it)
        if it == args.iterations:
            break
        sync(args.device)
        t0 = time.perf_counter()
        m = dist.step()
        sync(args.device)
        times.append(time.perf_counter() - t0)
        losses.append(m["loss"])
        logger.metrics({"loss": m["loss"], "syn_lr": m["syn_lr"], "start_epoch": m["start_epoch"]}, step=it + 1)
    sec = statistics.median(times)
    logger.metrics({"sec_per_iter": sec, "final_acc_mean": curve[-1]["acc_mean"]}, step=args.iterations)
    return {"seed": seed, "curve": curve, "sec_per_iter": sec, "distill_s": sum(times), "eval_s": t_eval,
            "final_syn_lr": dist.synthetic().lr, "loss_first": statistics.fmean(losses[:10]),
            "loss_last": statistics.fmean(losses[-10:])}


def summarise(runs: list[dict]) -> dict:
    """Seed-mean curve with the std across seeds."""
    its = [p["iteration"] for p in runs[0]["curve"]]
    mean, std = [], []
    for j in range(len(its)):
        vals = [r["curve"][j]["acc_mean"] for r in runs]
        mean.append(statistics.fmean(vals))
        std.append(statistics.pstdev(vals) if len(vals) > 1 else 0.0)
    return {"iterations": its, "acc_mean": mean, "acc_std": std, "final_acc_mean": mean[-1],
            "final_acc_std": std[-1], "final_acc_per_seed": [r["curve"][-1]["acc_mean"] for r in runs],
            "sec_per_iter": statistics.median(r["sec_per_iter"] for r in runs),
            "final_syn_lr": statistics.fmean(r["final_syn_lr"] for r in runs)}


def iters_to(summary: dict, target: float) -> int | None:
    for it, acc in zip(summary["iterations"], summary["acc_mean"]):
        if acc >= target:
            return it
    return None


# -- speed and memory ------------------------------------------------------------------------------
def cost_row(method: str, grad_mode: str, syn_steps: int, hp: dict, experts: dict, model: dict, data,
             args) -> dict:
    cfg = make_config(method, hp, args.speed_ipc, syn_steps=syn_steps, grad_mode=grad_mode)
    dist = make_distiller(method, cfg, experts, model, data, args.seed, args.device)
    cuda = args.device.startswith("cuda")
    with PeakRSS() as rss, LiveSavedTensors() as saved:  # the warm-up step (untimed) measures memory
        dist.step()
    times = []
    for _ in range(args.timed_iters):
        sync(args.device)
        t0 = time.perf_counter()
        dist.step()
        sync(args.device)
        times.append(time.perf_counter() - t0)
    cuda_mb = None
    if cuda:
        sync(args.device)
        torch.cuda.reset_peak_memory_stats(args.device)
        base = torch.cuda.memory_allocated(args.device)
        dist.step()
        sync(args.device)
        cuda_mb = (torch.cuda.max_memory_allocated(args.device) - base) / 2**20
    live_mb = saved.peak_bytes / 2**20
    return {"method": method, "grad_mode": grad_mode, "syn_steps": syn_steps, "ipc": args.speed_ipc,
            "sec_per_iter": statistics.median(times), "peak_mb": cuda_mb if cuda else live_mb,
            "saved_live_peak_mb": live_mb, "saved_mb_cumulative": saved.bytes / 2**20, "cuda_peak_mb": cuda_mb,
            "rss_growth_mb": rss.mb, "times_s": times, "device": args.device}


# -- output ------------------------------------------------------------------------------------
def pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def plot(path: str, settings: list[dict], console: Console) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        console.print(f"[yellow]no plot: matplotlib is not installed ({e})[/yellow]")
        return False
    datasets = list(dict.fromkeys(s["dataset"] for s in settings))
    ipcs = sorted({s["ipc"] for s in settings})
    fig, axes = plt.subplots(len(datasets), len(ipcs), figsize=(5.2 * len(ipcs), 3.9 * len(datasets)),
                             squeeze=False)
    colours = {"mtt": "tab:blue", "mct": "tab:orange"}
    for s in settings:
        ax = axes[datasets.index(s["dataset"])][ipcs.index(s["ipc"])]
        for m in METHODS:
            c = s["methods"][m]
            x = c["iterations"]
            y = [100 * v for v in c["acc_mean"]]
            e = [100 * v for v in c["acc_std"]]
            ax.plot(x, y, marker="o", ms=3, color=colours[m],
                    label=f"{m.upper()} (final {y[-1]:.1f} ± {e[-1]:.1f})")
            ax.fill_between(x, [a - b for a, b in zip(y, e)], [a + b for a, b in zip(y, e)], color=colours[m],
                            alpha=0.2, linewidth=0)
        ax.axhline(100 * s["target"], color="grey", ls="--", lw=1, label=f"target {100 * s['target']:.1f}")
        ax.set_title(f"{s['dataset']}, IPC {s['ipc']} ({s['seeds']} seeds, mean ± std)")
        ax.set_xlabel("distillation iteration")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    for ax in axes.flat:
        if not ax.has_data():
            ax.set_visible(False)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    console.print(f"wrote {path}")
    return True


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__, "IPC 1, 2 seeds, 60 iterations, 2 experts × 8 epochs (under 3 minutes on 2 CPU cores)")
    ap.add_argument("--datasets", default="digits",
                    help="comma-separated: digits (default), mnist (opt-in, slow on a CPU)")
    ap.add_argument("--data-root", default=None,
                    help=f"folder of the MNIST files (default {shared_data('mnist')} when it exists)")
    ap.add_argument("--ipc", type=int, nargs="+", default=None, help="budgets (default: the spec's, 1 10; --quick 1)")
    ap.add_argument("--seeds", type=int, default=None, help="distillation seeds (default 3, --quick 2)")
    ap.add_argument("--iterations", type=int, default=None, help="distillation iterations (default 200, --quick 60)")
    ap.add_argument("--eval-every", type=int, default=20, help="evaluate every N iterations (default 20)")
    ap.add_argument("--eval-networks", type=int, default=None,
                    help="evaluation networks (default: the spec's, 3; --quick 2)")
    ap.add_argument("--experts", type=int, default=None, help="experts per dataset (default: the spec's, 6; --quick 2)")
    ap.add_argument("--expert-epochs", type=int, default=None, help="epochs per expert (default: the spec's, 30; --quick 8)")
    ap.add_argument("--target", default="mtt-0.5",
                    help="mtt-X: X points below MTT's final mean accuracy (default mtt-0.5); a number: absolute %%")
    ap.add_argument("--storage-epochs", type=int, default=50, help="epochs of the storage-ratio experts (default 50)")
    ap.add_argument("--storage-experts", type=int, default=2, help="how many of them (default 2; the ratio is per expert)")
    ap.add_argument("--storage-trajectories", choices=("trained", "random"), default=None,
                    help="train them (default) or random walks of the same shape (--quick)")
    ap.add_argument("--syn-steps", type=int, nargs="+", default=[10, 20, 40], help="cost rows (default 10 20 40)")
    ap.add_argument("--speed-ipc", type=int, default=10, help="IPC of the cost rows (default 10)")
    ap.add_argument("--timed-iters", type=int, default=None, help="timed steps per cost row after 1 warm-up (default 5, --quick 2)")
    ap.add_argument("--no-cost", action="store_true", help="skip the seconds-per-iteration and memory rows")
    ap.add_argument("--plot", default=None, help="PNG of the curves (default: the JSON's path with .png, "
                                                 "else bench_mct_vs_mtt.png)")
    ap.add_argument("--root", default=None, help="MLflow workspace folder (default: a new temporary folder; "
                                                 "./orchestrate-runs to browse with `orchestrate ui`)")
    ap.add_argument("--set", action="append", default=[], metavar="[METHOD.]KEY=VALUE",
                    help="override a hyperparameter of both methods (or of one: mct.lr_img=100); repeatable")
    ap.add_argument("--store", default=None, help="keep the experts' full trajectories in this folder and "
                    "read them back on the next run with the same data, model and training (default: retrain)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as a trial with 1 CPU)")
    ap.add_argument("--seed", type=int, default=None, help="base seed (default: the spec's, 0)")
    args = ap.parse_args(argv)
    wall0 = time.perf_counter()
    load_start = os.getloadavg()
    spec = load_spec(SPEC_PATH)
    quick_defaults(args, seeds=(2, 3), iterations=(60, 200), eval_networks=(2, spec.evaluation["networks"]),
                   experts=(2, spec.experts["count"]), expert_epochs=(8, spec.experts["epochs"]),
                   storage_trajectories=("random", "trained"), timed_iters=(2, 5))
    if args.ipc is None:
        args.ipc = [1] if args.quick else sorted({b for a in spec.algorithms.values() for b in a["budgets"]})
    if args.seed is None:
        args.seed = spec.seed
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available here")
    if args.data_root is None and shared_data('mnist').is_dir():
        args.data_root = str(shared_data('mnist'))
    datasets = [d.strip().lower() for d in args.datasets.split(",") if d.strip()]
    target_kind, target_value = parse_target(args.target)
    torch.set_num_threads(max(1, args.threads))
    console = bench_console(130)

    model = dict(spec.model)
    training = {**spec.expert_training(), "epochs": args.expert_epochs}
    eval_cfg = EvalConfig(networks=args.eval_networks, epochs=spec.evaluation["epochs"],
                          batch_size=spec.evaluation["batch_size"], dsa=spec.evaluation["dsa"])
    eval_seed = spec.seed * 1000 + 17  # orchestrator.trial.eval_seed
    hps = {m: method_hp(spec, m, args.expert_epochs) for m in METHODS}
    for item in args.set:
        k, sep, v = item.partition("=")
        method, dot, hp_name = k.partition(".") if "." in k else ("", "", k)
        targets = [method] if dot else list(METHODS)
        if not sep or any(t not in hps for t in targets) or any(hp_name not in hps[t] for t in targets):
            ap.error(f"--set {item}: expected [mtt.|mct.]KEY=VALUE with KEY one of {sorted(hps['mct'])}")
        for t in targets:
            hps[t][hp_name] = type(hps[t][hp_name])(yaml.safe_load(v))
    reuse = TrajectoryStore(args.store) if args.store else None
    console.print(f"[bold]MCT vs MTT[/bold] ({args.device}, {torch.get_num_threads()} thread(s)), spec {SPEC_PATH.name}: "
                  f"model {model}, experts {args.experts} × {args.expert_epochs} epochs, IPC {args.ipc}, "
                  f"{args.seeds} seeds × {args.iterations} iterations, eval every {args.eval_every} "
                  f"({eval_cfg.networks} networks × {eval_cfg.epochs} epochs)")
    for m in METHODS:
        console.print(f"  {m}: {hps[m]}")

    # MLflow
    from mlflow import MlflowClient

    from orchestrator.tracking import RunLogger, ensure_experiment, workspace

    root = args.root or tempfile.mkdtemp(prefix="bench-mct-vs-mtt-")
    ws = workspace(root)
    client = MlflowClient(ws.tracking_uri)
    exp_id = ensure_experiment(client, EXPERIMENT, ws.artifact_root)
    launch = time.strftime("%Y%m%d-%H%M%S")

    tmp = tempfile.TemporaryDirectory(prefix="bench-mct-store-")
    store = TrajectoryStore(tmp.name)
    storage: dict[str, dict] = {}
    settings: list[dict] = []
    mlflow_runs: list[dict] = []
    expert_info: dict[str, dict] = {}
    cost_experts = None
    try:
        for name in datasets:
            try:
                data = load_dataset(name, None if name == "digits" else args.data_root)
            except DatasetNotFoundError as e:
                console.print(f"[yellow]skipping {name}: {e}[/yellow]")
                continue
            info = data.info
            manifest = manifest_of(seeded_network(model, info.channels, info.num_classes, info.size, 0))
            console.print(f"[bold]{name}[/bold]: {len(data.y_train)} train / {len(data.y_test)} test images")
            key = store_key({"name": name, "digest": data.digest()}, model, training, args.seed)
            ckpts, expert_s = train_experts(name, data, model, training, args.experts, args.seed, args.device, console,
                                            reuse, key)
            st = write_forms(store, key, name, ckpts, manifest,
                             {"dataset": name, "model": model, "training": training, "seed_base": args.seed})
            experts = {"full": [open_trajectory(p).params for p in st.pop("paths")["full"]],
                       "convex": [open_convex(store.expert_path(key, name, i, st["convex_form"]))
                                  for i in range(args.experts)]}
            storage[name] = st
            accs = [c[-1].test_acc for c in ckpts]
            expert_info[name] = {"count": args.experts, "epochs": args.expert_epochs, "train_s": expert_s,
                                 "test_acc_mean": statistics.fmean(accs), "test_acc": accs}
            console.print(f"  store: full {st['full_bytes']:,} B, {st['convex_form']} {st['convex_bytes']:,} B, "
                          f"ratio {st['ratio']:.1f}× (read-back exact: {st['convex_readback_exact']})")
            if name == "digits" or cost_experts is None:
                cost_experts = (experts, data)

            for ipc in args.ipc:
                iter0: dict = {}
                runs: dict[str, list[dict]] = {m: [] for m in METHODS}
                for i in range(args.seeds):
                    seed = spec.seed * 7919 + ipc + 1000 * i
                    for m in METHODS:
                        cfg = make_config(m, hps[m], ipc)
                        run = client.create_run(exp_id, run_name=f"{m}-{name}-ipc{ipc}-seed{seed}",
                                                tags={"algorithm": m, "dataset": name, "budget": str(ipc),
                                                      "bench.seed": str(seed), "bench.launch": launch,
                                                      "bench": "mct_vs_mtt"})
                        log = RunLogger(ws.tracking_uri, run.info.run_id)
                        log.params({"algorithm": m, "dataset": name, "budget": ipc, "seed": seed,
                                    "iterations": args.iterations, "eval_every": args.eval_every,
                                    **{f"hp.{k}": v for k, v in cfg.to_dict().items()},
                                    **{f"eval.{k}": v for k, v in eval_cfg.to_dict().items()},
                                    **{f"model.{k}": v for k, v in model.items()},
                                    "experts.count": args.experts, "experts.epochs": args.expert_epochs})
                        t0 = time.perf_counter()
                        try:
                            r = run_one(m, cfg, experts, model, data, seed, args, eval_cfg, eval_seed, iter0, log)
                        except BaseException:
                            log.finish("FAILED")
                            raise
                        log.finish("FINISHED")
                        r["run_id"] = run.info.run_id
                        runs[m].append(r)
                        mlflow_runs.append({"method": m, "dataset": name, "ipc": ipc, "seed": seed,
                                            "run_id": run.info.run_id})
                        accs_txt = " ".join(pct(p["acc_mean"]) for p in r["curve"])
                        console.print(f"  {m} {name} IPC {ipc} seed {seed}: acc % [{accs_txt}]  "
                                      f"{r['sec_per_iter']:.3f} s/iter, loss {r['loss_first']:.3f} -> "
                                      f"{r['loss_last']:.3f}, {time.perf_counter() - t0:.0f} s")
                summ = {m: summarise(runs[m]) for m in METHODS}
                target = (summ["mtt"]["final_acc_mean"] - target_value / 100 if target_kind == "mtt"
                          else target_value / 100)
                for m in METHODS:
                    summ[m]["iters_to_target"] = iters_to(summ[m], target)
                    summ[m]["runs"] = runs[m]
                settings.append({"dataset": name, "ipc": ipc, "seeds": args.seeds, "target": target,
                                 "target_rule": args.target, "methods": summ})

        # storage of long experts
        digits = load_dataset("digits")
        dinfo = digits.info
        dman = manifest_of(seeded_network(model, dinfo.channels, dinfo.num_classes, dinfo.size, 0))
        long_rows = {"random": storage_long(args, model, {**spec.expert_training(), "epochs": args.storage_epochs},
                                            digits, dman, store, "random", console)}
        if args.storage_trajectories == "trained":
            long_rows["trained"] = storage_long(args, model, {**spec.expert_training(), "epochs": args.storage_epochs},
                                                digits, dman, store, "trained", console)
        long_main = long_rows[args.storage_trajectories]

        # cost
        cost_rows = []
        if not args.no_cost and cost_experts is not None:
            experts, data = cost_experts
            for m in METHODS:
                for mode in ("full", "tesla"):
                    for s in sorted(set(args.syn_steps)):
                        row = cost_row(m, mode, s, hps[m], experts, model, data, args)
                        row["dataset"] = data.info.name
                        cost_rows.append(row)
                        console.print(f"  cost {m} {mode:5s} syn_steps {s:3d}: {row['sec_per_iter']:.3f} s/iter, "
                                      f"peak {row['peak_mb']:.1f} MB")
            for r in cost_rows:
                base = next(b for b in cost_rows if b["method"] == r["method"] and b["grad_mode"] == r["grad_mode"]
                            and b["syn_steps"] == min(args.syn_steps))
                r["time_ratio"] = r["sec_per_iter"] / base["sec_per_iter"]
                r["mem_ratio"] = r["peak_mb"] / base["peak_mb"] if base["peak_mb"] else None
    finally:
        tmp.cleanup()

    # -- tables -------------------------------------------------------------------------------
    t = Table(title=f"Accuracy (%, mean ± std over seeds; target rule {args.target}; "
                    f"{eval_cfg.networks} eval networks × {eval_cfg.epochs} epochs)")
    for c in ("dataset", "IPC", "method", "iterations", "final acc", "per seed", "target", "iters to target",
              "s/iter", "final syn_lr"):
        t.add_column(c, justify="right")
    for s in settings:
        for m in METHODS:
            c = s["methods"][m]
            t.add_row(s["dataset"], str(s["ipc"]), m, str(args.iterations),
                      f"{pct(c['final_acc_mean'])} ± {pct(c['final_acc_std'])}",
                      " ".join(pct(v) for v in c["final_acc_per_seed"]), pct(s["target"]),
                      "never" if c["iters_to_target"] is None else str(c["iters_to_target"]),
                      f"{c['sec_per_iter']:.3f}", f"{c['final_syn_lr']:.4f}")
        t.add_section()
    console.print(t)

    for s in settings:
        ct = Table(title=f"Accuracy curve, {s['dataset']} IPC {s['ipc']} (%, mean ± std over {s['seeds']} seeds)")
        for c in ("iteration", "MTT", "MCT", "MCT − MTT"):
            ct.add_column(c, justify="right")
        a, b = s["methods"]["mtt"], s["methods"]["mct"]
        for j, it in enumerate(a["iterations"]):
            ct.add_row(str(it), f"{pct(a['acc_mean'][j])} ± {pct(a['acc_std'][j])}",
                       f"{pct(b['acc_mean'][j])} ± {pct(b['acc_std'][j])}",
                       f"{100 * (b['acc_mean'][j] - a['acc_mean'][j]):+.1f}")
        console.print(ct)

    stt = Table(title="Expert storage: full trajectories (MTT) vs convex form W=2, path beta (MCT)")
    for c in ("experts", "source", "epochs", "params", "full B", "convex B", "full / convex"):
        stt.add_column(c, justify="right")
    for name, st in storage.items():
        stt.add_row(f"{st['experts']} ({name})", "trained, used above", str(st["epochs"]), f"{st['params']:,}",
                    f"{st['full_bytes']:,}", f"{st['convex_bytes']:,}", f"{st['ratio']:.2f}")
    for kind, st in long_rows.items():
        stt.add_row(f"{st['experts']} (digits)", kind + (" walk" if kind == "random" else ""), str(st["epochs"]),
                    f"{st['params']:,}", f"{st['full_bytes']:,}", f"{st['convex_bytes']:,}", f"{st['ratio']:.2f}")
    console.print(stt)

    if cost_rows:
        cuda = args.device.startswith("cuda")
        kt = Table(title=f"Cost per iteration, {cost_rows[0]['dataset']} IPC {args.speed_ipc} ({args.device}; median of "
                         f"{args.timed_iters} after 1 warm-up)")
        cols = ["method", "grad_mode", "syn_steps", "s/iter", "× time", "peak MB", "× mem", "saved MB (cumul.)",
                "RSS growth MB"]
        for c in cols:
            kt.add_column(c, justify="right")
        last = None
        for r in cost_rows:
            if last is not None and (r["method"], r["grad_mode"]) != last:
                kt.add_section()
            last = (r["method"], r["grad_mode"])
            kt.add_row(r["method"], r["grad_mode"], str(r["syn_steps"]), f"{r['sec_per_iter']:.3f}",
                       f"{r['time_ratio']:.2f}", f"{r['peak_mb']:.1f}",
                       "n/a" if r["mem_ratio"] is None else f"{r['mem_ratio']:.2f}", f"{r['saved_mb_cumulative']:.1f}",
                       "n/a" if r["rss_growth_mb"] is None else f"{r['rss_growth_mb']:.1f}")
        console.print(kt)
        console.print("peak MB: " + ("CUDA max_memory_allocated growth over one step" if cuda else
                      "saved-activation MB alive at once during one step (autograd pack hook, once per storage)")
                      + "; saved MB (cumul.): everything saved during the step (bench/distill.py's count).")

    # -- main setting, plot, JSON ------------------------------------------------------------------
    main_setting = None
    if settings:
        pool = [s for s in settings if s["dataset"] == "digits"] or settings
        main_setting = max(pool, key=lambda s: s["ipc"])
    top = {}
    for m in METHODS:
        c = main_setting["methods"][m] if main_setting else {}
        top[m] = {"final_acc_mean": c.get("final_acc_mean"), "final_acc_std": c.get("final_acc_std"),
                  "iters_to_target": c.get("iters_to_target"), "sec_per_iter": c.get("sec_per_iter"),
                  "final_acc_per_seed": c.get("final_acc_per_seed")}
    if main_setting:
        a, b = top["mtt"]["iters_to_target"], top["mct"]["iters_to_target"]
        console.print(f"main setting {main_setting['dataset']} IPC {main_setting['ipc']}: target "
                      f"{pct(main_setting['target'])}%: MTT reaches it at {a}, MCT at {b}; final MTT "
                      f"{pct(top['mtt']['final_acc_mean'])} ± {pct(top['mtt']['final_acc_std'])}, MCT "
                      f"{pct(top['mct']['final_acc_mean'])} ± {pct(top['mct']['final_acc_std'])}")

    plot_path = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else "bench_mct_vs_mtt.png")
    plotted = plot(plot_path, settings, console) if settings else False
    console.print(f"MLflow: {len(mlflow_runs)} runs in experiment {EXPERIMENT!r} at {ws.root} "
                  f"(browse: orchestrate ui --root {ws.root})")
    wall = time.perf_counter() - wall0
    console.print(f"wall time {wall:.0f} s")
    print_load(console, load_start)

    if args.json:
        main_storage = storage.get("digits") or next(iter(storage.values()), None)
        write_results(
            console, args.json, "mct_vs_mtt",
            machine_info(args.device, load_start, gpu=True, versions={"mlflow": __import__("mlflow").__version__}),
            {"spec": str(SPEC_PATH), "datasets": datasets, "data_root": args.data_root, "ipc": args.ipc,
             "seeds": args.seeds, "iterations": args.iterations, "eval_every": args.eval_every,
             "evaluation": eval_cfg.to_dict(), "eval_seed": eval_seed, "model": model, "expert_training": training,
             "experts": args.experts, "hyperparameters": hps, "target_rule": args.target,
             "target_doc": "mtt-X: MTT's final seed-mean accuracy minus X points (per dataset and IPC); a number: "
                           "absolute accuracy in %; iters_to_target = first evaluated iteration whose seed-mean "
                           "accuracy reaches the target (null if never)",
             "convex": CONVEX, "storage_epochs": args.storage_epochs, "storage_experts": args.storage_experts,
             "storage_trajectories": args.storage_trajectories, "speed_ipc": args.speed_ipc,
             "syn_steps": sorted(set(args.syn_steps)), "timed_iters": args.timed_iters, "threads": args.threads,
             "seed": args.seed, "quick": args.quick},
            wall_s=wall,
            main_setting={"dataset": main_setting["dataset"], "ipc": main_setting["ipc"],
                          "target": main_setting["target"]} if main_setting else None,
            mtt=top["mtt"], mct=top["mct"],
            storage_ratio=main_storage["ratio"] if main_storage else None,
            storage_ratio_50_epochs=long_main["ratio"], storage_50_epochs_source=long_main["source"],
            storage={"experts_used": storage, f"epochs_{args.storage_epochs}": long_rows},
            settings=settings, experts=expert_info, speed_memory=cost_rows,
            plot=plot_path if plotted else None,
            mlflow={"root": str(ws.root), "tracking_uri": ws.tracking_uri, "experiment": EXPERIMENT,
                    "experiment_id": exp_id, "launch": launch, "runs": mlflow_runs},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
