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

import torch

from algorithms.mct import ConvexTrajectory

from .malloc import tune_malloc
from .progress import Progress
from .spec import Spec
from .tasks import task_for
from .store import ExpertRecord, TrajectoryStore, open_trajectory, store_key, write_convex, write_trajectory


@dataclass
class ExpertSet:
    key: str
    dataset: str
    directory: str
    forms: dict[str, list[ExpertRecord]]  # form ("full", "convex-w2-path", ...) -> one record per expert
    trained: int  # how many were trained by this call (0: all reused)

    @property
    def records(self) -> list[ExpertRecord]:
        """The records of the first kept form (full trajectories when kept)."""
        return next(iter(self.forms.values()), [])  # none: no method of the spec reads experts

    @property
    def files(self) -> dict[str, list[str]]:
        return {form: [r.path for r in recs] for form, recs in self.forms.items()}


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


def write_forms(index: int, checkpoints, manifest, paths: dict[str, str], convex_opts: dict, meta: dict
                ) -> dict[str, ExpertRecord]:
    """Write one expert in every requested form; the full trajectory only if ``full`` is asked."""
    out = {}
    acc = checkpoints[-1].test_acc
    for form, path in paths.items():
        if form == "full":
            digest, nbytes = write_trajectory(path, checkpoints, manifest, meta)
        else:
            params = torch.stack([c.params for c in checkpoints])
            convex = ConvexTrajectory.from_checkpoints(params, manifest, **convex_opts)
            digest, nbytes = write_convex(path, convex, manifest, {**meta, "convex_options": convex_opts}, acc)
        out[form] = ExpertRecord(index, path, digest, nbytes, acc)
    return out


def train_and_write(data, model: dict, training: dict, seed: int, index: int, paths: dict[str, str],
                    convex_opts: dict, meta: dict, device: str, **where) -> dict[str, ExpertRecord]:
    """Train expert ``index`` (seed ``seed``) on ``device`` and write it in every form of ``paths``;
    ``where`` adds to its stored metadata (the Ray node)."""
    task = task_for(meta["dataset"]["name"])
    checkpoints, manifest = task.train_expert(data, model, training, seed, device)
    meta = {**meta, **task.expert_meta(data, model)}
    return write_forms(index, checkpoints, manifest, paths, convex_opts,
                       {**meta, "seed": seed, "expert_index": index, "device": str(device), **where})


def _train_one(data, model: dict, training: dict, seed: int, index: int, paths: dict[str, str],
               convex_opts: dict, meta: dict, threads: int) -> dict[str, ExpertRecord]:
    import ray

    tune_malloc()
    torch.set_num_threads(max(1, threads))
    device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
    return train_and_write(data, model, training, seed, index, paths, convex_opts, meta, device,
                           node_id=ray.get_runtime_context().get_node_id())


def _derive_convex(path_full: str, path: str, convex_opts: dict, index: int, meta: dict) -> ExpertRecord:
    """Build a compact form from a stored full trajectory (no retraining)."""
    t = open_trajectory(path_full)
    convex = ConvexTrajectory.from_checkpoints(t.params, t.manifest, **convex_opts)
    digest, nbytes = write_convex(path, convex, t.manifest, {**meta, "seed": t.meta.get("seed"),
                                                             "expert_index": index, "convex_options": convex_opts,
                                                             "derived_from": t.meta["params_sha256"]},
                                  t.final_test_acc)
    return ExpertRecord(index, path, digest, nbytes, t.final_test_acc)


def ensure_experts(spec: Spec, data, store: TrajectoryStore, progress: Progress | None = None) -> ExpertSet:
    """Make sure the spec's experts exist in the store in every form the spec keeps (training
    only the missing or corrupt ones, in parallel with Ray; deriving a missing compact form
    from a stored full trajectory) and return their records."""
    name = spec.dataset["name"]
    key = expert_key(spec, data)
    count = spec.experts["count"]
    forms = spec.expert_forms()
    convex_opts = spec.convex_options()
    what = {"dataset": {"name": name, "digest": data.digest(), **data.info.to_dict()}, "model": spec.model,
            "training": spec.expert_training(), "seed": spec.experts["seed"]}
    meta = {**what, "store_key": key}
    store.describe(key, name, what)
    records: dict[str, dict[int, ExpertRecord]] = {f: {} for f in forms}
    todo: dict[int, set[str]] = {}
    for form in forms:
        valid, missing, problems = store.check(key, name, count, form)
        for p in problems:
            (progress.warn if progress else print)(p)
        records[form].update({r.index: r for r in valid})
        for i in missing:
            todo.setdefault(i, set()).add(form)
    # a compact form missing beside a valid full trajectory is derived, not retrained
    if "full" in forms:
        for i in [i for i, f in todo.items() if "full" not in f]:
            for form in todo.pop(i):
                records[form][i] = _derive_convex(records["full"][i].path, str(store.expert_path(key, name, i, form)),
                                                  convex_opts, i, meta)
    if todo:
        import ray

        gpus = ray.cluster_resources().get("GPU", 0)
        cpus = spec.resources["cpus_per_expert"]
        opts = {"num_gpus": 1, "num_cpus": 1} if gpus >= 1 else {"num_cpus": cpus}
        # SPREAD: experts go to every node (one per GPU) before doubling up on one. A task whose
        # worker or node is lost is retried on another node; an error of its own (a NaN) is not
        task = ray.remote(max_retries=2, retry_exceptions=False)(_train_one)
        data_ref = ray.put(data)
        # a retrained expert is rewritten in every kept form (same seed: the same trajectory)
        pending = [task.options(name=f"expert_{i:05d}", scheduling_strategy="SPREAD", **opts).remote(
                       data_ref, spec.model, spec.expert_training(), expert_seed(spec.experts["seed"], i), i,
                       {f: str(store.expert_path(key, name, i, f)) for f in forms}, convex_opts, meta,
                       int(opts.get("num_cpus", 1))) for i in sorted(todo)]
        reused = count - len(todo)
        bar = progress.task(f"experts ({reused} reused)", total=count, completed=reused) if progress else None
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for form, rec in ray.get(done[0]).items():
                    records[form][rec.index] = rec
                if bar is not None:
                    bar.advance()
        except BaseException:  # Ctrl-C, or one expert failed: on a cluster the others would train on
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    elif progress:
        progress.info(f"experts: reusing all {count} stored experts ({store.dir(key, name)})")
    ordered = {f: [records[f][i] for i in range(count)] for f in forms}
    store.write_manifest(key, name, ordered)
    return ExpertSet(key, name, str(store.dir(key, name)), ordered, trained=len(todo))
