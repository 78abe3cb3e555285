"""Reading an ONNX graph for folding: one loader, constant values, producers and consumers.

Everything here only *reads* the graph except :func:`prune`, which drops what folding left
unused. The fold rules (:mod:`bnfold.fold.onnx.rules`) do the surgery through :class:`Graph`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold.errors import BnfoldError
from bnfold.io.onnx_files import (
    add_weight,
    first_line,
    load_onnx_file,
    stored_array,
    weightless_copy,
)

# Ops whose output is a deterministic, side-effect-free function of constant inputs: a
# weight stored as `Transpose(Cast(initializer))` is as constant as the initializer itself,
# and so is torch's dynamo exporter's zero bias `Expand(CastLike(0, x), Shape(weight))`
# (zeros of a static shape). Each is evaluated by onnx's reference implementation of that
# op in the graph's own dtype, which is what any runtime computes for it (layout ops and
# casts are exact; IEEE arithmetic is correctly rounded elementwise).
CONSTANT_EXPRESSION_OPS = frozenset(
    {
        "Identity",
        "Cast",
        "CastLike",
        "Transpose",
        "Reshape",
        "Unsqueeze",
        "Squeeze",
        "Flatten",
        "Shape",
        "Size",
        "Expand",
        "ConstantOfShape",
        "Concat",
        "Gather",
        "Slice",
        "Tile",
        "Neg",
        "Add",
        "Sub",
        "Mul",
        "Div",
    }
)
# Inputs an op reads only for their dtype (CastLike's target): a non-constant value there
# does not make the result non-constant.
DTYPE_ONLY_INPUTS = {"CastLike": 1}


def load_model(path: str | Path) -> onnx.ModelProto:
    """The one place onnxfold reads an ONNX file: through :func:`load_onnx_file`, so the
    read is bounded and external data is taken only from inside the model's own folder
    (inlined; ONNX Runtime never resolves a location itself), every tensor is checked,
    and weights holding NaN or infinity are refused (nothing computed from them proves
    anything)."""
    loaded = load_onnx_file(path, allow_external_data=True)
    bad = loaded.non_finite
    if bad:
        raise BnfoldError(
            f"{path}: the weights hold NaN or infinite values ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''})"
        )
    return loaded.proto


def default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    return 0


def _subgraph_inputs(node: onnx.NodeProto) -> Iterator[str]:
    """Names read by a node's subgraphs (If/Loop/Scan bodies see the outer scope)."""
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for g in graphs:
            for n in g.node:
                yield from (i for i in n.input if i)
                yield from _subgraph_inputs(n)


@dataclass
class Graph:
    """Index of a model's main graph: producers, consumers, initializers and names.

    Built once; the rules' edits go through :meth:`remove`, :meth:`replace` and
    :meth:`touch` (a node edited in place), and :meth:`refresh` re-indexes only the nodes
    those named, so folding N BatchNorms costs O(N), not N whole-graph rebuilds.
    """

    model: onnx.ModelProto
    # the values of initializers the model holds as stubs (:class:`ModelApart`); new
    # weights go here too
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    graph_inputs: set[str] = field(default_factory=set)
    graph_outputs: set[str] = field(default_factory=set)
    ranks: dict[str, int] = field(default_factory=dict)
    elem_types: dict[str, int] = field(default_factory=dict)  # ONNX dtypes inference knows
    exact: dict[str, np.ndarray] = field(default_factory=dict)  # float64 values of new weights
    dtypes: dict[str, np.dtype] = field(default_factory=dict)  # ... and the dtype each gets
    _names: set[str] = field(default_factory=set)  # every name the graph has used
    _issued: set[str] = field(default_factory=set)  # fresh names given since the last refresh
    # The main graph's nodes in order, as slots: slot i holds what became of original node
    # i (itself, nothing once removed, or the nodes that replaced it), so removing or
    # replacing a node is O(1) and the order stays topological.
    _slots: list[list[onnx.NodeProto]] = field(default_factory=list)
    _slot_of: dict[int, int] = field(default_factory=dict)  # id(node) -> its slot
    _indexed: dict[int, tuple[onnx.NodeProto, tuple[str, ...], tuple[str, ...]]] = field(
        default_factory=dict
    )  # id(node) -> (node, outputs, inputs) as last indexed, to un-index it exactly
    _dirty: dict[int, onnx.NodeProto] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The rules edit these Python objects (identity-stable, unlike a protobuf repeated
        # field); :meth:`commit` writes them back.
        self._slots = [[n] for n in self.model.graph.node]
        self._slot_of = {id(n): i for i, n in enumerate(self.model.graph.node)}
        self.rebuild()

    @property
    def nodes(self) -> list[onnx.NodeProto]:
        """The main graph's nodes, in order (a new list: O(nodes))."""
        return [n for slot in self._slots for n in slot]

    def commit(self) -> None:
        nodes = self.nodes
        copies = [onnx.NodeProto() for _ in nodes]
        for new, old in zip(copies, nodes, strict=True):
            new.CopyFrom(old)
        del self.g.node[:]
        self.g.node.extend(copies)
        self.__post_init__()

    def index(self, node: onnx.NodeProto) -> int:
        """Position of ``node`` in :attr:`nodes` (O(nodes): for messages, not for folding)."""
        return next(i for i, n in enumerate(self.nodes) if n is node)

    def remove(self, node: onnx.NodeProto) -> None:
        slot = self._slots[self._slot_of.pop(id(node))]
        del slot[next(i for i, n in enumerate(slot) if n is node)]
        self._dirty[id(node)] = node

    def replace(self, old: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
        k = self._slot_of.pop(id(old))
        slot = self._slots[k]
        i = next(i for i, n in enumerate(slot) if n is old)
        slot[i : i + 1] = new
        self._dirty[id(old)] = old
        for n in new:
            self._slot_of[id(n)] = k
            self._dirty[id(n)] = n

    def touch(self, *nodes: onnx.NodeProto) -> None:
        """Mark nodes whose inputs or outputs were edited in place (re-indexed by
        :meth:`refresh`)."""
        for n in nodes:
            self._dirty[id(n)] = n

    @property
    def g(self) -> onnx.GraphProto:
        return self.model.graph

    def _unindex(self, key: int) -> None:
        entry = self._indexed.pop(key, None)
        if entry is None:
            return
        node, outputs, inputs = entry
        for o in outputs:
            if self.producer.get(o) is node:
                del self.producer[o]
        for i in inputs:
            users = self.consumers.get(i)
            if users is None:
                continue
            k = next((j for j, u in enumerate(users) if u is node), None)
            if k is not None:
                del users[k]
            if not users:
                del self.consumers[i]

    def _index(self, node: onnx.NodeProto) -> None:
        outputs = tuple(o for o in node.output if o)
        inputs = tuple(i for i in (*node.input, *_subgraph_inputs(node)) if i)
        for o in outputs:
            self.producer[o] = node
        for i in inputs:
            self.consumers.setdefault(i, []).append(node)
        self._indexed[id(node)] = (node, outputs, inputs)
        self._names.update(outputs)
        if node.name:
            self._names.add(node.name)

    def refresh(self) -> None:
        """Re-index the nodes removed, replaced or touched since the last refresh, and
        the initializers (the rules add weights only through :meth:`add_initializer`)."""
        dirty, self._dirty = self._dirty, {}
        # a fresh name not yet in the graph (a weight still in `exact`) may be given again
        # after a refresh: a layer that absorbs a second BN overwrites its own new weight
        self._issued.clear()
        for key, node in dirty.items():
            self._unindex(key)
            if key in self._slot_of:  # still in the graph
                self._index(node)

    def rebuild(self) -> None:
        """Index the whole graph from scratch."""
        g = self.g
        self.producer, self.consumers, self._indexed, self._dirty = {}, {}, {}, {}
        self.initializers = {t.name: t for t in g.initializer}
        self.graph_inputs = {i.name for i in g.input}
        self.graph_outputs = {o.name for o in g.output}
        self._names |= set(self.initializers) | self.graph_inputs
        for n in self.nodes:
            self._index(n)

    def infer_ranks(self) -> None:
        """Ranks (for channel-axis checks) and dtypes (for CastLike) of every value that
        shape inference can tell."""
        try:
            light = weightless_copy(self.model)  # shapes need no weights: 1.7 s -> 0.05 s
            inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False)
        except Exception:  # inference is best effort: unknown ranks refuse the folds needing them
            inferred = self.model
        g = inferred.graph
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            t = vi.type.tensor_type
            if vi.type.HasField("tensor_type") and t.HasField("shape"):
                self.ranks[vi.name] = len(t.shape.dim)
            if vi.type.HasField("tensor_type") and t.elem_type:
                self.elem_types[vi.name] = t.elem_type
        for t in g.initializer:
            self.ranks[t.name] = len(t.dims)
            self.elem_types[t.name] = t.data_type

    def fresh_name(self, base: str) -> str:
        name, k = base, 1
        while name in self._names or name in self._issued:
            name, k = f"{base}_{k}", k + 1
        self._issued.add(name)
        return name

    def users(self, value: str) -> list[onnx.NodeProto]:
        return self.consumers.get(value, [])

    def only_user(self, value: str, node: onnx.NodeProto) -> str | None:
        """Why ``value`` is read by more than ``node`` (or is a graph output), or ``None``."""
        if value in self.graph_outputs:
            return f"{value!r} is also a graph output"
        others = sorted({n.name or n.op_type for n in self.users(value) if n is not node})
        if others:
            return f"{value!r} is also read by {', '.join(others)}"
        return None

    # ---- constants --------------------------------------------------------------------

    def constant(self, value: str) -> tuple[np.ndarray | None, str]:
        """``(array, "")`` when ``value`` is a constant (float64 overlay of a weight we
        wrote, an initializer, a Constant node, or a constant expression of them), else
        ``(None, why not)``."""
        if value in self.exact:
            return self.exact[value], ""
        if value in self.arrays:
            return self.arrays[value], ""
        if value in self.graph_inputs:
            return None, f"{value!r} is a graph input"
        if value in self.initializers:  # a small one, stored in the graph
            return stored_array(self.initializers[value]), ""
        node = self.producer.get(value)
        if node is None:
            return None, f"{value!r} has no producer"
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            return _constant_node_value(node), ""
        if node.op_type in CONSTANT_EXPRESSION_OPS and node.domain in ("", "ai.onnx"):
            inputs = []
            for k, i in enumerate(node.input):
                if not i:
                    inputs.append(None)
                    continue
                if DTYPE_ONLY_INPUTS.get(node.op_type) == k:
                    dtype = self.dtype_of(i)
                    if dtype is None:
                        return None, f"the dtype of {i!r} (read by {node.op_type}) is unknown"
                    inputs.append(np.zeros(0, dtype))  # only its dtype is read
                    continue
                arr, why = self.constant(i)
                if arr is None:
                    return None, why
                inputs.append(arr)
            try:
                return _evaluate(node, inputs, self.model), ""
            except Exception as e:  # e.g. a Reshape to a shape its input cannot take
                # not a constant after all: whatever reads it stays unfolded, and the
                # verification's run of the original reports the model's own error
                return None, f"{value!r}: its constant expression fails ({first_line(e, 120)})"
        return None, f"{value!r} comes from {node.op_type} node {node.name or '(unnamed)'!r}"

    def dtype_of(self, value: str) -> np.dtype | None:
        """The numpy dtype of ``value``: a constant's own, else what inference says."""
        if value in self.initializers or value in self.exact:
            arr, _ = self.constant(value)
            return np.asarray(arr).dtype
        elem = self.elem_types.get(value)
        return None if not elem else helper.tensor_dtype_to_np_dtype(elem)

    def reads_activation(self, value: str) -> bool:
        """Whether the constant expression ``value`` reads a non-constant value (for its
        dtype only): then the activation has an extra reader that is not a real one."""
        node = self.producer.get(value)
        if node is None or node.op_type not in CONSTANT_EXPRESSION_OPS:
            return False
        for k, i in enumerate(node.input):
            if not i:
                continue
            if DTYPE_ONLY_INPUTS.get(node.op_type) == k:
                if self.constant(i)[0] is None:
                    return True
            elif self.reads_activation(i):
                return True
        return False

    def add_initializer(self, base: str, value64: np.ndarray, dtype: np.dtype) -> str:
        """Register a new weight by its float64 value; :meth:`materialize` casts it once."""
        name = self.fresh_name(base)
        self.exact[name] = np.asarray(value64, dtype=np.float64)
        self.dtypes[name] = np.dtype(dtype)
        return name

    def materialize(self) -> dict[str, str]:
        """Cast every new float64 weight once to its target dtype and add it as an
        initializer (a large one as a stub, its array in :attr:`arrays`). Returns
        {name: reason} for weights that would overflow."""
        bad: dict[str, str] = {}
        for name, v in self.exact.items():
            with np.errstate(over="ignore"):  # an overflow is reported, not warned about
                arr = v.astype(self.dtypes[name])
            if not np.isfinite(arr).all():
                bad[name] = f"the folded weights overflow {arr.dtype}"
            add_weight(self.g, self.arrays, name, arr)
            self.initializers[name] = self.g.initializer[-1]
        self.exact.clear()
        return bad


# Inputs of these ops (beyond the data input 0) are what the fold rules read as constants.
PARAMETER_READERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization"})


def detach_dtype_reads(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> int:
    """Replace each layer or BN parameter that is a constant expression reading an
    activation only for its dtype (the dynamo exporter's zero conv bias
    ``Expand(CastLike(0, x), Shape(weight))``) by an initializer of its value, and drop
    the expression. Otherwise that read makes ``x`` look used twice and no BN on ``x``
    could be removed. ``arrays``: the weights the model holds apart (:class:`ModelApart`).
    Returns how many inputs were replaced; the function is unchanged."""
    graph = Graph(model, arrays)
    graph.infer_ranks()
    replaced: dict[str, str] = {}
    for node in graph.nodes:
        if node.op_type not in PARAMETER_READERS or node.domain not in ("", "ai.onnx"):
            continue
        for k in range(1, len(node.input)):
            name = node.input[k]
            if not name or not graph.reads_activation(name):
                continue
            if name not in replaced:
                arr, _ = graph.constant(name)
                if arr is None:
                    continue
                new = graph.fresh_name(f"{name}_value")
                add_weight(model.graph, arrays, new, np.asarray(arr))
                replaced[name] = new
            node.input[k] = replaced[name]
    if replaced:
        graph.commit()
        prune(model, arrays)
    return len(replaced)


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    if attr.name == "value_float":
        return np.array(attr.f, dtype=np.float32)
    if attr.name == "value_floats":
        return np.array(list(attr.floats), dtype=np.float32)
    if attr.name == "value_int":
        return np.array(attr.i, dtype=np.int64)
    if attr.name == "value_ints":
        return np.array(list(attr.ints), dtype=np.int64)
    raise BnfoldError(f"Constant node {node.name!r}: attribute {attr.name} is not supported")


def _evaluate(node: onnx.NodeProto, inputs: list, model: onnx.ModelProto) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    feeds = {n: v for n, v in zip(node.input, inputs, strict=True) if n}
    opsets = {op.domain: op.version for op in model.opset_import}
    evaluator = ReferenceEvaluator(node, opsets=opsets)
    return np.asarray(evaluator.run(None, feeds)[0])


def prune(model: onnx.ModelProto, arrays: dict[str, np.ndarray] | None = None) -> None:
    """Drop nodes and initializers nothing reads any more (folding leaves the old weights
    and their Constant/Cast/Transpose producers behind), and from ``arrays`` (the weights
    held apart) those of dropped stubs. Only side-effect-free nodes of the default domain
    are dropped; graph inputs stay."""
    g = model.graph
    while True:
        read = {o.name for o in g.output}
        for n in g.node:
            read.update(i for i in n.input if i)
            read.update(_subgraph_inputs(n))
        alive = [
            n
            for n in g.node
            if n.domain not in ("", "ai.onnx")
            or not (n.op_type == "Constant" or n.op_type in CONSTANT_EXPRESSION_OPS)
            or any(o in read for o in n.output if o)
        ]
        if len(alive) == len(g.node):
            break
        kept = [onnx.NodeProto() for _ in alive]
        for new, old in zip(kept, alive, strict=True):
            new.CopyFrom(old)
        del g.node[:]
        g.node.extend(kept)
    inputs = {i.name for i in g.input}
    keep = [t for t in g.initializer if t.name in read or t.name in inputs]
    if len(keep) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep)
    if arrays is not None:
        for name in set(arrays) - {t.name for t in keep}:
            del arrays[name]
    produced = {o for n in g.node for o in n.output} | inputs | {t.name for t in keep}
    vis = [v for v in g.value_info if v.name in produced]
    if len(vis) != len(g.value_info):
        del g.value_info[:]
        g.value_info.extend(vis)
