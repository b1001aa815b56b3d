"""Tests for the event-sequence dataset registry (orchestrator.sequences)."""

from __future__ import annotations

import pathlib

import pytest
import torch

from .conftest import real_data
from orchestrator import sequences as sq
from orchestrator.datasets import DatasetFormatError, DatasetNotFoundError
from orchestrator.sequences import LMData, RecData, load_sequences



@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    """Every test starts with an empty cache and no ORCHESTRATE_DATA."""
    monkeypatch.delenv("ORCHESTRATE_DATA", raising=False)
    sq.clear_cache()
    yield
    sq.clear_cache()


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #

# (user, item, rating, timestamp), deliberately not sorted by time.
# user 5: 30@100, 20@200, 10@300, 40@300 (tie at 300 -> item 10 before 40)
# user 2: 50@1, 20@5, 10@9 (exactly 3 interactions: one training item)
# user 9: only 2 interactions -> dropped; item 70 appears nowhere else
EVENTS = [
    (5, 40, 4, 300),
    (2, 20, 3, 5),
    (9, 70, 1, 50),
    (5, 30, 5, 100),
    (2, 10, 1, 9),
    (5, 10, 2, 300),
    (9, 10, 5, 40),
    (2, 50, 4, 1),
    (5, 20, 3, 200),
]


def write_ml100k(root: pathlib.Path, events=EVENTS, titles: dict[int, str] | None = None) -> pathlib.Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "u.data").write_text("".join("\t".join(map(str, e)) + "\n" for e in events))
    if titles is not None:
        lines = [f"{i}|{t}|01-Jan-1995||http://x|0|1\n" for i, t in titles.items()]
        (root / "u.item").write_bytes("".join(lines).encode("latin-1"))
    return root


def write_ptb(root: pathlib.Path, train: str, valid: str, test: str) -> pathlib.Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, text in (("train", train), ("valid", valid), ("test", test)):
        (root / f"ptb.{split}.txt").write_text(text)
    return root


# --------------------------------------------------------------------------- #
# registry
# --------------------------------------------------------------------------- #


def test_registry_lookup():
    assert set(sq.SEQUENCE_DATASETS) == {"ml-100k", "ml-1m", "ptb"}
    assert sq.sequence_info(" ML-100K ").name == "ml-100k"
    assert sq.is_sequence_dataset("PTB") and not sq.is_sequence_dataset("mnist")
    with pytest.raises(ValueError, match="known: ml-100k, ml-1m, ptb"):
        sq.sequence_info("ml-20m")
    d = sq.sequence_info("ptb").to_dict()
    assert d["task"] == "language_model" and d["pad_id"] is None and d["vocab_size"] == 10000
    assert d["expected_files"] == ["ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"]
    rec = sq.sequence_info("ml-1m")
    assert (rec.task, rec.pad_id, rec.expected_files, rec.optional_files) == (
        "recommendation", 0, ("ratings.dat",), ("movies.dat",))


# --------------------------------------------------------------------------- #
# recommendation, tiny generated files
# --------------------------------------------------------------------------- #


def test_rec_ordering_remap_and_leave_last_out(tmp_path):
    data = load_sequences("ml-100k", write_ml100k(tmp_path))
    assert isinstance(data, RecData)
    # items of kept users 10,20,30,40,50 -> 1..5; item 70 (dropped user only) is gone
    assert data.item_original_ids.tolist() == [-1, 10, 20, 30, 40, 50]
    assert (data.num_users, data.num_items, data.info.vocab_size, data.info.pad_id) == (2, 5, 6, 0)
    assert data.user_original_ids.tolist() == [2, 5]  # user 9 (2 interactions) dropped
    # user 2: 50,20,10 -> 5,2,1 ; user 5: 30,20,10,40 -> 3,2,1,4
    assert [s.tolist() for s in data.train_seqs] == [[5], [3, 2]]
    assert data.valid_targets.tolist() == [2, 1]
    assert data.test_targets.tolist() == [1, 4]
    assert all(s.dtype == torch.int64 for s in data.train_seqs)
    assert data.titles is None
    assert data.decode(torch.tensor([0, 1, 5])) == ["<pad>", "item 10", "item 50"]
    with pytest.raises(IndexError):
        data.decode([6])


def test_rec_train_matrix_padding_and_truncation(tmp_path):
    data = load_sequences("ml-100k", write_ml100k(tmp_path))
    assert data.train_matrix(3).tolist() == [[0, 0, 5], [0, 3, 2]]
    assert data.train_matrix(1).tolist() == [[5], [2]]
    assert data.train_matrix(2).dtype == torch.int64
    with pytest.raises(ValueError):
        data.train_matrix(0)


def test_rec_eval_inputs(tmp_path):
    data = load_sequences("ml-100k", write_ml100k(tmp_path))
    x, y, seen = data.eval_inputs("valid", 2)
    assert x.tolist() == [[0, 5], [3, 2]] and y.tolist() == [2, 1]
    assert [s.tolist() for s in seen] == [[5], [2, 3]]
    x, y, seen = data.eval_inputs("test", 2)  # input = train + valid item, truncated to the last 2
    assert x.tolist() == [[5, 2], [2, 1]] and y.tolist() == [1, 4]
    assert [s.tolist() for s in seen] == [[2, 5], [1, 2, 3]]  # whole input, not only the last 2
    with pytest.raises(ValueError, match="split"):
        data.eval_inputs("train", 2)


def test_rec_titles_u_item(tmp_path):
    data = load_sequences("ml-100k", write_ml100k(tmp_path, titles={10: "Ten (1995)", 20: "Twenty", 70: "Gone"}))
    assert data.titles == ["<pad>", "Ten (1995)", "Twenty", "item 30", "item 40", "item 50"]
    assert data.decode([2, 1]) == ["Twenty", "Ten (1995)"]


def test_ml1m_double_colon_format_with_titles(tmp_path):
    (tmp_path / "ratings.dat").write_text(
        "".join(f"{u}::{i}::{r}::{t}\r\n" for u, i, r, t in EVENTS)  # CRLF tolerated
    )
    (tmp_path / "movies.dat").write_bytes(
        "10::Café (1999)::Drama\n20::Twenty (2000)::Comedy|Drama\n30::x::y\n40::x::y\n50::Fifty::z\n".encode("latin-1")
    )
    data = load_sequences("ML-1M", tmp_path)
    assert data.info.name == "ml-1m" and data.info.vocab_size == 6
    assert [s.tolist() for s in data.train_seqs] == [[5], [3, 2]]
    assert data.test_targets.tolist() == [1, 4]
    assert data.decode([1, 2, 5]) == ["Café (1999)", "Twenty (2000)", "Fifty"]


def test_ml1m_corrupt_line(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::2::3::4\n1::2::3\n")
    with pytest.raises(DatasetFormatError) as err:
        load_sequences("ml-1m", tmp_path)
    assert str(tmp_path / "ratings.dat") in str(err.value) and "line 2" in str(err.value)


# --------------------------------------------------------------------------- #
# roots, errors, cache, digest
# --------------------------------------------------------------------------- #


def test_missing_files_message(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_sequences("ml-100k", tmp_path / "nowhere")
    msg = str(err.value)
    assert "u.data  [missing]" in msg and "u.item  [optional" in msg
    assert "ORCHESTRATE_DATA" in msg and "dataset.root" in msg and "./data/ml-100k" in msg
    assert str(tmp_path / "nowhere") in msg and "does not exist" in msg
    assert err.value.missing == ("u.data",) and err.value.name == "ml-100k"
    assert isinstance(err.value, FileNotFoundError)

    write_ptb(tmp_path / "p", "a\n", "a\n", "a\n")
    (tmp_path / "p" / "ptb.valid.txt").unlink()
    with pytest.raises(DatasetNotFoundError) as err:
        load_sequences("ptb", tmp_path / "p")
    msg = str(err.value)
    assert "ptb.train.txt  [found]" in msg and "ptb.valid.txt  [missing]" in msg and "ptb.test.txt  [found]" in msg
    assert err.value.missing == ("ptb.valid.txt",)


def test_root_resolution(tmp_path, monkeypatch):
    write_ml100k(tmp_path / "env" / "ml-100k")
    monkeypatch.setenv("ORCHESTRATE_DATA", str(tmp_path / "env"))
    assert load_sequences("ml-100k").num_users == 2
    assert sq.resolve_sequence_root("ml-100k") == (tmp_path / "env" / "ml-100k").resolve()
    # an explicit root wins; files may lie in a sub-folder named like the dataset
    assert load_sequences("ml-100k", tmp_path / "env").num_users == 2
    monkeypatch.delenv("ORCHESTRATE_DATA")
    monkeypatch.chdir(tmp_path)
    assert sq.resolve_sequence_root("ptb") == (tmp_path / "data" / "ptb").resolve()
    with pytest.raises(DatasetNotFoundError, match="data/ptb"):
        load_sequences("ptb")


@pytest.mark.parametrize(
    "content, needle",
    [
        ("1\t2\t3\t4\n1\t2\t3\t4\n1\t2\t3\n", "line 3: expected 4 fields"),
        ("1\t2\t3\t4\n1\tabc\t3\t4\n", "line 2: item id 'abc' is not an integer"),
        ("1\t2\t3\t4\n\n1\t2\t3\t-4\n", "line 3: timestamp -4 is negative"),
        ("", "empty file"),
        ("\n  \n", "empty file"),
        ("1\t2\t3\t4\n", "no user has at least 3 interactions"),
    ],
)
def test_corrupt_interactions(tmp_path, content, needle):
    (tmp_path / "u.data").write_text(content)
    with pytest.raises(DatasetFormatError) as err:
        load_sequences("ml-100k", tmp_path)
    assert str(tmp_path / "u.data") in str(err.value) and needle in str(err.value)


def test_corrupt_titles(tmp_path):
    write_ml100k(tmp_path)
    (tmp_path / "u.item").write_text("10|Ten\nx|Bad\n")
    with pytest.raises(DatasetFormatError, match=r"u\.item: line 2: item id 'x'"):
        load_sequences("ml-100k", tmp_path)


def test_cache_and_digest(tmp_path):
    root = write_ml100k(tmp_path / "a")
    first = load_sequences("ml-100k", root)
    assert load_sequences("ML-100K", str(root)) is first
    digest = first.digest()
    assert len(digest) == 64 and digest == first.digest()
    sq.clear_cache()
    again = load_sequences("ml-100k", root)
    assert again is not first and again.digest() == digest
    # the same data under another root has the same digest; changed content changes it
    assert load_sequences("ml-100k", write_ml100k(tmp_path / "b")).digest() == digest
    swapped = [(5, 40, 4, 100) if e == (5, 30, 5, 100) else (5, 30, 5, 300) if e == (5, 40, 4, 300) else e
               for e in EVENTS]
    assert load_sequences("ml-100k", write_ml100k(tmp_path / "c", swapped)).digest() != digest
    # titles are metadata only
    assert load_sequences("ml-100k", write_ml100k(tmp_path / "d", titles={10: "T"})).digest() == digest


# --------------------------------------------------------------------------- #
# language modelling, tiny generated corpus
# --------------------------------------------------------------------------- #


def test_lm_vocab_eos_and_chunks(tmp_path):
    root = write_ptb(tmp_path, " a b a <unk> \n c a b \n", " a z \n", " c \n")
    data = load_sequences("ptb", root)
    assert isinstance(data, LMData)
    # counts: a 3, <eos> 2, b 2, <unk> 1, c 1 -> by descending count, then alphabetically
    assert data.vocab == ["a", "<eos>", "b", "<unk>", "c"]
    assert data.stoi == {w: i for i, w in enumerate(data.vocab)}
    assert (data.info.vocab_size, data.info.pad_id, data.info.task) == (5, None, "language_model")
    assert data.decode(data.train) == "a b a <unk> <eos> c a b <eos>".split()
    assert data.decode(data.valid) == ["a", "<unk>", "<eos>"] and data.oov_counts["valid"] == 1
    assert data.decode(data.test) == ["c", "<eos>"] and data.oov_counts["test"] == 0
    assert data.train.dtype == torch.int64
    assert data.chunks("train", 4).tolist() == [data.train[:4].tolist(), data.train[4:8].tolist()]
    assert data.chunks("train", 9).shape == (1, 9)
    assert data.chunks("valid", 5).shape == (0, 5)
    with pytest.raises(ValueError):
        data.chunks("dev", 3)
    digest = data.digest()
    assert digest == data.digest()
    changed = write_ptb(tmp_path / "x", " a b a <unk> \n c a b \n", " a a \n", " c \n")
    assert load_sequences("ptb", changed).digest() != digest


def test_lm_oov_without_unk_and_empty_file(tmp_path):
    root = write_ptb(tmp_path, "a b\n", "a\nb zz\n", "a\n")
    with pytest.raises(DatasetFormatError, match=r"ptb\.valid\.txt: line 2: word 'zz'"):
        load_sequences("ptb", root)
    root = write_ptb(tmp_path / "e", "a b\n", "a\n", "")
    with pytest.raises(DatasetFormatError, match=r"ptb\.test\.txt: empty file"):
        load_sequences("ptb", root)


# --------------------------------------------------------------------------- #
# real data
# --------------------------------------------------------------------------- #


def test_real_ml100k():
    folder = real_data("ml-100k", "u.data", "u.item")
    data = load_sequences("ml-100k", folder)
    assert (data.num_users, data.num_items, data.info.vocab_size) == (943, 1682, 1683)
    assert data.user_original_ids.tolist() == list(range(1, 944))
    assert data.item_original_ids.tolist() == [-1, *range(1, 1683)]
    lengths = torch.tensor([len(s) for s in data.train_seqs])
    assert int(lengths.sum()) + 2 * data.num_users == 100000
    assert int(lengths.min()) == 20 - 2  # every user has >= 20 ratings (SOURCE.md)
    # per user: train length = interactions - 2
    counts = torch.bincount(torch.tensor(
        [int(line.split()[0]) for line in (folder / "u.data").read_text().splitlines()]))[1:]
    assert torch.equal(lengths, counts - 2)
    assert data.titles is not None and data.decode([1]) == ["Toy Story (1995)"]
    assert data.train_matrix(50).shape == (943, 50)


def test_real_ptb():
    data = load_sequences("ptb", real_data("ptb", "ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"))
    assert len(data.vocab) == data.info.vocab_size == 10000
    assert "<eos>" in data.stoi and "<unk>" in data.stoi
    assert (len(data.train), len(data.valid), len(data.test)) == (929589, 73760, 82430)  # SOURCE.md
    assert data.oov_counts == {"train": 0, "valid": 0, "test": 0}
    assert data.vocab[0] == "the"  # the most frequent word
    assert data.chunks("train", 35).shape == (929589 // 35, 35)
