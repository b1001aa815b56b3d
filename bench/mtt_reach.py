"""Can MTT's student reach its target? The matching problem of a spec, measured on its stored experts.

For each expert and start epoch t < max_start_epoch, with target t + expert_epochs, it prints:
- the normalisation of the matching loss, D = ||theta_t - theta_target||^2, and how many SGD
  steps of the expert lie between start and target (epochs x ceil(train / batch));
- the student of the spec's initialisation (IPC real images per class, DSA off, all images in
  every step), ``syn_steps`` plain SGD steps: the normalised loss at the spec's initial step size
  (``lr_teacher``), the step size that minimises it on a grid, and that minimum;
- the same for a student trained on real batches of the expert's size, ``syn_steps`` steps: how far
  real data gets in as many steps;
- the cosine between the student's displacement and the expert's, and how large one iteration's
  pixel update (``lr_img`` x the image gradient) and step-size update (``lr_lr`` x its gradient)
  are, against the images' scale and the step size.

It reads the experts the spec's launch (or ``orchestrate experts SPEC --root ROOT``) stored:

    orchestrate experts search_spaces/quickstart.yaml --root runs
    python bench/mtt_reach.py search_spaces/quickstart.yaml --root runs

``--quick`` takes one expert and one start epoch.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import bench_console, bench_parser, machine_info, write_results
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from algorithms.evaluate import random_real_subset  # noqa: E402
from algorithms.mtt import matching_loss, unrolled_matching_loss  # noqa: E402
from algorithms.networks import build_network, functional_forward, manifest_of  # noqa: E402
from orchestrator.experts import expert_key  # noqa: E402
from orchestrator.spec import load_spec  # noqa: E402
from orchestrator.store import TrajectoryStore, open_trajectory  # noqa: E402
from orchestrator.sweep import load_data  # noqa: E402
from orchestrator.tracking import workspace  # noqa: E402

LR_GRID = (0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)  # multiples of the initial step size


def student_end(net, manifest, start, x, y, lr: float, steps: int, batches=None) -> torch.Tensor:
    """``steps`` plain SGD steps from ``start`` on (x, y), all of it per step or the given batches."""
    params = start.clone()
    for i in range(steps):
        idx = batches[i] if batches is not None else slice(None)
        params.requires_grad_(True)
        ce = F.cross_entropy(functional_forward(net, params, x[idx], manifest), y[idx])
        g, = torch.autograd.grad(ce, params)
        params = params.detach() - lr * g
    return params.detach()


def best_lr(net, manifest, start, target, x, y, lr0: float, steps: int, batches=None) -> tuple[float, float, float, torch.Tensor]:
    """(loss at lr0, best multiple of lr0 on the grid, loss there, the displacement at lr0)."""
    losses = {}
    disp0 = None
    for m in LR_GRID:
        end = student_end(net, manifest, start, x, y, lr0 * m, steps, batches)
        loss = float(matching_loss(end, start, target))
        losses[m] = loss if math.isfinite(loss) else math.inf
        if m == 1:
            disp0 = end - start
    m = min(losses, key=losses.get)
    return losses[1], m, losses[m], disp0


def main() -> None:
    ap = bench_parser(__doc__, "one expert, one start epoch")
    ap.add_argument("spec", help="the spec whose experts and mtt hyperparameters are measured")
    ap.add_argument("--root", required=True, help="the store the spec's experts were trained into")
    ap.add_argument("--budget", type=int, default=None, help="images per class (default: the spec's first mtt budget)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    console = bench_console(150)
    torch.manual_seed(args.seed)
    load0 = os.getloadavg()

    spec = load_spec(args.spec)
    algo = spec.algorithms["mtt"]
    ipc = args.budget or algo["budgets"][0]
    hp = {**algo["hyperparameters"], **algo["per_budget"].get(ipc, {})}
    data = load_data(spec)
    info = data.info
    key = expert_key(spec, data)
    store = TrajectoryStore(workspace(args.root).trajectories)
    count = 1 if args.quick else spec.experts["count"]
    trajs = [open_trajectory(store.expert_path(key, spec.dataset["name"], i)) for i in range(count)]
    net = build_network(spec.model, info.channels, info.num_classes, info.size)
    manifest = manifest_of(net)
    n_train = len(data.y_train)
    steps_per_epoch = math.ceil(n_train / spec.experts["batch_size"])
    syn_steps, span, lr0 = hp["syn_steps"], hp["expert_epochs"], hp["lr_teacher"]
    starts = [0] if args.quick else list(range(hp["max_start_epoch"]))
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = random_real_subset(data.x_train, data.y_train, ipc, info.num_classes, gen)

    rows = []
    t0 = time.perf_counter()
    for e, traj in enumerate(trajs):
        for t in starts:
            if t + span >= len(traj):
                continue
            start, target = traj[t].clone().float(), traj[t + span].clone().float()
            dist = float(((start - target) ** 2).sum())
            # the synthetic student at initialisation (real images, no DSA)
            syn_l0, syn_m, syn_best, syn_disp = best_lr(net, manifest, start, target, images, labels, lr0, syn_steps)
            # a student on real batches of the expert's size, as many steps
            perm = torch.randperm(n_train, generator=gen)[: syn_steps * spec.experts["batch_size"]]
            batches = list(perm.split(spec.experts["batch_size"]))
            real_l0, real_m, real_best, _ = best_lr(net, manifest, start, target, data.x_train, data.y_train, lr0,
                                                    syn_steps, batches)
            cos = float(F.cosine_similarity(syn_disp, target - start, dim=0))
            # one distillation iteration's updates at the spec's lr_img / lr_lr (SGD: step = lr x grad)
            x = images.clone().requires_grad_(True)
            lr = torch.tensor(float(lr0), requires_grad=True)
            plan = [(torch.arange(len(labels)), None)] * syn_steps
            loss = unrolled_matching_loss(net, manifest, start, target, x, labels, lr, plan, None)
            loss.backward()
            pix_step = float(hp["lr_img"] * x.grad.pow(2).mean().sqrt())
            pix_scale = float(images.pow(2).mean().sqrt())
            lr_step = float(hp["lr_lr"] * lr.grad.abs())
            rows.append({"expert": e, "start": t, "target": t + span, "D": dist,
                         "expert_steps": span * steps_per_epoch, "syn_steps": syn_steps,
                         "syn_loss_at_lr0": syn_l0, "syn_best_lr": syn_m * lr0, "syn_best_loss": syn_best,
                         "real_loss_at_lr0": real_l0, "real_best_lr": real_m * lr0, "real_best_loss": real_best,
                         "cos_syn_expert": cos, "pixel_step_rms": pix_step, "pixel_rms": pix_scale,
                         "lr_step": lr_step, "lr0": lr0})
            console.print(f"  expert {e} start {t}: done ({time.perf_counter() - t0:.0f} s)")

    table = Table(title=f"{spec.name}: MTT's matching problem at IPC {ipc} ({spec.dataset['name']}, "
                        f"{n_train} training images, batch {spec.experts['batch_size']}, lr_teacher {lr0})")
    for col in ("expert", "start→target", "D", "expert steps", "student steps", "syn L(lr0)", "syn best lr",
                "syn best L", "real L(lr0)", "real best lr", "real best L", "cos(syn, expert)",
                "pixel step / rms", "lr step / lr0"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["expert"]), f"{r['start']}→{r['target']}", f"{r['D']:.3g}", str(r["expert_steps"]),
                      str(r["syn_steps"]), f"{r['syn_loss_at_lr0']:.3f}", f"{r['syn_best_lr']:.3g}",
                      f"{r['syn_best_loss']:.3f}", f"{r['real_loss_at_lr0']:.3f}", f"{r['real_best_lr']:.3g}",
                      f"{r['real_best_loss']:.3f}", f"{r['cos_syn_expert']:.3f}",
                      f"{r['pixel_step_rms'] / r['pixel_rms']:.2g}", f"{r['lr_step'] / r['lr0']:.2g}")
    console.print(table)
    console.print(f"lr grid: lr_teacher x {list(LR_GRID)}; syn: the {ipc * info.num_classes} initial images, "
                  f"all in every step, no DSA; real: batches of {spec.experts['batch_size']} real images")
    if args.json:
        write_results(console, args.json, "mtt_reach", machine_info("cpu", load0),
                      {"spec": args.spec, "root": args.root, "ipc": ipc, "hyperparameters": hp}, rows=rows)


if __name__ == "__main__":
    main()
