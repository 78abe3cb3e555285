"""Hostile and careless ONNX models and ``--inputs`` files given to the ``bnfold`` command
(in this process, ``run_cli``; in a fresh one where its stderr must hold nothing from ONNX
Runtime or Python warnings): each is refused with one ``error:`` line and exit code 2, or
answered with the right verdict; no file outside the model's folder is ever opened and no
input makes a wrong model pass (issue #21, items 1, 2, 5-9, 12, 13)."""

from __future__ import annotations

import os
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from bnfold.errors import BnfoldError
from bnfold.fold.onnx.graph import Graph
from bnfold.fold.onnx.rules import GemmBn, read_batchnorm
from bnfold.io.npz import read_npz
from bnfold.io.onnx_files import has_unknown_fields, load_onnx_file, tensor_places

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from conftest import SHIPPED, assert_one_error_line, bnfold, run_cli  # noqa: E402
from onnx_fold_scaling import chain_model  # noqa: E402

F = TensorProto.FLOAT
OPSET = helper.make_opsetid("", 17)


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())  # as is: onnx.save would check nothing more
    return path


def relu_model(**graph_fields) -> onnx.ModelProto:
    """``y = Relu(x)`` on a float [2], plus whatever ``graph_fields`` add."""
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu"), *graph_fields.pop("nodes", [])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F, [2])],
        [helper.make_tensor_value_info("y", F, [2])],
        **graph_fields,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# ---------------------------------------------------------- item 1: external data --


def external(name: str = "w", location: str = "secret.bin") -> TensorProto:
    """A float tensor whose 4 values are said to live in ``location``."""
    t = numpy_helper.from_array(np.zeros(4, np.float32), name)
    external_data_helper.set_external_data(t, location=location)
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    return t


def sparse(values: TensorProto, indices: TensorProto | None = None) -> onnx.SparseTensorProto:
    indices = indices or numpy_helper.from_array(np.arange(4, dtype=np.int64), "i")
    return helper.make_sparse_tensor(values, indices, [8])


def small_graph(**fields) -> onnx.GraphProto:
    return helper.make_graph(
        fields.pop("nodes", []), "sub", [], [helper.make_tensor_value_info("s", F, [4])], **fields
    )


def constant(t: TensorProto, out: str = "s") -> onnx.NodeProto:
    return helper.make_node("Constant", [], [out], value=t)


def with_function(**function_fields) -> onnx.ModelProto:
    m = relu_model()
    f = onnx.FunctionProto(name="f", domain="local", input=[], output=["s"])
    f.opset_import.append(helper.make_opsetid("", 17))
    f.node.extend(function_fields.get("node", []))
    f.attribute_proto.extend(function_fields.get("attribute_proto", []))
    m.functions.append(f)
    return m


def function_default_attribute(t: TensorProto) -> onnx.ModelProto:
    """The issue's reproduction: ``y = F(x)``, a local function adding a Constant whose
    value is the function's attribute ``w``, left at its default ``t``. ONNX Runtime runs
    it (and, were ``t`` external, resolved its location against the current folder)."""
    k = helper.make_node("Constant", [], ["k"])
    k.attribute.append(
        onnx.AttributeProto(name="value", ref_attr_name="w", type=onnx.AttributeProto.TENSOR)
    )
    f = helper.make_function(
        "local", "F", ["a"], ["b"], [k, helper.make_node("Add", ["a", "k"], ["b"])], [OPSET]
    )
    f.attribute_proto.append(helper.make_attribute("w", t))
    graph = helper.make_graph(
        [helper.make_node("F", ["x"], ["y"], domain="local", name="call")],
        "g",
        [helper.make_tensor_value_info("x", F, [4])],
        [helper.make_tensor_value_info("y", F, [4])],
    )
    opsets = [OPSET, helper.make_opsetid("local", 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=[f])


def with_training(**fields) -> onnx.ModelProto:
    m = relu_model()
    m.training_info.append(onnx.TrainingInfoProto(**fields))
    return m


def with_node_attribute(value) -> onnx.ModelProto:
    """A custom-domain node carrying ``value`` as an attribute."""
    node = helper.make_node("Custom", [], ["c"], domain="x.custom", name="custom")
    node.attribute.append(helper.make_attribute("a", value))
    return relu_model(nodes=[node])


# every place the ONNX schema lets a TensorProto live, with an external reference planted
PLACES = {
    "initializer": lambda: relu_model(initializer=[external()]),
    "sparse initializer values": lambda: relu_model(sparse_initializer=[sparse(external())]),
    "sparse initializer indices": lambda: relu_model(
        sparse_initializer=[
            sparse(numpy_helper.from_array(np.ones(4, np.float32), "v"), external("i"))
        ]
    ),
    "Constant value (TENSOR)": lambda: relu_model(nodes=[constant(external(), "c")]),
    "attribute TENSORS": lambda: with_node_attribute([external()]),
    "Constant sparse_value (SPARSE_TENSOR)": lambda: relu_model(
        nodes=[helper.make_node("Constant", [], ["c"], sparse_value=sparse(external()))]
    ),
    "attribute SPARSE_TENSORS": lambda: with_node_attribute([sparse(external())]),
    "subgraph initializer (GRAPH)": lambda: relu_model(
        nodes=[
            helper.make_node(
                "If",
                ["cond"],
                ["c"],
                then_branch=small_graph(initializer=[external("s")]),
                else_branch=small_graph(nodes=[constant(numpy_helper.from_array(np.ones(4)))]),
            )
        ]
    ),
    "attribute GRAPHS": lambda: with_node_attribute([small_graph(nodes=[constant(external())])]),
    "local function's node": lambda: with_function(node=[constant(external())]),
    "local function's default attribute": lambda: function_default_attribute(external()),
    "training_info initialization": lambda: with_training(
        initialization=small_graph(initializer=[external()])
    ),
    "training_info algorithm": lambda: with_training(
        algorithm=small_graph(nodes=[constant(external())]),
        update_binding=[onnx.StringStringEntryProto(key="w", value="s")],
    ),
}


def schema_edges() -> set[tuple[str, str]]:
    """Every (message, field) of the ONNX schema on a path from ModelProto to a tensor."""
    edges, todo, seen = set(), [onnx.ModelProto.DESCRIPTOR], set()
    holders = {TensorProto.DESCRIPTOR.full_name}
    # fixed point: which message types can hold a tensor
    types = {}

    def collect(d):
        if d.full_name not in types:
            types[d.full_name] = d
            for f in d.fields:
                if f.message_type is not None:
                    collect(f.message_type)

    collect(onnx.ModelProto.DESCRIPTOR)
    changed = True
    while changed:
        changed = False
        for d in types.values():
            if d.full_name not in holders and any(
                f.message_type is not None and f.message_type.full_name in holders for f in d.fields
            ):
                holders.add(d.full_name)
                changed = True
    while todo:
        d = todo.pop()
        if d.full_name in seen:
            continue
        seen.add(d.full_name)
        for f in d.fields:
            if f.message_type is not None and f.message_type.full_name in holders:
                edges.add((d.name, f.name))
                todo.append(f.message_type)
    return edges


def path_edges(fields: tuple[str, ...]) -> set[tuple[str, str]]:
    d, edges = onnx.ModelProto.DESCRIPTOR, set()
    for name in fields:
        edges.add((d.name, name))
        d = d.fields_by_name[name].message_type
    return edges


def test_the_places_cover_every_field_that_can_hold_a_tensor():
    """The cases below exercise every edge of the schema that leads to a tensor (a field
    added to ONNX that can hold one makes this fail until a case covers it), and the
    walker finds the planted tensor in each."""
    covered = set()
    for name, build in PLACES.items():
        found = [
            p for p in tensor_places(build()) if p.tensor.data_location == TensorProto.EXTERNAL
        ]
        assert len(found) == 1, name
        covered |= path_edges(found[0].fields)
    assert schema_edges() <= covered, schema_edges() - covered


@pytest.fixture
def trap(tmp_path) -> Path:
    """``secret.bin`` in the cwd is a FIFO: opening it to read blocks until the timeout,
    so a command that reads it fails the test instead of answering."""
    os.mkfifo(tmp_path / "secret.bin")
    (tmp_path / "m").mkdir()
    return tmp_path


@pytest.mark.parametrize("place", PLACES)
def test_external_data_anywhere_is_refused_and_never_read(trap, place):
    save(PLACES[place](), trap / "m" / "evil.onnx")
    save(relu_model(), trap / "m" / "ref.onnx")
    # fold and verify may inline external data, but only from the model's own folder (m/):
    # there is no m/secret.bin; sample reads only self-contained files
    for args, why in (
        (["fold", "m/evil.onnx"], "no such file"),
        (["verify", "m/ref.onnx", "m/evil.onnx"], "no such file"),
        (["sample", "m/evil.onnx"], "self-contained"),
    ):
        r = run_cli(*args, cwd=trap, timeout=60)
        assert_one_error_line(r, "evil.onnx", "secret.bin", why)
    assert sorted(p.name for p in (trap / "m").iterdir()) == ["evil.onnx", "ref.onnx"]


# field 1000 as a varint of 1: a field no onnx release defines (tag 8000 = C0 3E)
UNKNOWN_FIELD = bytes([0xC0, 0x3E, 0x01])


def with_unknown_field(t: TensorProto) -> TensorProto:
    out = TensorProto()
    out.ParseFromString(t.SerializeToString() + UNKNOWN_FIELD)
    return out


def unknown_field_files() -> dict[str, bytes]:
    w = numpy_helper.from_array(np.ones(2, np.float32), "w")
    plain = relu_model(initializer=[w]).SerializeToString()
    return {
        "the model": plain + UNKNOWN_FIELD,
        "an initializer": relu_model(initializer=[with_unknown_field(w)]).SerializeToString(),
        "a node attribute": relu_model(
            nodes=[constant(with_unknown_field(numpy_helper.from_array(np.ones(2, np.float32))))]
        ).SerializeToString(),
    }


@pytest.mark.parametrize("place", sorted(unknown_field_files()))
def test_fields_onnx_does_not_know_never_reach_onnx_runtime(tmp_path, place):
    """ONNX Runtime is given the file's own bytes only when they hold no field this onnx
    release cannot see into (a newer schema's tensor could hide an external reference)."""
    raw = unknown_field_files()[place]
    parsed = onnx.ModelProto()
    parsed.ParseFromString(raw)
    assert has_unknown_fields(parsed)
    (tmp_path / "m.onnx").write_bytes(raw)
    loaded = load_onnx_file(tmp_path / "m.onnx")
    given = onnx.ModelProto()
    given.ParseFromString(loaded.data)
    assert loaded.data != raw and not has_unknown_fields(given)
    assert given == loaded.proto


def test_a_file_without_unknown_fields_goes_to_onnx_runtime_as_it_is(tmp_path):
    raw = relu_model(initializer=[numpy_helper.from_array(np.ones(2, np.float32), "w")])
    (tmp_path / "m.onnx").write_bytes(raw.SerializeToString())
    assert load_onnx_file(tmp_path / "m.onnx").data == raw.SerializeToString()


# ---------------------------------------------------- item 2: no verdict without evidence --


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    """chain.onnx (3 Gemm -> BN -> Relu blocks) and off5.onnx: its last BN shifted by +5."""
    d = tmp_path_factory.mktemp("chain")
    m = chain_model(3)
    save(m, d / "chain.onnx")
    for t in m.graph.initializer:
        if t.name == "beta2":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) + 5, t.name))
    save(m, d / "off5.onnx")
    return d


F32 = np.float32


@pytest.mark.parametrize(
    "values, needle",
    [
        (np.full((4, 8), np.nan, F32), "NaN or infinite"),
        (np.full((4, 8), np.inf, F32), "NaN or infinite"),
        (np.zeros((0, 8), F32), "holds no values"),
        (np.ones((4, 8), np.float64), "is float64"),
        (np.ones((4, 3), F32), "has shape [4, 3]"),
    ],
    ids=["nan", "inf", "zero-rows", "float64", "wrong-width"],
)
def test_inputs_that_prove_nothing_are_refused(chain, tmp_path, values, needle):
    np.savez(tmp_path / "in.npz", x=values)
    for args in (
        ["verify", chain / "chain.onnx", chain / "off5.onnx"],
        ["fold", chain / "chain.onnx", "--out", tmp_path / "out.onnx"],
    ):
        r = run_cli(*args, "--inputs", tmp_path / "in.npz")
        assert_one_error_line(r, "in.npz", needle)
    assert not (tmp_path / "out.onnx").exists()


def test_inputs_that_overflow_every_output_do_not_pass_a_wrong_model(chain, tmp_path):
    """3e38 is finite, but every output overflows: nothing is compared, so no verdict."""
    np.savez(tmp_path / "big.npz", x=np.full((4, 8), 3e38, np.float32))
    np.savez(tmp_path / "ok.npz", x=np.ones((4, 8), np.float32))
    big = run_cli(
        "verify", chain / "chain.onnx", chain / "off5.onnx", "--inputs", tmp_path / "big.npz"
    )
    assert big.returncode == 1, big.stderr
    assert "FAILED" in big.stdout and "proves nothing" in big.stdout
    folded = run_cli(
        "fold", chain / "chain.onnx", "--out", tmp_path / "f.onnx", "--inputs", tmp_path / "big.npz"
    )
    assert folded.returncode == 1 and "nothing written" in folded.stdout
    assert not (tmp_path / "f.onnx").exists()
    ok = run_cli(
        "verify", chain / "chain.onnx", chain / "off5.onnx", "--inputs", tmp_path / "ok.npz"
    )
    assert ok.returncode == 1 and "FAILED" in ok.stdout  # finite inputs: the +5 is seen
    good = run_cli(
        "verify", chain / "chain.onnx", chain / "chain.onnx", "--inputs", tmp_path / "ok.npz"
    )
    assert good.returncode == 0, good.stdout  # and a right model still passes


# ------------------------------------- items 5, 9, 13: malformed, non-finite, invalid --


def chain_with(change) -> onnx.ModelProto:
    """The 3-block chain after ``change(model)``."""
    m = chain_model(3)
    change(m)
    return m


def init(m: onnx.ModelProto, name: str) -> TensorProto:
    return next(t for t in m.graph.initializer if t.name == name)


def set_value(m: onnx.ModelProto, name: str, value: float) -> None:
    t = init(m, name)
    a = numpy_helper.to_array(t).copy()
    a.flat[0] = value
    t.CopyFrom(numpy_helper.from_array(a, name))


def feed_param(m: onnx.ModelProto, param: str, nodes: list[onnx.NodeProto]) -> None:
    """Make BN 0's ``param`` input (e.g. "g0") come from ``nodes`` instead of a weight."""
    m.graph.initializer.remove(init(m, param))
    for n in reversed(nodes):
        m.graph.node.insert(0, n)


def short_raw(m):
    init(m, "w0").raw_data = init(m, "w0").raw_data[:-4]


def float_data(m):
    t = init(m, "g0")
    t.ClearField("raw_data")
    t.float_data.extend([1.0, 2.0, 3.0])  # dims [8]


def negative_dims(m):
    init(m, "b0").dims[0] = -8


def unused_bad(m):
    m.graph.initializer.append(TensorProto(name="junk", data_type=F, dims=[10], raw_data=b"abc"))


def unknown_type(m):
    init(m, "mu0").data_type = 999


def identity_cycle(m):
    feed_param(
        m,
        "g0",
        [
            helper.make_node("Identity", ["g0_b"], ["g0_a"]),
            helper.make_node("Identity", ["g0_a"], ["g0_b"]),
            helper.make_node("Identity", ["g0_b"], ["g0"]),
        ],
    )


def identity_self_loop(m):
    feed_param(m, "g0", [helper.make_node("Identity", ["g0"], ["g0"])])


def constant_without_value(m):
    feed_param(m, "g0", [helper.make_node("Constant", [], ["g0"])])


def reshape_bad_shape(m):
    w = init(m, "w0")
    w.name = "w0_flat"
    shape = numpy_helper.from_array(np.array([5, 7], np.int64), "w0_shape")
    m.graph.initializer.append(shape)
    m.graph.node.insert(0, helper.make_node("Reshape", ["w0_flat", "w0_shape"], ["w0"]))


def cast_unknown_type(m):
    w = init(m, "w0")
    w.name = "w0_raw"
    m.graph.node.insert(0, helper.make_node("Cast", ["w0_raw"], ["w0"], to=12345))


def reshape_through_identity(m):  # the onnx checker cannot see this shape: ORT reports it
    reshape_bad_shape(m)
    m.graph.node[0].input[1] = "w0_shape_i"
    m.graph.node.insert(0, helper.make_node("Identity", ["w0_shape"], ["w0_shape_i"]))


def deep_identity_chain(m):  # deeper than Python's stack when evaluated recursively
    feed_param(
        m,
        "g0",
        [helper.make_node("Identity", ["g0_w"], ["g0_0"])]
        + [helper.make_node("Identity", [f"g0_{i}"], [f"g0_{i + 1}"]) for i in range(3000)]
        + [helper.make_node("Identity", ["g0_3000"], ["g0"])],
    )
    m.graph.initializer.append(numpy_helper.from_array(np.ones(8, np.float32), "g0_w"))


def nan_constant_variance(m):
    v = numpy_helper.to_array(init(m, "var1")).copy()
    v[0] = np.nan
    feed_param(m, "var1", [constant(numpy_helper.from_array(v, "v"), "var1")])


def nan_variance(m):
    set_value(m, "var1", np.nan)


def inf_weight(m):
    set_value(m, "w2", np.inf)


HOSTILE = {
    "raw_data shorter than dims": (short_raw, "'w0'", "bytes"),
    "float_data shorter than dims": (float_data, "'g0'", "holds 3"),
    "negative dims": (negative_dims, "'b0'", "negative dimension"),
    "unused initializer with bad raw_data": (unused_bad, "'junk'", "holds 3 bytes"),
    "unknown element type": (unknown_type, "'mu0'", "unknown element type"),
    "Identity cycle": (identity_cycle, "not a valid ONNX model", ""),
    "Identity self-loop": (identity_self_loop, "not a valid ONNX model", ""),
    "Constant without its attribute": (constant_without_value, "not a valid ONNX model", ""),
    "Reshape constant with a bad shape": (reshape_bad_shape, "not a valid ONNX model", ""),
    "Cast(to=12345)": (cast_unknown_type, "not a valid ONNX model", ""),
    "Reshape through Identity to a bad shape": (reshape_through_identity, "cannot run it"),
    "3,000 Identity nodes deep": (deep_identity_chain, "chained too deeply"),
    "NaN BN variance": (nan_variance, "NaN or infinite", "var1"),
    "NaN BN variance from a Constant": (nan_constant_variance, "NaN or infinite", "var1"),
    "inf weight": (inf_weight, "NaN or infinite", "w2"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_models_are_one_line(tmp_path, case):
    change, *needles = HOSTILE[case]
    save(chain_with(change), tmp_path / "bad.onnx")
    save(chain_model(3), tmp_path / "good.onnx")
    r = run_cli("fold", "bad.onnx", cwd=tmp_path)
    # found while running it (the onnx checker cannot see it): named as the reference
    named = () if needles[0] == "cannot run it" else ("bad.onnx",)
    assert_one_error_line(r, *named, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "good.onnx"]
    if needles[0] not in ("not a valid ONNX model", "cannot run it"):  # verify reads the same way
        assert_one_error_line(run_cli("verify", "good.onnx", "bad.onnx", cwd=tmp_path), *needles)


def test_external_data_with_a_nul_or_a_short_length(tmp_path):
    (tmp_path / "w.bin").write_bytes(np.ones(16, np.float32).tobytes())
    for location, length, needle in (("w\0.bin", None, "NUL"), ("w.bin", 16, "holds 16 bytes")):
        m = chain_model(3)
        t = init(m, "w0")  # 64 floats: 256 bytes
        kwargs = {} if length is None else {"length": length}
        external_data_helper.set_external_data(t, location=location, **kwargs)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        save(m, tmp_path / "ext.onnx")
        assert_one_error_line(run_cli("fold", "ext.onnx", cwd=tmp_path), "ext.onnx", "'w0'", needle)


def test_malformed_weights_of_a_bnfold_file_are_one_line(tmp_path):
    """sample/verify/serve check bnfold files for NaN weights: on malformed ones, that
    check must not be where it breaks."""
    m = onnx.load(str(SHIPPED / "folded.onnx"))
    m.graph.initializer[1].raw_data = m.graph.initializer[1].raw_data[:-3]
    save(m, tmp_path / "bad.onnx")
    for args in (["sample", "bad.onnx"], ["verify", SHIPPED / "folded.onnx", "bad.onnx"]):
        assert_one_error_line(run_cli(*args, cwd=tmp_path), "bad.onnx", "bytes")


def invalid_model(kind: str) -> onnx.ModelProto:
    if kind == "unknown op":
        return relu_model(nodes=[helper.make_node("NoSuchOp", ["x"], ["z"], name="mystery")])
    if kind == "opset 1":
        m = relu_model()
        m.opset_import[0].version = 1
        return m
    m = relu_model()  # a cycle: z = Relu(w), w = Relu(z)
    m.graph.node.extend(
        [helper.make_node("Relu", ["w"], ["z"]), helper.make_node("Relu", ["z"], ["w"])]
    )
    return m


@pytest.mark.slow  # fresh processes
@pytest.mark.parametrize("kind", ["unknown op", "opset 1", "graph cycle"])
def test_invalid_models_are_blamed_in_one_line(tmp_path, kind):
    """One line, naming the input (not "the folded model fails onnx.checker"), without
    ONNX Runtime's own log line or Python warnings on stderr: in a fresh process, where
    nothing an earlier command set up (ONNX Runtime's logger) can hide them."""
    save(invalid_model(kind), tmp_path / "bad.onnx")
    save(relu_model(), tmp_path / "good.onnx")
    line = assert_one_error_line(bnfold("fold", "bad.onnx", cwd=tmp_path), "bad.onnx")
    assert "folded model" not in line
    assert not (tmp_path / "bad.folded.onnx").exists()
    assert_one_error_line(bnfold("verify", "good.onnx", "bad.onnx", cwd=tmp_path), "bad.onnx")


# ------------------------------------------------------------- item 12: fold --out --


def test_fold_out_is_checked_before_any_work(tmp_path):
    """The input is invalid, so any work would end in its error: the --out error shows the
    output was checked first."""
    save(invalid_model("unknown op"), tmp_path / "m.onnx")
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("")
    os.link(tmp_path / "m.onnx", tmp_path / "hardlink.onnx")
    for out, needle in (
        ("adir", "is a directory"),
        ("afile/x.onnx", "afile: exists and is not a folder"),
        ("m.onnx", "is the input model"),
        ("./adir/../m.onnx", "is the input model"),
        ("hardlink.onnx", "is the input model"),
    ):
        r = run_cli("fold", "m.onnx", "--out", out, cwd=tmp_path)
        assert_one_error_line(r, needle)
    assert (tmp_path / "m.onnx").read_bytes() == invalid_model("unknown op").SerializeToString()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adir",
        "afile",
        "hardlink.onnx",
        "m.onnx",
    ]
    assert list((tmp_path / "adir").iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_fold_out_in_a_read_only_folder(tmp_path):
    save(chain_model(3), tmp_path / "m.onnx")
    (tmp_path / "ro").mkdir(mode=0o555)
    assert_one_error_line(run_cli("fold", "m.onnx", "--out", "ro/x.onnx", cwd=tmp_path), "ro")


# --------------------------------------------------------- item 7: --inputs files --


def deflate_zip(path: Path, name: str, chunk: bytes, repeats: int) -> None:
    """A zip whose one member is ``chunk`` repeated: each copy compressed once, after a
    full flush, so the same compressed block can be repeated (a zip bomb in a second)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    data = block * repeats + c.flush(zlib.Z_FINISH)
    crc = 0
    for _ in range(repeats):
        crc = zlib.crc32(chunk, crc)
    size = len(chunk) * repeats
    assert size < 1 << 32  # no zip64 needed
    raw_name = name.encode()
    local = struct.pack(
        "<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(data), size, len(raw_name), 0
    )
    central = struct.pack(
        "<4s6H3L5H2L",
        b"PK\x01\x02",
        20,
        20,
        0,
        8,
        0,
        0,
        crc,
        len(data),
        size,
        len(raw_name),
        0,
        0,
        0,
        0,
        0,
        0,
    )
    offset = len(local) + len(raw_name) + len(data)
    cd = central + raw_name
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(cd), offset, 0)
    path.write_bytes(local + raw_name + data + cd + end)


def npy_bytes(shape, dtype=np.float32, body: bytes | None = None) -> bytes:
    import io

    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        f, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
    )
    return f.getvalue() + (body if body is not None else b"")


def bad_inputs(tmp_path: Path, kind: str) -> Path:
    p = tmp_path / "in.npz"
    x = np.ones((4, 8), np.float32)
    if kind == ".npy":
        np.save(p.with_suffix(".npy"), x)
        p.with_suffix(".npy").rename(p)
    elif kind == "not a zip":
        p.write_text("x,y\n1,2\n")
    elif kind == "bad CRC":
        np.savez(p, x=x)  # stored, not compressed: flip a byte of the array's data
        data = bytearray(p.read_bytes())
        i = data.index(np.ones(1, np.float32).tobytes() * 8)
        data[i] ^= 0xFF
        p.write_bytes(bytes(data))
    elif kind == "corrupt deflate":
        np.savez_compressed(p, x=np.arange(4096, dtype=np.float32))
        data = bytearray(p.read_bytes())
        for i in range(60, 200):
            data[i] ^= 0x5A
        p.write_bytes(bytes(data))
    elif kind == "huge shape":
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("x.npy", npy_bytes((10**12, 8), body=b"\0" * 128))
    elif kind == "zip bomb":  # ~1 MB inflating to 1.1 GB (over the 1 GiB bound)
        deflate_zip(p, "x.npy", bytes(16 << 20), 70)
    return p


@pytest.mark.parametrize(
    "kind, needle",
    [
        (".npy", "is a .npy file"),
        ("not a zip", "not an .npz file"),
        ("bad CRC", "damaged"),
        ("corrupt deflate", "damaged"),
        ("huge shape", "declares shape [1000000000000, 8]"),
        ("zip bomb", "more than an .npz file may hold"),
    ],
)
def test_bad_inputs_files_are_one_line(chain, tmp_path, kind, needle):
    path = bad_inputs(tmp_path, kind)
    r = run_cli("verify", chain / "chain.onnx", chain / "off5.onnx", "--inputs", path)
    assert_one_error_line(r, "in.npz", needle)


def test_inflated_size_is_bounded_even_when_the_zip_lies(tmp_path):
    """A member whose declared size is small but inflates past the bound: zipfile stops
    at the declared size (the CRC then fails), and the bound holds on what is inflated."""
    path = tmp_path / "in.npz"
    deflate_zip(path, "x.npy", bytes(1 << 20), 8)
    with pytest.raises(BnfoldError, match="more than an .npz file may hold"):
        read_npz(path, limit=4 << 20)  # declared 8 MiB > 4 MiB
    data = bytearray(path.read_bytes())
    for at in (data.index(b"PK\x03\x04") + 22, data.index(b"PK\x01\x02") + 24):
        data[at : at + 4] = struct.pack("<L", 1000)  # declare 1,000 bytes instead
    path.write_bytes(bytes(data))
    with pytest.raises(BnfoldError, match="damaged"):
        read_npz(path, limit=4 << 20)


def test_table_mb_beyond_its_limit_is_refused_up_front():
    r = run_cli("sample", SHIPPED / "folded.onnx", "--table-mb", "1000000")
    assert_one_error_line(r, "table-mb must be at most")


# ------------------------------------------------------ item 8: the fold's bookkeeping --


def index_of(graph: Graph) -> tuple[dict, dict]:
    producer = {k: id(v) for k, v in graph.producer.items()}
    consumers = {k: sorted(map(id, v)) for k, v in graph.consumers.items() if v}
    return producer, consumers


def test_incremental_index_matches_a_rebuild_after_every_fold():
    """The graph index is updated per fold (not rebuilt): after each fold it must equal
    the index rebuilt from scratch over the same nodes."""
    graph = Graph(chain_model(6))
    rule = GemmBn()
    for node in [n for n in graph.nodes if n.op_type == "BatchNormalization"]:
        bn, why = read_batchnorm(graph, node)
        assert bn is not None, why
        layer = rule.match(graph, bn)
        assert rule.check(graph, bn, layer) is None
        rule.rewrite(graph, bn, layer)
        graph.touch(layer)
        graph.refresh()
        incremental = index_of(graph)
        graph.rebuild()
        assert index_of(graph) == incremental
    assert not any(n.op_type == "BatchNormalization" for n in graph.nodes)
