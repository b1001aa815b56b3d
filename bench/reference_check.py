"""Our MTT and MCT against the official code, number for number, on the same inputs.

The official repositories are not part of this project (and are never copied into it): fetch them
(``git clone https://github.com/GeorgeCazenavette/mtt-distillation``, ``.../Zhong0x29a/MCT``) and
pass their folders. This script imports the official modules from there at run time.

- ``--mtt-repo PATH``: one MTT iteration. The same start and target checkpoints (``--expert``
  epochs ``t`` and ``t + 2``), the same ten real images (one per class), ``syn_lr`` 0.01, no
  augmentation, ``syn_steps`` student steps: our ``unrolled_matching_loss`` on our ConvNet against
  the loop of the official ``distill.py`` (its ConvNet from ``networks.py`` wrapped in its
  ``ReparamModule``, MSE sums divided by the parameter count, then by the start distance), which
  we run with the lines of that loop that matter here. Compared: the loss, the image gradient
  (relative difference and cosine) and the gradient of ``syn_lr``.
- ``--mct-repo PATH``: the convexified trajectory. Our ``ConvexTrajectory`` against the official
  ``exps/trajectory_compression.py`` (``get_step_and_waypoint``, the waypoint spacing and
  smoothing of its ``main``, ``CompressedTrajectoryWithInterpolation.get_point_n``) and
  ``convexify.py`` (``convexify_a_trajectory``): θ(t) at integer and fractional epochs and the β
  table, on the expert's trajectory with 2 waypoints and on a 51-checkpoint random walk of the same
  shape with 4 smoothed waypoints.

The expert is a trajectory file of the store (``--expert``; default: a 4-epoch random walk of
MNIST's ConvNet-3 width 128 shape, so the check runs without a store) and the images come from
MNIST when it is found (``$ORCHESTRATE_DATA/mnist`` or ``../shared/data/mnist``), else from
scikit-learn's digits padded to 28 px.

    python bench/reference_check.py --mtt-repo ~/src/mtt-distillation --mct-repo ~/src/MCT \\
        --expert ~/runs-ref/trajectories/mnist-fdd0d4290804e01c/expert_00000.arrow

``--quick`` runs 10 student steps instead of 50 and fewer time points.
"""
from __future__ import annotations

import ast
import math
import os
import sys
from pathlib import Path

import torch
from common import REPO, bench_console, bench_parser, machine_info, shared_data, write_results
from rich.table import Table

sys.path.insert(0, str(REPO))

from algorithms.mct import ConvexTrajectory  # noqa: E402
from algorithms.mtt import unrolled_matching_loss  # noqa: E402
from algorithms.networks import build_network, manifest_of  # noqa: E402

MODEL = {"name": "convnet", "depth": 3, "width": 128}


def official_functions(path: Path, names: set[str], namespace: dict) -> dict:
    """The top-level functions and classes ``names`` of an official source file, executed alone
    (their files import modules this project does not install, e.g. torchvision or wandb)."""
    tree = ast.parse(path.read_text(), str(path))
    keep = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
    missing = names - {n.name for n in keep}
    if missing:
        raise SystemExit(f"{path}: no {sorted(missing)} there (another version of the official code?)")
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def load_module(path: Path, name: str):
    """An official source file that imports nothing this project lacks, as a module."""
    import importlib.util

    if not path.is_file():
        raise SystemExit(f"{path}: not found (is --mtt-repo a clone of mtt-distillation?)")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_expert(path: str | None, manifest) -> tuple[torch.Tensor, str]:
    if path:
        from orchestrator.store import open_trajectory

        t = open_trajectory(path)
        if [tuple(s) for _, s in t.manifest] != [tuple(s) for _, s in manifest]:
            raise SystemExit(f"{path}: not a trajectory of MNIST's ConvNet-3 width 128")
        return t.params.to(torch.float32), path
    p = sum(math.prod(s) for _, s in manifest)
    g = torch.Generator().manual_seed(0)
    from algorithms.networks import flatten_params

    start = flatten_params(build_network(MODEL, 1, 10, 28))
    steps = torch.randn(4, p, generator=g) * 2e-3 * torch.linspace(1.0, 0.4, 4)[:, None]
    return torch.cat([start[None], start + torch.cumsum(steps, 0)]), "random walk (4 epochs)"


def ten_images() -> tuple[torch.Tensor, torch.Tensor, str]:
    from orchestrator.datasets import load_dataset

    root = shared_data("mnist")
    if root.is_dir():
        data, name = load_dataset("mnist", str(root)), "mnist"
    else:
        data, name = load_dataset("digits", None), "digits (padded to 28 px)"
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.nonzero(data.y_train == c).view(-1)[torch.randint(20, (1,), generator=g)]
                       for c in range(10)]).view(-1)
    x = data.x_train[idx].clone()
    if x.shape[-1] != 28:
        x = torch.nn.functional.pad(x, [(28 - x.shape[-1]) // 2, (28 - x.shape[-1] + 1) // 2] * 2)
    return x, data.y_train[idx].clone(), name


def mtt_rows(repo: Path, traj: torch.Tensor, steps: int) -> list[dict]:
    networks = load_module(repo / "networks.py", "official_mtt_networks")  # both import torch only
    reparam = load_module(repo / "reparam_module.py", "official_mtt_reparam")
    theirs = reparam.ReparamModule(networks.ConvNet(1, 10, 128, 3, "relu", "instancenorm", "avgpooling", (28, 28)))
    ours = build_network(MODEL, 1, 10, 28)
    man = manifest_of(ours)
    if [tuple(s) for _, s in man] != [tuple(s) for s in theirs._param_shapes]:
        raise SystemExit("the official ConvNet's parameters are not laid out as ours")
    x0, y, source = ten_images()
    rows = []
    for start in range(len(traj) - 2):
        tgt = start + 2
        imgs = x0.clone().requires_grad_(True)
        lr = torch.tensor(0.01, requires_grad=True)
        loss = unrolled_matching_loss(ours, man, traj[start], traj[tgt], imgs, y, lr,
                                      [(torch.arange(10), None)] * steps, None)
        loss.backward()
        a = (loss.item(), imgs.grad.clone(), lr.grad.item())
        # the official loop (distill.py): student_params[-1] - syn_lr * grad, MSE sums / num_params
        imgs = x0.clone().requires_grad_(True)
        syn_lr = torch.tensor(0.01).requires_grad_(True)
        start_p, target_p = traj[start].clone(), traj[tgt].clone()
        student = [start_p.clone().requires_grad_(True)]
        for _ in range(steps):
            out = theirs(imgs, flat_param=student[-1])
            ce = torch.nn.CrossEntropyLoss()(out, y)
            grad = torch.autograd.grad(ce, student[-1], create_graph=True)[0]
            student.append(student[-1] - syn_lr * grad)
        n = start_p.numel()
        official = (torch.nn.functional.mse_loss(student[-1], target_p, reduction="sum") / n) / \
            (torch.nn.functional.mse_loss(start_p, target_p, reduction="sum") / n)
        official.backward()
        b = (official.item(), imgs.grad.clone(), syn_lr.grad.item())
        rows.append({"check": "mtt", "images": source, "start": start, "target": tgt, "syn_steps": steps,
                     "loss_ours": a[0], "loss_official": b[0],
                     "img_grad_rel_diff": float((a[1] - b[1]).norm() / b[1].norm()),
                     "img_grad_cos": float(torch.nn.functional.cosine_similarity(a[1].flatten(), b[1].flatten(), 0)),
                     "lr_grad_ours": a[2], "lr_grad_official": b[2]})
    return rows


def mct_rows(repo: Path, traj: torch.Tensor, manifest, quick: bool) -> list[dict]:
    ns: dict = {"torch": torch}
    official_functions(repo / "convexify.py", {"minus_through_listed_tensors", "convexify_a_trajectory"}, ns)
    official_functions(repo / "exps" / "trajectory_compression.py",
                       {"get_norm2_between_nodes", "get_step_and_waypoint", "CompressedTrajectoryWithInterpolation",
                        "mean_two_through_listed_tensors"}, ns)

    def as_lists(flat):
        out = []
        for row in flat:
            i, layers = 0, []
            for _, shape in manifest:
                k = math.prod(shape)
                layers.append(row[i:i + k].reshape(shape).clone())
                i += k
            out.append(layers)
        return out

    def flat(layers):
        return torch.cat([x.flatten() for x in layers])

    def compress(lists, w):  # trajectory_compression.main for one trajectory
        t = [list(x) for x in lists]
        if w == 2:
            steps, way = ns["get_step_and_waypoint"](t)
            return ns["CompressedTrajectoryWithInterpolation"](way, steps, 2), [0, len(t) - 1]
        idx = [round(i) for i in range(0, len(t), len(t) // (w - 1))]
        if idx[-1] != len(t) - 1:
            idx += [len(t) - 1]
        pieces = [ns["get_step_and_waypoint"](t[idx[i]:idx[i + 1] + 1])[0] for i in range(len(idx) - 1)]
        for j in idx[1:-1]:
            t[j] = ns["mean_two_through_listed_tensors"](t[j - 1], t[j + 1])
        t[-1] = ns["mean_two_through_listed_tensors"](t[-2], t[-1])
        return ns["CompressedTrajectoryWithInterpolation"]([t[j] for j in idx], pieces, w), idx

    rows = []
    k = len(traj) - 1
    g = torch.Generator().manual_seed(0)
    walk = traj[0] + torch.cumsum(torch.randn(51, traj.shape[1], generator=g) * 1e-3
                                  * torch.linspace(1, 0.2, 51)[:, None], 0)
    cases = [("expert", traj, 2, False, [0, 0.37, 1, 1.5, k / 2, k - 0.01, k]),
             ("walk K=50", walk, 4, True, [0, 5.5, 17, 20.25, 33.5, 34, 40.1, 49.5, 50])]
    for name, tr, w, smooth, times in cases:
        if quick:
            times = times[::2]
        lists = as_lists(tr)
        ours = ConvexTrajectory.from_checkpoints(tr, manifest, w, smooth=smooth)
        off, idx = compress(lists, w)
        vex = [flat(p) for p in ns["convexify_a_trajectory"](lists)] if w == 2 else None
        for t in times:
            a = ours.point(t)
            # the released get_point_n finds no segment for the last epoch of a piecewise path; its
            # value there is the last waypoint
            b = flat(off.get_point_n(t)) if not (w > 2 and t == idx[-1]) else flat(off.waypoints[-1])
            row = {"check": "mct", "trajectory": name, "waypoints_ours": ours.epochs, "waypoints_official": idx,
                   "t": t, "theta_rel_diff": float((a - b).norm() / b.norm()),
                   "theta_max_abs_diff": float((a - b).abs().max())}
            if vex is not None and t == int(t):
                row["vs_convexify_max_abs_diff"] = float((a - vex[int(t)]).abs().max())
            rows.append(row)
        if w == 2:
            ob = torch.tensor([[float(x) for x in step] for step in off.step_size_list]).T
            rows.append({"check": "mct", "trajectory": name, "beta_max_abs_diff": float((ours.beta - ob).abs().max())})
    return rows


def main() -> None:
    ap = bench_parser(__doc__, "10 student steps instead of 50, fewer time points")
    ap.add_argument("--mtt-repo", type=Path, help="a clone of GeorgeCazenavette/mtt-distillation")
    ap.add_argument("--mct-repo", type=Path, help="a clone of Zhong0x29a/MCT")
    ap.add_argument("--expert", help="a trajectory file of the store (MNIST ConvNet-3 width 128); "
                                     "default: a random walk of that shape")
    args = ap.parse_args()
    if not (args.mtt_repo or args.mct_repo):
        ap.error("give --mtt-repo and/or --mct-repo (clones of the official repositories)")
    console = bench_console(150)
    load0 = os.getloadavg()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    manifest = manifest_of(build_network(MODEL, 1, 10, 28))
    traj, expert = load_expert(args.expert, manifest)
    rows = []
    if args.mtt_repo:
        rows += mtt_rows(args.mtt_repo, traj, 10 if args.quick else 50)
        t = Table(title=f"MTT, one iteration: ours vs official distill.py ({expert})")
        for col in ("start→target", "steps", "loss ours", "loss official", "image grad rel. diff", "cos",
                    "syn_lr grad ours", "official"):
            t.add_column(col, justify="right")
        for r in (r for r in rows if r["check"] == "mtt"):
            t.add_row(f"{r['start']}→{r['target']}", str(r["syn_steps"]), f"{r['loss_ours']:.6f}",
                      f"{r['loss_official']:.6f}", f"{r['img_grad_rel_diff']:.1e}", f"{r['img_grad_cos']:.7f}",
                      f"{r['lr_grad_ours']:.5f}", f"{r['lr_grad_official']:.5f}")
        console.print(t)
    if args.mct_repo:
        mct = mct_rows(args.mct_repo, traj, manifest, args.quick)
        rows += mct
        t = Table(title=f"MCT: our θ(t) vs the official trajectory_compression.py ({expert})")
        for col in ("trajectory", "waypoints ours / official", "t", "θ rel. diff", "θ max abs diff",
                    "vs convexify.py"):
            t.add_column(col, justify="right")
        for r in mct:
            if "t" not in r:
                t.add_row(r["trajectory"], "β table", "", "", f"{r['beta_max_abs_diff']:.1e}", "")
                continue
            v = r.get("vs_convexify_max_abs_diff")
            t.add_row(r["trajectory"], f"{r['waypoints_ours']} / {r['waypoints_official']}", f"{r['t']:g}",
                      f"{r['theta_rel_diff']:.1e}", f"{r['theta_max_abs_diff']:.1e}", "" if v is None else f"{v:.1e}")
        console.print(t)
    if args.json:
        write_results(console, args.json, "reference_check", machine_info("cpu", load0),
                      {"mtt_repo": str(args.mtt_repo), "mct_repo": str(args.mct_repo), "expert": expert,
                       "quick": args.quick}, rows=rows)


if __name__ == "__main__":
    main()
