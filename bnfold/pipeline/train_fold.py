"""The main job's stages glued together: the CLI calls these, and so can a notebook."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from bnfold.errors import BnfoldError, TrainingInterrupted
from bnfold.io.files import StagedOutputs, check_output_dir, check_output_file, commit_staged
from bnfold.mlp.checkpoint import Checkpoint, save_checkpoint
from bnfold.mlp.data import load_dataset
from bnfold.mlp.model import ModelConfig
from bnfold.mlp.train import TrainConfig, check_training_memory, train, train_config_dict
from bnfold.verify.domain import plan_domain
from bnfold.verify.networks import compare_all_pairs, format_four_networks, four_networks

# where `train-fold` saves the partial model of a run stopped by Ctrl-C
INTERRUPTED_CHECKPOINT = "bn.interrupted.pt"
# where `train-fold` keeps the trained model when its fold fails verification
UNVERIFIED_CHECKPOINT = "bn.unverified.pt"


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
    threads: int | None = None,
    progress: bool | None = None,
    observer=None,
    report_dir: str | Path | None = None,
    report_interval: int | None = None,
    stop_if_interrupted: bool = False,
    interrupted_dir: str | Path | None = None,
    report_figures: bool = True,
) -> tuple[Path, dict]:
    """Train from a words file and write ``out_dir/bn.pt``; returns (path, summary).

    With ``report_dir``, training diagnostics are recorded (every ``report_interval`` steps;
    default ~100 records per run, plus ~10 dev-loss evaluations) and a report is written
    there (``diagnostics.json``, figures, ``index.html``); ``summary["report"]`` is its index.

    Every output is checked before training starts (a file where a folder should be, a
    folder where ``bn.pt`` should be), so a long run is never lost to a bad ``--out``.
    Ctrl-C stops training after the current step and saves the partial model to ``bn.pt``;
    with ``stop_if_interrupted`` it goes to ``INTERRUPTED_CHECKPOINT`` in ``interrupted_dir``
    (default ``out_dir``) instead, no report is written, and ``TrainingInterrupted`` is
    raised: ``out_dir`` keeps its models.
    """
    out_dir = Path(out_dir)
    aside = Path(interrupted_dir) if interrupted_dir is not None else out_dir
    check_output_file(out_dir / "bn.pt")
    if stop_if_interrupted:
        check_output_file(aside / INTERRUPTED_CHECKPOINT)
    if report_dir is not None:
        check_output_dir(report_dir)
    model_config = ModelConfig(
        vocab_size=2, block_size=block_size, n_embd=n_embd, n_hidden=n_hidden, n_layers=n_layers
    )
    cfg = TrainConfig.from_preset(
        preset, steps=steps, batch_size=batch_size, lr=lr, seed=seed, threads=threads
    )
    # Refuse impossible sizes before reading: a words file of S bytes makes at most S + 1
    # contexts (train() checks again with the real vocabulary and split).
    size = Path(data_path).stat().st_size if Path(data_path).is_file() else 0
    check_training_memory(model_config, cfg, size + 1)
    data = load_dataset(data_path, block_size)
    model_config = replace(model_config, vocab_size=data.vocab.size)
    diagnostics = None
    if report_dir is not None:
        from bnfold.report.diagnostics import attach_diagnostics

        diagnostics, observer, cfg = attach_diagnostics(cfg, observer, report_interval)
    result = train(data, model_config, cfg, observer=observer, progress=progress)
    summary = result.summary()
    meta = {
        "data_file": data.path.name,
        "data_sha256": data.sha256,
        "train_config": train_config_dict(result.config),  # with the threads it used
        "steps_done": result.steps_done,
        "interrupted": result.interrupted,
    }
    ckpt = Checkpoint(result.model, data.vocab, metrics=summary, meta=meta)
    if result.interrupted and stop_if_interrupted:
        path = save_checkpoint(ckpt, aside / INTERRUPTED_CHECKPOINT)
        raise TrainingInterrupted(
            f"interrupted after {result.steps_done} of {cfg.steps} steps: saved the partial"
            f" model to {path}; nothing else in {aside} was written"
        )
    path = save_checkpoint(ckpt, out_dir / "bn.pt")
    if diagnostics is not None:
        from bnfold.report.diagnostics import write_training_report

        index = write_training_report(
            diagnostics, result.model, data, report_dir, meta, figures=report_figures
        )
        summary = {**summary, "report": str(index)}
    return path, summary


def fold_to_checkpoint(src: Checkpoint, source: Path, source_sha256: str):
    """Every BatchNorm of ``src`` (the checkpoint file ``source``, whose sha256 is given)
    folded, as a checkpoint that records where it came from; refused when not every
    BatchNorm folds. Not verified yet. Returns ``(Checkpoint, FoldReport)``."""
    from bnfold.fold.modules import fold_batchnorm
    from bnfold.mlp.model import MLP

    folded, report = fold_batchnorm(src.model)
    if not report.complete or not isinstance(folded, MLP):
        why = "; ".join(f"{s.bn}: {s.reason}" for s in report.skipped) or "unknown"
        raise BnfoldError(f"{source}: could not fold every BatchNorm ({why})")
    meta = {
        **src.meta,
        "folded_from": {"path": str(source.resolve()), "sha256": source_sha256},
        "metrics_from": "the source BatchNorm checkpoint (the folded model is verified equal)",
    }
    return Checkpoint(folded, src.vocab, metrics=dict(src.metrics), meta=meta), report


def record_verification(folded: Checkpoint, fold_report, verification) -> None:
    """Store the fold report and the verification (a ``VerifyReport``) in the checkpoint."""
    folded.meta["fold_report"] = fold_report.to_dict()
    folded.meta["verification"] = verification.to_dict()
    folded.metrics["max_abs_logit_error"] = verification.max_abs_logit_error
    folded.metrics["verified"] = verification.passed


def save_verified(folded: Checkpoint, out: Path) -> Path:
    """Write the folded checkpoint and read it back: it must hold bit for bit the weights
    that were verified."""
    import torch

    from bnfold.mlp.checkpoint import load_checkpoint

    path = save_checkpoint(folded, out)
    written = load_checkpoint(path).model.state_dict()
    for k, v in folded.model.state_dict().items():
        if not torch.equal(written[k], v):
            raise BnfoldError(f"{path}: the written checkpoint differs from the verified model")
    return path


def dev_test_contexts(src: Checkpoint, data_path, max_exhaustive: int):
    """Every dev/test context of ``data_path`` when the domain is too large to check
    exhaustively and the file is the one ``src`` was trained on, else ``None``."""
    from bnfold.verify.verdict import split_contexts

    cfg = src.config
    if data_path is None or cfg.vocab_size**cfg.block_size <= max_exhaustive:
        return None
    return split_contexts(data_path, cfg.block_size, src.meta.get("data_sha256"))


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
    ``verify_options`` go to :func:`bnfold.verify.verdict.verify`.
    """
    from bnfold.mlp.checkpoint import load_checkpoint
    from bnfold.mlp.data import file_sha256
    from bnfold.runtime.infer import TorchPredictor
    from bnfold.verify.verdict import DEFAULT_MAX_EXHAUSTIVE, verify

    bn_path = Path(bn_path)
    src = load_checkpoint(bn_path)
    if not src.config.batchnorm:
        raise BnfoldError(f"{bn_path}: already folded (no BatchNorm left); give the BN checkpoint")
    out = Path(out_path) if out_path is not None else bn_path.with_name("folded.pt")
    if out.exists() and out.resolve() == bn_path.resolve():
        raise BnfoldError(f"{out}: the output would overwrite the input checkpoint")
    check_output_file(out)
    ckpt, report = fold_to_checkpoint(src, bn_path, file_sha256(bn_path))
    max_exhaustive = verify_options.get("max_exhaustive", DEFAULT_MAX_EXHAUSTIVE)
    extra = dev_test_contexts(src, data_path, max_exhaustive)
    if extra is not None:
        verify_options.setdefault("extra_contexts", extra)
    vr = verify(
        TorchPredictor(src, str(bn_path)),
        TorchPredictor(ckpt, str(out)),
        tolerance=tolerance,
        **verify_options,  # the float64 ground truth is the BN side: found automatically
    )
    record_verification(ckpt, report, vr)
    if not (vr.passed or write_on_failure):
        return None, report, vr
    return save_verified(ckpt, out), report, vr


# --------------------------------------------------------------------------- the main job

# what `train-fold` writes into its output folder (besides report/)
MAIN_JOB_FILES = ("bn.pt", "folded.pt", "bn.onnx", "folded.onnx", "README.md")
# what its report folder gets (bnfold.report.diagnostics and plots)
REPORT_FILES = (
    "diagnostics.json",
    "index.html",
    "loss.png",
    "activations.png",
    "gradients.png",
    "weight_gradients.png",
    "update_ratio.png",
    "fold_comparison.png",
)


def format_stage_table(rows: list[dict]) -> str:
    """One row per pipeline stage: ``{"stage", "status", "details", "output"}``."""
    cols = ("stage", "status", "details", "output")
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    out = [
        "  ".join(c.ljust(widths[c]) for c in cols).rstrip(),
        "  ".join("-" * widths[c] for c in cols),
    ]
    for r in rows:
        out.append("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols).rstrip())
    return "\n".join(out)


def train_stage_row(summary: dict, path: Path) -> dict:
    return {
        "stage": "train",
        "status": "interrupted" if summary.get("interrupted") else "ok",
        "details": f"{summary['steps']} steps, {summary['seconds']:.1f} s;"
        f" dev loss {summary['dev_loss']:.4f}, test {summary['test_loss']:.4f}",
        "output": str(path),
    }


def fold_stage_rows(path: Path | None, fold_report, verification) -> list[dict]:
    v = verification
    f64 = (
        f"; vs float64 BN {v.reference_vs_float64:.1e}, folded {v.candidate_vs_float64:.1e}"
        if v.float64_reference is not None
        else ""
    )
    return [
        {
            "stage": "fold",
            "status": "ok" if fold_report.complete else "partial",
            "details": f"{len(fold_report.folded)} BatchNorms folded,"
            f" {len(fold_report.skipped)} left, {fold_report.seconds:.2f} s",
            "output": str(path) if path else "(not written)",
        },
        {
            "stage": "verify",
            "status": "PASS" if v.passed else "FAIL",
            "details": f"{v.contexts_checked:,} contexts"
            f" ({'exhaustive' if v.exhaustive else 'sampled'}): max |dlogit|"
            f" {v.max_abs_logit_error:.1e}, {v.criterion} bound {v.bound:.1e}"
            f" (error/bound {v.margin:.2g}), argmax"
            f" {v.argmax_agreement:.4%}{f64}, {v.seconds:.2f} s",
            "output": "",
        },
    ]


@dataclass
class MainJobResult:
    """What ``bnfold train-fold`` did: one row per stage plus every stage's own report."""

    rows: list[dict]
    train: dict
    fold: object  # FoldReport
    verification: object  # VerifyReport
    export: object | None = None  # ExportResult, when verification passed
    networks: dict | None = None  # the four networks side by side
    model_card: Path | None = None

    @property
    def passed(self) -> bool:
        return bool(self.verification.passed and (self.export is None or self.export.passed))

    def to_dict(self) -> dict:
        return {
            "stages": self.rows,
            "train": self.train,
            "fold": self.fold.to_dict(),
            "verification": self.verification.to_dict(),
            "export": self.export.to_dict() if self.export else None,
            "networks": self.networks,
            "model_card": str(self.model_card) if self.model_card else None,
            "passed": self.passed,
        }

    def format(self) -> str:
        text = format_stage_table(self.rows)
        if self.networks:
            text += "\n\n" + format_four_networks(self.networks)
        return text


def run_main_job(
    out_dir: str | Path,
    *,
    tolerance: float | None = None,
    max_exhaustive: int | None = None,
    command: str = "bnfold train-fold",
    **train_args,
) -> MainJobResult:
    """train -> fold -> verify -> export -> model card, all into ``out_dir``.

    ``train_args`` go to :func:`train_to_checkpoint` (``report_dir`` defaults to
    ``out_dir/report``). Every output is written into a staging folder beside ``out_dir``
    (and beside the report folder, when that is elsewhere) and moved into place only when
    every stage passed, so a run that fails or is stopped half-way leaves ``out_dir`` as it
    was: no new ``bn.pt`` beside old folded files. When verification fails, nothing
    unverified is written or exported: the trained model is kept aside as
    ``UNVERIFIED_CHECKPOINT`` and nothing else in ``out_dir`` changes. ``command`` is
    recorded in the model card so the run can be repeated.
    """
    from bnfold.report.diagnostics import finish_report_figures, start_report_figures

    out_dir = Path(out_dir)
    report_dir = Path(train_args.pop("report_dir", None) or out_dir / "report")
    for name in (*MAIN_JOB_FILES, UNVERIFIED_CHECKPOINT):  # all checked before training
        check_output_file(out_dir / name)
    check_output_dir(report_dir)
    for name in REPORT_FILES:  # the commit checks every staged name again before moving
        check_output_file(report_dir / name)
    staged = [StagedOutputs(out_dir)]
    try:
        if not staged[0].holds(report_dir):
            staged.append(StagedOutputs(report_dir))
        report_stage = staged[-1]
        bn_staged, summary = train_to_checkpoint(
            out_dir=staged[0].root,
            report_dir=report_stage.path(report_dir),
            stop_if_interrupted=True,
            interrupted_dir=out_dir,
            report_figures=False,
            **train_args,
        )
        if "report" in summary:
            summary["report"] = str(report_stage.final(summary["report"]))
        # The report's figures are drawn by a second process while this one folds,
        # verifies and exports: on two cores, about 2.5 s off the main job's wall time.
        figures = start_report_figures(report_stage.path(report_dir), bn_staged)
        try:
            result = _fold_verify_export(
                staged[0], bn_staged, summary, tolerance, max_exhaustive, command, train_args
            )
        except BaseException:
            figures.kill()
            figures.wait()
            raise
        if not result.passed:
            figures.kill()
            figures.wait()
            staged[0].keep(bn_staged, out_dir / UNVERIFIED_CHECKPOINT)
            return result
        try:
            finish_report_figures(figures, report_dir)
        except BnfoldError as e:  # the models are good: they go into place, then the error
            failed_figures = e
        else:
            failed_figures = None
        # one set, all or none; the card, with every file's sha256, last
        commit_staged(staged, last=("README.md",))
    finally:
        for stage in staged:
            stage.discard()
    if failed_figures is not None:
        raise failed_figures
    return result


def _fold_verify_export(
    stage: StagedOutputs,
    bn_staged: Path,
    summary: dict,
    tolerance: float | None,
    max_exhaustive: int | None,
    command: str,
    train_args: dict,
) -> MainJobResult:
    """Fold, export and verify the checkpoint ``bn_staged``, writing into ``stage``.

    One walk over the domain compares the four networks (torch BN, torch folded, ONNX BN,
    ONNX folded; all six pairs) and the float64 truth, each evaluated once: the fold's
    verification, the export's ONNX Runtime check and the four-network table are read
    from it. Nothing is written before its verdict is known.
    """
    import time

    from bnfold.mlp.checkpoint import load_checkpoint
    from bnfold.mlp.data import file_sha256
    from bnfold.pipeline.export import TORCH_NET, ExportResult, build_onnx, judge_onnx, write_onnx
    from bnfold.runtime.infer import TorchPredictor
    from bnfold.verify.verdict import DEFAULT_MAX_EXHAUSTIVE, Float64Model, report_from_pair

    out_dir = stage.target
    # the final paths name every file in reports and metadata, never the staging folder
    bn_path, folded_path = out_dir / "bn.pt", out_dir / "folded.pt"
    src, src_sha = load_checkpoint(bn_staged), file_sha256(bn_staged)
    folded, fold_report = fold_to_checkpoint(src, bn_path, src_sha)
    t0 = time.perf_counter()
    build = build_onnx({"bn": src.model, "folded": folded.model}, src, bn_path, src_sha)
    export_seconds = time.perf_counter() - t0
    nets = {
        TORCH_NET["bn"]: TorchPredictor(src, str(bn_path)),
        TORCH_NET["folded"]: TorchPredictor(folded, str(folded_path)),
        **build.nets,
    }
    limit = DEFAULT_MAX_EXHAUSTIVE if max_exhaustive is None else max_exhaustive
    plan = plan_domain(
        src.config.vocab_size,
        src.config.block_size,
        max_exhaustive=limit,
        extra=dev_test_contexts(src, train_args.get("data_path"), limit),
    )
    truth = Float64Model.from_checkpoint(src, str(bn_path))
    comparison = compare_all_pairs(nets, plan, truth, tolerance=tolerance)

    verification = report_from_pair(
        comparison.pairs[(TORCH_NET["bn"], TORCH_NET["folded"])],
        plan,
        reference=str(bn_path),
        candidate=str(folded_path),
        float64_source=truth.source,
        seconds=comparison.seconds,
    )
    record_verification(folded, fold_report, verification)
    passed = verification.passed
    rows = [
        train_stage_row(summary, bn_path if passed else out_dir / UNVERIFIED_CHECKPOINT),
        *fold_stage_rows(folded_path if passed else None, fold_report, verification),
    ]
    result = MainJobResult(rows, summary, fold_report, verification)
    if not passed:
        return result
    save_verified(folded, stage.path(folded_path))

    t0 = time.perf_counter()
    labels = {
        TORCH_NET["bn"]: f"{bn_path.name} (torch)",
        TORCH_NET["folded"]: f"{folded_path.name} (torch)",
        **{name: str(net.path) for name, net in build.nets.items()},
    }
    checks, per_file = judge_onnx(comparison, build, labels, truth.source)
    paths, shas, ops = write_onnx(build, per_file, stage.root)
    result.export = ExportResult(
        paths={kind: stage.final(p) for kind, p in paths.items()},
        op_types=ops,
        verification=checks,
        sha256=shas,
        source=bn_path,
        source_sha256=src_sha,
        seconds=round(export_seconds + time.perf_counter() - t0, 3),
    )
    rows.append(result.export.stage_row())
    files = dict(zip(nets, (bn_path, folded_path, *result.export.paths.values()), strict=True))
    result.networks = four_networks(comparison, nets, files)
    card = write_model_card(stage.root, result, command, train_args.get("seed", 42))
    result.model_card = stage.final(card)
    rows.append(
        {
            "stage": "card",
            "status": "ok",
            "details": "model card with sha256 of each file",
            "output": str(result.model_card),
        }
    )
    return result


def write_model_card(out_dir: Path, job: MainJobResult, command: str, seed: int) -> Path:
    """``out_dir/README.md``: how the models were made, how good they are, and checksums."""
    import platform

    import torch

    from bnfold.io.files import atomic_write
    from bnfold.mlp.data import file_sha256
    from bnfold.version import __version__

    t, v, n = job.train, job.verification, job.networks
    files = MAIN_JOB_FILES[:4]
    pair = n["pairwise_max_abs_logit_diff"] if n else {}
    lines = [
        "# bnfold default models",
        "",
        "Produced by the main job, from the repository root:",
        "",
        f"```bash\n{command}\n```",
        "",
        f"bnfold {__version__}, torch {torch.__version__}, Python {platform.python_version()};"
        f" preset `{t['preset']}`, seed {seed}.",
        "",
        "## Training (eval-mode cross-entropy, running BatchNorm statistics)",
        "",
        "| split | loss |",
        "| --- | --- |",
        *(f"| {s} | {t[f'{s}_loss']:.4f} |" for s in ("train", "dev", "test")),
        "",
        f"{t['steps']:,} steps in {t['seconds']:.1f} s on this machine; {t['params']:,}"
        " parameters.",
        "",
        "## Verification (folded vs BatchNorm network)",
        "",
        f"- contexts checked: {v.contexts_checked:,}"
        f" ({'every possible context' if v.exhaustive else 'a seeded sample'})",
        f"- max / mean |logit difference|: {v.max_abs_logit_error:.2e} /"
        f" {v.mean_abs_logit_error:.2e}",
        f"- verdict ({v.criterion} criterion, bound {v.bound:.2e}, error/bound"
        f" {v.margin:.2g}): {'PASS' if v.passed else 'FAIL'}",
        f"- max |probability difference|: {v.max_abs_prob_error:.2e}",
        f"- argmax agreement: {v.argmax_agreement:.4%}",
    ]
    if v.float64_reference is not None:
        lines.append(
            "- error against a float64 evaluation of the BN network:"
            f" BN {v.reference_vs_float64:.2e}, folded {v.candidate_vs_float64:.2e}"
        )
    if pair:
        names = list(pair)
        lines += [
            "",
            "## The four networks: max |logit difference| over every context",
            "",
            "| | " + " | ".join(names) + " |",
            "| --- |" + " --- |" * len(names),
            *(
                f"| {a} | "
                + " | ".join("-" if a == b else f"{pair[a][b]:.1e}" for b in names)
                + " |"
                for a in names
            ),
        ]
    lines += ["", "## Files", "", "| file | bytes | sha256 |", "| --- | --- | --- |"]
    for name in files:
        p = out_dir / name
        lines.append(f"| `{name}` | {p.stat().st_size:,} | `{file_sha256(p)}` |")
    lines.append("")
    path = out_dir / "README.md"
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines), encoding="utf-8"))
    return path
