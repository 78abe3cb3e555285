"""A zoo of ONNX graphs with BatchNormalization nodes, for the ONNX folder's tests and for
benchmarks/onnx_zoo.py: torch modules (and torchvision CNN builders, weights=None) exported
with their BN nodes kept, and graphs hand-made with onnx.helper. Each case says how many of
its BNs can be folded exactly and which refusal reasons the rest must get."""

from __future__ import annotations

import io
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

OPSET = 17


@dataclass(frozen=True)
class ZooCase:
    name: str
    build: Callable[[], onnx.ModelProto]
    foldable: int  # BNs an exact folder must fold
    batchnorms: int  # BNs in the graph
    refusals: tuple[str, ...] = ()  # substrings the reasons for the rest must contain


_TORCHVISION_SCHEMAS: list[torch.library.Library] = []


def torchvision():
    """torchvision 0.28 imports only once its C++ ops' schemas exist; we need just the
    model builders (weights=None), so define the two schemas its import checks."""
    if "torchvision" not in sys.modules and not torch._C._jit_get_schemas_for_operator(
        "torchvision::nms"
    ):
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_SCHEMAS.append(lib)  # the definitions live as long as the object
    import torchvision as tv

    return tv


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial running statistics and affine parameters (a fresh BN is
    the identity, which would hide a wrong fold)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(c, generator=g) * 2 - 1)
    return model.eval()


def export(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> onnx.ModelProto:
    """torch.onnx export that keeps BN nodes (TorchScript exporter, PRESERVE, no constant
    folding), batch dimension dynamic: :func:`export_with` with its defaults."""
    return export_with(model, shape, seed)


def _t(name: str, a) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(a, dtype=np.float32), name)


def bn_params(prefix: str, c: int, seed: int) -> list[onnx.TensorProto]:
    rng = np.random.default_rng(seed)
    return [
        _t(f"{prefix}_scale", rng.uniform(0.5, 1.5, c)),
        _t(f"{prefix}_bias", rng.uniform(-1, 1, c)),
        _t(f"{prefix}_mean", rng.uniform(-1, 1, c)),
        _t(f"{prefix}_var", rng.uniform(0.25, 1.75, c)),
    ]


def bn_node(prefix: str, x: str, y: str, **attrs) -> onnx.NodeProto:
    ins = [x] + [f"{prefix}_{k}" for k in ("scale", "bias", "mean", "var")]
    return helper.make_node("BatchNormalization", ins, [y], name=prefix, **attrs)


def graph_model(nodes, inputs, outputs, inits, opset: int = OPSET) -> onnx.ModelProto:
    def vi(spec):
        name, shape = spec
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    g = helper.make_graph(nodes, "zoo", [vi(i) for i in inputs], [vi(o) for o in outputs], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.metadata_props.add(key="zoo", value="bnfold")
    onnx.checker.check_model(m, full_check=True)
    return m


def rand(shape, seed: int, scale: float = 0.5) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape) * scale


# ---- torch-exported cases ----------------------------------------------------------------


def resnet18() -> onnx.ModelProto:
    return export(torchvision().models.resnet18(weights=None, num_classes=10), (2, 3, 32, 32))


def mobilenet_v2() -> onnx.ModelProto:
    return export(torchvision().models.mobilenet_v2(weights=None, num_classes=10), (2, 3, 32, 32))


def conv_transpose() -> onnx.ModelProto:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, bias=False)
            self.bn_a = nn.BatchNorm2d(6)
            self.b = nn.ConvTranspose1d(6, 4, 2, stride=1, dilation=2)
            self.bn_b = nn.BatchNorm1d(4)
            self.c = nn.ConvTranspose3d(4, 4, 2, stride=2, groups=4)
            self.bn_c = nn.BatchNorm3d(4)

        def forward(self, x):
            y = self.bn_a(self.a(x))  # (N, 6, 11, 11)
            z = self.bn_b(self.b(y.flatten(2)))  # (N, 4, 123)
            w = self.bn_c(self.c(z.reshape(z.shape[0], 4, 1, 3, 41)))
            return w.flatten(1)

    return export(M(), (2, 4, 5, 5))


def convs_1d_3d() -> onnx.ModelProto:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(3, 6, 3, stride=2, dilation=2, padding=2, groups=3, bias=False)
            self.b1 = nn.BatchNorm1d(6)
            self.c3 = nn.Conv3d(6, 4, 2, padding=1)
            self.b3 = nn.BatchNorm3d(4)

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))  # (N, 6, 8)
            return self.b3(self.c3(y.reshape(y.shape[0], 6, 2, 2, 2)))

    return export(M(), (2, 3, 15))


def bn_before_conv() -> onnx.ModelProto:
    """BN on the input, then an unpadded strided conv: folds into the following Conv."""
    return export(
        nn.Sequential(
            nn.BatchNorm2d(4),
            nn.Conv2d(4, 8, 3, stride=2),
            nn.ReLU(),
            nn.BatchNorm2d(8),
            nn.Conv2d(8, 8, 1, groups=4),
        ),
        (2, 4, 9, 9),
    )


def bn_before_padded_conv() -> onnx.ModelProto:
    """Trap: the conv zero-pads, so the BN's shift never reaches the border."""
    return export(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)), (2, 4, 6, 6))


def mlp() -> onnx.ModelProto:
    """Linear -> BN -> ReLU -> BN(affine=False) -> Linear: into Gemm, both directions."""
    return export(
        nn.Sequential(
            nn.Linear(5, 6),
            nn.BatchNorm1d(6),
            nn.ReLU(),
            nn.BatchNorm1d(6, affine=False),
            nn.Linear(6, 3),
        ),
        (2, 5),
    )


def relu_between() -> onnx.ModelProto:
    """Trap: a nonlinearity on both sides of the BN."""
    return export(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.BatchNorm1d(5), nn.ReLU()), (2, 4))


def matmul_3d_axis() -> onnx.ModelProto:
    """Trap: BatchNorm1d(4) on a (N, 4, 4) Linear output normalises axis 1, the Linear's
    features are axis 2; the sizes match, the axes do not."""
    return export(nn.Sequential(nn.Linear(4, 4, bias=False), nn.BatchNorm1d(4)), (2, 4, 4))


def mobilenet_v3_small() -> onnx.ModelProto:
    return export(
        torchvision().models.mobilenet_v3_small(weights=None, num_classes=10), (2, 3, 32, 32)
    )


def affine_false() -> onnx.ModelProto:
    """affine=False BNs export their gamma/beta as Constant nodes."""
    return export(
        nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4, affine=False),
            nn.ReLU(),
            nn.Linear(4, 4),
            nn.Flatten(),
            nn.Linear(64, 6),
            nn.BatchNorm1d(6, affine=False),
        ),
        (2, 3, 6, 6),
    )


def bn_before_3d_matmul() -> onnx.ModelProto:
    """Trap: BatchNorm1d(6) on (N, 6, 6), then a Linear over the last axis: the sizes
    match, but the BN's channels are axis 1, not the Linear's inputs."""
    return export(nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 3)), (2, 6, 6))


# ---- hand-made cases ---------------------------------------------------------------------


def gemm_variants() -> onnx.ModelProto:
    """Gemm(transA, transB, alpha, beta, broadcast C) -> BN, BN -> Gemm(alpha, beta, C)."""
    inits = [
        _t("w1", rand((6, 4), 1)),
        _t("c1", rand((1, 6), 2)),
        _t("w2", rand((6, 5), 3)),
        _t("c2", rand((), 4)),
        *bn_params("bn1", 6, 5),
        *bn_params("bn2", 6, 6),
    ]
    nodes = [
        helper.make_node(
            "Gemm", ["x", "w1", "c1"], ["g1"], name="gemm1", transA=1, transB=1, alpha=0.5, beta=2.0
        ),
        bn_node("bn1", "g1", "b1"),
        helper.make_node("Relu", ["b1"], ["r"], name="relu"),
        bn_node("bn2", "r", "b2"),
        helper.make_node("Gemm", ["b2", "w2", "c2"], ["y"], name="gemm2", alpha=1.5, beta=0.5),
    ]
    return graph_model(nodes, [("x", [4, "n"])], [("y", ["n", 5])], inits)


def matmul_2d() -> onnx.ModelProto:
    """MatMul (constant 2-D weight) -> BN -> Tanh -> BN -> MatMul, 2-D activations."""
    inits = [
        _t("w1", rand((4, 6), 7)),
        _t("w2", rand((6, 3), 8)),
        *bn_params("bn1", 6, 9),
        *bn_params("bn2", 6, 10),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="matmul1"),
        bn_node("bn1", "m1", "b1"),
        helper.make_node("Tanh", ["b1"], ["t"], name="tanh"),
        bn_node("bn2", "t", "b2"),
        helper.make_node("MatMul", ["b2", "w2"], ["y"], name="matmul2"),
    ]
    return graph_model(nodes, [("x", ["n", 4])], [("y", ["n", 3])], inits)


def constant_expressions() -> onnx.ModelProto:
    """Weights as Transpose(Cast(float16 initializer)), BN parameters as Constant nodes."""
    w = rand((3, 2, 3, 3), 11).astype(np.float16)  # stored (in, out, kh, kw), transposed
    rng = np.random.default_rng(12)
    consts = [
        helper.make_node(
            "Constant",
            [],
            [f"k_{k}"],
            name=f"const_{k}",
            value=numpy_helper.from_array(v.astype(np.float32), f"k_{k}"),
        )
        for k, v in (
            ("scale", rng.uniform(0.5, 1.5, 2)),
            ("bias", rng.uniform(-1, 1, 2)),
            ("mean", rng.uniform(-1, 1, 2)),
            ("var", rng.uniform(0.3, 2, 2)),
        )
    ]
    nodes = [
        *consts,
        helper.make_node("Cast", ["w16"], ["w32"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["w32"], ["w"], name="transpose", perm=[1, 0, 2, 3]),
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c", "k_scale", "k_bias", "k_mean", "k_var"], ["y"], name="bn"
        ),
    ]
    inits = [numpy_helper.from_array(w, "w16")]
    return graph_model(nodes, [("x", ["n", 3, 5, 5])], [("y", ["n", 2, 5, 5])], inits)


def shared_weight() -> onnx.ModelProto:
    """Two convs share one weight; only the first is followed by a BN: the fold must
    clone the weight so the second conv keeps the original."""
    inits = [_t("w", rand((4, 4, 3, 3), 13)), _t("b", rand(4, 14)), *bn_params("bn", 4, 15)]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        bn_node("bn", "c1", "b1"),
        helper.make_node("Conv", ["b1", "w", "b"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    return graph_model(nodes, [("x", ["n", 4, 6, 6])], [("y", ["n", 4, 6, 6])], inits)


def bn_chain() -> onnx.ModelProto:
    """Conv -> BN -> BN: both fold into the conv (still one cast)."""
    inits = [_t("w", rand((3, 2, 1, 1), 16)), *bn_params("bnA", 3, 17), *bn_params("bnB", 3, 18)]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        bn_node("bnA", "c", "a"),
        bn_node("bnB", "a", "y"),
    ]
    return graph_model(nodes, [("x", ["n", 2, 4, 4])], [("y", ["n", 3, 4, 4])], inits)


def traps() -> onnx.ModelProto:
    """Every BN here must stay: the conv output is also a graph output; statistics come
    from a graph input; training_mode=1; a BN output read by two convs; a BN before a
    ConvTranspose (a shift through a strided transposed conv is not a constant)."""
    inits = [
        _t("w", rand((3, 3, 1, 1), 19)),
        _t("wt", rand((3, 3, 2, 2), 20)),
        *bn_params("bn_out", 3, 21),
        *bn_params("bn_stats", 3, 22),
        *bn_params("bn_train", 3, 23),
        *bn_params("bn_fan", 3, 24),
        *bn_params("bn_ct", 3, 25),
    ]
    inits = [t for t in inits if t.name != "bn_stats_mean"]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv_out"),
        bn_node("bn_out", "c", "b_out"),
        helper.make_node(
            "BatchNormalization",
            ["b_out", "bn_stats_scale", "bn_stats_bias", "mean_in", "bn_stats_var"],
            ["b_stats"],
            name="bn_stats",
        ),
        helper.make_node(
            "BatchNormalization",
            ["b_stats", "bn_train_scale", "bn_train_bias", "bn_train_mean", "bn_train_var"],
            ["b_train", "rm", "rv"],
            name="bn_train",
            training_mode=1,
        ),
        bn_node("bn_fan", "b_train", "b_fan"),
        helper.make_node("Conv", ["b_fan", "w"], ["f1"], name="fan1"),
        helper.make_node("Conv", ["b_fan", "w"], ["f2"], name="fan2"),
        helper.make_node("Add", ["f1", "f2"], ["s"], name="add"),
        bn_node("bn_ct", "s", "b_ct"),
        helper.make_node("ConvTranspose", ["b_ct", "wt"], ["y"], name="convT", strides=[2, 2]),
    ]
    return graph_model(
        nodes,
        [("x", ["n", 3, 4, 4]), ("mean_in", [3])],
        [("y", ["n", 3, 8, 8]), ("c", ["n", 3, 4, 4])],
        inits,
        opset=15,
    )


ORIGINAL: tuple[ZooCase, ...] = (
    ZooCase("resnet18", resnet18, 20, 20),
    ZooCase("mobilenet_v2", mobilenet_v2, 52, 52),
    ZooCase("mobilenet_v3_small", mobilenet_v3_small, 34, 34),
    ZooCase("affine_false_constants", affine_false, 2, 2),
    ZooCase("bn_before_3d_matmul", bn_before_3d_matmul, 0, 1, ("channel axes differ",)),
    ZooCase("conv_transpose_1d_2d_3d", conv_transpose, 3, 3),
    ZooCase("conv_1d_3d", convs_1d_3d, 2, 2),
    ZooCase("bn_before_conv", bn_before_conv, 2, 2),
    ZooCase("bn_before_padded_conv", bn_before_padded_conv, 0, 1, ("zero-pads",)),
    ZooCase("mlp_gemm", mlp, 2, 2),
    ZooCase("relu_between", relu_between, 0, 1, ("Relu",)),
    ZooCase("matmul_3d_axis", matmul_3d_axis, 0, 1, ("channel axes differ",)),
    ZooCase("gemm_variants", gemm_variants, 2, 2),
    ZooCase("matmul_2d", matmul_2d, 2, 2),
    ZooCase("constant_expressions", constant_expressions, 1, 1),
    ZooCase("shared_weight", shared_weight, 1, 1),
    ZooCase("bn_chain", bn_chain, 2, 2),
    ZooCase(
        "traps",
        traps,
        0,
        5,
        (
            "graph output",
            "non-constant input_mean",
            "training_mode=1",
            "read by 2 nodes",
            "ConvTranspose",
        ),
    ),
)


# ---- what users bring: other dtypes, exporters, opsets, dynamic dims ------------------------


def with_dtype(
    model: onnx.ModelProto, elem: int, source: int = TensorProto.FLOAT
) -> onnx.ModelProto:
    """A copy of a ``source``-dtype model computing in ``elem`` (e.g. FLOAT16 or BFLOAT16)
    throughout, like a converted deployment graph: initializers, tensor attributes, the
    graph's inputs/outputs/value_info and ``Cast(to=source)`` all take the new dtype."""
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph

    def convert(t: onnx.TensorProto) -> None:
        if t.data_type == source:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(dtype), t.name))

    for init in g.initializer:
        convert(init)
    for value in list(g.input) + list(g.output) + list(g.value_info):
        if value.type.tensor_type.elem_type == source:
            value.type.tensor_type.elem_type = elem
    for node in g.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                convert(attr.t)
            elif node.op_type == "Cast" and attr.name == "to" and attr.i == source:
                attr.i = elem
    return out


def small_net(seed: int = 0) -> nn.Module:
    """Conv -> BN -> ReLU -> BN -> 1x1 Conv (no bias) -> BN -> Linear -> BN: every fold
    direction and the bias-less conv the dynamo exporter gives a computed zero bias.
    Seeded: its weights do not depend on what ran before."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 1, bias=False),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        nn.BatchNorm1d(5),
    )


def export_with(model: nn.Module, shape: tuple[int, ...], seed: int = 0, **options):
    """:func:`export` with other exporter options (opset, training mode, functions)."""
    torch.manual_seed(seed)
    model = randomize_bn(model, seed)
    kwargs = {
        "dynamo": False,
        "training": torch.onnx.TrainingMode.PRESERVE,
        "do_constant_folding": False,
        "input_names": ["x"],
        "output_names": ["y"],
        "dynamic_axes": {"x": {0: "batch"}, "y": {0: "batch"}},
        "opset_version": OPSET,
    }
    kwargs.update(options)
    if kwargs["training"] == torch.onnx.TrainingMode.TRAINING:
        model.train()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(*shape),), f, **kwargs)
    return onnx.load_from_string(f.getvalue())


def dynamo_export(
    model: nn.Module, shape: tuple[int, ...], opset: int = 18, seed: int = 0
) -> onnx.ModelProto:
    """torch's dynamo exporter without its own optimisation pass (which would fold the BNs
    itself): BN nodes, the zero bias ``Expand(CastLike(0, x), Shape(w))``, batch dynamic."""
    import contextlib
    import os

    torch.manual_seed(seed)
    model = randomize_bn(model, seed)
    with (
        warnings.catch_warnings(),
        open(os.devnull, "w") as null,
        contextlib.redirect_stdout(null),
    ):  # the exporter prints its progress and warns about deprecations
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (torch.randn(*shape),),
            dynamo=True,
            optimize=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=opset,
        )
    return program.model_proto


def fp16_net() -> onnx.ModelProto:
    return with_dtype(export(small_net(), (2, 3, 8, 8)), TensorProto.FLOAT16)


def resnet18_fp16() -> onnx.ModelProto:
    return with_dtype(resnet18(), TensorProto.FLOAT16)


def dynamo_opset18() -> onnx.ModelProto:
    return dynamo_export(small_net(), (2, 3, 8, 8), opset=18)


def dynamo_opset21() -> onnx.ModelProto:
    return dynamo_export(small_net(), (2, 3, 8, 8), opset=21, seed=1)


def legacy_opset(opset: int) -> Callable[[], onnx.ModelProto]:
    def build() -> onnx.ModelProto:
        return export_with(small_net(), (2, 3, 8, 8), seed=opset, opset_version=opset)

    return build


def local_functions() -> onnx.ModelProto:
    """Every Conv and BN module exported as an ONNX local function."""
    return export_with(
        small_net(), (2, 3, 8, 8), export_modules_as_functions={nn.BatchNorm2d, nn.Conv2d}
    )


def training_export(opset: int) -> Callable[[], onnx.ModelProto]:
    """Trap: torch's TRAINING export. At opset >= 14 training_mode=1; below, the
    BatchNormalization-9 nodes carry their statistics outputs, which is training mode."""

    def build() -> onnx.ModelProto:
        return export_with(
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
            (2, 3, 8, 8),
            training=torch.onnx.TrainingMode.TRAINING,
            opset_version=opset,
        )

    return build


def dynamic_hw() -> onnx.ModelProto:
    """H and W symbolic, a valid-padded 3x3 stem and a 2x2 pool: random inputs of 2x2
    cannot run; a real image size can."""
    return export_with(
        nn.Sequential(
            nn.Conv2d(3, 8, 3),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3),
            nn.BatchNorm2d(8),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 4),
        ),
        (2, 3, 16, 16),
        dynamic_axes={"x": {0: "batch", 2: "h", 3: "w"}, "y": {0: "batch"}},
    )


def tf_style() -> onnx.ModelProto:
    """A tf2onnx-shaped graph: NHWC input transposed to NCHW, every weight and BN
    parameter fed through an Identity node, opset 13, SAME_UPPER 1x1 conv."""
    inits = [
        _t("w1_const", rand((6, 3, 3, 3), 31)),
        _t("w2_const", rand((6, 6, 1, 1), 32)),
        *bn_params("bn1", 6, 33),
        *bn_params("bn2", 6, 34),
    ]
    identities = [
        helper.make_node("Identity", [t.name], [f"{t.name}/read"], name=f"{t.name}/Identity")
        for t in inits
    ]

    def bn(prefix: str, x: str, y: str) -> onnx.NodeProto:
        params = [f"{prefix}_{k}/read" for k in ("scale", "bias", "mean", "var")]
        return helper.make_node(
            "BatchNormalization", [x, *params], [y], name=f"{prefix}/FusedBatchNormV3", epsilon=1e-3
        )

    nodes = [
        *identities,
        helper.make_node("Transpose", ["x"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w1_const/read"], ["c1"], name="conv1/Conv2D"),
        bn("bn1", "c1", "b1"),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node(
            "Conv", ["r1", "w2_const/read"], ["c2"], name="conv2/Conv2D", auto_pad="SAME_UPPER"
        ),
        bn("bn2", "c2", "b2"),
        helper.make_node("Transpose", ["b2"], ["y"], name="to_nhwc", perm=[0, 2, 3, 1]),
    ]
    return graph_model(nodes, [("x", ["n", 8, 8, 3])], [("y", ["n", 6, 6, 6])], inits, opset=13)


# Cases for what users bring (other dtypes, exporters, opsets, dynamic dims): the suite runs
# them with the rest of CASES.
BROUGHT: tuple[ZooCase, ...] = (
    ZooCase("fp16_net", fp16_net, 4, 4),
    ZooCase("resnet18_fp16", resnet18_fp16, 20, 20),
    ZooCase("dynamo_opset18", dynamo_opset18, 4, 4),
    ZooCase("dynamo_opset21", dynamo_opset21, 4, 4),
    ZooCase("legacy_opset9", legacy_opset(9), 4, 4),
    ZooCase("legacy_opset13", legacy_opset(13), 4, 4),
    ZooCase("local_functions", local_functions, 4, 4),
    ZooCase("dynamic_hw", dynamic_hw, 2, 2),
    ZooCase("tf_style_identity_fed", tf_style, 2, 2),
    ZooCase("training_opset13", training_export(13), 0, 1, ("statistics outputs",)),
    ZooCase("training_opset17", training_export(17), 0, 1, ("training_mode=1",)),
)

CASES: tuple[ZooCase, ...] = ORIGINAL + BROUGHT
