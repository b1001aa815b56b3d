"""Farzi: reverse-mode Adam against autograd unrolling, Hessian-vector products against finite
differences, the sequence models' soft inputs, ranking metrics on hand-made scores, and the
distiller's protocol (resume)."""
import math

import pytest
import torch

from algorithms.farzi import (
    AdamHP,
    FarziConfig,
    FarziDistiller,
    InnerProblem,
    decode,
    hvp,
    reverse_meta_grad,
    unrolled_meta_grad,
)
from algorithms.networks import flatten_params, functional_forward, manifest_of
from algorithms.seqmodels import seeded_seq_model, sequence_loss, soft_loss
from algorithms.seqtrain import SeqTask, hr_ndcg, rank_of_targets, recommendation_metrics, sample_negatives

V, L = 13, 6


def tiny_problem(steps: int, dtype=torch.float64, seed: int = 0, dropout: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    model = seeded_seq_model({"name": "sasrec", "dim": 8, "blocks": 1, "heads": 2, "max_len": L, "dropout": dropout},
                             V, 0, seed)
    model = model.to(dtype).eval()
    man = manifest_of(model)
    theta0 = flatten_params(model).to(dtype)
    theta0 = theta0 + 0.05 * torch.randn(theta0.shape, generator=g, dtype=dtype)
    F = torch.randn(4, L, 3, generator=g, dtype=dtype).requires_grad_(True)
    M = torch.randn(3, V, generator=g, dtype=dtype).requires_grad_(True)
    real = torch.randint(1, V, (5, L), generator=g)
    real[0, :2] = 0  # left padding
    batches = [torch.randperm(4, generator=g)[:3] for _ in range(steps)]
    prob = InnerProblem(data=lambda idx: decode(F[idx], M, 0.7, 0),
                        loss=lambda th, x: soft_loss(functional_forward(model, th, x, man), x),
                        outer=lambda th: sequence_loss(functional_forward(model, th, real, man), real, 0),
                        data_params=[F, M], batches=batches)
    return model, man, theta0, prob


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("steps", [1, 5, 20])
@pytest.mark.parametrize("second_moment", [True, False])
def test_reverse_mode_adam_equals_unrolled_autograd(steps, second_moment):
    _, _, theta0, prob = tiny_problem(steps)
    hp = AdamHP(lr=0.01)
    ref = unrolled_meta_grad(theta0, prob, hp, second_moment)
    rev = reverse_meta_grad(theta0, prob, hp, second_moment)
    assert ref.outer_loss == pytest.approx(rev.outer_loss, rel=1e-12)
    for name, a, b in zip("FM", rev.grads, ref.grads):
        assert float(b.norm()) > 0, name
        assert rel_err(a, b) < 1e-6, (name, steps, second_moment, rel_err(a, b))
    # checkpoints every 4 steps give the same gradient (or better)
    ck = reverse_meta_grad(theta0, prob, hp, second_moment, checkpoint_every=4)
    for a, b in zip(ck.grads, ref.grads):
        assert rel_err(a, b) < 1e-6


def test_second_moment_term_matters():
    """Dropping the second-moment adjoint is a different gradient, not a no-op."""
    _, _, theta0, prob = tiny_problem(5)
    hp = AdamHP(lr=0.01)
    full = reverse_meta_grad(theta0, prob, hp, True)
    dropped = reverse_meta_grad(theta0, prob, hp, False)
    assert rel_err(dropped.grads[0], full.grads[0]) > 1e-3


def test_reverse_mode_float32_model_with_float64_state():
    """A float32 model with Adam's state kept and reversed in float64 (the default) gives the
    gradient of the same float32-model dynamics unrolled; reversing float32 state does not (undoing
    ``v_t = b2 v_{t-1} + (1-b2) g^2`` cancels digits). How far off float32 lands is roundoff, so it
    depends on the summation order: relative errors 0.83-0.91 on one thread, 300-330 on two, against
    4e-8-7e-8 for float64 state on either."""
    _, _, theta32, prob32 = tiny_problem(20, dtype=torch.float32)
    hp = AdamHP(lr=0.01)
    ref = unrolled_meta_grad(theta32, prob32, hp, state_dtype=torch.float64)
    errs64 = [rel_err(a, b) for a, b in zip(reverse_meta_grad(theta32, prob32, hp).grads, ref.grads)]
    errs32 = [rel_err(a, b) for a, b in
              zip(reverse_meta_grad(theta32, prob32, hp, state_dtype=torch.float32).grads, ref.grads)]
    assert max(errs64) < 1e-4, errs64
    assert min(errs32) > max(0.1, 1e4 * max(errs64)), (errs32, errs64)


def test_hessian_vector_product_matches_finite_differences():
    model, man, theta0, prob = tiny_problem(1)
    with torch.no_grad():
        x = prob.data(torch.arange(4))
    loss = lambda th: prob.loss(th, x)  # noqa: E731
    u = torch.randn(theta0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    hu = hvp(loss, theta0, u)

    def grad_at(th):
        th = th.detach().requires_grad_(True)
        return torch.autograd.grad(loss(th), th)[0]

    eps = 1e-5
    fd = (grad_at(theta0 + eps * u) - grad_at(theta0 - eps * u)) / (2 * eps)
    assert float(hu.norm()) > 0
    assert rel_err(hu, fd) < 1e-6


def test_soft_one_hot_inputs_equal_hard_inputs():
    model = seeded_seq_model({"name": "transformer_lm", "dim": 16, "blocks": 2, "heads": 2, "max_len": 8}, 11,
                             None, 0).eval()
    ids = torch.randint(0, 11, (3, 8))
    hard = model(ids)
    soft = model(torch.nn.functional.one_hot(ids, 11).float())
    assert torch.allclose(hard, soft, atol=1e-5)
    # and the soft loss of one-hot targets is the hard cross-entropy
    oh = torch.nn.functional.one_hot(ids, 11).float()
    assert soft_loss(hard, oh).item() == pytest.approx(sequence_loss(hard, ids, None).item(), rel=1e-5)


def test_padding_is_ignored_by_the_recommender():
    """A left-padded history scores the next item exactly as the unpadded one does."""
    model = seeded_seq_model({"name": "sasrec", "dim": 16, "blocks": 2, "heads": 2, "max_len": 8}, 20, 0, 0).eval()
    seq = torch.tensor([[5, 7, 9, 11]])
    padded = torch.tensor([[0, 0, 0, 0, 5, 7, 9, 11]])
    # positions differ (absolute learned positions), so compare a model with zero position embeddings
    with torch.no_grad():
        model.pos.weight.zero_()
    assert torch.allclose(model(seq)[:, -1], model(padded)[:, -1], atol=1e-5)


def test_ranking_metrics_on_hand_made_scores():
    scores = torch.tensor([
        [0.9, 0.1, 0.2, 0.3],  # target 0: rank 0
        [0.1, 0.9, 0.8, 0.2],  # target 2: rank 1
        [0.5, 0.5, 0.5, 0.5],  # target 3: ties count against it: rank 3
        [0.4, 0.3, 0.2, 0.1],  # target 3: rank 3
    ])
    targets = torch.tensor([0, 2, 3, 3])
    ranks = rank_of_targets(scores, targets)
    assert ranks.tolist() == [0, 1, 3, 3]
    hr, ndcg = hr_ndcg(ranks, k=2)
    assert hr == pytest.approx(0.5)
    assert ndcg == pytest.approx((1 + 1 / math.log2(3)) / 4)
    hr10, ndcg10 = hr_ndcg(ranks, k=10)
    assert hr10 == 1.0
    assert ndcg10 == pytest.approx((1 + 1 / math.log2(3) + 2 / math.log2(5)) / 4)
    # masked (-inf) items never count
    masked = scores.clone()
    masked[1, 1] = -math.inf
    assert rank_of_targets(masked, targets)[1] == 0
    # 12 items, target scored 11th: HR@10 = 0, NDCG@10 = 0
    s = torch.arange(12, 0, -1).float().view(1, -1)
    assert hr_ndcg(rank_of_targets(s, torch.tensor([10])), 10) == (0.0, 0.0)
    assert hr_ndcg(rank_of_targets(s, torch.tensor([9])), 10) == pytest.approx((1.0, 1 / math.log2(11)))


def _distiller(seed=0, iterations=None, dropout=0.0, **kw):
    model = seeded_seq_model({"name": "sasrec", "dim": 8, "blocks": 1, "heads": 1, "max_len": 8, "dropout": dropout},
                             15, 0, 0)
    trajs = [torch.stack([flatten_params(model) + 0.01 * i * torch.ones(1) for i in range(3)])]
    real = torch.randint(1, 15, (20, 8), generator=torch.Generator().manual_seed(1))
    cfg = FarziConfig(**{"budget": 4, "seq_len": 6, "latent_dim": 4, "inner_steps": 3, "inner_lr": 0.01,
                         "real_batch": 8, **kw})
    return FarziDistiller(model, trajs, real, 15, 0, cfg, seed=seed, iterations=iterations)


def test_distiller_records_the_real_rows_its_start_reads():
    """init 'real': the start decodes to the rows ``init_index`` names (their last seq_len ids); the
    draw is among the rows that fill those positions; init 'random' reads none."""
    assert _distiller().init_index is None
    real = torch.randint(1, 15, (20, 8), generator=torch.Generator().manual_seed(1))  # _distiller's rows
    for seed in (0, 1):
        d = _distiller(seed=seed, init="real", latent_dim=32)
        idx = d.init_index
        assert len(idx) == 4 and len(set(idx.tolist())) == 4
        assert torch.equal(d.synthetic().probs().argmax(-1), real[idx][:, -6:])
    assert not torch.equal(_distiller(seed=0, init="real").init_index, _distiller(seed=1, init="real").init_index)


def test_distiller_resumes_exactly():
    a = _distiller()
    for _ in range(2):
        a.step()
    state = a.state_dict()
    ref = [a.step()["loss"] for _ in range(2)]
    b = _distiller(seed=99)
    b.load_state_dict(state)
    assert [b.step()["loss"] for _ in range(2)] == ref
    c = _distiller(seed=98)  # the state dict was not changed by b's steps (no aliased Adam moments)
    c.load_state_dict(state)
    assert [c.step()["loss"] for _ in range(2)] == ref
    assert torch.equal(a.synthetic().F, b.synthetic().F)
    # the padding id is never generated
    assert float(a.synthetic().probs()[..., 0].max()) == 0.0


def test_distiller_modes_agree_in_float64():
    """Within the distiller (a sampled theta_0, minibatches and real batch), the two grad modes
    give the same meta-gradient."""
    from algorithms.farzi import meta_gradient

    d = _distiller(precision="float64", inner_batch=2)
    theta0, prob, _ = d.problem()
    a = meta_gradient("reverse", theta0, prob, d.hp)
    b = meta_gradient("unrolled", theta0, prob, d.hp)
    assert a.outer_loss == pytest.approx(b.outer_loss, rel=1e-12)
    for ga, gb in zip(a.grads, b.grads):
        assert rel_err(ga, gb) < 1e-6


@pytest.mark.parametrize("inner_batch", [0, 2])
@pytest.mark.parametrize("mode, window", [("reverse", 0), ("reverse", 2), ("unrolled", 0), ("unrolled", 2)])
def test_decoding_the_synthetic_set_once_gives_the_per_step_meta_gradient(mode, window, inner_batch):
    """The distiller's problem decodes its data once per meta-gradient (``InnerProblem.source``):
    the same meta-gradient as decoding each step's minibatch anew, the old way (up to rounding: in
    float64 to 1e-12), with minibatches and without, over the whole horizon or the last steps."""
    import dataclasses

    from algorithms.farzi import meta_gradient

    d = _distiller(precision="float64", inner_batch=inner_batch, inner_steps=4)
    theta0, prob, _ = d.problem()
    assert prob.source is not None
    per_step = dataclasses.replace(prob, source=None)
    calls = {"data": 0, "source": 0}

    def counted(name, f):
        def call(*args):
            calls[name] += 1
            return f(*args)
        return call

    once = dataclasses.replace(prob, data=counted("data", prob.data), source=counted("source", prob.source))
    a = meta_gradient(mode, theta0, once, d.hp, window=window)
    assert calls == {"data": 0, "source": 1}  # decoded once, never per step
    b = meta_gradient(mode, theta0, per_step, d.hp, window=window)
    assert a.outer_loss == b.outer_loss and torch.equal(a.theta, b.theta)
    assert (a.inner_first, a.inner_last) == (b.inner_first, b.inner_last)
    for ga, gb, p in zip(a.grads, b.grads, (d.F, d.M)):
        assert ga.shape == p.shape and ga.dtype == p.dtype and float(gb.norm()) > 0
        assert rel_err(ga, gb) < 1e-12, rel_err(ga, gb)


def test_sequence_training_is_reproducible_whatever_ran_before():
    """Dropout masks come from the seed, not from the global RNG."""
    from algorithms.seqtrain import SeqTask, SeqTrainConfig, train_seq_model

    data = torch.randint(1, 15, (16, 8), generator=torch.Generator().manual_seed(0))
    task = SeqTask("recommendation", 15, 0, data, data[:4], torch.ones(4, dtype=torch.long), None)
    spec = {"name": "sasrec", "dim": 8, "blocks": 1, "heads": 1, "max_len": 8, "dropout": 0.5}
    cfg = SeqTrainConfig(epochs=2, batch_size=8)
    a = list(train_seq_model(spec, task, data, cfg, seed=3))[-1].params
    torch.rand(100)  # disturb the global RNG
    b = list(train_seq_model(spec, task, data, cfg, seed=3))[-1].params
    assert torch.equal(a, b)


def test_sampled_negatives_exclude_seen_target_and_padding_and_are_fixed_by_the_seed():
    seen = [torch.tensor([1, 2, 3]), torch.tensor([4]), torch.tensor([1, 5, 6, 7])]
    targets = torch.tensor([4, 9, 2])
    neg = sample_negatives(12, 0, seen, targets, n=5, seed=3)
    assert neg.shape == (3, 5)
    for u in range(3):
        row = set(neg[u].tolist())
        assert len(row) == 5  # distinct
        assert not row & (set(seen[u].tolist()) | {int(targets[u]), 0})
    assert torch.equal(neg, sample_negatives(12, 0, seen, targets, n=5, seed=3))
    assert not torch.equal(neg, sample_negatives(12, 0, seen, targets, n=5, seed=4))
    # user 2 has 12 - 1 (pad) - 4 (seen) - 1 (target) = 6 candidates: 7 negatives cannot be drawn
    with pytest.raises(ValueError, match="user 2: only 6 unseen items"):
        sample_negatives(12, 0, seen, targets, n=7)


def test_sampled_metrics_rank_the_target_among_its_negatives_only():
    """The sampled rank counts the negatives scored at least as high as the target; items outside
    the candidate list (here item 9, scored highest by the model) do not count, unlike full ranking."""
    vocab, dim = 12, 8
    model = seeded_seq_model({"name": "sasrec", "dim": dim, "blocks": 1, "heads": 1, "max_len": 4}, vocab, 0, 0)
    flat = flatten_params(model)
    inputs = torch.tensor([[0, 1, 2, 3], [0, 0, 4, 5]])
    scores = functional_forward(model, flat, inputs, manifest_of(model))[:, -1]
    order = scores.argsort(1, descending=True)  # items by score, best first
    targets = order[:, 3]  # each target is the 4th best item of its user's full ranking
    negatives = torch.stack([order[0, [0, 6, 7]], order[1, [8, 9, 10]]])  # user 0: one above; user 1: none
    task = SeqTask("recommendation", vocab, None, inputs, inputs, targets, None, k=1, test_negatives=negatives)
    m = recommendation_metrics(model, flat, task, mask_seen=False)
    assert m["hr10"] == 0.0  # full ranking: rank 3 for both, not within k=1
    assert m["hr10_s3"] == 0.5 and m["ndcg10_s3"] == pytest.approx(0.5)  # sampled: ranks 1 and 0


def test_metrics_of_an_ensemble_rank_by_its_mean_distribution():
    """A list of flat parameter vectors is scored as their ensemble: ``ensemble_forward`` is the log of
    the mean softmax (one vector: its own logits, exactly), and the metrics rank by that distribution,
    which is neither member's ranking; bench/farzi_fit.py's test CE is the mean distribution's."""
    import sys

    import torch.nn.functional as nnf

    from algorithms.networks import ensemble_forward
    from algorithms.seqtrain import lm_metrics
    from tests.conftest import REPO

    vocab = 30
    model = seeded_seq_model({"name": "sasrec", "dim": 8, "blocks": 1, "heads": 1, "max_len": 6}, vocab, 0, 0)
    a = flatten_params(model)
    b = a + 0.8 * torch.randn(a.shape, generator=torch.Generator().manual_seed(2))
    man = manifest_of(model)
    g = torch.Generator().manual_seed(3)
    inputs = torch.randint(1, vocab, (64, 6), generator=g)
    targets = torch.randint(1, vocab, (64,), generator=g)
    assert torch.equal(ensemble_forward(model, [a], inputs, man), functional_forward(model, a, inputs, man))
    mean = (functional_forward(model, a, inputs, man).softmax(-1)
            + functional_forward(model, b, inputs, man).softmax(-1)) / 2
    assert torch.allclose(ensemble_forward(model, [a, b], inputs, man).exp(), mean, atol=1e-6)
    task = SeqTask("recommendation", vocab, 0, inputs, inputs, targets, None, k=5)
    scores = mean[:, -1].double().log()
    scores[:, 0] = -math.inf
    want = hr_ndcg(rank_of_targets(scores, targets), 5)
    got = recommendation_metrics(model, [a, b], task, mask_seen=False)
    assert (got["hr10"], got["ndcg10"]) == pytest.approx(want, abs=1e-12)
    singles = [recommendation_metrics(model, f, task, mask_seen=False) for f in (a, b)]
    assert all(s != got for s in singles) and recommendation_metrics(model, [a], task, mask_seen=False) == singles[0]
    lm = SeqTask("language_model", vocab, None, inputs, inputs, None, None)
    assert lm_metrics(model, [a, a], lm)["ppl"] == pytest.approx(lm_metrics(model, a, lm)["ppl"], rel=1e-5)
    sys.path.insert(0, str(REPO / "bench"))
    import farzi_fit

    fit_task = SeqTask("recommendation", vocab, 0, inputs, inputs, targets, None, k=5)
    fitted = farzi_fit.fit(model, [a, b], fit_task)
    assert fitted["test_ce"] == pytest.approx(float(nnf.nll_loss(mean[:, -1].log(), targets)), rel=1e-5)
    assert farzi_fit.binomial_se(0.16, 943) == pytest.approx(0.01194, abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the task stays on the CPU, the "
                                                            "model's parameters on the GPU)")
def test_recommendation_metrics_with_parameters_on_the_gpu_match_the_cpu():
    """Regression: with the parameters on CUDA and the task's tensors on the CPU (how experts and
    evaluation networks run on a GPU), masking the seen items compared CPU with CUDA tensors and
    raised (found on an H200 by bench/direct.py). The metrics must equal the CPU's."""
    vocab = 12
    model = seeded_seq_model({"name": "sasrec", "dim": 8, "blocks": 1, "heads": 1, "max_len": 4}, vocab, 0, 0)
    flat = flatten_params(model)
    inputs = torch.tensor([[0, 1, 2, 3], [0, 0, 4, 5], [6, 7, 8, 9]])
    seen = [torch.tensor([1, 2, 3]), torch.tensor([4, 5]), torch.tensor([6, 7, 8, 9])]
    task = SeqTask("recommendation", vocab, 0, inputs, inputs, torch.tensor([4, 1, 10]), seen, k=3)
    cpu = recommendation_metrics(model, flat, task)
    assert recommendation_metrics(model.to("cuda"), flat.to("cuda"), task) == pytest.approx(cpu, abs=1e-6)


def test_evaluation_scores_the_validation_split_beside_the_test_split():
    """``evaluation_metrics``: the test metrics, and the headline metrics on the validation split
    (its own inputs and targets, no sampled negatives) as ``valid_*``; a task without one adds none.
    Here the validation targets are each user's top-scored item and the test targets its 4th: HR@1
    1 and 0, so neither split is read in place of the other."""
    from algorithms.seqtrain import evaluation_metrics

    vocab = 12
    model = seeded_seq_model({"name": "sasrec", "dim": 8, "blocks": 1, "heads": 1, "max_len": 4}, vocab, 0, 0)
    flat = flatten_params(model)
    inputs = torch.tensor([[0, 1, 2, 3], [0, 0, 4, 5]])
    order = functional_forward(model, flat, inputs, manifest_of(model))[:, -1].argsort(1, descending=True)
    negatives = torch.stack([order[0, [6, 7, 8]], order[1, [8, 9, 10]]])
    task = SeqTask("recommendation", vocab, None, inputs, inputs, order[:, 3], None, k=1, test_negatives=negatives,
                   valid_inputs=inputs, valid_targets=order[:, 0], valid_seen=None)
    m = evaluation_metrics(model, flat, task)
    assert m["hr10"] == 0.0 and m["valid_hr10"] == 1.0 and m["valid_ndcg10"] == 1.0
    assert m["hr10_s3"] == 1.0 and "valid_hr10_s3" not in m  # sampled metrics on the test split only
    no_valid = SeqTask("recommendation", vocab, None, inputs, inputs, order[:, 3], None, k=1)
    assert no_valid.validation() is None and set(evaluation_metrics(model, flat, no_valid)) == {"hr10", "ndcg10"}


def test_cosine_outer_schedule_and_clipping_resume_exactly():
    a = _distiller(outer_schedule="cosine", clip_norm=1e-3, outer_lr=0.1, iterations=4)
    lrs = [a.step()["outer_lr"] for _ in range(2)]
    assert lrs == pytest.approx([0.1, 0.1 * (1 + math.cos(math.pi / 4)) / 2])
    # clipped to norm 1e-3: Adam's first moment after one step is (1 - beta1) x the clipped gradient
    b = _distiller(clip_norm=1e-3)
    out = b.step()
    assert out["grad_norm"] > 1e-2  # the raw meta-gradient is far above the clip
    m = [b.opt.state[p]["exp_avg"] for p in (b.F, b.M)]
    assert float(torch.sqrt(sum((x.double() ** 2).sum() for x in m))) == pytest.approx(0.1 * 1e-3, rel=1e-4)
    state = a.state_dict()
    ref = [a.step() for _ in range(2)]
    c = _distiller(outer_schedule="cosine", clip_norm=1e-3, outer_lr=0.1, iterations=4)
    c.load_state_dict(state)
    again = [c.step() for _ in range(2)]
    assert [r["outer_lr"] for r in again] == pytest.approx([0.1 * (1 + math.cos(math.pi * i / 4)) / 2 for i in (2, 3)])
    assert [r["loss"] for r in again] == [r["loss"] for r in ref]
    with pytest.raises(ValueError, match="needs the number of outer iterations"):
        _distiller(outer_schedule="cosine")


def test_theta_samples_average_the_meta_gradients_of_that_many_problems_and_resume_exactly():
    """theta_samples K: one outer step's gradient is the mean of the meta-gradients of the next K
    problems the distiller's generator draws (theta_0, real batch), its loss their mean loss; a
    restored distiller continues identically."""
    from algorithms.farzi import meta_gradient

    trajs3 = dict(max_start_epoch=2, precision="float64")
    ref = _distiller(**trajs3)  # K = 1: draw the same problems by hand
    parts = []
    for _ in range(3):
        theta0, prob, info = ref.problem()
        parts.append((meta_gradient("reverse", theta0, prob, ref.hp), info))
    d = _distiller(theta_samples=3, **trajs3)
    seen = {}
    original = d.opt.step
    d.opt.step = lambda *a, **k: (seen.update(F=d.F.grad.clone(), M=d.M.grad.clone()), original(*a, **k))[1]
    out = d.step()
    for i, name in enumerate("FM"):
        mean = sum(r.grads[i] for r, _ in parts) / 3
        assert rel_err(seen[name], mean) < 1e-12
    assert out["loss"] == pytest.approx(sum(r.outer_loss for r, _ in parts) / 3, rel=1e-12)
    assert out["start_epoch"] == pytest.approx(sum(i["start_epoch"] for _, i in parts) / 3)
    assert len({i["start_epoch"] for _, i in parts}) > 1  # the three problems differ
    state = d.state_dict()
    nxt = [d.step()["loss"] for _ in range(2)]
    e = _distiller(theta_samples=3, seed=7, **trajs3)
    e.load_state_dict(state)
    assert [e.step()["loss"] for _ in range(2)] == nxt


def test_real_init_starts_each_synthetic_sequence_as_a_real_one():
    d = _distiller(init="real", latent_dim=12)
    probs = d.synthetic().probs()  # [4, 6, 15]
    top = probs.argmax(-1)
    # which real rows were drawn: replay the generator (seeded 0; F's and M's draws come first)
    g = torch.Generator().manual_seed(0)
    torch.randn(4, 6, 12, generator=g)
    torch.randn(12, 15, generator=g)
    rows = d.real[torch.randperm(len(d.real), generator=g)[:4]][:, -6:]
    assert (top == rows).float().mean() >= 0.9
    assert float(probs.max(-1).values.mean()) > 0.5  # peaked, not the near-uniform random start
    assert float(_distiller().synthetic().probs().max(-1).values.mean()) < 0.3


def test_real_init_draws_sequences_that_fill_every_position():
    """A left-padded real sequence would leave its padding positions at random F (near-uniform
    items): the start is drawn among the sequences that fill all seq_len positions, or the longest."""
    from algorithms.farzi import real_init

    g = torch.Generator().manual_seed(0)
    real = torch.randint(1, 50, (30, 10), generator=g)
    lengths = torch.tensor([10] * 3 + [8] * 3 + [7] * 4 + [3] * 20)  # seq_len 8: 6 fill it, 4 one short
    real[torch.arange(10) < (10 - lengths).unsqueeze(1)] = 0  # left padding
    M = torch.randn(16, 50, generator=g) / 4
    for mu, allowed in ((5, set(range(6))), (8, set(range(10)))):  # 5 of the 6 full; 8: those 6, 2 one short
        top = decode(real_init(torch.randn(mu, 8, 16, generator=g), M, real, 0, 1.0, torch.Generator().manual_seed(mu)),
                     M, 1.0, 0).argmax(-1)
        drawn = {i for row in top for i in range(30) if (row == real[i, -8:]).float().mean() >= 0.75}
        assert len(drawn) == mu and drawn <= allowed and (mu < 6 or set(range(6)) <= drawn)
        assert (top != 0).all()
    with pytest.raises(ValueError, match="needs 31 real sequences"):
        real_init(torch.randn(31, 8, 16), M, real, 0, 1.0, g)


@pytest.mark.parametrize("d, median, top1", [(16, 0.65, 0.65), (64, 0.85, 0.99)])
def test_real_init_is_peaked_on_a_movielens_sized_catalogue(d, median, top1):
    """1683 items: a fixed logit of 10 left the real item ~37% probability at d = 16 (4 nats of
    entropy per position, worse than the real sequences); the logit is now chosen for 90% where d
    allows it, the most peaked start where it does not."""
    from algorithms.farzi import real_init

    g = torch.Generator().manual_seed(0)
    vocab = 1683
    F0, M = torch.randn(40, 30, d, generator=g), torch.randn(d, vocab, generator=g) / math.sqrt(d)
    real = torch.randint(1, vocab, (200, 30), generator=g)
    probs = decode(real_init(F0, M, real, 0, 1.0, torch.Generator().manual_seed(1)), M, 1.0, 0)
    rows = real[torch.randperm(200, generator=torch.Generator().manual_seed(1))[:40]]
    p_item = probs.gather(-1, rows.unsqueeze(-1)).squeeze(-1)
    assert float(p_item.median()) > median and float((probs.argmax(-1) == rows).float().mean()) > top1
    assert float(p_item.median()) < 0.95  # not saturated: F keeps a gradient


def _trained_trajectory(epochs=3, steps_per_epoch=4, seed=0):
    """A real (tiny) expert: the _distiller model trained with Adam on its real data, one
    checkpoint per 'epoch' of a few steps (epoch 0 is the init)."""
    model = seeded_seq_model({"name": "sasrec", "dim": 8, "blocks": 1, "heads": 1, "max_len": 8}, 15, 0, 0)
    real = torch.randint(1, 15, (20, 8), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    ckpts = [flatten_params(model)]
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            loss = sequence_loss(model(real), real, 0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        ckpts.append(flatten_params(model))
    return torch.stack(ckpts)


def test_match_objective_is_the_normalised_distance_to_the_expert_checkpoint_and_its_meta_gradient_is_exact():
    from algorithms.farzi import meta_gradient

    d = _distiller(objective="match", expert_epochs=2, max_start_epoch=1, precision="float64")
    d.trajectories = [_trained_trajectory().double()]
    theta0, prob, info = d.problem(expert=0, start=1)
    traj = d.trajectories[0]
    assert torch.equal(theta0, traj[1]) and info["start_epoch"] == 1.0
    assert float(prob.outer(traj[1])) == pytest.approx(1.0, rel=1e-12)  # normalised by the start's distance
    assert float(prob.outer(traj[3])) == 0.0
    rev = meta_gradient("reverse", theta0, prob, d.hp)
    unr = meta_gradient("unrolled", theta0, prob, d.hp)
    assert rev.outer_loss == pytest.approx(unr.outer_loss, rel=1e-10)
    for a, b in zip(rev.grads, unr.grads):
        assert float(b.norm()) > 0 and rel_err(a, b) < 1e-6
    # and against a central finite difference of the whole inner loop along a random direction of F
    g = torch.Generator().manual_seed(3)
    dF = torch.randn(d.F.shape, generator=g, dtype=d.F.dtype)
    h, base = 1e-5, d.F.detach().clone()

    def outer_at(F):
        with torch.no_grad():
            d.F.copy_(F)
        return meta_gradient("unrolled", theta0, prob, d.hp).outer_loss

    fd = (outer_at(base + h * dF) - outer_at(base - h * dF)) / (2 * h)
    outer_at(base)
    assert float((rev.grads[0] * dF).sum()) == pytest.approx(fd, rel=1e-5)


def test_match_objective_windows_and_no_real_batch():
    d = _distiller(objective="match", expert_epochs=2, max_start_epoch=2)
    # 3 checkpoints (epochs 0..2) and a target 2 epochs on: every start is epoch 0
    assert {int(d.problem()[2]["start_epoch"]) for _ in range(20)} == {0}
    with pytest.raises(ValueError, match=r"start epoch 1 outside 0\.\.0"):
        d.problem(expert=0, start=1)
    with pytest.raises(ValueError, match="fewer than expert_epochs"):
        _distiller(objective="match", expert_epochs=3).problem()
    # the loss objective draws the same problems as before the option existed (resumed sweeps continue)
    a, b = _distiller(), _distiller(objective="loss", expert_epochs=1)
    assert [a.problem()[2] for _ in range(5)] == [b.problem()[2] for _ in range(5)]


def test_match_objective_distillation_lowers_the_matching_loss():
    """Outer steps on one expert window (start 1, target 3): the matching loss of the data falls."""
    from algorithms.farzi import meta_gradient

    d = _distiller(objective="match", expert_epochs=2, max_start_epoch=1, precision="float64", outer_lr=0.05,
                   inner_steps=8, latent_dim=6)
    d.trajectories = [_trained_trajectory().double()]
    theta0, prob, _ = d.problem(expert=0, start=1)
    first = meta_gradient("reverse", theta0, prob, d.hp).outer_loss
    for _ in range(25):
        res = meta_gradient("reverse", theta0, prob, d.hp)
        for p, gr in zip((d.F, d.M), res.grads):
            p.grad = gr.to(p.dtype)
        d.opt.step()
        d.opt.zero_grad(set_to_none=True)
    last = meta_gradient("reverse", theta0, prob, d.hp).outer_loss
    assert last < 0.8 * first, (first, last)


def _teacher_logits(V, r, seed=0):
    """A stand-in trained model: logits of rank r (hidden state times item embeddings)."""
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(V, r, generator=g)
    W = torch.randn(r, r, generator=g)
    return lambda ids: torch.tanh(E[ids] @ W) @ E.t() * 2.0, E


@pytest.mark.parametrize("pad_id", [0, None])
def test_teacher_init_decodes_to_the_models_next_item_distributions(pad_id):
    """At full rank the start is exact: position t of a synthetic sequence decodes to the softmax of
    what the model predicts from the real items before t, the first real position to its item (90%),
    padding to the uniform distribution over the non-pad items; the pad id never appears."""
    from algorithms.farzi import real_rows, teacher_init

    V, mu, xi = 12, 5, 6
    logits_of, _ = _teacher_logits(V, 3)
    g = torch.Generator().manual_seed(3)
    real = torch.randint(1, V, (4, 8), generator=g)  # 4 rows for mu = 5: the longest are drawn, one padded
    real = torch.cat([real, torch.randint(1, V, (1, 8), generator=g)])
    if pad_id is not None:
        real[4, :5] = pad_id
    F, M = teacher_init(logits_of, real, pad_id, (mu, xi, 64), 0.7, torch.Generator().manual_seed(1))
    assert F.shape == (mu, xi, 64) and M.shape == (64, V)
    probs = decode(F, M, 0.7, pad_id)
    ids = real_rows(real, pad_id, mu, xi, torch.Generator().manual_seed(1), "teacher")
    lo = 1 if pad_id is not None else 0
    for i in range(mu):
        for t in range(xi):
            p = probs[i, t]
            if pad_id is not None and ids[i, t] == pad_id:
                assert torch.allclose(p[lo:], torch.full((V - lo,), 1 / (V - lo)), atol=1e-5)
            elif t == 0 or (pad_id is not None and ids[i, t - 1] == pad_id):
                assert float(p[ids[i, t]]) == pytest.approx(0.9, abs=1e-4)
            else:
                want = logits_of(ids[i, :t])[-1]
                if pad_id is not None:
                    want[pad_id] = float("-inf")
                assert torch.allclose(p, want.softmax(-1), atol=1e-5), (i, t)
    if pad_id is not None:
        assert float(probs[..., pad_id].max()) == 0.0
        assert (ids == pad_id).any()  # the padded row was drawn (5 rows, 4 fill the window)


def test_teacher_init_below_full_rank_is_the_best_rank_d_approximation():
    """F M is the truncated SVD of the (temperature-scaled, centred) target logits: its error is the
    norm of the dropped singular values, and it shrinks as d grows; columns beyond the rank stay
    trainable (F 0, M random)."""
    from algorithms.farzi import teacher_init

    V, mu, xi = 40, 6, 10
    logits_of, _ = _teacher_logits(V, 8)
    real = torch.randint(1, V, (30, 12), generator=torch.Generator().manual_seed(0))
    full_F, full_M = teacher_init(logits_of, real, 0, (mu, xi, 128), 1.5, torch.Generator().manual_seed(2))
    target = (full_F @ full_M).reshape(mu * xi, V)  # exact at full rank (previous test)
    S = torch.linalg.svdvals(target.double())
    errs = []
    for d in (2, 4, 8, 16):
        F, M = teacher_init(logits_of, real, 0, (mu, xi, d), 1.5, torch.Generator().manual_seed(2))
        err = float((F @ M).reshape(mu * xi, V).double().sub(target).norm())
        assert err == pytest.approx(float(S[d:].norm()), rel=1e-3, abs=1e-4), d
        errs.append(err)
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.5 * errs[0]
    F, M = teacher_init(logits_of, real, 0, (2, 3, 10), 1.0, torch.Generator().manual_seed(2))  # rank <= 6 < 10
    assert float(F[..., 6:].abs().max()) == 0.0 and float(M[6:].abs().min()) > 0.0


def test_distiller_teacher_init_reads_the_first_experts_last_checkpoint():
    model = seeded_seq_model({"name": "sasrec", "dim": 8, "blocks": 1, "heads": 1, "max_len": 8}, 15, 0, 0)
    start = flatten_params(model)
    last = start + 0.3 * torch.randn(start.shape, generator=torch.Generator().manual_seed(5))
    other = start - 0.3 * torch.randn(start.shape, generator=torch.Generator().manual_seed(6))
    trajs = [torch.stack([start, last]), torch.stack([start, other])]
    real = torch.randint(1, 15, (20, 8), generator=torch.Generator().manual_seed(1))
    cfg = FarziConfig(budget=4, seq_len=6, latent_dim=15, inner_steps=2, real_batch=8, init="teacher")
    d = FarziDistiller(model, trajs, real, 15, 0, cfg, seed=0)
    probs = d.synthetic().probs()
    g = torch.Generator().manual_seed(0)  # the distiller draws F's and M's random start first
    torch.randn(4, 6, 15, generator=g)
    torch.randn(15, 15, generator=g)
    from algorithms.farzi import real_rows

    ids = real_rows(real, 0, 4, 6, g, "teacher")
    man = manifest_of(model)
    for theta, close in ((last, True), (other, False)):
        want = functional_forward(model, theta, ids, man)[:, :-1].index_fill(-1, torch.tensor([0]), float("-inf"))
        assert torch.allclose(probs[:, 1:], want.softmax(-1), atol=1e-4) is close
    d.step()  # and it distils from there
    assert not torch.allclose(d.synthetic().probs(), probs)


def test_teacher_start_trains_a_better_model_than_the_same_users_hard_sequences():
    """Users have a taste (one of 4 genres of 10 items) and pick 12 items from it. An expert trained
    on 400 users knows every genre's items; 8 users' 96 items show a few of each. Fresh models
    trained on the teacher start of 8 sequences (the expert's next-item distributions along those
    users) predict held-out users' items better than models trained on the same users' ids
    (ML-100k, 50 x 50: HR@10 14.5 against 5.6)."""
    from algorithms.farzi import real_rows, teacher_init

    V, n, length, mu = 41, 400, 12, 8  # id 0 is padding; genre k holds items 10k+1 .. 10k+10
    g = torch.Generator().manual_seed(0)
    genre = torch.randint(0, 4, (n + 100, 1), generator=g)
    seqs = 1 + 10 * genre + torch.randint(0, 10, (n + 100, length), generator=g)
    train, held = seqs[:n], seqs[n:]
    spec = {"name": "sasrec", "dim": 16, "blocks": 1, "heads": 1, "max_len": length}

    def fit(x, steps, seed, batch=None):
        torch.manual_seed(seed)
        m = seeded_seq_model(spec, V, 0, seed)
        opt = torch.optim.Adam(m.parameters(), lr=0.01)
        for _ in range(steps):
            xb = x if batch is None else x[torch.randint(0, len(x), (batch,), generator=g)]
            loss = sequence_loss(m(xb), xb, 0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return m.eval()

    def held_loss(m):
        with torch.no_grad():
            return float(sequence_loss(m(held), held, 0))

    expert = fit(train, 200, 1, batch=64)
    assert held_loss(expert) < math.log(10) + 0.3  # it knows the genres (ideal: ~log 10 after the first item)
    F, M = teacher_init(expert, train, 0, (mu, length, 16), 1.0, torch.Generator().manual_seed(2))
    taught = decode(F, M, 1.0, 0)
    users = real_rows(train, 0, mu, length, torch.Generator().manual_seed(2), "teacher")  # the rows it read
    assert (taught[:, 0].argmax(-1) == users[:, 0]).all()
    losses = {name: [held_loss(fit(x, 40, s)) for s in (3, 4)] for name, x in (("hard", users), ("teacher", taught))}
    assert max(losses["teacher"]) < min(losses["hard"]) - 0.5, losses  # measured 2.5-2.9 against 4.7
    assert max(losses["teacher"]) < math.log(10) + 0.7, losses  # near the expert, far below uniform (log 40)


def test_outer_positions_last_scores_each_real_sequences_last_item_and_draws_the_same_problems():
    """outer_positions 'last': the outer loss is the cross-entropy of each real sequence's last id given
    the rest (padding-only contexts ignored), its meta-gradient is exact, and the problems drawn are
    those of the default (a spec that adds the option keeps its sampling)."""
    import torch.nn.functional as nnf

    from algorithms.farzi import meta_gradient
    from algorithms.seqmodels import last_item_loss

    ids = torch.tensor([[0, 0, 3, 4], [1, 2, 3, 4], [0, 0, 0, 5]])
    logits = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(0))
    want = nnf.cross_entropy(logits[:2, -2], ids[:2, -1])  # the third has no item before its last
    assert float(last_item_loss(logits, ids, 0)) == pytest.approx(float(want), rel=1e-6)

    a, b = (_distiller(precision="float64", real_batch=20, **kw) for kw in ({}, {"outer_positions": "last"}))
    assert [a.problem()[2] for _ in range(4)] == [b.problem()[2] for _ in range(4)]
    theta0, prob, _ = b.problem(expert=0, start=1)
    theta0_a, prob_a, _ = a.problem(expert=0, start=1)
    logits = b._forward(theta0, b.real)  # the real batch is all 20 sequences: either loss is their mean
    assert float(prob.outer(theta0)) == pytest.approx(float(last_item_loss(logits, b.real, 0)), rel=1e-9)
    assert float(prob_a.outer(theta0)) == pytest.approx(float(sequence_loss(logits, b.real, 0)), rel=1e-9)
    assert float(prob.outer(theta0)) != pytest.approx(float(prob_a.outer(theta0)), rel=1e-3)
    rev = meta_gradient("reverse", theta0, prob, b.hp)
    unr = meta_gradient("unrolled", theta0, prob, b.hp)
    assert rev.outer_loss == pytest.approx(unr.outer_loss, rel=1e-10)
    for x, y in zip(rev.grads, unr.grads):
        assert float(y.norm()) > 0 and rel_err(x, y) < 1e-6


def _window_problem(steps: int, window: int):
    """tiny_problem whose synthetic row 3 is used only before the window (its last ``window``
    steps train on rows 0-2), so the truncated meta-gradient of F[3] is exactly zero."""
    model, man, theta0, prob = tiny_problem(steps)
    g = torch.Generator().manual_seed(5)
    prob.batches = [torch.randperm(4, generator=g)[:3] if t < steps - window else torch.tensor([0, 1, 2])
                    for t in range(steps)]
    assert any(3 in b.tolist() for b in prob.batches[: steps - window])
    return theta0, prob


@pytest.mark.parametrize("window", [1, 7])
def test_truncated_backward_reverses_the_last_steps_like_autograd_through_the_window(window):
    """backward_steps W: the forward pass runs all T steps (the outer loss is T steps'), the meta-gradient
    is autograd's through the last W steps with the state after step T - W detached; reverse mode gives
    it to 1e-6, with and without checkpoints, and W = T (or 0) is the full meta-gradient."""
    steps = 20
    theta0, prob = _window_problem(steps, window)
    hp = AdamHP(lr=0.01)
    full = unrolled_meta_grad(theta0, prob, hp)
    ref = unrolled_meta_grad(theta0, prob, hp, window=window)
    assert ref.outer_loss == pytest.approx(full.outer_loss, rel=1e-12)  # the same T-step forward
    assert torch.equal(ref.theta, full.theta)
    for every in (0, 4):
        rev = reverse_meta_grad(theta0, prob, hp, checkpoint_every=every, window=window)
        assert rev.outer_loss == pytest.approx(full.outer_loss, rel=1e-12)
        for name, a, b in zip("FM", rev.grads, ref.grads):
            assert float(b.norm()) > 0 and rel_err(a, b) < 1e-6, (name, every, rel_err(a, b))
    # row 3 is trained on only before the window: the truncated gradient ignores it, the full one does not
    assert float(ref.grads[0][3].abs().max()) == 0.0 and float(full.grads[0][3].norm()) > 0
    assert rel_err(ref.grads[1], full.grads[1]) > 1e-3  # a different gradient, not the full one
    for w in (0, steps):
        for a, b in zip(reverse_meta_grad(theta0, prob, hp, window=w).grads, full.grads):
            assert rel_err(a, b) < 1e-6


def test_truncated_backward_and_random_unroll_in_the_distiller():
    """backward_steps reaches the meta-gradient (the distiller's step equals meta_gradient with the
    window on the problem it draws); unroll 'random' draws N in backward_steps..inner_steps inner steps
    (all of them over many problems) and reports them; 'fixed' draws the problems of the default; a
    window longer than the inner loop is an error naming the field; a distiller resumes exactly."""
    from algorithms.farzi import meta_gradient

    with pytest.raises(ValueError, match=r"backward_steps \(4\) exceeds inner_steps \(3\)"):
        _distiller(backward_steps=4)
    base = _distiller(precision="float64", inner_steps=6)
    fixed = _distiller(precision="float64", inner_steps=6, backward_steps=2)
    assert [base.problem()[2] for _ in range(4)] == [fixed.problem()[2] for _ in range(4)]
    assert {fixed.problem()[2]["inner_steps"] for _ in range(5)} == {6.0}

    rnd = _distiller(precision="float64", inner_steps=6, backward_steps=2, unroll="random")
    drawn = [len(rnd.problem()[1].batches) for _ in range(60)]
    assert set(drawn) == {2, 3, 4, 5, 6}, sorted(set(drawn))

    ref = _distiller(precision="float64", inner_steps=6, backward_steps=2, unroll="random", seed=3)
    d = _distiller(precision="float64", inner_steps=6, backward_steps=2, unroll="random", seed=3)
    theta0, prob, info = ref.problem()
    want = meta_gradient("reverse", theta0, prob, ref.hp, window=2)
    whole = meta_gradient("reverse", theta0, prob, ref.hp)
    seen = {}
    original = d.opt.step
    d.opt.step = lambda *a, **k: (seen.update(F=d.F.grad.clone()), original(*a, **k))[1]
    out = d.step()
    assert out["inner_steps"] == info["inner_steps"] == len(prob.batches)
    assert out["loss"] == pytest.approx(want.outer_loss, rel=1e-12)
    assert rel_err(seen["F"], want.grads[0]) < 1e-12
    if len(prob.batches) > 2:
        assert rel_err(seen["F"], whole.grads[0]) > 1e-3
    state = d.state_dict()
    nxt = [d.step()["loss"] for _ in range(3)]
    e = _distiller(precision="float64", inner_steps=6, backward_steps=2, unroll="random", seed=11)
    e.load_state_dict(state)
    assert [e.step()["loss"] for _ in range(3)] == nxt


@pytest.mark.slow  # 4-7 s (subprocesses or training): kept out of the inner loop
def test_bench_farzi_memory_runs_and_its_two_modes_agree_on_the_window(tmp_path):
    """bench/farzi_memory.py --quick at two tiny horizons, in this process, with a backward window: the
    script runs (it once built a config its checks refuse) and reverse mode and unrolled autograd give
    the same truncated meta-gradient."""
    import json
    import sys

    from .conftest import REPO

    sys.path.insert(0, str(REPO / "bench"))
    import farzi_memory

    out = tmp_path / "fm.json"
    assert farzi_memory.main(["--quick", "--steps", "2", "4", "--backward-steps", "2", "--repeats", "1",
                              "--in-process", "--json", str(out), "--decode", "both"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["T"] for r in rows] == [2, 4]
    assert all(r["rel_err_reverse_vs_unrolled"] < 1e-5 for r in rows), rows
    # --decode both: the old way's calls beside this way's, the same meta-gradient (float32)
    for r in rows:
        for run in r["runs"].values():
            ab = run["decode_ab"]
            assert len(ab["times_s"]["once"]) == len(ab["times_s"]["per-step"]) == 1 and ab["rel_err"] < 1e-5, ab
            assert ab["ratio"] == pytest.approx(ab["sec_per_step"] / ab["sec_once"])


def _dropout_problem(steps: int, replay: bool = True):
    """tiny_problem's bilevel problem on a SASRec with dropout 0.3, each inner step in its seeded
    context; ``replay=False`` draws a new seed at every call instead, so the reverse pass meets other
    masks than the forward pass used."""
    from algorithms.farzi import seeded_dropout

    model, man, theta0, prob = tiny_problem(steps, dropout=0.3)
    seeds = torch.randint(2**62, (steps,), generator=torch.Generator().manual_seed(5)).tolist()
    calls = iter(range(10**6))
    prob.step_context = ((lambda t: seeded_dropout(model, seeds[t - 1])) if replay else
                         (lambda t: seeded_dropout(model, 1000 + next(calls))))
    return model, theta0, prob


@pytest.mark.parametrize("steps,window", [(5, 0), (20, 0), (20, 7)])
def test_inner_dropout_replayed_by_the_reverse_pass_equals_autograd(steps, window):
    """inner_dropout: with each step's masks seeded, reverse-mode Adam gives autograd's meta-gradient
    through the dropout inner loop (with a window too), a different gradient from the one without
    dropout; the same code drawing fresh masks in the reverse pass is off. With a checkpoint at every
    step (nothing undone, every gradient recomputed with its step's masks) the two agree to 1e-12;
    undoing the Adam steps adds its float64 rounding (~1e-6 here: dropout's zeroed units leave tiny
    gradient coordinates, whose Adam steps are the ill-conditioned ones to undo; 1e-10 without it)."""
    model, theta0, prob = _dropout_problem(steps)
    hp = AdamHP(lr=0.01)
    ref = unrolled_meta_grad(theta0, prob, hp, window=window)
    assert not model.training  # each step's context restored the mode
    for every, tol in ((1, 1e-12), (0, 1e-5), (4, 1e-5)):
        rev = reverse_meta_grad(theta0, prob, hp, checkpoint_every=every, window=window)
        assert rev.outer_loss == pytest.approx(ref.outer_loss, rel=1e-12)
        for name, a, b in zip("FM", rev.grads, ref.grads):
            assert float(b.norm()) > 0 and rel_err(a, b) < tol, (name, every, rel_err(a, b))
    plain = unrolled_meta_grad(theta0, InnerProblem(prob.data, prob.loss, prob.outer, prob.data_params, prob.batches),
                               hp, window=window)
    assert rel_err(plain.grads[0], ref.grads[0]) > 1e-2  # dropout changes the inner loop
    _, _, fresh = _dropout_problem(steps, replay=False)
    off = reverse_meta_grad(theta0, fresh, hp, window=window)
    err = rel_err(off.grads[0], ref.grads[0])  # NaN where undoing Adam with other gradients breaks the reversal
    assert not err < 1e-2, err


def test_seeded_dropout_draws_the_seeds_masks_and_leaves_the_callers_state():
    from algorithms.farzi import seeded_dropout

    model = _dropout_problem(1)[0]
    x = torch.randint(1, V, (3, L))
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    with seeded_dropout(model, 7):
        a = model(x)
    with seeded_dropout(model, 7):
        b = model(x)
    with seeded_dropout(model, 8):
        c = model(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.random.get_rng_state(), before) and not model.training
    assert not torch.equal(a, model(x))  # eval mode: no dropout


def test_inner_dropout_in_the_distiller():
    """inner_dropout: refused for a model without dropout (it would change nothing); with dropout, the
    distiller's step equals meta_gradient on the problem it draws, with that problem's masks, and
    differs from the step without them; a spec without it draws the problems it drew before; a
    distiller resumes exactly."""
    from algorithms.farzi import meta_gradient

    with pytest.raises(ValueError, match="inner_dropout: the model has no dropout"):
        _distiller(inner_dropout=True)

    def dropped(seed=0, **kw):
        return _distiller(seed=seed, precision="float64", inner_steps=4, dropout=0.3, **kw)

    ref, d = dropped(3, inner_dropout=True), dropped(3, inner_dropout=True)
    theta0, prob, info = ref.problem()
    assert prob.step_context is not None
    want = meta_gradient("reverse", theta0, prob, ref.hp)
    unrolled = meta_gradient("unrolled", theta0, prob, ref.hp)
    assert rel_err(want.grads[0], unrolled.grads[0]) < 1e-6
    seen = {}
    original = d.opt.step
    d.opt.step = lambda *a, **k: (seen.update(F=d.F.grad.clone()), original(*a, **k))[1]
    d.step()
    assert rel_err(seen["F"], want.grads[0]) < 1e-12
    no = dropped(3)
    theta_n, prob_n, info_n = no.problem()
    assert prob_n.step_context is None and info_n == info and torch.equal(theta_n, theta0)
    assert rel_err(meta_gradient("reverse", theta_n, prob_n, no.hp).grads[0], want.grads[0]) > 1e-2
    base, plain = _distiller(inner_steps=4), dropped(0)
    assert [base.problem()[2] for _ in range(3)] == [plain.problem()[2] for _ in range(3)]
    state = d.state_dict()
    nxt = [d.step()["loss"] for _ in range(2)]
    e = dropped(11, inner_dropout=True)
    e.load_state_dict(state)
    assert [e.step()["loss"] for _ in range(2)] == nxt


def _exact_and_not(theta0, prob, other, hp):
    """The meta-gradient of ``prob`` is the same in reverse mode and unrolled (1e-6), and not that of
    ``other`` (the same problem with the outer loss it replaces)."""
    from algorithms.farzi import meta_gradient

    rev = meta_gradient("reverse", theta0, prob, hp)
    unr = meta_gradient("unrolled", theta0, prob, hp)
    for x, y in zip(rev.grads, unr.grads):
        assert float(y.norm()) > 0 and rel_err(x, y) < 1e-6
    assert rel_err(meta_gradient("reverse", theta0, other, hp).grads[0], rev.grads[0]) > 1e-3


def test_outer_positions_last_unseen_ranks_the_last_item_among_the_unseen_ones():
    """outer_positions 'last_unseen': each sequence's last id against the ids it has not seen (nor the
    padding id), as the evaluation ranks; the seen ids' scores get no gradient; the distiller's
    meta-gradient is exact in both modes and differs from 'last'."""
    from algorithms.seqmodels import last_item_loss

    ids = torch.tensor([[0, 2, 3, 4], [1, 2, 3, 4], [0, 0, 0, 5], [2, 1, 2, 1]])  # the last repeats its target
    logits = torch.randn(4, 4, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    want = []
    for row, allowed in ((0, [1, 4, 5]), (1, [4, 5]), (3, [1, 3, 4, 5])):
        s = logits[row, -2]
        want.append(-(s[ids[row, -1]] - s[allowed].logsumexp(0)))
    loss = last_item_loss(logits, ids, 0, mask_seen=True)
    assert float(loss.detach()) == pytest.approx(float(torch.stack(want).mean().detach()), rel=1e-6)
    assert float(loss.detach()) < float(last_item_loss(logits, ids, 0).detach())  # fewer competitors
    (g,) = torch.autograd.grad(loss, logits)
    assert float(g[0, -2, [0, 2, 3]].abs().max()) == 0.0 and float(g[0, -2, [1, 4, 5]].abs().min()) > 0

    d = _distiller(precision="float64", real_batch=20, outer_positions="last_unseen")
    last = _distiller(precision="float64", real_batch=20, outer_positions="last")
    theta0, prob, _ = d.problem(expert=0, start=1)
    _, prob_last, _ = last.problem(expert=0, start=1)
    logits = d._forward(theta0, d.real)
    assert float(prob.outer(theta0)) == pytest.approx(float(last_item_loss(logits, d.real, 0, mask_seen=True)),
                                                      rel=1e-9)
    _exact_and_not(theta0, prob, prob_last, d.hp)


def test_outer_target_teacher_scores_against_the_experts_predictions():
    """outer_target 'teacher': the outer loss is the cross-entropy against the first expert's last
    checkpoint's next-item distributions on the real batch (all real positions; or the final one,
    over the unseen items with last_unseen), minimal where the model is the teacher; the distiller's
    meta-gradient is exact in both modes, differs from the data targets', and the problems drawn are
    the default's."""
    import torch.nn.functional as nnf

    from algorithms.seqmodels import teacher_loss

    ids = torch.tensor([[0, 2, 3, 4], [1, 2, 3, 4], [0, 0, 0, 5]])
    g = torch.Generator().manual_seed(0)
    logits, teach = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 6, generator=g)

    def ce(s, t, allowed):
        return -(t[allowed].softmax(-1) * s[allowed].log_softmax(-1)).sum()

    real = [(r, p) for r in range(3) for p in range(4) if ids[r, p] != 0]
    want = sum(ce(logits[r, p], teach[r, p], [1, 2, 3, 4, 5]) for r, p in real) / len(real)
    assert float(teacher_loss(logits, teach, ids, 0, "all")) == pytest.approx(float(want), rel=1e-5)
    want = sum(ce(logits[r, -1], teach[r, -1], [1, 2, 3, 4, 5]) for r in range(3)) / 3
    assert float(teacher_loss(logits, teach, ids, 0, "last")) == pytest.approx(float(want), rel=1e-5)
    unseen = ([1, 5], [5], [1, 2, 3, 4])
    want = sum(ce(logits[r, -1], teach[r, -1], unseen[r]) for r in range(3)) / 3
    assert float(teacher_loss(logits, teach, ids, 0, "last_unseen")) == pytest.approx(float(want), rel=1e-5)
    # a soft cross-entropy: the teacher itself scores its own entropy, anything else more
    for pos in ("all", "last", "last_unseen"):
        assert float(teacher_loss(teach, teach, ids, 0, pos)) < float(teacher_loss(logits, teach, ids, 0, pos))
    assert float(teacher_loss(teach, teach, ids, None, "last")) == pytest.approx(
        float(-(nnf.softmax(teach[:, -1], -1) * nnf.log_softmax(teach[:, -1], -1)).sum(-1).mean()), rel=1e-6)

    d = _distiller(precision="float64", real_batch=20, outer_target="teacher", outer_positions="last")
    data = _distiller(precision="float64", real_batch=20, outer_positions="last")
    assert [d.problem()[2] for _ in range(3)] == [data.problem()[2] for _ in range(3)]
    theta0, prob, _ = d.problem(expert=0, start=1)
    _, prob_data, _ = data.problem(expert=0, start=1)
    teacher = d.trajectories[0][-1].double()
    want = teacher_loss(d._forward(theta0, d.real), d._forward(teacher, d.real), d.real, 0, "last")
    assert float(prob.outer(theta0)) == pytest.approx(float(want), rel=1e-9)
    _exact_and_not(theta0, prob, prob_data, d.hp)


def test_teacher_experts_average_the_experts_distributions():
    """teacher_experts k: the teacher of init and outer_target 'teacher' is the mean next-id
    distribution of the first k experts' last checkpoints (1: the first's logits, as before); the
    init decodes to it and the outer loss scores against it; refused where nothing reads it or
    where there are fewer experts."""
    from algorithms.seqmodels import teacher_loss

    model = seeded_seq_model({"name": "sasrec", "dim": 8, "blocks": 1, "heads": 1, "max_len": 8}, 15, 0, 0)
    start = flatten_params(model)
    ends = [start + 0.5 * torch.randn(start.shape, generator=torch.Generator().manual_seed(s)) for s in (5, 6, 7)]
    trajs = [torch.stack([start, e]) for e in ends]
    real = torch.randint(1, 15, (20, 8), generator=torch.Generator().manual_seed(1))
    man = manifest_of(model)

    def distiller(**kw):
        cfg = FarziConfig(**{"budget": 4, "seq_len": 6, "latent_dim": 15, "inner_steps": 2, "real_batch": 20,
                             "init": "teacher", "outer_target": "teacher", "outer_positions": "last", **kw})
        return FarziDistiller(model, trajs, real, 15, 0, cfg, seed=0)

    one, two = distiller(), distiller(teacher_experts=2)
    assert torch.equal(one.teacher(real), functional_forward(model, ends[0], real, man))
    mean = (functional_forward(model, ends[0], real, man).softmax(-1)
            + functional_forward(model, ends[1], real, man).softmax(-1)) / 2
    assert torch.allclose(two.teacher(real).softmax(-1), mean, atol=1e-6)
    assert not torch.allclose(mean, functional_forward(model, ends[0], real, man).softmax(-1), atol=1e-2)
    # the start decodes to the ensemble's predictions (rank 15 = V: exact)
    g = torch.Generator().manual_seed(0)
    torch.randn(4, 6, 15, generator=g)
    torch.randn(15, 15, generator=g)
    from algorithms.farzi import real_rows

    ids = real_rows(real, 0, 4, 6, g, "teacher")
    assert torch.equal(real[two.init_index][:, -6:], ids)  # the distiller says which rows its start read
    want = two.teacher(ids)[:, :-1].index_fill(-1, torch.tensor([0]), float("-inf")).softmax(-1)
    assert torch.allclose(two.synthetic().probs()[:, 1:], want, atol=1e-4)
    # the outer loss scores against the ensemble
    theta0, prob, _ = two.problem(expert=0, start=0)
    assert float(prob.outer(theta0)) == pytest.approx(float(teacher_loss(
        functional_forward(model, theta0, real, man), mean.log(), real, 0, "last")), rel=1e-5)
    _, prob1, _ = one.problem(expert=0, start=0)
    assert float(prob1.outer(theta0)) != pytest.approx(float(prob.outer(theta0)), rel=1e-3)
    with pytest.raises(ValueError, match="teacher_experts is 4, but there are 3 experts"):
        distiller(teacher_experts=4)
    with pytest.raises(ValueError, match="neither init nor outer_target is 'teacher'"):
        FarziConfig(budget=4, teacher_experts=2)


def test_bench_farzi_fit_measures_the_train_and_test_items_cross_entropy():
    """bench/farzi_fit.py's measure on a hand-made task: the train CE is the mean last-item loss over
    every training sequence (batched by 256), the test CE that of each held-out item at the last
    position, beside the evaluation's HR@10 and validation HR@10."""
    import sys

    import torch.nn.functional as nnf

    from algorithms.seqmodels import last_item_loss
    from algorithms.seqtrain import evaluation_metrics
    from tests.conftest import REPO

    sys.path.insert(0, str(REPO / "bench"))
    import farzi_fit

    g = torch.Generator().manual_seed(4)
    train = torch.randint(1, 15, (300, 8), generator=g)
    inputs, targets = train[:20], torch.randint(1, 15, (20,), generator=g)
    task = SeqTask("recommendation", 15, 0, train, inputs, targets, [row for row in inputs],
                   valid_inputs=inputs[:, :-1], valid_targets=inputs[:, -1], valid_seen=[row for row in inputs[:, :-1]])
    model = seeded_seq_model({"name": "sasrec", "dim": 8, "blocks": 1, "heads": 1, "max_len": 8}, 15, 0, 1)
    params = flatten_params(model)
    got = farzi_fit.fit(model, params, task)
    with torch.no_grad():
        assert got["train_ce"] == pytest.approx(float(last_item_loss(model(train), train, 0)), rel=1e-5)
        assert got["test_ce"] == pytest.approx(float(nnf.cross_entropy(model(inputs)[:, -1], targets)), rel=1e-5)
    m = evaluation_metrics(model, params, task)
    assert (got["hr10"], got["valid_hr10"]) == (m["hr10"], m["valid_hr10"])
    # each user's hit, and the paired difference of two rows on the same users with its standard error
    assert float(got["hits"].mean()) == pytest.approx(got["hr10"]) and len(got["valid_hits"]) == 20
    assert farzi_fit.paired(got["hits"], got["hits"]) == (0.0, 0.0)
    a, b = torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 0.0, 0.5])
    d = torch.tensor([0.0, 1.0, 0.0, -0.5])
    assert farzi_fit.paired(a, b) == pytest.approx((0.125, float(d.std()) / 2))
    assert all(x != x for x in farzi_fit.paired(a, None))


def test_real_drop_last_reads_each_real_sequence_without_its_last_id():
    """real_drop_last: the distiller reads each real row without its last column (for left-padded
    rows, each sequence's last id): the outer loss and the teacher start do not depend on the last
    ids at all (without it, they do), and rows longer than the model's max_len are refused either way."""
    model = seeded_seq_model({"name": "sasrec", "dim": 8, "blocks": 1, "heads": 1, "max_len": 8}, 15, 0, 0)
    start = flatten_params(model)
    trajs = [torch.stack([start, start + 0.5 * torch.randn(start.shape, generator=torch.Generator().manual_seed(5))])]
    real = torch.randint(1, 15, (20, 9), generator=torch.Generator().manual_seed(1))  # max_len + 1 ids
    real[:4, :3] = 0  # a few shorter users, left-padded
    other = real.clone()
    other[:, -1] = (real[:, -1] % 14) + 1  # other last ids

    def problem(rows, **kw):
        cfg = FarziConfig(**{"budget": 4, "seq_len": 6, "latent_dim": 15, "inner_steps": 2, "real_batch": 20,
                             "init": "teacher", "outer_target": "teacher", "outer_positions": "last",
                             "precision": "float64", **kw})
        d = FarziDistiller(model, trajs, rows, 15, 0, cfg, seed=0)
        theta0, prob, _ = d.problem(expert=0, start=0)
        return d, float(prob.outer(theta0))

    d, loss = problem(real, real_drop_last=True)
    d_other, loss_other = problem(other, real_drop_last=True)
    assert torch.equal(d.real, real[:, :-1])
    assert loss == loss_other
    assert torch.equal(d.synthetic().F, d_other.synthetic().F) and torch.equal(d.synthetic().M, d_other.synthetic().M)
    # the same rows cut by hand, without the option: the same start and the same loss
    d_cut, loss_cut = problem(real[:, :-1])
    assert loss_cut == loss and torch.equal(d_cut.synthetic().F, d.synthetic().F)
    # without it the last ids count (rows of max_len ids)
    assert problem(real[:, 1:])[1] != problem(other[:, 1:])[1]
    with pytest.raises(ValueError, match="9 long, more than the model's max_len 8"):
        problem(real)
    with pytest.raises(ValueError, match="without their last id, more than the model's max_len 8"):
        problem(torch.cat([real, real[:, -1:]], 1), real_drop_last=True)


def _farzi_build(data, task, spec_model, **hp):
    """Farzi's distiller from the registry on ``data`` (2-epoch trajectory of a fresh model)."""
    from orchestrator import methods
    from orchestrator.methods import BuildContext

    view = task.seq_task(data, spec_model["max_len"])
    traj = torch.stack([flatten_params(seeded_seq_model(spec_model, view.vocab_size, view.pad_id, 0))] * 2)
    return methods.get("farzi").build(BuildContext(
        budget=3, hp={"seq_len": 6, "latent_dim": 4, "inner_steps": 2, "real_batch": 8, **hp}, iterations=2,
        data=data, task=task, model=spec_model, spec={}, expert_files={}, device=torch.device("cpu"), seed=0,
        preloaded={"full": [traj]}))


@pytest.mark.parametrize("drop", [False, True])
def test_start_record_names_the_users_and_stream_tokens_the_start_read(tmp_path, drop):
    """``Farzi.start_record``: the rows ``init_index`` names, in the data's own terms. MovieLens: the
    users by original id, whose training histories end in what the start decodes to; PTB: each row's
    training-stream tokens [begin, end), whose last seq_len ids (before the last one, with
    real_drop_last) the start decodes to. A random start reads none."""
    from orchestrator import methods
    from orchestrator.sequences import load_sequences
    from orchestrator.tasks import task_for
    from tests.test_sequences import write_ptb

    farzi, spec_model = methods.get("farzi"), {"name": "sasrec", "dim": 8, "blocks": 1, "heads": 1, "max_len": 8}
    g = torch.Generator().manual_seed(0)
    events = [(100 + 3 * u, int(i), 4, t) for u in range(30) for t, i in enumerate(torch.randperm(40, generator=g)[: 6 + u] + 1)]
    (tmp_path / "ml").mkdir()
    (tmp_path / "ml" / "u.data").write_text("".join("\t".join(map(str, e)) + "\n" for e in events))
    words = [f"w{int(i)}" for i in torch.randint(0, 12, (300,), generator=g)]
    ptb = write_ptb(tmp_path / "ptb", " ".join(words[:200]) + "\n", " ".join(words[200:250]) + "\n",
                    " ".join(words[250:]) + "\n")
    for name, root in (("ml-100k", tmp_path / "ml"), ("ptb", ptb)):
        data, task = load_sequences(name, root), task_for(name)
        d = _farzi_build(data, task, spec_model, init="real", latent_dim=64, real_drop_last=drop)
        rec = farzi.start_record(d, task, data, spec_model)
        assert rec["rows"] == d.init_index.tolist() and len(rec["rows"]) == 3
        assert (rec["init"], rec["seq_len"], rec["real_drop_last"]) == ("real", 6, drop)
        decoded = d.synthetic().probs().argmax(-1)
        if name == "ml-100k":
            assert "train_tokens" not in rec
            for user, row in zip(rec["users"], decoded):
                history = data.train_seqs[data.user_original_ids.tolist().index(user)]
                assert torch.equal(row, (history[:-1] if drop else history)[-6:])
            assert all(u % 3 == 1 for u in rec["users"])  # original ids (100 + 3u), not row numbers
        else:
            assert "users" not in rec
            for (begin, end), row in zip(rec["train_tokens"], decoded):
                assert end - begin == 8 + drop
                assert torch.equal(row, data.train[begin:end - drop][-6:])
        assert farzi.start_record(_farzi_build(data, task, spec_model), task, data, spec_model) is None


def test_farzi_trial_with_real_drop_last_never_scores_a_validation_input(tmp_path):
    """A Farzi trial on a leave-one-out split: its real rows are the users' training histories (the
    validation inputs); with real_drop_last they are the same histories without their last item,
    max_len ids each, so that no row is a validation input."""
    from orchestrator.sequences import load_sequences
    from orchestrator.tasks import task_for

    g = torch.Generator().manual_seed(0)
    events = [(u, int(i), 4, t) for u in range(1, 31) for t, i in enumerate(torch.randperm(40, generator=g)[: 5 + u] + 1)]
    root = tmp_path / "ml-100k"
    root.mkdir()
    (root / "u.data").write_text("".join("\t".join(map(str, e)) + "\n" for e in events))
    data = load_sequences("ml-100k", root)
    task = task_for("ml-100k")
    spec_model = {"name": "sasrec", "dim": 8, "blocks": 1, "heads": 1, "max_len": 8}
    view = task.seq_task(data, 8)

    def build(**hp):
        return _farzi_build(data, task, spec_model, **hp)

    assert torch.equal(build().real, view.valid_inputs)  # the validation inputs themselves
    rows = build(real_drop_last=True).real
    assert rows.shape == view.valid_inputs.shape
    for u, history in enumerate(data.train_seqs):
        want = history[:-1][-8:]
        assert torch.equal(rows[u, 8 - len(want):], want) and not rows[u, : 8 - len(want)].any()
        assert not torch.equal(rows[u], view.valid_inputs[u])
