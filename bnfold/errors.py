"""The one exception type that the CLI turns into a one-line message (never a traceback)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class BnfoldError(Exception):
    """A user-facing error: bad input, a bad file or a bad option. The message says what is
    wrong; ``hint`` (optional) says what works instead (the CLI prints it as ``hint:``)."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class TrainingInterrupted(Exception):
    """Ctrl-C stopped a job that must not go on with a partial model (exit code 130).
    The message says what was saved and what was left untouched."""


def first_validation_error(e: ValidationError) -> str:
    """A pydantic ``ValidationError`` as one short line: where, and what is wrong."""
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"]) or "the file"
    return f"{where}: {err['msg']}"[:200]


# The route the hints name for torch users: an ONNX export that keeps the BatchNorms (the
# default exporters fold them silently, so bnfold would find nothing to fold and prove).
KEEP_BN_EXPORT = (
    "torch.onnx.export(model, args, 'model.onnx', dynamo=False,"
    " training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)"
)
