"""`bnfold fold` / `verify` on every kind of file: one JSON schema for .pt and .onnx, one
`error:` + `hint:` (or `{"error", "hint"}` with --json) for the torch files bnfold cannot
fold, and an ONNX file with no BatchNormalization node refused before any work."""

from __future__ import annotations

import io
import json
import shutil
import warnings
from pathlib import Path

import jsonschema_rs
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from bnfold.cli import main
from bnfold.io.schema import json_schema

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "docs" / "schema" / "fold-verify.schema.json"
KEEP_BN = "training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5)
    ).eval()
    with torch.no_grad():  # a fresh BN is the identity, which would hide a wrong fold
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    return m


def onnx_export(model: nn.Module, path: Path, keep_bn: bool) -> Path:
    options = {"training": torch.onnx.TrainingMode.PRESERVE, "do_constant_folding": False}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randn(2, 3, 4, 4),), buffer, dynamo=False, **(options if keep_bn else {})
        )
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture(scope="module")
def validator():
    return jsonschema_rs.validator_for(json.loads(SCHEMA_FILE.read_text()))


def test_schema_file_is_the_models_schema():
    assert json.loads(SCHEMA_FILE.read_text()) == json_schema()


def test_fold_and_verify_json_share_one_schema_for_pt_and_onnx(
    trained_checkpoint, tmp_path, validator
):
    bn = shutil.copy(trained_checkpoint, tmp_path / "bn.pt")
    cnn = onnx_export(small_cnn(), tmp_path / "cnn.onnx", keep_bn=True)
    docs = {}
    for name, args in {
        "fold pt": ("fold", bn, "--json"),
        "fold onnx": ("fold", cnn, "--json"),
        "verify pt": ("verify", bn, tmp_path / "folded.pt", "--json"),
        "verify onnx": ("verify", cnn, tmp_path / "cnn.folded.onnx", "--json"),
    }.items():
        r = run(*args)
        assert r.exit_code == 0, (name, r.output)
        docs[name] = json.loads(r.stdout)
        validator.validate(docs[name])
    # the same keys whatever the file type, down to each folded entry and verdict block
    for a, b in (("fold pt", "fold onnx"), ("verify pt", "verify onnx")):
        assert docs[a].keys() == docs[b].keys()
        va, vb = docs[a]["verification"], docs[b]["verification"]
        assert va.keys() == vb.keys() and va["verdict"].keys() == vb["verdict"].keys()
        assert va["outputs"][0].keys() == vb["outputs"][0].keys()
    assert docs["fold pt"]["fold"].keys() == docs["fold onnx"]["fold"].keys()
    folded_pt, folded_onnx = docs["fold pt"]["fold"]["folded"], docs["fold onnx"]["fold"]["folded"]
    assert folded_pt[0].keys() == folded_onnx[0].keys()
    assert docs["fold onnx"]["fold"]["folded"][0]["layer_op"] == "Conv"
    assert (
        docs["fold pt"]["fold"]["batchnorms"] == 6 and docs["fold onnx"]["fold"]["batchnorms"] == 1
    )


def test_a_left_batchnorm_has_its_reason_in_the_same_shape(tmp_path, validator):
    # a BN between two ReLUs has no layer on either side: it stays, with a reason
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU())
    path = onnx_export(m.eval(), tmp_path / "left.onnx", keep_bn=True)
    r = run("fold", path, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    validator.validate(d)
    assert d["fold"]["folded"] == [] and len(d["fold"]["left"]) == 1
    assert d["fold"]["left"][0]["reason"] and not d["fold"]["complete"]


@pytest.mark.parametrize("kind", ["pickled module", "state_dict", "torchscript"])
def test_torch_files_get_what_they_are_and_a_route(tmp_path, kind, validator):
    m = small_cnn()
    path = tmp_path / "model.pt"
    if kind == "pickled module":
        torch.save(m, path)
    elif kind == "state_dict":
        torch.save(m.state_dict(), path)
    else:
        torch.jit.save(torch.jit.trace(m, torch.randn(1, 3, 4, 4)), path)
    what = {
        "pickled module": "pickled torch module",
        "state_dict": "a state_dict",
        "torchscript": "TorchScript",
    }[kind]
    for command in (("fold", path), ("verify", path, path)):
        r = run(*command)
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 2 and lines[0].startswith("error:") and what in lines[0]
        assert lines[1].startswith("hint:") and "bnfold.fold(model" in lines[1]
        assert KEEP_BN in lines[1]
    r = run("fold", path, "--json")
    assert r.exit_code == 2
    error = json.loads(r.stdout)
    validator.validate(error)
    assert what in error["error"] and KEEP_BN in error["hint"]
    assert list(tmp_path.iterdir()) == [path]  # nothing written


def test_onnx_without_batchnorm_is_refused_before_any_work(tmp_path):
    path = onnx_export(small_cnn(), tmp_path / "exported.onnx", keep_bn=False)
    r = run("fold", path)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert (
        lines[0] == f"error: {path}: no BatchNormalization node: nothing to fold (nothing written)"
    )
    assert lines[1].startswith("hint: torch.onnx.export folds") and KEEP_BN in lines[1]
    assert "verification" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported.onnx"]


def test_json_errors_go_to_stdout(tmp_path, validator):
    r = run("verify", tmp_path / "missing.pt", tmp_path / "missing.pt", "--json")
    assert r.exit_code == 2
    error = json.loads(r.stdout)
    validator.validate(error)
    assert "no such checkpoint" in error["error"] and error["hint"] is None
