"""One-file checkpoints: weights + config + vocabulary + metrics + provenance.

Loading uses ``torch.load(weights_only=True)``, so a checkpoint can never execute code, and
every way a file can be wrong (missing, truncated, corrupt, someone else's) becomes one
clear ``BnfoldError`` naming the file. Writes are atomic: temp file + fsync + rename.
"""

from __future__ import annotations

import io
import platform
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from bnfold.errors import BnfoldError, first_validation_error
from bnfold.io.files import MiB, atomic_write, atomic_write_bytes, bytes_sha256, read_bounded
from bnfold.mlp.data import Vocab
from bnfold.mlp.model import MLP, ModelConfig
from bnfold.version import __version__

__all__ = ["Checkpoint", "atomic_write", "load_checkpoint", "save_checkpoint"]

FORMAT = "bnfold-checkpoint"
FORMAT_VERSION = 1
# The default model is 0.2 MB; this allows ~250 M parameters and refuses /dev/zero & co.
MAX_CHECKPOINT_BYTES = 1024 * MiB


@dataclass
class Checkpoint:
    model: MLP
    vocab: Vocab
    metrics: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # data_sha256, train config, versions, ...
    # the sha256 of the file this checkpoint was read from or last written to (``None``
    # while it lives in memory only): files are hashed from the bytes read or written,
    # never read a second time to be hashed
    sha256: str | None = None

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def library_versions() -> dict[str, str]:
    return {
        "bnfold": __version__,
        "torch": str(torch.__version__),
        "python": platform.python_version(),
    }


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": ckpt.config.to_dict(),
        "vocab": list(ckpt.vocab.chars),
        "state_dict": {k: v.detach().cpu().clone() for k, v in ckpt.model.state_dict().items()},
        "metrics": dict(ckpt.metrics),
        "meta": {**ckpt.meta, "versions": library_versions()},
    }
    # Serialised in memory first: torch.save into a full disk fails with a bare
    # "unexpected pos" RuntimeError; a plain write fails with ENOSPC, which atomic_write names.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    written = atomic_write_bytes(path, data)
    ckpt.sha256 = bytes_sha256(data)
    return written


class _ConfigPayload(BaseModel):
    """``ModelConfig`` as stored: exact types (strict: no bools for ints, no strings)."""

    model_config = ConfigDict(strict=True, extra="ignore")  # unknown keys: newer fields
    vocab_size: int
    block_size: int
    n_embd: int
    n_hidden: int
    n_layers: int
    batchnorm: bool = True


class _FoldedFrom(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    path: str
    sha256: str


class _MetaPayload(BaseModel):
    """The ``meta`` fields bnfold reads back; anything else is kept as it is."""

    model_config = ConfigDict(strict=True, extra="allow")
    data_file: str | None = None
    data_sha256: str | None = None
    folded_from: _FoldedFrom | None = None


class _CheckpointPayload(BaseModel):
    """The structure of a checkpoint file, checked before anything is built from it."""

    model_config = ConfigDict(strict=True, extra="allow", arbitrary_types_allowed=True)
    format: Literal["bnfold-checkpoint"]
    format_version: int
    config: _ConfigPayload
    vocab: list[str]
    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, Any] = {}
    meta: _MetaPayload = _MetaPayload()


def _unreadable_reason(e: Exception) -> str:
    """torch's message for a file it cannot load, reduced to the cause."""
    text = str(e).strip()
    # torch < 2.13: "Unsupported global: GLOBAL x.y"; 2.13: "unsupported GLOBAL x.y whose ..."
    unsafe = re.search(r"(?i)unsupported (?:global:\s*)?GLOBAL\s+([\w.]+)", text)
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if unsafe:
        return f"it holds a {unsafe.group(1)} object, which could run code"
    if unpickler:  # torch's first line is advice about weights_only, not the cause
        return f"not a torch file ({unpickler.group(1).strip()})"
    return text.splitlines()[0] if text else type(e).__name__


def non_finite_tensors(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [
        k for k, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()
    ]


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`, or raise one ``BnfoldError``.

    The file is read with a bound (``MAX_CHECKPOINT_BYTES``), unpickled with
    ``weights_only=True`` (no code runs), its structure is validated (types of the config,
    vocabulary, tensors and the meta fields bnfold uses), the tensors must have exactly the
    shapes the config implies, and every weight must be finite (a diverged run is refused).
    """
    path = Path(path)
    data = read_bounded(
        path,
        MAX_CHECKPOINT_BYTES,
        "a checkpoint",
        missing="no such checkpoint",
        directory="is a directory, not a checkpoint file",
    )
    try:
        with warnings.catch_warnings():  # e.g. torch's 2-line note on a raw pickle
            warnings.simplefilter("ignore")
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad files; all mean the same here
        raise BnfoldError(
            f"{path}: not a readable checkpoint (truncated, corrupt or unsafe):"
            f" {_unreadable_reason(e)[:160]}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise BnfoldError(f"{path}: not a bnfold checkpoint (no '{FORMAT}' marker)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise BnfoldError(
            f"{path}: checkpoint format version {payload.get('format_version')!r} is not"
            f" supported (this bnfold reads version {FORMAT_VERSION})"
        )
    try:
        checked = _CheckpointPayload.model_validate(payload)
    except ValidationError as e:
        raise BnfoldError(f"{path}: malformed checkpoint: {first_validation_error(e)}") from None
    try:
        vocab = Vocab(tuple(checked.vocab))
        config = ModelConfig(**checked.config.model_dump())
        if config.vocab_size != vocab.size:
            raise BnfoldError(f"vocab_size {config.vocab_size} != vocabulary size {vocab.size}")
        # Built without memory first: a crafted config (n_hidden 10**9) must not allocate
        # anything; the file's own tensors, checked for shape, become the weights.
        with torch.device("meta"):
            model = MLP(config)
        expected = model.state_dict()
        for k, t in checked.state_dict.items():
            if k in expected and (t.dtype != expected[k].dtype or t.layout != torch.strided):
                raise BnfoldError(
                    f"{k} is a {t.layout} {t.dtype} tensor, expected {expected[k].dtype}"
                )
        model.load_state_dict(checked.state_dict, strict=True, assign=True)
    except (RuntimeError, BnfoldError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BnfoldError(f"{path}: inconsistent checkpoint: {msg[:200]}") from None
    bad = non_finite_tensors(model.state_dict())
    if bad:
        raise BnfoldError(
            f"{path}: the weights hold NaN or infinite values ({', '.join(bad[:3])}): the"
            " training run diverged; retrain it (e.g. with a lower --lr)"
        )
    model.eval()
    meta = dict(payload.get("meta") or {})
    return Checkpoint(model, vocab, dict(checked.metrics), meta, sha256=bytes_sha256(data))
