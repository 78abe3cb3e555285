"""One inference interface over a ``.pt`` checkpoint (torch) or a ``.onnx`` file (ONNX Runtime).

``logits(contexts)`` takes int64 contexts of shape (batch, block_size) and returns float32
logits of shape (batch, vocab); ``next_char_probs(prefix)`` is the single-example call.
Vocabulary, block_size, sha256 and metadata always come from the file itself
(:class:`~bnfold.runtime.predictor.Predictor` declares them).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bnfold.errors import BnfoldError
from bnfold.runtime.onnx_runtime import OnnxPredictor
from bnfold.runtime.predictor import ModelSpec, Predictor
from bnfold.runtime.twins import TorchTwin

if TYPE_CHECKING:
    from bnfold.mlp.checkpoint import Checkpoint

__all__ = ["ModelSpec", "OnnxPredictor", "Predictor", "TorchPredictor", "load_predictor"]


class TorchPredictor(Predictor):
    """A checkpoint in eval mode: read from ``source`` (a ``.pt`` path), or an in-memory
    :class:`~bnfold.mlp.checkpoint.Checkpoint` named ``label`` in reports."""

    backend = "torch"

    def __init__(self, source: str | Path | Checkpoint, label: str | None = None):
        if isinstance(source, str | Path):
            # torch is imported only when a .pt is used (the ONNX paths never need it)
            from bnfold.mlp.checkpoint import load_checkpoint

            ckpt = load_checkpoint(source)
            label = label or str(source)
        else:
            ckpt = source
        # a checkpoint read or written is named by its file's sha256, one in memory only
        # by the hash of its contents
        sha = ckpt.sha256 or _checkpoint_sha256(ckpt)
        self.path = Path(label or "<in memory>")
        self.checkpoint = ckpt
        self.model = ckpt.model.eval()
        self.vocab = ckpt.vocab
        self.block_size = ckpt.config.block_size
        self.folded = not ckpt.config.batchnorm
        self.sha256 = sha
        self.metadata = {**ckpt.meta, "model_config": ckpt.config.to_dict()}
        self.parameters = int(sum(p.numel() for p in self.model.parameters()))
        self.threads = None  # torch's process-wide setting

    def logits(self, contexts: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(torch.from_numpy(self.check_contexts(contexts))).numpy()

    def float64_twin(self) -> TorchTwin:
        return TorchTwin(self.model)


def _checkpoint_sha256(ckpt: Checkpoint) -> str:
    """The identity of an in-memory checkpoint: its vocabulary, config and every weight."""
    h = hashlib.sha256(repr((ckpt.vocab.chars, ckpt.config.to_dict())).encode())
    for name, t in ckpt.model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_predictor(path: str | Path) -> Predictor:
    """Pick the backend by file type: ``.pt`` -> torch, ``.onnx`` -> ONNX Runtime."""
    p = Path(path)
    if p.suffix == ".pt":
        return TorchPredictor(p)
    if p.suffix == ".onnx":
        return OnnxPredictor(p)
    raise BnfoldError(f"{p}: unknown model type (expected a .pt checkpoint or an .onnx file)")
