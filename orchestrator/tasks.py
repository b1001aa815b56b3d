"""Tasks: one object per data kind (image classification, event sequences).

A task is everything the orchestrator does with data that depends on its kind: which datasets
it reads and how, the budget check, the spec sections it replaces, how a set is evaluated and
which metric is its headline, how a set is exported, the full-data reference, the random real
subset, and how an expert is trained. The sweep, the trials, the experts and the results ask the
spec's task; none of them branches on the kind. Methods (``orchestrator.methods``) name the kind
of task they apply to.
"""
from __future__ import annotations

import statistics
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterator

import torch

from algorithms.base import RealSequences, SyntheticSet


class Task(ABC):
    """The interface. ``kind`` is what methods declare (``Method.kind``)."""

    kind: str = ""
    label: str = ""  # in messages: "the image dataset 'mnist'"
    budget_unit: str = ""  # what one unit of budget is, for messages and tables
    budget_label: str = ""  # the results table's budget column
    budget_prefix: str = ""  # in trial names: mtt-ipc10, farzi-mu50
    schema: dict[str, dict[str, tuple]] = {}  # spec sections this task replaces (see spec_schema.SCHEMA)

    @abstractmethod
    def datasets(self) -> list[str]:
        """The dataset names this task reads."""

    def handles(self, dataset: str) -> bool:
        return str(dataset).lower() in self.datasets()

    @abstractmethod
    def load(self, spec) -> Any:
        """The spec's dataset."""

    def check_budgets(self, spec, data) -> None:
        """Raise SpecError for budgets the data cannot fill."""

    @abstractmethod
    def describe(self, data) -> str:
        """One line on the loaded data."""

    @abstractmethod
    def headline(self, data) -> tuple[str, bool]:
        """The metric that picks the best evaluation and orders results, and whether higher is better."""

    def selection(self, data) -> tuple[str, bool] | None:
        """The metric of :meth:`evaluate` on a validation split that chooses a trial's published set
        among its evaluations (the test metrics never choose), and whether higher is better; None
        where the data has no validation split (the trial's final set is its set)."""
        return None

    @abstractmethod
    def evaluate(self, spec: dict, data, syn, device, final: bool = False) -> dict[str, tuple[float, float]]:
        """Train the spec's evaluation networks on ``syn``: metric -> (mean, std). ``final``: the
        last evaluation of a trial, which may add metrics (other architectures: ``acc/<model>``)."""

    def evaluate_cases(self, spec: dict, data, syn, device, final: bool = False):
        """:meth:`evaluate` and, where the task can score its networks test case by test case, the
        headline metric's per-case outcomes of the spec's model (``orchestrator.artifacts.CaseOutcomes``;
        None where it cannot): ``(metrics, cases)``. Trials log them beside each set they log, so
        that ``orchestrate compare`` can pair two trials on the same test cases."""
        return self.evaluate(spec, data, syn, device, final=final), None

    @abstractmethod
    def export(self, directory: Path, syn, data, method: str, extra: dict, model: dict) -> list[Path]:
        """Write ``syn`` under the export contract (and what helps a reader see it) into ``directory``."""

    @abstractmethod
    def full_data(self, spec, data, experts) -> dict[str, list[float]]:
        """The reference trained on all the real data: metric -> [mean, std]."""

    @abstractmethod
    def random_set(self, spec: dict, data, budget: int, generator: torch.Generator) -> tuple[Any, torch.Tensor]:
        """A random real subset of ``budget`` (the baseline every distilled set is compared with),
        and the training rows it holds (as :meth:`rows_record` reads them)."""

    @abstractmethod
    def rows_record(self, data, rows: torch.Tensor, model: dict, extra: int = 0) -> dict[str, list]:
        """Training rows in the data's own terms, JSON-ready (what a set's start record names):
        rows of the training images, or of the training sequences :meth:`seq_task` cuts
        ``model['max_len'] + extra`` long."""

    @abstractmethod
    def train_expert(self, data, model: dict, training: dict, seed: int, device) -> tuple[list, Any]:
        """(checkpoints, manifest) of one expert trained on the real data."""

    def expert_meta(self, data, model: dict) -> dict:
        """What an expert's stored metadata adds for this task."""
        return {}

    def pct_of_full(self, metric: str, mean: float, full: float) -> float | None:
        """``mean`` as % of the full-data value (above 100 is better than full data), or None
        where the task does not report it."""
        return None


class ImageClassification(Task):
    kind = "image"
    label = "image"
    budget_unit = "images per class"
    budget_label = "IPC"
    budget_prefix = "ipc"

    def datasets(self) -> list[str]:
        from .datasets import FOLDER_DATASETS, IMAGES

        return sorted({*IMAGES.names(), *FOLDER_DATASETS})

    def load(self, spec):
        from .datasets import FOLDER_DATASETS, load_dataset

        options = {}
        if spec.dataset["name"] in FOLDER_DATASETS:  # size, test_fraction, channels; the spec's seed draws the split
            options = {k: v for k, v in spec.dataset.items() if k not in ("name", "root", "zca")}
            options["seed"] = spec.seed
        data = load_dataset(spec.dataset["name"], spec.dataset["root"], **options)
        if spec.dataset.get("zca"):  # experts, trials and evaluation all see the whitened images
            from .datasets import whitened

            data = whitened(data)
        return data

    def check_budgets(self, spec, data) -> None:
        from .spec import SpecError

        from algorithms.networks import build_network

        info = data.info
        for m in spec.evaluation.get("models", []):  # cross-architecture: each must take these images
            try:
                build_network({"name": m}, info.channels, info.num_classes, info.size)
            except ValueError as e:
                raise SpecError([f"{spec.path}: evaluation.models: {m} cannot be built for {spec.dataset['name']} "
                                 f"({info.channels}x{info.size}x{info.size}): {e}"]) from None
        smallest = int(torch.bincount(data.y_train, minlength=data.info.num_classes).min())
        for name, algo in spec.algorithms.items():
            too_big = [b for b in algo["budgets"] if b > smallest]
            if too_big:
                raise SpecError([f"{spec.path}: algorithms.{name}.budgets: {too_big} images per class exceed the "
                                 f"{smallest} training images of the smallest class of {spec.dataset['name']}"])

    def headline(self, data) -> tuple[str, bool]:
        return "acc", True

    def describe(self, data) -> str:
        info = data.info
        return (f"{len(data.y_train)} training / {len(data.y_test)} test images, {info.num_classes} classes, "
                f"{info.channels}x{info.size}x{info.size}")

    def evaluate(self, spec: dict, data, syn: SyntheticSet, device, final: bool = False
                 ) -> dict[str, tuple[float, float]]:
        """Accuracy of ``evaluation.networks`` fresh networks of the spec's model (``acc``); at the
        final evaluation also of each of ``evaluation.models`` with its own defaults
        (``acc/<model>``: cross-architecture, DC's --eval_mode M), same seeds and protocol. With
        ``evaluation.parallel`` (default) and Ray initialised, the networks of one evaluation train
        as Ray tasks on the cluster's free resources beside this process
        (:class:`orchestrator.parallel.RayRunner`): the same numbers, sooner."""
        return self._evaluate(spec, data, syn, device, final, per_case=False)[0]

    def evaluate_cases(self, spec: dict, data, syn: SyntheticSet, device, final: bool = False):
        return self._evaluate(spec, data, syn, device, final, per_case=True)

    def _evaluate(self, spec: dict, data, syn: SyntheticSet, device, final: bool, per_case: bool):
        from algorithms.evaluate import EvalConfig, evaluate_set

        from .artifacts import CaseOutcomes
        from .spec import eval_seed

        ev = spec["evaluation"]
        cfg = EvalConfig.from_section(ev)
        run = None  # one network after another, in this process
        if ev.get("parallel", True):  # inside Ray (a Tune trial): the networks also on free CPUs/GPUs
            from .parallel import RayRunner

            run = RayRunner()
        models = [("acc", spec["model"])]
        if final:
            models += [(f"acc/{m}", {"name": m}) for m in ev.get("models", []) if m != spec["model"]["name"]]
        out, cases = {}, None
        for key, model in models:
            res = evaluate_set(model, data.info, syn.images, syn.labels, syn.lr, data.x_test, data.y_test, cfg,
                               seed=eval_seed(spec), device=device, run=run,
                               per_case=per_case and key == "acc")
            out[key] = (res.mean, res.std)
            if res.hits is not None:
                seeds = [eval_seed(spec) + k for k in range(cfg.networks)]
                cases = CaseOutcomes.of("acc", "images", seeds, [(h, torch.ones(len(h))) for h in res.hits])
        return out, cases

    def export(self, directory: Path, syn, data, method: str, extra: dict, model: dict) -> list[Path]:
        from .artifacts import image_grid, save_synthetic

        f = save_synthetic(directory / "synthetic.safetensors", syn, data.info, method, extra, model=model, zca=data.zca)
        return [f, image_grid(syn.images, syn.labels, data.info.mean, data.info.std, directory / "synthetic_grid.png",
                              zca=data.zca)]

    def full_data(self, spec, data, experts) -> dict[str, list[float]]:
        return {"acc": list(experts.accuracy)} if experts.records else {}

    def random_set(self, spec: dict, data, budget: int, generator: torch.Generator) -> tuple[SyntheticSet, torch.Tensor]:
        from algorithms.evaluate import random_real_index

        rows = random_real_index(data.y_train, budget, data.info.num_classes, generator)
        return SyntheticSet(data.x_train[rows].clone(), data.y_train[rows].clone(), spec["experts"]["lr"]), rows

    def rows_record(self, data, rows: torch.Tensor, model: dict, extra: int = 0) -> dict[str, list]:
        return {"train_images": rows.tolist()}  # rows of the training split as the registry loads it

    def train_expert(self, data, model: dict, training: dict, seed: int, device):
        from algorithms.experts import ExpertConfig, train_expert
        from algorithms.networks import manifest_of, seeded_network

        info = data.info
        net = seeded_network(model, info.channels, info.num_classes, info.size, seed)
        return list(train_expert(model, data, ExpertConfig(**training), seed=seed, device=device)), manifest_of(net)


class EventSequences(Task):
    kind = "sequence"
    label = "event-sequence"
    budget_unit = "synthetic sequences"
    budget_label = "budget (seqs)"
    budget_prefix = "mu"

    @property
    def schema(self):  # type: ignore[override]
        from .spec_schema import SEQ_SCHEMA

        return SEQ_SCHEMA

    def datasets(self) -> list[str]:
        from .sequences import SEQUENCES

        return SEQUENCES.names()

    def load(self, spec):
        from .sequences import load_sequences

        return load_sequences(spec.dataset["name"], spec.dataset["root"])

    _tasks: dict[tuple[int, int], Any] = {}

    def seq_task(self, data, max_len: int):
        """The training/evaluation view of the data (built once per process, dataset and length)."""
        from .sequences import seq_task

        key = (id(data), max_len)
        if key not in self._tasks:
            self._tasks[key] = seq_task(data, max_len)
        return self._tasks[key]

    def check_budgets(self, spec, data) -> None:
        from .spec import SpecError

        n = len(self.seq_task(data, spec.model["max_len"]).train)
        for name, algo in spec.algorithms.items():
            too_big = [b for b in algo["budgets"] if b > n]
            if too_big:
                raise SpecError([f"{spec.path}: algorithms.{name}.budgets: {too_big} sequences exceed the {n} "
                                 f"training sequences of {spec.dataset['name']}"])

    def describe(self, data) -> str:
        if hasattr(data, "train_seqs"):
            return f"{len(data.train_seqs)} users' sequences, {data.info.vocab_size - 1} items"
        return f"{len(data.train)} training tokens, vocabulary {data.info.vocab_size}"

    def headline(self, data) -> tuple[str, bool]:
        from .sequences import RecData

        return ("hr10", True) if isinstance(data, RecData) else ("ppl", False)

    def selection(self, data) -> tuple[str, bool] | None:
        """HR@10 on each user's second-to-last item (recommendation), perplexity on the valid
        stream (language modelling): ``evaluate`` scores the same networks on it."""
        metric, higher = self.headline(data)
        return f"valid_{metric}", higher

    def evaluate(self, spec: dict, data, syn, device, final: bool = False) -> dict[str, tuple[float, float]]:
        return self._evaluate(spec, data, syn, device, per_case=False)[0]

    def evaluate_cases(self, spec: dict, data, syn, device, final: bool = False):
        return self._evaluate(spec, data, syn, device, per_case=True)

    def _evaluate(self, spec: dict, data, syn, device, per_case: bool):
        from algorithms.seqtrain import SeqTrainConfig, evaluate_sequences

        from .artifacts import CaseOutcomes
        from .spec import eval_seed

        ev = spec["evaluation"]
        task = self.seq_task(data, spec["model"]["max_len"])
        cfg = SeqTrainConfig(epochs=ev["epochs"], lr=ev["lr"], batch_size=ev["batch_size"],
                             weight_decay=ev["weight_decay"])
        x = syn.training_input().detach().cpu()
        run = None  # as for images: with evaluation.parallel and Ray initialised, on free CPUs/GPUs too
        if ev.get("parallel", True):
            from .parallel import RayRunner

            run = RayRunner()
        seed = eval_seed(spec)
        res = evaluate_sequences(spec["model"], task, x, cfg, ev["networks"], seed, device, run=run,
                                 per_case=per_case)
        cases = None
        if per_case:
            unit = "users" if task.kind == "recommendation" else "chunks"
            cases = CaseOutcomes.of(self.headline(data)[0], unit, [seed + n for n in range(ev["networks"])], res.cases)
        return {k: (res.metrics[k], res.std[k]) for k in res.metrics}, cases

    def export(self, directory: Path, syn, data, method: str, extra: dict, model: dict) -> list[Path]:
        from .artifacts import save_sequences

        return list(save_sequences(directory / "synthetic.safetensors", syn, data, method, extra, model=model))

    def full_data(self, spec, data, experts) -> dict[str, list[float]]:
        """Every metric of the task for the experts' final parameters (trained on all the real
        data): metric -> [mean, std] over the experts."""
        from algorithms.seqmodels import seeded_seq_model
        from algorithms.seqtrain import task_metrics

        from .store import open_trajectory

        if not experts.records:
            return {}
        task = self.seq_task(data, spec.model["max_len"])
        model = seeded_seq_model(spec.model, task.vocab_size, task.pad_id, 0)
        runs = [task_metrics(model, open_trajectory(r.path).params[-1].clone(), task) for r in experts.forms["full"]]
        return {k: [statistics.fmean(r[k] for r in runs), statistics.pstdev([r[k] for r in runs])] for k in runs[0]}

    def random_set(self, spec: dict, data, budget: int, generator: torch.Generator) -> tuple[RealSequences, torch.Tensor]:
        real = self.seq_task(data, spec["model"]["max_len"]).train
        rows = torch.randperm(len(real), generator=generator)[:budget]
        return RealSequences(real[rows], spec["evaluation"]["lr"]), rows

    def rows_record(self, data, rows: torch.Tensor, model: dict, extra: int = 0) -> dict[str, list]:
        from .sequences import RecData

        out: dict[str, list] = {"rows": rows.tolist()}
        if isinstance(data, RecData):  # one row per user, users in data order
            out["users"] = data.user_original_ids[rows].tolist()
        else:  # rows cut the training stream in max_len + extra tokens
            length = model["max_len"] + extra
            out["train_tokens"] = [[r * length, (r + 1) * length] for r in rows.tolist()]
        return out

    def train_expert(self, data, model: dict, training: dict, seed: int, device):
        from algorithms.networks import manifest_of
        from algorithms.seqmodels import seeded_seq_model
        from algorithms.seqtrain import SeqTrainConfig, train_seq_model

        task = self.seq_task(data, model["max_len"])
        net = seeded_seq_model(model, data.info.vocab_size, data.info.pad_id, seed)
        return list(train_seq_model(model, task, task.train, SeqTrainConfig(**training), seed, device)), manifest_of(net)

    def expert_meta(self, data, model: dict) -> dict:
        return {"test_metric": self.seq_task(data, model["max_len"]).primary}

    def pct_of_full(self, metric: str, mean: float, full: float) -> float | None:
        if not (full and mean):
            return None
        return 100 * (full / mean if metric == "ppl" else mean / full)  # perplexity: lower is better


TASKS: dict[str, Task] = {t.kind: t for t in (ImageClassification(), EventSequences())}


def task_for(dataset: str) -> Task:
    """The task that reads dataset ``dataset`` (image classification for unknown names: the
    dataset registry then says the name is unknown)."""
    for task in TASKS.values():
        if task.handles(dataset):
            return task
    return TASKS["image"]


def iter_tasks() -> Iterator[Task]:
    return iter(TASKS.values())
