"""Is validation a fair judge of Farzi's outer steps when the outer loss scores the validation inputs?

On a recommendation task the validation input of a user is its training history and the target
its second-to-last item; the test input is the history plus that item. With ``outer_positions:
last`` and ``outer_target: teacher``, Farzi's outer loss scores the student's prediction after
each real user's training history against the teacher's: exactly the validation inputs. In the
ML-100k runs validation then rose at every evaluation while test did not (bench/README.md, Farzi).

This script tests whether that rise comes from the overlap. It splits the users in two at random:
the outer loss (and ``init: teacher``'s draw of real sequences) sees only group A; group B is held
out. It runs the spec's Farzi trial on A alone and, every ``--every`` steps, trains the spec's
evaluation networks (same seeds at every step, so steps pair network by network) and scores every
user on validation and test (OUTCOMES: hit@10, the target's cross-entropy among the unseen items,
the cross-entropy against the teacher, the probability on seen items), all from one forward pass.
If the overlap inflates validation, validation rises more on A than on B; test (whose inputs no
outer loss scores) shows how much of A's lead is anything else. With ``init: real`` or ``teacher``
it also reports apart the users of A whose rows the start read (``FarziDistiller.init_index``).

The contrast reported: (A's change since step 0) minus (B's), with its standard error over the
users (the two groups are independent samples) and over the networks (each network's own
contrast), added in quadrature.

    python bench/farzi_holdout.py --root RUNS [--spec SPEC] [--set KEY=VALUE ...] [--steps N]
        [--every K] [--holdout FRACTION] [--networks N] [--quick] [--json PATH]
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

SPEC = REPO / "search_spaces" / "reference" / "farzi_ml100k_ensemble.yaml"


def parse_args(argv=None):
    ap = bench_parser(__doc__, "1 outer step, evaluated before and after, 1 network")
    ap.add_argument("--spec", default=str(SPEC), help="a Farzi spec on a recommendation data set (default: the "
                                                       "ensemble reference)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a spec value (as bench/direct.py), e.g. algorithms.farzi.hyperparameters.outer_lr=0.01")
    ap.add_argument("--root", required=True, help="the root whose store holds the spec's experts")
    ap.add_argument("--steps", type=int, default=None, help="outer steps (default 50; quick 1)")
    ap.add_argument("--every", type=int, default=None, help="evaluate every K steps (default 25; quick 1)")
    ap.add_argument("--networks", type=int, default=None, help="evaluation networks per step (default the spec's; quick 1)")
    ap.add_argument("--holdout", type=float, default=0.5, help="the fraction of users held out of the outer loss")
    ap.add_argument("--split-seed", type=int, default=0, help="the seed of the users' split")
    return ap.parse_args(argv)


# outcome -> (scale, unit, what): HR@10 in points; the cross-entropies in nats (lower is better)
OUTCOMES = {"hr10": (100, "points", "HR@10"),
            "ce": (1, "nats", "the target's cross-entropy among the unseen items"),
            "teacher_ce": (1, "nats", "the cross-entropy against the teacher's next-item distribution (the outer loss)"),
            "seen": (100, "points", "the probability on the items the input has seen (the ranking masks them)")}


def _masked_logp(logits: torch.Tensor, pad: int | None) -> torch.Tensor:
    from algorithms.seqmodels import MASKED

    s = logits.double()
    if pad is not None:
        s[:, pad] = MASKED  # finite: 0 x log p stays 0
    return s.log_softmax(-1)


@torch.no_grad()
def target_logp(logits_of, task, batch: int = 256) -> torch.Tensor:
    """``logits_of`` ([n, L] ids -> [n, L, V] logits) at each input's last position, as log-probabilities
    over the items (the padding id gets none): [U, V]."""
    return torch.cat([_masked_logp(logits_of(task.test_inputs[i : i + batch])[:, -1], task.pad_id)
                      for i in range(0, len(task.test_inputs), batch)])


@torch.no_grad()
def user_outcomes(logits_of, task, teacher_logp: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per user, from one forward pass: the hit (the target ranked within ``task.k`` among the items
    the input has not seen, as ``recommendation_ranks``), the target's cross-entropy among those items
    (the softmax of what the ranking ranks), the cross-entropy against the teacher's distribution
    after the input (what Farzi's outer loss scores at ``last`` on a real user), and the probability
    on the items the input has seen other than the target (what the ranking masks). Keyed as OUTCOMES."""
    from algorithms.seqtrain import rank_of_targets

    logp = target_logp(logits_of, task)
    tce = -(teacher_logp.exp() * logp).sum(-1)
    scores, on_seen = logp.clone(), torch.zeros(len(logp), dtype=logp.dtype)
    if task.pad_id is not None:
        scores[:, task.pad_id] = -math.inf
    for r, seen in enumerate(task.test_seen):
        seen = seen[seen != task.test_targets[r]]
        on_seen[r] = logp[r, seen].exp().sum()
        scores[r, seen] = -math.inf
    hit = (rank_of_targets(scores, task.test_targets) < task.k).double()
    ce = -scores.log_softmax(-1).gather(1, task.test_targets.view(-1, 1)).squeeze(1)
    return {"hr10": hit, "ce": ce, "teacher_ce": tce, "seen": on_seen}


def contrast(d: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """``d``: [networks, users] changes of one outcome. Mean over A minus mean over B, and its
    standard error: over the users (per-user mean change; independent groups) and over the
    networks (each network's contrast), in quadrature."""
    per_user = d.double().mean(0)
    se_users = math.sqrt(per_user[a].var().item() / len(a) + per_user[b].var().item() / len(b))
    per_net = d[:, a].double().mean(1) - d[:, b].double().mean(1)
    se_nets = per_net.std().item() / math.sqrt(len(per_net)) if len(per_net) > 1 else 0.0
    return float(per_net.mean()), math.hypot(se_users, se_nets)


def change(d: torch.Tensor, group: torch.Tensor) -> tuple[float, float]:
    """Mean change over ``group`` and its paired standard error (users and networks, in quadrature)."""
    x = d[:, group].double()
    se_users = x.mean(0).std().item() / math.sqrt(x.shape[1])
    per_net = x.mean(1)
    se_nets = per_net.std().item() / math.sqrt(len(per_net)) if len(per_net) > 1 else 0.0
    return float(per_net.mean()), math.hypot(se_users, se_nets)


def main(argv=None) -> int:
    args = parse_args(argv)
    quick_defaults(args, steps=(1, 50), every=(1, 25))
    load_start = os.getloadavg()
    import direct
    from algorithms.evaluate import EVAL_THREADS, torch_threads
    from algorithms.farzi import FarziDistiller
    from algorithms.networks import ensemble_forward, manifest_of
    from algorithms.seqmodels import seeded_seq_model
    from algorithms.seqtrain import SeqTrainConfig, train_seq_model
    from orchestrator import methods
    from orchestrator.evaluate import stored_experts
    from orchestrator.sequences import load_sequences
    from orchestrator.spec import eval_seed
    from orchestrator.store import open_trajectory
    from orchestrator.tasks import task_for
    from orchestrator.tracking import workspace

    spec = direct.load(args.spec, args.set)
    sd = spec.to_dict()
    points = [p for p in spec.trial_points() if p["algorithm"] == "farzi"]
    if not points:
        sys.exit(f"{args.spec}: no farzi trial")
    point = points[0]
    if any(isinstance(v, dict) for v in point["hp"].values()):
        sys.exit(f"{args.spec}: a hyperparameter is sampled from a distribution; set one value with --set")
    ev = spec.evaluation
    quick_defaults(args, networks=(1, ev["networks"]))
    data = load_sequences(spec.dataset["name"], spec.dataset.get("root") or shared_data(spec.dataset["name"]))
    kind = task_for(spec.dataset["name"])
    task = kind.seq_task(data, spec.model["max_len"])
    if task.kind != "recommendation" or task.validation() is None:
        sys.exit(f"{args.spec}: needs a recommendation data set with a validation split")
    found, where = stored_experts(spec, data, workspace(args.root).trajectories)
    count = spec.experts["count"]
    if len(found) < count:
        sys.exit(f"the experts of {args.spec} are not all in {args.root}: {where} (orchestrate launch {args.spec} "
                 f"--root {args.root} trains them)")
    trajectories = [open_trajectory(p).params for _, p, _ in sorted(found)[:count]]

    users = len(task.train)
    perm = torch.randperm(users, generator=torch.Generator().manual_seed(args.split_seed))
    held = int(round(args.holdout * users))
    if not 0 < held < users:
        sys.exit(f"--holdout {args.holdout}: leaves no user on one side ({users} users)")
    group_b, group_a = perm[:held].sort().values, perm[held:].sort().values
    torch.set_num_threads(EVAL_THREADS)
    V, pad = task.vocab_size, task.pad_id
    seed = methods.trial_seed(sd, point)
    cfg = methods.get("farzi").make_config(point["budget"], point["hp"])
    real = methods.get("farzi").real_rows(kind, data, spec.model["max_len"], cfg)  # the trial's rows; A's alone below
    distiller = FarziDistiller(seeded_seq_model(spec.model, V, pad, seed), trajectories, real[group_a], V, pad,
                               cfg, seed=seed, iterations=point["iterations"])
    # A's users whose rows the start read (init real/teacher): does the outer loop cost them a head start?
    start_users = group_a[distiller.init_index].sort().values if distiller.init_index is not None else None
    rest_a = group_a[~torch.isin(group_a, start_users)] if start_users is not None else None
    train_cfg = SeqTrainConfig(epochs=ev["epochs"], lr=ev["lr"], batch_size=ev["batch_size"],
                               weight_decay=ev.get("weight_decay", 0.0))
    seed0, valid_task = eval_seed(sd), task.validation()

    console = bench_console(150)
    console.print(f"{spec.name}: the outer loss on {len(group_a)} users (A), {len(group_b)} held out (B); "
                  f"{args.steps} outer steps of outer lr {cfg.outer_lr:g} ({point['iterations']} planned for "
                  f"its schedule), evaluated every {args.every} with {args.networks} networks "
                  f"({', '.join(args.set) or 'the spec as it is'})", highlight=False)

    teacher_logp = {split: target_logp(distiller.teacher, t) for split, t in (("valid", valid_task), ("test", task))}

    def evaluate() -> tuple[dict[str, dict[str, torch.Tensor]], float]:
        """Each outcome's [networks, users] values on both splits, from the evaluation's networks."""
        x = distiller.synthetic().training_input().detach()
        t0, got = time.perf_counter(), {o: {"valid": [], "test": []} for o in OUTCOMES}
        with torch_threads(EVAL_THREADS):
            for n in range(args.networks):
                last = None
                for last in train_seq_model(spec.model, task, x, train_cfg, seed0 + n):
                    pass
                model = seeded_seq_model(spec.model, V, pad, seed0 + n).eval()  # no dropout, as the metrics
                man = manifest_of(model)
                for split, t in (("valid", valid_task), ("test", task)):
                    out = user_outcomes(lambda ids: ensemble_forward(model, [last.params], ids, man), t,
                                        teacher_logp[split])
                    for o in OUTCOMES:
                        got[o][split].append(out[o])
        return {o: {k: torch.stack(v) for k, v in d.items()} for o, d in got.items()}, time.perf_counter() - t0

    evals, rows, step_seconds = {}, [], []
    t_start = time.perf_counter()

    def save(rows: list[dict]) -> None:
        # each evaluation's outcomes, user by user and network by network, beside the JSON (to pair across runs)
        from safetensors.torch import save_file

        cases = Path(args.json).with_suffix(".safetensors")
        cases.parent.mkdir(parents=True, exist_ok=True)
        tmp = cases.with_name(f".{cases.name}.tmp-{os.getpid()}")
        save_file({**{f"{o}_{split}_step{it}": v.float().contiguous() for it, e in evals.items()
                      for o, d in e.items() for split, v in d.items()},
                   "group_a": group_a, "group_b": group_b,
                   **({"start_users": start_users} if start_users is not None else {})}, str(tmp))
        os.replace(tmp, cases)
        write_results(console, args.json, "farzi_holdout", machine_info("cpu", load_start),
                      {"spec": str(args.spec), "set": args.set, "steps": args.steps, "every": args.every,
                       "networks": args.networks, "holdout": args.holdout, "split_seed": args.split_seed,
                       "users_a": len(group_a), "users_b": len(group_b), "outer_lr": cfg.outer_lr,
                       "cases": str(cases)},
                      rows=rows, sec_per_step=statistics.median(step_seconds) if step_seconds else None,
                      wall_s=time.perf_counter() - t_start, done=rows[-1]["step"] == args.steps)

    for it in range(args.steps + 1):
        if it > 0:
            t0 = time.perf_counter()
            distiller.step()
            step_seconds.append(time.perf_counter() - t0)
        if it % args.every and it != args.steps:
            continue
        evals[it], secs = evaluate()
        row = {"step": it, "eval_seconds": secs}
        for o, (scale, _, _) in OUTCOMES.items():
            for split in ("valid", "test"):
                v, v0 = evals[it][o][split], evals[0][o][split]
                d = v - v0
                groups = [("a", group_a), ("b", group_b)]
                if start_users is not None:
                    groups += [("start", start_users), ("a_rest", rest_a)]
                for g, idx in groups:
                    row[f"{o}_{split}_{g}"] = scale * float(v[:, idx].mean())
                    m, se = change(d, idx)
                    row[f"{o}_{split}_{g}_change"], row[f"{o}_{split}_{g}_change_se"] = scale * m, scale * se
                m, se = contrast(d, group_a, group_b)
                row[f"{o}_{split}_contrast"], row[f"{o}_{split}_contrast_se"] = scale * m, scale * se
        rows.append(row)
        if args.json:  # after each evaluation: a run cut off keeps what it measured
            save(rows)
        console.print(f"step {it}: HR@10 valid A {row['hr10_valid_a']:.2f} B {row['hr10_valid_b']:.2f}, test A "
                      f"{row['hr10_test_a']:.2f} B {row['hr10_test_b']:.2f}; teacher CE valid A "
                      f"{row['teacher_ce_valid_a']:.3f} B {row['teacher_ce_valid_b']:.3f} ({secs:.0f} s; "
                      f"{statistics.median(step_seconds) if step_seconds else 0:.1f} s/step)", highlight=False)

    for o, (scale, unit, what) in OUTCOMES.items():
        table = Table(title=f"{what} ({unit}) on the users in the outer loss (A, {len(group_a)}) and held out of it "
                            f"(B, {len(group_b)}); change since step 0, paired ± SE")
        for col in ("step", "valid A", "valid B", "Δ valid A", "Δ valid B", "A − B (valid)",
                    "test A", "test B", "Δ test A", "Δ test B", "A − B (test)"):
            table.add_column(col, justify="right")
        digits = 2 if scale == 100 else 3
        for r in rows:
            def pm(k):
                return f"{r[k]:+.{digits}f} ± {r[k + '_se']:.{digits}f}"
            table.add_row(str(r["step"]), *(f"{r[f'{o}_{sp}_{g}']:.{digits}f}" for sp, g in (("valid", "a"), ("valid", "b"))),
                          pm(f"{o}_valid_a_change"), pm(f"{o}_valid_b_change"), pm(f"{o}_valid_contrast"),
                          *(f"{r[f'{o}_test_{g}']:.{digits}f}" for g in "ab"),
                          pm(f"{o}_test_a_change"), pm(f"{o}_test_b_change"), pm(f"{o}_test_contrast"))
        console.print(table)
    last = rows[-1]
    for o, (_, unit, what) in OUTCOMES.items():
        m, se = last[f"{o}_valid_contrast"], last[f"{o}_valid_contrast_se"]
        console.print(f"At step {last['step']}, {what}: validation changed {m:+.3g} ± {se:.2g} {unit} more on the outer "
                      f"loss's users than on the held-out ones (z {m / se if se > 0 else math.nan:+.1f}); test "
                      f"{last[f'{o}_test_contrast']:+.3g} ± {last[f'{o}_test_contrast_se']:.2g}.", highlight=False)
    if start_users is not None:
        pm = {k: f"{last[f'hr10_valid_{k}_change']:+.2f} ± {last[f'hr10_valid_{k}_change_se']:.2f}"
              for k in ("start", "a_rest", "b")}
        console.print(f"Validation HR@10 change at step {last['step']} of the {len(start_users)} users of A whose rows "
                      f"the start read: {pm['start']} points; A's other {len(rest_a)}: {pm['a_rest']}; B: {pm['b']}.",
                      highlight=False)
    print_load(console, load_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
