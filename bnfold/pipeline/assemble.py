"""The one assembler of the pipeline: fold -> build ONNX -> one walk -> judge -> write.

``bnfold fold`` (a bnfold checkpoint), ``bnfold export``, ``bnfold bench`` and the main job
(``train-fold``) all make their networks here, from a checkpoint already in memory (read
once, hashed from the bytes read): the folded network (refused unless every BatchNorm
folds into a plain MLP), the ONNX graphs with an ONNX Runtime session on each, the float64
truth, and one walk over the input domain that compares every pair they need. What each
command writes is then read from that walk; nothing is written before its verdict is known.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from bnfold.errors import BnfoldError
from bnfold.fold.modules import FoldReport, fold_batchnorm
from bnfold.io.files import check_output_file
from bnfold.mlp.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from bnfold.mlp.model import MLP
from bnfold.pipeline.export import (
    TORCH_NET,
    ExportResult,
    OnnxBuild,
    build_onnx,
    judge_onnx,
    write_onnx,
)
from bnfold.runtime.infer import Predictor, TorchPredictor
from bnfold.verify.domain import DEFAULT_MAX_EXHAUSTIVE, DomainComparison, DomainPlan, plan_domain
from bnfold.verify.networks import compare_networks
from bnfold.verify.verdict import (
    Float64Model,
    VerifyReport,
    dev_test_contexts,
    report_from_pair,
)

# the fold's own verdict: the folded torch network against the BN one
FOLD_PAIR = (TORCH_NET["bn"], TORCH_NET["folded"])
# how an in-memory folded network (folded by the assembler, not read from a file) is named
IN_MEMORY_FOLDED = Path("folded")


def fold_to_checkpoint(src: Checkpoint, source: Path) -> tuple[Checkpoint, FoldReport]:
    """Every BatchNorm of ``src`` (the checkpoint file ``source``) folded, as a checkpoint
    that records where it came from (``src.sha256``). Refused unless every BatchNorm folds
    and the result is again bnfold's MLP: the one place that condition is checked. Not
    verified yet."""
    folded, report = fold_batchnorm(src.model)
    if not report.complete or not isinstance(folded, MLP):
        why = "; ".join(f"{s.bn}: {s.reason}" for s in report.skipped) or "unknown"
        raise BnfoldError(f"{source}: could not fold every BatchNorm ({why})")
    meta = {
        **src.meta,
        "folded_from": {"path": str(source.resolve()), "sha256": src.sha256},
        "metrics_from": "the source BatchNorm checkpoint (the folded model is verified equal)",
    }
    return Checkpoint(folded, src.vocab, metrics=dict(src.metrics), meta=meta), report


@dataclass
class Assembly:
    """The networks of one checkpoint and the one walk that compared them."""

    source: Path  # the checkpoint's name in reports and metadata
    checkpoints: dict[str, Checkpoint]  # "bn" (absent for a folded source) / "folded"
    fold_report: FoldReport | None  # None when the folded network was given
    nets: dict[str, Predictor]  # named as TORCH_NET / ONNX_NET
    build: OnnxBuild | None  # the ONNX graphs, when asked for
    build_seconds: float
    truth: Float64Model | None  # the BN network in float64 (None for a folded source)
    comparison: DomainComparison

    @property
    def plan(self) -> DomainPlan:
        return self.comparison.plan

    def fold_verification(self) -> VerifyReport:
        """The verdict on the folded torch network against the BN one."""
        ref, cand = (self.nets[name] for name in FOLD_PAIR)
        return report_from_pair(
            self.comparison.pairs[FOLD_PAIR],
            self.plan,
            reference=str(ref.path),
            candidate=str(cand.path),
            float64_source=self.truth.source if self.truth else None,
            seconds=self.comparison.seconds,
        )

    def onnx_verification(self) -> tuple[dict[str, dict], dict[str, dict]]:
        """:func:`bnfold.pipeline.export.judge_onnx` on the walk: raises unless every ONNX
        graph matches torch. A torch network is named by its file, ``bn.pt (torch)``."""
        if self.build is None:
            raise BnfoldError("internal error: no ONNX graphs were assembled")
        labels = {name: str(net.path) for name, net in self.build.nets.items()}
        for kind in self.checkpoints:
            labels[TORCH_NET[kind]] = f"{self.nets[TORCH_NET[kind]].path.name} (torch)"
        return judge_onnx(
            self.comparison, self.build, labels, self.truth.source if self.truth else None
        )


def walk_plan(src: Checkpoint, data_path, max_exhaustive: int | None = None) -> DomainPlan:
    """The contexts a verdict on ``src`` walks: every one when there are at most
    ``max_exhaustive``, else a seeded sample plus every dev/test context of ``data_path``
    when that is the file ``src`` was trained on."""
    limit = DEFAULT_MAX_EXHAUSTIVE if max_exhaustive is None else max_exhaustive
    V, T = src.config.vocab_size, src.config.block_size
    extra = dev_test_contexts(V, T, data_path, limit, src.meta.get("data_sha256"))
    return plan_domain(V, T, max_exhaustive=limit, extra=extra)


def assemble(
    source: Checkpoint,
    source_path: Path,
    *,
    folded: Checkpoint | None = None,
    folded_path: Path = IN_MEMORY_FOLDED,
    onnx: bool = True,
    all_pairs: bool = False,
    plan: DomainPlan | None = None,
    tolerance: float | None = None,
) -> Assembly:
    """Fold ``source`` (read from, or to be written to, ``source_path``; its ``sha256``
    set) unless ``folded`` is given, build the ONNX graphs when ``onnx``, and walk ``plan``
    (default: every context, or a seeded sample) once.

    The walk compares each ONNX graph against its own torch network and against the BN one
    (without ``onnx``: the folded torch network against the BN one), or with ``all_pairs``
    every pair of the networks (the four-network table). A ``source`` already folded has
    no BN network and no float64 truth: only its own graph is built and checked.
    """
    if source.sha256 is None:
        raise BnfoldError("internal error: the source checkpoint has no sha256 (never read)")
    checkpoints: dict[str, Checkpoint] = {}
    fold_report = None
    if source.config.batchnorm:
        if folded is None:
            folded, fold_report = fold_to_checkpoint(source, source_path)
        checkpoints = {"bn": source, "folded": folded}
        paths = {"bn": source_path, "folded": folded_path}
    else:
        checkpoints, paths = {"folded": source}, {"folded": source_path}
    nets: dict[str, Predictor] = {
        TORCH_NET[kind]: TorchPredictor(ckpt, str(paths[kind]))
        for kind, ckpt in checkpoints.items()
    }
    t0 = time.perf_counter()
    build = None
    if onnx:
        models = {kind: ckpt.model for kind, ckpt in checkpoints.items()}
        build = build_onnx(models, source, source_path, source.sha256)
        nets.update(build.nets)
    build_seconds = time.perf_counter() - t0
    if all_pairs:  # the four-network table
        pairs = list(combinations(nets, 2))
    elif build is not None:
        pairs = build.pairs
    else:
        pairs = [FOLD_PAIR]
    truth = Float64Model.from_checkpoint(source, str(source_path)) if "bn" in checkpoints else None
    if plan is None:
        plan = plan_domain(source.config.vocab_size, source.config.block_size)
    comparison = compare_networks(nets, pairs, plan, truth, tolerance=tolerance)
    return Assembly(
        source_path, checkpoints, fold_report, nets, build, build_seconds, truth, comparison
    )


# ------------------------------------------------------------------ the commands


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

    path = save_checkpoint(folded, out)
    written = load_checkpoint(path).model.state_dict()
    for k, v in folded.model.state_dict().items():
        if not torch.equal(written[k], v):
            raise BnfoldError(f"{path}: the written checkpoint differs from the verified model")
    return path


def fold_checkpoint(
    bn_path: str | Path,
    out_path: str | Path | None = None,
    *,
    tolerance: float | None = None,
    data_path: str | Path | None = None,
    max_exhaustive: int | None = None,
    write_on_failure: bool = False,
):
    """Fold every BatchNorm of ``bn_path`` and write the verified result (default
    ``folded.pt`` next to the input). Returns ``(path, FoldReport, VerifyReport)``.

    The folded model is verified against the BN model (and a float64 evaluation of it)
    *before* it is written; when verification fails nothing is written (path ``None``)
    unless ``write_on_failure``. The written file is reloaded and compared bit for bit
    with what was verified. ``data_path`` supplies the dev/test contexts that are added to
    the random sample when the domain is too large to check exhaustively.
    """
    bn_path = Path(bn_path)
    src = load_checkpoint(bn_path)
    if not src.config.batchnorm:
        raise BnfoldError(f"{bn_path}: already folded (no BatchNorm left); give the BN checkpoint")
    out = Path(out_path) if out_path is not None else bn_path.with_name("folded.pt")
    if out.exists() and out.resolve() == bn_path.resolve():
        raise BnfoldError(f"{out}: the output would overwrite the input checkpoint")
    check_output_file(out)
    plan = walk_plan(src, data_path, max_exhaustive)
    a = assemble(src, bn_path, folded_path=out, onnx=False, plan=plan, tolerance=tolerance)
    folded, report, vr = a.checkpoints["folded"], a.fold_report, a.fold_verification()
    record_verification(folded, report, vr)
    if not (vr.passed or write_on_failure):
        return None, report, vr
    return save_verified(folded, out), report, vr


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path | None = None,
    *,
    tolerance: float | None = None,
    folded_checkpoint: str | Path | None = None,
) -> ExportResult:
    """Write ``bn.onnx`` and ``folded.onnx`` for a BN checkpoint (only ``folded.onnx`` for an
    already folded one) into ``out_dir`` (default: the checkpoint's folder).
    ``folded_checkpoint``: the folded ``.pt`` made from ``checkpoint`` (its recorded
    ``folded_from`` sha256 must match), used instead of folding again. See
    :func:`export_onnx`."""
    t0 = time.perf_counter()
    src_path = Path(checkpoint)
    src = load_checkpoint(src_path)
    out = src_path.parent if out_dir is None else Path(out_dir)
    folded, folded_path = None, IN_MEMORY_FOLDED
    if folded_checkpoint is not None and src.config.batchnorm:
        folded_path = Path(folded_checkpoint)
        folded = load_checkpoint(folded_path)
    result = export_onnx(
        src, src_path, out, folded=folded, folded_path=folded_path, tolerance=tolerance
    )
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def export_onnx(
    src: Checkpoint,
    src_path: Path,
    out: Path,
    *,
    folded: Checkpoint | None = None,
    folded_path: Path = IN_MEMORY_FOLDED,
    tolerance: float | None = None,
) -> ExportResult:
    """Write the ONNX graphs of ``src`` (read from ``src_path``; with ``folded``, its folded
    form read from ``folded_path``) into ``out``.

    Nothing is written unless every ONNX graph matches torch over the whole input domain
    (one walk for every pair); the figures are stored in each file's metadata.
    """
    t0 = time.perf_counter()
    for kind in ("bn", "folded") if src.config.batchnorm else ("folded",):
        check_output_file(out / f"{kind}.onnx")  # before any work
    if folded is not None:
        recorded = (folded.meta.get("folded_from") or {}).get("sha256")
        if folded.config.batchnorm or recorded != src.sha256:
            raise BnfoldError(
                f"{folded_path}: not the folded form of {src_path} (its folded_from sha256 differs)"
            )
    a = assemble(src, src_path, folded=folded, folded_path=folded_path, tolerance=tolerance)
    verification, per_file = a.onnx_verification()
    paths, shas, ops = write_onnx(a.build, per_file, out)
    notes = (
        []
        if src.config.batchnorm
        else [f"{src_path.name} is already folded: wrote folded.onnx only"]
    )
    return ExportResult(
        paths=paths,
        op_types=ops,
        verification=verification,
        sha256=shas,
        source=src_path,
        source_sha256=src.sha256,
        seconds=round(time.perf_counter() - t0, 3),
        notes=notes,
    )


__all__ = [
    "Assembly",
    "assemble",
    "export_checkpoint",
    "export_onnx",
    "fold_checkpoint",
    "fold_to_checkpoint",
]
