"""The float64 truth (bnfold.runtime.float64_eval) and the ONNX verdict built on it.

Oracles nobody here wrote: torch modules evaluated in double, ONNX Runtime in float32 (its
semantics decide what a graph means: shapes, training-mode BatchNorms) and onnx.reference
at an opset where its BatchNormalization is right."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import onnx
import onnx_zoo
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

from bnfold.pipeline.onnx_fold import StageProgress, fold_onnx, fold_onnx_file
from bnfold.runtime import float64_eval
from bnfold.runtime.float64_eval import Float64Evaluator, pooled_size, to_double
from bnfold.runtime.twins import double_graph
from bnfold.verify.onnx import compare, random_feeds, run


def _conv_bn(opset: int, **bn_attrs) -> onnx.ModelProto:
    """x -> Conv(3x3, pads 1) -> BatchNormalization -> y at ``opset``."""
    inits = [
        onnx_zoo._t("w", onnx_zoo.rand((4, 3, 3, 3), 1)),
        onnx_zoo._t("b", onnx_zoo.rand(4, 2)),
        *onnx_zoo.bn_params("bn", 4, 3),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        onnx_zoo.bn_node("bn", "c", "y", **bn_attrs),
    ]
    return onnx_zoo.graph_model(nodes, [("x", [2, 3, 6, 6])], [("y", [2, 4, 6, 6])], inits, opset)


def _set(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    init = next(t for t in model.graph.initializer if t.name == name)
    init.CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(init).dtype), name))


def _get(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _folded_layer(folded: onnx.ModelProto, report, index: int = 0) -> onnx.NodeProto:
    return next(n for n in folded.graph.node if n.name == report.folded[index].layer)


@pytest.mark.parametrize("opset", [9, 13, 15, 21])
def test_a_two_percent_channel_scale_fails_at_every_opset(opset):
    """onnx.reference's BatchNormalization mixed batch statistics in at opsets 9-13, so a
    folded conv with one channel 2% off passed there; the truth must see it everywhere."""
    model = _conv_bn(opset)
    folded, report = fold_onnx(model)
    assert len(report.folded) == 1
    feeds = random_feeds(model, seed=1)
    good = compare(model, folded, feeds, "random")
    assert good.passed and good.outputs[0].verdict.criterion == "float64", good.format()
    conv = _folded_layer(folded, report)
    w = _get(folded, conv.input[1]).copy()
    w[2] *= 1.02
    _set(folded, conv.input[1], w)
    bad = compare(model, folded, feeds, "random")
    verdict = bad.outputs[0].verdict
    assert not bad.passed and verdict.criterion == "float64"
    assert verdict.margin > 100, bad.format()


def _bn_torch(x, bn_model: onnx.ModelProto) -> np.ndarray:
    """torch's eval-mode BatchNorm2d in double on the model's parameters (the oracle)."""
    bn = nn.BatchNorm2d(4, eps=float(np.float32(1e-5))).double().eval()  # the attribute
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(_get(bn_model, "bn_scale").astype(np.float64)))
        bn.bias.copy_(torch.from_numpy(_get(bn_model, "bn_bias").astype(np.float64)))
        bn.running_mean.copy_(torch.from_numpy(_get(bn_model, "bn_mean").astype(np.float64)))
        bn.running_var.copy_(torch.from_numpy(_get(bn_model, "bn_var").astype(np.float64)))
        return bn(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("opset", [9, 13, 14, 15, 21])
def test_inference_batchnorm_uses_running_statistics(opset):
    nodes = [onnx_zoo.bn_node("bn", "x", "y")]
    model = onnx_zoo.graph_model(
        nodes, [("x", [2, 4, 3, 3])], [("y", [2, 4, 3, 3])], onnx_zoo.bn_params("bn", 4, 5), opset
    )
    x = np.random.default_rng(0).standard_normal((2, 4, 3, 3)) * 3 + 1  # far from the stats
    got = Float64Evaluator(model).run({"x": x})["y"]
    np.testing.assert_allclose(got, _bn_torch(x, model), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(
    "opset, outputs, attrs",
    [(9, 5, {}), (13, 5, {}), (14, 3, {"training_mode": 1}), (15, 3, {"training_mode": 1})],
)
def test_training_mode_batchnorm_matches_onnx_runtime(opset, outputs, attrs):
    """A BN in training mode (opset 14+: the attribute; before: extra outputs) normalises
    with the batch's statistics in ONNX Runtime: the truth must compute that function."""
    names = ["y", "running_mean", "running_var", "saved_mean", "saved_inv_std"][:outputs]
    node = helper.make_node(
        "BatchNormalization",
        ["x", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
        names,
        name="bn",
        **attrs,
    )
    g = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 4, 3])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names],
        onnx_zoo.bn_params("bn", 4, 6),
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    x = (np.random.default_rng(1).standard_normal((5, 4, 3)) * 2 + 1).astype(np.float32)
    want = run(model, {"x": x})
    got = Float64Evaluator(model).run({"x": x})
    for name in names:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-6, atol=2e-6, err_msg=name)


class _Ops(nn.Module):
    """Convs (depthwise with a multiplier, grouped, dilated, strided, 1-D and 3-D), pools
    with ceil_mode and asymmetric windows, transposed convs, upsampling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 16, 3, padding=2, dilation=2, groups=8)
        self.grouped = nn.Conv2d(16, 8, 3, stride=2, groups=4)
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.conv1d = nn.Conv1d(6, 4, 3, stride=2, padding=1)
        self.conv3d = nn.Conv3d(1, 2, 2, padding=1)

    def forward(self, x):
        y = nn.functional.max_pool2d(self.stem(x), 3, 2, ceil_mode=True)  # googlenet's
        y = nn.functional.avg_pool2d(self.dw(y), 3, 1, padding=1, ceil_mode=True)
        y = nn.functional.avg_pool2d(y, 2, 2, count_include_pad=False, ceil_mode=True)
        y = self.up(self.grouped(y))
        y = nn.functional.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        y = nn.functional.interpolate(y, size=(9, 7), mode="nearest")
        z = self.conv1d(y.flatten(2))  # (N, 4, 32)
        w = self.conv3d(z.reshape(z.shape[0], 1, 4, 4, 8))
        return torch.cat([w.flatten(1), y.flatten(1)], 1)


def test_the_torch_kernels_agree_with_torch_in_double():
    torch.manual_seed(0)
    module = _Ops().eval()
    model = onnx_zoo.export(module, (2, 3, 23, 23))
    x = np.random.default_rng(2).standard_normal((3, 3, 23, 23)).astype(np.float32)
    got = Float64Evaluator(model).run({"x": x})["y"]
    with torch.no_grad():
        want = module.double()(torch.from_numpy(x.astype(np.float64))).numpy()
    assert got.dtype == np.float64 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # and ONNX Runtime computes the same function in float32 (shapes included)
    ort = run(model, {"x": x})["y"]
    assert ort.shape == got.shape and np.abs(ort - got).max() < 1e-4


@pytest.mark.parametrize(
    "case", ["conv_1d_3d", "bn_before_conv", "constant_expressions", "gemm_variants", "traps"]
)
def test_the_evaluator_agrees_with_onnx_reference_where_it_is_right(case):
    """onnx.reference at opsets 15/17 (its BatchNormalization is right from 14 on)."""
    model = next(c for c in onnx_zoo.CASES if c.name == case).build()
    feeds = random_feeds(model, seed=4, dynamic=3)
    got = Float64Evaluator(model).run(feeds)
    ref = ReferenceEvaluator(double_graph(model))
    outputs = ref.run(None, {k: to_double(v) for k, v in feeds.items()})
    want = dict(zip(ref.output_names, outputs, strict=True))
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-12, atol=1e-12, err_msg=name)


def _resize_model(shape, mode, coord, scales=None, sizes=None, **attrs) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.array([], np.float32), "roi")]
    names = ["x", "roi", "", ""]
    if scales is not None:
        inits.append(numpy_helper.from_array(np.array(scales, np.float32), "scales"))
        names[2] = "scales"
    else:
        inits.append(numpy_helper.from_array(np.array(sizes, np.int64), "sizes"))
        names[3] = "sizes"
    node = helper.make_node(
        "Resize", names, ["y"], mode=mode, coordinate_transformation_mode=coord, **attrs
    )
    g = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


RESIZES = {
    "bilinear half_pixel x2": ((2, 3, 5, 4), "linear", "half_pixel", [1, 1, 2, 2], None),
    "bilinear half_pixel down": ((1, 2, 9, 8), "linear", "half_pixel", [1, 1, 0.5, 0.75], None),
    "bilinear half_pixel to 9x7": ((1, 2, 4, 5), "linear", "half_pixel", None, [1, 2, 9, 7]),
    "align_corners to 9x7": ((1, 2, 4, 5), "linear", "align_corners", None, [1, 2, 9, 7]),
    "align_corners x3": ((1, 1, 4, 3), "linear", "align_corners", [1, 1, 3, 3], None),
    "pytorch_half_pixel to 1x6": ((1, 2, 4, 5), "linear", "pytorch_half_pixel", None, [1, 2, 1, 6]),
    "asymmetric x2.5": ((1, 2, 4, 5), "linear", "asymmetric", [1, 1, 2.5, 2.5], None),
    "linear 1-D": ((2, 3, 7), "linear", "half_pixel", [1, 1, 1.5], None),
    "trilinear": ((1, 2, 3, 4, 5), "linear", "half_pixel", None, [1, 2, 5, 6, 4]),
    "nearest floor x2": ((1, 2, 3, 4), "nearest", "asymmetric", [1, 1, 2, 2], None),
    "nearest floor to 9x7": ((1, 2, 4, 5), "nearest", "asymmetric", None, [1, 2, 9, 7]),
}


@pytest.mark.parametrize("case", sorted(RESIZES))
def test_resize_agrees_with_onnx_reference_and_onnx_runtime(case):
    """The numpy Resize against onnx.reference's (the spec's formulas) in double, and
    against ONNX Runtime in float32 (its shapes too)."""
    shape, mode, coord, scales, sizes = RESIZES[case]
    attrs = {"nearest_mode": "floor"} if mode == "nearest" else {}
    model = _resize_model(shape, mode, coord, scales, sizes, **attrs)
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    assert float64_eval.resize(x.astype(np.float64), scales, sizes, {"mode": mode,
        "coordinate_transformation_mode": coord, **attrs}) is not None  # fmt: skip
    got = Float64Evaluator(model).run({"x": x})["y"]
    ref = ReferenceEvaluator(double_graph(model))
    want = ref.run(None, {"x": x.astype(np.float64)})[0]
    assert got.dtype == np.float64 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
    ort = run(model, {"x": x})["y"]
    assert ort.shape == got.shape and np.abs(ort - got).max() < 1e-5


def test_resize_modes_it_does_not_cover_are_left_to_onnx_reference():
    x = np.ones((1, 1, 2, 2))
    for mode, coord, extra in (
        ("cubic", "half_pixel", {}),
        ("nearest", "half_pixel", {"nearest_mode": "floor"}),
        ("nearest", "asymmetric", {"nearest_mode": "round_prefer_floor"}),
        ("linear", "tf_crop_and_resize", {}),
        ("linear", "half_pixel", {"antialias": 1}),
    ):
        attrs = {"mode": mode, "coordinate_transformation_mode": coord, **extra}
        assert float64_eval.resize(x, [1, 1, 2, 2], None, attrs) is None, attrs


def test_ceil_mode_maxpool_has_onnx_runtime_shape():
    """googlenet's MaxPool(3, stride 2, ceil_mode) on 56x56 gives 28x28 (onnx.reference
    returned 30x30 there)."""
    node = helper.make_node(
        "MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1
    )
    g = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 56, 55])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(3).standard_normal((1, 2, 56, 55)).astype(np.float32)
    got = Float64Evaluator(model).run({"x": x})["y"]
    want = run(model, {"x": x})["y"]
    assert got.shape == want.shape == (1, 2, 28, 27)
    np.testing.assert_array_equal(got, want.astype(np.float64))  # max is exact
    # a window starting in the right padding is dropped, one starting in the input kept
    assert pooled_size(5, 0, 1, 2, 2, ceil=True) == 3 and pooled_size(4, 0, 1, 2, 2, True) == 2


def test_float16_graph_gets_a_float64_truth():
    """Every floating type becomes double: the truth of a float16 graph is its float16
    parameters evaluated in double, not the float16 graph itself."""
    model = _conv_bn(17)
    for init in model.graph.initializer:
        init.CopyFrom(
            numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name)
        )
    for v in list(model.graph.input) + list(model.graph.output):
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    assert all(t.data_type == TensorProto.DOUBLE for t in double_graph(model).graph.initializer)
    x = np.random.default_rng(5).standard_normal((2, 3, 6, 6)).astype(np.float16)
    got = Float64Evaluator(model).run({"x": x})["y"]
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(_get(model, "w").astype(np.float64)))
        conv.bias.copy_(torch.from_numpy(_get(model, "b").astype(np.float64)))
        c = conv(torch.from_numpy(x.astype(np.float64))).numpy()
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, _bn_torch(c, model), rtol=1e-12, atol=1e-12)
    half = run(model, {"x": x})["y"]
    assert np.abs(half - got).max() > 1e-4  # float16's own error is visible against it


def test_intermediates_are_freed_after_their_last_reader():
    """A chain of 40 element-wise nodes over 1M doubles keeps a few alive, not 40."""
    n = 40
    nodes = [helper.make_node("Relu", ["x"], ["h0"])]
    nodes += [helper.make_node("Neg", [f"h{i}"], [f"h{i + 1}"]) for i in range(n)]
    g = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1000, 1000])],
        [helper.make_tensor_value_info(f"h{n}", TensorProto.DOUBLE, [1000, 1000])],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(6).standard_normal((1000, 1000))
    evaluator = Float64Evaluator(model)
    tracemalloc.start()
    out = evaluator.run({"x": x})[f"h{n}"]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(out, np.maximum(x, 0))  # 40 negations: even
    assert peak < 5 * x.nbytes, peak / x.nbytes


# ---- the verdict around it ---------------------------------------------------------------


def _gelu_model() -> onnx.ModelProto:
    """An ONNX Runtime contrib op (com.microsoft Gelu) the float64 evaluator cannot run."""
    node = helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")
    g = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
    )
    return helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )


def test_a_missing_truth_is_reported_not_silent():
    model = _gelu_model()
    result = compare(model, model, random_feeds(model), "random")
    assert result.passed and result.outputs[0].verdict.criterion == "magnitude"
    assert "Gelu" in result.float64_problem and result.to_dict()["float64_problem"]
    assert "warning: no float64 truth" in result.format()


def test_nothing_to_fold_needs_no_float64_walk(tmp_path, monkeypatch):
    model = next(c for c in onnx_zoo.CASES if c.name == "relu_between").build()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)

    def no_walk(*args, **kwargs):
        raise AssertionError("a float64 evaluation was started")

    monkeypatch.setattr("bnfold.runtime.float64_eval.Float64Evaluator", no_walk)
    out, report, comparison = fold_onnx_file(path, progress=False)
    assert out is not None and not report.folded and report.batchnorms == 1
    assert comparison.passed and comparison.float64.startswith("not needed")
    assert all(o.verdict.criterion == "exact" for o in comparison.outputs)


def test_progress_goes_to_its_stream_one_line_per_stage(tmp_path):
    model = _conv_bn(17)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    stream = io.StringIO()
    fold_onnx_file(path, progress=None)  # not a terminal: nothing anywhere
    progress = StageProgress(True, stream)
    progress.say("fold: a stage")
    for i in range(1, 4):
        progress.walk(i, 3)
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("fold: a stage") and lines[1].endswith("(3 nodes)")
    assert StageProgress(None, io.StringIO()).enabled is False


# ---- the injected-error matrix -----------------------------------------------------------


def _busiest_channels(model: onnx.ModelProto, bn: onnx.NodeProto, feeds: dict) -> list[int]:
    """The BN's output channels by their mean positive activation on ``feeds``, largest
    first (ONNX Runtime): an error in a channel no input activates (one a ReLU zeroes
    everywhere) changes no output, and no output-based check can see it."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info(bn.output[0], TensorProto.FLOAT, None))
    act = run(probe, feeds)[bn.output[0]]
    per_channel = np.maximum(act, 0).mean(axis=tuple(i for i in range(act.ndim) if i != 1))
    return [int(c) for c in np.argsort(-per_channel)]


def _inject(model: onnx.ModelProto, kind: str, feeds: dict) -> onnx.ModelProto:
    """``model`` folded with one error in its first foldable BN: a wrong eps or a forgotten
    beta in its fold, or the layer it folded into with the busiest channel's row scaled by
    1 + 1e-3, or the two busiest channels swapped."""
    first = fold_onnx(model)[1].folded[0].bn
    work = onnx.ModelProto()
    work.CopyFrom(model)
    bn = next(n for n in work.graph.node if n.name == first)
    busy = _busiest_channels(model, bn, feeds)
    if kind == "wrong_eps":
        eps = next((a for a in bn.attribute if a.name == "epsilon"), None)
        if eps is None:
            bn.attribute.append(helper.make_attribute("epsilon", 1e-3))
        else:
            eps.f = 1e-3 if eps.f < 1e-4 else eps.f * 0.01
    if kind == "forgotten_beta":
        _set(work, bn.input[2], np.zeros_like(_get(work, bn.input[2])))
    folded, report = fold_onnx(work)
    layer = _folded_layer(folded, report, 0)
    w = _get(folded, layer.input[1]).copy()
    rows = busy[:2]
    if kind == "scaled_row":
        w[rows[0]] *= 1 + 1e-3
    if kind == "swapped_channels":
        w[rows] = w[rows[::-1]]
        if len(layer.input) > 2:
            b = _get(folded, layer.input[2]).copy()
            b[rows] = b[rows[::-1]]
            _set(folded, layer.input[2], b)
    _set(folded, layer.input[1], w)
    return folded


INJECTED = ["wrong_eps", "scaled_row", "swapped_channels", "forgotten_beta"]


@pytest.mark.parametrize("case", ["bn_chain", "conv_1d_3d", "gemm_variants", "resnet18"])
def test_every_injected_error_fails(case):
    model = next(c for c in onnx_zoo.CASES if c.name == case).build()
    feeds = random_feeds(model, seed=7, dynamic=3)
    assert compare(model, fold_onnx(model)[0], feeds, "random").passed
    for kind in INJECTED:
        result = compare(model, _inject(model, kind, feeds), feeds, "random")
        assert not result.passed, (case, kind, result.format())
        assert {o.verdict.criterion for o in result.outputs} == {"float64"}


def test_float_constant_attributes_become_double():
    """``Constant(value_float=...)`` would come out float32 and keep a float32 path alive."""
    nodes = [
        helper.make_node("Constant", [], ["a"], value_float=0.1),
        helper.make_node("Constant", [], ["b"], value_floats=[0.2, 0.3]),
        helper.make_node("Div", ["a", "b"], ["y"]),
    ]
    g = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("y", 1, [2])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    got = Float64Evaluator(model).run({})["y"]
    want = np.float64(np.float32(0.1)) / np.float32([0.2, 0.3]).astype(np.float64)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, want)


# ---- the numpy kernels, one node at a time ------------------------------------------------


def _one_node(op: str, x: np.ndarray, inits: dict, opset: int = 19, **attrs) -> onnx.ModelProto:
    """A float32 model of one ``op`` node over input ``x`` and initializers ``inits``."""
    node = helper.make_node(op, ["x", *inits], ["y"], **attrs)
    g = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a.astype(np.float32), name) for name, a in inits.items()],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _float64(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    got = Float64Evaluator(model).run({"x": x})["y"]
    assert got.dtype == np.float64
    return got


def _t64(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float64))


def _torch_pads(begin: list[int], end: list[int]) -> list[int]:
    """torch.nn.functional.pad's order (last axis first) for ONNX begin/end pads."""
    return [p for b, e in zip(reversed(begin), reversed(end), strict=True) for p in (b, e)]


@st.composite
def conv_geometries(draw):
    """A Conv: 1-3 spatial axes, kernel/stride/dilation/asymmetric pads per axis, and a
    grouping: plain, grouped, depthwise, or depthwise with a depth multiplier."""
    n = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["plain", "grouped", "depthwise", "multiplier"]))
    group = {"plain": 1, "grouped": draw(st.integers(2, 3))}.get(kind, draw(st.integers(2, 4)))
    cg = 1 if kind in ("depthwise", "multiplier") else draw(st.integers(1, 3))
    mult = draw(st.integers(2, 3)) if kind == "multiplier" else draw(st.integers(1, 2))
    big = 5 if n < 3 else 3
    kernel = [draw(st.integers(1, big)) for _ in range(n)]
    strides = [draw(st.integers(1, 3)) for _ in range(n)]
    dil = [draw(st.integers(1, 3)) for _ in range(n)]
    begin = [draw(st.integers(0, 3)) for _ in range(n)]
    end = [draw(st.integers(0, 3)) for _ in range(n)]
    sizes = [
        draw(st.integers(max(1, (k - 1) * d + 1 - b - e), (k - 1) * d + 1 + (9 if n < 3 else 4)))
        for k, d, b, e in zip(kernel, dil, begin, end, strict=True)
    ]
    batch = draw(st.integers(1, 3))
    return dict(
        x=(batch, group * cg, *sizes),
        w=(group * mult, cg, *kernel),
        group=group,
        strides=strides,
        dilations=dil,
        pads=begin + end,
        bias=draw(st.booleans()),
    )


@settings(max_examples=120, deadline=None, derandomize=True, database=None)
@given(conv_geometries())
def test_conv_agrees_with_torch_in_double(geometry):
    """Asymmetric pads as torch's F.pad before its unpadded convNd."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal(geometry["x"]).astype(np.float32)
    inits = {"w": rng.standard_normal(geometry["w"])}
    if geometry["bias"]:
        inits["b"] = rng.standard_normal(geometry["w"][0])
    attrs = {k: geometry[k] for k in ("group", "strides", "dilations", "pads")}
    got = _float64(_one_node("Conv", x, inits, **attrs), x)
    want = _torch_conv(x, inits, attrs)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def _torch_conv(x: np.ndarray, inits: dict, attrs: dict) -> np.ndarray:
    """torch's convNd in double on float32 parameters: ONNX's (asymmetric) pads as an
    F.pad before an unpadded convolution."""
    n = x.ndim - 2
    w32 = {k: v.astype(np.float32) for k, v in inits.items()}
    pads = attrs.get("pads", [0] * 2 * n)
    padded = F.pad(_t64(x), _torch_pads(pads[:n], pads[n:]))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    bias = _t64(w32["b"]) if "b" in w32 else None
    strides, dil = attrs.get("strides", 1), attrs.get("dilations", 1)
    with torch.no_grad():
        return conv(padded, _t64(w32["w"]), bias, strides, 0, dil, attrs.get("group", 1)).numpy()


@pytest.mark.parametrize(
    "x_shape, w_shape, attrs, kept",
    [
        # as deeplabv3's ASPP at rate 36 over 33x33: only the centre tap reads; then all
        ((1, 6, 9, 9), (4, 6, 3, 3), {"dilations": [10, 10], "pads": [10] * 4}, (1, 1)),
        ((1, 6, 9, 9), (4, 6, 3, 3), {"dilations": [6, 6], "pads": [6] * 4}, (3, 3)),
        ((2, 3, 1, 1), (5, 3, 3, 3), {"pads": [1, 1, 1, 1]}, (1, 1)),  # a 1x1 map
        ((2, 3, 1, 2), (5, 3, 3, 3), {"pads": [1, 1, 1, 1], "strides": [2, 2]}, (1, 2)),
        # tap 0 reads only padding, tap 1 starts at 3, past the begin padding (1)
        ((1, 2, 5), (3, 2, 2), {"pads": [1, 0], "strides": [10], "dilations": [3]}, (1,)),
        ((1, 2, 1, 7), (3, 2, 3, 2), {"pads": [4, 3, 5, 0], "dilations": [1, 4]}, (3, 2)),
        (
            (1, 4, 3, 3),
            (8, 1, 5, 5),
            {"pads": [6, 6, 6, 6], "dilations": [3, 3], "group": 4},
            (1, 1),
        ),
        # no tap reads the input: the output is the bias
        ((1, 2, 1), (2, 2, 2), {"pads": [1, 3], "strides": [3], "dilations": [2]}, None),
    ],
)
def test_taps_that_read_only_padding_are_left_out_exactly(
    x_shape, w_shape, attrs, kept, monkeypatch
):
    rng = np.random.default_rng(14)
    x = rng.standard_normal(x_shape).astype(np.float32)
    inits = {"w": rng.standard_normal(w_shape), "b": rng.standard_normal(w_shape[0])}
    kernels = []
    for name in ("_im2col", "_depthwise"):
        kernel = getattr(float64_eval, name)

        def recorded(x, W, *args, _kernel=kernel):
            kernels.append(W.shape[2:])
            return _kernel(x, W, *args)

        monkeypatch.setattr(float64_eval, name, recorded)
    got = _float64(_one_node("Conv", x, inits, **attrs), x)
    want = _torch_conv(x, inits, attrs)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert kernels == ([kept] if kept else []), kernels


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize(
    "x_shape, w_shape, group, strides, dilations",
    [
        ((2, 4, 9, 8), (6, 2, 3, 2), 2, [2, 3], [1, 1]),
        ((1, 3, 10, 7), (6, 1, 4, 3), 3, [3, 2], [2, 1]),  # depthwise, multiplier 2
        ((2, 2, 7), (3, 2, 4), 1, [2], [2]),
        ((1, 2, 5, 6, 7), (4, 2, 2, 3, 2), 1, [2, 1, 3], [1, 2, 1]),
    ],
)
def test_conv_auto_pad_agrees_with_onnx_reference_and_runtime(
    mode, x_shape, w_shape, group, strides, dilations
):
    """auto_pad's padding is ONNX's own definition: onnx.reference (in double) for the
    values, ONNX Runtime (float32) for the shape too where it runs (no dilated SAME_*)."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal(x_shape).astype(np.float32)
    inits = {"w": rng.standard_normal(w_shape), "b": rng.standard_normal(w_shape[0])}
    model = _one_node(
        "Conv", x, inits, auto_pad=mode, group=group, strides=strides, dilations=dilations
    )
    got = _float64(model, x)
    want = ReferenceEvaluator(double_graph(model)).run(None, {"x": x.astype(np.float64)})[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    if mode == "VALID" or dilations == [1] * len(dilations):  # ONNX Runtime's limit
        ort = run(model, {"x": x})["y"]
        assert got.shape == ort.shape and np.abs(got - ort).max() < 1e-4


def test_large_convs_are_chunked_without_changing_the_result(monkeypatch):
    """A column matrix over the budget is built in chunks of samples, or of output rows
    along the first spatial axis (the last chunk shorter): the same numbers as torch."""
    rng = np.random.default_rng(10)
    x = rng.standard_normal((3, 4, 7, 6, 5)).astype(np.float32)
    inits = {"w": rng.standard_normal((5, 4, 3, 2, 2)), "b": rng.standard_normal(5)}
    attrs = {"pads": [1, 0, 1, 1, 1, 0], "strides": [1, 2, 1]}
    model = _one_node("Conv", x, inits, **attrs)
    want = _torch_conv(x, inits, attrs)
    per_row = 4 * 12 * 3 * 5  # column elements per output row (first axis) of a sample
    calls = []
    matmul = np.matmul

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return matmul(*args, **kwargs)

    monkeypatch.setattr(float64_eval.np, "matmul", counted)
    for budget, chunks in [(per_row * 7 * 2, 2), (per_row * 3, 9), (1, 21), (1 << 22, 1)]:
        monkeypatch.setattr(float64_eval, "COLUMN_BUDGET", budget)
        calls.clear()
        np.testing.assert_allclose(_float64(model, x), want, rtol=1e-12, atol=1e-12)
        assert len(calls) == chunks, (budget, calls)


def _pool_cases():
    """(attributes, torch-expressible): pools over 1-3 spatial axes with ceil_mode,
    strides, dilations, asymmetric pads and auto_pad."""
    return [
        ({"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, True),  # googlenet
        ({"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, True),
        ({"kernel_shape": [2, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}, True),
        ({"kernel_shape": [3], "strides": [2], "pads": [1, 1], "ceil_mode": 1}, True),
        ({"kernel_shape": [2, 3, 2], "strides": [2, 1, 2], "ceil_mode": 1}, True),
        ({"kernel_shape": [3, 2], "strides": [2, 2], "pads": [0, 1, 2, 0], "ceil_mode": 1}, False),
        ({"kernel_shape": [3, 3], "strides": [3, 2], "pads": [2, 0, 0, 1]}, False),
        ({"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}, False),
        ({"kernel_shape": [4, 3], "strides": [3, 2], "auto_pad": "SAME_LOWER"}, False),
        ({"kernel_shape": [2, 2], "strides": [2, 2], "auto_pad": "VALID", "ceil_mode": 1}, False),
    ]


def _pool_input(attrs: dict, seed: int) -> np.ndarray:
    sizes = {1: [11], 2: [11, 10], 3: [5, 7, 6]}[len(attrs["kernel_shape"])]
    return np.random.default_rng(seed).standard_normal((2, 3, *sizes)).astype(np.float32)


def _torch_pool(kind: str, x: np.ndarray, attrs: dict, **options) -> np.ndarray:
    """torch's ``{kind}_pool{n}d`` in double on a pool node's (symmetric) geometry."""
    n = len(attrs["kernel_shape"])
    pads = attrs.get("pads", [0] * 2 * n)
    assert pads[:n] == pads[n:]
    pool = getattr(F, f"{kind}_pool{n}d")
    with torch.no_grad():
        y = pool(
            _t64(x),
            attrs["kernel_shape"],
            attrs["strides"],
            pads[:n],
            ceil_mode=bool(attrs.get("ceil_mode")),
            **options,
        )
    return y.numpy()


@pytest.mark.parametrize("dilated", [False, True])
@pytest.mark.parametrize("attrs, torch_can", _pool_cases())
def test_max_pool_is_onnx_runtimes_exactly(attrs, torch_can, dilated):
    """The max of float32 values is exact: ONNX Runtime in float32 is an exact oracle,
    shape included; torch's max_pool in double too where it has the geometry."""
    n = len(attrs["kernel_shape"])
    if dilated:
        attrs = {**attrs, "dilations": [2] + [1] * (n - 1)}
    x = _pool_input(attrs, 11)
    model = _one_node("MaxPool", x, {}, **attrs)
    got = _float64(model, x)
    if dilated and attrs.get("auto_pad", "").startswith("SAME"):
        # ONNX Runtime pads as if undilated (11 rows, stride 3: 3 rows out); ONNX says
        # ceil(size / stride) positions, and the truth follows ONNX
        sizes = [-(-size // s) for size, s in zip(x.shape[2:], attrs["strides"], strict=True)]
        assert list(got.shape[2:]) == sizes
        return
    np.testing.assert_array_equal(got, run(model, {"x": x})["y"].astype(np.float64))
    if torch_can:
        want = _torch_pool("max", x, attrs, dilation=attrs.get("dilations", 1))
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("count_include_pad", [0, 1])
@pytest.mark.parametrize("attrs, torch_can", _pool_cases())
def test_average_pool_agrees_with_torch_and_onnx_runtime(attrs, torch_can, count_include_pad):
    """Values against torch's avg_pool in double where it has the geometry (its divisor
    rule is ONNX Runtime's: never the ceil_mode overhang); ONNX Runtime in float32 for
    every geometry."""
    x = _pool_input(attrs, 12)
    model = _one_node("AveragePool", x, {}, count_include_pad=count_include_pad, **attrs)
    got = _float64(model, x)
    ort = run(model, {"x": x})["y"]
    assert got.shape == ort.shape and np.abs(got - ort).max() < 1e-6
    if torch_can:
        want = _torch_pool("avg", x, attrs, count_include_pad=bool(count_include_pad))
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)


def test_matmul_of_a_transposed_stack_and_erf_are_double():
    """ConvNeXt's MLP: a channels-last view times a matrix, then GELU's Erf; against
    torch in double (onnx.reference's Erf rounded to float32: ~1e-8 off)."""
    rng = np.random.default_rng(15)
    x = rng.standard_normal((2, 6, 5, 4)).astype(np.float32)
    w = rng.standard_normal((6, 7))
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["t", "w"], ["m"]),
        helper.make_node("Erf", ["m"], ["y"]),
    ]
    inits = [onnx_zoo._t("w", w.astype(np.float32))]
    model = onnx_zoo.graph_model(nodes, [("x", [2, 6, 5, 4])], [("y", [2, 5, 4, 7])], inits, 17)
    got = _float64(model, x)
    with torch.no_grad():
        m = _t64(x).permute(0, 2, 3, 1) @ _t64(w.astype(np.float32))
        want = torch.erf(m).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-15)


_TORCH_FREE = """
import sys
import numpy as np
import onnx
from bnfold.runtime.float64_eval import Float64Evaluator
model = onnx.load(sys.argv[1])
evaluator = Float64Evaluator(model)
built = "torch" in sys.modules
x = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)
y = evaluator.run({"x": x})["y"]
print(built, "torch" in sys.modules, y.shape)
"""


def _cnn_graph(extra: list[onnx.NodeProto]) -> onnx.ModelProto:
    """Conv/BN/Relu/MaxPool/AveragePool/Gemm/Add/Concat, then ``extra`` nodes on ``z``."""
    rng = np.random.default_rng(13)
    inits = [
        onnx_zoo._t("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
        onnx_zoo._t("dw", rng.standard_normal((4, 1, 3, 3)).astype(np.float32)),
        *onnx_zoo.bn_params("bn", 4, 3),
        onnx_zoo._t("g", rng.standard_normal((5, 8)).astype(np.float32)),
        onnx_zoo._t("up_w", rng.standard_normal((8, 8, 2, 2)).astype(np.float32)),
        onnx_zoo._t("up_scales", np.array([1, 1, 2, 2], np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        onnx_zoo.bn_node("bn", "c", "b"),
        helper.make_node("Relu", ["b"], ["r"]),
        helper.make_node("Conv", ["r", "dw"], ["d"], group=4, pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["d", "r"], ["a"]),
        helper.make_node("MaxPool", ["a"], ["m"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
        helper.make_node("AveragePool", ["a"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Concat", ["m", "p"], ["z"], axis=1),
        *extra,
        helper.make_node("GlobalAveragePool", ["z"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["f"]),
        helper.make_node("Gemm", ["f", "g"], ["y"], transB=1),
    ]
    return onnx_zoo.graph_model(nodes, [("x", [2, 3, 12, 12])], [("y", [2, 5])], inits, 17)


@pytest.mark.parametrize("transposed", [False, True])
def test_a_cnn_without_convtranspose_never_imports_torch(tmp_path, transposed):
    """In a fresh process: building and running the evaluator on common CNN ops (a
    bilinear Resize among them) imports no torch (~2 s); a ConvTranspose imports it, when
    it runs."""
    if transposed:
        up = helper.make_node("ConvTranspose", ["z", "up_w"], ["u"], strides=[2, 2])
    else:
        up = helper.make_node(
            "Resize", ["z", "", "up_scales"], ["u"], mode="linear",
            coordinate_transformation_mode="half_pixel",
        )  # fmt: skip
    extra = [up, helper.make_node("MaxPool", ["u"], ["z2"], kernel_shape=[2, 2], strides=[2, 2])]
    model = _cnn_graph(extra)
    for node in model.graph.node:
        if node.op_type == "GlobalAveragePool":
            node.input[0] = "z2"
    path = tmp_path / "cnn.onnx"
    onnx.save(model, path)
    out = subprocess.run(
        [sys.executable, "-c", _TORCH_FREE, str(path)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    ).stdout.split()
    assert out[:2] == ["False", str(transposed)] and out[2:] == ["(2,", "5)"], out
    # and the graph's function: ONNX Runtime in float32
    x = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)
    assert np.abs(_float64(model, x) - run(model, {"x": x})["y"]).max() < 1e-4
