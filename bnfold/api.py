"""bnfold's Python API: the command line's steps as functions, importable from ``bnfold``.

Each function returns a result that prints as the command prints it (``print(result)``)
and converts to the dict its ``--json`` prints (``result.to_dict()``); a bad input raises
:class:`bnfold.errors.BnfoldError` with the message (and ``hint``) the command shows.

* :func:`train` a BatchNorm character MLP from a words file -> ``OUT/bn.pt``;
* :func:`report`: the verdict on a training report (``train(report=DIR)``);
* :func:`fold` any ``nn.Module`` (torch.fx), a bnfold checkpoint or an ONNX file;
* :func:`verify` any two of: a torch module (with example inputs), a checkpoint, an ONNX
  file, judged against a float64 evaluation of the reference;
* :func:`export` a checkpoint (``bn.onnx`` + ``folded.onnx``) or a module (one file),
  checked in ONNX Runtime before anything is written;
* :func:`sample` names from a ``.onnx`` or ``.pt`` model.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnfold.errors import KEEP_BN_EXPORT, BnfoldError
from bnfold.io.files import file_sha256
from bnfold.mlp.config import DEFAULT_PRESET
from bnfold.mlp.data import DEFAULT_WORDS
from bnfold.sampling.options import SampleOptions
from bnfold.verify.domain import DEFAULT_MAX_EXHAUSTIVE, DEFAULT_SAMPLE_SIZE

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bnfold.runtime.predictor import Predictor
    from bnfold.sampling.options import SampledName
    from bnfold.sampling.sample import Labeler

__all__ = [
    "DEFAULT_MODELS",
    "DEFAULT_WORDS",
    "Exported",
    "FoldResult",
    "Samples",
    "TrainReport",
    "Trained",
    "VerifyResult",
    "export",
    "fold",
    "report",
    "sample",
    "train",
    "verify",
]

# Outputs go to ./models in the current folder, never to where bnfold is installed.
DEFAULT_MODELS = Path("models")

# How a torch user gets BatchNorms into an ONNX file bnfold can fold (the exporter's
# defaults fold them away, or hide them in a training-mode graph).
TORCH_ROUTES = (
    "fold it from Python with `bnfold.fold(model, inputs=example)` (any nn.Module), or"
    f" export it to ONNX with its BatchNorms kept, {KEEP_BN_EXPORT}, and run"
    " `bnfold fold model.onnx`"
)


# ----------------------------------------------------------------------------- train


@dataclass
class Trained:
    """A training run: ``path`` is the checkpoint written (``OUT/bn.pt``)."""

    path: Path
    summary: dict

    def to_dict(self) -> dict:
        return {**self.summary, "path": str(self.path)}

    def __str__(self) -> str:
        s = self.summary
        note = "  (interrupted: saved the last completed step)" if s["interrupted"] else ""
        return (
            f"trained {s['preset']} preset: {s['steps']} steps in {s['seconds']:.1f} s, "
            f"{s['params']:,} parameters on {s['threads']} thread(s){note}\n"
            f"loss (eval mode)  train {s['train_loss']:.4f}  dev {s['dev_loss']:.4f}  "
            f"test {s['test_loss']:.4f}\n"
            + calibration_line(s.get("calibration"))
            + f"wrote {self.path}"
            + (f"\nwrote report {s['report']}" if s.get("report") else "")
        )


def calibration_line(calibration: dict | None) -> str:
    """The summary's line on the calibration pass (empty when none ran)."""
    from bnfold.pipeline.train_fold import calibration_note

    note = calibration_note(calibration)
    return f"{note.removeprefix('; ')}\n" if note else ""


def train(
    words: str | Path | None = None,
    out: str | Path = DEFAULT_MODELS,
    *,
    preset: str = DEFAULT_PRESET,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    n_embd: int | None = None,
    n_hidden: int | None = None,
    n_layers: int | None = None,
    block_size: int | None = None,
    seed: int | None = None,
    threads: int | None = None,
    report: str | Path | None = None,
    calibrate: bool = False,
    progress: bool | None = False,
) -> Trained:
    """Train the BatchNorm MLP on ``words`` (default: the packaged names.txt) and write
    ``out/bn.pt``. ``preset``: ``fast`` (seconds on a CPU) or ``lecture`` (the lecture's
    200,000 SGD steps); ``steps``, ``batch_size`` and ``lr`` override it. ``threads``: torch
    threads (0 or None: the preset's choice; ``fast`` uses the cores free right now, up to
    2). ``report``: also record diagnostics and write a report folder there. ``calibrate``:
    run the lecture's BatchNorm calibration pass after training. The model's sizes
    (``n_embd``, ``n_hidden``, ``n_layers``, ``block_size``) and ``seed`` default to the
    lecture's (``bnfold.mlp.config.DEFAULT_MODEL``)."""
    from bnfold.pipeline.train_fold import train_to_checkpoint

    shape = dict(n_embd=n_embd, n_hidden=n_hidden, n_layers=n_layers, block_size=block_size)
    given = {k: v for k, v in {**shape, "seed": seed}.items() if v is not None}
    path, summary = train_to_checkpoint(
        data_path=DEFAULT_WORDS if words is None else Path(words),
        out_dir=Path(out),
        preset=preset,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        threads=threads,
        report_dir=report,
        calibrate=calibrate,
        progress=progress,
        **given,
    )
    return Trained(path, summary)


@dataclass
class TrainReport:
    """The short verdict on a training report folder."""

    folder: Path
    saved: dict

    def to_dict(self) -> dict:
        from bnfold.report.verdict import verdict

        return verdict(self.saved)

    def __str__(self) -> str:
        from bnfold.report.verdict import verdict_lines

        return "\n".join([f"report {self.folder}", *(f"  {x}" for x in verdict_lines(self.saved))])


def report(folder: str | Path) -> TrainReport:
    """Read a report written by ``train(report=folder)``: worst saturation, weights whose
    update:data ratio stays far from 1e-3, dead neurons."""
    from bnfold.report.diagnostics import load_report

    return TrainReport(Path(folder), load_report(folder))


# ------------------------------------------------------------------- fold and verify


def _verdict_block(v: dict) -> dict:
    """A rounding verdict (``RoundingVerdict.to_dict()``) as the schema's ``Verdict``."""
    return {
        "passed": bool(v["passed"]),
        "criterion": v["criterion"],
        "bound": v.get("bound"),
        "margin": v.get("margin"),
        "max_abs_error": v.get("max_abs_error"),
        "near_ties": int(v.get("near_ties") or 0),
        "flips": int(v.get("flips") or 0),
        "nonfinite": int(v.get("nonfinite") or 0),
        "reason": v["reason"],
    }


def _worst(outputs: list[dict]) -> dict:
    """The overall verdict of several outputs: the first failing one, else the one closest
    to its bound (its reason names the output when there are several)."""
    if not outputs:
        return {
            **_verdict_block({"passed": False, "criterion": "exact", "reason": ""}),
            "reason": "FAIL: no outputs compared",
        }
    failing = [o for o in outputs if not o["verdict"]["passed"]]
    pick = failing[0] if failing else max(outputs, key=lambda o: o["verdict"]["margin"] or 0.0)
    block = dict(pick["verdict"])
    if len(outputs) > 1:
        block["reason"] = f"{pick['name']}: {block['reason']}"
    return block


def _verification_dict(v: Any, reference: str, candidate: str, tolerance) -> dict:
    """A ``VerifyReport`` (bnfold networks over their domain) or a ``Comparison`` (ONNX
    files, modules) as the schema's ``Verification``."""
    from bnfold.verify.onnx import Comparison

    details = v.to_dict()
    if isinstance(v, Comparison):
        outputs = [
            {"name": o.name, "shape": o.shape, "verdict": _verdict_block(o.verdict.to_dict())}
            for o in v.outputs
        ]
        checked, f64, seconds = v.inputs, v.float64 or None, v.seconds
    else:
        block = _verdict_block({**details, "max_abs_error": v.max_abs_logit_error})
        outputs = [{"name": "logits", "shape": None, "verdict": block}]
        checked, f64, seconds = v.coverage, v.float64_reference, v.seconds
        reference, candidate = v.reference, v.candidate
    return {
        "reference": reference,
        "candidate": candidate,
        "checked": checked,
        "float64": f64,
        "tolerance": tolerance,
        "seconds": float(seconds),
        "passed": bool(v.passed),
        "verdict": _worst(outputs),
        "outputs": outputs,
        "details": details,
    }


# what FoldSummary states itself (the rest of a fold report goes under "details")
FOLD_KEYS = ("folded", "skipped", "left", "notes", "complete", "seconds", "batchnorms")


def _fold_dict(r: Any, source: str) -> dict:
    """A torch ``FoldReport`` or an ``OnnxFoldReport`` as the schema's ``FoldSummary``."""
    d = r.to_dict()
    left = getattr(r, "left", None)
    left = r.skipped if left is None else left
    folded = [
        {
            "bn": f.bn,
            "layer": f.layer,
            "layer_op": getattr(f, "layer_op", None),
            "direction": f.direction,
            "note": getattr(f, "note", ""),
        }
        for f in r.folded
    ]
    return {
        "source": source,
        "batchnorms": len(r.folded) + len(left),
        "folded": folded,
        "left": [{"bn": s.bn, "reason": s.reason} for s in left],
        "notes": list(r.notes),
        "complete": bool(r.complete),
        "seconds": float(r.seconds),
        "details": {k: v for k, v in d.items() if k not in FOLD_KEYS},
    }


def _verification_lines(v: Any, reference: str, candidate: str) -> list[str]:
    """The verification as the CLI prints it, reference first and candidate second."""
    lines = v.format().splitlines()
    head = f"verification {'PASSED' if v.passed else 'FAILED'}"
    lines[0] = f"{head}: reference {reference}, candidate {candidate}"
    from bnfold.verify.onnx import Comparison

    if isinstance(v, Comparison):  # its first line says what was fed and the truth
        lines.insert(1, f"  checked    {v.inputs}; float64 truth: {v.float64}")
    return lines


@dataclass
class VerifyResult:
    """A verification of ``candidate`` against ``reference``: ``passed``, the report
    (``verification``), printable and convertible to the ``verify --json`` document."""

    reference: str
    candidate: str
    verification: Any  # VerifyReport or Comparison
    tolerance: float | None = None

    @property
    def passed(self) -> bool:
        return bool(self.verification.passed)

    def to_dict(self) -> dict:
        v = _verification_dict(self.verification, self.reference, self.candidate, self.tolerance)
        doc = {
            "command": "verify",
            "path": None,
            "fold": None,
            "verification": v,
            "passed": self.passed,
            "peak_rss_mb": peak_rss_mb(),
        }
        return checked_document(doc)

    def __str__(self) -> str:
        return "\n".join(_verification_lines(self.verification, self.reference, self.candidate))


@dataclass
class FoldResult:
    """A fold: the report of what was folded and left (``fold_report``), the verification
    (``None`` for a module folded without example inputs), the file written (``path``;
    ``None`` for a module, or when verification failed) and, for a module, the folded
    module (``module``)."""

    source: str
    fold_report: Any  # FoldReport or OnnxFoldReport
    verification: Any | None  # VerifyReport, Comparison or None
    path: Path | None = None
    module: nn.Module | None = None
    tolerance: float | None = None
    candidate: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Verification passed (a module folded without inputs: every BN folded)."""
        if self.verification is None:
            return bool(self.fold_report.complete)
        return bool(self.verification.passed)

    def to_dict(self) -> dict:
        v = self.verification
        doc = {
            "command": "fold",
            "path": str(self.path) if self.path else None,
            "fold": _fold_dict(self.fold_report, self.source),
            "verification": None
            if v is None
            else _verification_dict(v, self.source, self.candidate, self.tolerance),
            "passed": self.passed,
            "peak_rss_mb": peak_rss_mb(),
        }
        return checked_document(doc)

    def __str__(self) -> str:
        lines = [self.fold_report.format()]
        if self.verification is not None:
            lines += _verification_lines(self.verification, self.source, self.candidate)
        lines += [f"note: {n}" for n in self.notes]
        if self.module is not None:
            lines.append("folded module returned (nothing written)")
        else:
            lines.append(
                f"wrote {self.path}" if self.path else "verification failed: nothing written"
            )
        return "\n".join(lines)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (what a fold or verify cost)."""
    from bnfold.verify.onnx import peak_rss_mb as measured

    return measured()


def checked_document(doc: dict) -> dict:
    """``doc`` validated against the one fold/verify schema (a bug here, never the user's,
    must not print a document that breaks its consumers)."""
    from bnfold.io.schema import FoldVerifyDocument

    return FoldVerifyDocument.model_validate(doc).model_dump(mode="json")


def _is_path(x: Any) -> bool:
    return isinstance(x, (str, Path))


def _is_onnx(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def torch_file_kind(path: str | Path) -> str | None:
    """What a ``.pt`` file bnfold cannot read is: ``"torchscript"`` (``torch.jit.save``),
    ``"pickled module"`` (``torch.save(model)``), ``"state_dict"`` (weights only), or
    ``None`` (something else). Nothing in the file is executed: the archive's listing is
    read, and the pickle is loaded with ``weights_only=True``."""
    import warnings

    import torch

    from bnfold.io.files import read_bounded
    from bnfold.mlp.checkpoint import FORMAT as CHECKPOINT_FORMAT
    from bnfold.mlp.checkpoint import MAX_CHECKPOINT_BYTES

    p = Path(path)
    if not p.is_file():
        return None
    data = read_bounded(p, MAX_CHECKPOINT_BYTES, "a torch file")
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            names = z.namelist()
        if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
            return "torchscript"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch refuses a pickled class: a module saved whole
        return "pickled module" if "GLOBAL" in str(e) else None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return None  # bnfold's own checkpoint: its error stands as it is
    if isinstance(obj, dict):
        inner = next(
            (
                obj[k]
                for k in ("state_dict", "model_state_dict", "model")
                if isinstance(obj.get(k), dict)
            ),
            obj,
        )
        if inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return "state_dict"
    return None


def _torch_route_error(path: Path, error: BnfoldError) -> BnfoldError:
    """``error`` (a ``.pt`` file bnfold could not read) with what the file is and what works
    instead, when it is a torch file of another kind."""
    kind = torch_file_kind(path)
    what = {
        "torchscript": "a TorchScript archive (torch.jit.save), not a bnfold checkpoint",
        "pickled module": "a whole pickled torch module (torch.save(model)), not a bnfold"
        " checkpoint; bnfold never unpickles code",
        "state_dict": "a state_dict (weights without the architecture), not a bnfold checkpoint",
    }.get(kind or "")
    if what is None:
        return error
    hint = TORCH_ROUTES
    if kind == "torchscript":  # fx cannot trace a ScriptModule: the original module can
        hint = "use the nn.Module it was made from: " + TORCH_ROUTES
    elif kind == "state_dict":
        hint = "build the model in Python, load_state_dict() the weights, then " + TORCH_ROUTES
    elif kind == "pickled module":
        hint = "load it yourself if you trust it (torch.load(path, weights_only=False)), then " + (
            TORCH_ROUTES
        )
    return BnfoldError(f"{path}: {what}", hint=hint)


def fold(
    model: nn.Module | str | Path,
    out: str | Path | None = None,
    *,
    inputs: torch.Tensor | Sequence[torch.Tensor] | str | Path | None = None,
    tolerance: float | None = None,
    max_exhaustive: int = DEFAULT_MAX_EXHAUSTIVE,
    words: str | Path | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    progress: bool | None = None,
) -> FoldResult:
    """Fold every BatchNorm of ``model`` into its neighbouring layer and verify the result.

    ``model`` is one of:

    * an ``nn.Module`` (any torch.fx-traceable one): the folded copy is ``result.module``
      (the original is untouched). With example ``inputs`` (a tensor or a tuple of them)
      the channel axes are checked and the folded module is verified against a float64
      copy of the original on them; nothing is written.
    * a bnfold checkpoint (``bn.pt``): verified over every possible context, written to
      ``out`` (default ``folded.pt`` beside it) only when it passes.
    * an ONNX file: verified in ONNX Runtime (on ``inputs``, an ``.npz`` path, if given),
      written to ``out`` (default ``MODEL.folded.onnx``) only when it passes; a file with
      no BatchNormalization node is refused before any work.

    ``shapes`` (an ONNX file): ``{input_name: (1, 3, 224, 224)}`` for random inputs whose
    dims the graph leaves dynamic.
    ``words``: a checkpoint's training words, whose dev/test contexts join the sample when
    the domain is too large to check whole. A failed verification is not an exception:
    ``result.passed`` is False and nothing is written.
    """
    if not _is_path(model):
        return _fold_module(model, inputs, tolerance, out)
    path = Path(model)
    if _is_onnx(path):
        from bnfold.pipeline.onnx_fold import default_output, fold_onnx_file

        if inputs is not None and not _is_path(inputs):
            raise BnfoldError(
                "for an ONNX file, inputs is an .npz file (one array per graph input)",
                hint="numpy.savez('inputs.npz', **{input_name: array}); or fold the torch"
                " module itself: bnfold.fold(module, inputs=tensor)",
            )
        written, rep, comparison = fold_onnx_file(
            path,
            None if out is None else Path(out),
            inputs=None if inputs is None else Path(inputs),
            tolerance=tolerance,
            max_exhaustive=max_exhaustive,
            shapes=shapes,
            progress=progress,
        )
        target = Path(out) if out is not None else default_output(path)
        return FoldResult(str(path), rep, comparison, written, None, tolerance, str(target))
    if inputs is not None or shapes:
        raise BnfoldError("inputs and shapes apply to .onnx models and torch modules only")
    from bnfold.pipeline.assemble import fold_checkpoint

    try:
        written, rep, report_ = fold_checkpoint(
            path,
            None if out is None else Path(out),
            tolerance=tolerance,
            data_path=DEFAULT_WORDS if words is None else Path(words),
            max_exhaustive=max_exhaustive,
        )
    except BnfoldError as e:
        raise _torch_route_error(path, e) from None
    return FoldResult(str(path), rep, report_, written, None, tolerance, report_.candidate)


def _fold_module(model: Any, inputs: Any, tolerance: float | None, out: Any) -> FoldResult:
    from torch import nn

    from bnfold.fold.modules import fold_batchnorm
    from bnfold.verify.modules import as_args, compare_sides, module_side

    if not isinstance(model, nn.Module):
        raise BnfoldError(
            f"cannot fold a {type(model).__name__}: give an nn.Module, a bnfold checkpoint"
            " path or an ONNX path"
        )
    if out is not None:
        raise BnfoldError(
            "a folded module is returned, not written: save result.module yourself, or"
            " export it with bnfold.export(result.module, inputs, 'model.onnx')"
        )
    args = None if inputs is None else as_args(inputs)
    folded, rep = fold_batchnorm(model, args)
    name = type(model).__name__
    comparison, notes = None, []
    if args is None:
        notes.append("not verified: pass inputs=example to check the folded module")
    else:
        comparison = compare_sides(
            module_side(model, name),
            module_side(folded, f"folded {name}"),
            args,
            tolerance=tolerance,
        )
    return FoldResult(name, rep, comparison, None, folded, tolerance, f"folded {name}", notes)


def _side(x: Any):
    """A module, a checkpoint path (its MLP) or an ONNX path as a comparison side."""
    from bnfold.verify.modules import module_side, onnx_side

    if not _is_path(x):
        return module_side(x)
    if _is_onnx(x):
        return onnx_side(x)
    from bnfold.mlp.checkpoint import load_checkpoint

    try:
        return module_side(load_checkpoint(x).model, str(x))
    except BnfoldError as e:
        raise _torch_route_error(Path(x), e) from None


def verify(
    reference: nn.Module | str | Path,
    candidate: nn.Module | str | Path,
    *,
    inputs: torch.Tensor | Sequence[torch.Tensor] | str | Path | None = None,
    tolerance: float | None = None,
    max_exhaustive: int = DEFAULT_MAX_EXHAUSTIVE,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    seed: int = 0,
    float64_reference: str | Path | None = None,
    words: str | Path | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    progress: bool = False,
) -> VerifyResult:
    """Does ``candidate`` compute what ``reference`` computes, up to float32 rounding?

    Each side is a torch module, a bnfold checkpoint (``.pt``) or an ONNX file:

    * two files: bnfold models are compared over every possible context (or a large
      sample), two other ONNX files on ``inputs`` (an ``.npz``) or seeded random inputs;
    * a module on either side: on the example ``inputs`` (a tensor or a tuple of them,
      required), the reference evaluated in float64 as the truth (a float64 copy of a
      module, the double graph of an ONNX file).

    ``shapes`` (two ONNX files): ``{input_name: (1, 3, 224, 224)}`` for random inputs whose
    dims the graph leaves dynamic. A failed verification is not an exception:
    ``result.passed`` is False.
    """
    if _is_path(reference) and _is_path(candidate):
        from bnfold.pipeline.onnx_fold import generic_onnx_pair

        ref, cand = Path(reference), Path(candidate)
        common = dict(tolerance=tolerance, max_exhaustive=max_exhaustive, seed=seed)
        if generic_onnx_pair(ref, cand):
            return _verify_onnx_pair(ref, cand, inputs, shapes, progress, common)
        if inputs is not None or shapes:
            raise BnfoldError(
                "inputs and shapes apply when a side is a torch module or both are generic"
                " ONNX files;"
                " two bnfold models are checked over their whole context domain"
            )
        words_path = DEFAULT_WORDS if words is None else Path(words)
        extra = dict(float64_reference=float64_reference, sample_size=sample_size)
        return _verify_model_files(ref, cand, words_path, progress, common, extra)
    if inputs is None or _is_path(inputs):
        raise BnfoldError(
            "verifying a torch module needs example inputs",
            hint="pass inputs=torch.randn(...) (a tensor, or a tuple of tensors for several"
            " positional inputs)",
        )
    from bnfold.verify.modules import compare_sides

    a, b = _side(reference), _side(candidate)
    comparison = compare_sides(a, b, inputs, tolerance=tolerance)
    return VerifyResult(a.label, b.label, comparison, tolerance)


def _verify_onnx_pair(
    ref: Path, cand: Path, inputs, shapes, progress: bool, common: dict
) -> VerifyResult:
    """Two ONNX files that are not both bnfold's: the same outputs on ``inputs`` (an .npz)
    or on seeded random inputs of ``shapes`` (``common``: tolerance, max_exhaustive, seed)."""
    from bnfold.pipeline.onnx_fold import verify_onnx_files

    result = verify_onnx_files(
        ref,
        cand,
        inputs=None if inputs is None else Path(inputs),
        shapes=shapes,
        progress=None if progress else False,  # None: stage lines on a terminal
        **common,
    )
    return VerifyResult(str(ref), str(cand), result, common["tolerance"])


def _verify_model_files(
    ref: Path, cand: Path, words: Path, progress: bool, common: dict, extra: dict
) -> VerifyResult:
    """Two bnfold models (.pt or .onnx) over their context domain (``common``: tolerance,
    max_exhaustive, seed; ``extra``: float64_reference, sample_size). A torch file of
    another kind is refused with what it is and the routes that work."""
    from bnfold.verify.verdict import verify_paths

    try:
        report_ = verify_paths(ref, cand, data_path=words, progress=progress, **common, **extra)
    except BnfoldError as e:
        for p in (ref, cand):
            routed = e if _is_onnx(p) else _torch_route_error(p, e)
            if routed is not e:
                raise routed from None
        raise
    return VerifyResult(str(ref), str(cand), report_, common["tolerance"])


# ---------------------------------------------------------------------------- export


@dataclass
class Exported:
    """What an export wrote (``paths``), checked in ONNX Runtime against torch."""

    paths: dict[str, Path]
    result: Any  # ExportResult (a checkpoint) or VerifyResult (a module)

    @property
    def passed(self) -> bool:
        return bool(self.result.passed)

    def to_dict(self) -> dict:
        d = self.result.to_dict()
        return d if "paths" in d else {"paths": {k: str(v) for k, v in self.paths.items()}, **d}

    def __str__(self) -> str:
        if hasattr(self.result, "format"):
            return self.result.format()
        paths = ", ".join(str(p) for p in self.paths.values())
        return f"{self.result}\nwrote {paths}" if self.passed else f"{self.result}\nnothing written"


def export(
    model: nn.Module | str | Path,
    inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    out: str | Path | None = None,
    *,
    tolerance: float | None = None,
    opset: int = 17,
) -> Exported:
    """Export to ONNX, checked in ONNX Runtime against torch before anything is written.

    * a bnfold checkpoint path: ``bn.onnx`` (with its BatchNorms) and ``folded.onnx`` into
      the folder ``out`` (default: the checkpoint's), compared over every context;
    * an ``nn.Module`` with example ``inputs``: the file ``out`` (required), exported by
      torch's TorchScript-based exporter (the batch dimension dynamic) and compared with
      the module on ``inputs`` (the module in float64 as the truth).
    """
    if _is_path(model):
        from bnfold.pipeline.assemble import export_checkpoint

        if inputs is not None:
            raise BnfoldError("inputs apply to torch modules; a checkpoint's domain is known")
        try:
            result = export_checkpoint(model, out, tolerance=tolerance)
        except BnfoldError as e:
            raise _torch_route_error(Path(model), e) from None
        return Exported(dict(result.paths), result)
    return _export_module(model, inputs, out, tolerance, opset)


def _export_module(model: Any, inputs: Any, out: Any, tolerance, opset: int) -> Exported:
    import tempfile
    import warnings

    import torch
    from torch import nn

    from bnfold.io.files import atomic_write, check_output_file
    from bnfold.verify.modules import as_args, compare_sides, module_side, onnx_side

    if not isinstance(model, nn.Module):
        raise BnfoldError(f"cannot export a {type(model).__name__}: give an nn.Module")
    if inputs is None or out is None:
        raise BnfoldError(
            "exporting a module needs example inputs and an output file",
            hint="bnfold.export(module, torch.randn(1, 3, 224, 224), 'model.onnx')",
        )
    target = Path(out)
    check_output_file(target)
    args = as_args(inputs)
    names = [f"input{i}" if len(args) > 1 else "input" for i in range(len(args))]
    dynamic = {n: {0: "batch"} for n in names}
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():  # the exporter's deprecation notes are not ours
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                args,
                buffer,
                dynamo=False,
                input_names=names,
                dynamic_axes=dynamic,
                opset_version=opset,
            )
    except Exception as e:  # the exporter raises many types; one line says which op failed
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BnfoldError(f"torch.onnx.export failed: {text[:300]}") from None
    data = buffer.getvalue()
    with tempfile.TemporaryDirectory() as tmp:  # checked from a file, as it will be read
        staged = Path(tmp) / target.name
        staged.write_bytes(data)
        comparison = compare_sides(module_side(model), onnx_side(staged), args, tolerance=tolerance)
    result = VerifyResult(type(model).__name__, str(target), comparison, tolerance)
    if result.passed:
        atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
    return Exported({"onnx": target} if result.passed else {}, result)


# ---------------------------------------------------------------------------- sample


def choose_labeler(predictor: Predictor, words: str | Path | None) -> tuple[Labeler | None, str]:
    """The novelty labeler for ``predictor`` and a note on where its labels come from.

    With ``words`` given: that file (refused when the model records another one). Without:
    the packaged names.txt when the model was trained on it (or records nothing, said in
    the note), else no labels (the note says how to get them)."""
    from bnfold.sampling.sample import Labeler, load_labeler

    if words is not None:
        labeler = load_labeler(predictor, words)
        note = (
            ""
            if labeler.verified
            else (
                f"{predictor.path} does not record the sha256 of its training words; the labels"
                f" assume it is {words}"
            )
        )
        return labeler, note
    recorded = predictor.data_sha256
    if recorded is None:
        return Labeler(DEFAULT_WORDS), (
            f"{predictor.path} does not record the sha256 of its training words; the labels"
            " assume the packaged names.txt"
        )
    if recorded == file_sha256(DEFAULT_WORDS):
        return Labeler(DEFAULT_WORDS, recorded), ""
    return None, (
        f"{predictor.path} was trained on another words file than the packaged names.txt:"
        " no train/dev/test/new labels (pass its words file with --words)"
    )


@dataclass
class Samples:
    """Sampled names: iterate for :class:`~bnfold.sampling.options.SampledName` rows;
    ``names`` lists the strings; prints one name per line."""

    rows: list[SampledName]
    header: dict

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.rows]

    def __iter__(self) -> Iterator[SampledName]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def to_dict(self) -> dict:
        from bnfold.sampling.sample import label_counts

        return {
            **self.header,
            "names": [s.to_dict() for s in self.rows],
            "label_counts": label_counts(self.rows),
        }

    def __str__(self) -> str:
        return "\n".join(self.names)


def sample(
    model: str | Path = DEFAULT_MODELS / "folded.onnx",
    count: int = SampleOptions.count,
    *,
    seed: int = SampleOptions.seed,
    temperature: float = SampleOptions.temperature,
    top_k: int | None = SampleOptions.top_k,
    top_p: float | None = SampleOptions.top_p,
    prefix: str = SampleOptions.prefix,
    min_length: int = SampleOptions.min_length,
    max_length: int = SampleOptions.max_length,
    new_only: bool = SampleOptions.new_only,
    words: str | Path | None = None,
    engine: str | None = None,
) -> Samples:
    """Sample ``count`` names from ``model`` (``.onnx`` or ``.pt``), reproducibly: the same
    model, seed and options give the same names. Each carries its train/dev/test/new label
    (see :func:`choose_labeler`; ``None`` without a words file) and its log-probability."""
    from bnfold.runtime.infer import load_predictor
    from bnfold.sampling.engine import DEFAULT_ENGINE
    from bnfold.sampling.sample import sample_names

    predictor = load_predictor(model)
    opts = SampleOptions(
        count=count,
        seed=seed,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        prefix=prefix,
        min_length=min_length,
        new_only=new_only,
        max_length=max_length,
    ).check(predictor.vocab)
    labeler, note = choose_labeler(predictor, words)
    rows = sample_names(predictor, opts, labeler, engine=engine or DEFAULT_ENGINE)
    header = {
        "model": str(model),
        "model_sha256": predictor.sha256,
        "backend": predictor.backend,
        "engine": engine or DEFAULT_ENGINE,
        "seed": opts.seed,
        "options": opts.to_dict(),
        "words": words_header(labeler, note),
    }
    return Samples(rows, header)


def words_header(labeler: Labeler | None, note: str) -> dict:
    """The ``words`` block of a sample's JSON: which file labelled the names, if any."""
    return {
        "file": str(labeler.path) if labeler else None,
        "sha256": labeler.sha256 if labeler else None,
        "verified": bool(labeler and labeler.verified),
        "note": note or None,
    }
