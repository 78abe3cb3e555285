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
    report_dir: str | Path | None = None,
    report_interval: int | None = None,
) -> tuple[Path, dict]:
    """Train from a words file and write ``out_dir/bn.pt``; returns (path, summary).

    With ``report_dir``, training diagnostics are recorded (every ``report_interval`` steps;
    default ~100 records per run, plus ~10 dev-loss evaluations) and a report is written
    there (``diagnostics.json``, figures, ``index.html``); ``summary["report"]`` is its index.
    """
    data = load_dataset(data_path, block_size)
    model_config = ModelConfig(
        vocab_size=data.vocab.size,
        block_size=block_size,
        n_embd=n_embd,
        n_hidden=n_hidden,
        n_layers=n_layers,
    )
    cfg = TrainConfig.from_preset(preset, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    diagnostics = None
    if report_dir is not None:
        from bnfold.diagnostics import attach_diagnostics

        diagnostics, observer, cfg = attach_diagnostics(cfg, observer, report_interval)
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
    if diagnostics is not None:
        from bnfold.diagnostics import write_training_report

        index = write_training_report(diagnostics, result.model, data, report_dir, meta)
        summary = {**summary, "report": str(index)}
    return path, summary


def fold_checkpoint(
    bn_path: str | Path,
    out_path: str | Path | None = None,
    *,
    tolerance: float | None = None,
    data_path: str | Path | None = None,
    write_on_failure: bool = False,
    **verify_options,
):
    """Fold every BatchNorm of ``bn_path`` and write the verified result (default
    ``folded.pt`` next to the input). Returns ``(path, FoldReport, VerifyReport)``.

    The folded model is verified against the BN model (and a float64 evaluation of it)
    *before* it is written; when verification fails nothing is written (path ``None``)
    unless ``write_on_failure``. The written file is reloaded and compared bit for bit
    with what was verified. ``data_path`` supplies the dev/test contexts that are added to
    the random sample when the domain is too large to check exhaustively.
    ``verify_options`` go to :func:`bnfold.verify.verify`.
    """
    import torch

    from bnfold.checkpoint import load_checkpoint
    from bnfold.data import file_sha256
    from bnfold.errors import BnfoldError
    from bnfold.fold import fold_batchnorm
    from bnfold.model import MLP
    from bnfold.verify import (
        DEFAULT_MAX_EXHAUSTIVE,
        DEFAULT_TOLERANCE,
        CheckpointPredictor,
        split_contexts,
        verify,
    )

    bn_path = Path(bn_path)
    src = load_checkpoint(bn_path)
    if not src.config.batchnorm:
        raise BnfoldError(f"{bn_path}: already folded (no BatchNorm left); give the BN checkpoint")
    out = Path(out_path) if out_path is not None else bn_path.with_name("folded.pt")
    if out.exists() and out.resolve() == bn_path.resolve():
        raise BnfoldError(f"{out}: the output would overwrite the input checkpoint")
    folded, report = fold_batchnorm(src.model)
    if not report.complete or not isinstance(folded, MLP):
        why = "; ".join(f"{s.bn}: {s.reason}" for s in report.skipped) or "unknown"
        raise BnfoldError(f"{bn_path}: could not fold every BatchNorm ({why})")
    cfg = src.config
    max_exhaustive = verify_options.get("max_exhaustive", DEFAULT_MAX_EXHAUSTIVE)
    if data_path is not None and cfg.vocab_size**cfg.block_size > max_exhaustive:
        extra = split_contexts(data_path, cfg.block_size, src.meta.get("data_sha256"))
        verify_options.setdefault("extra_contexts", extra)
    meta = {
        **src.meta,
        "folded_from": {"path": str(bn_path.resolve()), "sha256": file_sha256(bn_path)},
        "metrics_from": "the source BatchNorm checkpoint (the folded model is verified equal)",
    }
    ckpt = Checkpoint(folded, src.vocab, metrics=dict(src.metrics), meta=meta)
    vr = verify(
        CheckpointPredictor(src, str(bn_path)),
        CheckpointPredictor(ckpt, str(out)),
        tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance,
        **verify_options,  # the float64 ground truth is the BN side: found automatically
    )
    ckpt.meta["fold_report"] = report.to_dict()
    ckpt.meta["verification"] = vr.to_dict()
    ckpt.metrics["max_abs_logit_error"] = vr.max_abs_logit_error
    ckpt.metrics["verified"] = vr.passed
    if not (vr.passed or write_on_failure):
        return None, report, vr
    path = save_checkpoint(ckpt, out)
    written = load_checkpoint(path).model.state_dict()
    for k, v in folded.state_dict().items():
        if not torch.equal(written[k], v):
            raise BnfoldError(f"{path}: the written checkpoint differs from the verified model")
    return path, report, vr
