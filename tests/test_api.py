"""The Python API (``import bnfold``): the same results as the commands (printed and as
JSON), any torch module folded and verified against a float64 copy, and the traps of a
notebook user closed (TrainConfig(), two modules without inputs, a slow ``import``)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import bnfold
from bnfold.cli import main
from bnfold.errors import BnfoldError
from bnfold.io.schema import FoldVerifyDocument
from bnfold.mlp.train import PRESETS, TrainConfig


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def without_timings(text: str) -> list[str]:
    """Printed lines minus the ones that carry a wall-clock duration."""
    return [line for line in text.splitlines() if not line.strip().startswith("took ")]


def cnn() -> nn.Module:
    """A small CNN whose BatchNorms have non-trivial statistics (a fresh BN is the
    identity, which would hide a wrong fold), in eval mode."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
    )
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return m.eval()


X = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------ TrainConfig


def test_train_config_default_is_the_default_preset():
    assert TrainConfig() == TrainConfig.from_preset("fast")
    assert TrainConfig().steps == PRESETS["fast"]["steps"] != 200_000
    lecture = TrainConfig(preset="lecture")
    assert (lecture.steps, lecture.batch_size, lecture.optimizer) == (200_000, 32, "sgd")
    assert TrainConfig(steps=7).steps == 7 and TrainConfig(steps=7).optimizer == "adamw"


# ------------------------------------------------------------------ the lecture's model


def test_fold_and_verify_a_checkpoint_print_and_dump_as_the_cli(trained_checkpoint, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    shutil.copy(trained_checkpoint, a / "bn.pt")
    shutil.copy(trained_checkpoint, b / "bn.pt")
    folded = bnfold.fold(a / "bn.pt")
    r = cli("fold", b / "bn.pt")
    assert r.exit_code == 0 and folded.passed and folded.path == a / "folded.pt"
    assert without_timings(str(folded).replace(str(a), "D")) == without_timings(
        r.output.replace(str(b), "D")
    )
    result = bnfold.verify(a / "bn.pt", a / "folded.pt")
    r = cli("verify", a / "bn.pt", a / "folded.pt", "--json")
    ours, theirs = result.to_dict(), json.loads(r.stdout)
    assert ours.keys() == theirs.keys() and ours["passed"] and theirs["passed"]
    assert ours["verification"]["outputs"] == theirs["verification"]["outputs"]


def test_sample_gives_the_cli_names(onnx_model):
    names = bnfold.sample(onnx_model, count=8, seed=3, temperature=0.8)
    r = cli("sample", onnx_model, "-n", 8, "--seed", 3, "--temperature", 0.8)
    assert r.exit_code == 0 and str(names).splitlines() == r.output.splitlines()
    doc = names.to_dict()
    assert [d["name"] for d in doc["names"]] == names.names and doc["words"]["verified"]
    assert sum(doc["label_counts"].values()) == 8


def test_sample_without_a_words_file_for_another_words_file(tmp_path, trained_checkpoint):
    """A model trained on other words gets no labels by default (not an error)."""
    words = tmp_path / "words.txt"
    words.write_text("\n".join(["anna", "bob", "carla", "dave", "emma"] * 40), encoding="utf-8")
    run = bnfold.train(words, tmp_path / "m", steps=5, batch_size=64, n_hidden=8)
    names = bnfold.sample(run.path, count=3)
    assert len(names) == 3 and all(s.label is None for s in names)
    assert names.to_dict()["words"]["file"] is None
    with pytest.raises(BnfoldError, match="is not the words file"):
        bnfold.sample(run.path, count=3, words=bnfold.api.DEFAULT_WORDS)


# ----------------------------------------------------------------------- torch modules


def test_fold_any_module_verified_against_float64():
    model = cnn()
    before = copy.deepcopy(model.state_dict())
    result = bnfold.fold(model, inputs=X)
    assert result.passed and result.path is None
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.module.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    doc = result.to_dict()
    FoldVerifyDocument.model_validate(doc)
    assert doc["fold"]["batchnorms"] == 2 and doc["verification"]["verdict"]["criterion"] == (
        "float64"
    )
    assert "verification PASSED: reference Sequential, candidate folded Sequential" in str(result)


def test_verify_two_modules_catches_a_wrong_fold():
    model = cnn()
    folded = bnfold.fold(model, inputs=X).module
    assert bnfold.verify(model, folded, inputs=X).passed
    wrong = copy.deepcopy(folded)
    with torch.no_grad():  # one output channel scaled by 1.001: a BN folded with a bad eps
        wrong[0].weight[3] *= 1.001
    result = bnfold.verify(model, wrong, inputs=X)
    assert not result.passed
    assert result.to_dict()["verification"]["verdict"]["reason"].startswith("FAIL")


def test_a_module_needs_example_inputs():
    model = cnn()
    with pytest.raises(BnfoldError, match="needs example inputs") as e:
        bnfold.verify(model, model)
    assert "inputs=torch.randn" in e.value.hint
    result = bnfold.fold(model)  # folding alone needs none, but says it did not verify
    assert result.verification is None and result.passed
    assert FoldVerifyDocument.model_validate(result.to_dict()).verification is None
    assert "not verified" in str(result)


def test_export_a_folded_module_and_verify_it_in_onnx_runtime(tmp_path):
    model = cnn()
    folded = bnfold.fold(model, inputs=X).module
    out = tmp_path / "cnn.onnx"
    exported = bnfold.export(folded, X, out)
    assert exported.passed and exported.paths == {"onnx": out} and out.is_file()
    # the file runs at another batch size too, and matches the original module
    other = torch.randn(7, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    result = bnfold.verify(model, out, inputs=other)
    assert result.passed, str(result)
    assert result.to_dict()["verification"]["outputs"][0]["shape"] == [7, 10]


def test_fold_refuses_what_is_not_a_model():
    with pytest.raises(BnfoldError, match="cannot fold a list"):
        bnfold.fold([1, 2])


# ------------------------------------------------------------------------ the package


def test_import_bnfold_is_light_and_its_functions_survive_subpackage_imports():
    code = (
        "import sys, bnfold\n"
        "assert not {'torch', 'onnx', 'pydantic'} & set(sys.modules), sys.modules.keys()\n"
        "import bnfold.fold.modules, bnfold.verify.verdict, bnfold.report.diagnostics\n"
        "assert all(callable(getattr(bnfold, f)) for f in bnfold.__all__[-6:])\n"
        "print(sorted(n for n in bnfold.__all__ if not n.startswith('_')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name in ("train", "report", "fold", "verify", "export", "sample", "TrainConfig"):
        assert f"'{name}'" in r.stdout


def test_thread_choice_ignores_the_load_average(monkeypatch):
    """What is busy now (/proc/stat) decides, not the one-minute load average that a
    `pip install` just raised: the load average is never read where /proc/stat exists."""
    from bnfold.mlp import train

    def no_load_average():
        raise AssertionError("the load average was read")

    monkeypatch.setattr(train.os, "getloadavg", no_load_average)
    assert 1 <= train.free_cores(window=0.05) <= 2
