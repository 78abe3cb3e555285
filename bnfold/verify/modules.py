"""Check two arbitrary networks (torch modules, ONNX files run by ONNX Runtime) on the same
example inputs, judged against a float64 evaluation of the reference.

The float64 truth of a torch module is a deep copy in double (parameters, buffers and
floating inputs cast up); of an ONNX file, its graph in double
(:func:`bnfold.verify.onnx.float64_outputs`). Every floating output is judged by
:func:`bnfold.verify.rounding.judge_outputs` (a difference passes only when float32 rounding
explains it); other outputs must be identical. Both sides run in eval mode on copies: the
caller's modules are left as they are.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bnfold.errors import BnfoldError
from bnfold.verify.onnx import Comparison, OutputVerdict, _exact_verdict, float64_outputs, run
from bnfold.verify.rounding import judge_outputs

Inputs = torch.Tensor | Sequence[torch.Tensor]


def as_args(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """Example inputs as a tuple of positional tensors (a lone tensor is one input)."""
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise BnfoldError("example inputs must be a tensor or a tuple of tensors")
    return args


def flat_outputs(out: Any) -> list[tuple[str, np.ndarray]]:
    """A module's output (a tensor, or a tuple/list/dict of them) as named arrays."""
    if isinstance(out, torch.Tensor):
        return [("output", out.detach().cpu().numpy())]
    if isinstance(out, dict):
        items = list(out.items())
    elif isinstance(out, (tuple, list)):
        items = [(f"output[{i}]", v) for i, v in enumerate(out)]
    else:
        raise BnfoldError(f"cannot compare an output of type {type(out).__name__}")
    flat = []
    for key, value in items:
        for name, array in flat_outputs(value):
            flat.append((str(key) if name == "output" else f"{key}.{name}", array))
    return flat


@dataclass
class Side:
    """One network to compare: ``label`` names it in reports, ``run`` maps the positional
    inputs to named outputs, ``run64`` does the same in float64 and says how (``None``: no
    float64 evaluation)."""

    label: str
    run: Callable[[tuple[torch.Tensor, ...]], list[tuple[str, np.ndarray]]]
    run64: Callable[[tuple[torch.Tensor, ...]], tuple[list[tuple[str, np.ndarray]], str]] | None


def module_side(module: nn.Module, label: str | None = None) -> Side:
    """A torch module (an eval-mode copy) and its float64 copy."""
    if not isinstance(module, nn.Module):
        raise BnfoldError(f"expected an nn.Module, got {type(module).__name__}")
    work = copy.deepcopy(module).eval()
    double = copy.deepcopy(module).double().eval()

    def run32(args: tuple[torch.Tensor, ...]) -> list[tuple[str, np.ndarray]]:
        with torch.inference_mode():
            return flat_outputs(work(*args))

    def run64(args: tuple[torch.Tensor, ...]) -> tuple[list[tuple[str, np.ndarray]], str]:
        up = tuple(a.double() if a.is_floating_point() else a for a in args)
        with torch.inference_mode():
            return flat_outputs(double(*up)), "a float64 copy of the torch module"

    return Side(label or type(module).__name__, run32, run64)


def onnx_side(path: str | Path) -> Side:
    """An ONNX file run by ONNX Runtime (optimisations off), positional inputs mapped to the
    graph's inputs in order; its float64 copy as :mod:`bnfold.verify.onnx` makes it."""
    from bnfold.fold.onnx.graph import load_model
    from bnfold.verify.onnx import signature

    model = load_model(path)
    names = [name for name, _, _ in signature(model)[0]]

    def feeds(args: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
        if len(args) != len(names):
            raise BnfoldError(f"{path} takes {len(names)} input(s) ({names}), got {len(args)}")
        return {n: a.detach().cpu().numpy() for n, a in zip(names, args, strict=True)}

    def run32(args: tuple[torch.Tensor, ...]) -> list[tuple[str, np.ndarray]]:
        return list(run(model, feeds(args), str(path)).items())

    def run64(args: tuple[torch.Tensor, ...]) -> tuple[list[tuple[str, np.ndarray]], str]:
        outputs, how = float64_outputs(model, feeds(args))
        if outputs is None:
            raise BnfoldError(how)
        return list(outputs.items()), how

    return Side(str(path), run32, run64)


def compare_sides(
    reference: Side,
    candidate: Side,
    inputs: Inputs,
    *,
    tolerance: float | None = None,
) -> Comparison:
    """Run both sides on ``inputs`` and judge every output (in order; the names are the
    reference's) against the reference's float64 evaluation, or, without one, by the
    magnitude bound; ``tolerance`` overrides both with an absolute bound."""
    t0 = time.perf_counter()
    args = as_args(inputs)
    ref = reference.run(args)
    cand = candidate.run(args)
    if len(ref) != len(cand):
        raise BnfoldError(
            f"{candidate.label} has {len(cand)} output(s), {reference.label} has {len(ref)}"
        )
    truth, how = None, "not used (explicit tolerance)"
    if tolerance is None and reference.run64 is not None:
        try:
            truth, how = reference.run64(args)
        except (BnfoldError, RuntimeError) as e:  # e.g. an op without a double kernel
            truth, how = None, f"no float64 evaluation ({str(e).splitlines()[0][:120]})"
    shapes = ", ".join(f"{list(a.shape)}" for a in args)
    result = Comparison(inputs=f"the example inputs ({shapes})", float64=how)
    for i, ((name, r), (_, c)) in enumerate(zip(ref, cand, strict=True)):
        if r.shape != c.shape or r.dtype.kind != "f":
            verdict = _exact_verdict(r, c)
        else:
            t = None if truth is None else truth[i][1]
            verdict = judge_outputs(r, c, t, tolerance=tolerance, class_axis=None)
        result.outputs.append(OutputVerdict(name, list(r.shape), verdict))
    result.seconds = round(time.perf_counter() - t0, 3)
    return result
