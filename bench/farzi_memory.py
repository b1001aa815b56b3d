"""Farzi meta-gradient cost: peak memory and seconds per outer step against the inner steps T.

One outer step is one :func:`algorithms.farzi.meta_gradient` call: the forward inner loop (T Adam
steps of the model on the soft synthetic sequences) and the meta-gradient with respect to the
Farzi data (``F``, ``M``). Two modes are compared on the same problem (same theta_0, synthetic
data and real batch):

* ``reverse``: reverse-mode Adam (Maclaurin et al.'s reversible learning extended to Adam): the
  forward pass keeps only the last state; memory should not grow with T;
* ``unrolled``: autograd through the T unrolled Adam steps (``create_graph``); memory grows
  linearly with T.

Setup (defaults, "SASRec-sized"): vocabulary 1683 (ML-100k's items + padding), SASRec of dim 64,
2 blocks, 2 heads, max_len 50; mu = 50 synthetic sequences of length 50, latent dim 16, the whole
synthetic set in every inner step, a real batch of 128 sequences. No dataset files are read: the
real sequences are random ids (left-padded like ML-100k's histories) and theta_0 is the model's
seeded initialisation; costs do not depend on the values. Model in float32, Adam's state (and its
reversal) in float64, as :class:`algorithms.farzi.FarziConfig` defaults.

Per (mode, T), in a *fresh subprocess* (so that one configuration's heap does not hide the next
one's peak RSS): one warm-up call that also measures memory, then ``--repeats`` timed calls
(median reported). Memory columns:

* ``saved-live MB`` (the JSON's ``peak_mb_*`` on the CPU): the largest total of tensors saved for
  backward that are alive at the same time during the call (``bench/mct_vs_mtt.py``'s
  ``LiveSavedTensors``: a ``saved_tensors_hooks`` pack hook, once per storage, released when the
  graph drops them). This is the autograd memory the two modes differ in; it leaves out the
  parameters, Adam's state and the transient (unsaved) intermediates;
* ``RSS MB``: process peak RSS growth over the warm-up call (``bench/distill.py``'s ``PeakRSS``:
  Linux ``VmHWM`` reset through ``/proc/self/clear_refs``), everything the call allocates;
* with ``--device cuda``: ``torch.cuda.max_memory_allocated`` growth over each timed call (after
  ``reset_peak_memory_stats``, maximum over the repeats) is the JSON's ``peak_mb_*``.

The unrolled graph of the default model takes about 0.15 GB of RSS per inner step (about
15 GB at T=100 and 30 GB at T=200), so an unrolled T whose peak, predicted linearly from the
smaller T already measured, exceeds ``--max-unrolled-gb`` (default: 70% of the memory available
at the start; on CUDA, of the GPU's free memory) is skipped and marked so in the table and JSON.
``rel err`` compares the two modes' meta-gradients (``||g_rev - g_unr|| / ||g_unr||`` over F and
M): the same quantity, computed two ways. Without checkpoints the reversal drifts on long horizons
(measured with the ``--quick`` model: 5e-7 at T=50, 12 at T=75, 57 at T=100, also with a float64
model; ``--checkpoint-every 50`` brings T=100 back to 4e-6, 25 to 1e-7); ``--checkpoint-every K``
keeps ``(theta, m, v)`` every K steps (float64: 24 bytes per parameter each, not autograd memory, so
not in ``saved-live MB``, only in ``RSS MB``).

``--quick`` (under 3 minutes on 2 CPU cores): T = 10, 50, 100; a smaller model (dim 32, mu = 10
sequences of length 20, latent dim 8), 2 timed calls. The defaults (T = 10, 50, 100, 200, 2 timed
calls) take about half an hour on one CPU thread, most of it in reverse mode at T=200 (about
3 minutes per call); ``--device cuda`` is far faster.

    python bench/farzi_memory.py --quick --json /tmp/bench_farzi_memory.json
    python bench/farzi_memory.py --json /tmp/bench_farzi_memory.json
    python bench/farzi_memory.py --device cuda --steps 10 50 100 200 400
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (  # bench/common.py: run as a script, this folder is first on sys.path
    bench_console,
    bench_parser,
    machine_info,
    print_load,
    quick_defaults,
    write_results,
)
from distill import PeakRSS, sync  # bench/distill.py
from mct_vs_mtt import LiveSavedTensors  # bench/mct_vs_mtt.py
from rich.table import Table
from safetensors.torch import load_file, save_file

from algorithms.farzi import PRECISIONS, FarziConfig, FarziDistiller, meta_gradient
from algorithms.networks import flatten_params
from algorithms.seqmodels import seeded_seq_model

MODES = ("reverse", "unrolled")


# -- one (mode, T) in this process ------------------------------------------------------------------
def build_problem(cfg: dict, steps: int, mode: str, device: str):
    """The distiller of the benchmark's setup and one outer step's problem (theta_0, inner batches,
    real batch), the same for both modes (all seeds fixed)."""
    gen = torch.Generator().manual_seed(cfg["seed"])
    vocab, max_len = cfg["vocab"], cfg["max_len"]
    spec = {"name": "sasrec", "dim": cfg["dim"], "blocks": cfg["blocks"], "heads": cfg["heads"], "max_len": max_len}
    model = seeded_seq_model(spec, vocab, 0, cfg["seed"])
    theta = flatten_params(model)
    # random "real" sequences: ids 1..vocab-1, left-padded histories of random length >= 3
    real = torch.randint(1, vocab, (cfg["real_sequences"], max_len), generator=gen)
    lengths = torch.randint(3, max_len + 1, (len(real),), generator=gen)
    real[torch.arange(max_len).view(1, -1) < (max_len - lengths).view(-1, 1)] = 0
    fcfg = FarziConfig(budget=cfg["budget"], seq_len=cfg["seq_len"], latent_dim=cfg["latent_dim"],
                       inner_steps=steps, inner_lr=cfg["inner_lr"], real_batch=cfg["real_batch"],
                       max_start_epoch=1, grad_mode=mode, precision=cfg["precision"],
                       reverse_precision=cfg["reverse_precision"], checkpoint_every=cfg["checkpoint_every"],
                       backward_steps=min(cfg.get("backward_steps", 0), steps))
    dist = FarziDistiller(model, [theta.view(1, -1)], real, vocab, 0, fcfg, seed=cfg["seed"], device=device)
    theta0, prob, _ = dist.problem()
    if cfg.get("decode") == "per-step":  # each step decodes its minibatch anew (before 2026-12-02)
        prob = dataclasses.replace(prob, source=None)
    return dist, theta0, prob, spec, theta.numel()


def run_one(cfg: dict, mode: str, steps: int, device: str, repeats: int, grads_path: str | None) -> dict:
    torch.set_num_threads(max(1, cfg["threads"]))
    dist, theta0, prob, _, params = build_problem(cfg, steps, mode, device)
    fc = dist.cfg

    def call():
        return meta_gradient(mode, theta0, prob, dist.hp, fc.second_moment, fc.checkpoint_every,
                             PRECISIONS[fc.reverse_precision], fc.backward_steps)

    # warm-up: also the memory measurement (the hooks slow it a little; it is not timed)
    sync(device)
    t0 = time.perf_counter()
    with PeakRSS() as rss, LiveSavedTensors() as saved:
        res = call()
    sync(device)
    warmup_s = time.perf_counter() - t0
    times, cuda_peaks = [], []
    for _ in range(repeats):
        if device.startswith("cuda"):
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        sync(device)
        t0 = time.perf_counter()
        res = call()
        sync(device)
        times.append(time.perf_counter() - t0)
        if device.startswith("cuda"):
            cuda_peaks.append((torch.cuda.max_memory_allocated(device) - base) / 2**20)
    if grads_path:
        save_file({f"g{i}": g.detach().cpu().contiguous() for i, g in enumerate(res.grads)}, grads_path)
    gnorm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in res.grads)))
    per_step = None
    if cfg.get("decode") == "both":  # the old way's timed calls, alternating with this way's (one more round each)
        old = dataclasses.replace(prob, source=None)
        both = {"once": [], "per-step": []}
        for r in range(repeats):
            for name, p in (("once", prob), ("per-step", old))[:: 1 if r % 2 else -1]:
                sync(device)
                t0 = time.perf_counter()
                out = meta_gradient(mode, theta0, p, dist.hp, fc.second_moment, fc.checkpoint_every,
                                    PRECISIONS[fc.reverse_precision], fc.backward_steps)
                sync(device)
                both[name].append(time.perf_counter() - t0)
        err = max(float((a - b).norm() / b.norm()) for a, b in zip(res.grads, out.grads))
        per_step = {"times_s": both, "sec_once": statistics.median(both["once"]),
                    "sec_per_step": statistics.median(both["per-step"]), "rel_err": err}
        per_step["ratio"] = per_step["sec_per_step"] / per_step["sec_once"]
    return {"mode": mode, "T": steps, "sec": statistics.median(times), "times_s": times, "warmup_s": warmup_s,
            "decode_ab": per_step,
            "saved_live_mb": saved.peak_bytes / 2**20, "saved_cumulative_mb": saved.bytes / 2**20,
            "rss_growth_mb": rss.mb, "rss_method": rss.method,
            "cuda_peak_mb": max(cuda_peaks) if cuda_peaks else None, "outer_loss": res.outer_loss,
            "inner_loss_first": res.inner_first, "inner_loss_last": res.inner_last, "grad_norm": gnorm,
            "params": params}


def worker(payload: str) -> int:
    job = json.loads(payload)
    out = run_one(job["cfg"], job["mode"], job["T"], job["device"], job["repeats"], job.get("grads"))
    Path(job["out"]).write_text(json.dumps(out))
    return 0


# -- the driver -------------------------------------------------------------------------------------
def run_job(cfg: dict, mode: str, steps: int, args, tmp: Path) -> dict:
    """(mode, T) in a fresh subprocess (or in this process with ``--in-process``)."""
    grads = str(tmp / f"grads-{mode}-{steps}.safetensors")
    if args.in_process:
        r = run_one(cfg, mode, steps, args.device, args.repeats, grads)
    else:
        job = {"cfg": cfg, "mode": mode, "T": steps, "device": args.device, "repeats": args.repeats,
               "grads": grads, "out": str(tmp / f"result-{mode}-{steps}.json")}
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"worker {mode} T={steps} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        r = json.loads(Path(job["out"]).read_text())
    r["grads"] = grads
    return r


def predicted_mb(done: list[dict], steps: int, key: str) -> float | None:
    """Linear prediction of ``key`` at ``steps`` from the two largest T measured (one: through 0)."""
    pts = sorted((r["T"], r[key]) for r in done if r.get(key) is not None)
    if not pts:
        return None
    if len(pts) == 1:
        return pts[0][1] * steps / pts[0][0]
    (t1, m1), (t2, m2) = pts[-2], pts[-1]
    slope = max(0.0, (m2 - m1) / (t2 - t1))
    return m2 + slope * (steps - t2)


def memory_limit_gb(device: str) -> float:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return 0.7 * free / 2**30
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return 0.7 * int(line.split()[1]) / 2**20
    return math.inf


def rel_err(a_path: str, b_path: str) -> float:
    a, b = load_file(a_path), load_file(b_path)
    a, b = [a[k] for k in sorted(a)], [b[k] for k in sorted(b)]
    num = sum(float(((x.double() - y.double()) ** 2).sum()) for x, y in zip(a, b))
    den = sum(float((y.double() ** 2).sum()) for y in b)
    return math.sqrt(num / den) if den > 0 else math.nan


def get(r: dict | None, k: str):
    return None if r is None else r[k]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(x, spec: str = ".1f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1])
    ap = bench_parser(__doc__, "T = 10, 50, 100, a smaller model, 2 timed calls (under 3 minutes)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--steps", type=int, nargs="+", default=None,
                    help="inner steps T (default 10 50 100 200; --quick 10 50 100)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--repeats", type=int, default=None, help="timed calls after 1 warm-up (default 2)")
    ap.add_argument("--vocab", type=int, default=1683, help="vocabulary incl. padding (default 1683, ML-100k)")
    ap.add_argument("--dim", type=int, default=None, help="model dim (default 64; --quick 32)")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--budget", type=int, default=None, help="mu, synthetic sequences (default 50; --quick 10)")
    ap.add_argument("--seq-len", type=int, default=None, help="synthetic length xi = max_len (default 50; --quick 20)")
    ap.add_argument("--latent-dim", type=int, default=None, help="Farzi latent dim (default 16; --quick 8)")
    ap.add_argument("--real-batch", type=int, default=128, help="real sequences in the outer loss (default 128)")
    ap.add_argument("--inner-lr", type=float, default=1e-3)
    ap.add_argument("--precision", choices=sorted(PRECISIONS), default="float32", help="the model's dtype")
    ap.add_argument("--reverse-precision", choices=sorted(PRECISIONS), default="float64",
                    help="Adam's state and its reversal (both modes)")
    ap.add_argument("--checkpoint-every", type=int, default=0,
                    help="reverse mode: keep (theta, m, v) every K inner steps (default 0: never, constant memory)")
    ap.add_argument("--max-unrolled-gb", type=float, default=None,
                    help="skip an unrolled T whose predicted peak exceeds this (default: 70%% of available memory)")
    ap.add_argument("--in-process", action="store_true",
                    help="run every (mode, T) in this process (RSS growth is then hidden by earlier peaks)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1, as a trial with cpus_per_trial: 1)")
    ap.add_argument("--backward-steps", type=int, default=0,
                    help="truncated backward: both modes differentiate only the last W inner steps (min(W, T); "
                         "0: all, the default)")
    ap.add_argument("--decode", choices=("once", "per-step", "both"), default="once",
                    help="decode the synthetic set once per outer step (default, InnerProblem.source) or every "
                         "inner and reverse step anew (as before 2026-12-02): the same meta-gradient; both: then "
                         "--repeats more calls of each, alternating in the same process, and their ratio")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    load_start = os.getloadavg()
    quick_defaults(args, steps=([10, 50, 100], [10, 50, 100, 200]), repeats=(2, 2), dim=(32, 64),
                   budget=(10, 50), seq_len=(20, 50), latent_dim=(8, 16))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available here")
    steps_list = sorted(set(args.steps))
    cuda = args.device.startswith("cuda")
    limit_gb = args.max_unrolled_gb if args.max_unrolled_gb is not None else memory_limit_gb(args.device)
    torch.set_num_threads(max(1, args.threads))
    cfg = {"vocab": args.vocab, "dim": args.dim, "blocks": args.blocks, "heads": args.heads, "max_len": args.seq_len,
           "budget": args.budget, "seq_len": args.seq_len, "latent_dim": args.latent_dim, "real_batch": args.real_batch,
           "real_sequences": max(args.real_batch, 943), "inner_lr": args.inner_lr, "precision": args.precision,
           "reverse_precision": args.reverse_precision, "checkpoint_every": args.checkpoint_every,
           "backward_steps": args.backward_steps, "threads": args.threads, "seed": args.seed, "decode": args.decode}

    console = bench_console(140)
    _, _, _, spec, params = build_problem(cfg, 1, "reverse", "cpu")
    console.print(f"[bold]Farzi meta-gradient[/bold] ({args.device}, {args.threads} thread(s)): model {spec}, "
                  f"vocab {args.vocab}, {params:,} params; mu {args.budget} x xi {args.seq_len}, latent "
                  f"{args.latent_dim}, real batch {args.real_batch}; T {steps_list}"
                  + (f", backward through the last {args.backward_steps} steps" if args.backward_steps else "")
                  + f"; decode {args.decode}; 1 warm-up + {args.repeats} "
                  f"timed calls per (mode, T), each in a fresh process")
    # the unrolled peak key used to predict the next T (the larger of the two CPU measures)
    mem_key = "cuda_peak_mb" if cuda else "rss_growth_mb"
    results: dict[tuple[str, int], dict] = {}
    skipped: dict[tuple[str, int], str] = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="farzi-mem-") as tmpdir:
        tmp = Path(tmpdir)
        for mode in args.modes:
            for steps in steps_list:
                done = [r for (m, _), r in results.items() if m == mode]
                pred = predicted_mb(done, steps, mem_key)
                if mode == "unrolled" and pred is not None and pred / 1024 > limit_gb:
                    skipped[(mode, steps)] = (f"predicted {pred / 1024:.1f} GB > limit {limit_gb:.1f} GB "
                                              f"(--max-unrolled-gb)")
                    console.print(f"  {mode:8s} T={steps:4d}: [yellow]skipped[/yellow], {skipped[(mode, steps)]}")
                    continue
                r = run_job(cfg, mode, steps, args, tmp)
                results[(mode, steps)] = r
                console.print(f"  {mode:8s} T={steps:4d}: {r['sec']:8.2f} s/step (warm-up {r['warmup_s']:.1f} s), "
                              f"saved-live {r['saved_live_mb']:8.1f} MB, RSS {fmt(r['rss_growth_mb'])} MB"
                              + (f", CUDA peak {r['cuda_peak_mb']:.1f} MB" if cuda else ""))
                if r.get("decode_ab"):
                    ab = r["decode_ab"]
                    console.print(f"  {mode:8s} T={steps:4d}: decoded once {ab['sec_once']:.2f} s, per step "
                                  f"{ab['sec_per_step']:.2f} s (medians of {args.repeats} alternating calls each): "
                                  f"per step ÷ once {ab['ratio']:.2f}, meta-gradients within {ab['rel_err']:.1e}")
        rows = []
        for steps in steps_list:
            rev, unr = results.get(("reverse", steps)), results.get(("unrolled", steps))
            err = rel_err(rev["grads"], unr["grads"]) if rev and unr else None
            peak = "cuda_peak_mb" if cuda else "saved_live_mb"
            row = {"T": steps, "peak_mb_reverse": get(rev, peak), "peak_mb_unrolled": get(unr, peak),
                   "sec_reverse": get(rev, "sec"), "sec_unrolled": get(unr, "sec"),
                   "saved_live_mb_reverse": get(rev, "saved_live_mb"),
                   "saved_live_mb_unrolled": get(unr, "saved_live_mb"),
                   "rss_growth_mb_reverse": get(rev, "rss_growth_mb"),
                   "rss_growth_mb_unrolled": get(unr, "rss_growth_mb"),
                   "cuda_peak_mb_reverse": get(rev, "cuda_peak_mb"), "cuda_peak_mb_unrolled": get(unr, "cuda_peak_mb"),
                   "rel_err_reverse_vs_unrolled": err,
                   "skipped": {m: why for (m, t), why in skipped.items() if t == steps} or None,
                   "runs": {m: {k: v for k, v in r.items() if k != "grads"} for m, r in (("reverse", rev),
                                                                                       ("unrolled", unr)) if r}}
            row["mem_ratio"] = ratio(row["peak_mb_unrolled"], row["peak_mb_reverse"])  # unrolled / reverse
            row["rss_ratio"] = ratio(row["rss_growth_mb_unrolled"], row["rss_growth_mb_reverse"])
            row["time_ratio"] = ratio(row["sec_unrolled"], row["sec_reverse"])
            rows.append(row)
    wall = time.perf_counter() - t_start

    base = rows[0]
    table = Table(title=f"Farzi meta-gradient, {args.device}: one outer step (median of {args.repeats} after 1 "
                        f"warm-up), vocab {args.vocab}, dim {args.dim}, mu {args.budget} x {args.seq_len}")
    cols = ["T", "s rev", "s unr", "s unr÷rev", "saved-live MB rev", f"rev × vs T={base['T']}", "saved-live MB unr",
            "saved unr÷rev", "RSS MB rev", "RSS MB unr", "RSS unr÷rev"]
    cols += ["CUDA peak MB rev", "CUDA peak MB unr", "CUDA unr÷rev"] if cuda else []
    cols += ["rel err"]
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        unr_note = "skipped" if r["skipped"] and "unrolled" in r["skipped"] else "—"
        b = base["saved_live_mb_reverse"]
        cells = [str(r["T"]), fmt(r["sec_reverse"], ".2f"), fmt(r["sec_unrolled"], ".2f") if r["sec_unrolled"]
                 else unr_note, fmt(r["time_ratio"], ".2f"), fmt(r["saved_live_mb_reverse"]),
                 fmt(r["saved_live_mb_reverse"] / b if b and r["saved_live_mb_reverse"] else None, ".2f"),
                 fmt(r["saved_live_mb_unrolled"]) if r["saved_live_mb_unrolled"] else unr_note,
                 fmt(ratio(r["saved_live_mb_unrolled"], r["saved_live_mb_reverse"]), ".1f"),
                 fmt(r["rss_growth_mb_reverse"]), fmt(r["rss_growth_mb_unrolled"]) if r["sec_unrolled"] else unr_note,
                 fmt(r["rss_ratio"], ".1f")]
        if cuda:
            cells += [fmt(r["cuda_peak_mb_reverse"]), fmt(r["cuda_peak_mb_unrolled"]), fmt(r["mem_ratio"], ".1f")]
        cells += [fmt(r["rel_err_reverse_vs_unrolled"], ".1e")]
        table.add_row(*cells)
    console.print(table)
    console.print("saved-live MB: peak of the tensors saved for backward alive at once (pack/unpack hooks), "
                  "measured during the warm-up call; RSS MB: process peak RSS growth over the warm-up call "
                  "(VmHWM, fresh process per mode and T)"
                  + ("; CUDA peak MB: torch.cuda.max_memory_allocated growth over the timed calls" if cuda else "")
                  + f". The JSON's peak_mb_* is {'the CUDA peak' if cuda else 'saved-live MB'}; "
                  "rel err: ||g_rev - g_unr|| / ||g_unr|| of the meta-gradient (F and M).")
    drift = [r["T"] for r in rows if (r["rel_err_reverse_vs_unrolled"] or 0) > 1e-3]
    if drift:
        console.print(f"[yellow]reverse and unrolled meta-gradients disagree (rel err > 1e-3) at T = {drift}: the "
                      "reversal of Adam (m_(t-1) = (m_t - (1-b1) g_t) / b1, ...) amplifies rounding errors over long "
                      "horizons; --checkpoint-every K bounds it (3 float64 copies of the parameters per "
                      "checkpoint)[/yellow]")
    for (m, t), why in skipped.items():
        console.print(f"[yellow]{m} T={t} skipped: {why}[/yellow]")
    console.print(f"wall time {wall:.0f} s")
    print_load(console, load_start)
    if args.json:
        write_results(
            console, args.json, "farzi_memory", machine_info(args.device, load_start, gpu=True),
            {**cfg, "model": spec, "steps": steps_list, "modes": args.modes, "repeats": args.repeats,
             "device": args.device, "quick": args.quick, "max_unrolled_gb": limit_gb, "in_process": args.in_process,
             "params": params},
            peak_mb_measure="cuda_max_memory_allocated" if cuda else "saved_tensors_live_peak",
            wall_s=wall, rows=rows,
            per_T={str(r["T"]): {k: r[k] for k in ("peak_mb_reverse", "peak_mb_unrolled", "sec_reverse",
                                                    "sec_unrolled", "mem_ratio", "rss_ratio", "time_ratio")}
                   for r in rows},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
