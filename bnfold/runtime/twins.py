"""Float64 twins: a network's own float32 parameters, evaluated in float64 arithmetic.

A twin answers the question float32 outputs alone cannot: *is the function that the
candidate's parameters define the right one, up to one rounding of each parameter?* Its
outputs carry no arithmetic rounding (float64 is ~5e8 times finer than float32), so the
distance between a candidate's twin and the float64 truth is what the candidate's
*parameters* get wrong. A correct fold gets nothing wrong but the one cast of each folded
weight to float32; a wrong fold (a slightly wrong eps, a scaled row) gets a whole layer
wrong in the same direction. :meth:`Float64Twin.rerounded` tells the two apart: it moves
every parameter by a random fraction of its float32 spacing (``U(-1/2, 1/2) * ulp``), which
is the distribution of one cast's error, so the re-rounded twin shows how far "one more
rounding of every parameter" moves the outputs. :mod:`bnfold.verify.rounding` compares the two
distances.

Two kinds, one interface: a torch module (``.double()`` copy) and an ONNX graph (every
float tensor and type turned to double, run by ONNX Runtime). :func:`float64_twin` picks
one through :meth:`bnfold.runtime.predictor.Predictor.float64_twin`, which returns ``None`` when
there is none (e.g. an operator ONNX Runtime cannot run in double): the verdict then rests on
float32 outputs alone.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:  # onnx is imported where a graph is handled: `bnfold --help` needs none
    import onnx

REROUND_SEEDS = (1, 2)  # two copies: the yardstick varies ~1% between seed pairs (one: 2.4%)


class Float64Twin(Protocol):
    def logits(self, contexts: np.ndarray) -> np.ndarray:
        """Float64 outputs, shape (n, classes)."""
        ...

    def rerounded(self, seed: int) -> Float64Twin:
        """A copy whose parameters moved by ``U(-1/2, 1/2)`` of their float32 spacing."""
        ...


def rerounded_copies(twin: Float64Twin) -> list[Float64Twin]:
    """The seeded re-rounded copies the parameter test compares against."""
    return [twin.rerounded(seed) for seed in REROUND_SEEDS]


def float32_spacing(values: np.ndarray) -> np.ndarray:
    """The distance from each value (as float32) to the next float32 away from zero: the
    size of one float32 rounding step at that value (the error of one cast is at most half
    of it)."""
    v = np.abs(np.asarray(values, dtype=np.float32))
    return (np.nextafter(v, np.float32(np.inf)) - v).astype(np.float64)


def rerounding_noise(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``U(-1/2, 1/2) * spacing`` per element: the error distribution of one float32 cast."""
    return (rng.random(np.shape(values)) - 0.5) * float32_spacing(values)


class TorchTwin:
    """A torch module's float64 copy (eval mode)."""

    def __init__(self, module):
        self.module = copy.deepcopy(module).double().eval()

    def logits(self, contexts: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.module(torch.from_numpy(contexts)).numpy()

    def rerounded(self, seed: int) -> TorchTwin:
        import torch

        twin = copy.copy(self)
        twin.module = copy.deepcopy(self.module)
        rng = np.random.default_rng(seed)
        with torch.no_grad():
            tensors = list(twin.module.parameters()) + list(twin.module.buffers())
            for t in tensors:
                if t.is_floating_point():
                    t += torch.from_numpy(rerounding_noise(t.numpy(), rng))
        return twin


class OnnxTwin:
    """An ONNX graph with every float tensor, value type and ``Cast`` turned to double, run
    by ONNX Runtime on the CPU (one thread)."""

    def __init__(self, model: onnx.ModelProto, input_name: str):
        import onnxruntime as ort

        self.model = model
        self.input_name = input_name
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        # no graph rewrites: a fused kernel may compute in float32 internally
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )

    def logits(self, contexts: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: contexts})[0]

    def rerounded(self, seed: int) -> OnnxTwin:
        from onnx import TensorProto, numpy_helper

        rng = np.random.default_rng(seed)
        model = copy.deepcopy(self.model)
        for init in model.graph.initializer:
            if init.data_type == TensorProto.DOUBLE:
                a = numpy_helper.to_array(init)
                init.CopyFrom(numpy_helper.from_array(a + rerounding_noise(a, rng), init.name))
        return OnnxTwin(model, self.input_name)


def double_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` computing in double: float initializers (float32, float16 and
    bfloat16, converted exactly), tensor attributes (``Constant`` values and the like),
    graph inputs/outputs/value_info and casts to those dtypes all become double (float
    inputs must be cast up by the caller). A half-precision graph's truth is then its own
    parameters evaluated without rounding, as for float32."""
    import onnx
    from onnx import TensorProto, numpy_helper

    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph

    def up(t: onnx.TensorProto) -> None:
        if t.data_type in floats:
            a = numpy_helper.to_array(t).astype(np.float64)
            t.CopyFrom(numpy_helper.from_array(a, t.name))

    for init in g.initializer:
        up(init)
    for value in list(g.input) + list(g.output) + list(g.value_info):
        if value.type.tensor_type.elem_type in floats:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    for node in g.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                up(attr.t)
            elif node.op_type == "Cast" and attr.name == "to" and attr.i in floats:
                attr.i = TensorProto.DOUBLE
    return out


def onnx_twin(model: onnx.ModelProto) -> OnnxTwin | None:
    """The float64 twin of a one-input ONNX model, or ``None`` when ONNX Runtime cannot run
    its double version (an operator without a double kernel) or it cannot be converted."""
    try:
        return OnnxTwin(double_graph(model), model.graph.input[0].name)
    except Exception:  # ORT raises its own exception types for kernels it lacks
        return None
