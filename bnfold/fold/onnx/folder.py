"""Fold every exactly-foldable BatchNormalization node of an ONNX model; say what was left.

For each BatchNormalization node, in graph order, the rules of :mod:`bnfold.fold.onnx.rules`
are tried: first into the layer that produces its input, then into the layer that alone
reads its output. A node no rule can fold stays, with one deterministic reason per
direction. The result keeps the graph's inputs, outputs, opset and metadata.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import onnx
import onnx.inliner

from bnfold.fold.algebra import INTO_FOLLOWING, INTO_PRECEDING
from bnfold.fold.onnx.graph import Graph, default_opset, detach_dtype_reads, prune
from bnfold.fold.onnx.rules import RULES, read_batchnorm
from bnfold.io.onnx_files import ModelApart, weights_apart

MIN_OPSET = 9  # BatchNormalization-9 dropped the `spatial` attribute; earlier ones differ


@dataclass(frozen=True)
class FoldedNode:
    """A BatchNormalization folded into ``layer`` (``layer_op``) in ``direction``."""

    bn: str
    layer: str
    layer_op: str
    direction: str


@dataclass(frozen=True)
class LeftNode:
    bn: str
    reason: str


@dataclass
class OnnxFoldReport:
    batchnorms: int = 0
    folded: list[FoldedNode] = field(default_factory=list)
    left: list[LeftNode] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return not self.left

    def to_dict(self) -> dict:
        d = asdict(self)
        d["complete"] = self.complete
        return d

    def format(self) -> str:
        lines = [f"folded {len(self.folded)} of {self.batchnorms} BatchNormalization node(s)"]
        for f in self.folded:
            arrow = (
                f"{f.layer} ({f.layer_op}) <- {f.bn}"
                if f.direction == INTO_PRECEDING
                else f"{f.bn} -> {f.layer} ({f.layer_op})"
            )
            lines.append(f"  folded  {arrow}  ({f.direction.replace('_', ' ')})")
        for s in self.left:
            lines.append(f"  left    {s.bn}: {s.reason}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _label(node: onnx.NodeProto) -> str:
    return node.name or f"(unnamed {node.op_type} -> {node.output[0]})"


def _no_neighbour(graph: Graph, bn, direction: str) -> str:
    """Why no rule even matched in ``direction`` (the neighbour is not a foldable layer)."""
    if direction == INTO_PRECEDING:
        src = graph.producer.get(bn.x)
        if src is None:
            return f"preceding: its input {bn.x!r} is not computed by a layer"
        return (
            f"preceding: its input comes from {src.op_type} node {_label(src)!r}, not a"
            " Conv/ConvTranspose/Gemm/MatMul"
        )
    users = graph.users(bn.y)
    if bn.y in graph.graph_outputs:
        return "following: its output is a graph output"
    if len(users) != 1:
        return f"following: its output is read by {len(users)} nodes, so the BN cannot be removed"
    u = users[0]
    return f"following: its output goes to {u.op_type} node {_label(u)!r}, not a Conv/Gemm/MatMul"


def _fold_once(
    model: ModelApart, excluded: dict[str, str]
) -> tuple[ModelApart, OnnxFoldReport, dict[str, str]]:
    work = onnx.ModelProto()
    work.CopyFrom(model.structure)  # the weights stay apart: shared, never copied
    arrays = dict(model.arrays)
    report = OnnxFoldReport()
    report.notes.extend(canonicalize(work, arrays))
    graph = Graph(work, arrays)
    graph.infer_ranks()
    writes: dict[str, str] = {}  # new weight name -> BN label, to undo an overflowing fold
    opset = default_opset(work)
    for node in list(graph.nodes):
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        report.batchnorms += 1
        name = _label(node)
        if opset < MIN_OPSET:
            report.left.append(LeftNode(name, f"opset {opset} < {MIN_OPSET} is not supported"))
            continue
        if name in excluded:
            report.left.append(LeftNode(name, excluded[name]))
            continue
        bn, why = read_batchnorm(graph, node)
        if bn is None:
            report.left.append(LeftNode(name, why))
            continue
        reasons: list[str] = []
        done = False
        for direction in (INTO_PRECEDING, INTO_FOLLOWING):
            matched = False
            for rule in (r for r in RULES if r.direction == direction):
                layer = rule.match(graph, bn)
                if layer is None:
                    continue
                matched = True
                why = rule.check(graph, bn, layer)
                if why:
                    side = direction.removeprefix("into_")
                    reasons.append(f"{side}: {layer.op_type} {_label(layer)!r}: {why}")
                    continue
                before = set(graph.exact)
                layer_name = _label(layer)
                rule.rewrite(graph, bn, layer)
                writes.update({w: name for w in set(graph.exact) - before})
                graph.touch(layer)  # rewired in place (or replaced: then a no-op)
                graph.refresh()
                report.folded.append(FoldedNode(name, layer_name, rule.layer_op, direction))
                done = True
                break
            if done:
                break
            if not matched:
                reasons.append(_no_neighbour(graph, bn, direction))
        if not done:
            report.left.append(LeftNode(name, "; ".join(reasons)))
    overflow = graph.materialize()
    graph.commit()
    prune(work, arrays)
    bad = {writes[w]: why for w, why in overflow.items() if w in writes}
    return ModelApart(work, arrays), report, bad


def canonicalize(model: onnx.ModelProto, arrays: dict) -> list[str]:
    """Bring exporter variants to one form, in place, without changing the function:
    local functions called by the main graph are inlined (a BN inside a function is not
    reachable otherwise; the legacy exporter's ``export_modules_as_functions`` and
    function-based exporters write them), and parameters computed from an activation's
    dtype become initializers (:func:`detach_dtype_reads`; ``arrays``: the weights held
    apart). Returns notes for the report."""
    notes = []
    called = {(n.domain, n.op_type) for n in model.graph.node}
    local = [f for f in model.functions if (f.domain, f.name) in called]
    if local:
        inlined = onnx.inliner.inline_local_functions(model)
        model.CopyFrom(inlined)
        notes.append(f"inlined {len(local)} local function(s) to reach the BNs inside them")
    detach_dtype_reads(model, arrays)  # no note: the same constants, stored instead of computed
    return notes


def fold_onnx(model: onnx.ModelProto) -> tuple[onnx.ModelProto, OnnxFoldReport]:
    """Fold the model's BatchNormalization nodes; the input model is left untouched.

    Returns ``(folded_model, report)``. The folded model has the same graph inputs and
    outputs (names, dtypes, shapes), opset imports and metadata; only BN nodes, the
    weights they were folded into and constants nothing reads any more change.
    """
    folded, report = fold_apart(weights_apart(model))
    return folded.whole(), report


def fold_apart(model: ModelApart) -> tuple[ModelApart, OnnxFoldReport]:
    """:func:`fold_onnx` of a model whose weights are held apart; so is the result's (the
    weights no BN touched are the very same arrays)."""
    t0 = time.perf_counter()
    excluded: dict[str, str] = {}
    while True:
        folded, report, bad = _fold_once(model, excluded)
        if not bad:  # a fold that overflows the weight dtype is undone and refused
            break
        excluded.update(bad)
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in model.structure.graph.node
        for a in n.attribute
    ):
        report.notes.append("BatchNorms inside subgraphs (If/Loop/Scan bodies) are not folded")
    report.seconds = round(time.perf_counter() - t0, 4)
    return folded, report
