"""One-file checkpoints: weights + config + vocabulary + metrics + provenance.

Loading uses ``torch.load(weights_only=True)``, so a checkpoint can never execute code, and
every way a file can be wrong (missing, truncated, corrupt, someone else's) becomes one
clear ``BnfoldError`` naming the file. Writes are atomic: temp file + fsync + rename.
"""

from __future__ import annotations

import os
import platform
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bnfold import __version__
from bnfold.data import Vocab
from bnfold.errors import BnfoldError
from bnfold.model import MLP, ModelConfig

FORMAT = "bnfold-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    model: MLP
    vocab: Vocab
    metrics: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # data_sha256, train config, versions, ...

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def library_versions() -> dict[str, str]:
    return {
        "bnfold": __version__,
        "torch": str(torch.__version__),
        "python": platform.python_version(),
    }


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``: a crash or Ctrl-C leaves
    either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # mkstemp's file is private (0600); the result is an ordinary, shareable file.
        os.chmod(tmp, 0o666 & ~_umask())
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise BnfoldError(f"{path}: no such checkpoint")
    if path.is_dir():
        raise BnfoldError(f"{path}: is a directory, not a checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad files; all mean the same here
        text = str(e).strip()
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        if unsafe:
            reason = f"it holds a {unsafe.group(1)} object, which could run code"
        elif unpickler:  # torch's first line is advice about weights_only, not the cause
            reason = f"not a torch file ({unpickler.group(1).strip()})"
        else:
            reason = text.splitlines()[0] if text else type(e).__name__
        raise BnfoldError(
            f"{path}: not a readable checkpoint (truncated, corrupt or unsafe): {reason[:160]}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise BnfoldError(f"{path}: not a bnfold checkpoint (no '{FORMAT}' marker)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise BnfoldError(
            f"{path}: checkpoint format version {payload.get('format_version')!r} is not"
            f" supported (this bnfold reads version {FORMAT_VERSION})"
        )
    try:
        vocab = Vocab(tuple(payload["vocab"]))
        config = ModelConfig.from_dict(payload["config"])
        if config.vocab_size != vocab.size:
            raise BnfoldError(f"vocab_size {config.vocab_size} != vocabulary size {vocab.size}")
        model = MLP(config)
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError, BnfoldError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BnfoldError(f"{path}: inconsistent checkpoint: {msg[:200]}") from None
    model.eval()
    return Checkpoint(model, vocab, payload.get("metrics", {}), payload.get("meta", {}))
