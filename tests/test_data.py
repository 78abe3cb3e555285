from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.errors import BnfoldError
from bnfold.mlp.data import END, Vocab, build_contexts, load_dataset, read_words, split_words


def write(tmp_path, content: bytes | str, name: str = "words.txt"):
    p = tmp_path / name
    p.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return p


def test_names_file_matches_the_lecture(names_path):
    words = read_words(names_path)
    assert len(words) == 32033
    vocab = Vocab.from_words(words)
    assert vocab.size == 27 and "".join(vocab.chars) == "abcdefghijklmnopqrstuvwxyz"
    train, dev, test = split_words(words)
    assert (len(train), len(dev), len(test)) == (25626, 3203, 3204)
    d = load_dataset(names_path)
    # The lecture prints these sizes for block_size 3.
    assert [len(d.splits[s][0]) for s in ("train", "dev", "test")] == [182625, 22655, 22866]


def test_split_equals_global_random_seed_shuffle(names_path):
    import random

    words = read_words(names_path)
    expected = list(words)
    random.seed(42)
    random.shuffle(expected)
    train, dev, test = split_words(words)
    assert train + dev + test == expected
    assert split_words(words) == (train, dev, test)  # deterministic


def test_any_unicode_round_trips_and_never_collides_with_end(tmp_path):
    words = ["Zoë", "Jean-Luc", "Mary Ann", "o'neil", "dr.who", "ñ", "日本", "a.b.", "🙂x"]
    p = write(tmp_path, "\n".join(words) + "\n")
    assert read_words(p) == words
    vocab = Vocab.from_words(words)
    assert "." in vocab.chars and vocab.stoi(".") != END
    for w in words:
        ids = vocab.encode(w)
        assert END not in ids
        assert vocab.decode(ids) == w


def test_blank_lines_whitespace_and_crlf_are_handled(tmp_path):
    p = write(tmp_path, "\n  anna \r\n\n\t\nbob\n   \n")
    assert read_words(p) == ["anna", "bob"]


def test_too_few_words_for_the_split(tmp_path):
    """One word gives an empty train and dev split (int(0.8) = 0, int(0.9) = 0): refused
    in one line; six words are the fewest with every split non-empty (4 / 1 / 1)."""
    with pytest.raises(BnfoldError, match="1 words leave the train and dev split empty"):
        load_dataset(write(tmp_path, "emma"), block_size=2)
    d = load_dataset(write(tmp_path, "\n".join(["emma", "ava", "liam", "noah", "mia", "zoe"])))
    assert [len(w) for w in d.words] == [4, 1, 1]


def test_contexts_follow_the_lecture_window():
    vocab = Vocab(tuple("abem"))
    x, y = build_contexts(["emma"], vocab, 3)
    e, m, a = vocab.stoi("e"), vocab.stoi("m"), vocab.stoi("a")
    assert x.tolist() == [[0, 0, 0], [0, 0, e], [0, e, m], [e, m, m], [m, m, a]]
    assert y.tolist() == [e, m, m, a, END]
    assert x.dtype == torch.long and y.dtype == torch.long


@pytest.mark.parametrize(
    "content, match",
    [
        (b"anna\nb\xffob\n", r"words.txt:2: byte 0xff at column 2 is not UTF-8"),
        (b"\n \n\t\n", "contains no words"),
        (b"", "contains no words"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path, content, match):
    with pytest.raises(BnfoldError, match=match):
        read_words(write(tmp_path, content))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(BnfoldError, match="no such file"):
        read_words(tmp_path / "nope.txt")
    with pytest.raises(BnfoldError, match="is a directory"):
        read_words(tmp_path)


def test_vocab_rejects_unknown_and_end_ids():
    vocab = Vocab(tuple("ab"))
    with pytest.raises(BnfoldError, match="not in the vocabulary"):
        vocab.encode("abc")
    with pytest.raises(BnfoldError):
        vocab.decode([1, 0])
    assert vocab.unknown_chars("abzc") == ["c", "z"]
    assert vocab.size == 3


def lecture_contexts(words: list[str], vocab: Vocab, block_size: int):
    """The lecture's loop, one Python list per context: the reference for build_contexts."""
    xs, ys = [], []
    for w in words:
        context = [END] * block_size
        for ix in [*vocab.encode(w), END]:
            xs.append(context)
            ys.append(ix)
            context = [*context[1:], ix]
    return xs, ys


@given(
    words=st.lists(st.text(alphabet="ab.é😀 z", min_size=1, max_size=12), min_size=1, max_size=30),
    block_size=st.integers(1, 6),
)
@settings(max_examples=200, deadline=None)
def test_vectorised_contexts_equal_the_lecture_loop(words, block_size):
    vocab = Vocab.from_words(words)
    x, y = build_contexts(words, vocab, block_size)
    xs, ys = lecture_contexts(words, vocab, block_size)
    assert x.tolist() == xs and y.tolist() == ys
    assert x.shape == (len(ys), block_size) and x.dtype == y.dtype == torch.long


def test_vectorised_contexts_on_names(names_path):
    words = read_words(names_path)
    vocab = Vocab.from_words(words)
    x, y = build_contexts(words, vocab, 3)
    xs, ys = lecture_contexts(words, vocab, 3)
    assert x.tolist() == xs and y.tolist() == ys
