"""How the evaluation's networks fit the real data: Farzi sets against the experts.

Each Farzi set (``orchestrate export``, or a sweep's ``synthetic*.safetensors``) is trained on by
fresh networks under the spec's evaluation protocol (its epochs, minibatches, dropout, Adam's
usual eps), and each expert checkpoint asked for (``--expert-epochs``, of the spec's experts in
``--root``'s store) is taken as it is. Each then gets, on the real data:

- ``train CE``: the cross-entropy of each training user's last training item given the rest (the
  loss ``outer_positions: last`` lowers);
- ``test CE``: of each test user's held-out item given the history (what HR@10 ranks);
- HR@10 (full ranking, seen items masked) and the validation split's HR@10.

``--ensemble`` adds the ensemble of the experts' last checkpoints (their mean next-item
distribution: the teacher of Farzi's ``teacher_experts``). The caption gives HR@10's standard
error over the test users, the noise no number of evaluation networks removes; the Δ columns give
each row's difference from the first on the same users (test and validation), with its paired
standard error: a difference within two of them is not one the users' sample can tell.

A set that lowers the train CE without the test CE (and HR@10) following, where the experts' do
follow, fits the real users' own next items in a way that does not generalise (bench/README.md,
Farzi: what the outer loop learns).

    python bench/farzi_fit.py SET.safetensors [SET ...] --root RUNS [--expert-epochs 10 20 30]
        [--experts K] [--ensemble] [--quick] [--json PATH]
"""
from __future__ import annotations

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

SPEC = REPO / "search_spaces" / "reference" / "farzi_ml100k_t200.yaml"


def fit(model, params, task) -> dict:
    """train CE, test CE, HR@10 and valid HR@10 of ``model`` with the flat ``params`` (or a list of
    them: their ensemble, the mean next-item distribution), and each user's hit (1.0 or 0.0) on the
    test and validation splits (``hits``, ``valid_hits``; None without a validation split)."""
    import torch.nn.functional as nnf

    from algorithms.networks import ensemble_forward, manifest_of
    from algorithms.seqmodels import last_item_loss
    from algorithms.seqtrain import hr_ndcg, recommendation_ranks

    model.eval()
    man = manifest_of(model)
    with torch.no_grad():
        total = 0.0
        for i in range(0, len(task.train), 256):
            batch = task.train[i:i + 256]
            total += float(last_item_loss(ensemble_forward(model, params, batch, man), batch, task.pad_id)) * len(batch)
        test = ensemble_forward(model, params, task.test_inputs, man)[:, -1]
        out = {"train_ce": total / len(task.train), "test_ce": float(nnf.cross_entropy(test, task.test_targets))}
    ranks, _ = recommendation_ranks(model, params, task)
    out.update(hr10=hr_ndcg(ranks, task.k)[0], hits=(ranks < task.k).double(), valid_hr10=float("nan"), valid_hits=None)
    valid = task.validation()
    if valid is not None:
        ranks, _ = recommendation_ranks(model, params, valid)
        out.update(valid_hr10=hr_ndcg(ranks, valid.k)[0], valid_hits=(ranks < valid.k).double())
    return out


def paired(a: torch.Tensor | None, b: torch.Tensor | None) -> tuple[float, float]:
    """``b - a`` on the same users with its standard error (:func:`algorithms.evaluate.paired_difference`);
    NaN where either is missing."""
    from algorithms.evaluate import paired_difference

    return (float("nan"), float("nan")) if a is None or b is None else paired_difference(b, a)


def binomial_se(p: float, n: int) -> float:
    """The standard error of a hit rate ``p`` measured on ``n`` independent users."""
    return (p * (1 - p) / n) ** 0.5 if n else float("nan")


def _short(path: str) -> str:
    """A set's name in the table: its file name, or for a sweep's artifact (``.../EXPERIMENT/RUN/artifacts/
    synthetic*/synthetic.safetensors``) the experiment, the run's first 8 characters and the folder."""
    p = Path(path)
    if p.parent.parent.name == "artifacts" and len(p.parts) >= 5:
        return f"{p.parts[-5]}/{p.parts[-4][:8]}/{p.parent.name}"
    return p.name


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__, "1 network per set, one expert epoch (the last), 20 evaluation epochs")
    ap.add_argument("sets", nargs="*", help="Farzi set files (safetensors with F, M, temperature)")
    ap.add_argument("--spec", default=str(SPEC), help="the spec whose model, evaluation and experts to use")
    ap.add_argument("--root", default=None, help="the root whose store holds the spec's experts (none: no expert rows)")
    ap.add_argument("--expert-epochs", type=int, nargs="*", default=None, help="expert checkpoints to measure "
                    "(default: 10, 20 and the last; quick: the last)")
    ap.add_argument("--experts", type=int, default=2, help="how many of the spec's experts (default 2)")
    ap.add_argument("--ensemble", action="store_true", help="also the ensemble of those experts' last checkpoints "
                    "(their mean next-item distribution: the teacher of teacher_experts)")
    ap.add_argument("--networks", type=int, default=None, help="networks per set (default 2; quick 1)")
    ap.add_argument("--epochs", type=int, default=None, help="evaluation epochs (default the spec's; quick 20)")
    args = ap.parse_args(argv)
    load_start = os.getloadavg()
    import direct
    from algorithms.evaluate import EVAL_THREADS, torch_threads
    from algorithms.farzi import FarziSet
    from algorithms.seqmodels import seeded_seq_model
    from algorithms.seqtrain import SeqTrainConfig, train_seq_model
    from orchestrator.artifacts import read_synthetic
    from orchestrator.evaluate import stored_experts
    from orchestrator.sequences import load_sequences, seq_task
    from orchestrator.store import open_trajectory
    from orchestrator.tracking import workspace

    spec = direct.load(args.spec, [])
    ev = spec.evaluation
    quick_defaults(args, networks=(1, 2), epochs=(20, ev["epochs"]))
    data = load_sequences(spec.dataset["name"], spec.dataset.get("root") or shared_data(spec.dataset["name"]))
    task = seq_task(data, spec.model["max_len"])
    cfg = SeqTrainConfig(epochs=args.epochs, lr=ev["lr"], batch_size=ev["batch_size"], weight_decay=ev["weight_decay"])
    rows = []
    console = bench_console(130)
    with torch_threads(EVAL_THREADS):
        for path in args.sets:
            t0 = time.perf_counter()
            tensors, _ = read_synthetic(path)
            if "F" not in tensors:
                ap.error(f"{path}: not a Farzi set (no F)")
            x = FarziSet(tensors["F"].float(), tensors["M"].float(), float(tensors["temperature"]), data.info.pad_id,
                         0.0).probs().detach()
            nets = []
            for k in range(args.networks):
                seed = 12345 + k
                for last in train_seq_model(spec.model, task, x, cfg, seed):
                    pass
                nets.append(fit(seeded_seq_model(spec.model, task.vocab_size, task.pad_id, seed), last.params, task))
            scalars = [k for k in nets[0] if not k.endswith("hits")]
            hits = {k: None if nets[0][k] is None else torch.stack([n[k] for n in nets]).mean(0)
                    for k in ("hits", "valid_hits")}  # each user's hit rate over the networks
            rows.append({"what": path, "kind": "set", "networks": [{k: n[k] for k in scalars} for n in nets],
                         "seconds": time.perf_counter() - t0,
                         **{k: statistics.fmean(n[k] for n in nets) for k in scalars},
                         **hits})
        if args.root:
            found, where = stored_experts(spec, data, workspace(args.root).trajectories)
            if not found:
                ap.error(f"no expert of {args.spec} in {where}: give the --root its sweeps used")
            model = seeded_seq_model(spec.model, task.vocab_size, task.pad_id, 0)
            for i, p, _ in found[: args.experts]:
                traj = open_trajectory(p)
                last = len(traj) - 1
                for epoch in args.expert_epochs or ([last] if args.quick else [e for e in (10, 20) if e < last] + [last]):
                    if not 0 <= epoch <= last:
                        ap.error(f"--expert-epochs {epoch}: expert {i} has epochs 0..{last}")
                    m = fit(model, traj[epoch].clone().float(), task)
                    rows.append({"what": f"expert {i}, epoch {epoch}", "kind": "expert", **m})
            if args.ensemble:
                lasts = [(i, open_trajectory(p)) for i, p, _ in found[: args.experts]]
                m = fit(model, [t[len(t) - 1].clone().float() for _, t in lasts], task)
                rows.append({"what": f"ensemble of experts {', '.join(str(i) for i, _ in lasts)} (last epochs)",
                             "kind": "expert", **m})
    for r in rows:  # against the first row, user by user
        r["d_hr10"], r["d_hr10_se"] = paired(rows[0]["hits"], r["hits"])
        r["d_valid_hr10"], r["d_valid_hr10_se"] = paired(rows[0]["valid_hits"], r["valid_hits"])
    t = Table(title=f"how the evaluation's networks fit the real data ({spec.dataset['name']})")
    for col in ("trained on", "train last-item CE", "test-item CE", "HR@10", "valid HR@10", "Δ HR@10 ± SE",
                "Δ valid ± SE"):
        t.add_column(col, justify="left" if col == "trained on" else "right")

    def delta(r, k):
        return "-" if r is rows[0] or r[k] != r[k] else f"{100 * r[k]:+.2f} ± {100 * r[k + '_se']:.2f}"

    for r in rows:
        t.add_row(_short(r["what"]) if r["kind"] == "set" else r["what"], f"{r['train_ce']:.3f}",
                  f"{r['test_ce']:.3f}", f"{100 * r['hr10']:.2f}", f"{100 * r['valid_hr10']:.2f}",
                  delta(r, "d_hr10"), delta(r, "d_valid_hr10"))
    users = len(task.test_targets)
    p = statistics.fmean(r["hr10"] for r in rows) if rows else 0.0
    t.caption = (f"sets: {args.networks} network(s) each (seeds 12345..), {args.epochs} epochs of the spec's evaluation; "
                 f"experts: their checkpoints as stored. HR@10 over {users} test users: at {100 * p:.1f} its sampling "
                 f"standard error is {100 * binomial_se(p, users):.2f} points. Δ: the difference from the first row "
                 "on the same users, with its paired standard error (a set's hits: the mean over its networks)")
    console.print(t)
    print_load(console, load_start)
    if args.json:
        write_results(console, args.json, "farzi_fit", machine_info("cpu", load_start),
                      {"spec": args.spec, "networks": args.networks, "epochs": args.epochs, "quick": args.quick,
                       "test_users": users},
                      rows=[{k: v for k, v in r.items() if not k.endswith("hits")} for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
