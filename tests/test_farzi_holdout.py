"""bench/farzi_holdout.py's statistics: a group's paired change and the contrast of two groups'
changes, with their standard errors, against direct computations."""
import math
import statistics
import sys

import pytest
import torch

from .conftest import REPO

sys.path.insert(0, str(REPO / "bench"))  # the bench scripts import their helpers as ``common``
holdout = pytest.importorskip("farzi_holdout")


def _changes():
    g = torch.Generator().manual_seed(0)
    before = (torch.rand(3, 10, generator=g) < 0.3).double()  # 3 networks x 10 users' hits
    after = (torch.rand(3, 10, generator=g) < 0.5).double()
    return after - before


def test_change_is_the_mean_with_users_and_networks_errors_in_quadrature():
    d = _changes()
    group = torch.tensor([0, 2, 3, 5, 7, 9])
    mean, se = holdout.change(d, group)
    x = d[:, group]
    assert mean == pytest.approx(float(x.mean()))
    users = statistics.stdev(x.mean(0).tolist()) / math.sqrt(len(group))
    nets = statistics.stdev(x.mean(1).tolist()) / math.sqrt(3)
    assert se == pytest.approx(math.hypot(users, nets))


def test_contrast_is_a_minus_b_with_independent_groups():
    d = _changes()
    a, b = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([5, 6, 7, 8, 9])
    mean, se = holdout.contrast(d, a, b)
    assert mean == pytest.approx(float(d[:, a].mean() - d[:, b].mean()))
    pu = d.mean(0)
    users = math.sqrt(statistics.variance(pu[a].tolist()) / 5 + statistics.variance(pu[b].tolist()) / 5)
    per_net = [float(d[n, a].mean() - d[n, b].mean()) for n in range(3)]
    assert se == pytest.approx(math.hypot(users, statistics.stdev(per_net) / math.sqrt(3)))
    # the same change on both sides: no contrast, whatever the noise
    same = torch.cat([d[:, :5], d[:, :5]], 1)
    assert holdout.contrast(same, a, b)[0] == pytest.approx(0.0, abs=1e-12)
    # one network: no network term
    assert holdout.contrast(d[:1], a, b)[1] == pytest.approx(
        math.sqrt(statistics.variance(d[0, a].tolist()) / 5 + statistics.variance(d[0, b].tolist()) / 5))


def test_user_outcomes_are_the_targets_cross_entropy_among_unseen_items_and_the_teachers():
    from algorithms.seqtrain import SeqTask

    V = 6
    g = torch.Generator().manual_seed(0)
    inputs = torch.tensor([[0, 1, 2], [3, 4, 5], [0, 0, 2]])
    targets = torch.tensor([4, 1, 2])  # the last user's target is an item it has seen: never masked
    seen = [torch.unique(r[r != 0]) for r in inputs]
    task = SeqTask("recommendation", V, 0, inputs, inputs, targets, seen)
    table = torch.randn(V, V, generator=g)

    def logits_of(ids):  # a "model": the next-item logits depend on the last id only
        return table[ids]

    teacher = torch.randn(3, V, generator=g)
    teacher[:, 0] = -float("inf")
    teacher_logp = teacher.double().log_softmax(-1)
    out = holdout.user_outcomes(logits_of, task, teacher_logp)
    ce, tce = out["ce"], out["teacher_ce"]
    for u in range(3):
        s = table[inputs[u, -1]].double()
        allowed = [i for i in range(1, V) if i == targets[u] or i not in seen[u].tolist()]
        want = -(s[targets[u]] - torch.logsumexp(s[allowed], 0))
        assert float(ce[u]) == pytest.approx(float(want), rel=1e-9)
        p = s[1:].log_softmax(-1)
        assert float(tce[u]) == pytest.approx(float(-(teacher_logp[u, 1:].exp() * p).sum()), rel=1e-9)
        others = [i for i in seen[u].tolist() if i != targets[u]]
        assert float(out["seen"][u]) == pytest.approx(float(p.exp()[[i - 1 for i in others]].sum()), rel=1e-9)
    assert float(out["seen"][2]) == 0.0 and float(out["seen"][0]) > 0.0  # the last user has seen only its target


def test_user_outcomes_hits_are_the_metrics_ranking():
    """The hit of one forward pass is what ``recommendation_ranks`` ranks (padding and seen items out)."""
    from algorithms.networks import ensemble_forward, flatten_params, manifest_of
    from algorithms.seqmodels import seeded_seq_model
    from algorithms.seqtrain import SeqTask, recommendation_ranks

    V, L, U = 30, 6, 40
    g = torch.Generator().manual_seed(1)
    inputs = torch.randint(1, V, (U, L), generator=g)
    inputs[:5, :3] = 0  # left padding
    targets = torch.randint(1, V, (U,), generator=g)
    seen = [torch.unique(r[r != 0]) for r in inputs]
    task = SeqTask("recommendation", V, 0, inputs, inputs, targets, seen, k=8)  # hits and misses both
    model = seeded_seq_model({"dim": 8, "heads": 1, "blocks": 1, "max_len": L}, V, 0, 0)
    flat = flatten_params(model)
    ranks, _ = recommendation_ranks(model, flat, task)
    man = manifest_of(model)
    out = holdout.user_outcomes(lambda ids: ensemble_forward(model, [flat], ids, man), task,
                                torch.full((U, V), -math.log(V), dtype=torch.float64))
    assert 0 < float(out["hr10"].sum()) < U
    assert torch.equal(out["hr10"], (ranks < task.k).double())
