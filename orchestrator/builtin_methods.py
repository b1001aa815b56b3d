"""The built-in methods: the random real subset, MTT, MCT, DC, DSA, DM (images) and Farzi
(event sequences). Each is one registry entry over its distiller in ``algorithms/``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from algorithms.augment import DEFAULT_STRATEGY
from algorithms.base import RealSequences, SyntheticSet
from algorithms.dc import EVAL_LR, LOOPS, DCConfig, DCDistiller
from algorithms.dm import DMConfig, DMDistiller
from algorithms.farzi import FarziConfig, FarziDistiller
from algorithms.mct import ConvexSampler, ConvexTrajectory, MCTConfig
from algorithms.mtt import EpochSampler, MTTConfig, MTTDistiller

from .methods import BuildContext, Err, Method, bounds, register


# -- the random real subset ------------------------------------------------------------------------
@dataclass(frozen=True)
class RandomConfig:
    budget: int


class RandomSubset:
    """A 'distiller' with nothing to learn: its set is a random real subset of the budget, drawn
    with the trial's seed (a distiller initialised from real images draws the same ones, so the
    comparison is paired). It has 0 iterations: the trial evaluates it once."""

    def __init__(self, syn: SyntheticSet | RealSequences, rows: torch.Tensor):
        self.syn, self.iteration = syn, 0
        self.init_index = rows  # the training rows it holds (Task.random_set): its start record

    def step(self) -> dict[str, float]:
        raise RuntimeError("the random subset has no iterations")

    def synthetic(self):
        return self.syn

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])


class _Random(Method):
    """A random real subset of the budget: the reference every distilled set is compared with."""
    config = RandomConfig
    budget_field = "budget"
    baseline = True
    learns_lr = False

    def expert_forms(self, hp, experts):
        return []

    def build(self, ctx: BuildContext) -> RandomSubset:
        g = torch.Generator().manual_seed(ctx.seed)
        return RandomSubset(*ctx.task.random_set(ctx.spec, ctx.data, ctx.budget, g))


@register
class Random(_Random):
    name = "random"
    kind = "any"  # the task draws the subset
    description = "a random real subset of the budget (images: trained at experts.lr; sequences: evaluation.lr)"


# -- trajectory matching -----------------------------------------------------------------------
def _windows(prefix: str, worst: float, what: str, why: str, experts: dict, err: Err) -> None:
    if isinstance(experts.get("epochs"), int) and worst > experts["epochs"]:
        err(f"{prefix}.max_start_epoch", f"{what} goes beyond the experts' {experts['epochs']} epochs "
            f"(experts.epochs){why}")


@register
class MTT(Method):
    name = "mtt"
    config = MTTConfig
    description = "Matching Training Trajectories (Cazenavette et al. 2022)"

    def hyperparameters(self, experts=None):
        hp = super().hyperparameters(experts)
        if experts:
            hp["lr_teacher"] = experts.get("lr", hp["lr_teacher"])  # the student starts at the experts' lr
        return hp

    def check(self, prefix, budget, hp, experts, model, err):
        if "full" not in (experts.get("keep") or []):
            err("experts.keep", f"{self.name} matches full trajectories: keep must include 'full'")
        starts, spans = bounds(hp.get("max_start_epoch")), bounds(hp.get("expert_epochs"))
        if starts and spans:  # start in [0, max_start_epoch), target start + expert_epochs <= E
            worst = max(starts) - 1 + max(spans)
            _windows(prefix, worst, f"max_start_epoch ({max(starts)}) - 1 + expert_epochs ({max(spans)}) = {worst}",
                     ": starts are drawn from [0, max_start_epoch)", experts, err)

    def build(self, ctx):
        cfg = ctx.config(self)
        sampler = EpochSampler(ctx.full_trajectories(), cfg.expert_epochs, cfg.max_start_epoch)
        return MTTDistiller(ctx.image_network(), sampler, ctx.data.x_train, ctx.data.y_train,
                            ctx.data.info.num_classes, cfg, seed=ctx.seed, device=ctx.device)


@register
class MCT(MTT):
    name = "mct"
    config = MCTConfig
    description = "Matching Convexified Trajectory (Zhong et al. 2024): a convex path between expert checkpoints"

    def expert_forms(self, hp, experts):
        from .store import convex_form

        if "full" in (experts.get("keep") or []):
            return ["full"]
        return [convex_form(hp["waypoints"], hp["beta"], hp["smooth"])]

    def check(self, prefix, budget, hp, experts, model, err):
        if "full" not in (experts.get("keep") or []):
            want = {"waypoints": experts.get("convex_waypoints"), "beta": experts.get("convex_beta"),
                    "smooth": experts.get("convex_smooth")}
            for k, v in want.items():
                if hp.get(k) != v:
                    err(f"{prefix}.{k}", f"is {hp.get(k)!r} but the experts keep only the compact form "
                        f"with experts.convex_{k} = {v!r}; set them equal or keep 'full' to derive other forms")
        starts = bounds(hp.get("max_start_epoch"))
        if starts:  # start in [0, max_start_epoch) with max_start_epoch <= E; the target is clipped at E
            _windows(prefix, max(starts), f"max_start_epoch ({max(starts)})", "", experts, err)

    def build(self, ctx):
        cfg = ctx.config(self)
        sampler = ConvexSampler(load_convex(ctx.expert_files, cfg, ctx.preloaded), cfg.expert_epochs, cfg.max_start_epoch,
                                cfg.continuous)
        return MTTDistiller(ctx.image_network(), sampler, ctx.data.x_train, ctx.data.y_train,
                            ctx.data.info.num_classes, cfg, seed=ctx.seed, device=ctx.device)


def load_convex(expert_files: dict[str, list[str]], cfg: MCTConfig, preloaded: dict | None = None
                ) -> list[ConvexTrajectory]:
    """The compact form the trial asks for: in memory when given, read from the store when the
    experts keep it, otherwise derived from the stored full trajectories."""
    from .store import convex_form, open_convex, open_trajectory

    form = convex_form(cfg.waypoints, cfg.beta, cfg.smooth)
    if preloaded and form in preloaded:
        return list(preloaded[form])
    if form in expert_files:
        return [open_convex(p) for p in expert_files[form]]
    if "full" not in expert_files:
        raise ValueError(f"the experts keep only {sorted(expert_files)}, not {form} or full trajectories")
    out = []
    for p in expert_files["full"]:
        t = open_trajectory(p)
        out.append(ConvexTrajectory.from_checkpoints(t.params, t.manifest, cfg.waypoints, cfg.smooth, cfg.beta))
    return out


# -- gradient and distribution matching ------------------------------------------------------------
class _FixedLR(Method):
    """DC, DSA and DM: image-set distillers over the real images, no experts, sets at lr 0.01."""
    learns_lr = False
    distiller: type = DCDistiller

    def expert_forms(self, hp, experts):
        return []

    def fixed_lr(self, hp):
        return EVAL_LR

    def build(self, ctx):
        return self.distiller(ctx.image_network(), ctx.data.x_train, ctx.data.y_train, ctx.data.info.num_classes,
                              ctx.config(self), seed=ctx.seed, device=ctx.device)


@register
class DC(_FixedLR):
    name = "dc"
    config = DCConfig
    fixed = {"dsa": False, "dsa_strategy": DEFAULT_STRATEGY}  # no augmentation: no strategy to set
    description = "Dataset Condensation with gradient matching (Zhao, Mopuri & Bilen 2021); sets evaluated at lr 0.01"

    def check(self, prefix, budget, hp, experts, model, err):
        if (hp.get("outer_loop") is None or hp.get("inner_loop") is None) and budget not in LOOPS:
            err(f"{prefix}.outer_loop", f"the authors define outer_loop/inner_loop only for {sorted(LOOPS)} images "
                f"per class, not {budget}: set both")


@register
class DSA(DC):
    name = "dsa"
    fixed = {"dsa": True}
    description = "DC with differentiable siamese augmentation (Zhao & Bilen 2021); sets evaluated at lr 0.01"


@register
class DM(_FixedLR):
    name = "dm"
    config = DMConfig
    distiller = DMDistiller
    compiles = True
    description = "Distribution Matching (Zhao & Bilen 2023): class-mean embeddings, no experts; lr 0.01"

    def build(self, ctx):
        return DMDistiller(ctx.image_network(), ctx.data.x_train, ctx.data.y_train, ctx.data.info.num_classes,
                           ctx.config(self), seed=ctx.seed, device=ctx.device, compile=ctx.compile)


# -- event sequences ------------------------------------------------------------------------------
@register
class Farzi(Method):
    name = "farzi"
    config = FarziConfig
    kind = "sequence"
    budget_field = "budget"
    description = "Farzi Data (Sachdeva et al. 2023): low-rank latent sequences, reverse-mode Adam"

    def check(self, prefix, budget, hp, experts, model, err):
        if isinstance(model.get("max_len"), int):
            long = [b for b in bounds(hp.get("seq_len")) if b > model["max_len"]]
            if long:
                err(f"{prefix}.seq_len", f"{max(long)} exceeds model.max_len ({model['max_len']})")
        windows = bounds(hp.get("backward_steps"))
        if windows:
            steps = bounds(hp.get("inner_steps")) or [FarziConfig.__dataclass_fields__["inner_steps"].default]
            if max(windows) > min(steps):
                err(f"{prefix}.backward_steps", f"{max(windows):g} exceeds inner_steps ({min(steps):g}): "
                    "the window reverses the last backward_steps of the inner steps")
        dropout = hp.get("inner_dropout")  # a value, a grid or a {choice: [...]}
        if isinstance(dropout, dict) and len(dropout) == 1:
            dropout = next(iter(dropout.values()))
        if True in (dropout if isinstance(dropout, list) else [dropout]) and not model.get("dropout"):
            err(f"{prefix}.inner_dropout", "true, but model.dropout is 0: the inner loop would train exactly as "
                "without it (set model.dropout, the rate the evaluation trains with)")
        objective = hp.get("objective")  # a value, a grid (list) or a distribution ({choice: [...]})
        if isinstance(objective, dict) and len(objective) == 1:
            objective = next(iter(objective.values()))
        target = hp.get("outer_target")
        if isinstance(target, dict) and len(target) == 1:
            target = next(iter(target.values()))
        if "match" in (objective if isinstance(objective, list) else [objective]) and \
                "teacher" in (target if isinstance(target, list) else [target]):
            err(f"{prefix}.outer_target", "teacher scores the real batch of objective loss; objective match has none")
        teachers = bounds(hp.get("teacher_experts"))
        if teachers and max(teachers) > 1:
            init = hp.get("init")
            if isinstance(init, dict) and len(init) == 1:
                init = next(iter(init.values()))
            if "teacher" not in (init if isinstance(init, list) else [init]) and \
                    "teacher" not in (target if isinstance(target, list) else [target]):
                err(f"{prefix}.teacher_experts", f"{max(teachers):g}, but neither init nor outer_target is teacher: "
                    "nothing reads the teacher")
            elif isinstance(experts.get("count"), int) and max(teachers) > experts["count"]:
                err(f"{prefix}.teacher_experts", f"{max(teachers):g} exceeds experts.count ({experts['count']})")
        starts = bounds(hp.get("max_start_epoch"))
        if not starts:
            return
        if "match" in (objective if isinstance(objective, list) else [objective]):
            spans = bounds(hp.get("expert_epochs")) or [FarziConfig.__dataclass_fields__["expert_epochs"].default]
            worst = max(starts) + max(spans)  # theta_0 from epochs 0..max_start_epoch, the target expert_epochs later
            _windows(prefix, worst, f"max_start_epoch ({max(starts)}) + expert_epochs ({max(spans)}) = {worst}",
                     " (objective match: the target is expert_epochs after theta_0)", experts, err)
        else:  # theta_0 from epochs 0..max_start_epoch (both included); no target
            _windows(prefix, max(starts), f"max_start_epoch ({max(starts)})", "", experts, err)

    @staticmethod
    def real_rows(task, data, max_len: int, cfg: FarziConfig):
        """The real sequences Farzi reads (its teacher start and outer loss): the training rows of
        ``task.seq_task``, one id longer with ``real_drop_last`` so that each keeps ``max_len`` ids
        once the distiller drops its last."""
        return task.seq_task(data, max_len + cfg.real_drop_last).train

    def build(self, ctx):
        from algorithms.seqmodels import seeded_seq_model

        cfg = ctx.config(self)
        task = ctx.task.seq_task(ctx.data, ctx.model["max_len"])
        real = self.real_rows(ctx.task, ctx.data, ctx.model["max_len"], cfg)
        model = seeded_seq_model(ctx.model, task.vocab_size, task.pad_id, ctx.seed)
        return FarziDistiller(model, ctx.full_trajectories(), real, task.vocab_size, task.pad_id, cfg,
                              seed=ctx.seed, device=ctx.device, iterations=ctx.iterations)

    def start_record(self, distiller, task, data, model):
        """The real rows an ``init: real`` or ``teacher`` start read (``FarziDistiller.init_index``,
        rows of :meth:`real_rows`), in the data's own terms (``Task.rows_record``): MovieLens users
        by their original id, language-model rows by the training-stream tokens ``[begin, end)``
        they cut (the start reads the last ``seq_len`` of them, one fewer at the end with
        ``real_drop_last``)."""
        rows = distiller.init_index
        if rows is None:
            return None
        cfg = distiller.cfg
        return {"init": cfg.init, "seq_len": cfg.seq_len, "real_drop_last": cfg.real_drop_last,
                **task.rows_record(data, rows, model, cfg.real_drop_last)}
