"""What decides which names come out: :class:`SampleOptions`, and the option group
(:func:`group_key`) that the rows of one engine share."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np

from bnfold.errors import BnfoldError
from bnfold.mlp.data import Vocab
from bnfold.sampling.tokens import MASK64

MAX_COUNT = 10_000_000  # names per request
MAX_LENGTH_CAP = 1_000  # characters per name (the stream counter reserves 16 bits per name)
DEFAULT_MAX_LENGTH = 50  # the longest of the 32k training names has 15 characters
DEFAULT_BATCH = 4096  # names in flight; measured best for ONNX Runtime on one thread
NEW_ONLY_DRAWS = (20, 10_000)  # --new-only gives up after 20 * count + 10,000 draws
LABELS = ("train", "dev", "test", "new")


class Bound(NamedTuple):
    """The range of a numeric option: ``lo <= x`` (``lo < x`` when ``lo_open``) and
    ``x <= hi`` (no upper bound when ``hi`` is None). Stated once, in :data:`BOUNDS`, and
    read by :meth:`SampleOptions.check`, the command line's option types and the service's
    request schema."""

    lo: float
    hi: float | None = None
    lo_open: bool = False

    def holds(self, x: float) -> bool:
        """``x`` lies in the range."""
        above = x > self.lo if self.lo_open else x >= self.lo
        return above and (self.hi is None or x <= self.hi)

    def field(self, hi: float | None = None) -> dict:
        """The bound as pydantic ``Field`` keywords (``ge``/``gt``, ``le``); ``hi``, when
        given, replaces the upper bound (e.g. a server's own count cap)."""
        hi = self.hi if hi is None else hi
        return {"gt" if self.lo_open else "ge": self.lo, **({} if hi is None else {"le": hi})}


BOUNDS = {
    "count": Bound(1, MAX_COUNT),
    "seed": Bound(0, MASK64),
    "temperature": Bound(0),  # 0 = greedy
    "top_k": Bound(1),
    "top_p": Bound(0, 1, lo_open=True),
    "min_length": Bound(0, MAX_LENGTH_CAP),  # check(): at most max-length, so the cap holds
    "max_length": Bound(1, MAX_LENGTH_CAP),
}


@dataclass(frozen=True)
class SampleOptions:
    """Everything that decides which names come out (the batch size does not).

    ``min_length`` / ``max_length`` count the characters of the whole name, prefix
    included: below ``min_length`` the end token is masked out (the default 1 rules out
    the empty name); at ``max_length`` the name stops. ``temperature`` 0 means greedy
    (argmax). ``top_k`` / ``top_p`` filter the temperature-scaled distribution, after the
    end-token mask (ties at the cut-off are kept). ``new_only`` keeps only names in none of
    the training file's train / dev / test splits (see :func:`sample_names`).
    """

    count: int = 10
    seed: int = 42
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    prefix: str = ""
    min_length: int = 1
    max_length: int = DEFAULT_MAX_LENGTH
    new_only: bool = False

    def check(self, vocab: Vocab) -> SampleOptions:
        """Raise a ``BnfoldError`` naming the first bad option; return self if all are fine.
        The numeric ranges are those of :data:`BOUNDS`."""
        b = BOUNDS
        if not is_int(self.count) or not b["count"].holds(self.count):
            raise BnfoldError(f"count must be between 1 and {MAX_COUNT:,}, got {self.count!r}")
        if not is_int(self.seed) or not b["seed"].holds(self.seed):
            raise BnfoldError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or not b["temperature"].holds(t):
            raise BnfoldError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if self.top_k is not None and (not is_int(self.top_k) or not b["top_k"].holds(self.top_k)):
            raise BnfoldError(f"top-k must be an integer >= 1, got {self.top_k!r}")
        p = self.top_p
        if p is not None and (not isinstance(p, (int, float)) or not b["top_p"].holds(p)):
            raise BnfoldError(f"top-p must lie in (0, 1], got {p!r}")
        if not is_int(self.max_length) or not b["max_length"].holds(self.max_length):
            raise BnfoldError(
                f"max-length must be between 1 and {MAX_LENGTH_CAP}, got {self.max_length!r}"
            )
        # only min-length's floor here: above max-length is the next check's clearer message
        if not is_int(self.min_length) or self.min_length < b["min_length"].lo:
            raise BnfoldError(f"min-length must be an integer >= 0, got {self.min_length!r}")
        if self.min_length > self.max_length:
            raise BnfoldError(
                f"min-length {self.min_length} is greater than max-length {self.max_length}"
            )
        if not isinstance(self.prefix, str):
            raise BnfoldError(f"prefix must be a string, got {type(self.prefix).__name__}")
        unknown = vocab.unknown_chars(self.prefix)
        if unknown:
            shown = ", ".join(repr(c) for c in unknown)
            raise BnfoldError(
                f"prefix {self.prefix!r} has characters outside the model's vocabulary: {shown}"
            )
        if len(self.prefix) > self.max_length:
            raise BnfoldError(
                f"prefix has {len(self.prefix)} characters, more than max-length {self.max_length}"
            )
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in _OPTION_NAMES}


_OPTION_NAMES = tuple(f.name for f in fields(SampleOptions))


def is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


class SampledName(NamedTuple):
    """One sampled name (a named tuple: cheap to make by the hundred thousand)."""

    name: str
    label: str | None  # "train" / "dev" / "test" / "new"; None when no words file was given
    logprob: float  # model log P(name + end token) at temperature 1, natural log
    index: int  # the name's random-stream index within its request (its draw number)

    def to_dict(self) -> dict:
        return self._asdict()


def group_key(options: SampleOptions) -> tuple:
    """What the rows of one engine share: every option but seed, count, prefix, new_only.

    Requests with the same group key are sampled by the same engine, their rows side by
    side in one step; seed (each row carries its stream key), prefix (each job its start)
    and count (each job its name range) vary by row.
    """
    o = options
    return (o.temperature, o.top_k, o.top_p, o.min_length, o.max_length)
