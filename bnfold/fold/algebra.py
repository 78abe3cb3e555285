"""The BatchNorm fold algebra, once, in float64 numpy: what both folders (torch modules in
:mod:`bnfold.fold.modules`, ONNX graphs in :mod:`bnfold.fold.onnx`) compute.

In eval mode a BatchNorm is the per-channel affine map ``bn(x) = x * s + t`` with
``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``. A layer before it absorbs it
in its output rows, a layer after it in its input columns. Every function takes and
returns float64 arrays; the caller casts the result once, to the layer's own dtype.
numpy, not torch: the ONNX path then never imports torch (~2 s of a fold's start-up).
"""

from __future__ import annotations

import numpy as np

F64 = np.float64
# the two ways a BatchNorm folds: into the layer before it (its output rows) or the layer
# after it (its input columns)
INTO_PRECEDING = "into_preceding"
INTO_FOLLOWING = "into_following"


def as_f64(a) -> np.ndarray:
    """``a`` as a float64 array (bfloat16 and float16 too: every value is exact in float64)."""
    return np.asarray(a).astype(F64, copy=False)


def bn_scale_shift(
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The eval-mode BatchNorm as ``x * scale + shift`` per channel, in float64:
    ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale`` (``gamma`` and
    ``beta`` ``None``: 1 and 0, a BatchNorm without ``affine``).

    Raises:
        ValueError: ``var + eps`` is not positive for every channel, or the scale or
        shift is not finite (NaN or infinite statistics).
    """
    mean, var = as_f64(mean).reshape(-1), as_f64(var).reshape(-1)
    gamma = np.ones_like(mean) if gamma is None else as_f64(gamma).reshape(-1)
    beta = np.zeros_like(mean) if beta is None else as_f64(beta).reshape(-1)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        denom = var + float(eps)
        if not bool(np.all(denom > 0)):
            raise ValueError("running_var + eps is not positive for every channel")
        scale = gamma / np.sqrt(denom)
        shift = beta - mean * scale
    if not (np.isfinite(scale).all() and np.isfinite(shift).all()):
        raise ValueError("BatchNorm statistics or parameters are not finite")
    return scale, shift


def bias64(bias: np.ndarray | None, out: int) -> np.ndarray:
    """A layer's bias in float64, zeros for a layer without one (a folded layer always has
    a bias: the BatchNorm's shift)."""
    return np.zeros(out, dtype=F64) if bias is None else as_f64(bias).reshape(-1)


def fold_into_preceding(
    weight: np.ndarray, bias: np.ndarray | None, scale: np.ndarray, shift: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(W', b')`` with ``layer'(x) == bn(layer(x))``: ``W' = W * s`` per output row
    (axis 0 of a Linear ``(out, in)`` or Conv ``(out, in/groups, *k)`` weight) and
    ``b' = b * s + t == (b - mean) * s + beta``. A one-channel BN is a scalar affine map
    and broadcasts over every output.

    Raises:
        ValueError: the BN has neither 1 channel nor one per output row.
    """
    out = weight.shape[0]
    if scale.size not in (out, 1):
        raise ValueError(f"BatchNorm has {scale.size} channels but the layer has {out} outputs")
    s = np.broadcast_to(scale, (out,))
    new_w = _times(weight, s.reshape(-1, *([1] * (weight.ndim - 1))))
    return new_w, bias64(bias, out) * s + np.broadcast_to(shift, (out,))


def _times(weight: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """``weight * factor`` in float64, without a float64 copy of ``weight`` first (numpy
    converts it chunk by chunk inside the multiply: resnet50's weights are 200 MB as
    doubles)."""
    weight = np.asarray(weight)
    if weight.dtype.kind != "f":  # bfloat16 (ml_dtypes) and the like: convert first
        weight = as_f64(weight)
    return np.multiply(weight, factor, dtype=F64)


def _per_input(v: np.ndarray, out: int, in_per_group: int, groups: int) -> np.ndarray:
    """A per-input-channel ``(C_in,)`` vector laid out as ``(out, C_in/groups)``, aligned
    with a (grouped) weight: output ``o`` of group ``g`` reads inputs ``g*ipg .. (g+1)*ipg``."""
    if v.size == 1:
        return np.broadcast_to(v.reshape(1, 1), (out, in_per_group))
    shape = (groups, out // groups, in_per_group)
    return np.broadcast_to(v.reshape(groups, 1, in_per_group), shape).reshape(out, in_per_group)


def fold_into_following(
    weight: np.ndarray,
    bias: np.ndarray | None,
    scale: np.ndarray,
    shift: np.ndarray,
    groups: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """``(W', b')`` with ``layer'(x) == layer(bn(x))``: ``W' = W * s`` along the input axis
    and ``b' = b + W @ t`` (a Conv: ``b + sum(W * t)`` over input channels and kernel
    positions). For a Conv exact only when it never reads padding zeros (the BN would have
    shifted them): the caller checks that.

    Raises:
        ValueError: the BN has neither 1 channel nor one per layer input.
    """
    out, in_per_group = weight.shape[0], weight.shape[1]
    if scale.size not in (in_per_group * groups, 1):
        inputs = in_per_group * groups
        raise ValueError(f"BatchNorm has {scale.size} channels but the layer takes {inputs} inputs")
    kernel = [1] * (weight.ndim - 2)
    s = _per_input(scale, out, in_per_group, groups).reshape(out, in_per_group, *kernel)
    t = _per_input(shift, out, in_per_group, groups).reshape(out, in_per_group, *kernel)
    return _times(weight, s), bias64(bias, out) + _times(weight, t).reshape(out, -1).sum(axis=1)


def transposed_as_conv_weight(weight: np.ndarray, groups: int) -> np.ndarray:
    """A ConvTranspose weight ``(C_in, C_out/groups, *k)`` laid out output-major as
    ``(C_out, C_in/groups, *k)`` (a pure permutation), so :func:`fold_into_preceding`
    scales its output channels; :func:`conv_as_transposed_weight` undoes it.

    Raises:
        ValueError: the input channels do not split into ``groups``.
    """
    c_in, out_per_group, *kernel = weight.shape
    if c_in % groups:
        raise ValueError(f"{c_in} input channels do not split into {groups} groups")
    grouped = weight.reshape(groups, c_in // groups, out_per_group, *kernel).swapaxes(1, 2)
    return grouped.reshape(groups * out_per_group, c_in // groups, *kernel)


def conv_as_transposed_weight(weight: np.ndarray, groups: int) -> np.ndarray:
    """Inverse of :func:`transposed_as_conv_weight`."""
    c_out, in_per_group, *kernel = weight.shape
    grouped = weight.reshape(groups, c_out // groups, in_per_group, *kernel).swapaxes(1, 2)
    return grouped.reshape(groups * in_per_group, c_out // groups, *kernel)
