"""How much can Farzi's inner loop lower its outer loss, depending on the data it trains on and on
where theta_0 comes from? A diagnostic of the meta-objective, before any distillation.

Farzi's outer loss is the next-item cross-entropy on real users of a model trained for T inner
Adam steps (full batch, no dropout) from theta_0, a checkpoint of an expert trajectory. This
script runs those T steps from the stored experts' epochs on fixed sets of the budget's size: no
step at all (theta_0 itself), mu random real users, Farzi's ``init: real`` start (the spec's d and
temperature), its ``init: teacher`` start (the first expert's next-item predictions along real
sequences), the item-popularity distribution at every position (soft), and, with ``--full``, all
the real users (full batch: the most the objective can reward). Where even all the data does not
lower the loss, or where every small set raises it (theta_0 from a trained epoch), the
meta-gradient has nothing to learn from: it can only ask for the data that does least harm.

The experts are the spec's, read from ``--root``'s store (``orchestrate launch SPEC --root ROOT``
trains them); the data from ``$ORCHESTRATE_DATA/ml-100k``, else ``../shared/data`` beside the
repository. The outer batch is a fixed sample of real users (``--outer-users``).

    python bench/farzi_headroom.py --root RUNS [--quick] [--full] [--json PATH]
"""
from __future__ import annotations

import os
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
    ap = bench_parser(__doc__, "theta_0 from epochs 0 and 5, inner lr 1e-3 only, no full-data set")
    ap.add_argument("--spec", default=str(SPEC), help="a Farzi spec: model, budget, d, T, inner lr (default: the reference)")
    ap.add_argument("--root", required=True, help="the root whose store holds the spec's experts")
    ap.add_argument("--epochs", default=None, help="expert epochs to start from, e.g. 0,1,5,10")
    ap.add_argument("--inner-lr", default=None, help="inner Adam step sizes, e.g. 1e-3,1e-2 (default: the spec's, and 10x)")
    ap.add_argument("--expert", type=int, default=0, help="which stored expert")
    ap.add_argument("--outer-users", type=int, default=256, help="real users in the outer loss")
    ap.add_argument("--full", action="store_true", help="also train on all real users (full batch: slow)")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    load_start = os.getloadavg()
    from algorithms.farzi import FarziSet, real_init, teacher_init
    from algorithms.networks import load_flat
    from algorithms.seqmodels import seeded_seq_model, sequence_loss
    from orchestrator.evaluate import stored_experts
    from orchestrator.sequences import load_sequences, seq_task
    from orchestrator.spec import load_spec
    from orchestrator.store import open_trajectory
    from orchestrator.tracking import workspace

    spec = load_spec(args.spec)
    (name, algo), = spec.algorithms.items()
    hp = {**algo["hyperparameters"]}
    mu, T, d, tau = algo["budgets"][0], int(hp.get("inner_steps", 20)), int(hp.get("latent_dim", 16)), \
        float(hp.get("temperature", 1.0))
    lr0 = float(hp.get("inner_lr", 1e-3))
    eps = float(hp.get("eps", 1e-8))  # the spec's inner Adam epsilon
    quick_defaults(args, epochs=("0,5", "0,1,5,10"), inner_lr=(f"{lr0:g}", f"{lr0:g},{10 * lr0:g}"))
    epochs = [int(e) for e in args.epochs.split(",")]
    lrs = [float(v) for v in args.inner_lr.split(",")]

    data = load_sequences(spec.dataset["name"], spec.dataset.get("root") or shared_data(spec.dataset["name"]))
    task = seq_task(data, spec.model["max_len"])
    found, where = stored_experts(spec, data, workspace(args.root).trajectories)
    if not found:
        sys.exit(f"no experts of {args.spec}: {where} (train them with orchestrate launch {args.spec} --root {args.root})")
    traj = open_trajectory(dict((i, p) for i, p, _ in found)[args.expert]).params
    if max(epochs) >= len(traj):
        sys.exit(f"--epochs {args.epochs}: the experts have epochs 0..{len(traj) - 1}")

    torch.set_num_threads(1)
    real, pad, V = task.train, task.pad_id, task.vocab_size
    g = torch.Generator().manual_seed(0)
    outer = real[torch.randperm(len(real), generator=g)[: args.outer_users]]
    users = real[torch.randperm(len(real), generator=g)[:mu]]
    pop = torch.bincount(real[real != pad], minlength=V).float()
    pop[pad] = 0
    pop /= pop.sum()
    gen = torch.Generator().manual_seed(1)
    F0, M0 = torch.randn(mu, hp.get("seq_len", 20), d, generator=gen), torch.randn(d, V, generator=gen) / d ** 0.5
    start = FarziSet(real_init(F0, M0, real, pad, tau, gen), M0, tau, pad, lr0).probs().detach()
    teacher = seeded_seq_model(spec.model, V, pad, 0)  # init 'teacher': the first expert's last checkpoint
    load_flat(teacher, open_trajectory(found[0][1]).params[-1].clone())
    teacher.eval()
    with torch.no_grad():
        taught = FarziSet(*teacher_init(teacher, real, pad, (mu, start.shape[1], d), tau, torch.Generator().manual_seed(1)),
                          tau, pad, lr0).probs()
    sets = {"theta_0": None, f"{mu} random users": users, f"farzi start (d={d})": start,
            f"teacher start (d={d})": taught, "popularity (soft)": pop.expand(mu, start.shape[1], V).clone()}
    if args.full:
        sets[f"all {len(real)} users"] = real

    console = bench_console(160)
    console.print(f"{spec.name}: outer loss (next-item cross-entropy on {len(outer)} real users) after T = {T} inner "
                  f"Adam steps (eps {eps:g}, full batch, no dropout) from expert {args.expert}'s epoch, per training set")
    rows = []
    for epoch in epochs:
        for lr in lrs:
            row = {"epoch": epoch, "inner_lr": lr, "loss": {}, "seconds": {}}
            for label, x in sets.items():
                model = seeded_seq_model(spec.model, V, pad, 0)
                load_flat(model, traj[epoch].clone())
                model.eval()
                opt = torch.optim.Adam(model.parameters(), lr=lr, eps=eps)
                t0 = time.perf_counter()
                for _ in range(T if x is not None else 0):
                    loss = sequence_loss(model(x), x, pad)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                with torch.no_grad():
                    row["loss"][label] = float(sequence_loss(model(outer), outer, pad))
                row["seconds"][label] = time.perf_counter() - t0
                console.print(f"  epoch {epoch:2d}  lr {lr:g}  {label:24s} {row['loss'][label]:.3f}")
            rows.append(row)

    table = Table(title=f"outer loss after T = {T} steps (lower is better; theta_0: no step)")
    table.add_column("theta_0 epoch", justify="right")
    table.add_column("inner lr", justify="right")
    for label in sets:
        table.add_column(label, justify="right")
    for row in rows:
        base = row["loss"]["theta_0"]
        table.add_row(str(row["epoch"]), f"{row['inner_lr']:g}",
                      *(f"{v:.3f}" + ("" if k == "theta_0" else f" ({v - base:+.2f})") for k, v in row["loss"].items()))
    console.print(table)
    print_load(console, load_start)
    if args.json:
        write_results(console, args.json, "farzi_headroom", machine_info("cpu", load_start),
                      {"spec": args.spec, "expert": args.expert, "mu": mu, "T": T, "latent_dim": d,
                       "outer_users": len(outer), "epochs": epochs, "inner_lr": lrs}, rows=rows)


if __name__ == "__main__":
    main()
