"""The row table: each context's sampling row, computed once and kept, in bounded memory.

A table belongs to one model (its sha256) and one option group (:func:`group_key`): the
rows are those of :mod:`bnfold.sampling.tokens` for these options, so drawing from a stored
row is the very arithmetic of drawing from fresh logits. A *key* is a context code plus
``domain`` when the end token is masked (below min-length), so both variants of a
context can be stored.

Memory: ``capacity_bytes`` bounds the table's arrays (``nbytes``), allocated once. When
every key of the domain fits (``2 * vocab**block_size`` slots), a key is its own slot and
nothing is ever evicted. Otherwise the table is a direct-mapped cache of a power-of-two
number of slots (a multiplicative hash of the key): a new row replaces whatever row had
its slot, so the table works for any domain size (vocab 90 at block size 3, larger block
sizes) at the price of recomputing evicted rows.
"""

from __future__ import annotations

import numpy as np

from bnfold.errors import BnfoldError
from bnfold.sampling.tokens import GOLDEN

GUIDE_BITS = 8  # 256 guide buckets per row: one gather answers most draws
MIN_SLOTS = 64


class RowTable:
    """Stored rows (``cdf``, ``lp``, ``guide``) by key, for one model and option group."""

    def __init__(
        self, model_sha256: str, group: tuple, vocab: int, domain: int, capacity_bytes: int
    ):
        self.model_sha256 = model_sha256
        self.group = group
        self.vocab = vocab
        self.domain = domain
        self.split = 255 if vocab < 255 else 65535  # guide entry: "look at the cdf"
        guide_dtype = np.uint8 if self.split == 255 else np.uint16
        self.buckets = 1 << GUIDE_BITS
        row_bytes = vocab * (4 + 8) + self.buckets * np.dtype(guide_dtype).itemsize + 8
        fit = int(capacity_bytes) // row_bytes
        keys = 2 * domain
        if keys <= fit:
            slots, self.hash_bits = keys, 0  # every key has its own slot
        else:
            if fit < MIN_SLOTS:
                raise BnfoldError(
                    f"a row table of {capacity_bytes:,} bytes holds fewer than {MIN_SLOTS} rows"
                    f" of {row_bytes:,} bytes; raise the table size or use the network engine"
                )
            self.hash_bits = fit.bit_length() - 1
            slots = 1 << self.hash_bits
        self.slots = slots
        self.key = np.full(slots, -1, dtype=np.int64)
        self.cdf = np.empty((slots, vocab), dtype=np.float32)
        self.lp = np.empty((slots, vocab), dtype=np.float64)
        self.guide = np.empty((slots, self.buckets), dtype=guide_dtype)
        # flat views (no copies) for the engine's element gathers, made once, not per step
        self.flat_lp = self.lp.reshape(-1)
        self.flat_guide = self.guide.reshape(-1)
        self.stored = 0  # rows written (including those that replaced another)

    @property
    def nbytes(self) -> int:
        return self.key.nbytes + self.cdf.nbytes + self.lp.nbytes + self.guide.nbytes

    @property
    def exact(self) -> bool:
        """True when every key has its own slot (no eviction)."""
        return self.hash_bits == 0

    def slot_of(self, keys: np.ndarray) -> np.ndarray:
        if self.hash_bits == 0:
            return keys
        h = keys.astype(np.uint64) * np.uint64(GOLDEN)
        return (h >> np.uint64(64 - self.hash_bits)).astype(np.int64)

    def store(
        self,
        keys: np.ndarray,
        slots: np.ndarray,
        cdf: np.ndarray,
        lp: np.ndarray,
        guide: np.ndarray,
        pinned: np.ndarray | None,
    ) -> np.ndarray:
        """Write rows of distinct ``keys`` into their ``slots``, except where a slot is
        ``pinned`` (holds a row in use this step) or taken by an earlier key of this call;
        returns the mask of keys written."""
        ok = np.ones(len(keys), dtype=bool)
        if self.hash_bits:
            _, first = np.unique(slots, return_index=True)
            ok[:] = False
            ok[first] = True
            if pinned is not None and len(pinned):
                ok &= ~np.isin(slots, pinned)
        s = slots[ok]
        self.key[s] = keys[ok]
        self.cdf[s] = cdf[ok]
        self.lp[s] = lp[ok]
        self.guide[s] = guide[ok]
        self.stored += len(s)
        return ok

    def clear(self) -> None:
        self.key.fill(-1)
