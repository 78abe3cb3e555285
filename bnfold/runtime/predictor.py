"""The inference interface every backend implements, and the metadata it declares.

A :class:`Predictor` maps int64 contexts (batch, block_size) to float32 logits (batch,
vocab). Besides ``logits`` it declares what callers may read about the model, so nobody
probes a backend with ``getattr``:

* ``path``, ``backend`` ("torch" / "onnxruntime"), ``folded``;
* ``parameters``: the number of weights; ``threads``: the intra-op threads it runs with
  (``None``: the backend's process-wide setting, as torch's);
* ``vocab`` and ``block_size`` (always from the file itself);
* ``sha256``: the identity of the model (the file's bytes; for an in-memory checkpoint,
  its weights and vocabulary), which the sampler's tables are keyed by;
* ``metadata``: the bnfold metadata the file records (``data_sha256``, versions, config,
  verification figures...; an empty dict when there is none); ``data_sha256`` reads it;
* ``spec``: the :class:`ModelSpec` (vocab, block_size, sha256) the sampling engine needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnfold.errors import BnfoldError
from bnfold.mlp.data import END, Vocab
from bnfold.runtime.twins import Float64Twin


@dataclass(frozen=True)
class ModelSpec:
    """What a sampling engine knows about its model: enough to key tables and decode
    names, nothing it could run (engines never call a predictor themselves)."""

    vocab: Vocab
    block_size: int
    sha256: str


class Predictor:
    """Base class: subclasses set every declared attribute and implement ``logits``."""

    path: Path
    backend: str
    folded: bool
    vocab: Vocab
    block_size: int
    sha256: str
    metadata: dict
    parameters: int
    threads: int | None

    def logits(self, contexts: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def float64_twin(self) -> Float64Twin | None:
        """The same parameters evaluated in float64 (:mod:`bnfold.runtime.twins`), or ``None`` when
        this backend cannot: verification then judges float32 outputs alone."""
        return None

    @property
    def data_sha256(self) -> str | None:
        """sha256 of the words file the model was trained on, if the file records it."""
        value = self.metadata.get("data_sha256")
        return str(value) if value else None

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(self.vocab, self.block_size, self.sha256)

    def context_for(self, prefix: str) -> np.ndarray:
        """The (1, block_size) context that follows ``prefix`` (start-padded with END)."""
        unknown = self.vocab.unknown_chars(prefix)
        if unknown:
            raise BnfoldError(f"prefix has characters outside the vocabulary: {unknown}")
        ids = [END] * self.block_size + self.vocab.encode(prefix)
        return np.asarray([ids[len(ids) - self.block_size :]], dtype=np.int64)

    def next_char_probs(self, prefix: str = "") -> np.ndarray:
        """Probabilities (vocab,) of the next token after ``prefix``; index 0 is the end."""
        z = self.logits(self.context_for(prefix))[0].astype(np.float64)
        e = np.exp(z - z.max())
        return e / e.sum()

    def check_contexts(self, contexts: np.ndarray) -> np.ndarray:
        x = np.asarray(contexts)
        if x.ndim != 2 or x.shape[1] != self.block_size:
            raise BnfoldError(
                f"contexts must have shape (batch, {self.block_size}), got {tuple(x.shape)}"
            )
        if x.size and (x.min() < 0 or x.max() >= self.vocab.size):
            raise BnfoldError(f"context ids must lie in [0, {self.vocab.size})")
        return x.astype(np.int64, copy=False)
