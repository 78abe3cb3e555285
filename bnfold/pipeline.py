"""The main job's stages glued together: the CLI calls these, and so can a notebook."""

from __future__ import annotations

from pathlib import Path

from bnfold.checkpoint import Checkpoint, save_checkpoint
from bnfold.data import load_dataset
from bnfold.model import ModelConfig
from bnfold.train import TrainConfig, train, train_config_dict


def train_to_checkpoint(
    data_path: str | Path,
    out_dir: str | Path,
    preset: str = "fast",
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    n_embd: int = 10,
    n_hidden: int = 100,
    n_layers: int = 5,
    block_size: int = 3,
    seed: int = 42,
    progress: bool | None = None,
    observer=None,
) -> tuple[Path, dict]:
    """Train from a words file and write ``out_dir/bn.pt``; returns (path, summary)."""
    data = load_dataset(data_path, block_size)
    model_config = ModelConfig(
        vocab_size=data.vocab.size,
        block_size=block_size,
        n_embd=n_embd,
        n_hidden=n_hidden,
        n_layers=n_layers,
    )
    cfg = TrainConfig.from_preset(preset, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    result = train(data, model_config, cfg, observer=observer, progress=progress)
    summary = result.summary()
    meta = {
        "data_file": data.path.name,
        "data_sha256": data.sha256,
        "train_config": train_config_dict(cfg),
        "steps_done": result.steps_done,
        "interrupted": result.interrupted,
    }
    path = save_checkpoint(
        Checkpoint(result.model, data.vocab, metrics=summary, meta=meta), Path(out_dir) / "bn.pt"
    )
    return path, summary
