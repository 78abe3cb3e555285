"""Words file -> vocabulary -> train/dev/test contexts, exactly as in the makemore lecture.

The start/end token is index 0 and is *not* a character: the lecture writes it `.`, but a
data file may well contain `.` (or any other character), so the token is kept out of the
character table altogether and can never collide with data.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bnfold.errors import BnfoldError
from bnfold.io.files import MiB, bytes_sha256, read_bounded

if TYPE_CHECKING:  # torch is imported lazily: sampling and serving ONNX models never need it
    import torch

# The lecture's words file, shipped inside the package (the repository's data/names.txt is a
# link to it): the default of every command, wherever bnfold is installed.
DEFAULT_WORDS = Path(__file__).with_name("names.txt")

END = 0  # index of the reserved start/end token


@dataclass(frozen=True)
class Vocab:
    """Index 0 is the reserved start/end token; index i >= 1 is ``chars[i - 1]``."""

    chars: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(set(self.chars)) != len(self.chars) or any(len(c) != 1 for c in self.chars):
            raise BnfoldError("vocabulary must be distinct single characters")
        object.__setattr__(self, "_stoi", {c: i + 1 for i, c in enumerate(self.chars)})

    @classmethod
    def from_words(cls, words: list[str]) -> Vocab:
        return cls(tuple(sorted(set("".join(words)))))

    @property
    def size(self) -> int:
        return len(self.chars) + 1

    def stoi(self, ch: str) -> int:
        try:
            return self._stoi[ch]  # type: ignore[attr-defined]
        except KeyError:
            raise BnfoldError(f"character {ch!r} is not in the vocabulary") from None

    def encode(self, word: str) -> list[int]:
        return [self.stoi(c) for c in word]

    def decode(self, ids: list[int]) -> str:
        """Characters for ids >= 1; the end token (0) is not a character and is refused."""
        if any(i <= 0 or i > len(self.chars) for i in ids):
            raise BnfoldError(f"ids {ids} contain the end token or fall outside the vocabulary")
        return "".join(self.chars[i - 1] for i in ids)

    def unknown_chars(self, text: str) -> list[str]:
        return sorted({c for c in text if c not in self._stoi})  # type: ignore[attr-defined]


# Bounds on a words file: names.txt is 0.23 MB with words of at most 15 characters.
MAX_WORDS_BYTES = 16 * MiB  # ~70x names.txt; its contexts cost ~70 bytes per character
MAX_WORD_CHARS = 1_000
UTF8_BOM = b"\xef\xbb\xbf"


def read_words_and_sha256(path: str | Path) -> tuple[list[str], str]:
    """The words of a words file and the sha256 of its bytes, read once (see
    :func:`read_words`)."""
    p = Path(path)
    raw = read_bounded(
        p,
        MAX_WORDS_BYTES,
        "a words file",
        missing="no such file (give a UTF-8 text file with one word per line)",
        directory="is a directory, not a words file (e.g. data/names.txt)",
    )
    sha256 = bytes_sha256(raw)
    # Editors on Windows start UTF-8 files with a byte-order mark; it is not a character.
    text_bytes = raw[len(UTF8_BOM) :] if raw.startswith(UTF8_BOM) else raw
    words = []
    for lineno, line in enumerate(text_bytes.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BnfoldError(
                f"{p}:{lineno}: byte {line[e.start]:#04x} at column {e.start + 1} is not UTF-8;"
                " re-save the file as UTF-8"
            ) from None
        word = text.strip()
        if len(word) > MAX_WORD_CHARS:
            raise BnfoldError(
                f"{p}:{lineno}: a word of {len(word):,} characters; a line may hold at most"
                f" {MAX_WORD_CHARS:,} (one word per line)"
            )
        if word:
            words.append(word)
    if not words:
        raise BnfoldError(f"{p}: contains no words (expected one word per line)")
    return words, sha256


def read_words(path: str | Path) -> list[str]:
    """One word per line, UTF-8 (a leading byte-order mark is dropped); surrounding white
    space stripped, blank lines skipped. At most ``MAX_WORDS_BYTES`` bytes and
    ``MAX_WORD_CHARS`` characters per word, else one clear ``BnfoldError``."""
    return read_words_and_sha256(path)[0]


# the fewest words whose 80/10/10 split leaves every part non-empty (4 / 1 / 1)
MIN_WORDS = 6


def split_words(words: list[str], seed: int = 42) -> tuple[list[str], list[str], list[str]]:
    """The lecture's split: ``random.seed(42); random.shuffle(words)``, then 80/10/10.

    A private ``random.Random`` gives the same shuffle as the global one without touching
    global state.
    """
    shuffled = list(words)
    random.Random(seed).shuffle(shuffled)
    n1, n2 = int(0.8 * len(shuffled)), int(0.9 * len(shuffled))
    return shuffled[:n1], shuffled[n1:n2], shuffled[n2:]


def _char_ids(text: str, vocab: Vocab):
    """``vocab.encode(text)`` as an int64 numpy array, without a Python int per character."""
    import numpy as np

    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = np.fromiter((ord(c) for c in vocab.chars), dtype=np.uint32, count=len(vocab.chars))
    order = np.argsort(table)
    slot = np.searchsorted(table[order], codes).clip(0, max(len(table) - 1, 0))
    known = table[order][slot] == codes if len(table) else np.zeros(len(codes), bool)
    if len(codes) and not known.all():
        vocab.stoi(chr(int(codes[np.argmin(known)])))  # raises the usual BnfoldError
    return order[slot].astype(np.int64) + 1  # index 0 is END


def build_contexts(
    words: list[str], vocab: Vocab, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sliding window over ``END * block_size + word + END``: X is (N, block_size), Y is (N,).

    Vectorised: the words become one padded id sequence and X is a strided view of it,
    so memory is the (N, block_size) int64 result, not a Python list per context.
    """
    import numpy as np
    import torch

    if not words:
        return torch.zeros((0, block_size), dtype=torch.long), torch.zeros(0, dtype=torch.long)
    n, bs = len(words), block_size
    lengths = np.fromiter((len(w) for w in words), dtype=np.int64, count=n)
    ids = _char_ids("".join(words), vocab)
    # One sequence: each word as END * bs + its characters + END. Word i's characters sit
    # (bs + 1) * i + bs places further than their index in the joined text.
    seq = np.full(len(ids) + n * (bs + 1), END, dtype=np.int64)
    pos = np.arange(len(ids), dtype=np.int64)
    pos += (bs + 1) * np.repeat(np.arange(n, dtype=np.int64), lengths) + bs
    seq[pos] = ids
    del pos, ids
    # Word i has len_i + 1 contexts, at every place of its part but the last bs: context t
    # starts bs places further per earlier word.
    first = np.arange(int(lengths.sum()) + n, dtype=np.int64)
    first += bs * np.repeat(np.arange(n, dtype=np.int64), lengths + 1)
    x = np.lib.stride_tricks.sliding_window_view(seq, bs)[first]
    y = seq[first + bs]
    return torch.from_numpy(x), torch.from_numpy(y)


def distinct_contexts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(contexts, inverse)`` with ``contexts[inverse] == x``: the distinct rows of ``x``.

    Each row is read as one base-``vocab`` integer so that a fast 1-D ``unique`` does the
    work (``unique(dim=0)`` is ~20x slower); very large vocabularies fall back to it.
    """
    import torch

    if len(x) == 0:
        return x, torch.zeros(0, dtype=torch.long)
    base, width = int(x.max()) + 1, x.shape[1]
    if x.min() < 0 or width * math.log2(max(base, 2)) >= 62:
        return torch.unique(x, dim=0, return_inverse=True)
    weights = base ** torch.arange(width - 1, -1, -1, dtype=torch.long)
    keys, inverse = torch.unique(x @ weights, return_inverse=True)
    first = torch.empty(len(keys), dtype=torch.long).scatter_(0, inverse, torch.arange(len(x)))
    return x[first], inverse


@dataclass
class Dataset:
    """Everything training needs from a words file."""

    path: Path
    sha256: str
    vocab: Vocab
    words: tuple[list[str], list[str], list[str]]  # train, dev, test
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]


def load_dataset(path: str | Path, block_size: int = 3, seed: int = 42) -> Dataset:
    """The words file at ``path`` (read once) as a :class:`Dataset`."""
    if block_size < 1:
        raise BnfoldError(f"block_size must be >= 1, got {block_size}")
    words, sha256 = read_words_and_sha256(path)
    return dataset_from_words(words, sha256, Path(path), block_size, seed)


def dataset_from_words(
    words: list[str], sha256: str, path: Path, block_size: int = 3, seed: int = 42
) -> Dataset:
    """The :class:`Dataset` of ``words`` (read from ``path``, whose bytes hash to
    ``sha256``): vocabulary, 80/10/10 split by ``seed`` and the contexts of each split."""
    vocab = Vocab.from_words(words)
    train, dev, test = split_words(words, seed)
    empty = [name for name, ws in (("train", train), ("dev", dev), ("test", test)) if not ws]
    if empty:
        raise BnfoldError(
            f"{path}: {len(words)} words leave the {' and '.join(empty)} split empty (the"
            f" split is 80/10/10); give at least {MIN_WORDS} words"
        )
    splits = {
        name: build_contexts(ws, vocab, block_size)
        for name, ws in (("train", train), ("dev", dev), ("test", test))
    }
    return Dataset(path, sha256, vocab, (train, dev, test), splits)
