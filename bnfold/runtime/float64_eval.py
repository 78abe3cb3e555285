"""A float64 evaluator for ONNX graphs: the truth bnfold's ONNX verification judges against.

Why not ONNX Runtime: it has no double kernels for Conv, pools and most vision operators.
Why not plain ``onnx.reference``: it is a pure-Python evaluator whose Conv is an im2col in
numpy (resnet50 at 224x224 took ~10 s, inception_v3 ~90 s), it keeps every intermediate
alive until the end (deeplabv3 went past 20 GB), and it is wrong where it matters most:
its BatchNormalization at opsets 9-13 mixes batch statistics into the running ones (so a
wrongly folded channel can look right) and its MaxPool with ``ceil_mode`` returns the
wrong shape.

So: ``onnx.reference`` still builds one kernel per node (it knows every ONNX operator),
but the heavy or wrong ones are replaced with torch float64 kernels (:data:`TORCH_OPS`:
Conv, ConvTranspose, MaxPool, AveragePool, BatchNormalization with the semantics ONNX
Runtime implements at every opset, Resize in its common modes), and the graph walk is
our own: every value is dropped after its last reader, so peak memory is the live
activations plus the parameters, in double. Attribute combinations a torch kernel does
not cover fall back to ``onnx.reference``'s own kernel for that node.

The graph is first turned to double by :func:`double_graph`: every floating tensor
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


# ---- torch float64 kernels ----------------------------------------------------------------


def _torch(a: np.ndarray):
    import torch

    t = torch.from_numpy(np.ascontiguousarray(a))
    return t if t.dtype == torch.float64 else t.double()


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


def _pad_list(begin: list[int], end: list[int]) -> list[int]:
    """torch.nn.functional.pad's order: last axis first."""
    out: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        out += [b, e]
    return out


def pooled_size(size: int, begin: int, end: int, ext: int, stride: int, ceil: bool) -> int:
    """Output length of a pool over ``size`` (ONNX and ONNX Runtime): with ``ceil_mode`` a
    window may run off the end but must start inside the input or the left padding."""
    span = size + begin + end - ext
    out = (-(-span // stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= size + begin:
        out -= 1
    return out


def _reference_kernel(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(f"onnx.reference.ops.{module}"), name)


def _make_ops() -> list[type]:
    """The OpRun classes (class name = ONNX op type) that replace onnx.reference's."""
    import torch
    import torch.nn.functional as F

    RefConv = _reference_kernel("op_conv", "Conv")
    RefConvTranspose = _reference_kernel("op_conv_transpose", "ConvTranspose")
    RefMaxPool = _reference_kernel("op_max_pool", "MaxPool")
    RefAveragePool = _reference_kernel("op_average_pool", "AveragePool_19")
    RefResize = _reference_kernel("op_resize", "Resize")
    from onnx.reference.op_run import OpRun

    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
    conv_t = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
    max_pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
    avg_pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}

    class Conv(RefConv):
        op_domain = ""

        def _run(self, X, W, B=None, **a):
            n = W.ndim - 2
            if n not in conv or X.dtype.kind != "f":
                return super()._run(X, W, B, **a)
            strides = _ints(a.get("strides"), n, 1)
            dil = _ints(a.get("dilations"), n, 1)
            ext = [(k - 1) * d + 1 for k, d in zip(W.shape[2:], dil, strict=True)]
            begin, end = explicit_pads(
                list(X.shape[2:]), ext, strides, a.get("pads"), a.get("auto_pad")
            )
            x = _torch(X)
            if any(begin) or any(end):
                x = F.pad(x, _pad_list(begin, end))
            b = None if B is None else _torch(B)
            group = int(a.get("group") or 1)
            with torch.inference_mode():
                if W.shape[1] == 1 and group > 1:
                    y = _depthwise(x, _torch(W), strides, dil, group)
                    y = y if b is None else y + b.reshape(1, -1, *([1] * n))
                else:
                    y = conv[n](x, _torch(W), b, strides, 0, dil, group)
            return (y.numpy(),)

    def _depthwise(x, w, strides, dil, group):
        """A conv with one input channel per group as a sum of shifted, strided slices
        times per-channel weights (torch's float64 path for it is ~100x slower)."""
        n = w.ndim - 2
        mult = w.shape[0] // group
        if mult > 1:  # each input channel feeds `mult` consecutive output channels
            x = x.repeat_interleave(mult, dim=1)
        outs = [
            (size - ((k - 1) * d + 1)) // s + 1
            for size, k, d, s in zip(x.shape[2:], w.shape[2:], dil, strides, strict=True)
        ]
        y = None
        for offset in itertools.product(*(range(k) for k in w.shape[2:])):
            window = tuple(
                slice(o * d, o * d + (m - 1) * s + 1, s)
                for o, d, m, s in zip(offset, dil, outs, strides, strict=True)
            )
            term = x[(slice(None), slice(None), *window)] * w[(slice(None), 0, *offset)].reshape(
                1, -1, *([1] * n)
            )
            y = term if y is None else y.add_(term)
        return y

    class ConvTranspose(RefConvTranspose):
        op_domain = ""

        def _run(self, X, W, B=None, **a):
            n = W.ndim - 2
            if n not in conv_t or X.dtype.kind != "f":
                return super()._run(X, W, B, **a)
            strides = _ints(a.get("strides"), n, 1)
            dil = _ints(a.get("dilations"), n, 1)
            out_pad = _ints(a.get("output_padding"), n, 0)
            group = int(a.get("group") or 1)
            with torch.inference_mode():
                # every contribution, unpadded: length s*(in-1) + (k-1)*d + 1 per axis
                full = conv_t[n](_torch(X), _torch(W), None, strides, 0, 0, group, dil)
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
                _pad_list(
                    [-b for b in begin], [op - e for op, e in zip(out_pad, end, strict=True)]
                ),
            )
            if B is not None:
                y = y + _torch(B).reshape(1, -1, *([1] * n))
            return (y.numpy(),)

    class MaxPool(RefMaxPool):
        op_domain = ""

        def _run(self, X, **a):
            kernel = [int(k) for k in a["kernel_shape"]]
            n = len(kernel)
            if n not in max_pool or X.dtype.kind != "f" or len(self.onnx_node.output) > 1:
                return super()._run(X, **a)  # the Indices output: onnx.reference's kernel
            x, begin, end, strides, dil = _pool_geometry(X, kernel, a)
            x = F.pad(x, _pad_list(begin, end), value=-math.inf)
            with torch.inference_mode():
                y = max_pool[n](x, kernel, strides, 0, dil)
            return (y.numpy(),)

    class AveragePool(RefAveragePool):
        op_domain = ""

        def _run(self, X, **a):
            kernel = [int(k) for k in a["kernel_shape"]]
            n = len(kernel)
            dilated = any(d != 1 for d in _ints(a.get("dilations"), n, 1))
            if n not in avg_pool or X.dtype.kind != "f" or dilated:
                return super()._run(X, **a)
            sizes = list(X.shape[2:])
            x, begin, end, strides, _ = _pool_geometry(X, kernel, a)
            x = F.pad(x, _pad_list(begin, end))
            # divisor: the window's elements inside the input (count_include_pad=0) or
            # inside the explicitly padded input (=1), never the ceil_mode overhang
            ones = torch.ones([1, 1, *sizes], dtype=torch.float64)
            if a.get("count_include_pad"):
                b0, e0 = explicit_pads(sizes, kernel, strides, a.get("pads"), a.get("auto_pad"))
                ones = F.pad(ones, _pad_list(b0, e0), value=1.0)
                mask = F.pad(
                    ones,
                    _pad_list(
                        [b - p for b, p in zip(begin, b0, strict=True)],
                        [e - p for e, p in zip(end, e0, strict=True)],
                    ),
                )
            else:
                mask = F.pad(ones, _pad_list(begin, end))
            with torch.inference_mode():
                y = avg_pool[n](x, kernel, strides) / avg_pool[n](mask, kernel, strides)
            return (y.numpy(),)

    def _pool_geometry(X, kernel, a):
        """Input as torch, the (begin, end) padding that makes an unpadded floor-mode torch
        pool give exactly ONNX's output (ceil_mode, asymmetric pads, auto_pad), strides,
        dilations."""
        n = len(kernel)
        strides = _ints(a.get("strides"), n, 1)
        dil = _ints(a.get("dilations"), n, 1)
        ext = [(k - 1) * d + 1 for k, d in zip(kernel, dil, strict=True)]
        sizes = list(X.shape[2:])
        begin, end = explicit_pads(sizes, ext, strides, a.get("pads"), a.get("auto_pad"))
        ceil = bool(a.get("ceil_mode"))
        outs = [
            pooled_size(sz, b, e, k, s, ceil)
            for sz, b, e, k, s in zip(sizes, begin, end, ext, strides, strict=True)
        ]
        # the end padding that ends the last window exactly (negative: crop)
        end = [
            (o - 1) * s + k - sz - b
            for o, s, k, sz, b in zip(outs, strides, ext, sizes, begin, strict=True)
        ]
        return _torch(X), begin, end, strides, dil

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
            if not training:
                y = (X - mean.reshape(shape)) * (scale / np.sqrt(var + eps)).reshape(shape)
                return (y + B.reshape(shape),)
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

    class Resize(RefResize):
        """torch's interpolate where it computes exactly ONNX's Resize (nearest/floor with
        asymmetric coordinates; linear with half_pixel, pytorch_half_pixel or
        align_corners), onnx.reference's kernel otherwise."""

        op_domain = ""

        def _run(self, X, roi=None, scales=None, sizes=None, **a):
            y = _torch_resize(X, scales, sizes, a)
            if y is None:
                return super()._run(X, roi, scales, sizes, **a)
            return (y,)

    def _torch_resize(X, scales, sizes, a):
        n = X.ndim - 2
        if X.dtype.kind != "f" or n not in (1, 2, 3) or a.get("axes") is not None:
            return None
        if a.get("antialias") or _text(a.get("keep_aspect_ratio_policy")) not in (
            "stretch",
            "NOTSET",
        ):
            return None
        mode = _text(a.get("mode"))
        coord = _text(a.get("coordinate_transformation_mode"))
        has_scales = scales is not None and len(scales)
        has_sizes = sizes is not None and len(sizes)
        if has_scales == has_sizes:
            return None
        if has_scales:
            sc = [float(s) for s in scales]
            if sc[:2] != [1.0, 1.0]:
                return None
            kw = {"scale_factor": sc[2:], "recompute_scale_factor": False}
        else:
            sz = [int(s) for s in sizes]
            if sz[:2] != list(X.shape[:2]):
                return None
            kw = {"size": sz[2:]}
        x = _torch(X)
        with torch.inference_mode():
            if (
                mode == "nearest"
                and coord == "asymmetric"
                and _text(a.get("nearest_mode")) == "floor"
            ):
                return F.interpolate(x, mode="nearest", **kw).numpy()
            if mode == "linear" and coord in ("half_pixel", "pytorch_half_pixel", "align_corners"):
                if coord == "pytorch_half_pixel" and 1 in _out_sizes(X, kw):
                    return None  # pytorch_half_pixel differs from half_pixel at length 1
                if coord == "align_corners" and has_scales:
                    return None  # torch ignores scale_factor's coordinates there
                linear = {1: "linear", 2: "bilinear", 3: "trilinear"}[n]
                out = F.interpolate(x, mode=linear, align_corners=coord == "align_corners", **kw)
                return out.numpy()
        return None

    def _out_sizes(X, kw):
        if "size" in kw:
            return kw["size"]
        return [
            int(math.floor(i * s)) for i, s in zip(X.shape[2:], kw["scale_factor"], strict=True)
        ]

    return [Conv, ConvTranspose, MaxPool, AveragePool, BatchNormalization, Resize]


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


def torch_ops() -> list[type]:
    """The torch-backed kernels (built once: the classes need torch and onnx imported)."""
    global _OPS
    if _OPS is None:
        _OPS = _make_ops()
    return _OPS


# ---- the evaluator ------------------------------------------------------------------------


def _subgraph_names(graph: onnx.GraphProto) -> set[str]:
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            if attr.HasField("g"):
                names |= _subgraph_names(attr.g)
            for g in attr.graphs:
                names |= _subgraph_names(g)
    return names


def _without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without its initializers (copying them first would cost as
    much as the parameters: ~100 MB for resnet50)."""
    import onnx

    out = onnx.ModelProto()
    graph = model.graph
    kept = onnx.GraphProto()
    for name in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(kept, name).extend(getattr(graph, name))
    kept.name = graph.name
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(out, field, getattr(model, field))
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    out.graph.CopyFrom(kept)
    return out


class Float64Evaluator:
    """A model's outputs in float64 (see the module docstring). Build once, run on as
    many input sets as needed; parameters are converted to double once."""

    def __init__(self, model: onnx.ModelProto):
        from onnx import TensorProto, helper, numpy_helper
        from onnx.reference import ReferenceEvaluator

        skeleton = _without_initializers(model)
        g = skeleton.graph
        # parameters are kept as arrays, not in the proto the reference evaluator reads
        self.params: dict[str, np.ndarray] = {}
        for init in model.graph.initializer:
            self.params[init.name] = to_double(numpy_helper.to_array(init))
        declared = {i.name for i in g.input}
        for init in model.graph.initializer:
            if init.name not in declared:
                elem = TensorProto.DOUBLE if _is_float_type(init.data_type) else init.data_type
                g.input.append(helper.make_tensor_value_info(init.name, elem, list(init.dims)))
        del g.initializer[:]
        double_nodes(g, initializers=False)
        self.outputs = [o.name for o in g.output]
        self.inputs = [i.name for i in g.input if i.name not in self.params]
        self._ref = ReferenceEvaluator(skeleton, new_ops=torch_ops())
        self.nodes = list(self._ref.rt_nodes_)
        self._free = self._release_plan(g)

    def _release_plan(self, g: onnx.GraphProto) -> list[list[str]]:
        """Per node, the values no later node (nor a graph output) reads: freed after it."""
        last: dict[str, int] = {}
        for i, node in enumerate(g.node):
            reads = set(node.input)
            for attr in node.attribute:  # a subgraph may read outer values by name
                if attr.HasField("g"):
                    reads |= _subgraph_names(attr.g)
                for sub in attr.graphs:
                    reads |= _subgraph_names(sub)
            for name in list(reads) + list(node.output):
                last[name] = i
        keep = set(self.outputs) | set(self.params)
        plan: list[list[str]] = [[] for _ in g.node]
        for name, i in last.items():
            if name and name not in keep:
                plan[i].append(name)
        return plan

    def run(
        self, feeds: dict[str, np.ndarray], progress: Progress | None = None, threads: int = 1
    ) -> dict:
        """Every graph output in float64 (floating inputs are cast up; others unchanged).

        ``threads``: torch's intra-op threads for the walk (restored afterwards). One by
        default: on a shared 2-core machine two OpenMP threads that must wait for a busy
        core made resnet50's walk 3x slower (1.3 s against 0.4 s), and ONNX Runtime's
        checks next to it run on one thread too."""
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return self._walk(feeds, progress)
        finally:
            torch.set_num_threads(before)

    def _walk(self, feeds: dict[str, np.ndarray], progress: Progress | None) -> dict:
        values: dict[str, object] = {"": None, **self.params}
        values.update({k: to_double(v) for k, v in feeds.items()})
        total = len(self.nodes)
        for i, node in enumerate(self.nodes):
            inputs = [values[name] for name in node.input]
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
        return {name: np.asarray(values[name]) for name in self.outputs}


def float64_run(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], progress: Progress | None = None
) -> dict:
    """``model``'s outputs on ``feeds``, computed in float64 (one-shot convenience)."""
    return Float64Evaluator(model).run(feeds, progress)
