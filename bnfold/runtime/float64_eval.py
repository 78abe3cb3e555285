"""A float64 evaluator for ONNX graphs: the truth bnfold's ONNX verification judges against.

Why not ONNX Runtime: it has no double kernels for Conv, pools and most vision operators.
Why not plain ``onnx.reference``: it is a pure-Python evaluator whose Conv is a slow
im2col (resnet50 at 224x224 took ~10 s, inception_v3 ~90 s), it keeps every intermediate
alive until the end (deeplabv3 went past 20 GB), and it is wrong where it matters most:
its BatchNormalization at opsets 9-13 mixes batch statistics into the running ones (so a
wrongly folded channel can look right) and its MaxPool with ``ceil_mode`` returns the
wrong shape.

So: ``onnx.reference`` still builds one kernel per node (it knows every ONNX operator),
but the heavy or wrong ones are replaced (:func:`replaced_ops`), and the graph walk is
our own: every value is dropped after its last reader, so peak memory is the live
activations plus the parameters, in double.

- numpy float64 kernels: Conv (any number of spatial axes, groups, dilations, strides,
  pads/auto_pad: padded once, an im2col matrix of at most :data:`COLUMN_BUDGET`
  elements and one batched BLAS matmul over the groups per chunk; depthwise as shifted
  slices times per-channel weights), MaxPool and AveragePool (ceil_mode, asymmetric pads,
  count_include_pad, with ONNX Runtime's output sizes and divisors), BatchNormalization
  with the semantics ONNX Runtime implements at every opset, MatMul of a stack by a
  matrix as one BLAS product, Erf in double (onnx.reference's rounds it to float32),
  Resize (linear, and the nearest mode torch exports: :func:`resize`).
- a torch float64 kernel, imported only when such a node runs (``import torch`` costs
  ~2 s): ConvTranspose.
- ``onnx.reference``'s own kernel: everything else, and what the above do not cover
  (non-floating inputs, MaxPool's ``Indices`` output, dilated AveragePool, cubic or
  antialiased Resize and its other nearest modes).

The graph is first turned to double by :func:`double_nodes`: every floating tensor
(float32, float16, bfloat16) becomes float64, so a float16 graph gets a float64 truth too.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

# element types that become DOUBLE in the float64 copy
FLOAT_TYPES = (1, 10, 16, 11)  # TensorProto.FLOAT, FLOAT16, BFLOAT16, DOUBLE

Progress = Callable[[int, int], None]  # (nodes done, nodes in all)


def _is_float_type(elem_type: int) -> bool:
    return elem_type in FLOAT_TYPES


def _double_tensor(t: onnx.TensorProto) -> None:
    """Turn a floating TensorProto into DOUBLE in place (values exactly preserved)."""
    from onnx import TensorProto, numpy_helper

    if _is_float_type(t.data_type) and t.data_type != TensorProto.DOUBLE:
        a = numpy_helper.to_array(t).astype(np.float64)
        t.CopyFrom(numpy_helper.from_array(a, t.name))


def double_nodes(graph: onnx.GraphProto, *, initializers: bool = True) -> None:
    """Make ``graph`` (in place, subgraphs too) compute in double: floating value types,
    tensor attributes (``Constant`` values and the like), ``Cast``/``dtype`` targets and,
    when ``initializers``, the floating initializers."""
    import onnx
    from onnx import TensorProto

    if initializers:
        for init in graph.initializer:
            _double_tensor(init)
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        tt = value.type.tensor_type
        if _is_float_type(tt.elem_type):
            tt.elem_type = TensorProto.DOUBLE
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            _constant_as_tensor(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                _double_tensor(attr.t)
            elif attr.type == onnx.AttributeProto.GRAPH:
                double_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    double_nodes(g)
            elif (
                attr.name in ("to", "dtype")
                and attr.type == onnx.AttributeProto.INT
                and _is_float_type(attr.i)
            ):
                attr.i = TensorProto.DOUBLE


def _constant_as_tensor(node: onnx.NodeProto) -> None:
    """``Constant(value_float[s]=...)`` as a tensor ``value`` (made double with the rest):
    its float attribute would otherwise come out as float32."""
    from onnx import helper

    for attr in list(node.attribute):
        if attr.name in ("value_float", "value_floats"):
            values = [attr.f] if attr.name == "value_float" else list(attr.floats)
            shape = [] if attr.name == "value_float" else [len(values)]
            node.attribute.remove(attr)
            node.attribute.append(
                helper.make_attribute("value", helper.make_tensor("value", 1, shape, values))
            )


def to_double(value: np.ndarray) -> np.ndarray:
    """A floating array (float16/32, bfloat16) as float64; anything else unchanged."""
    a = np.asarray(value)
    if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
        return a.astype(np.float64, copy=False)
    return a


# ---- geometry -----------------------------------------------------------------------------


def _ints(v, n: int, default: int) -> list[int]:
    return [int(x) for x in v] if v is not None and len(v) else [default] * n


def _text(v) -> str:
    if v is None:
        return "NOTSET"
    return v.decode() if isinstance(v, bytes) else str(v)


def explicit_pads(
    sizes: list[int],
    extents: list[int],
    strides: list[int],
    pads,
    auto_pad,
) -> tuple[list[int], list[int]]:
    """(begin, end) padding per spatial axis from ONNX ``pads``/``auto_pad``; ``extents``
    are the dilated kernel sizes ``(k - 1) * d + 1``. SAME_* pads so the output has
    ``ceil(size / stride)`` positions, the odd one at the end (UPPER) or start (LOWER)."""
    n = len(sizes)
    mode = _text(auto_pad)
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, ext, s in zip(sizes, extents, strides, strict=True):
            total = max(0, (-(-size // s) - 1) * s + ext - size)
            small, big = total // 2, total - total // 2
            begin.append(small if mode == "SAME_UPPER" else big)
            end.append(big if mode == "SAME_UPPER" else small)
        return begin, end
    if mode == "VALID" or pads is None or not len(pads):
        return [0] * n, [0] * n
    p = [int(x) for x in pads]
    return p[:n], p[n:]


def pooled_size(size: int, begin: int, end: int, ext: int, stride: int, ceil: bool) -> int:
    """Output length of a pool over ``size`` (ONNX and ONNX Runtime): with ``ceil_mode`` a
    window may run off the end but must start inside the input or the left padding."""
    span = size + begin + end - ext
    out = (-(-span // stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= size + begin:
        out -= 1
    return out


def _window_geometry(X: np.ndarray, kernel, a: dict) -> tuple[list[int], ...]:
    """Strides, dilations and the explicit (begin, end) padding of a Conv or pool node
    with attributes ``a`` over ``X`` (``pads`` or ``auto_pad``)."""
    n = len(kernel)
    strides = _ints(a.get("strides"), n, 1)
    dil = _ints(a.get("dilations"), n, 1)
    ext = [(k - 1) * d + 1 for k, d in zip(kernel, dil, strict=True)]
    begin, end = explicit_pads(list(X.shape[2:]), ext, strides, a.get("pads"), a.get("auto_pad"))
    return strides, dil, begin, end


def _padded(X: np.ndarray, begin: list[int], end: list[int], value: float = 0.0) -> np.ndarray:
    """``X`` with ``begin``/``end`` elements of ``value`` around its spatial axes (a
    negative count crops)."""
    kept = tuple(
        slice(max(-b, 0), size + min(e, 0))
        for size, b, e in zip(X.shape[2:], begin, end, strict=True)
    )
    X = X[(slice(None), slice(None), *kept)]
    widths = [(max(b, 0), max(e, 0)) for b, e in zip(begin, end, strict=True)]
    if not any(b or e for b, e in widths):
        return X
    return np.pad(X, [(0, 0), (0, 0), *widths], constant_values=value)


def _output_sizes(sizes, kernel, strides, dil) -> list[int]:
    """Window positions along each axis of an (already padded) input."""
    return [
        (size - (k - 1) * d - 1) // s + 1
        for size, k, d, s in zip(sizes, kernel, dil, strides, strict=True)
    ]


def _shifted(x: np.ndarray, kernel, strides, dil, outs):
    """(offset, view) per kernel offset: the elements of ``x`` that kernel offset reads,
    one per output position (a strided view, no copy)."""
    for offset in itertools.product(*(range(k) for k in kernel)):
        window = tuple(
            slice(o * d, o * d + (m - 1) * s + 1, s)
            for o, d, m, s in zip(offset, dil, outs, strides, strict=True)
        )
        yield offset, x[(slice(None), slice(None), *window)]


# ---- numpy float64 kernels ----------------------------------------------------------------

# the most elements of one im2col matrix (32 MB of doubles, one buffer reused): a larger
# layer (a 3-D video conv, a wide dilated one) is done in chunks of samples or of output
# rows along the first spatial axis, each a large enough matmul for BLAS
COLUMN_BUDGET = 1 << 22


def conv(X: np.ndarray, W: np.ndarray, B: np.ndarray | None, a: dict) -> np.ndarray:
    """ONNX Conv in the dtype of ``X`` (any number of spatial axes, groups, dilations,
    strides, pads/auto_pad): padded once, then one batched BLAS matmul over an im2col
    matrix per chunk, or shifted slices times per-channel weights when every group has
    one input channel (depthwise). Kernel taps that read only padding are left out (a
    rate-36 ASPP conv over 33x33 is a 1x1 conv)."""
    kernel = list(W.shape[2:])
    strides, dil, begin, end = _window_geometry(X, kernel, a)
    outs = _output_sizes(
        [s + b + e for s, b, e in zip(X.shape[2:], begin, end, strict=True)], kernel, strides, dil
    )
    taps = [
        _reading_taps(k, d, s, o, b, size)
        for k, d, s, o, b, size in zip(kernel, dil, strides, outs, begin, X.shape[2:], strict=True)
    ]
    N, M = X.shape[0], W.shape[0]
    if any(lo >= hi for lo, hi in taps):  # every window lies in the padding
        y = np.zeros((N, M, *outs), dtype=X.dtype)
    else:
        W = W[(slice(None), slice(None), *(slice(lo, hi) for lo, hi in taps))]
        # the trimmed kernel's windows start at the first reading tap, and the input ends
        # with the last window (a negative pad crops)
        begin = [b - lo * d for b, (lo, _), d in zip(begin, taps, dil, strict=True)]
        end = [
            (o - 1) * s + (k - 1) * d + 1 - size - b
            for o, s, k, d, size, b in zip(
                outs, strides, W.shape[2:], dil, X.shape[2:], begin, strict=True
            )
        ]
        x = _padded(X, begin, end)
        group = int(a.get("group") or 1)
        if W.shape[1] == 1 and group > 1:
            y = _depthwise(x, W, strides, dil, outs)
        else:
            y = _im2col(x, W, strides, dil, outs, group)
    if B is not None:
        y += B.reshape(1, -1, *([1] * len(kernel)))
    return y


def _reading_taps(k: int, d: int, s: int, out: int, begin: int, size: int) -> tuple[int, int]:
    """The kernel offsets [lo, hi) along an axis whose ``out`` window positions read at
    least one input element (the input spans ``[begin, begin + size)`` of the padded
    axis, tap ``o`` of window ``j`` reads ``j*s + o*d``)."""
    reading = [
        o
        for o in range(k)
        if (first := max(0, -(-(begin - o * d) // s))) < out and first * s + o * d < begin + size
    ]
    return (reading[0], reading[-1] + 1) if reading else (0, 0)


def _im2col(x: np.ndarray, W: np.ndarray, strides, dil, outs, group: int) -> np.ndarray:
    n = len(outs)
    N, C = x.shape[:2]
    M, cg = W.shape[:2]
    K = math.prod(W.shape[2:])
    w = W.reshape(group, M // group, cg * K)
    if K == 1 and all(s == 1 for s in strides):  # 1x1: the input is the column matrix
        return np.matmul(w, x.reshape(N, group, cg, -1)).reshape(N, M, *outs)
    ext = [(k - 1) * d + 1 for k, d in zip(W.shape[2:], dil, strict=True)]
    view = np.lib.stride_tricks.sliding_window_view(x, ext, axis=tuple(range(2, 2 + n)))
    positions = (slice(0, (o - 1) * s + 1, s) for o, s in zip(outs, strides, strict=True))
    view = view[(slice(None), slice(None), *positions)]
    view = view[(..., *(slice(None, None, d) for d in dil))]  # (N, C, *outs, *kernel)
    view = view.reshape(N, group, cg, *view.shape[2:])
    columns = (0, 1, 2, *range(3 + n, 3 + 2 * n), *range(3, 3 + n))  # (N, G, cg, *k, *outs)
    per_row = C * K * math.prod(outs[1:])  # column elements per output row of one sample
    rows = max(1, min(outs[0], COLUMN_BUDGET // per_row))
    samples = min(N, max(1, COLUMN_BUDGET // (per_row * outs[0]))) if rows == outs[0] else 1
    buffer = np.empty(samples * rows * per_row, dtype=x.dtype)
    y = np.empty((N, group, M // group, *outs), dtype=x.dtype)
    for i in range(0, N, samples):
        for r in range(0, outs[0], rows):
            part = view[i : i + samples, :, :, r : r + rows].transpose(columns)
            cols = buffer[: part.size].reshape(part.shape)
            np.copyto(cols, part)  # the im2col copy
            target = y[i : i + samples, :, :, r : r + rows]
            product = np.matmul(w, cols.reshape(*part.shape[:2], cg * K, -1))
            target[...] = product.reshape(target.shape)
    return y.reshape(N, M, *outs)


def _depthwise(x: np.ndarray, W: np.ndarray, strides, dil, outs) -> np.ndarray:
    """A conv with one input channel per group: a sum of shifted, strided slices times
    per-channel weights (a depth multiplier ``m``: input channel ``c`` feeds output
    channels ``c*m .. c*m + m-1``)."""
    n = len(outs)
    N, C = x.shape[:2]
    mult = W.shape[0] // C
    w = W.reshape(C, mult, *W.shape[2:])
    y = np.zeros((N, C, mult, *outs), dtype=x.dtype)
    term = np.empty_like(y)
    for offset, v in _shifted(x, W.shape[2:], strides, dil, outs):
        weight = w[(slice(None), slice(None), *offset)].reshape(1, C, mult, *([1] * n))
        np.multiply(v[:, :, None], weight, out=term)
        y += term
    return y.reshape(N, C * mult, *outs)


def _pool_geometry(X: np.ndarray, kernel: list[int], a: dict):
    """Strides, dilations, the explicit (begin, end) pads, and the end padding that makes
    floor-mode windows over the padded input give exactly ONNX's output (ceil_mode,
    asymmetric pads, auto_pad; negative: crop)."""
    strides, dil, begin, end = _window_geometry(X, kernel, a)
    ext = [(k - 1) * d + 1 for k, d in zip(kernel, dil, strict=True)]
    ceil = bool(a.get("ceil_mode"))
    sizes = list(X.shape[2:])
    outs = [
        pooled_size(sz, b, e, k, s, ceil)
        for sz, b, e, k, s in zip(sizes, begin, end, ext, strides, strict=True)
    ]
    last = [
        (o - 1) * s + k - sz - b
        for o, s, k, sz, b in zip(outs, strides, ext, sizes, begin, strict=True)
    ]
    return strides, dil, begin, end, last, outs


def max_pool(X: np.ndarray, kernel: list[int], a: dict) -> np.ndarray:
    """ONNX MaxPool's ``Y`` (padding never wins: it is -inf)."""
    strides, dil, begin, _, last, outs = _pool_geometry(X, kernel, a)
    x = _padded(X, begin, last, -math.inf)
    y = None
    for _, v in _shifted(x, kernel, strides, dil, outs):
        y = v.copy() if y is None else np.maximum(y, v, out=y)
    return y


def average_pool(X: np.ndarray, kernel: list[int], a: dict) -> np.ndarray:
    """ONNX AveragePool without dilations. Divisor: the window's elements inside the input
    (``count_include_pad=0``) or inside the explicitly padded input (``=1``), never the
    ceil_mode overhang (ONNX Runtime's and torch's rule)."""
    strides, dil, begin, end, last, outs = _pool_geometry(X, kernel, a)
    x = _padded(X, begin, last)
    y = None
    for _, v in _shifted(x, kernel, strides, dil, outs):
        y = v.copy() if y is None else np.add(y, v, out=y)
    divisor = np.ones((), dtype=x.dtype)
    include = bool(a.get("count_include_pad"))
    for size, b, e, k, s, o in zip(X.shape[2:], begin, end, kernel, strides, outs, strict=True):
        lo, hi = (0, b + size + e) if include else (b, b + size)
        start = np.arange(o) * s  # window starts in padded coordinates
        count = np.minimum(start + k, hi) - np.maximum(start, lo)
        divisor = np.multiply.outer(divisor, np.maximum(count, 0).astype(x.dtype))
    return y / divisor


# ---- torch kernels (imported only when a graph has the node) -----------------------------


def _torch(a: np.ndarray):
    import torch

    t = torch.from_numpy(np.ascontiguousarray(a))
    return t if t.dtype == torch.float64 else t.double()


def _pad_list(begin: list[int], end: list[int]) -> list[int]:
    """torch.nn.functional.pad's order: last axis first."""
    out: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        out += [b, e]
    return out


def conv_transpose(X: np.ndarray, W: np.ndarray, B: np.ndarray | None, a: dict) -> np.ndarray:
    """ONNX ConvTranspose (1-3 spatial axes) with torch's float64 kernel."""
    import torch
    import torch.nn.functional as F

    n = W.ndim - 2
    strides = _ints(a.get("strides"), n, 1)
    dil = _ints(a.get("dilations"), n, 1)
    out_pad = _ints(a.get("output_padding"), n, 0)
    group = int(a.get("group") or 1)
    conv_t = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[n]
    with torch.inference_mode():
        # every contribution, unpadded: length s*(in-1) + (k-1)*d + 1 per axis
        full = conv_t(_torch(X), _torch(W), None, strides, 0, 0, group, dil)
    sizes = list(X.shape[2:])
    lengths = [
        s * (i - 1) + (k - 1) * d + 1 + op
        for s, i, k, d, op in zip(strides, sizes, W.shape[2:], dil, out_pad, strict=True)
    ]
    shape = a.get("output_shape")
    mode = _text(a.get("auto_pad"))
    if shape is not None and len(shape) or mode in ("SAME_UPPER", "SAME_LOWER"):
        want = (
            [int(x) for x in shape][-n:]
            if shape is not None and len(shape)
            else [i * s for i, s in zip(sizes, strides, strict=True)]
        )
        total = [ln - w for ln, w in zip(lengths, want, strict=True)]
        upper = mode == "SAME_UPPER"
        begin = [t // 2 if upper else t - t // 2 for t in total]
        end = [t - b for t, b in zip(total, begin, strict=True)]
    else:
        begin, end = explicit_pads(sizes, [1] * n, strides, a.get("pads"), "NOTSET")
    # negative pads crop: drop `begin` at the start, extend by output_padding, drop `end`
    y = F.pad(
        full,
        _pad_list([-b for b in begin], [op - e for op, e in zip(out_pad, end, strict=True)]),
    )
    if B is not None:
        y = y + _torch(B).reshape(1, -1, *([1] * n))
    return y.numpy()


def resize(X: np.ndarray, scales, sizes, a: dict) -> np.ndarray | None:
    """ONNX Resize in ``X``'s dtype, one spatial axis at a time: ``linear`` (1-3-D) with
    ``half_pixel``, ``pytorch_half_pixel``, ``align_corners`` or ``asymmetric``
    coordinates, and ``nearest`` with ``asymmetric`` coordinates and ``floor`` rounding
    (torch's ``interpolate`` exports); ``None`` for anything else (onnx.reference's
    kernel then: cubic, antialias, ``axes``, other coordinate or rounding modes)."""
    n = X.ndim - 2
    if X.dtype.kind != "f" or n not in (1, 2, 3) or a.get("axes") is not None:
        return None
    policy = _text(a.get("keep_aspect_ratio_policy"))
    if a.get("antialias") or policy not in ("stretch", "NOTSET"):
        return None
    mode = _text(a.get("mode"))
    coord = _text(a.get("coordinate_transformation_mode"))
    if coord == "NOTSET":
        coord = "half_pixel"  # the ONNX default
    nearest = mode == "nearest" and coord == "asymmetric"
    if nearest and _text(a.get("nearest_mode")) != "floor":
        return None
    if not nearest and not (mode == "linear" and coord in _LINEAR_COORDINATES):
        return None
    has_scales = scales is not None and len(scales)
    has_sizes = sizes is not None and len(sizes)
    if has_scales == has_sizes:
        return None
    if has_scales:
        factors = [float(f) for f in scales]
        if factors[:2] != [1.0, 1.0] or len(factors) != X.ndim or min(factors) <= 0:
            return None
        outs = [int(math.floor(size * f)) for size, f in zip(X.shape, factors, strict=True)]
    else:
        outs = [int(s) for s in sizes]
        if outs[:2] != list(X.shape[:2]) or len(outs) != X.ndim or min(outs) <= 0:
            return None
        factors = [o / size for o, size in zip(outs, X.shape, strict=True)]
    y = X
    for axis in range(2, X.ndim):
        length, out, factor = X.shape[axis], outs[axis], factors[axis]
        i = np.arange(out, dtype=np.float64)
        if nearest:
            y = np.take(y, np.clip(np.floor(i / factor), 0, length - 1).astype(np.intp), axis)
            continue
        x = _LINEAR_COORDINATES[coord](i, factor, length, out)
        x = np.clip(x, 0, length - 1)
        lo = np.floor(x).astype(np.intp)
        hi = np.minimum(lo + 1, length - 1)
        w = (x - lo).reshape(-1, *([1] * (X.ndim - 1 - axis)))
        y = np.take(y, lo, axis) * (1 - w) + np.take(y, hi, axis) * w
    return y


# input coordinate of output position i along an axis (ONNX's coordinate_transformation_mode)
_LINEAR_COORDINATES = {
    "half_pixel": lambda i, f, length, out: (i + 0.5) / f - 0.5,
    "pytorch_half_pixel": lambda i, f, length, out: (
        (i + 0.5) / f - 0.5 if out > 1 else np.zeros_like(i)
    ),
    "align_corners": lambda i, f, length, out: (
        i * (length - 1) / (out - 1) if out > 1 else np.zeros_like(i)
    ),
    "asymmetric": lambda i, f, length, out: i / f,
}


# ---- the OpRun classes --------------------------------------------------------------------


def _reference_kernel(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(f"onnx.reference.ops.{module}"), name)


def _make_ops() -> list[type]:
    """The OpRun classes (class name = ONNX op type) that replace onnx.reference's; a
    node they do not cover (non-floating input, the MaxPool ``Indices`` output, a
    dilated AveragePool, a Resize mode :func:`resize` does not cover) runs onnx.reference's.

    Over 80 lines on purpose: eight small classes of a few lines each (the arithmetic is
    in the module-level kernels), defined in a function because their bases are
    onnx.reference's, imported only when an evaluator is built."""
    from onnx.reference.op_run import OpRun

    RefConv = _reference_kernel("op_conv", "Conv")
    RefConvTranspose = _reference_kernel("op_conv_transpose", "ConvTranspose")
    RefMaxPool = _reference_kernel("op_max_pool", "MaxPool")
    RefAveragePool = _reference_kernel("op_average_pool", "AveragePool_19")
    RefResize = _reference_kernel("op_resize", "Resize")
    RefMatMul = _reference_kernel("op_matmul", "MatMul")
    RefErf = _reference_kernel("op_erf", "Erf")

    class Conv(RefConv):
        op_domain = ""

        def _run(self, X, W, B=None, **a):
            if X.dtype.kind != "f":
                return super()._run(X, W, B, **a)
            return (conv(X, W, B, a),)

    class ConvTranspose(RefConvTranspose):
        op_domain = ""

        def _run(self, X, W, B=None, **a):
            if W.ndim - 2 not in (1, 2, 3) or X.dtype.kind != "f":
                return super()._run(X, W, B, **a)
            return (conv_transpose(X, W, B, a),)

    class MaxPool(RefMaxPool):
        op_domain = ""

        def _run(self, X, **a):
            if X.dtype.kind != "f" or len(self.onnx_node.output) > 1:
                return super()._run(X, **a)  # the Indices output: onnx.reference's kernel
            return (max_pool(X, [int(k) for k in a["kernel_shape"]], a),)

    class AveragePool(RefAveragePool):
        op_domain = ""

        def _run(self, X, **a):
            kernel = [int(k) for k in a["kernel_shape"]]
            dilated = any(d != 1 for d in _ints(a.get("dilations"), len(kernel), 1))
            if X.dtype.kind != "f" or dilated:
                return super()._run(X, **a)
            return (average_pool(X, kernel, a),)

    class BatchNormalization(OpRun):
        """ONNX Runtime's semantics at every opset: running statistics, unless the node
        is in training mode (``training_mode=1`` from opset 14; before it, more than one
        output, or ``is_test=0`` at opset 6): then the batch's own statistics, and the
        updated running statistics as the extra outputs."""

        op_domain = ""

        def _run(self, X, scale, B, mean, var, **a):
            eps = float(a.get("epsilon") if a.get("epsilon") is not None else 1e-5)
            outputs = [o for o in self.onnx_node.output]
            training = _bn_training(self.onnx_node, a)
            shape = (-1,) + (1,) * (X.ndim - 2)
            if not training:  # (X - mean) * (scale / sqrt(var + eps)) + B, in one buffer
                y = X - mean.reshape(shape)
                y *= (scale / np.sqrt(var + eps)).reshape(shape)
                y += B.reshape(shape)
                return (y,)
            axes = tuple(i for i in range(X.ndim) if i != 1)
            bm, bv = X.mean(axis=axes), X.var(axis=axes)
            y = (X - bm.reshape(shape)) * (scale / np.sqrt(bv + eps)).reshape(shape)
            y = y + B.reshape(shape)
            momentum = float(a.get("momentum") if a.get("momentum") is not None else 0.9)
            extra = [
                mean * momentum + bm * (1 - momentum),
                var * momentum + bv * (1 - momentum),
                bm,
                1 / np.sqrt(bv + eps),  # ONNX Runtime's saved_var: the inverse std
            ]
            return (y, *extra[: len(outputs) - 1])

    class MatMul(RefMatMul):
        """A stack of rows times a matrix as one 2-D BLAS product: numpy's stacked
        matmul over a transposed view (ConvNeXt's channels-last MLPs) runs without BLAS,
        ~50x slower."""

        op_domain = ""

        def _run(self, a, b):
            if a.ndim > 2 and b.ndim == 2 and a.dtype == b.dtype and a.dtype.kind == "f":
                rows = np.ascontiguousarray(a).reshape(-1, a.shape[-1])
                return ((rows @ b).reshape(*a.shape[:-1], b.shape[-1]),)
            return super()._run(a, b)

    class Erf(RefErf):
        """erf in double (onnx.reference's rounds every value to float32)."""

        op_domain = ""

        def _run(self, x):
            if x.dtype != np.float64:
                return super()._run(x)
            return (np.vectorize(math.erf, otypes=[np.float64])(x),)

    class Resize(RefResize):
        op_domain = ""

        def _run(self, X, roi=None, scales=None, sizes=None, **a):
            y = resize(X, scales, sizes, a)
            if y is None:
                return super()._run(X, roi, scales, sizes, **a)
            return (y,)

    return [Conv, ConvTranspose, MaxPool, AveragePool, BatchNormalization, Resize, MatMul, Erf]


def _bn_training(node: onnx.NodeProto, attrs: dict) -> bool:
    """Whether ONNX Runtime runs this BatchNormalization in training mode."""
    if "training_mode" in attrs and attrs["training_mode"] is not None:
        explicit = any(a.name == "training_mode" for a in node.attribute)
        if explicit:
            return bool(attrs["training_mode"])
    if any(a.name == "is_test" for a in node.attribute):
        return not attrs.get("is_test")
    return len([o for o in node.output if o]) > 1


_OPS: list[type] | None = None


def replaced_ops() -> list[type]:
    """The kernels that replace onnx.reference's (built once: the classes subclass
    onnx.reference's, imported only then)."""
    global _OPS
    if _OPS is None:
        _OPS = _make_ops()
    return _OPS


# ---- the evaluator ------------------------------------------------------------------------


def _subgraph_names(graph: onnx.GraphProto) -> set[str]:
    names = set()
    for node in graph.node:
        names.update(node.input)
        names |= _subgraph_reads(node)
    return names


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names the subgraphs of ``node`` (If/Loop/Scan bodies) read from the outer scope."""
    names: set[str] = set()
    for attr in node.attribute:
        if attr.HasField("g"):
            names |= _subgraph_names(attr.g)
        for g in attr.graphs:
            names |= _subgraph_names(g)
    return names


class Float64Evaluator:
    """A model's outputs in float64 (see the module docstring). Build once, run on as
    many input sets as needed. Parameters are kept as stored and converted to double as
    each node reads them (the double copy lives while that node runs: resnet50's 100 MB of
    float32 weights never become 200 MB of doubles at once), except those a subgraph
    reads, converted once here."""

    def __init__(self, model: onnx.ModelProto, arrays: dict[str, np.ndarray] | None = None):
        """``arrays``: initializers of ``model`` already read as arrays (by name), shared
        rather than read again."""
        from onnx import TensorProto, helper
        from onnx.reference import ReferenceEvaluator

        from bnfold.io.onnx_files import stored_array, structure_copy

        arrays = arrays or {}
        skeleton = structure_copy(model)
        g = skeleton.graph
        # parameters are kept as arrays, not in the proto the reference evaluator reads
        self.params: dict[str, np.ndarray] = {}
        from_subgraphs = set().union(*(_subgraph_reads(n) for n in model.graph.node))
        for init in model.graph.initializer:
            value = arrays.get(init.name)
            if value is None:
                value = stored_array(init)
            self.params[init.name] = to_double(value) if init.name in from_subgraphs else value
        declared = {i.name for i in g.input}
        for init in model.graph.initializer:
            if init.name not in declared:
                elem = TensorProto.DOUBLE if _is_float_type(init.data_type) else init.data_type
                g.input.append(helper.make_tensor_value_info(init.name, elem, list(init.dims)))
        del g.initializer[:]
        double_nodes(g, initializers=False)
        self.outputs = [o.name for o in g.output]
        self.inputs = [i.name for i in g.input if i.name not in self.params]
        self._ref = ReferenceEvaluator(skeleton, new_ops=replaced_ops())
        self.nodes = list(self._ref.rt_nodes_)
        self._free = self._release_plan(g)

    def _release_plan(self, g: onnx.GraphProto) -> list[list[str]]:
        """Per node, the values no later node (nor a graph output) reads: freed after it."""
        last: dict[str, int] = {}
        for i, node in enumerate(g.node):
            reads = set(node.input) | _subgraph_reads(node)  # a subgraph reads outer names
            for name in list(reads) + list(node.output):
                last[name] = i
        keep = set(self.outputs) | set(self.params)
        plan: list[list[str]] = [[] for _ in g.node]
        for name, i in last.items():
            if name and name not in keep:
                plan[i].append(name)
        return plan

    def run(self, feeds: dict[str, np.ndarray], progress: Progress | None = None) -> dict:
        """Every graph output in float64 (floating inputs are cast up; others unchanged).
        The im2col matmuls run on numpy's BLAS with its own thread count (no control
        here: ``OPENBLAS_NUM_THREADS`` set before numpy is imported decides it)."""
        return self._walk(feeds, progress)

    def _walk(self, feeds: dict[str, np.ndarray], progress: Progress | None) -> dict:
        values: dict[str, object] = {"": None, **self.params}
        values.update({k: to_double(v) for k, v in feeds.items()})
        params = self.params
        total = len(self.nodes)
        for i, node in enumerate(self.nodes):
            inputs = [to_double(params[n]) if n in params else values[n] for n in node.input]
            if node.need_context():
                outputs = node.run(*inputs, context=values)
            else:
                outputs = node.run(*inputs)
            for name, value in zip(node.output, outputs, strict=False):
                values[name] = value
            for name in self._free[i]:
                values.pop(name, None)
            if progress is not None:
                progress(i + 1, total)
        return {name: to_double(values[name]) for name in self.outputs}


def float64_run(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], progress: Progress | None = None
) -> dict:
    """``model``'s outputs on ``feeds``, computed in float64 (one-shot convenience)."""
    return Float64Evaluator(model).run(feeds, progress)
