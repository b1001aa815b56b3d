"""Event-sequence dataset registry: MovieLens-100k/1M (recommendation) and PTB (language modelling).

Files are parsed with the standard library and numpy (no pandas, no pickle) and
handed out as ``int64`` torch tensors.  Roots are resolved like the image
registry of :mod:`orchestrator.datasets` (explicit root, else
``$ORCHESTRATE_DATA/<name>``, else ``./data/<name>``) and raise the same
:class:`DatasetNotFoundError` / :class:`DatasetFormatError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch

from algorithms.seqtrain import SeqTask, sample_negatives

from .datasets import DatasetRegistry, data_root

__all__ = [
    "MIN_INTERACTIONS",
    "SEQUENCE_DATASETS",
    "LMData",
    "RecData",
    "SequenceInfo",
    "clear_cache",
    "is_sequence_dataset",
    "load_sequences",
    "resolve_sequence_root",
    "seq_task",
    "sequence_info",
]

MIN_INTERACTIONS = 3  # a user needs a training item, a validation target and a test target
PAD_TITLE = "<pad>"


@dataclass(frozen=True)
class SequenceInfo:
    """Static description of a sequence dataset.

    ``vocab_size`` in :data:`SEQUENCE_DATASETS` is the value for the genuine
    files; the ``info`` of a loaded dataset carries the value actually computed
    from the files it was read from.
    """

    name: str
    task: str  # "recommendation" or "language_model"
    vocab_size: int  # recommendation: num_items + 1 (id 0 = padding)
    pad_id: int | None  # 0 for recommendation, None for language modelling
    expected_files: tuple[str, ...]  # required, relative to the data root
    optional_files: tuple[str, ...] = ()  # used when present (item titles)

    def to_dict(self) -> dict:
        """JSON-friendly representation."""
        d = dataclasses.asdict(self)
        d["expected_files"] = list(self.expected_files)
        d["optional_files"] = list(self.optional_files)
        return d


SEQUENCE_DATASETS: dict[str, SequenceInfo] = {
    info.name: info
    for info in (
        SequenceInfo("ml-100k", "recommendation", 1683, 0, ("u.data",), ("u.item",)),
        SequenceInfo("ml-1m", "recommendation", 3707, 0, ("ratings.dat",), ("movies.dat",)),
        SequenceInfo("ptb", "language_model", 10000, None, ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")),
    )
}



def _digest_tensors(name: str, parts: Iterable[tuple[str, torch.Tensor]], extra: bytes = b"") -> str:
    h = hashlib.sha256()
    h.update(f"dataset:{name}\n".encode())
    for label, tensor in parts:
        arr = np.ascontiguousarray(tensor.detach().cpu().numpy())
        h.update(f"{label}:{arr.dtype.str}:{arr.shape}\n".encode())
        h.update(memoryview(arr).cast("B"))
    h.update(extra)
    return h.hexdigest()


def _left_pad(seqs: list[torch.Tensor], max_len: int) -> torch.Tensor:
    """The last ``max_len`` items of each sequence, left-padded with 0, as ``[len(seqs), max_len]``."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    out = torch.zeros(len(seqs), max_len, dtype=torch.long)
    for row, seq in zip(out, seqs):
        tail = seq[-max_len:]
        if len(tail):
            row[max_len - len(tail) :] = tail
    return out


@dataclass
class RecData:
    """Leave-last-out sequential recommendation data (implicit feedback).

    Each user's interactions (every rating counts) are sorted by timestamp, ties
    broken by item id (then file order, the sort is stable).  Users with fewer
    than :data:`MIN_INTERACTIONS` (3) interactions are dropped, then the items
    of the remaining users are renumbered 1..num_items in increasing order of
    their original id; 0 is the padding id.  Per user the last item is the test
    target, the second-to-last the validation target and the rest the training
    sequence.  Users are in increasing order of original id.  Instances from
    :func:`load_sequences` are cached and shared: treat the tensors as read-only.
    """

    info: SequenceInfo
    train_seqs: list[torch.Tensor]  # int64 per user, length = interactions - 2
    valid_targets: torch.Tensor  # int64 [U]
    test_targets: torch.Tensor  # int64 [U]
    item_original_ids: torch.Tensor  # int64 [vocab_size], entry 0 = -1
    user_original_ids: torch.Tensor  # int64 [U]
    titles: list[str] | None = None  # index = new id, entry 0 = "<pad>"
    _digest: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def num_users(self) -> int:
        return len(self.train_seqs)

    @property
    def num_items(self) -> int:
        return len(self.item_original_ids) - 1

    def train_matrix(self, max_len: int) -> torch.Tensor:
        """``[U, max_len]``: the last ``max_len`` training items per user, left-padded with 0."""
        return _left_pad(self.train_seqs, max_len)

    def eval_inputs(self, split: str, max_len: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Inputs ``[U, max_len]`` (left-padded), targets ``[U]`` and the seen items of each user.

        ``"valid"``: input = training sequence, target = validation item.
        ``"test"``: input = training sequence + validation item, target = test item.
        ``seen[u]`` holds the distinct items of user u's whole (untruncated) input, sorted,
        for masking already-seen items in full ranking.
        """
        if split == "valid":
            histories, targets = self.train_seqs, self.valid_targets
        elif split == "test":
            histories = [torch.cat([s, v.view(1)]) for s, v in zip(self.train_seqs, self.valid_targets)]
            targets = self.test_targets
        else:
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        return _left_pad(histories, max_len), targets, [torch.unique(h) for h in histories]

    def decode(self, ids: Iterable[int] | torch.Tensor) -> list[str]:
        """Titles of new item ids (``item <original id>`` without titles; 0 is ``<pad>``)."""
        out = []
        for i in torch.as_tensor(ids, dtype=torch.long).reshape(-1).tolist():
            if not 0 <= i < len(self.item_original_ids):
                raise IndexError(f"item id {i} out of range [0, {len(self.item_original_ids)})")
            if self.titles is not None:
                out.append(self.titles[i])
            else:
                out.append(PAD_TITLE if i == 0 else f"item {int(self.item_original_ids[i])}")
        return out

    def digest(self) -> str:
        """SHA-256 (hex) of the name and the raw bytes of the id maps, sequences and targets."""
        if self._digest is None:
            lengths = torch.tensor([len(s) for s in self.train_seqs], dtype=torch.long)
            flat = torch.cat(self.train_seqs) if self.train_seqs else torch.zeros(0, dtype=torch.long)
            self._digest = _digest_tensors(self.info.name, [
                ("item_original_ids", self.item_original_ids),
                ("user_original_ids", self.user_original_ids),
                ("train_lengths", lengths),
                ("train_items", flat),
                ("valid_targets", self.valid_targets),
                ("test_targets", self.test_targets),
            ])
        return self._digest


@dataclass
class LMData:
    """Word-level language-modelling token streams (Mikolov's preprocessing).

    Every line becomes ``line.split() + ["<eos>"]``.  The vocabulary comes from
    the training file only, ordered by descending frequency then alphabetically
    (so ids do not depend on tool or word order); ``<eos>`` is part of it.
    Valid/test words outside it map to ``<unk>`` (counted in ``oov_counts``).
    """

    info: SequenceInfo
    vocab: list[str]
    stoi: dict[str, int]
    train: torch.Tensor  # int64 1-D
    valid: torch.Tensor
    test: torch.Tensor
    oov_counts: dict[str, int]  # split -> number of words mapped to <unk>
    _digest: str | None = field(default=None, init=False, repr=False, compare=False)

    def chunks(self, split: str, length: int) -> torch.Tensor:
        """``[N, length]`` non-overlapping cuts of a split's stream (a shorter tail is dropped)."""
        if split not in ("train", "valid", "test"):
            raise ValueError(f"split must be 'train', 'valid' or 'test', got {split!r}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        stream = getattr(self, split)
        n = len(stream) // length
        return stream[: n * length].view(n, length)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> list[str]:
        """Words of token ids."""
        return [self.vocab[i] for i in torch.as_tensor(ids, dtype=torch.long).reshape(-1).tolist()]

    def digest(self) -> str:
        """SHA-256 (hex) of the name, the vocabulary and the raw bytes of the three streams."""
        if self._digest is None:
            vocab = ("vocab:" + "\n".join(self.vocab) + "\n").encode()
            parts = [("train", self.train), ("valid", self.valid), ("test", self.test)]
            self._digest = _digest_tensors(self.info.name, parts, extra=vocab)
        return self._digest


# --------------------------------------------------------------------------- #
# Registry lookups, roots and the cache
# --------------------------------------------------------------------------- #


def sequence_info(name: str) -> SequenceInfo:
    """Return the :class:`SequenceInfo` of ``name`` (case-insensitive)."""
    return SEQUENCES.info(name)


def is_sequence_dataset(name: str) -> bool:
    return name in SEQUENCES


def resolve_sequence_root(name: str, root: str | os.PathLike | None = None) -> pathlib.Path:
    """Data root: explicit ``root``, else ``$ORCHESTRATE_DATA/<name>``, else ``./data/<name>``."""
    return data_root(sequence_info(name).name, root)


def load_sequences(name: str, root: str | os.PathLike | None = None) -> RecData | LMData:
    """Load a sequence dataset (cached per name and resolved root within the process)."""
    info = sequence_info(name)
    path = resolve_sequence_root(info.name, root)
    return SEQUENCES.load((info.name, str(path)), lambda: SEQUENCES.loaders[info.name](info, path))


def clear_cache() -> None:
    """Forget every sequence dataset loaded so far in this process."""
    SEQUENCES.clear()


# --------------------------------------------------------------------------- #
# Loaders
# --------------------------------------------------------------------------- #


def _load_files(info: SequenceInfo, root: pathlib.Path) -> RecData | LMData:
    """MovieLens and PTB, read from their files by :mod:`orchestrator.sequence_formats` (imported
    on first use: it builds on the types above)."""
    from .sequence_formats import FILE_LOADERS

    return FILE_LOADERS[info.name](info, root)


_LOADERS: dict[str, Callable[[SequenceInfo, pathlib.Path], RecData | LMData]] = {
    "ml-100k": _load_files,
    "ml-1m": _load_files,
    "ptb": _load_files,
}

# the event-sequence datasets, in the registry machinery the image datasets use
SEQUENCES = DatasetRegistry("sequence", SEQUENCE_DATASETS, _LOADERS)


SAMPLED_NEGATIVES = 100  # per test user, for hr10_s100 / ndcg10_s100


def seq_task(data: RecData | LMData, max_len: int) -> SeqTask:
    """What training and evaluation need (``algorithms.seqtrain.SeqTask``): the real training
    sequences cut to the model's ``max_len`` and the test split (recommendation: each user's
    history with the held-out last item, and 100 sampled negatives per user, seed 0, for the
    sampled metrics when every user has that many unseen items; language modelling: the test stream in chunks),
    and the validation split beside it (recommendation: the training history and the second-to-last
    item; language modelling: the valid stream in chunks), which chooses among sets without the test data."""
    if isinstance(data, RecData):
        inputs, targets, seen = data.eval_inputs("test", max_len)
        # sampled metrics only where every user has 100 unseen items to draw (not on tiny vocabularies)
        room = data.info.vocab_size - (data.info.pad_id is not None) - 1 - max(len(h) for h in seen)
        negatives = (sample_negatives(data.info.vocab_size, data.info.pad_id, seen, targets, SAMPLED_NEGATIVES)
                     if room >= SAMPLED_NEGATIVES else None)
        v_inputs, v_targets, v_seen = data.eval_inputs("valid", max_len)
        return SeqTask("recommendation", data.info.vocab_size, data.info.pad_id, data.train_matrix(max_len),
                       inputs, targets, seen, test_negatives=negatives,
                       valid_inputs=v_inputs, valid_targets=v_targets, valid_seen=v_seen)
    return SeqTask("language_model", data.info.vocab_size, None, data.chunks("train", max_len),
                   data.chunks("test", max_len), valid_inputs=data.chunks("valid", max_len))
