"""Sequence sets for ``orchestrate evaluate``: the checks of a set of event sequences against its
dataset (task, vocabulary, the model's ``max_len``) and its evaluation with the spec's sequence
model, next to random real sequences and the spec's stored experts."""
from __future__ import annotations

import dataclasses

import math
from typing import Any

import torch

from .evaluate import (NO_RANDOM, EvalOptions, EvaluateError, SetFile, _report_head, _row, _scalar, file_sha256, finish,
                       read_other, stored_experts)
from .sequences import load_sequences, seq_task
from .spec import eval_seed


def check_sequences(sf: SetFile, data, max_len: int) -> None:
    """A sequence set against its dataset: the task, the vocabulary (``M``'s columns, the ids of
    ``sequences``) and the model's ``max_len`` (the length of the sequences)."""
    info = data.info
    if sf.meta.get("task") != info.task:
        raise EvaluateError(f"{sf.path}: metadata field 'task' is {sf.meta.get('task')!r}, but {info.name} is a "
                            f"{info.task} dataset")
    try:
        vocab = int(sf.meta["vocab_size"])
    except ValueError:
        raise EvaluateError(f"{sf.path}: metadata field 'vocab_size' must be an integer, got "
                            f"{sf.meta['vocab_size'][:40]!r}") from None
    if vocab != info.vocab_size:
        raise EvaluateError(f"{sf.path}: metadata field 'vocab_size' is {vocab}, but {info.name} read from its files "
                            f"has a vocabulary of {info.vocab_size}")
    t = sf.tensors
    if "F" in t:
        F, M = t["F"], t["M"]
        for key, x in (("F", F), ("M", M)):
            if not x.dtype.is_floating_point:
                raise EvaluateError(f"{sf.path}: tensor {key!r} is {x.dtype}, expected a float tensor")
            if not bool(torch.isfinite(x).all()):
                raise EvaluateError(f"{sf.path}: tensor {key!r} holds NaN or infinite values")
        if M.shape[1] != info.vocab_size:
            raise EvaluateError(f"{sf.path}: tensor 'M' has shape {tuple(M.shape)}: {M.shape[1]} columns, but "
                                f"{info.name}'s vocabulary has {info.vocab_size} ids (M is [latent_dim, vocab])")
        if F.shape[0] == 0:
            raise EvaluateError(f"{sf.path}: tensor 'F' holds no sequence (shape {tuple(F.shape)})")
        if F.shape[1] > max_len:
            raise EvaluateError(f"{sf.path}: tensor 'F' has shape {tuple(F.shape)}: sequences of {F.shape[1]} "
                                f"positions, longer than the model's max_len {max_len} (the spec's model.max_len)")
        if "temperature" not in t:
            raise EvaluateError(f"{sf.path}: tensor 'temperature' is missing (Farzi's sequences are "
                                f"softmax(F·M/temperature))")
        temp = _scalar(sf, "temperature")
        if not math.isfinite(temp) or temp <= 0:
            raise EvaluateError(f"{sf.path}: tensor 'temperature' is {temp}, must be > 0")
        return
    seqs = t["sequences"]
    if seqs.dtype != torch.int64:
        raise EvaluateError(f"{sf.path}: tensor 'sequences' is {seqs.dtype}, expected torch.int64")
    if seqs.ndim != 2 or len(seqs) == 0:
        raise EvaluateError(f"{sf.path}: tensor 'sequences' must be [N, length] with N >= 1, has shape "
                            f"{tuple(seqs.shape)}")
    if seqs.shape[1] > max_len:
        raise EvaluateError(f"{sf.path}: tensor 'sequences' has shape {tuple(seqs.shape)}: sequences of "
                            f"{seqs.shape[1]} positions, longer than the model's max_len {max_len}")
    bad = sorted({int(v) for v in seqs[(seqs < 0) | (seqs >= info.vocab_size)].tolist()})
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise EvaluateError(f"{sf.path}: tensor 'sequences' holds ids outside {info.name}'s vocabulary "
                            f"(0..{info.vocab_size - 1}): {shown}")


def _evaluate_sequences(sf: SetFile, name: str, opts: EvalOptions, say, device) -> dict[str, Any]:
    from algorithms.evaluate import EVAL_THREADS
    from algorithms.seqtrain import SeqTrainConfig, seq_network_job, task_scores

    spec = opts.spec
    if spec is None:
        raise EvaluateError(f"{sf.path}: a sequence set ({name}): give --spec SPEC, whose model and evaluation "
                            f"section (Adam epochs, lr, batch size) say how to train on it")
    if opts.aug not in (None, "none"):
        raise EvaluateError(f"--aug {opts.aug}: sequence sets are not augmented (DSA is for images); drop --aug")
    model_name = spec.model["name"]
    if opts.models is not None and [m.strip().lower() for m in opts.models.split(",")] != [model_name]:
        raise EvaluateError(f"--models {opts.models}: a sequence set is evaluated with the spec's model, "
                            f"{model_name!r} ({spec.path}); drop --models or give {model_name}")
    root = opts.data_root if opts.data_root is not None else spec.dataset.get("root")
    data = load_sequences(name, root)
    check_sequences(sf, data, spec.model["max_len"])
    try:
        # the test metrics only: the validation split chooses among a trial's sets, not here
        task = dataclasses.replace(seq_task(data, spec.model["max_len"]), valid_inputs=None, valid_targets=None,
                                   valid_seen=None)
    except ValueError as e:  # e.g. too few items for the sampled negatives
        raise EvaluateError(f"{name} ({root or 'default root'}): cannot build the evaluation task: {e}") from None
    ev = spec.evaluation
    networks = opts.networks or ev["networks"]
    epochs = opts.epochs or ev["epochs"]
    seed = opts.seed if opts.seed is not None else eval_seed({"seed": spec.seed})
    seeds = list(range(seed, seed + networks))
    lr, lr_from = (opts.lr, "--lr") if opts.lr is not None else \
        (float(ev["lr"]), "the spec's evaluation.lr, as a sweep's trials train")
    x, what = _training_input(sf, data)
    others = []  # --against: (file, its sequences, what they are)
    for path in opts.against:
        other = read_other(path, sf, name)
        check_sequences(other, data, spec.model["max_len"])
        others.append((other, *_training_input(other, data)))
    mu = len(x)
    subset_seed = spec.seed * 7919 + mu  # as a sweep's random baseline of this budget
    real = task.train
    random_note = None
    if not opts.random:
        r, random_note = None, NO_RANDOM
    elif mu > len(real):
        r = None
        random_note = f"no random subset: {mu} sequences, the data has {len(real)}"
    else:
        r = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(subset_seed))[:mu]]
    random_lr, random_lr_from = float(ev["lr"]), "the spec's evaluation.lr"

    # every model of both rows is one job (seq_network_job, seeds seed, seed+1, ...): all go to the
    # runner at once, in parallel when it can (the same numbers), said as each ends
    # (the --against files train at the set's lr: the spec's evaluation.lr, or --lr)
    trainings = [(x, lr, "the set")] + ([(r, random_lr, "the random sequences")] if r is not None else []) + \
        [(o_x, lr, other.path.name) for other, o_x, _ in others]
    jobs, owner = [], []
    for t, (data_, lr_, _) in enumerate(trainings):
        cfg = SeqTrainConfig(epochs=epochs, lr=lr_, batch_size=ev["batch_size"], weight_decay=ev["weight_decay"])
        for k, s in enumerate(seeds):
            jobs.append(seq_network_job(spec.model, task, data_, cfg, s, device, per_case=True))
            owner.append((t, k))

    def done(i: int, res: tuple[dict[str, float], Any]) -> None:
        t, k = owner[i]
        say(f"{model_name}: {trainings[t][2]}, network {k + 1}/{networks} (seed {seeds[k]}): "
            + ", ".join(f"{m} {v:.4g}" for m, v in res[0].items()))

    from .parallel import EvaluateRunner

    runner = EvaluateRunner(opts.workers, opts.address)
    results = runner(jobs, on_done=done)
    per: list[list[dict[str, float]]] = [[] for _ in trainings]
    cases: list[list] = [[] for _ in trainings]  # per network, its test cases' (value, weight)
    for (t, _), (res, case) in zip(owner, results):
        per[t].append(res)
        cases[t].append(case)

    set_results = per[0]
    metrics = list(set_results[0])
    rows = [_row(model_name, "synthetic", what, lr, set_results, seeds, cases=cases[0])]
    if r is not None:
        rows.append(_row(model_name, "random", f"random real sequences, {mu}", random_lr, per[1], seeds,
                         cases=cases[1]))
    else:
        rows.append(_row(model_name, "random", "random real sequences", random_lr, [], None, random_note))
    found, where = stored_experts(spec, data, opts.trajectories)
    if found:
        from algorithms.seqmodels import seeded_seq_model

        from .store import open_trajectory

        model = seeded_seq_model(spec.model, task.vocab_size, task.pad_id, 0)
        finals = [open_trajectory(p).params[-1].clone() for _, p, _ in found]
        scores = [task_scores(model, f, task) for f in finals]
        rows.append(_row(model_name, "full_data", "full data (the spec's experts)", None, [m for m, _ in scores], None,
                         f"{len(finals)} experts of the spec in {where} (their final parameters)",
                         cases=[c for _, c in scores]))
    else:
        rows.append(_row(model_name, "full_data", "full data (the spec's experts)", None, [], None, where))
    full_note = rows[-1].get("note")
    o0 = 1 if r is None else 2  # the --against trainings: after the set's and the random subset's
    for j, (other, o_x, o_what) in enumerate(others):
        rows.append({**_row(model_name, "other", o_what, lr, per[o0 + j], seeds, cases=cases[o0 + j]),
                     "file": str(other.path.resolve()), "sha256": file_sha256(other.path), "other_index": j,
                     "lr_from": lr_from})
    unit = "users" if data.info.task == "recommendation" else "chunks"
    return finish({**_report_head(sf, name, spec), "kind": "sequences", "task": data.info.task, "size": mu,
            "metrics": metrics, "models": {model_name: dict(spec.model)}, "model_from": "the spec's model",
            "protocol": {"networks": networks, "epochs": epochs, "batch_size": ev["batch_size"],
                         "weight_decay": ev["weight_decay"], "seed": seed, "seeds": seeds, "optimizer": "Adam",
                         "device": str(device), "threads_per_network": EVAL_THREADS, "runner": runner.how},
            "lr": {"set": lr, "set_from": lr_from, "random": random_lr, "random_from": random_lr_from},
            "random_subset": {"seed": subset_seed, "budget": mu, "note": random_note},
            "full_data_note": full_note, "renormalised": False, "rows": rows},
                  task.primary if task.kind == "recommendation" else "ppl", unit)


def _training_input(sf: SetFile, data) -> tuple[torch.Tensor, str]:
    """What models train on from a checked sequence set (Farzi's soft sequences softmax(F·M/τ), or
    the hard ids), and its description."""
    from algorithms.farzi import FarziSet

    t = sf.tensors
    if "F" in t:
        temp = _scalar(sf, "temperature")
        syn = FarziSet(t["F"].float(), t["M"].float(), temp, data.info.pad_id, _scalar(sf, "lr") or 0.0)
        return syn.probs().detach(), f"{sf.meta.get('algorithm')} set, {len(t['F'])} soft sequences of " \
            f"{t['F'].shape[1]}"
    x = t["sequences"]
    return x, f"{sf.meta.get('algorithm')} set, {len(x)} sequences of {x.shape[1]}"
