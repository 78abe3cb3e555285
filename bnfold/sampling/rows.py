"""Row state: the names in flight, one row each, as a dataclass of preallocated arrays.

Only the first ``n`` entries of every array are live. Rows are unordered: a row's draws
depend only on its (key, name, draw number) and its context, never on its position.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np


@dataclass
class Rows:
    """Per-row state of the names being sampled.

    * ``code``: the context, as the base-vocab number sum(ctx[j] * vocab**(T-1-j));
    * ``name``: the name's stream index within its job's seed; ``key``: that seed's key;
    * ``length``: tokens so far, prefix included; ``plen``: the prefix length (the first
      ``plen`` tokens are forced, not drawn; draw number = length - plen);
    * ``lp``: log-probability so far; ``toks``: the name's tokens, (rows, max_length + 1);
    * ``job``: the slot of the row's job in the engine's job table.
    """

    code: np.ndarray
    name: np.ndarray
    key: np.ndarray
    length: np.ndarray
    plen: np.ndarray
    lp: np.ndarray
    toks: np.ndarray
    job: np.ndarray
    n: int = 0

    @classmethod
    def allocate(cls, capacity: int, width: int, token_dtype: type) -> Rows:
        return cls(
            code=np.empty(capacity, dtype=np.int64),
            name=np.empty(capacity, dtype=np.int64),
            key=np.empty(capacity, dtype=np.uint64),
            length=np.empty(capacity, dtype=np.int64),
            plen=np.empty(capacity, dtype=np.int64),
            lp=np.empty(capacity, dtype=np.float64),
            toks=np.zeros((capacity, width), dtype=token_dtype),  # read past a name's end
            job=np.empty(capacity, dtype=np.int64),
        )

    @property
    def capacity(self) -> int:
        return len(self.code)

    def arrays(self) -> list[np.ndarray]:
        return [getattr(self, f.name) for f in fields(self) if f.name != "n"]

    def grown(self, capacity: int) -> Rows:
        """A copy with room for ``capacity`` rows, the live rows kept."""
        new = Rows.allocate(capacity, self.toks.shape[1], self.toks.dtype.type)
        for src, dst in zip(self.arrays(), new.arrays(), strict=True):
            dst[: self.n] = src[: self.n]
        new.n = self.n
        return new

    def compact(self, keep: np.ndarray) -> None:
        """Keep only the live rows where ``keep`` (a bool mask over them) is True."""
        m = int(np.count_nonzero(keep))
        for a in self.arrays():
            a[:m] = a[: self.n][keep]
        self.n = m

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())
