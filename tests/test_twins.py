"""Float64 twins (bnfold.runtime.twins) and the parameter test they feed (bnfold.verify.rounding).

The twins are checked against evaluations nobody here wrote: numpy in float64 for a graph
built with ``onnx.helper``, and torch's ``.double()`` for the exported ONNX files."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.fold.modules import fold_batchnorm
from bnfold.mlp.checkpoint import Checkpoint, load_checkpoint
from bnfold.pipeline.export import build_graph, metadata, set_metadata
from bnfold.runtime.infer import TorchPredictor, load_predictor
from bnfold.runtime.onnx_runtime import OnnxPredictor
from bnfold.runtime.twins import double_graph, float32_spacing, onnx_twin, rerounding_noise
from bnfold.verify.cases import fold_with, scale_row, torch_fused
from bnfold.verify.domain import plan_domain
from bnfold.verify.rounding import judge_outputs
from bnfold.verify.verdict import verify


def _helper_graph(w: np.ndarray, b: np.ndarray):
    """y = tanh(Cast(x) @ w + b) * 0.5, with a Constant and a Cast, made with onnx.helper."""
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["xf", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["a"]),
        helper.make_node("Tanh", ["a"], ["t"]),
        helper.make_node("Constant", [], ["half"], value=numpy_helper.from_array(np.float32(0.5))),
        helper.make_node("Mul", ["t", "half"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.INT64, [None, w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, w.shape[1]])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_onnx_twin_computes_in_double():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 8)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    x = rng.integers(-5, 5, size=(100, 64))
    twin = onnx_twin(_helper_graph(w, b))
    assert twin is not None
    got = twin.logits(x)
    want = np.tanh(x.astype(np.float64) @ w.astype(np.float64) + b.astype(np.float64)) * 0.5
    assert got.dtype == np.float64
    assert np.abs(got - want).max() < 1e-14
    # and the float32 graph it came from is measurably less exact
    import onnxruntime as ort

    f32 = ort.InferenceSession(_helper_graph(w, b).SerializeToString()).run(None, {"x": x})[0]
    assert np.abs(f32 - want).max() > 1e-9


def test_a_graph_without_double_kernels_has_no_twin():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    conv = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "c", [x], [y], [w])
    model = helper.make_model(conv, opset_imports=[helper.make_opsetid("", 17)])
    assert double_graph(model).graph.initializer[0].data_type == TensorProto.DOUBLE
    assert onnx_twin(model) is None  # ONNX Runtime has no double Conv


def test_exported_onnx_twins_match_torch_in_double(trained_checkpoint, exported):
    paths = exported.paths
    bn = load_checkpoint(trained_checkpoint)
    plan = plan_domain(bn.vocab.size, bn.config.block_size, max_exhaustive=0, sample_size=3000)
    x = np.concatenate(list(plan.chunks()))
    torch_bn = TorchPredictor(bn).float64_twin().logits(x)
    onnx_bn = load_predictor(paths["bn"]).float64_twin().logits(x)
    assert np.abs(onnx_bn - torch_bn).max() < 1e-10 * np.abs(torch_bn).max()
    f32 = load_predictor(paths["bn"]).logits(x).astype(np.float64)
    assert np.abs(f32 - torch_bn).max() > 1e-8  # the float32 session is not the twin


def test_rerounding_noise_is_one_cast():
    rng = np.random.default_rng(1)
    values = rng.standard_normal(10_000) * 10.0 ** rng.integers(-8, 8, 10_000)
    noise = rerounding_noise(values, rng)
    spacing = float32_spacing(values)
    assert (np.abs(noise) <= spacing / 2).all()
    # uniform on (-1/2, 1/2) spacings: mean square 1/12 of the spacing squared
    assert 0.07 < np.mean((noise / spacing) ** 2) < 0.097
    # one cast of a float64 value to float32 moves it by at most half that spacing
    cast = values.astype(np.float32).astype(np.float64)
    assert (np.abs(cast - values) <= spacing / 2 * (1 + 1e-12)).all()


def test_rerounded_twins_are_seeded(trained_checkpoint):
    twin = TorchPredictor(trained_checkpoint).float64_twin()
    x = np.zeros((4, load_checkpoint(trained_checkpoint).config.block_size), dtype=np.int64)
    a, b, c = (twin.rerounded(s).logits(x) for s in (1, 1, 2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert 0 < np.abs(a - twin.logits(x)).max() < 1e-4


def test_parameter_test_on_synthetic_outputs():
    """Truth known by construction: a twin off the truth by one re-rounding passes, by ten
    fails, and the float32 outputs alone (identical here) would not tell them apart."""
    rng = np.random.default_rng(2)
    z = rng.standard_normal((2000, 27)) * 5
    step = rng.standard_normal((2000, 27)) * 1e-7
    f32 = z.astype(np.float32)
    same = judge_outputs(f32, f32, z, twin=z + step, rerounded=[z + 2 * step])
    assert same.passed and same.twin_ratio == pytest.approx(1.0)
    off = judge_outputs(f32, f32, z, twin=z + 10 * step, rerounded=[z + 11 * step])
    assert not off.passed and off.twin_ratio == pytest.approx(10.0)
    with pytest.raises(ValueError):
        judge_outputs(f32, f32, None, twin=z, rerounded=[z])


def _onnx_predictor(model, ckpt, label: str) -> OnnxPredictor:
    proto = build_graph(model, name=label)
    meta = metadata(ckpt.vocab, model.config.to_dict(), True, Path(f"{label}.pt"), "0" * 64)
    set_metadata(proto, meta)
    return OnnxPredictor(f"{label}.onnx", model_bytes=proto.SerializeToString())


@pytest.mark.slow
def test_two_onnx_files_judge_parameters_through_double_graphs(trained_checkpoint, exported):
    """With ONNX files alone, bn.onnx run in double is the truth, and the candidate's twin
    tells a correct fold from a wrong eps that float32 outputs barely show."""
    bn_onnx = load_predictor(exported.paths["bn"])
    ckpt = load_checkpoint(trained_checkpoint)
    folded, _ = fold_batchnorm(ckpt.model.eval())
    correct = _onnx_predictor(folded, ckpt, "folded")
    r = verify(bn_onnx, correct)
    assert r.passed and r.criterion == "float64" and r.parameter_ratio is not None, r.reason
    assert r.float64_reference == str(bn_onnx.path)
    torch_fold = _onnx_predictor(torch_fused(ckpt.model), ckpt, "torch")
    assert verify(correct, torch_fold).passed  # no BN network: correct's parameters judge
    for wrong in (fold_with(ckpt.model, eps={0: 1e-3}), scale_row(folded, random.Random(0))):
        wrong_onnx = _onnx_predictor(wrong, ckpt, "wrong")
        for reference in (bn_onnx, correct):
            r = verify(reference, wrong_onnx)
            assert not r.passed and r.parameter_ratio > r.parameter_bound, r.reason


def test_parameter_test_is_reported(trained_checkpoint):
    ckpt = load_checkpoint(trained_checkpoint)
    folded, _ = fold_batchnorm(ckpt.model.eval())
    r = verify(TorchPredictor(ckpt), TorchPredictor(Checkpoint(folded, ckpt.vocab), "folded"))
    d = r.to_dict()
    assert d["parameter_bound"] == 3.0 and 0 < d["parameter_ratio"] < 3.0
    assert 0 < d["parameter_contexts"] <= 10_000
    assert "parameters" in r.format()
    override = verify(
        TorchPredictor(ckpt), TorchPredictor(Checkpoint(folded, ckpt.vocab)), tolerance=1e-3
    )
    assert override.criterion == "absolute" and override.parameter_ratio is None
