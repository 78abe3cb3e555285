"""One rule per fold variant, shaped like onnxscript's rewriter rules: a *pattern* (which
neighbour of the BatchNormalization node, of which op type), a *check* that returns the
reason the fold would not be exact (or ``None``), and a *rewrite*.

The algebra is bnfold's own (:mod:`bnfold.fold.algebra`): float64 throughout, and the new weights
stay float64 in :attr:`Graph.exact` until :meth:`Graph.materialize` casts them once, so a
layer that absorbs two BatchNorms is still cast only once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from bnfold.fold.algebra import (
    INTO_FOLLOWING,
    INTO_PRECEDING,
    bn_scale_shift,
    conv_as_transposed_weight,
    fold_into_following,
    fold_into_preceding,
    transposed_as_conv_weight,
)
from bnfold.fold.onnx.graph import Graph, default_opset


@dataclass(frozen=True)
class BatchNorm:
    """An inference-mode BatchNormalization node with constant parameters."""

    node: onnx.NodeProto
    x: str
    y: str
    scale: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float

    @property
    def channels(self) -> int:
        return int(self.mean.size)

    def scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
        """:func:`bnfold.fold.algebra.bn_scale_shift` of this node (raises ``ValueError``)."""
        return bn_scale_shift(self.mean, self.var, self.eps, self.scale, self.bias)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def read_batchnorm(graph: Graph, node: onnx.NodeProto) -> tuple[BatchNorm | None, str]:
    """The node as a :class:`BatchNorm`, or ``(None, why it is not a fixed affine map)``."""
    if int(_attr(node, "training_mode", 0)) != 0:
        return None, "training_mode=1: it normalises with batch statistics"
    extra = [o for o in node.output[1:] if o]
    if extra and default_opset(graph.model) < 14:
        # BatchNormalization-9 has no training_mode: its optional outputs (running and
        # saved statistics) *are* the switch, and ONNX Runtime then normalises with the
        # batch's statistics even when nothing reads them (torch's TRAINING export)
        return None, (
            "training mode: a BatchNormalization-9 with its statistics outputs"
            f" ({', '.join(extra)}) normalises with batch statistics"
        )
    if int(_attr(node, "spatial", 1)) != 1:
        return None, "spatial=0 (per-element statistics) is not supported"
    if int(_attr(node, "is_test", 1)) != 1:
        return None, "is_test=0: it normalises with batch statistics"
    used = [o for o in node.output[1:] if o and (graph.users(o) or o in graph.graph_outputs)]
    if used:
        return None, f"its running-statistics outputs ({', '.join(used)}) are used"
    if len(node.input) < 5:
        return None, f"expected 5 inputs, got {len(node.input)}"
    values = []
    for role, name in zip(("scale", "B", "input_mean", "input_var"), node.input[1:5], strict=True):
        arr, why = graph.constant(name)
        if arr is None:
            return None, f"non-constant {role}: {why}"
        values.append(np.asarray(arr))
    scale, bias, mean, var = values
    c = mean.size
    if any(v.ndim != 1 or v.size != c for v in values):
        return None, "scale, B, mean and var are not vectors of one length"
    bn = BatchNorm(
        node,
        node.input[0],
        node.output[0],
        scale,
        bias,
        mean,
        var,
        float(_attr(node, "epsilon", 1e-5)),
    )
    try:
        bn.scale_shift()
    except ValueError as e:
        return None, str(e)
    return bn, ""


# ---- helpers shared by the rules -------------------------------------------------------


def _rank_problem(graph: Graph, value: str, bn: BatchNorm, axis_role: str) -> str | None:
    """A BN normalises axis 1; a Gemm/MatMul's feature axis is the last one. They are the
    same axis only on 2-D tensors (or when the BN is one scalar affine map)."""
    if bn.channels == 1:
        return None
    rank = graph.ranks.get(value)
    if rank is None:
        return f"the rank of {value!r} is unknown, so the BN's channel axis cannot be checked"
    if rank != 2:
        return (
            f"the BN normalises axis 1 of a {rank}-D tensor but the {axis_role} is the last"
            " axis: the channel axes differ"
        )
    return None


def _const(graph: Graph, value: str, role: str) -> tuple[np.ndarray | None, str | None]:
    arr, why = graph.constant(value)
    return (arr, None) if arr is not None else (None, f"non-constant {role}: {why}")


def _target_dtype(graph: Graph, value: str) -> np.dtype:
    """The dtype a new weight replacing ``value`` must have (the layer's own)."""
    if value in graph.exact:
        return graph.dtypes[value]
    arr, _ = graph.constant(value)
    return np.asarray(arr).dtype


def _gemm_parts(graph: Graph, gemm: onnx.NodeProto):
    """A Gemm ``alpha * A' @ B' + beta * C`` as ``(W (N, K) float64, bias, dtype)`` or
    ``(None, None, reason)``. The bias is ``beta * C`` as an (N,) row, or as an (M, N)
    matrix when C varies along the rows."""
    b, why = _const(graph, gemm.input[1], "weight B")
    if b is None:
        return None, None, why
    if b.ndim != 2:
        return None, None, f"weight B is {b.ndim}-D"
    w = b.astype(np.float64)
    w = w if int(_attr(gemm, "transB", 0)) else w.T
    w = w * float(_attr(gemm, "alpha", 1.0))
    n = w.shape[0]
    bias = np.zeros(n)
    if len(gemm.input) > 2 and gemm.input[2]:
        c, why = _const(graph, gemm.input[2], "bias C")
        if c is None:
            return None, None, why
        beta = float(_attr(gemm, "beta", 1.0))
        c = c.astype(np.float64)
        if (
            c.ndim > 2
            or (c.ndim == 2 and c.shape[1] not in (1, n))
            or (c.ndim < 2 and c.size not in (1, n))
        ):
            return None, None, f"bias C of shape {list(c.shape)} does not broadcast to (M, {n})"
        if c.ndim == 2 and c.shape[0] != 1:  # one bias row per example row
            bias = np.broadcast_to(c, (c.shape[0], n)) * beta
        else:
            bias = np.broadcast_to(c.reshape(-1), (n,)) * beta
    return w, bias, _target_dtype(graph, gemm.input[1])


def _linear_nodes(
    graph: Graph,
    layer: onnx.NodeProto,
    x: str,
    y: str,
    w: np.ndarray,
    b: np.ndarray,
    dtype: np.dtype,
    two_d: bool,
    trans_a: int = 0,
) -> list[onnx.NodeProto]:
    """``y = x @ w.T + b`` as one Gemm (2-D ``x``) or MatMul + Add (any rank)."""
    base = layer.name or layer.output[0]
    if two_d:
        wn = graph.add_initializer(f"{base}_weight_bnfold", w, dtype)
        bn_ = graph.add_initializer(f"{base}_bias_bnfold", b, dtype)
        return [
            helper.make_node(
                "Gemm", [x, wn, bn_], [y], name=layer.name or None, transA=trans_a, transB=1
            )
        ]
    wn = graph.add_initializer(f"{base}_weight_bnfold", np.ascontiguousarray(w.T), dtype)
    bn_ = graph.add_initializer(f"{base}_bias_bnfold", b, dtype)
    mid = graph.fresh_name(f"{base}_matmul_bnfold")
    return [
        helper.make_node("MatMul", [x, wn], [mid], name=layer.name or None),
        helper.make_node("Add", [mid, bn_], [y], name=graph.fresh_name(f"{base}_bias_add")),
    ]


# ---- the rules ---------------------------------------------------------------------------


class FoldRule:
    """Fold a BatchNormalization into a neighbouring ``layer_op`` node.

    ``direction`` ``into_preceding``: the layer produces the BN's input;
    ``into_following``: the layer is the only reader of the BN's output (as input 0).
    """

    layer_op: str = ""
    direction: str = INTO_PRECEDING

    def match(self, graph: Graph, bn: BatchNorm) -> onnx.NodeProto | None:
        """The pattern: the neighbouring node, if it has this rule's op type."""
        if self.direction == INTO_PRECEDING:
            layer = graph.producer.get(bn.x)
        else:
            users = graph.users(bn.y)
            layer = users[0] if len(users) == 1 else None
        if layer is None or layer.op_type != self.layer_op or layer.domain not in ("", "ai.onnx"):
            return None
        return layer

    def check(self, graph: Graph, bn: BatchNorm, layer: onnx.NodeProto) -> str | None:
        """Why folding would not be exact, or ``None``."""
        if self.direction == INTO_PRECEDING:
            if layer.output[0] != bn.x or len([o for o in layer.output if o]) != 1:
                return f"{bn.x!r} is not the only output of {layer.op_type}"
            return graph.only_user(bn.x, bn.node)
        if bn.y in graph.graph_outputs:
            return f"{bn.y!r} is also a graph output"
        if list(layer.input).count(bn.y) != 1 or layer.input[0] != bn.y:
            return f"{layer.op_type} reads {bn.y!r} other than as its data input"
        return None

    def rewrite(self, graph: Graph, bn: BatchNorm, layer: onnx.NodeProto) -> None:
        raise NotImplementedError

    def _drop_bn(self, graph: Graph, bn: BatchNorm, layer: onnx.NodeProto) -> None:
        """Remove the BN: the layer now writes the BN's output name (preceding), or reads
        the BN's input (following), so graph output names never change."""
        if self.direction == INTO_PRECEDING:
            layer.output[0] = bn.y
        else:
            layer.input[0] = bn.x
        graph.remove(bn.node)


class _ConvLike(FoldRule):
    transposed = False

    def check(self, graph, bn, layer):
        why = super().check(graph, bn, layer)
        if why:
            return why
        w, why = _const(graph, layer.input[1], "weight")
        if w is None:
            return why
        if w.ndim < 3:
            return f"weight is {w.ndim}-D"
        if len(layer.input) > 2 and layer.input[2]:
            b, why = _const(graph, layer.input[2], "bias")
            if b is None:
                return why
        groups = int(_attr(layer, "group", 1))
        if self.direction == INTO_PRECEDING:
            out = w.shape[1] * groups if self.transposed else w.shape[0]
            if bn.channels not in (1, out):
                return f"the BN has {bn.channels} channels but the layer has {out} outputs"
            return None
        if bn.channels not in (1, w.shape[1] * groups):
            return f"the BN has {bn.channels} channels but the conv takes {w.shape[1] * groups}"
        return _padding_problem(layer, w.shape[2:])

    def rewrite(self, graph, bn, layer):
        groups = int(_attr(layer, "group", 1))
        w = graph.constant(layer.input[1])[0]
        has_bias = len(layer.input) > 2 and layer.input[2]
        b = graph.constant(layer.input[2])[0] if has_bias else None
        scale, shift = bn.scale_shift()
        dtype = _target_dtype(graph, layer.input[1])
        if self.direction == INTO_PRECEDING:
            if self.transposed:
                wc = transposed_as_conv_weight(w, groups)
                nw, nb = fold_into_preceding(wc, b, scale, shift)
                nw = conv_as_transposed_weight(nw, groups)
            else:
                nw, nb = fold_into_preceding(w, b, scale, shift)
        else:
            nw, nb = fold_into_following(w, b, scale, shift, groups)
        base = layer.name or layer.output[0]
        wn = graph.add_initializer(f"{base}_weight_bnfold", nw, dtype)
        bn_ = graph.add_initializer(f"{base}_bias_bnfold", nb, dtype)
        x = layer.input[0]
        del layer.input[:]
        layer.input.extend([x, wn, bn_])
        self._drop_bn(graph, bn, layer)


def _padding_problem(conv: onnx.NodeProto, kernel: tuple[int, ...]) -> str | None:
    """The BN's shift becomes a constant input offset; the conv maps it to a constant output
    offset only if it never reads padding zeros (those would not be shifted)."""
    auto_pad = _attr(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    dilations = list(_attr(conv, "dilations", [1] * len(kernel)))
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if all(d * (k - 1) == 0 for d, k in zip(dilations, kernel, strict=True)):
            return None
        return (
            f"the conv zero-pads its input (auto_pad={auto_pad}); the BN shift would not"
            " reach the padding"
        )
    pads = list(_attr(conv, "pads", []))
    if auto_pad == "NOTSET" and any(int(p) != 0 for p in pads):
        return (
            f"the conv zero-pads its input (pads={pads}); the BN shift would not reach the"
            " padding, so folding forward is not exact"
        )
    return None


class ConvBn(_ConvLike):
    """Conv (1-3-D, any group/stride/dilation/padding) -> BN: scale the output channels."""

    layer_op = "Conv"


class ConvTransposeBn(_ConvLike):
    """ConvTranspose -> BN: scale the output channels (axis 1 of each group's weight)."""

    layer_op = "ConvTranspose"
    transposed = True


class BnConv(_ConvLike):
    """BN -> Conv that never reads padding zeros: scale the input channels, push the
    shift through the kernel into the bias."""

    layer_op = "Conv"
    direction = INTO_FOLLOWING


def _matmul_parts(graph: Graph, layer: onnx.NodeProto):
    """A MatMul's constant 2-D right operand as ``(W (N, K) float64, None, dtype)`` or
    ``(None, None, reason)``."""
    b, why = _const(graph, layer.input[1], "weight (second MatMul input)")
    if b is None:
        return None, None, why
    if b.ndim != 2:
        return None, None, f"the weight is {b.ndim}-D, not a 2-D matrix"
    return b.astype(np.float64).T, None, _target_dtype(graph, layer.input[1])


class _LinearLike(FoldRule):
    """A Gemm or MatMul seen as ``y = x @ W.T + b`` with a constant ``W`` of shape (N, K)."""

    def parts(self, graph: Graph, layer: onnx.NodeProto):
        """``(W, b or None, dtype)``, or ``(None, None, reason)``."""
        raise NotImplementedError

    def axis_problem(self, graph: Graph, bn: BatchNorm, layer: onnx.NodeProto) -> str | None:
        return None

    def two_d(self, graph: Graph, bn: BatchNorm, layer: onnx.NodeProto) -> bool:
        """Whether the result may be one Gemm (2-D input), else MatMul + Add."""
        return True

    def check(self, graph, bn, layer):
        why = super().check(graph, bn, layer) or self.axis_problem(graph, bn, layer)
        if why:
            return why
        w, _, why = self.parts(graph, layer)
        if w is None:
            return why
        n, k = w.shape
        if self.direction == INTO_PRECEDING and bn.channels not in (1, n):
            return f"the BN has {bn.channels} channels but the {self.layer_op} has {n} outputs"
        if self.direction == INTO_FOLLOWING and bn.channels not in (1, k):
            return f"the BN has {bn.channels} channels but the {self.layer_op} takes {k} inputs"
        return None

    def rewrite(self, graph, bn, layer):
        w, b, dtype = self.parts(graph, layer)
        rows = b is not None and b.ndim == 2  # a Gemm C with one bias row per example row
        vector = None if b is None or rows else b
        scale, shift = bn.scale_shift()
        if self.direction == INTO_PRECEDING:
            nw, nb = fold_into_preceding(w, vector, scale, shift)
            x, y = layer.input[0], bn.y
            if rows:  # bn(C) row by row: C's transpose is scaled like a weight, plus the shift
                ct, row_shift = fold_into_preceding(b.T, None, scale, shift)
                nb = ct.T + row_shift
        else:
            nw, nb = fold_into_following(w, vector, scale, shift)
            x, y = bn.x, layer.output[0]
            if rows:  # the shift pushed through W is added to every row of C
                nb = b.astype(np.float64) + nb
        two_d = self.two_d(graph, bn, layer)
        trans_a = int(_attr(layer, "transA", 0))
        new = _linear_nodes(graph, layer, x, y, nw, nb, dtype, two_d, trans_a)
        graph.remove(bn.node)
        graph.replace(layer, new)


class GemmBn(_LinearLike):
    """Gemm (any transA/transB/alpha/beta, C one broadcast row) -> BN."""

    layer_op = "Gemm"

    def parts(self, graph, layer):
        return _gemm_parts(graph, layer)


class BnGemm(GemmBn):
    """BN -> Gemm with transA=0: scale B's input rows, push the shift into C."""

    direction = INTO_FOLLOWING

    def axis_problem(self, graph, bn, layer):
        if int(_attr(layer, "transA", 0)) and bn.channels != 1:
            return "transA=1: the BN's channels are the Gemm's rows, not its inputs"
        return None


class MatMulBn(_LinearLike):
    """MatMul with a constant 2-D weight -> BN whose channel axis is the product's last."""

    layer_op = "MatMul"

    def parts(self, graph, layer):
        return _matmul_parts(graph, layer)

    def axis_problem(self, graph, bn, layer):
        return _rank_problem(graph, bn.x, bn, "MatMul's output-feature axis")

    def two_d(self, graph, bn, layer):
        return graph.ranks.get(bn.x) == 2 and graph.ranks.get(layer.input[0]) == 2


class BnMatMul(MatMulBn):
    """BN on a 2-D input -> MatMul with a constant 2-D weight: scale the weight's rows,
    push the shift through as a bias."""

    direction = INTO_FOLLOWING

    def axis_problem(self, graph, bn, layer):
        return _rank_problem(graph, bn.x, bn, "MatMul's input-feature axis")

    def two_d(self, graph, bn, layer):
        return graph.ranks.get(bn.x) == 2


# Tried in this order: into the preceding layer first (it never needs a padding check).
RULES: tuple[FoldRule, ...] = (
    ConvBn(),
    ConvTransposeBn(),
    GemmBn(),
    MatMulBn(),
    BnConv(),
    BnGemm(),
    BnMatMul(),
)
