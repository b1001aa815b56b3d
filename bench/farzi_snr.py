"""How much of Farzi's meta-gradient is shared between the problems an outer step averages, and so
how many problems (theta_0, real batch) one outer step would need before its direction is signal.

Farzi's outer step follows the meta-gradient of one sampled problem (``theta_samples`` of them,
averaged). What the outer loop can learn is the part of that gradient common to all problems, the
mean mu over theta_0 and real batches; the rest is noise with covariance Sigma. For unit-length
gradients (what norm clipping and Adam respond to) the mean pairwise cosine c between independent
problems estimates |mu|^2 without bias, and averaging K problems gives a direction whose signal
equals its noise at K* = (1 - c) / c. This script draws N problems per source of theta_0 at the
spec's settings (or variants of them, one factor at a time), computes their exact meta-gradients
and prints c with its standard error, K*, and how far the norms spread. Sources:

- ``init``: a fresh random network per problem (what evaluation trains from);
- ``epoch:E``: expert k's epoch E for k = 0..N-1 (needs ``--root`` with the spec's experts);
- ``same``: one fixed fresh network, different real batches (the real batch's share of the noise).

``--vary objective=match`` measures MTT's objective in Farzi's parameterisation (the distance to the
expert's checkpoint ``expert_epochs`` later) from ``epoch:E`` sources.

    python bench/farzi_snr.py [--spec SPEC] [--root RUNS] [--sources init,same,epoch:1]
                              [--vary eps=1e-8,1e-4 --vary latent_dim=16] [--problems N] [--quick] [--json PATH]
"""
from __future__ import annotations

import itertools
import math
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


def coherence(grads: list[torch.Tensor]) -> dict:
    """Shared direction of ``grads`` (independent draws of one random gradient): the mean pairwise
    cosine ``c`` (the unbiased estimate of |mu|^2 for the unit-normalised gradients) with its
    standard error over the pairs, ``k_star`` = (1 - c) / c problems to average for signal = noise
    (inf when c <= 0: no shared component measurable), and the spread of the raw norms."""
    if len(grads) < 2:
        raise ValueError("coherence needs at least 2 gradients")
    G = torch.stack([g.double().flatten() for g in grads])
    norms = G.norm(dim=1)
    U = G / norms.clamp_min(1e-300)[:, None]
    cos = torch.tensor([float(U[i] @ U[j]) for i, j in itertools.combinations(range(len(G)), 2)], dtype=torch.float64)
    c = float(cos.mean())
    se = float(cos.std() / math.sqrt(len(cos))) if len(cos) > 1 else float("nan")
    return {"problems": len(G), "pairs": len(cos), "cos_mean": c, "cos_se": se, "cos_min": float(cos.min()),
            "cos_max": float(cos.max()), "k_star": (1 - c) / c if c > 0 else math.inf,
            "norm_median": float(norms.median()), "norm_max_over_min": float(norms.max() / norms.min().clamp_min(1e-300))}


def parse_args():
    ap = bench_parser(__doc__, "T = 5 inner steps, 4 problems per source, real batch 32, sources init and same")
    ap.add_argument("--spec", default=str(SPEC), help="a Farzi spec (default: the ML-100k reference)")
    ap.add_argument("--root", default=None, help="the root whose store holds the spec's experts (epoch:E sources)")
    ap.add_argument("--sources", default=None, help="theta_0 sources: init, same, epoch:E (comma-separated)")
    ap.add_argument("--problems", type=int, default=None, help="problems per source (default 12; --quick 4)")
    ap.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                    help="a hyperparameter to vary from the spec's value, one factor at a time (repeatable)")
    return ap.parse_args()


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main() -> None:
    args = parse_args()
    load_start = os.getloadavg()
    from algorithms.farzi import FarziConfig, FarziDistiller, PRECISIONS, meta_gradient
    from algorithms.networks import flatten_params
    from algorithms.seqmodels import seeded_seq_model
    from orchestrator.evaluate import stored_experts
    from orchestrator.sequences import load_sequences, seq_task
    from orchestrator.spec import load_spec
    from orchestrator.store import open_trajectory
    from orchestrator.tracking import workspace

    quick_defaults(args, sources=("init,same", "init,same"), problems=(4, 12))
    spec = load_spec(args.spec)
    (_, algo), = spec.algorithms.items()
    base = {**algo["hyperparameters"], "budget": algo["budgets"][0]}
    base.pop("theta_samples", None)
    if args.quick:
        base.update(inner_steps=5, real_batch=32)
    variants = [("spec", {})]
    for item in args.vary:
        key, _, values = item.partition("=")
        if not values:
            sys.exit(f"--vary {item}: expected KEY=V1,V2")
        variants += [(f"{key}={v}", {key: _value(v)}) for v in values.split(",")]
    sources = args.sources.split(",")

    data = load_sequences(spec.dataset["name"], spec.dataset.get("root") or shared_data(spec.dataset["name"]))
    task = seq_task(data, spec.model["max_len"])
    V, pad = task.vocab_size, task.pad_id
    experts = []
    if any(s.startswith("epoch:") for s in sources):
        if not args.root:
            sys.exit("epoch:E sources need --root with the spec's experts")
        found, where = stored_experts(spec, data, workspace(args.root).trajectories)
        if not found:
            sys.exit(f"no experts of {args.spec}: {where} (train them with orchestrate launch {args.spec} --root {args.root})")
        experts = [open_trajectory(p).params for _, p, _ in found]

    torch.set_num_threads(1)
    console = bench_console(160)
    template = seeded_seq_model(spec.model, V, pad, 0)
    rows = []
    for label, change in variants:
        hp = {**base, **change}
        cfg = FarziConfig(**{k: v for k, v in hp.items() if k in FarziConfig.__dataclass_fields__})
        for source in sources:
            n = args.problems
            if source.startswith("epoch:"):
                epoch = int(source.split(":")[1])
                n = min(n, len(experts))
                thetas = [experts[k][epoch] for k in range(n)]
            elif source == "init":
                thetas = [flatten_params(seeded_seq_model(spec.model, V, pad, 1000 + i)) for i in range(n)]
            elif source == "same":
                thetas = [flatten_params(seeded_seq_model(spec.model, V, pad, 1000))] * n
            else:
                sys.exit(f"--sources: unknown source {source!r} (init, same, epoch:E)")
            if cfg.objective == "match" and not source.startswith("epoch:"):
                sys.exit(f"{label}: objective match needs epoch:E sources (its target is the expert's checkpoint)")
            # one distiller per (variant, source): the same start (F, M) and the same real batches
            d = FarziDistiller(template, experts if experts else [thetas[0][None]], task.train, V, pad, cfg, seed=0,
                               iterations=algo["iterations"])
            grads, losses, t0 = [], [], time.perf_counter()
            for k, theta in enumerate(thetas):
                if source.startswith("epoch:"):  # expert k's epoch E (and, for match, its checkpoint E + expert_epochs)
                    theta0, prob, _ = d.problem(expert=k, start=epoch)
                else:
                    _, prob, _ = d.problem()
                    theta0 = theta.to(d.device, d.dtype)
                res = meta_gradient(cfg.grad_mode, theta0, prob, d.hp, cfg.second_moment,
                                    cfg.checkpoint_every, PRECISIONS[cfg.reverse_precision])
                grads.append(torch.cat([g.double().flatten() for g in res.grads]))
                losses.append(res.outer_loss)
            row = {"variant": label, "source": source, **coherence(grads),
                   "outer_loss_after_T": sum(losses) / len(losses), "seconds_per_problem": (time.perf_counter() - t0) / n}
            rows.append(row)
            console.print(f"  {label:24s} {source:8s} cos {row['cos_mean']:+.4f} ± {row['cos_se']:.4f}  "
                          f"K* {row['k_star']:.3g}  |g| median {row['norm_median']:.3g} (max/min {row['norm_max_over_min']:.3g})  "
                          f"{row['seconds_per_problem']:.1f} s/problem")

    table = Table(title=f"{spec.name}: meta-gradient coherence between problems (T = {base.get('inner_steps')}, "
                        f"{args.problems} problems per source)")
    for col in ("variant", "theta_0", "mean cos ± s.e.", "min .. max", "K* (signal = noise)", "|g| median",
                "|g| max/min", "outer loss after T", "s / problem"):
        table.add_column(col, justify="left" if col in ("variant", "theta_0") else "right")
    for r in rows:
        table.add_row(r["variant"], r["source"], f"{r['cos_mean']:+.4f} ± {r['cos_se']:.4f}",
                      f"{r['cos_min']:+.3f} .. {r['cos_max']:+.3f}",
                      "none measurable" if math.isinf(r["k_star"]) else f"{r['k_star']:.3g}",
                      f"{r['norm_median']:.3g}", f"{r['norm_max_over_min']:.3g}", f"{r['outer_loss_after_T']:.4f}",
                      f"{r['seconds_per_problem']:.1f}")
    console.print(table)
    console.print("K*: problems an outer step must average for its direction to be as much signal as noise "
                  "((1 - c) / c); 'none measurable': the mean cosine is not above 0")
    print_load(console, load_start)
    if args.json:
        write_results(console, args.json, "farzi_snr", machine_info("cpu", load_start),
                      {"spec": args.spec, "problems": args.problems, "sources": sources,
                       "variants": [v for v, _ in variants], "hyperparameters": base},
                      rows=[{**r, "k_star": None if math.isinf(r["k_star"]) else r["k_star"]} for r in rows])


if __name__ == "__main__":
    main()
