"""The main job's stages glued together: the CLI calls these, and so can a notebook."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bnfold.errors import TrainingInterrupted
from bnfold.io.files import (
    StagedOutputs,
    atomic_write,
    check_output_dir,
    check_output_file,
    commit_staged,
)
from bnfold.mlp.checkpoint import Checkpoint, save_checkpoint
from bnfold.mlp.config import (
    DEFAULT_MODEL,
    DEFAULT_PRESET,
    ModelConfig,
    TrainConfig,
    train_config_dict,
)
from bnfold.mlp.data import Dataset, load_dataset
from bnfold.mlp.train import check_training_memory, train
from bnfold.pipeline.assemble import (
    assemble,
    fold_to_checkpoint,
    record_verification,
    save_verified,
    walk_plan,
)
from bnfold.pipeline.export import ExportResult, write_onnx
from bnfold.report.diagnostics import REPORT_FILES, attach_diagnostics, write_training_report
from bnfold.verify.networks import format_four_networks, four_networks
from bnfold.verify.verdict import VerifyReport
from bnfold.version import __version__

# where `train-fold` saves the partial model of a run stopped by Ctrl-C
INTERRUPTED_CHECKPOINT = "bn.interrupted.pt"
# where `train-fold` keeps the trained model when its fold fails verification
UNVERIFIED_CHECKPOINT = "bn.unverified.pt"


@dataclass
class TrainedRun:
    """A finished training run, in memory: the checkpoint (not yet written), its summary,
    the data it was trained on and the recorded diagnostics (``None`` without a report)."""

    checkpoint: Checkpoint
    summary: dict
    data: Dataset
    diagnostics: object | None  # bnfold.report.diagnostics.Diagnostics


def train_run(
    data_path: str | Path,
    preset: str = DEFAULT_PRESET,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    n_embd: int = DEFAULT_MODEL.n_embd,
    n_hidden: int = DEFAULT_MODEL.n_hidden,
    n_layers: int = DEFAULT_MODEL.n_layers,
    block_size: int = DEFAULT_MODEL.block_size,
    seed: int = TrainConfig.seed,
    threads: int | None = None,
    progress: bool | None = None,
    observer=None,
    report: bool = False,
    report_interval: int | None = None,
    calibrate: bool = False,
) -> TrainedRun:
    """Train from a words file; nothing is written. With ``report``, training diagnostics
    are recorded (every ``report_interval`` steps; default ~100 records per run, plus ~10
    dev-loss evaluations). With ``calibrate``, the lecture's calibration pass runs after
    training and ``summary["calibration"]`` says how far the running statistics moved and
    the dev loss before and after (also in the checkpoint's metadata and the report)."""
    model_config = ModelConfig(
        vocab_size=2, block_size=block_size, n_embd=n_embd, n_hidden=n_hidden, n_layers=n_layers
    )
    cfg = TrainConfig.from_preset(
        preset,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        threads=threads,
        calibrate_bn=calibrate or None,  # None: the preset's own choice
    )
    # Refuse impossible sizes before reading: a words file of S bytes makes at most S + 1
    # contexts (train() checks again with the real vocabulary and split).
    size = Path(data_path).stat().st_size if Path(data_path).is_file() else 0
    check_training_memory(model_config, cfg, size + 1)
    data = load_dataset(data_path, block_size)
    model_config = replace(model_config, vocab_size=data.vocab.size)
    diagnostics = None
    if report:
        diagnostics, observer, cfg = attach_diagnostics(cfg, observer, report_interval)
    result = train(data, model_config, cfg, observer=observer, progress=progress)
    meta = {
        "data_file": data.path.name,
        "data_sha256": data.sha256,
        "train_config": train_config_dict(result.config),  # with the threads it used
        "steps_done": result.steps_done,
        "interrupted": result.interrupted,
    }
    if result.calibration is not None:
        meta["calibration"] = result.calibration
    ckpt = Checkpoint(result.model, data.vocab, metrics=result.summary(), meta=meta)
    return TrainedRun(ckpt, result.summary(), data, diagnostics)


def save_trained(run: TrainedRun, path: Path, aside: Path | None = None) -> Path:
    """Write ``run``'s model to ``path``; with ``aside``, a run stopped by Ctrl-C goes to
    ``aside`` instead and ``TrainingInterrupted`` is raised (nothing else written)."""
    if aside is not None and run.summary.get("interrupted"):
        saved = save_checkpoint(run.checkpoint, aside)
        raise TrainingInterrupted(
            f"interrupted after {run.summary['steps']} of"
            f" {run.checkpoint.meta['train_config']['steps']}"
            f" steps: saved the partial model to {saved}; nothing else in {aside.parent} was"
            " written"
        )
    return save_checkpoint(run.checkpoint, path)


def train_to_checkpoint(
    data_path: str | Path,
    out_dir: str | Path,
    *,
    report_dir: str | Path | None = None,
    **train_args,
) -> tuple[Path, dict]:
    """Train from a words file (``train_args`` go to :func:`train_run`) and write
    ``out_dir/bn.pt``; returns (path, summary).

    With ``report_dir``, a training report is written there (``diagnostics.json``, figures
    with the BN-vs-folded comparison, ``index.html``); ``summary["report"]`` is its index.
    Every output is checked before training starts (a file where a folder should be, a
    folder where ``bn.pt`` should be), so a long run is never lost to a bad ``--out``.
    Ctrl-C stops training after the current step and saves the partial model to ``bn.pt``.
    """
    out = Path(out_dir) / "bn.pt"
    check_output_file(out)
    if report_dir is not None:
        check_output_dir(report_dir)
    run = train_run(data_path, report=report_dir is not None, **train_args)
    path = save_trained(run, out)
    summary = run.summary
    if report_dir is not None:
        folded, _ = fold_to_checkpoint(run.checkpoint, path)
        index = write_training_report(
            run.diagnostics,
            run.checkpoint.model,
            run.data,
            report_dir,
            run.checkpoint.meta,
            folded=folded.model,
        )
        summary = {**summary, "report": str(index)}
    return path, summary


# --------------------------------------------------------------------------- the main job

# what `train-fold` writes into its output folder (besides report/)
MAIN_JOB_FILES = ("bn.pt", "folded.pt", "bn.onnx", "folded.onnx", "README.md")


MIN_DETAILS = 24  # the details column never wraps narrower than this


def format_stage_table(rows: list[dict], width: int | None = None) -> str:
    """One row per pipeline stage: ``{"stage", "status", "details", "output"}``, fitted to
    ``width`` characters (default: the terminal's, or 80 when there is none): the details
    column wraps onto continuation lines; paths are never broken (they stay copyable)."""
    import shutil
    import textwrap

    width = width or shutil.get_terminal_size().columns
    cols = ("stage", "status", "details", "output")
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    room = width - sum(widths[c] for c in cols if c != "details") - 2 * (len(cols) - 1)
    widths["details"] = max(MIN_DETAILS, min(widths["details"], room))
    out = [
        "  ".join(c.ljust(widths[c]) for c in cols).rstrip(),
        "  ".join("-" * widths[c] for c in cols),
    ]
    for r in rows:
        details = textwrap.wrap(str(r.get("details", "")), widths["details"]) or [""]
        for k, line in enumerate(details):
            cells = {c: str(r.get(c, "")) if k == 0 else "" for c in cols}
            cells["details"] = line
            out.append("  ".join(cells[c].ljust(widths[c]) for c in cols).rstrip())
    return "\n".join(out)


def train_stage_row(summary: dict, path: Path) -> dict:
    return {
        "stage": "train",
        "status": "interrupted" if summary.get("interrupted") else "ok",
        "details": f"{summary['steps']} steps, {summary['seconds']:.1f} s;"
        f" dev loss {summary['dev_loss']:.4f}, test {summary['test_loss']:.4f}"
        + calibration_note(summary.get("calibration")),
        "output": str(path),
    }


def calibration_note(calibration: dict | None) -> str:
    """``"; BN calibrated: running means moved <= 0.031 sd, dev 2.0751 -> 2.0747"``, or ``""``
    when no calibration pass ran."""
    if not calibration:
        return ""
    shift = max((lay["max_mean_shift_sd"] for lay in calibration["layers"]), default=0.0)
    before, after = calibration["dev_loss_before"], calibration["dev_loss_after"]
    dev = f", dev {before:.4f} -> {after:.4f}" if before is not None and after is not None else ""
    return f"; BN calibrated: running means moved <= {shift:.2g} sd{dev}"


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
    report_dir: str | Path | None = None,
    **train_args,
) -> MainJobResult:
    """train -> fold -> verify -> export -> model card, all into ``out_dir``.

    ``train_args`` go to :func:`train_run`; the training report goes to ``report_dir``
    (default ``out_dir/report``). Every output is written into a staging folder beside
    ``out_dir`` (and beside the report folder, when that is elsewhere) and moved into place
    only when every stage passed, so a run that fails or is stopped half-way leaves
    ``out_dir`` as it was: no new ``bn.pt`` beside old folded files. When verification
    fails, nothing unverified is written or exported: the trained model is kept aside as
    ``UNVERIFIED_CHECKPOINT`` and nothing else in ``out_dir`` changes. A run stopped by
    Ctrl-C saves its partial model as ``INTERRUPTED_CHECKPOINT`` in ``out_dir`` and raises
    ``TrainingInterrupted``. ``command`` is recorded in the model card so the run can be
    repeated.

    The trained model stays in memory from training to the report: ``bn.pt`` is written
    once and never read back, and the report (its fold figure included) is written once,
    from what the one walk measured.
    """
    out_dir = Path(out_dir)
    report_dir = Path(report_dir or out_dir / "report")
    for name in (*MAIN_JOB_FILES, UNVERIFIED_CHECKPOINT, INTERRUPTED_CHECKPOINT):
        check_output_file(out_dir / name)  # all checked before training
    check_output_dir(report_dir)
    for name in REPORT_FILES:  # the commit checks every staged name again before moving
        check_output_file(report_dir / name)
    staged = [StagedOutputs(out_dir)]
    try:
        if not staged[0].holds(report_dir):
            staged.append(StagedOutputs(report_dir))
        run = train_run(report=True, **train_args)
        bn_staged = save_trained(
            run, staged[0].path(out_dir / "bn.pt"), aside=out_dir / INTERRUPTED_CHECKPOINT
        )
        summary = {**run.summary, "report": str(report_dir / "index.html")}
        result, folded = _fold_verify_export(
            staged[0], run, summary, tolerance, max_exhaustive, command
        )
        if not result.passed:
            staged[0].keep(bn_staged, out_dir / UNVERIFIED_CHECKPOINT)
            return result
        write_training_report(
            run.diagnostics,
            run.checkpoint.model,
            run.data,
            staged[-1].path(report_dir),
            run.checkpoint.meta,
            folded=folded.model,
            measured=fold_figure_stats(result.verification),
        )
        result.rows.append(
            {
                "stage": "report",
                "status": "ok",
                "details": "training diagnostics: open index.html in a browser",
                "output": summary["report"],
            }
        )
        # one set, all or none; the card, with every file's sha256, last
        commit_staged(staged, last=("README.md",))
    finally:
        for stage in staged:
            stage.discard()
    return result


def fold_figure_stats(v: VerifyReport) -> dict:
    """What the walk measured for the fold pair, as the report's fold figure shows it."""
    keys = ("criterion", "bound", "margin", "passed", "reason", "near_ties", "flips")
    return {
        "contexts": v.contexts_checked,
        "domain": v.coverage,
        "max_abs_logit_diff": v.max_abs_logit_error,
        "argmax_agreement": v.argmax_agreement,
        "verdict": {k: getattr(v, k) for k in keys},
    }


def _fold_verify_export(
    stage: StagedOutputs,
    run: TrainedRun,
    summary: dict,
    tolerance: float | None,
    max_exhaustive: int | None,
    command: str,
) -> tuple[MainJobResult, Checkpoint]:
    """Fold, verify and export the trained checkpoint (already written into ``stage``),
    writing into ``stage``. Returns the result and the folded checkpoint.

    One walk over the domain (:func:`bnfold.pipeline.assemble.assemble`) compares the four
    networks (torch BN, torch folded, ONNX BN, ONNX folded; all six pairs) and the float64
    truth, each evaluated once: the fold's verification, the export's ONNX Runtime check
    and the four-network table are read from it. Nothing is written before its verdict is
    known.
    """
    out_dir = stage.target
    # the final paths name every file in reports and metadata, never the staging folder
    bn_path, folded_path = out_dir / "bn.pt", out_dir / "folded.pt"
    src = run.checkpoint
    plan = walk_plan(src, run.data.path, max_exhaustive)
    a = assemble(
        src, bn_path, folded_path=folded_path, all_pairs=True, plan=plan, tolerance=tolerance
    )
    folded, fold_report = a.checkpoints["folded"], a.fold_report
    verification = a.fold_verification()
    record_verification(folded, fold_report, verification)
    passed = verification.passed
    rows = [
        train_stage_row(summary, bn_path if passed else out_dir / UNVERIFIED_CHECKPOINT),
        *fold_stage_rows(folded_path if passed else None, fold_report, verification),
    ]
    result = MainJobResult(rows, summary, fold_report, verification)
    if not passed:
        return result, folded
    save_verified(folded, stage.path(folded_path))

    t0 = time.perf_counter()
    checks, per_file = a.onnx_verification()
    paths, shas, ops = write_onnx(a.build, per_file, stage.root)
    result.export = ExportResult(
        paths={kind: stage.final(p) for kind, p in paths.items()},
        op_types=ops,
        verification=checks,
        sha256=shas,
        source=bn_path,
        source_sha256=src.sha256,
        seconds=round(a.build_seconds + time.perf_counter() - t0, 3),
    )
    rows.append(result.export.stage_row())
    files = dict(zip(a.nets, (bn_path, folded_path, *result.export.paths.values()), strict=True))
    result.networks = four_networks(a.comparison, a.nets, files)
    written = {bn_path.name: src.sha256, folded_path.name: folded.sha256}
    written.update({p.name: shas[kind] for kind, p in paths.items()})
    seed = src.meta["train_config"]["seed"]
    result.model_card = stage.final(write_model_card(stage.root, result, command, seed, written))
    rows.append(
        {
            "stage": "card",
            "status": "ok",
            "details": "model card with sha256 of each file",
            "output": str(result.model_card),
        }
    )
    return result, folded


def write_model_card(
    out_dir: Path, job: MainJobResult, command: str, seed: int, sha256: dict[str, str]
) -> Path:
    """``out_dir/README.md``: how the models were made, how good they are, and checksums
    (``sha256``: file name -> the hash of the bytes written, so no file is read again)."""

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
        lines.append(f"| `{name}` | {p.stat().st_size:,} | `{sha256[name]}` |")
    lines.append("")
    path = out_dir / "README.md"
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines), encoding="utf-8"))
    return path
