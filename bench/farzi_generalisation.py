"""Does what Farzi's outer loop optimises carry over to how its sets are evaluated? A diagnostic
of Farzi sets already made (``orchestrate export``, or ``synthetic*.safetensors`` from a sweep).

Farzi's outer loss is the next-item cross-entropy on real users of a model trained for T inner Adam
steps (the spec's inner lr and epsilon, full batch, no dropout) from theta_0, an expert checkpoint
of epochs 0..max_start_epoch. The evaluation trains a fresh network for ``evaluation.epochs``
epochs (minibatches, dropout, Adam's usual epsilon) and ranks items. A set the outer loop improved
on its own problems but that evaluates worse has learnt something that does not transfer: to the
theta_0 it saw (then held-out theta_0 disagree), to T steps (then the same loss after the
evaluation's number of steps disagrees), or to the inner protocol (then the evaluation's training
disagrees). This script measures the same real-user loss, per set, in each of those settings:

- ``objective``: the spec's experts, every epoch 0..max_start_epoch (the outer loop's theta_0);
- ``fresh theta_0``: fresh random initialisations (epoch 0 of experts never made), same T steps;
- ``held-out experts``: epochs 1..max_start_epoch of experts the spec did not use (indices from
  experts.count on, in the same store: ``orchestrate launch`` with a larger count trains them);
- ``objective, T x k``: the objective's theta_0 trained k times longer (``--horizon``, default the
  evaluation's number of optimiser steps);
- ``evaluation``: the evaluation's own training from its own seeds, the real-user loss after it.

Each set's evaluation record (HR@10, valid HR@10, as the sweep measured them) is printed beside.

    python bench/farzi_generalisation.py --root RUNS SET.safetensors [SET ...] [--quick] [--json PATH]
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from rich.table import Table  # noqa: E402

from common import bench_console, bench_parser, machine_info, print_load, quick_defaults, shared_data, write_results  # noqa: E402

SPEC = REPO / "search_spaces" / "reference" / "farzi_ml100k.yaml"


def parse_args():
    ap = bench_parser(__doc__, "the first 2 experts' theta_0 and 2 held-out ones, 2 fresh theta_0, 2 evaluation "
                               "networks, horizon 2 x T, 256 outer users")
    ap.add_argument("sets", nargs="+", help="Farzi set files (safetensors with F, M, temperature)")
    ap.add_argument("--spec", default=str(SPEC), help="the spec that made the sets (default: the reference)")
    ap.add_argument("--root", required=True, help="the root whose store holds the spec's experts")
    ap.add_argument("--experts", type=int, default=None,
                    help="the objective's theta_0 from the first N of the spec's experts, and at most N held-out ones "
                         "(default all; quick 2)")
    ap.add_argument("--fresh", type=int, default=None, help="fresh random theta_0 (default 10; quick 2)")
    ap.add_argument("--networks", type=int, default=None, help="evaluation networks (default the spec's; quick 2)")
    ap.add_argument("--horizon", type=int, default=None,
                    help="inner steps of the longer run (default: the evaluation's optimiser steps; quick 2 x T)")
    ap.add_argument("--outer-users", type=int, default=None, help="real users in the loss (default 512; quick 256)")
    return ap.parse_args()


def losses(model, outer: torch.Tensor, task) -> tuple[float, float]:
    """(the next-item cross-entropy on the real sequences ``outer``, every position: Farzi's outer
    loss; the cross-entropy of each test user's held-out item at the last position: what HR@10 ranks)."""
    from algorithms.seqmodels import sequence_loss

    model.eval()
    with torch.no_grad():
        logp = model(task.test_inputs)[:, -1].log_softmax(-1)
        test = -logp.gather(1, task.test_targets.view(-1, 1)).mean()
        return float(sequence_loss(model(outer), outer, task.pad_id)), float(test)


def inner_losses(model, x, steps: int, lr: float, eps: float, outer: torch.Tensor, task) -> tuple[float, float]:
    """Farzi's inner loop as its outer loss sees it: ``steps`` full-batch Adam steps on ``x`` (eval
    mode: no dropout), then :func:`losses`."""
    from algorithms.seqmodels import sequence_loss

    model.eval()
    opt = torch.optim.Adam(model.parameters(), lr=lr, eps=eps)
    for _ in range(steps):
        loss = sequence_loss(model(x), x, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses(model, outer, task)


def main() -> None:
    args = parse_args()
    load_start = os.getloadavg()
    import direct
    from algorithms.evaluate import EVAL_THREADS, torch_threads
    from algorithms.farzi import FarziSet
    from algorithms.networks import load_flat
    from algorithms.seqmodels import seeded_seq_model
    from algorithms.seqtrain import SeqTrainConfig, recommendation_metrics, train_seq_model
    from orchestrator.artifacts import read_synthetic, set_evaluation
    from orchestrator.evaluate import stored_experts
    from orchestrator.sequences import load_sequences, seq_task
    from orchestrator.spec import eval_seed
    from orchestrator.store import open_trajectory
    from orchestrator.tracking import workspace

    spec = direct.load(args.spec, [])
    (name, algo), = spec.algorithms.items()
    hp, ev = algo["hyperparameters"], spec.evaluation
    T, lr, eps = int(hp["inner_steps"]), float(hp["inner_lr"]), float(hp.get("eps", 1e-8))
    starts = range(int(hp.get("max_start_epoch", 2)) + 1)
    count = spec.experts["count"]
    quick_defaults(args, experts=(2, count), fresh=(2, 10), networks=(2, ev["networks"]), horizon=(2 * T, None), outer_users=(256, 512))

    data = load_sequences(spec.dataset["name"], spec.dataset.get("root") or shared_data(spec.dataset["name"]))
    task = seq_task(data, spec.model["max_len"])
    mu_len = None
    ws = workspace(args.root)
    many = direct.load(args.spec, [f"experts.count={count + 100}"])  # every stored expert of the same recipe
    found, where = stored_experts(many, data, ws.trajectories)
    ours = [(i, p) for i, p, _ in found if i < count]
    if len(ours) < count:
        sys.exit(f"the experts of {args.spec} are not all in {args.root}: {where} (orchestrate launch {args.spec} "
                 f"--root {args.root} trains them)")
    others = [(i, p) for i, p, _ in found if i >= count][: args.experts]
    ours = ours[: args.experts]
    V, pad = task.vocab_size, task.pad_id
    g = torch.Generator().manual_seed(0)
    outer = task.train[torch.randperm(len(task.train), generator=g)[: args.outer_users]]
    cfg = SeqTrainConfig(epochs=ev["epochs"], lr=ev["lr"], batch_size=ev["batch_size"],
                         weight_decay=ev.get("weight_decay", 0.0))

    sets = {}
    for path in args.sets:
        tensors, meta = read_synthetic(path)
        if "F" not in tensors:
            sys.exit(f"{path}: not a Farzi set (no F and M)")
        x = FarziSet(tensors["F"].float(), tensors["M"].float(), float(tensors["temperature"]), pad, 0.0).probs().detach()
        mu_len = mu_len or tuple(x.shape[:2])
        sets[Path(path).name] = (x, meta)
    steps_per_epoch = math.ceil(mu_len[0] / cfg.batch_size)
    horizon = args.horizon or cfg.epochs * steps_per_epoch

    def from_theta(flat):
        model = seeded_seq_model(spec.model, V, pad, 0)
        load_flat(model, flat.clone())
        return model

    trajs = {i: open_trajectory(p).params for i, p in ours + others}
    settings = {
        "objective": [(f"expert {i} epoch {s}", lambda i=i, s=s: from_theta(trajs[i][s]), T) for i, _ in ours for s in starts],
        "fresh theta_0": [(f"seed {10_000 + k}", lambda k=k: seeded_seq_model(spec.model, V, pad, 10_000 + k), T)
                          for k in range(args.fresh)],
        "held-out experts": [(f"expert {i} epoch {s}", lambda i=i, s=s: from_theta(trajs[i][s]), T)
                             for i, _ in others for s in starts if s > 0],
        f"objective, {horizon} steps": [(f"expert {i} epoch {s}", lambda i=i, s=s: from_theta(trajs[i][s]), horizon)
                                        for i, _ in ours for s in starts],
    }
    console = bench_console(170)
    console.print(f"{spec.name}: next-item cross-entropy on {len(outer)} real users after training on each set "
                  f"({mu_len[0]} x {mu_len[1]}); inner loop: Adam lr {lr:g} eps {eps:g}, full batch, no dropout; "
                  f"evaluation: {cfg.epochs} epochs x {steps_per_epoch} steps, batch {cfg.batch_size}, dropout "
                  f"{spec.model.get('dropout', 0)}, {args.networks} networks")
    rows = []
    torch.set_num_threads(EVAL_THREADS)
    with torch_threads(EVAL_THREADS):
        for label, (x, meta) in sets.items():
            row = {"set": label, "iteration": meta.get("iteration"), "evaluation": set_evaluation(meta),
                   "loss": {}, "test_loss": {}, "seconds": {}}
            for setting, problems in settings.items():
                if not problems:
                    continue
                t0 = time.perf_counter()
                got = [inner_losses(make(), x, steps, lr, eps, outer, task) for _, make, steps in problems]
                row["loss"][setting], row["test_loss"][setting] = [a for a, _ in got], [b for _, b in got]
                row["seconds"][setting] = time.perf_counter() - t0
            t0 = time.perf_counter()
            seed0, got, hr = eval_seed({"seed": spec.seed}), [], []
            for n in range(args.networks):
                last = None
                for last in train_seq_model(spec.model, task, x, cfg, seed0 + n):
                    pass
                model = from_theta(last.params)
                got.append(losses(model, outer, task))
                hr.append(recommendation_metrics(model, last.params, task)["hr10"])
            row["loss"]["evaluation"], row["test_loss"]["evaluation"] = [a for a, _ in got], [b for _, b in got]
            row["hr10"] = hr
            row["seconds"]["evaluation"] = time.perf_counter() - t0
            console.print(f"  {label}: " + ", ".join(f"{k} {statistics.mean(v):.4f} / {statistics.mean(row['test_loss'][k]):.4f}"
                                                      for k, v in row["loss"].items())
                          + f"; HR@10 of these networks {100 * statistics.mean(hr):.2f}")
            rows.append(row)

    keys = [k for k in (*settings, "evaluation") if any(k in r["loss"] for r in rows)]

    def cell(v):
        return f"{statistics.mean(v):.4f} ± {statistics.stdev(v):.4f}" if len(v) > 1 else f"{v[0]:.4f}"

    def paired(a, b):  # the same theta_0 / networks under both sets: a paired difference, ± its standard error
        d = [y - x for x, y in zip(a, b)]
        return f"{statistics.mean(d):+.4f} ± {statistics.stdev(d) / math.sqrt(len(d)):.4f}" if len(d) > 1 else f"{d[0]:+.4f}"

    for field, what in (("loss", "real users' next items, every position (Farzi's outer loss)"),
                        ("test_loss", "each test user's held-out item, last position (what HR@10 ranks)")):
        table = Table(title=f"cross-entropy of {what}, after training on the set (mean ± std over theta_0 or networks)")
        table.add_column("set (iteration)")
        for k in keys:
            table.add_column(k, justify="right")
        table.add_column("HR@10: sweep (valid) / here", justify="right")
        for r in rows:
            e = r["evaluation"] or {}
            hr = (f"{100 * e['hr10'][0]:.2f} ({100 * e['valid_hr10'][0]:.2f})" if "valid_hr10" in e else "-") + \
                f" / {100 * statistics.mean(r['hr10']):.2f}"
            table.add_row(f"{r['set']} ({r['iteration']})", *(cell(r[field][k]) for k in keys), hr)
        for r in rows[1:]:
            table.add_row(f"  change: {r['set']}", *(paired(rows[0][field][k], r[field][k]) for k in keys),
                          f"{100 * (statistics.mean(r['hr10']) - statistics.mean(rows[0]['hr10'])):+.2f}")
        console.print(table)
    print_load(console, load_start)
    if args.json:
        write_results(console, args.json, "farzi_generalisation", machine_info("cpu", load_start),
                      {"spec": args.spec, "root": args.root, "T": T, "horizon": horizon, "inner_lr": lr, "eps": eps,
                       "outer_users": len(outer), "experts": [i for i, _ in ours], "fresh": args.fresh, "networks": args.networks,
                       "held_out_experts": [i for i, _ in others]}, rows=rows)


if __name__ == "__main__":
    main()
