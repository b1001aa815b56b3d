"""The files of the event-sequence datasets: where they may lie under a data root, MovieLens'
ratings and item titles and PTB's text files, parsed with the standard library and numpy.
:mod:`orchestrator.sequences` loads them through :data:`FILE_LOADERS`."""

from __future__ import annotations

import collections
import dataclasses
import io
import pathlib
from typing import Callable, Iterator

import numpy as np
import torch

from .datasets import DATA_ENV_VAR, DatasetFormatError, DatasetNotFoundError
from .sequences import MIN_INTERACTIONS, PAD_TITLE, LMData, RecData, SequenceInfo

EOS = "<eos>"
UNK = "<unk>"

# Extra sub-directories of the root searched for a dataset's files (besides root/<name>).
_ALT_DIRS: dict[str, tuple[str, ...]] = {"ptb": ("simple-examples/data",)}


# --------------------------------------------------------------------------- #
# Locating and reading files
# --------------------------------------------------------------------------- #


def _candidates(info: SequenceInfo, root: pathlib.Path, rel: str) -> Iterator[pathlib.Path]:
    """``root/rel``, then ``root/<name>/rel`` and the dataset's alternative layouts."""
    for d in ("", info.name, *_ALT_DIRS.get(info.name, ())):
        yield root / d / rel


def _find(info: SequenceInfo, root: pathlib.Path, rel: str) -> pathlib.Path | None:
    return next((p for p in _candidates(info, root, rel) if p.is_file()), None)


def _locate(info: SequenceInfo, root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Map each required (and each present optional) file to its path, or raise :class:`DatasetNotFoundError`."""
    found = {rel: p for rel in info.expected_files + info.optional_files if (p := _find(info, root, rel))}
    missing = tuple(rel for rel in info.expected_files if rel not in found)
    if missing:
        where = "the directory does not exist" if not root.is_dir() else "some files are missing"
        looked = ", ".join(str(root / d) for d in ("", info.name, *_ALT_DIRS.get(info.name, ())))
        lines = [
            f"dataset {info.name!r} not found under data root {root} ({where}: "
            f"{len(missing)} of {len(info.expected_files)} required files missing).",
            f"Looked in: {looked}",
            "Expected files (relative to the data root):",
        ]
        lines += [f"  {rel}  [{'missing' if rel in missing else 'found'}]" for rel in info.expected_files]
        lines += [
            f"  {rel}  [optional, item titles; {'found' if rel in found else 'missing'}]"
            for rel in info.optional_files
        ]
        lines.append(
            f"To provide them, set dataset.root in the spec to the folder holding these files, "
            f"or set {DATA_ENV_VAR}=<dir> so that <dir>/{info.name} holds them "
            f"(default when neither is given: ./data/{info.name})."
        )
        raise DatasetNotFoundError("\n".join(lines), name=info.name, root=root, missing=missing)
    return found


def _read_lines(path: pathlib.Path, encoding: str) -> list[str]:
    """The file's lines (without the final empty piece after a trailing newline)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetFormatError(f"{path}: cannot read file ({exc})") from exc
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DatasetFormatError(f"{path}: line {line}: not valid {encoding} text ({exc.reason})") from exc
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    if not any(line.strip() for line in lines):
        raise DatasetFormatError(f"{path}: empty file (no data lines)")
    return lines


def _split_fields(lines: list[str], sep: str | None) -> Iterator[tuple[int, list[str]]]:
    """``(line number, fields)`` of every non-blank line."""
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            yield lineno, line.strip().split(sep)


def _int_field(path: pathlib.Path, lineno: int, column: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise DatasetFormatError(f"{path}: line {lineno}: {column} {value!r} is not an integer") from None
    if number < 0:
        raise DatasetFormatError(f"{path}: line {lineno}: {column} {number} is negative")
    return number


_COLUMNS = ("user id", "item id", "rating", "timestamp")


def _read_interactions(path: pathlib.Path, sep: str | None) -> np.ndarray:
    """``int64 [N, 4]`` rows ``user, item, rating, timestamp``."""
    lines = _read_lines(path, "latin-1")
    text = "\n".join(lines)
    if sep is None or "\t" not in text:  # fast path (C parser); any problem is located line by line below
        try:
            fast, delimiter = (text, None) if sep is None else (text.replace(sep, "\t"), "\t")
            rows = np.loadtxt(io.StringIO(fast), dtype=np.int64, delimiter=delimiter, comments=None, ndmin=2)
            if rows.shape[1] == 4 and rows.min() >= 0:
                return rows
        except (ValueError, OverflowError):
            pass
    rows = []
    for lineno, fields in _split_fields(lines, sep):
        if len(fields) != 4:
            layout = (sep or "<tab>").join(c.replace(" ", "_") for c in _COLUMNS)
            raise DatasetFormatError(f"{path}: line {lineno}: expected 4 fields {layout}, found {len(fields)}")
        rows.append([_int_field(path, lineno, col, v) for col, v in zip(_COLUMNS, fields)])
    try:
        return np.array(rows, dtype=np.int64)
    except OverflowError as exc:
        raise DatasetFormatError(f"{path}: an integer field does not fit in 64 bits") from exc


def _read_titles(path: pathlib.Path, sep: str) -> dict[int, str]:
    """``original item id -> title`` from ``id<sep>title<sep>...`` lines (Latin-1)."""
    titles: dict[int, str] = {}
    for lineno, fields in _split_fields(_read_lines(path, "latin-1"), sep):
        if len(fields) < 2:
            raise DatasetFormatError(f"{path}: line {lineno}: expected at least 2 fields id{sep}title, found 1")
        titles.setdefault(_int_field(path, lineno, "item id", fields[0]), fields[1].strip())
    return titles


# --------------------------------------------------------------------------- #
# Loaders
# --------------------------------------------------------------------------- #


def _build_rec(info: SequenceInfo, rows: np.ndarray, source: pathlib.Path, titles: dict[int, str] | None) -> RecData:
    user, item, ts = rows[:, 0], rows[:, 1], rows[:, 3]
    order = np.lexsort((np.arange(len(rows)), item, ts, user))  # user, timestamp, item id, then file order
    user, item = user[order], item[order]
    _, counts = np.unique(user, return_counts=True)
    keep = np.repeat(counts >= MIN_INTERACTIONS, counts)
    user, item = user[keep], item[keep]
    if len(user) == 0:
        raise DatasetFormatError(f"{source}: no user has at least {MIN_INTERACTIONS} interactions")
    users, starts, counts = np.unique(user, return_index=True, return_counts=True)
    originals = np.unique(item)
    new = np.searchsorted(originals, item) + 1
    ends = starts + counts
    position = np.arange(len(new)) - np.repeat(starts, counts)
    train_flat = torch.from_numpy(new[position < np.repeat(counts - 2, counts)])
    item_original_ids = torch.from_numpy(np.concatenate([[-1], originals]).astype(np.int64))
    title_list = None
    if titles is not None:
        title_list = [PAD_TITLE] + [titles.get(int(o), f"item {int(o)}") for o in originals]
    return RecData(
        info=dataclasses.replace(info, vocab_size=len(originals) + 1),
        train_seqs=list(train_flat.split((counts - 2).tolist())),
        valid_targets=torch.from_numpy(new[ends - 2]),
        test_targets=torch.from_numpy(new[ends - 1]),
        item_original_ids=item_original_ids,
        user_original_ids=torch.from_numpy(users.astype(np.int64)),
        titles=title_list,
    )


def _load_movielens(sep: str | None, title_sep: str) -> Callable[[SequenceInfo, pathlib.Path], RecData]:
    def load(info: SequenceInfo, root: pathlib.Path) -> RecData:
        files = _locate(info, root)
        source = files[info.expected_files[0]]
        rows = _read_interactions(source, sep)
        titles_path = files.get(info.optional_files[0])
        titles = _read_titles(titles_path, title_sep) if titles_path else None
        return _build_rec(info, rows, source, titles)

    return load


def _read_lm_file(path: pathlib.Path) -> list[list[str]]:
    return [line.split() + [EOS] for line in _read_lines(path, "utf-8")]


def _load_ptb(info: SequenceInfo, root: pathlib.Path) -> LMData:
    """Word-level PTB from ``ptb.{train,valid,test}.txt``."""
    files = _locate(info, root)
    paths = dict(zip(("train", "valid", "test"), (files[rel] for rel in info.expected_files)))
    texts = {split: _read_lm_file(p) for split, p in paths.items()}
    counts = collections.Counter(w for line in texts["train"] for w in line)
    vocab = sorted(counts, key=lambda w: (-counts[w], w))
    stoi = {w: i for i, w in enumerate(vocab)}
    unk = stoi.get(UNK)
    streams, oov = {}, {}
    for split, lines in texts.items():
        ids = np.array([stoi.get(w, -1) for words in lines for w in words], dtype=np.int64)
        unknown = ids < 0
        if unknown.any() and unk is None:
            lineno, word = next((n, w) for n, words in enumerate(lines, 1) for w in words if w not in stoi)
            raise DatasetFormatError(
                f"{paths[split]}: line {lineno}: word {word!r} is not in the training vocabulary "
                f"and the training file has no {UNK} token to map it to"
            )
        ids[unknown] = unk if unk is not None else 0
        streams[split] = torch.from_numpy(ids)
        oov[split] = int(unknown.sum())
    return LMData(
        info=dataclasses.replace(info, vocab_size=len(vocab)),
        vocab=vocab,
        stoi=stoi,
        oov_counts=oov,
        **streams,
    )


FILE_LOADERS: dict[str, Callable[[SequenceInfo, pathlib.Path], RecData | LMData]] = {
    "ml-100k": _load_movielens(None, "|"),  # u.data: tab (any whitespace) separated; u.item: '|'
    "ml-1m": _load_movielens("::", "::"),
    "ptb": _load_ptb,
}
