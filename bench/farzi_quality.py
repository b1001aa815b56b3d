"""Farzi data quality: downstream metrics of models trained on mu Farzi sequences, on mu random real
sequences and on the full data (ML-100k: HR@10, NDCG@10; PTB: perplexity).

Per dataset (``--datasets``, default ``ml-100k,ptb``):

1. *experts*: ``--experts`` models trained on the full real training data with
   :func:`algorithms.seqtrain.train_seq_model` (Adam, ``--expert-epochs``, ``--expert-lr``); their
   per-epoch parameters are the trajectories Farzi samples theta_0 from, and the mean of their final
   test metrics is the *full-data* result;
2. per budget mu (``--budgets``, default 10 and 50):

   * *random*: mu real training sequences drawn at random (hard ids; seeded by ``--seed`` and mu);
   * *farzi*: :class:`algorithms.farzi.FarziDistiller` for ``--iterations`` outer steps, then its
     soft sequences (``distiller.synthetic().probs()``, ``[mu, xi, V]``);

   both evaluated by :func:`algorithms.seqtrain.evaluate_sequences` with the same training config,
   the same ``--eval-networks`` network seeds (``seed·1000 + 17, +1, ...``, dropout masks seeded
   too) and the same test data.

``% of full`` is metric ÷ full-data metric × 100 for HR@10, NDCG@10 and token accuracy, and
full ppl ÷ ppl × 100 for perplexity (lower is better). Recommendation metrics rank the held-out
test item against all items (seen items masked; ``algorithms.seqtrain``). A *reference* row needs
no training: item popularity in the training sequences (ML-100k) or the training unigram
distribution (PTB, add-one smoothed), scored the same way. ``--max-len`` (20) is the model's
``max_len``, the real sequences' length (ML-100k: each user's last ``max_len`` training items,
left-padded; PTB: non-overlapping chunks) and the synthetic length xi: a model trained on
length-xi sequences only learns positions ``0..xi-1`` and is tested on inputs of that length.
PTB's perplexity is taken on the first ``--lm-test-chunks`` (1000, i.e. 20k tokens) test chunks,
the same for every row (0: all 4121; each evaluation of the whole test split takes 15-40 s here).

Evaluation protocol: the inner loop's training, from a fresh initialisation: Adam at the inner lr
(``--eval-lr``), batches of the inner batch size, for T steps (``ceil(T · batch / mu)`` epochs;
``--eval-epochs`` overrides), with the model's dropout (0.2; the inner loop runs without). Random
real sequences get exactly the same optimiser, steps and networks.

Defaults (CPU, 2 shared cores; what led to them is in ``TRIED``, printed by ``--tried``):

* model: SASRec-style / causal Transformer LM (``algorithms.seqmodels``), dim 32, 2 blocks,
  2 heads, dropout 0.2, max_len 20;
* experts: Adam lr 3e-3, batch 128; ML-100k 2 × 30 epochs; PTB 1 × 1 epoch (about 4 minutes);
* Farzi: T = 10 inner Adam steps at lr 1e-2 with eps 1e-6 (see ``TRIED``), temperature 1, latent
  dim 16, real batch 128, reverse-mode meta-gradient (float32 model, float64 Adam state);
  ML-100k: theta_0 from expert epochs 0..2, outer Adam lr 0.01, the whole synthetic set in every
  inner step, 60 iterations per budget; PTB (vocabulary 10,000: a mu=50 iteration on all 50
  sequences takes about 20 s): theta_0 = the expert's initialisation (epoch 0: 10 steps at lr 1e-2
  on near-uniform soft data wreck the 1-epoch expert, outer loss 7.3-9 against its 5.6), outer lr
  0.03 (0.01 leaves the 10,000-way distributions near uniform after 30 iterations), 10 sequences
  per inner step, 30 iterations per budget;
* 5 evaluation networks.

``--quick`` (under 3 minutes on 2 CPU cores): ML-100k only, mu = 10, 1 expert × 12 epochs,
30 Farzi iterations. The defaults take about 15-20 minutes on one thread (PTB about 10 of them).

    python bench/farzi_quality.py --quick --json /tmp/bench_farzi_quality.json
    python bench/farzi_quality.py --datasets ml-100k --json /tmp/bench_farzi_quality.json
    python bench/farzi_quality.py --datasets ml-100k,ptb --device cuda
"""
from __future__ import annotations

import math
import os
import sys
import time
from types import SimpleNamespace

import torch
from common import (  # bench/common.py: run as a script, this folder is first on sys.path
    bench_console,
    bench_parser,
    machine_info,
    print_load,
    quick_defaults,
    shared_data,
    write_results,
)
from rich.console import Console
from rich.table import Table

from algorithms.farzi import GRAD_MODES, FarziConfig, FarziDistiller
from algorithms.seqmodels import seeded_seq_model
from algorithms.seqtrain import (
    SeqTask,
    SeqTrainConfig,
    evaluate_sequences,
    hr_ndcg,
    rank_of_targets,
    task_metrics,
    train_seq_model,
)
from orchestrator.sequences import load_sequences, seq_task

DATASETS = ("ml-100k", "ptb")
# per-dataset defaults of the options left unset: (with --quick, without)
DATASET_DEFAULTS = {
    "ml-100k": {"expert_epochs": (12, 30), "experts": (1, 2), "iterations": (30, 60), "inner_batch": (0, 0),
                "outer_lr": (0.01, 0.01), "max_start_epoch": (2, 2)},
    "ptb": {"expert_epochs": (1, 1), "experts": (1, 1), "iterations": (10, 30), "inner_batch": (10, 10),
            "outer_lr": (0.03, 0.03), "max_start_epoch": (0, 0)},
}
# what was tried while choosing the defaults (ML-100k unless said otherwise: mu = 10, dim 32, max_len 20,
# reverse mode; HR@10 of 2-5 evaluation networks; full data 0.11-0.13, item popularity 0.054, random 10 users
# 0.015-0.023)
TRIED = [
    "expert/full data: max_len 50, dim 64, lr 1e-3: HR@10 0.166 after 50 epochs at 5 s/epoch; max_len 20, dim 32,"
    " lr 3e-3: 0.13 after 30 epochs at 1 s/epoch (chosen: 5x cheaper everywhere)",
    "T=20, inner lr 1e-2, temperature 0.5, outer lr 0.03, 40 it: outer loss rises 7.6 -> 8.2, entropy collapses"
    " (5.6 -> 1.8 nats), |meta-grad| spikes to 1e2; HR@10 0.009 (below random 0.021)",
    "same with inner eps 1e-5: HR@10 0.014; T=20, inner lr 1e-2, temperature 1, outer lr 0.01: 0.054 at 40 it,"
    " 0.033 at 60 it (run-to-run noise of +-0.01-0.02 with 2 networks; dropout was then unseeded)",
    "inner lr 3e-3 (T=20, temperature 1, outer lr 0.01): 0.031; inner lr 3e-2 (T=10, outer 0.03): 0.007;"
    " max_start_epoch 0 (theta_0 always the initialisation): 0.014",
    "the meta-gradient is right (reverse = unrolled to 1e-5 at T=20) and sign steps of 1e-3..3e-2 along it"
    " lower the outer loss of the same problem; but 2% of the inner gradient's coordinates are below 1e-6 at"
    " initialisation, where Adam's update g/(|g|+eps) is most sensitive: heavy-tailed meta-gradients",
    "held-out outer loss (fixed theta_0 at epochs 0-2, 256 fixed real sequences) over 60 iterations, T=10:"
    " eps 1e-8, outer 0.01: 7.45 -> 7.18 (it 45) -> 7.24; eps 1e-6, outer 0.03: 6.95 at it 15, then entropy"
    " collapse and 7.7 at it 60; temperature 2, outer 0.03: 7.14 at it 45, 7.21 at 60; eps 1e-6, outer 0.02:"
    " 6.93 at it 30, 7.2 at 60; eps 1e-6, outer 0.01: 7.26, 7.14, 7.09, 6.99 at it 15..60 (chosen: steady);"
    " same with T=20: 7.06 at it 60 (slower per iteration, no better)",
    "evaluation of the chosen set (60 it) against random, 5 networks, lr 1e-2: 10 epochs (= T) 0.040 vs 0.021,"
    " 20 epochs 0.036 vs 0.023, 40 epochs 0.030 vs 0.021; without dropout 0.041/0.034/0.031 vs 0.015-0.020;"
    " lr 3e-3 x 20 epochs 0.039 vs 0.017 (chosen: the inner loop's T steps at the inner lr, with dropout)",
    "PTB (1000 test chunks), first defaults (outer lr 0.01, theta_0 from expert epochs 0..1, 30 it): ppl mu 10"
    " Farzi 2922 vs random 5560, mu 50 Farzi 4366 vs random 1436 (outer loss 7.3-9.1 from the 1-epoch expert's"
    " ~5.6; entropy 8.7 -> 8.3 nats, near uniform over 10,000 words)",
    "PTB reference for this evaluation (10 Adam steps at 1e-2 from scratch, 3 networks): 10 copies of the"
    " training unigram distribution as soft sequences: ppl 1139; 10 random chunks: 5577",
    "PTB mu 10, theta_0 = initialisation, outer lr 0.03, 30 it: ppl 2208 (it 10), 982 (it 20), 894 (it 30),"
    " entropy 8.7 -> 4.7 nats (chosen)",
]


# -- data, experts --------------------------------------------------------------------------------
def load_task(name: str, root: str | None, max_len: int) -> SeqTask:
    return seq_task(load_sequences(name, root or shared_data(name)), max_len)


def train_experts(spec: dict, task: SeqTask, cfg: SeqTrainConfig, n: int, seed: int, device: str,
                  console: Console) -> tuple[list[torch.Tensor], dict]:
    """``n`` experts on the full training data: their trajectories ``[epochs+1, P]`` and the mean
    (and per-expert) final test metrics: the full-data result."""
    trajectories, runs = [], []
    for i in range(n):
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # dropout masks come from the global RNG
            torch.manual_seed(seed * 1_000_003 + i)
            ckpts = list(train_seq_model(spec, task, task.train, cfg, seed * 1_000_003 + i, device))
        trajectories.append(torch.stack([c.params for c in ckpts]))
        model = seeded_seq_model(spec, task.vocab_size, task.pad_id, 0).to(device)
        m = task_metrics(model, ckpts[-1].params.to(device), task)
        runs.append(m)
        console.print(f"  expert {i}: {cfg.epochs} epochs in {time.perf_counter() - t0:.0f} s, train loss "
                      f"{ckpts[-1].train_loss:.3f}, " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
    mean = {k: sum(r[k] for r in runs) / n for k in runs[0]}
    return trajectories, {"metrics": mean, "per_expert": runs}


# -- one budget -----------------------------------------------------------------------------------
def random_subset(task: SeqTask, mu: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 7919 + mu)
    return task.train[torch.randperm(len(task.train), generator=gen)[:mu]]


def evaluate(spec: dict, task: SeqTask, data: torch.Tensor, cfg: SeqTrainConfig, networks: int, seed: int,
             device: str):
    """:func:`evaluate_sequences` with the global RNG (dropout masks) seeded too: ``train_seq_model``
    seeds the initialisation and the batch order but not dropout, so without this the result depends
    on what ran before in the process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return evaluate_sequences(spec, task, data, cfg, networks, seed, device)


def distil(spec: dict, task: SeqTask, trajectories, mu: int, args, device: str, console: Console,
           evaluate_at=None) -> tuple[torch.Tensor, dict]:
    """``args.iterations`` Farzi steps (``args``: the dataset's resolved settings); ``evaluate_at(probs)``
    (if given) every ``args.eval_every`` iterations."""
    cfg = FarziConfig(budget=mu, seq_len=args.max_len, latent_dim=args.latent_dim, temperature=args.temperature,
                      inner_steps=args.inner_steps, inner_lr=args.inner_lr, inner_batch=args.inner_batch,
                      eps=args.inner_eps, outer_lr=args.outer_lr, real_batch=args.real_batch,
                      max_start_epoch=max(0, min(args.max_start_epoch, len(trajectories[0]) - 1)),
                      grad_mode=args.grad_mode, checkpoint_every=args.checkpoint_every)
    model = seeded_seq_model(spec, task.vocab_size, task.pad_id, args.seed)
    dist = FarziDistiller(model, trajectories, task.train, task.vocab_size, task.pad_id, cfg,
                          seed=args.seed * 7919 + mu, device=device)
    log, curve, eval_s = [], [], 0.0
    t0 = time.perf_counter()
    for it in range(1, args.iterations + 1):
        m = dist.step()
        log.append({"iteration": it, **m})
        if evaluate_at is not None and args.eval_every and it % args.eval_every == 0 and it < args.iterations:
            t1 = time.perf_counter()
            metrics = evaluate_at(dist.synthetic().probs().detach().cpu())
            eval_s += time.perf_counter() - t1
            curve.append({"iteration": it, **metrics})
            console.print(f"    farzi mu {mu} it {it:4d}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if it == 1 or it % max(1, args.iterations // 5) == 0 or it == args.iterations:
            console.print(f"    farzi mu {mu} it {it:4d}: outer loss {m['loss']:.4f}, inner {m['inner_loss_first']:.3f}"
                          f" -> {m['inner_loss_last']:.3f}, |g| {m['grad_norm']:.2e}, entropy {m['entropy']:.2f}, "
                          f"{time.perf_counter() - t0 - eval_s:.0f} s")
    seconds = time.perf_counter() - t0 - eval_s
    return dist.synthetic().probs().detach().cpu(), {
        "config": cfg.to_dict(), "seconds": seconds, "sec_per_iter": seconds / args.iterations,
        "first_loss": log[0]["loss"], "last_losses": [r["loss"] for r in log[-5:]], "curve": curve, "log": log}


def pct_of_full(metrics: dict, full: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        if k == "ppl":
            out[k] = 100 * full[k] / v
        elif full.get(k):
            out[k] = 100 * v / full[k]
    return out


def reference_metrics(task: SeqTask) -> dict[str, float]:
    """No training: item popularity (recommendation) or the add-one unigram model (LM) of the training
    sequences, scored like a model."""
    counts = torch.bincount(task.train.flatten(), minlength=task.vocab_size).double()
    if task.kind == "recommendation":
        ranks = []
        for i in range(0, len(task.test_inputs), 256):
            tgt = task.test_targets[i : i + 256]
            scores = counts.repeat(len(tgt), 1)
            scores[:, task.pad_id] = -math.inf
            for r, seen in enumerate(task.test_seen[i : i + 256]):
                scores[r, seen[seen != tgt[r]]] = -math.inf
            ranks.append(rank_of_targets(scores, tgt))
        hr, ndcg = hr_ndcg(torch.cat(ranks), task.k)
        return {"hr10": hr, "ndcg10": ndcg}
    logp = ((counts + 1) / (counts + 1).sum()).log()
    tgt = task.test_inputs[:, 1:]  # as lm_metrics: every position but the first is a target
    return {"ppl": math.exp(-float(logp[tgt].mean())), "token_acc": float((tgt == counts.argmax()).double().mean())}


def resolve(name: str, args) -> SimpleNamespace:
    """The settings of one dataset: the command line, else the dataset's defaults."""
    st = SimpleNamespace(**vars(args))
    for k, (quick, full) in DATASET_DEFAULTS[name].items():
        if getattr(st, k) is None:
            setattr(st, k, quick if args.quick else full)
    return st


def eval_config(st: SimpleNamespace, mu: int) -> SeqTrainConfig:
    """The inner loop's schedule from a fresh initialisation: T steps of Adam at the inner lr on
    batches of the inner batch size (whole epochs, rounded up)."""
    batch = st.inner_batch if 0 < st.inner_batch < mu else mu
    epochs = st.eval_epochs or math.ceil(st.inner_steps * batch / mu)
    return SeqTrainConfig(epochs=epochs, lr=st.eval_lr or st.inner_lr, batch_size=batch)


def run_dataset(name: str, args, console: Console) -> dict:
    st = resolve(name, args)
    device = st.device
    task = load_task(name, st.ml100k_root if name == "ml-100k" else st.ptb_root, st.max_len)
    if task.kind == "language_model" and st.lm_test_chunks:
        task.test_inputs = task.test_inputs[: st.lm_test_chunks]
    spec = {"name": "sasrec" if task.kind == "recommendation" else "transformer_lm", "dim": st.dim,
            "blocks": st.blocks, "heads": st.heads, "max_len": st.max_len, "dropout": st.dropout}
    console.print(f"[bold]{name}[/bold]: {len(task.train)} training sequences of {st.max_len}, "
                  f"{len(task.test_inputs)} test {'users' if task.kind == 'recommendation' else 'chunks'}, "
                  f"vocab {task.vocab_size}, model {spec}")
    t0 = time.perf_counter()
    reference = reference_metrics(task)
    ecfg = SeqTrainConfig(epochs=st.expert_epochs, lr=st.expert_lr, batch_size=128)
    trajectories, full = train_experts(spec, task, ecfg, st.experts, st.seed, device, console)
    expert_s = time.perf_counter() - t0
    eval_seed = st.seed * 1000 + 17
    results = {"full": {**full, "pct_of_full": pct_of_full(full["metrics"], full["metrics"]),
                        "expert_config": ecfg.to_dict(), "seconds": expert_s},
               "reference": {"metrics": reference, "pct_of_full": pct_of_full(reference, full["metrics"]),
                             "what": "item popularity" if task.kind == "recommendation" else "unigram (add-one)"},
               "random": {}, "farzi": {}}
    console.print("  reference: " + ", ".join(f"{k} {v:.4f}" for k, v in reference.items()))
    for mu in st.budgets:
        cfg = eval_config(st, mu)
        t1 = time.perf_counter()
        ev = evaluate(spec, task, random_subset(task, mu, st.seed), cfg, st.eval_networks, eval_seed, device)
        results["random"][str(mu)] = {"metrics": ev.metrics, "std": ev.std, "per_network": ev.per_network,
                                      "pct_of_full": pct_of_full(ev.metrics, full["metrics"]),
                                      "eval_config": cfg.to_dict(), "eval_seconds": time.perf_counter() - t1}
        console.print(f"  random mu {mu}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.metrics.items()))
        probs, info = distil(spec, task, trajectories, mu, st, device, console,
                             lambda p: evaluate(spec, task, p, cfg, st.eval_networks, eval_seed, device).metrics)
        t1 = time.perf_counter()
        ev = evaluate(spec, task, probs, cfg, st.eval_networks, eval_seed, device)
        entropy = float(-(probs * probs.clamp_min(1e-30).log()).sum(-1).mean())
        results["farzi"][str(mu)] = {"metrics": ev.metrics, "std": ev.std, "per_network": ev.per_network,
                                     "pct_of_full": pct_of_full(ev.metrics, full["metrics"]),
                                     "eval_config": cfg.to_dict(), "eval_seconds": time.perf_counter() - t1,
                                     "entropy": entropy, **info}
        console.print(f"  farzi  mu {mu}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.metrics.items()))
    settings = {k: getattr(st, k) for k in ("max_len", "dim", "blocks", "heads", "dropout", "experts",
                                             "expert_epochs", "expert_lr", "iterations", "inner_steps", "inner_lr",
                                             "inner_eps", "inner_batch", "outer_lr", "temperature", "latent_dim",
                                             "real_batch", "max_start_epoch", "grad_mode", "checkpoint_every",
                                             "eval_networks", "lm_test_chunks")}
    return {"dataset": name, "kind": task.kind, "model": spec, "train_sequences": len(task.train),
            "test_inputs": len(task.test_inputs), "vocab_size": task.vocab_size, "settings": settings,
            "eval_networks": st.eval_networks, "eval_seed": eval_seed, "seconds": time.perf_counter() - t0,
            **results}


# -- output ---------------------------------------------------------------------------------------
def fmt_metric(r: dict, k: str) -> str:
    v, s = r["metrics"].get(k), (r.get("std") or {}).get(k)
    if v is None:
        return "—"
    spec = ".1f" if k == "ppl" else ".4f"
    return format(v, spec) + ("" if s is None else f" ± {format(s, spec)}")


def print_table(console: Console, out: list[dict], budgets: list[int]) -> None:
    for d in out:
        keys = ("hr10", "ndcg10") if d["kind"] == "recommendation" else ("ppl", "token_acc")
        ev = {d[m][str(mu)]["eval_config"]["epochs"] for m in ("random", "farzi") for mu in budgets}
        st = d["settings"]
        table = Table(title=f"{d['dataset']}: models trained on each set ({d['eval_networks']} networks, mean ± std; "
                            f"Adam lr {st['inner_lr']:g}, T = {st['inner_steps']} steps "
                            f"({'/'.join(map(str, sorted(ev)))} epochs); full = {st['experts']} expert(s) × "
                            f"{st['expert_epochs']} epochs; Farzi {st['iterations']} iterations)")
        for c in ["method", "mu", *keys, *(f"% of full {k}" for k in keys), "distil s"]:
            table.add_column(c, justify="right")
        table.add_row("full data", str(d["train_sequences"]), *(fmt_metric(d["full"], k) for k in keys),
                      *("100.0" for _ in keys), "—")
        ref = d["reference"]
        table.add_row(f"reference: {ref['what']}", "—", *(fmt_metric(ref, k) for k in keys),
                      *(f"{ref['pct_of_full'][k]:.1f}" for k in keys), "—")
        for mu in budgets:
            table.add_section()
            for method in ("random", "farzi"):
                r = d[method][str(mu)]
                table.add_row(method, str(mu), *(fmt_metric(r, k) for k in keys),
                              *(f"{r['pct_of_full'][k]:.1f}" for k in keys),
                              f"{r['seconds']:.0f}" if "seconds" in r else "—")
        console.print(table)


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__, "ML-100k only, mu=10, 1 expert x 12 epochs, 30 iterations (under 3 minutes)")
    ap.add_argument("--datasets", default=None, help="comma-separated: ml-100k, ptb (default both; --quick ml-100k)")
    ap.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="mu values, comma-separated (default 10,50; --quick 10)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--ml100k-root", default=None, help=f"default {shared_data('ml-100k')}")
    ap.add_argument("--ptb-root", default=None, help=f"default {shared_data('ptb')}")
    g = ap.add_argument_group("model and experts")
    g.add_argument("--max-len", type=int, default=20, help="model max_len = sequence length = xi (default 20)")
    g.add_argument("--dim", type=int, default=32)
    g.add_argument("--blocks", type=int, default=2)
    g.add_argument("--heads", type=int, default=2)
    g.add_argument("--dropout", type=float, default=0.2)
    g.add_argument("--experts", type=int, default=None, help="experts per dataset (default: ml-100k 2, ptb 1; "
                   "--quick 1)")
    g.add_argument("--expert-epochs", type=int, default=None, help="default: ml-100k 30 (--quick 12), ptb 1")
    g.add_argument("--expert-lr", type=float, default=3e-3)
    g = ap.add_argument_group("Farzi")
    g.add_argument("--iterations", type=int, default=None,
                   help="outer steps per budget (default: ml-100k 60, ptb 30; --quick 30)")
    g.add_argument("--inner-steps", type=int, default=10, help="T (default 10)")
    g.add_argument("--inner-lr", type=float, default=1e-2)
    g.add_argument("--inner-eps", type=float, default=1e-6, help="the inner Adam's eps (default 1e-6)")
    g.add_argument("--inner-batch", type=int, default=None,
                   help="synthetic sequences per inner step (0: all; default: ml-100k 0, ptb 10)")
    g.add_argument("--outer-lr", type=float, default=None, help="default: ml-100k 0.01, ptb 0.03")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--latent-dim", type=int, default=16)
    g.add_argument("--real-batch", type=int, default=128)
    g.add_argument("--max-start-epoch", type=int, default=None,
                   help="theta_0 from expert epochs 0..N (default: ml-100k 2, ptb 0)")
    g.add_argument("--grad-mode", choices=GRAD_MODES, default="reverse")
    g.add_argument("--checkpoint-every", type=int, default=0)
    g = ap.add_argument_group("evaluation (random and Farzi alike)")
    g.add_argument("--eval-epochs", type=int, default=None, help="default: T steps (ceil(T * batch / mu) epochs)")
    g.add_argument("--eval-lr", type=float, default=None, help="default: --inner-lr")
    g.add_argument("--eval-networks", type=int, default=5)
    g.add_argument("--eval-every", type=int, default=0,
                   help="also evaluate Farzi every N iterations (default 0: only at the end)")
    g.add_argument("--lm-test-chunks", type=int, default=1000,
                   help="PTB: perplexity on the first N test chunks (default 1000; 0: all)")
    ap.add_argument("--tried", action="store_true", help="print what was tried while choosing the defaults, and exit")
    args = ap.parse_args(argv)
    if args.tried:
        print("\n".join(TRIED))
        return 0
    load_start = os.getloadavg()
    quick_defaults(args, datasets=("ml-100k", ",".join(DATASETS)), budgets=([10], [10, 50]))
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    for d in datasets:
        if d not in DATASETS:
            ap.error(f"--datasets: unknown {d!r} (known: {', '.join(DATASETS)})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available here")
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    console = bench_console(140)
    t0 = time.perf_counter()
    out = [run_dataset(d, args, console) for d in datasets]
    wall = time.perf_counter() - t0
    print_table(console, out, args.budgets)
    for d in out:
        key = "hr10" if d["kind"] == "recommendation" else "ppl"
        for mu in args.budgets:
            f, r = d["farzi"][str(mu)]["pct_of_full"][key], d["random"][str(mu)]["pct_of_full"][key]
            console.print(f"{d['dataset']} mu {mu}: Farzi {'beats' if f > r else 'does not beat'} random on {key} "
                          f"({f:.1f}% vs {r:.1f}% of full)")
    console.print(f"wall time {wall:.0f} s")
    print_load(console, load_start)
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ("json", "tried")}
        write_results(console, args.json, "farzi_quality", machine_info(args.device, load_start, gpu=True), config,
                      wall_s=wall, datasets={d["dataset"]: d for d in out},
                      rows=[{"dataset": d["dataset"], "method": m, "mu": None if mu is None else int(mu),
                             "metrics": r["metrics"], "pct_of_full": r["pct_of_full"]}
                            for d in out for m in ("full", "reference", "random", "farzi")
                            for mu, r in ([(None, d[m])] if m in ("full", "reference") else d[m].items())])
    return 0


if __name__ == "__main__":
    sys.exit(main())
