"""Crafted and careless inputs to the ``bnfold`` command (a subprocess of this venv's
``bnfold``) and its files: each must give one ``error:`` line and exit code 2, never a
traceback, and never read or write what it should not."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from bnfold.errors import BnfoldError
from bnfold.onnx_files import load_onnx_file

REPO = Path(__file__).resolve().parent.parent
BNFOLD = str(Path(sys.executable).with_name("bnfold"))
SHIPPED = REPO / "models"


def bnfold(*args, cwd=None, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BNFOLD, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw
    )


def assert_one_error_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, stderr exactly one ``error:`` line (plus an optional ``hint:`` line)."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if not line.startswith("hint: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- ONNX external data --


def with_external_first_initializer(src: Path, dst: Path, location: str) -> np.ndarray:
    """``src`` with its first initializer's data moved to ``location`` (not written)."""
    proto = onnx.load(str(src))
    t = proto.graph.initializer[0]
    values = numpy_helper.to_array(t)
    external_data_helper.set_external_data(t, location=location)
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    onnx.save(proto, str(dst))
    return values


@pytest.fixture
def onnx_dir(tmp_path) -> Path:
    m = tmp_path / "m"
    m.mkdir()
    shutil.copy(SHIPPED / "folded.onnx", m / "folded.onnx")
    shutil.copy(SHIPPED / "bn.onnx", m / "bn.onnx")
    return m


def test_onnx_external_data_in_the_cwd_is_never_read(tmp_path, onnx_dir):
    """The issue's reproduction: a model whose first initializer points at ./secret.bin."""
    values = with_external_first_initializer(
        onnx_dir / "folded.onnx", onnx_dir / "evil.onnx", "secret.bin"
    )
    (tmp_path / "secret.bin").write_bytes(values.tobytes())  # in the cwd, not next to it
    for args in (
        ["sample", "m/evil.onnx", "-n", "3"],
        ["verify", "m/bn.onnx", "m/evil.onnx"],
        ["serve", "m/evil.onnx", "--port", "0"],
    ):
        r = bnfold(*args, cwd=tmp_path)
        assert_one_error_line(r, "evil.onnx", "tok_emb.weight", "secret.bin", "self-contained")
        assert r.stdout == ""


@pytest.mark.parametrize("escape", ["../secret.bin", "ABSOLUTE", "link.bin", "sub/../../x.bin"])
def test_external_data_never_leaves_the_model_folder(tmp_path, onnx_dir, escape):
    values = with_external_first_initializer(
        onnx_dir / "folded.onnx", onnx_dir / "out.onnx", "placeholder"
    )
    secret = tmp_path / "secret.bin"
    secret.write_bytes(values.tobytes())
    (onnx_dir / "link.bin").symlink_to(secret)  # a symlink out of the folder
    location = str(secret) if escape == "ABSOLUTE" else escape
    with_external_first_initializer(onnx_dir / "folded.onnx", onnx_dir / "out.onnx", location)
    with pytest.raises(BnfoldError, match="outside the model's folder"):
        load_onnx_file(onnx_dir / "out.onnx", allow_external_data=True)
    with pytest.raises(BnfoldError, match="self-contained"):
        load_onnx_file(onnx_dir / "out.onnx")


def test_external_data_inside_the_folder_is_inlined_when_allowed(onnx_dir):
    """Allowed external data is read by bnfold (inside the folder) and inlined: ONNX
    Runtime gets a self-contained model that computes what the original does."""
    import onnxruntime as ort

    values = with_external_first_initializer(
        onnx_dir / "folded.onnx", onnx_dir / "split.onnx", "weights/emb.bin"
    )
    (onnx_dir / "weights").mkdir()
    (onnx_dir / "weights" / "emb.bin").write_bytes(values.tobytes())
    loaded = load_onnx_file(onnx_dir / "split.onnx", allow_external_data=True)
    assert not any(t.external_data for t in loaded.proto.graph.initializer)
    x = np.array([[0, 0, 0], [1, 2, 3], [26, 5, 0]], dtype=np.int64)
    original = ort.InferenceSession(str(onnx_dir / "folded.onnx"))
    inlined = ort.InferenceSession(loaded.data)
    np.testing.assert_array_equal(
        inlined.run(None, {"contexts": x})[0], original.run(None, {"contexts": x})[0]
    )


def test_constant_node_with_external_data_is_refused(tmp_path):
    """Not only initializers: a Constant node's tensor (made with onnx.helper)."""
    t = numpy_helper.from_array(np.zeros(4, np.float32), "c")
    external_data_helper.set_external_data(t, location="/etc/passwd")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    node = helper.make_node("Constant", [], ["y"], value=t)
    graph = helper.make_graph(
        [node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])]
    )
    path = tmp_path / "c.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    with pytest.raises(BnfoldError, match="another file"):
        load_onnx_file(path)
    with pytest.raises(BnfoldError, match="outside the model's folder"):
        load_onnx_file(path, allow_external_data=True)
