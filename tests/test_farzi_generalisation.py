"""bench/farzi_generalisation.py's two losses: Farzi's outer loss (every position of real sequences)
and the held-out item's cross-entropy (what HR@10 ranks), checked against direct computations, and
its inner loop against Farzi's own inner problem."""
import math
import sys

import pytest
import torch

from .conftest import REPO

sys.path.insert(0, str(REPO / "bench"))  # the bench scripts import their helpers as ``common``
gen = pytest.importorskip("farzi_generalisation")

V, L = 15, 8
SPEC = {"name": "sasrec", "dim": 8, "blocks": 1, "heads": 2, "max_len": L}


def _task():
    from algorithms.seqtrain import SeqTask

    g = torch.Generator().manual_seed(0)
    # users walk the catalogue in steps of 1 or 2 from a random item: next items are predictable
    start = torch.randint(1, V, (40, 1), generator=g)
    steps = torch.randint(1, 3, (40, L), generator=g).cumsum(1)
    seqs = (start + steps - 1) % (V - 1) + 1  # ids 1..V-1, 0 is padding
    seqs[:5, :3] = 0  # a few left-padded users
    return SeqTask("recommendation", V, 0, seqs[:, :-1], seqs[:, :-1], seqs[:, -1], None)


def test_the_two_losses_are_the_outer_loss_and_the_held_out_items_cross_entropy():
    from algorithms.seqmodels import hard_loss, seeded_seq_model

    task = _task()
    model = seeded_seq_model(SPEC, V, 0, 1)
    outer = task.train[:16]
    every, held_out = gen.losses(model, outer, task)
    with torch.no_grad():
        assert every == pytest.approx(float(hard_loss(model(outer), outer, 0)), rel=1e-6)
        logits = model(task.test_inputs)[:, -1]
        direct = sum(-math.log(float(torch.softmax(logits[u].double(), -1)[task.test_targets[u]]))
                     for u in range(len(logits))) / len(logits)
    assert held_out == pytest.approx(direct, rel=1e-5)
    assert every == pytest.approx(math.log(V), abs=0.5)  # an untrained model: near uniform


def test_the_inner_loop_is_farzis_and_training_on_the_real_users_lowers_both_losses():
    from algorithms.farzi import AdamHP, InnerProblem, meta_gradient
    from algorithms.networks import flatten_params, functional_forward, manifest_of
    from algorithms.seqmodels import seeded_seq_model, sequence_loss, soft_loss

    task = _task()
    outer = task.train
    x = torch.nn.functional.one_hot(task.train[:10], V).float()  # ten real users as (one-hot) soft sequences
    x[..., 0] = 0.0
    x[task.train[:10] == 0] = 1.0 / V
    steps, lr, eps = 4, 0.01, 1e-3
    model = seeded_seq_model(SPEC, V, 0, 2)
    before = gen.losses(model, outer, task)
    theta0 = flatten_params(model).detach().double()
    after = gen.inner_losses(model, x, steps, lr, eps, outer, task)
    # Farzi's own inner problem from the same theta_0 reaches the same outer loss
    ref = seeded_seq_model(SPEC, V, 0, 2).double().eval()
    man = manifest_of(ref)
    xd = x.double().requires_grad_(True)
    prob = InnerProblem(data=lambda idx: xd, loss=lambda th, d: soft_loss(functional_forward(ref, th, d, man), d),
                        outer=lambda th: sequence_loss(functional_forward(ref, th, outer, man), outer, 0),
                        data_params=[xd], batches=[None] * steps)
    res = meta_gradient("unrolled", theta0, prob, AdamHP(lr, 0.9, 0.999, eps))
    assert after[0] == pytest.approx(res.outer_loss, rel=1e-4)
    assert after[0] < before[0] - 0.05 and after[1] < before[1]
    # no step: the losses of the model as it is
    assert gen.inner_losses(seeded_seq_model(SPEC, V, 0, 2), x, 0, lr, eps, outer, task) == pytest.approx(before)
