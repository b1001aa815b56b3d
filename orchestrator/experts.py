"""The expert pool: Ray tasks that train experts in parallel and write them to the store.

One task per missing expert, one GPU each when the cluster has GPUs, ``cpus_per_expert`` CPU
slots otherwise. The real data travels once through the object store; every task writes its
own Arrow file atomically and returns only an :class:`~orchestrator.store.ExpertRecord`
(path and checksum). Tasks are retried on worker loss: the write is idempotent (same seed,
same path, atomic rename), so a retry cannot leave a partial or duplicate file.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import ray
import torch

from algorithms.experts import ExpertConfig, train_expert
from algorithms.networks import manifest_of, seeded_network

from .progress import Progress
from .spec import Spec
from .store import ExpertRecord, TrajectoryStore, store_key, write_trajectory


@dataclass
class ExpertSet:
    key: str
    dataset: str
    directory: str
    records: list[ExpertRecord]
    trained: int  # how many were trained by this call (0: all reused)

    @property
    def paths(self) -> list[str]:
        return [r.path for r in sorted(self.records, key=lambda r: r.index)]

    @property
    def accuracy(self) -> tuple[float, float]:
        """Full-data test accuracy of the experts: mean and standard deviation."""
        accs = [r.final_test_acc for r in self.records if not math.isnan(r.final_test_acc)]
        if not accs:
            return math.nan, math.nan
        return statistics.fmean(accs), (statistics.pstdev(accs) if len(accs) > 1 else 0.0)


def expert_seed(base: int, index: int) -> int:
    return base * 1_000_003 + index


def expert_key(spec: Spec, data) -> str:
    return store_key({"name": spec.dataset["name"], "digest": data.digest()}, spec.model,
                     spec.expert_training(), spec.experts["seed"])


def _train_one(data, model: dict, training: dict, seed: int, index: int, path: str, meta: dict,
               threads: int) -> ExpertRecord:
    torch.set_num_threads(max(1, threads))
    device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
    cfg = ExpertConfig(**training)
    info = data.info
    net = seeded_network(model, info.channels, info.num_classes, info.size, seed)
    checkpoints = list(train_expert(model, data, cfg, seed=seed, device=device))
    digest, nbytes = write_trajectory(path, checkpoints, manifest_of(net),
                                      {**meta, "seed": seed, "expert_index": index, "device": device})
    return ExpertRecord(index, path, digest, nbytes, checkpoints[-1].test_acc)


def ensure_experts(spec: Spec, data, store: TrajectoryStore, progress: Progress | None = None) -> ExpertSet:
    """Make sure the spec's experts exist in the store (training only the missing or corrupt
    ones, in parallel with Ray) and return their records."""
    name = spec.dataset["name"]
    key = expert_key(spec, data)
    count = spec.experts["count"]
    what = {"dataset": {"name": name, "digest": data.digest(), **data.info.to_dict()}, "model": spec.model,
            "training": spec.expert_training(), "seed": spec.experts["seed"]}
    store.describe(key, name, what)
    valid, todo, problems = store.check(key, name, count)
    for p in problems:
        (progress.warn if progress else print)(p)
    records = list(valid)
    if todo:
        gpus = ray.cluster_resources().get("GPU", 0)
        cpus = spec.resources["cpus_per_expert"]
        opts = {"num_gpus": 1, "num_cpus": 1} if gpus >= 1 else {"num_cpus": cpus}
        task = ray.remote(max_retries=2)(_train_one).options(**opts)
        data_ref = ray.put(data)
        meta = {**what, "store_key": key}
        pending = [task.remote(data_ref, spec.model, spec.expert_training(),
                               expert_seed(spec.experts["seed"], i), i, str(store.expert_path(key, name, i)),
                               meta, int(opts.get("num_cpus", 1))) for i in todo]
        bar = progress.task(f"experts ({len(valid)} reused)", total=count, completed=len(valid)) if progress else None
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            records.append(ray.get(done[0]))
            if bar is not None:
                bar.advance()
    elif progress:
        progress.info(f"experts: reusing all {count} stored experts ({store.dir(key, name)})")
    records.sort(key=lambda r: r.index)
    store.write_manifest(key, name, records)
    return ExpertSet(key, name, str(store.dir(key, name)), records, trained=len(todo))
