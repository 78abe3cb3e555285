"""The one JSON shape of ``bnfold fold --json`` and ``bnfold verify --json`` (and of
``bnfold.fold(...).to_dict()`` / ``bnfold.verify(...).to_dict()``), whatever the file types.

A bnfold checkpoint, an ONNX file and a torch module give the same keys: what was folded,
what was left and why, and one verdict block per output plus the overall verdict. What only
one kind of input has (a checkpoint's argmax agreement, an ONNX file's per-input-set
figures) is kept under ``details``, which has no fixed keys. On error, ``--json`` prints
an :class:`ErrorDocument` instead. ``docs/schema/fold-verify.schema.json`` is
:func:`json_schema` written out (a test keeps the two identical).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_ID = "urn:bnfold:schema:fold-verify"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Verdict(_Strict):
    """Whether a difference is what float32 rounding explains, and by what measure."""

    passed: bool
    criterion: str = Field(
        description="float64 (judged against a float64 evaluation), magnitude (no float64"
        " evaluation: a bound from the outputs' magnitude), absolute (an explicit"
        " tolerance) or exact (integer/bool outputs, or different shapes)"
    )
    bound: float | None = Field(description="the largest allowed error that applied")
    margin: float | None = Field(description="error / bound: at most 1 passes")
    max_abs_error: float | None = Field(description="max |candidate - reference|")
    near_ties: int = Field(description="top-1 disagreements inside the rounding bound (allowed)")
    flips: int = Field(description="top-1 disagreements outside it (each one fails)")
    nonfinite: int = Field(description="rows where only the candidate is NaN or infinite")
    reason: str = Field(description="one line: why it passed or failed")


class OutputCheck(_Strict):
    """The verdict on one output of the two networks."""

    name: str
    shape: list[int] | None = Field(description="the output's shape, when known")
    verdict: Verdict


class Verification(_Strict):
    """The candidate against the reference, on the inputs ``checked`` describes."""

    reference: str
    candidate: str
    checked: str = Field(description="which inputs were compared")
    float64: str | None = Field(
        description="where the float64 truth came from (or why there is none)"
    )
    tolerance: float | None = Field(description="an explicit tolerance, if one was given")
    seconds: float
    passed: bool
    verdict: Verdict = Field(description="the overall verdict: the worst output's")
    outputs: list[OutputCheck]
    details: dict[str, Any] = Field(description="figures only this kind of input has")


class FoldedEntry(_Strict):
    """One BatchNorm folded away."""

    bn: str
    layer: str = Field(description="the layer it was folded into")
    layer_op: str | None = Field(description="the layer's ONNX op type (None for torch)")
    direction: Literal["into_preceding", "into_following"]
    note: str


class LeftEntry(_Strict):
    """One BatchNorm left in the network, and why."""

    bn: str
    reason: str


class FoldSummary(_Strict):
    """What folding did to ``source``."""

    source: str
    batchnorms: int
    folded: list[FoldedEntry]
    left: list[LeftEntry]
    notes: list[str]
    complete: bool = Field(description="every BatchNorm was folded")
    seconds: float
    details: dict[str, Any] = Field(description="figures only this kind of input has")


class FoldVerifyDocument(_Strict):
    """``fold --json`` and ``verify --json``."""

    model_config = ConfigDict(extra="forbid", title="bnfold fold/verify result")

    command: Literal["fold", "verify"]
    path: str | None = Field(description="the file written (fold only; None when none)")
    fold: FoldSummary | None = Field(description="None for verify")
    verification: Verification | None = Field(
        description="None only when a torch module was folded without example inputs"
    )
    passed: bool
    peak_rss_mb: float = Field(description="the process's peak resident memory, MB")


class ErrorDocument(_Strict):
    """What ``--json`` prints on stdout when the command fails (exit code 2)."""

    model_config = ConfigDict(extra="forbid", title="bnfold error")

    error: str
    hint: str | None


def json_schema() -> dict:
    """The JSON Schema of both documents (a result or an error)."""
    result = FoldVerifyDocument.model_json_schema(ref_template="#/$defs/{model}")
    error = ErrorDocument.model_json_schema(ref_template="#/$defs/{model}")
    defs = {**result.pop("$defs", {}), **error.pop("$defs", {})}
    defs["FoldVerifyDocument"] = result
    defs["ErrorDocument"] = error
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "bnfold fold --json / verify --json",
        "oneOf": [{"$ref": "#/$defs/FoldVerifyDocument"}, {"$ref": "#/$defs/ErrorDocument"}],
        "$defs": dict(sorted(defs.items())),
    }
