"""The ONNX folder on a zoo of graphs nobody here wrote the weights of: torchvision CNNs,
torch.onnx exports with their BN nodes kept, onnx.helper graphs; every fold is checked in
ONNX Runtime (optimisations off) against the original and a float64 evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import onnx_zoo
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from torch import nn

from bnfold.cli import main
from bnfold.errors import BnfoldError
from bnfold.pipeline.onnx_fold import check_contract, fold_onnx, load_model
from bnfold.verify.onnx import compare, random_feeds, run

BUILT: dict[str, onnx.ModelProto] = {}


def built(case: onnx_zoo.ZooCase) -> onnx.ModelProto:
    if case.name not in BUILT:
        BUILT[case.name] = case.build()
    return BUILT[case.name]


def bn_count(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes the model runs (a local function's once per call)."""
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def read_names(model: onnx.ModelProto) -> set[str]:
    return {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}


@pytest.mark.parametrize("case", onnx_zoo.CASES, ids=lambda c: c.name)
def test_zoo_case_folds_exactly_what_is_foldable(case):
    model = built(case)
    folded, report = fold_onnx(model)
    assert report.batchnorms == case.batchnorms == bn_count(model)
    assert len(report.folded) == case.foldable
    assert bn_count(folded) == case.batchnorms - case.foldable
    for needle in case.refusals:
        assert any(needle in left.reason for left in report.left), (needle, report.format())
    # the graph's contract: checker, interface, opset, metadata, no dangling initializers
    check_contract(model, folded)
    assert list(folded.opset_import) == list(model.opset_import)
    assert list(folded.metadata_props) == list(model.metadata_props)
    assert {t.name for t in folded.graph.initializer} <= read_names(folded)
    # same function at the exported batch size and at another one, judged against float64
    for batch in (2, 3):
        result = compare(model, folded, random_feeds(model, seed=batch, dynamic=batch), "zoo")
        assert result.passed, result.format()


@pytest.mark.parametrize("case", ["fp16_net", "bn_before_conv", "conv_1d_3d"])
def test_a_session_given_its_weights_apart_computes_what_the_whole_file_does(case):
    """ONNX Runtime reads the large weights from arrays (no 100 MB protobuf parse): the
    session computes bit for bit what one made from the whole model computes, and never
    looks for the file the stubs name."""
    from bnfold.io.onnx_files import IN_MEMORY, weights_apart
    from bnfold.verify.onnx import session

    model = built(next(c for c in onnx_zoo.CASES if c.name == case))
    model.metadata_props.add(key="kept", value="with the structure")
    model.doc_string = "kept too"
    apart = weights_apart(model)
    structure = apart.structure_bytes()
    assert apart.arrays and len(structure) < len(model.SerializeToString())
    assert not Path(IN_MEMORY).exists()
    feeds = random_feeds(model, seed=3)
    whole, given = session(model), session(structure, apart.arrays)
    names = [o.name for o in whole.get_outputs()]
    for a, b in zip(whole.run(names, feeds), given.run(names, feeds), strict=True):
        np.testing.assert_array_equal(a, b)
    # and put back together, it is the very model it was taken from
    assert apart.whole() == model


def test_a_stub_without_its_array_is_never_looked_up_as_a_file(tmp_path, monkeypatch):
    """A weight held apart is a stub naming a location that is no file: a session, a run,
    the float64 evaluator or the fold's constant reader given the structure without the
    arrays raise at once, and never read a file of that name planted in the folder."""
    from bnfold.fold.onnx.graph import Graph
    from bnfold.io.onnx_files import IN_MEMORY, weights_apart
    from bnfold.runtime.float64_eval import Float64Evaluator
    from bnfold.verify.onnx import session

    model = built(next(c for c in onnx_zoo.CASES if c.name == "bn_before_conv"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / IN_MEMORY).write_bytes(bytes(1 << 20))
    apart = weights_apart(model)
    stub = next(iter(apart.arrays))
    uses = (
        session,
        lambda m: run(m, random_feeds(model)),
        Float64Evaluator,
        lambda m: Graph(m).constant(stub),
    )
    for use in uses:
        with pytest.raises(ValueError, match="held apart"):
            use(apart.structure)


def _with_every_field_around_its_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with fields set before and after each place a weight is spliced into:
    the model's, the graph's and a large weight's own (doc strings, metadata, training
    info), and a float16 and an int64 weight."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.doc_string, out.graph.doc_string = "model", "graph"
    out.metadata_props.add(key="a", value="b")
    out.training_info.add().initialization.name = "init"
    big = max(out.graph.initializer, key=lambda t: np.prod(t.dims))
    big.doc_string = "a weight's own doc string"
    big.metadata_props.add(key="c", value="d")
    for name, value in (("half", np.arange(100, dtype=np.float16)), ("ints", np.arange(70))):
        out.graph.initializer.append(numpy_helper.from_array(value, name))
    return out


@pytest.mark.parametrize("case", [c.name for c in onnx_zoo.CASES])
def test_a_model_apart_is_saved_byte_for_byte_as_protobuf_writes_it(case, tmp_path):
    """save() writes each weight straight from its array between the fields protobuf
    writes around it: the file is exactly the whole model's protobuf serialisation (and
    that is the model it was taken from), before and after folding."""
    from bnfold.io.onnx_files import weights_apart
    from bnfold.pipeline.onnx_fold import fold_apart

    model = _with_every_field_around_its_weights(
        built(next(c for c in onnx_zoo.CASES if c.name == case))
    )
    apart = weights_apart(model)
    assert apart.arrays
    apart.save(tmp_path / "apart.onnx")
    assert (tmp_path / "apart.onnx").read_bytes() == model.SerializeToString()
    folded, _ = fold_apart(apart)
    folded.save(tmp_path / "folded.onnx")
    assert (tmp_path / "folded.onnx").read_bytes() == folded.whole().SerializeToString()
    assert onnx.load(tmp_path / "folded.onnx") == folded.whole()


def test_reasons_are_deterministic():
    case = next(c for c in onnx_zoo.CASES if c.name == "traps")
    a = fold_onnx(built(case))[1].to_dict()
    b = fold_onnx(case.build())[1].to_dict()
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    assert "0x" not in json.dumps(a)


def test_shared_weight_is_cloned_and_the_other_user_keeps_it():
    case = next(c for c in onnx_zoo.CASES if c.name == "shared_weight")
    model = built(case)
    folded, _ = fold_onnx(model)
    conv2 = next(n for n in folded.graph.node if n.name == "conv2")
    conv1 = next(n for n in folded.graph.node if n.name == "conv1")
    assert conv2.input[1] == "w" and conv1.input[1] != "w"
    init = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    orig = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(init["w"], orig["w"])


def test_bn_stats_as_constant_nodes_and_cast_transpose_weights_fold():
    case = next(c for c in onnx_zoo.CASES if c.name == "constant_expressions")
    folded, report = fold_onnx(built(case))
    assert [n.op_type for n in folded.graph.node] == ["Conv"]  # constants pruned, BN gone
    assert report.folded[0].layer == "conv"


def test_the_comparison_catches_a_wrong_fold():
    """Scale one folded weight by 1 + 1e-4: far beyond float32 rounding, must fail."""
    case = next(c for c in onnx_zoo.CASES if c.name == "bn_chain")
    model = built(case)
    folded, _ = fold_onnx(model)
    w = folded.graph.initializer[0]
    arr = numpy_helper.to_array(w).copy()
    arr.flat[0] *= 1 + 1e-4
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    result = compare(model, folded, random_feeds(model), "zoo")
    assert not result.passed
    assert result.float64 != "" and result.outputs[0].verdict.criterion == "float64"


def _overflowing() -> onnx.ModelProto:
    inits = [
        numpy_helper.from_array(np.full((2, 2, 1, 1), 1e30, np.float32), "w"),
        *[
            numpy_helper.from_array(np.asarray(v, np.float32), n)
            for n, v in (("s", [1e30, 1.0]), ("b", [0, 0]), ("m", [0, 0]), ("v", [1, 1]))
        ],
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn"),
    ]
    return onnx_zoo.graph_model(nodes, [("x", ["n", 2, 3, 3])], [("y", ["n", 2, 3, 3])], inits)


def test_a_fold_that_overflows_float32_is_refused():
    folded, report = fold_onnx(_overflowing())
    assert not report.folded and "overflow" in report.left[0].reason
    assert bn_count(folded) == 1


# ---- property tests: random convolutions ------------------------------------------------


@st.composite
def conv_configs(draw):
    dims = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 3]))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    return {
        "dims": dims,
        "groups": groups,
        "c_in": c_in,
        "c_out": c_out,
        "kernel": draw(st.integers(1, 3)),
        "stride": draw(st.integers(1, 2)),
        "dilation": draw(st.integers(1, 2)),
        "padding": draw(st.integers(0, 1)),
        "bias": draw(st.booleans()),
        "transposed": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs())
def test_random_convolutions_fold_both_ways_exactly(cfg):
    """BN -> Conv/ConvTranspose -> BN: the BN after always folds into the layer; the BN
    before folds into a Conv exactly when it reads no padding, never into a ConvTranspose."""
    d = cfg["dims"]
    kind = (
        (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[d - 1]
        if cfg["transposed"]
        else (nn.Conv1d, nn.Conv2d, nn.Conv3d)[d - 1]
    )
    torch.manual_seed(cfg["seed"])
    layer = kind(
        cfg["c_in"],
        cfg["c_out"],
        cfg["kernel"],
        stride=cfg["stride"],
        padding=cfg["padding"],
        dilation=cfg["dilation"],
        groups=cfg["groups"],
        bias=cfg["bias"],
    )
    model = nn.Sequential(BN[d](cfg["c_in"]), layer, BN[d](cfg["c_out"]))
    size = cfg["dilation"] * (cfg["kernel"] - 1) + 3  # room for the dilated kernel
    onnx_model = onnx_zoo.export(model, (2, cfg["c_in"], *([size] * d)), seed=cfg["seed"])
    folded, report = fold_onnx(onnx_model)
    before_folds = not cfg["transposed"] and cfg["padding"] == 0
    assert len(report.folded) == 1 + before_folds, report.format()
    check_contract(onnx_model, folded)
    result = compare(onnx_model, folded, random_feeds(onnx_model, seed=cfg["seed"]), "random")
    assert result.passed, result.format()


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(1, 5),
    n=st.integers(1, 5),
    trans_a=st.booleans(),
    trans_b=st.booleans(),
    alpha=st.sampled_from([1.0, 0.5, -2.0]),
    beta=st.sampled_from([1.0, 0.25, 3.0]),
    c_shape=st.sampled_from(["none", "row", "vector", "scalar", "matrix", "column"]),
    before=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(
    k=3,
    n=4,
    trans_a=True,
    trans_b=True,
    alpha=0.5,
    beta=3.0,
    c_shape="matrix",
    before=False,
    seed=1,
)
@example(
    k=3,
    n=4,
    trans_a=False,
    trans_b=False,
    alpha=-2.0,
    beta=0.25,
    c_shape="column",
    before=True,
    seed=2,
)
@example(  # 6 output elements: an RMS ratio of 3.5 between candidate and reference is noise
    k=2,
    n=2,
    trans_a=False,
    trans_b=False,
    alpha=1.0,
    beta=0.25,
    c_shape="row",
    before=False,
    seed=122,
)
def test_random_gemms_fold_exactly(k, n, trans_a, trans_b, alpha, beta, c_shape, before, seed):
    """BN -> Gemm or Gemm -> BN over random transA/transB/alpha/beta and C broadcasts."""
    trans_a = trans_a and not before  # a BN in front normalises the rows of A itself
    w = onnx_zoo.rand((n, k) if trans_b else (k, n), seed)
    rows = 3 if c_shape in ("matrix", "column") else "n"  # a per-row C fixes the batch
    c = {
        "none": None,
        "row": rand_c((1, n), seed),
        "vector": rand_c((n,), seed),
        "scalar": rand_c((), seed),
        "matrix": rand_c((3, n), seed),
        "column": rand_c((3, 1), seed),
    }[c_shape]
    inits = [onnx_zoo._t("w", w), *onnx_zoo.bn_params("bn", k if before else n, seed)]
    gemm_in = ["a" if before else "x", "w"]
    if c is not None:
        inits.append(onnx_zoo._t("c", c))
        gemm_in.append("c")
    gemm = helper.make_node(
        "Gemm",
        gemm_in,
        ["g" if not before else "y"],
        name="gemm",
        transA=int(trans_a),
        transB=int(trans_b),
        alpha=alpha,
        beta=beta,
    )
    nodes = (
        [onnx_zoo.bn_node("bn", "x", "a"), gemm]
        if before
        else [gemm, onnx_zoo.bn_node("bn", "g", "y")]
    )
    x_shape = [k, rows] if trans_a else [rows, k]
    model = onnx_zoo.graph_model(nodes, [("x", x_shape)], [("y", [rows, n])], inits)
    folded, report = fold_onnx(model)
    assert len(report.folded) == 1 and bn_count(folded) == 0, report.format()
    check_contract(model, folded)
    result = compare(model, folded, random_feeds(model, seed=seed, dynamic=3), "random")
    assert result.passed, result.format()


def rand_c(shape, seed):
    return onnx_zoo.rand(shape, seed + 1)


# ---- the command line -------------------------------------------------------------------


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture()
def gemm_file(tmp_path) -> Path:
    case = next(c for c in onnx_zoo.CASES if c.name == "gemm_variants")
    path = tmp_path / "gemm.onnx"
    onnx.save(built(case), path)
    return path


def test_cli_fold_onnx_writes_next_to_it_and_reports_json(gemm_file):
    r = invoke("fold", gemm_file, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["passed"] and d["path"] == str(gemm_file.with_name("gemm.folded.onnx"))
    assert [f["direction"] for f in d["fold"]["folded"]] == ["into_preceding", "into_following"]
    assert d["verification"]["float64"].startswith("bnfold float64 evaluator")
    assert d["verification"]["details"]["float64_problem"] is None and d["peak_rss_mb"] > 0
    # judged with the dynamic batch dim at 2 and at 3
    assert [o["shape"] for o in d["verification"]["outputs"]] == [[2, 5], [3, 5]]
    out = load_model(d["path"])
    assert bn_count(out) == 0
    r = invoke("verify", gemm_file, d["path"])
    assert r.exit_code == 0 and "PASSED" in r.output, r.output


def test_cli_fold_onnx_with_user_inputs_and_failure_writes_nothing(gemm_file, tmp_path):
    npz = tmp_path / "in.npz"
    np.savez(npz, x=np.random.default_rng(1).standard_normal((4, 7)).astype(np.float32))
    out = tmp_path / "o.onnx"
    r = invoke("fold", gemm_file, "--inputs", npz, "--out", out)
    assert r.exit_code == 0 and "inputs from" in r.output and out.exists(), r.output
    out.unlink()
    r = invoke("fold", gemm_file, "--out", out, "--tolerance", "0")
    assert r.exit_code == 1 and "nothing written" in r.output and not out.exists()
    # the file is written while it is verified: a failure leaves no temp file, and no
    # folder made for it
    r = invoke("fold", gemm_file, "--out", tmp_path / "new" / "sub" / "o.onnx", "--tolerance", "0")
    assert r.exit_code == 1 and "nothing written" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemm.onnx", "in.npz"]


def test_an_interrupted_fold_leaves_nothing_and_no_thread(gemm_file, tmp_path, monkeypatch):
    """Ctrl-C while both models run in ONNX Runtime: the file written beside verification
    is removed with the folder made for it, and the float64 walk and the writer end."""
    import threading

    from bnfold.pipeline import onnx_fold
    from bnfold.verify import onnx as verify_onnx

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(verify_onnx, "_run_session", interrupted)
    out = tmp_path / "new" / "gemm.folded.onnx"
    with pytest.raises(KeyboardInterrupt):
        onnx_fold.fold_onnx_file(gemm_file, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemm.onnx"]
    for thread in threading.enumerate():
        if thread.name in ("bnfold-float64", "bnfold-write"):
            thread.join(timeout=60)
            assert not thread.is_alive(), thread.name


def test_cli_verify_generic_pair_with_different_outputs_fails(gemm_file, tmp_path):
    other = load_model(gemm_file)
    w = next(t for t in other.graph.initializer if t.name == "w2")
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.01, "w2"))
    path = tmp_path / "other.onnx"
    onnx.save(other, path)
    r = invoke("verify", gemm_file, path, "--json")
    assert r.exit_code == 1
    assert json.loads(r.output)["passed"] is False


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b"not onnx"), "not a readable ONNX model"),
        (lambda p: None, "no such file"),
    ],
)
def test_cli_bad_onnx_files_are_one_line_errors(tmp_path, make, message):
    bad = tmp_path / "bad.onnx"
    make(bad)
    r = invoke("fold", bad)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_cli_verify_refuses_models_with_different_inputs(gemm_file, tmp_path):
    case = next(c for c in onnx_zoo.CASES if c.name == "mlp_gemm")
    other = tmp_path / "mlp.onnx"
    onnx.save(built(case), other)
    r = invoke("verify", gemm_file, other)
    assert r.exit_code == 2 and "different inputs" in r.output


def test_cli_fold_bnfold_export_checks_the_whole_domain(exported, tmp_path):
    for path in exported.paths.values():  # the session's export, copied: fold writes beside it
        shutil.copy(path, tmp_path)
    r = invoke("fold", tmp_path / "bn.onnx", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["fold"]["complete"] and len(d["fold"]["folded"]) == 6
    assert d["verification"]["checked"].startswith("19,683 contexts")
    # the result runs like bnfold's own folded export
    folded = load_model(d["path"])
    feeds = {"contexts": np.zeros((3, 3), np.int64)}
    ours = run(load_model(tmp_path / "folded.onnx"), feeds)["logits"]
    np.testing.assert_allclose(run(folded, feeds)["logits"], ours, atol=1e-4)


def test_load_model_errors_are_bnfold_errors(tmp_path):
    with pytest.raises(BnfoldError, match="is a directory"):
        load_model(tmp_path)


# ---- what users bring: dtypes, exporters, opsets, dynamic dims ------------------------------


def case_named(name: str) -> onnx_zoo.ZooCase:
    return next(c for c in onnx_zoo.CASES if c.name == name)


@pytest.mark.parametrize("name", ["dynamo_opset18", "dynamo_opset21"])
def test_dynamo_zero_bias_is_a_constant_and_its_dtype_read_no_reader(name):
    """The exporter's bias-less conv gets ``Expand(CastLike(0, x), Shape(w))``: a constant,
    whose CastLike reads the BN's output only for its dtype. Both BNs around it fold."""
    model = built(case_named(name))
    ops = {n.op_type for n in model.graph.node}
    assert {"CastLike", "Expand"} <= ops  # the exporter's form is what this test is about
    folded, report = fold_onnx(model)
    assert not (
        {"CastLike", "Expand", "BatchNormalization"} & {n.op_type for n in folded.graph.node}
    )
    directions = [f.direction for f in report.folded]
    assert directions.count("into_following") == 1, report.format()


def test_local_functions_are_inlined_and_their_bns_folded():
    model = built(case_named("local_functions"))
    # three of the four BNs are reachable only through the functions the graph calls
    assert model.functions and [
        n.op_type for n in model.graph.node if n.op_type == "BatchNormalization"
    ] == ["BatchNormalization"]
    folded, report = fold_onnx(model)
    assert len(report.folded) == 4 and any("inlined" in n for n in report.notes)
    assert bn_count(folded) == 0 and not folded.functions


def _scale_channel(model: onnx.ModelProto, layer_op: str, factor: float) -> onnx.ModelProto:
    """A copy with output channel 0 of the first ``layer_op``'s weight scaled."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    node = next(n for n in out.graph.node if n.op_type == layer_op)
    w = next(t for t in out.graph.initializer if t.name == node.input[1])
    arr = numpy_helper.to_array(w).copy()
    arr[0] = (arr[0].astype(np.float64) * factor).astype(arr.dtype)
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    return out


def test_fp16_fold_stays_float16_and_is_judged_by_float16_rounding():
    model = built(case_named("fp16_net"))
    folded, report = fold_onnx(model)
    assert len(report.folded) == 4
    new = [t for t in folded.graph.initializer if t.name.endswith("_bnfold")]
    assert new and {t.data_type for t in new} == {onnx.TensorProto.FLOAT16}
    result = compare(model, folded, random_feeds(model), "fp16")
    assert result.passed, result.format()
    assert {o.verdict.precision for o in result.outputs} == {"float16"}
    # a 10% error in one folded output row is beyond float16 rounding (float16 resolves
    # about 2**-11 of each value, times the depth; a 2% change of one row can hide in it)
    wrong = compare(model, _scale_channel(folded, "Gemm", 1.10), random_feeds(model), "fp16")
    assert not wrong.passed, wrong.format()


def test_bf16_graphs_fold_in_bfloat16_but_onnx_runtime_cannot_run_them(tmp_path):
    """ONNX Runtime's CPU provider has no bfloat16 Gemm/BatchNormalization kernels (and
    ONNX's Conv takes bfloat16 only from opset 22): the fold is written in bfloat16 (cast
    once), the verification says what stopped it."""
    import ml_dtypes

    model = onnx_zoo.with_dtype(built(case_named("mlp_gemm")), onnx.TensorProto.BFLOAT16)
    onnx.checker.check_model(model, full_check=True)
    folded, report = fold_onnx(model)
    assert len(report.folded) == 2 and bn_count(folded) == 0
    new = [t for t in folded.graph.initializer if t.name.endswith("_bnfold")]
    assert {numpy_helper.to_array(t).dtype for t in new} == {np.dtype(ml_dtypes.bfloat16)}
    path = tmp_path / "bf16.onnx"
    onnx.save(model, path)
    r = invoke("fold", path)
    assert r.exit_code == 2 and "ONNX Runtime cannot load it" in r.output, r.output
    assert "Traceback" not in r.output and not path.with_name("bf16.folded.onnx").exists()


def test_dynamic_spatial_dims_get_an_image_size_and_batch_2():
    model = built(case_named("dynamic_hw"))
    assert random_feeds(model)["x"].shape == (2, 3, 224, 224)
    assert random_feeds(model, dynamic=3)["x"].shape == (3, 3, 224, 224)


def test_fold_guesses_dynamic_spatial_dims_by_running_the_model(tmp_path):
    """The CLI's fold and verify of a model with symbolic H and W: the guessed image size is
    tried in ONNX Runtime with the model's weights (held apart as arrays), and used."""
    path = tmp_path / "hw.onnx"
    onnx.save(built(case_named("dynamic_hw")), path)
    r = invoke("fold", path, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert "x [2, 3, 224, 224]" in d["verification"]["checked"]
    r = invoke("verify", path, d["path"])
    assert r.exit_code == 0 and "x [2, 3, 224, 224]" in r.output, r.output


def _valid_conv(kernel: int, dims) -> onnx.ModelProto:
    inits = [onnx_zoo._t("w", onnx_zoo.rand((2, 1, kernel, kernel), 40))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    return onnx_zoo.graph_model(nodes, [("x", dims)], [("y", ["n", 2, "a", "b"])], inits)


def test_a_stem_larger_than_the_guess_gets_larger_inputs():
    """A valid 300x300 kernel cannot run on 224x224: the guess doubles until it can."""
    model = _valid_conv(300, ["n", 1, "h", "w"])
    assert random_feeds(model)["x"].shape == (2, 1, 448, 448)


def test_dims_nothing_can_guess_say_what_to_pass():
    model = _valid_conv(1000, ["n", 1, "h", "w"])  # needs >= 1000: beyond 4 x 224
    with pytest.raises(BnfoldError, match=r"pass --shape x=Nx1xNxN"):
        random_feeds(model)


def test_a_huge_declared_input_is_refused_before_anything_is_allocated(tmp_path):
    """A file of a few hundred bytes may declare 20,000,000 rows."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), onnx_zoo.bn_node("bn", "r", "y")]
    inits = onnx_zoo.bn_params("bn", 3, 0)
    model = onnx_zoo.graph_model(nodes, [("x", [20_000_000, 3])], [("y", [20_000_000, 3])], inits)
    path = tmp_path / "huge.onnx"
    onnx.save(model, path)
    assert path.stat().st_size < 1000
    r = invoke("fold", path)
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert "60,000,000 elements" in r.output and "--inputs" in r.output


def test_cli_shape_option_sets_the_random_inputs(tmp_path):
    path = tmp_path / "hw.onnx"
    onnx.save(built(case_named("dynamic_hw")), path)
    r = invoke("fold", path, "--shape", "x=1x3x20x30", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert "x [1, 3, 20, 30]" in d["verification"]["checked"]
    r = invoke("verify", path, d["path"], "--shape", "x=2x3x40x40")
    assert r.exit_code == 0 and "x [2, 3, 40, 40]" in r.output, r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shape", "x=1x3y"], "expected NAME=D1xD2x"),
        (["--shape", "x=1x3x20"], "does not match the declared shape"),
        (["--shape", "x=1x4x20x20"], "does not match the declared shape"),
        (["--shape", "img=1x3x20x20"], "the model's inputs are ['x']"),
    ],
)
def test_cli_bad_shapes_are_one_line_errors(tmp_path, args, message):
    path = tmp_path / "hw.onnx"
    onnx.save(built(case_named("dynamic_hw")), path)
    r = invoke("fold", path, *args)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output


@pytest.mark.slow
def test_folding_an_onnx_file_never_imports_torch(tmp_path):
    """The ONNX path (read, fold, check, float64 truth, write) is torch-free: torch's import
    alone is ~2 s, most of what a fold of a full-size model may cost. A fresh process runs
    the command in-process and looks at its own modules afterwards."""
    import subprocess
    import sys

    path = tmp_path / "convs.onnx"
    onnx.save(onnx_zoo.convs_1d_3d(), path)
    code = (
        "import sys\n"
        "from bnfold.cli import main\n"
        f"main(['fold', {str(path)!r}, '--json'], standalone_mode=False)\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False", done.stdout
    assert (tmp_path / "convs.folded.onnx").is_file()
