"""Training and evaluating sequence models: experts on real data, downstream models on a distilled
(soft) or baseline set, and the metrics: HR@10 / NDCG@10 (recommendation) and perplexity (LM).

Recommendation metrics rank the held-out item against *all* items (no sampled negatives: with
1.7k-3.7k items in MovieLens full ranking is cheap, and sampled metrics are known to disagree with
full ones). The padding id is never ranked and, by default, neither are the items already in the
user's input sequence (``mask_seen``): MovieLens users rate a movie once, so a seen item cannot be
the next one. Ties count against the target (its rank is the number of other items scored at least
as high), so a constant scorer gets no credit.

When the task carries sampled negatives (``test_negatives``: per user, items drawn uniformly from
those the user never saw, fixed by a seed), the same models are also ranked against the target
plus those negatives only, the protocol of SASRec's paper (which later recommendation work often
follows; which protocol TD3 or Farzi report could not be checked here): ``hr10_s100`` and
``ndcg10_s100`` for 100 negatives.
"""
from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .evaluate import EVAL_THREADS, sequential, torch_threads
from .experts import Checkpoint
from .networks import ensemble_forward, flatten_params, manifest_of
from .seqmodels import CausalTransformer, seeded_seq_model, sequence_loss


@dataclass
class SeqTask:
    """What training and evaluating a sequence model needs, independent of the file format."""
    kind: str  # "recommendation" | "language_model"
    vocab_size: int
    pad_id: int | None
    train: torch.Tensor  # int64 [N, L] real training sequences (left-padded for recommendation)
    test_inputs: torch.Tensor  # rec: [U, L] histories; LM: [N, L] test chunks
    test_targets: torch.Tensor | None = None  # rec: [U] held-out items
    test_seen: list[torch.Tensor] | None = None  # rec: the items of each input (masked when ranking)
    k: int = 10
    test_negatives: torch.Tensor | None = None  # rec: [U, n] sampled negatives per user (sampled metrics)
    # the validation split, scored beside the test split to choose among sets without the test data
    # (rec: each user's training history and the held-out second-to-last item; LM: the valid chunks)
    valid_inputs: torch.Tensor | None = None
    valid_targets: torch.Tensor | None = None
    valid_seen: list[torch.Tensor] | None = None

    def validation(self) -> SeqTask | None:
        """The validation split as a task whose test fields hold it (no sampled negatives), or None."""
        if self.valid_inputs is None or len(self.valid_inputs) == 0:  # e.g. a valid stream shorter than a chunk
            return None
        return SeqTask(self.kind, self.vocab_size, self.pad_id, self.train, self.valid_inputs, self.valid_targets,
                       self.valid_seen, self.k)

    @property
    def primary(self) -> str:
        """The metric stored as an expert's ``test_acc`` (higher is better)."""
        return "hr10" if self.kind == "recommendation" else "token_acc"

    @property
    def headline(self) -> tuple[str, ...]:
        return ("hr10", "ndcg10") if self.kind == "recommendation" else ("ppl", "token_acc")


@dataclass(frozen=True)
class SeqTrainConfig:
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 128
    weight_decay: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# -- metrics ------------------------------------------------------------------------------------
def rank_of_targets(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among its row: other entries scored >= the target's score.
    Entries set to -inf (masked) never count."""
    t = scores.gather(1, targets.view(-1, 1))
    return (scores >= t).sum(1) - 1


def sample_negatives(vocab_size: int, pad_id: int | None, seen: list[torch.Tensor], targets: torch.Tensor,
                     n: int = 100, seed: int = 0) -> torch.Tensor:
    """``[U, n]`` distinct items per user, uniform over the items that are neither padding, nor in
    the user's input, nor the target; fixed by ``seed`` (every evaluation ranks the same ones)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(len(targets), n, dtype=torch.int64)
    for u, (items, tgt) in enumerate(zip(seen, targets.tolist())):
        allowed = torch.ones(vocab_size, dtype=torch.bool)
        allowed[items] = False
        allowed[tgt] = False
        if pad_id is not None:
            allowed[pad_id] = False
        pool = allowed.nonzero().view(-1)
        if len(pool) < n:
            raise ValueError(f"user {u}: only {len(pool)} unseen items for {n} sampled negatives")
        out[u] = pool[torch.randperm(len(pool), generator=g)[:n]]
    return out


def hr_ndcg(ranks: torch.Tensor, k: int = 10) -> tuple[float, float]:
    """HR@k (fraction with rank < k) and NDCG@k (1/log2(rank+2) when rank < k, else 0)."""
    hit = ranks < k
    ndcg = torch.where(hit, 1.0 / torch.log2(ranks.double() + 2), torch.zeros((), dtype=torch.float64))
    return float(hit.double().mean()), float(ndcg.mean())


Params = torch.Tensor | list[torch.Tensor]  # one flat parameter vector, or an ensemble's


def _flats(flat) -> list[torch.Tensor]:
    return [flat] if isinstance(flat, torch.Tensor) else list(flat)


@torch.no_grad()
def recommendation_ranks(model: CausalTransformer, flat: Params, task: SeqTask, batch_size: int = 256,
                         mask_seen: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each test user's 0-based rank of the held-out item: among all items (the padding id and, with
    ``mask_seen``, the items the user has seen left out), and among its sampled negatives where the
    task has them (else None)."""
    model.eval()
    ranks = []
    sampled = []
    man = manifest_of(model)
    flats = _flats(flat)
    dev = flats[0].device
    for i in range(0, len(task.test_inputs), batch_size):
        x = task.test_inputs[i : i + batch_size].to(dev)
        scores = ensemble_forward(model, flats, x, man)[:, -1].double()
        if task.test_negatives is not None:  # the target (column 0) among its sampled negatives
            cand = torch.cat([task.test_targets[i : i + batch_size].view(-1, 1),
                              task.test_negatives[i : i + batch_size]], 1).to(dev)
            sampled.append(rank_of_targets(scores.gather(1, cand), torch.zeros(len(cand), dtype=torch.long,
                                                                                 device=dev)).cpu())
        if task.pad_id is not None:
            scores[:, task.pad_id] = -math.inf
        tgt = task.test_targets[i : i + batch_size]  # on the task's device (the CPU), as test_seen
        if mask_seen and task.test_seen is not None:
            for r, seen in enumerate(task.test_seen[i : i + batch_size]):
                seen = seen[seen != tgt[r]]  # never mask the target itself
                scores[r, seen.to(dev)] = -math.inf
        ranks.append(rank_of_targets(scores, tgt.to(dev)).cpu())
    return torch.cat(ranks), (torch.cat(sampled) if sampled else None)


def recommendation_metrics(model: CausalTransformer, flat: Params, task: SeqTask, batch_size: int = 256,
                           mask_seen: bool = True) -> dict[str, float]:
    return _ranks_metrics(*recommendation_ranks(model, flat, task, batch_size, mask_seen), task)


def _ranks_metrics(ranks: torch.Tensor, sampled: torch.Tensor | None, task: SeqTask) -> dict[str, float]:
    hr, ndcg = hr_ndcg(ranks, task.k)
    out = {"hr10": hr, "ndcg10": ndcg}
    if sampled is not None:
        n = task.test_negatives.shape[1]
        out[f"hr10_s{n}"], out[f"ndcg10_s{n}"] = hr_ndcg(sampled, task.k)
    return out


@torch.no_grad()
def lm_chunk_stats(model: CausalTransformer, flat: Params, task: SeqTask,
                   batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per test chunk: the summed next-token cross-entropy (float64), how many next tokens the
    model ranks first, and how many targets it has (every position but the first)."""
    model.eval()
    man = manifest_of(model)
    flats = _flats(flat)
    nll, correct, count = [], [], []
    for i in range(0, len(task.test_inputs), batch_size):
        x = task.test_inputs[i : i + batch_size].to(flats[0].device)
        logits = ensemble_forward(model, flats, x, man)[:, :-1].double()
        tgt = x[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")
        nll.append(ce.sum(1).cpu())
        correct.append((logits.argmax(-1) == tgt).sum(1).cpu())
        count.append(torch.full((len(x),), tgt.shape[1], dtype=torch.long))
    return torch.cat(nll), torch.cat(correct), torch.cat(count)


def lm_metrics(model: CausalTransformer, flat: Params, task: SeqTask, batch_size: int = 64) -> dict[str, float]:
    """Perplexity exp(mean next-token cross-entropy) and next-token accuracy on the test chunks."""
    return _chunk_metrics(*lm_chunk_stats(model, flat, task, batch_size))


def _chunk_metrics(nll: torch.Tensor, correct: torch.Tensor, count: torch.Tensor) -> dict[str, float]:
    n = int(count.sum())
    return {"ppl": math.exp(float(nll.sum()) / n), "token_acc": int(correct.sum()) / n}


def task_metrics(model: CausalTransformer, flat: Params, task: SeqTask) -> dict[str, float]:
    """The task's test metrics of ``model`` with the flat parameters ``flat``, or of the ensemble of
    several (a list: their mean next-id distribution, :func:`algorithms.networks.ensemble_forward`)."""
    if task.kind == "recommendation":
        return recommendation_metrics(model, flat, task)
    return lm_metrics(model, flat, task)


def task_cases(model: CausalTransformer, flat: Params, task: SeqTask) -> tuple[torch.Tensor, torch.Tensor]:
    """The headline test metric case by case, as ``(value, weight)`` per test case (float64 on the
    CPU) whose weighted mean is the metric: recommendation, each user's hit@k (HR@k = their mean);
    language modelling, each test chunk's summed cross-entropy over its number of targets (ln of the
    perplexity = their ratio of sums). Two models scored on the same cases give a paired difference
    (:func:`algorithms.evaluate.paired_difference`)."""
    return task_scores(model, flat, task)[1]


def task_scores(model: CausalTransformer, flat: Params, task: SeqTask
                ) -> tuple[dict[str, float], tuple[torch.Tensor, torch.Tensor]]:
    """:func:`task_metrics` and :func:`task_cases` from one pass over the test split."""
    if task.kind == "recommendation":
        ranks, sampled = recommendation_ranks(model, flat, task)
        hits = (ranks < task.k).double()
        return _ranks_metrics(ranks, sampled, task), (hits, torch.ones_like(hits))
    nll, correct, count = lm_chunk_stats(model, flat, task)
    return _chunk_metrics(nll, correct, count), (nll, count.double())


def evaluation_metrics(model: CausalTransformer, flat: Params, task: SeqTask, per_case: bool = False
                       ) -> dict[str, float] | tuple[dict[str, float], tuple[torch.Tensor, torch.Tensor]]:
    """The test metrics and, where the task has a validation split, its headline metrics on it as
    ``valid_<metric>`` (``valid_hr10``, ``valid_ndcg10``; ``valid_ppl``, ``valid_token_acc``); with
    ``per_case``, also the test split's :func:`task_cases` (the same pass over it)."""
    out, cases = task_scores(model, flat, task)
    valid = task.validation()
    if valid is not None:
        out.update({f"valid_{k}": v for k, v in task_metrics(model, flat, valid).items() if k in task.headline})
    return (out, cases) if per_case else out


# -- training -----------------------------------------------------------------------------------
def train_seq_model(model_spec: dict, task: SeqTask, data: torch.Tensor, cfg: SeqTrainConfig, seed: int,
                    device: str | torch.device = "cpu", evaluate_every: int = 0) -> Iterator[Checkpoint]:
    """Train a fresh model with Adam on ``data`` (hard ids ``[N, L]`` or soft ``[N, L, V]``) and
    yield a checkpoint per epoch (epoch 0 = initialisation). ``test_acc`` holds the task's primary
    metric at the last epoch (and every ``evaluate_every`` epochs)."""
    model = seeded_seq_model(model_spec, task.vocab_size, task.pad_id, seed).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed + 7919)

    def metric(epoch: int) -> float:
        if epoch == cfg.epochs or (evaluate_every > 0 and epoch % evaluate_every == 0):
            return task_metrics(model, flatten_params(model).to(device), task)[task.primary]
        return math.nan

    yield Checkpoint(0, flatten_params(model).cpu(), math.nan, metric(0))
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        perm = torch.randperm(len(data), generator=gen)
        total, count = 0.0, 0
        with torch.random.fork_rng(devices=[torch.device(device).index or 0] if torch.device(device).type == "cuda"
                                   else []):
            torch.manual_seed(seed * 1009 + epoch)  # dropout masks depend on the seed only
            for i in range(0, len(data), cfg.batch_size):
                xb = data[perm[i : i + cfg.batch_size]].to(device)
                loss = sequence_loss(model(xb), xb, task.pad_id)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"sequence model seed {seed}: loss {loss.item()} at epoch {epoch}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(xb)
                count += len(xb)
        yield Checkpoint(epoch, flatten_params(model).cpu(), total / count, metric(epoch))


@dataclass
class SeqEvalResult:
    metrics: dict[str, float]  # mean over networks
    std: dict[str, float]
    per_network: list[dict[str, float]]
    cases: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per network, its task_cases (``per_case``)


def _train_seq_network(model_spec: dict, task: SeqTask, data: torch.Tensor, cfg: SeqTrainConfig, seed: int, *,
                       device: str | torch.device = "cpu", per_case: bool = False
                       ) -> dict[str, float] | tuple[dict[str, float], tuple[torch.Tensor, torch.Tensor]]:
    with torch_threads(EVAL_THREADS):
        last = None
        for last in train_seq_model(model_spec, task, data, cfg, seed, device):
            pass
        model = seeded_seq_model(model_spec, task.vocab_size, task.pad_id, seed).to(device)
        params = last.params.to(device)
        return evaluation_metrics(model, params, task, per_case=per_case)


def seq_network_job(model_spec: dict, task: SeqTask, data: torch.Tensor, cfg: SeqTrainConfig, seed: int,
                    device: str | torch.device = "cpu", per_case: bool = False) -> functools.partial:
    """One evaluation model as a job, as :func:`algorithms.evaluate.network_job` for images: a
    picklable zero-argument callable returning the :func:`evaluation_metrics` of a fresh model of seed ``seed``
    trained on ``data`` (with ``per_case``, and its :func:`task_cases`), with
    :data:`~algorithms.evaluate.EVAL_THREADS` torch threads, so that it computes the same numbers in any process."""
    return functools.partial(_train_seq_network, model_spec, task, data.detach().cpu(), cfg, seed, device=device,
                             per_case=per_case)


def evaluate_sequences(model_spec: dict, task: SeqTask, data: torch.Tensor, cfg: SeqTrainConfig, networks: int,
                       seed: int, device: str | torch.device = "cpu",
                       run: Callable[[list], list[Any]] | None = None, per_case: bool = False) -> SeqEvalResult:
    """Train ``networks`` fresh models on ``data`` (seeds ``seed, seed+1, ...``) and report the
    task metrics of each after the last epoch: mean and population std (``per_case``: also each
    model's :func:`task_cases`). ``run`` runs the models' jobs (:func:`seq_network_job`): one after
    another by default, or e.g. ``orchestrator.parallel.RayRunner`` on a cluster's free resources,
    with the same numbers."""
    jobs = [seq_network_job(model_spec, task, data, cfg, seed + n, device, per_case=per_case) for n in range(networks)]
    results = list((run or sequential)(jobs))
    runs = [r[0] for r in results] if per_case else results
    keys = runs[0].keys()
    return SeqEvalResult({k: statistics.fmean(r[k] for r in runs) for k in keys},
                         {k: statistics.pstdev([r[k] for r in runs]) for k in keys}, runs,
                         [r[1] for r in results] if per_case else None)
