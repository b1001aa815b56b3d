"""Quality on digits with fixed seeds: MTT's distilled set must beat a random real subset of
the same size (mean test accuracy over the evaluation networks, same protocol and seeds)."""
import pytest
import torch

from algorithms.evaluate import EvalConfig, evaluate_set, random_real_subset
from algorithms.experts import ExpertConfig, train_expert
from algorithms.mtt import EpochSampler, MTTConfig, MTTDistiller
from algorithms.networks import seeded_network
from orchestrator.datasets import load_dataset
from orchestrator.spec import load_spec

pytestmark = pytest.mark.slow  # distils digits for about a minute

QUICKSTART = load_spec()
MODEL = QUICKSTART.model
EVAL = EvalConfig(networks=3, epochs=300)


@pytest.fixture(scope="module")
def digits_experts():
    data = load_dataset("digits")
    cfg = ExpertConfig(**QUICKSTART.expert_training())
    trajectories = []
    for k in range(QUICKSTART.experts["count"]):
        trajectories.append(torch.stack([c.params for c in train_expert(MODEL, data, cfg, seed=1000 + k)]))
    return data, trajectories


# measured (quickstart experts, 3 networks x 300 epochs; random 56.3 / 94.8): IPC 1 84.5 / 86.3 / 84.7 / 84.4
# and IPC 10 97.1 / 97.3 / 97.9 / 97.7 at 60 / 80 / 100 / 150 iterations; 100 costs two thirds of 150
@pytest.mark.parametrize("ipc,iterations,margin", [(1, 100, 0.10), (10, 100, 0.02)])
def test_mtt_beats_random_subset_on_digits(digits_experts, ipc, iterations, margin, capsys):
    data, trajectories = digits_experts
    hp = QUICKSTART.algorithms["mtt"]["hyperparameters"]
    cfg = MTTConfig(ipc=ipc, **hp)
    net = seeded_network(MODEL, 1, 10, 8, seed=0)
    distiller = MTTDistiller(net, EpochSampler(trajectories, cfg.expert_epochs, cfg.max_start_epoch),
                             data.x_train, data.y_train, 10, cfg, seed=ipc)
    losses = [distiller.step()["loss"] for _ in range(iterations)]
    syn = distiller.synthetic()
    distilled = evaluate_set(MODEL, data.info, syn.images, syn.labels, syn.lr, data.x_test, data.y_test, EVAL, seed=7)
    xr, yr = random_real_subset(data.x_train, data.y_train, ipc, 10, torch.Generator().manual_seed(ipc))
    random = evaluate_set(MODEL, data.info, xr, yr, QUICKSTART.experts["lr"], data.x_test, data.y_test, EVAL, seed=7)
    with capsys.disabled():
        print(f"\n[digits IPC {ipc}] MTT {100 * distilled.mean:.1f} ± {100 * distilled.std:.1f}  "
              f"random {100 * random.mean:.1f} ± {100 * random.std:.1f}  loss {sum(losses[:20]) / 20:.3f} -> "
              f"{sum(losses[-20:]) / 20:.3f}  syn_lr {syn.lr:.4f}")
    assert distilled.mean >= random.mean + margin
    assert sum(losses[-20:]) < sum(losses[:20])  # the matching loss went down
