"""One inference interface over a ``.pt`` checkpoint (torch) or a ``.onnx`` file (ONNX Runtime).

``logits(contexts)`` takes int64 contexts of shape (batch, block_size) and returns float32
logits of shape (batch, vocab); ``next_char_probs(prefix)`` is the single-example call.
Vocabulary and block_size always come from the file itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bnfold.data import END, Vocab
from bnfold.errors import BnfoldError

if TYPE_CHECKING:
    from bnfold.checkpoint import Checkpoint


class Predictor:
    """Base class: subclasses set the attributes and implement ``logits``."""

    path: Path
    vocab: Vocab
    block_size: int
    folded: bool
    backend: str

    def logits(self, contexts: np.ndarray) -> np.ndarray:
        raise NotImplementedError

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


class TorchPredictor(Predictor):
    """A checkpoint in eval mode: read from ``source`` (a ``.pt`` path), or an in-memory
    :class:`~bnfold.checkpoint.Checkpoint` named ``label`` in reports."""

    backend = "torch"

    def __init__(self, source: str | Path | Checkpoint, label: str | None = None):
        if isinstance(source, str | Path):
            from bnfold.checkpoint import load_checkpoint  # torch only when a .pt is used

            ckpt = load_checkpoint(source)
            label = label or str(source)
        else:
            ckpt = source
        self.path = Path(label or "<in memory>")
        self.checkpoint = ckpt
        self.model = ckpt.model.eval()
        self.vocab = ckpt.vocab
        self.block_size = ckpt.config.block_size
        self.folded = not ckpt.config.batchnorm

    def logits(self, contexts: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(torch.from_numpy(self.check_contexts(contexts))).numpy()


def load_predictor(path: str | Path) -> Predictor:
    """Pick the backend by file type: ``.pt`` -> torch, ``.onnx`` -> ONNX Runtime."""
    p = Path(path)
    if p.suffix == ".pt":
        return TorchPredictor(p)
    if p.suffix == ".onnx":
        from bnfold.onnx_runtime import OnnxPredictor  # onnxruntime only when an .onnx is used

        return OnnxPredictor(p)
    raise BnfoldError(f"{p}: unknown model type (expected a .pt checkpoint or an .onnx file)")
