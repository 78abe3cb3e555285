"""The verifier on cases whose truth is known by construction (a fast subset of
``benchmarks/verify_matrix.py``): correct folds (bnfold's, torch's fuse_linear_bn_eval)
pass, the seven real fold errors fail."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from bnfold.cli import main
from bnfold.fold.modules import fold_batchnorm
from bnfold.mlp.checkpoint import Checkpoint, load_checkpoint
from bnfold.mlp.data import Vocab, read_words
from bnfold.pipeline.train_fold import train_to_checkpoint
from bnfold.runtime.infer import TorchPredictor
from bnfold.verify.cases import FAULTS, faulty_networks, torch_fused, wider_alphabet
from bnfold.verify.verdict import verify

SMALL_DOMAIN = dict(max_exhaustive=50_000, sample_size=20_000)


@pytest.fixture(scope="module")
def wide_vocab_checkpoint(tmp_path_factory, names_path):
    """A quick model on a ~90-character alphabet (capitals, accents, hyphens, spaces)."""
    d = tmp_path_factory.mktemp("wide")
    words = wider_alphabet(read_words(names_path), level=2)
    (d / "words.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    assert 80 <= Vocab.from_words(words).size <= 100
    path, _ = train_to_checkpoint(
        d / "words.txt", d, steps=300, batch_size=256, n_hidden=64, n_layers=2, progress=False
    )
    return path


@pytest.fixture(scope="module", params=["names", "wide"])
def cases(request, trained_checkpoint, wide_vocab_checkpoint):
    """(BN predictor, {name: candidate predictor}, {name: fault predictor})"""
    path = trained_checkpoint if request.param == "names" else wide_vocab_checkpoint
    ckpt = load_checkpoint(path)
    bn = ckpt.model.eval()
    folded, report = fold_batchnorm(bn)
    assert report.complete

    def predictor(model, label):
        return TorchPredictor(Checkpoint(model, ckpt.vocab), label)

    correct = {"bnfold": predictor(folded, "bnfold"), "torch": predictor(torch_fused(bn), "torch")}
    batch = ckpt.meta["train_config"]["batch_size"]
    faults = {k: predictor(m, k) for k, m in faulty_networks(bn, folded, 0, batch).items()}
    return TorchPredictor(ckpt, str(path)), correct, faults


@pytest.mark.parametrize("use_float64", [True, False])
def test_correct_folds_pass(cases, use_float64):
    bn, correct, _ = cases
    for name, cand in correct.items():
        r = verify(bn, cand, use_float64=use_float64, **SMALL_DOMAIN)
        assert r.passed, (name, r.reason)
        assert r.criterion == ("float64" if use_float64 else "magnitude")


@pytest.mark.parametrize("fault", list(FAULTS))
def test_every_real_fold_error_fails(cases, fault):
    bn, _, faults = cases
    r = verify(bn, faults[fault], **SMALL_DOMAIN)
    assert r.criterion == "float64"
    assert not r.passed, (fault, r.reason)


def test_verify_two_onnx_files_with_no_pt_anywhere(trained_checkpoint, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["export", str(trained_checkpoint), "--out", str(tmp_path / "x")])
    assert r.exit_code == 0, r.output
    only = tmp_path / "only_onnx"
    only.mkdir()
    for f in ("bn.onnx", "folded.onnx"):
        shutil.move(tmp_path / "x" / f, only / f)
    shutil.rmtree(tmp_path / "x")
    r = runner.invoke(main, ["verify", str(only / "bn.onnx"), str(only / "folded.onnx"), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)["verification"]
    # bn.onnx run in double by ONNX Runtime is the truth: the float64 criterion applies
    assert report["passed"] and report["verdict"]["criterion"] == "float64"
    assert report["float64"] == str(only / "bn.onnx")
    assert report["details"]["parameter_ratio"] < report["details"]["parameter_bound"]
    # two folded files: the reference's own parameters, run in double, are the truth
    shutil.copy(only / "folded.onnx", only / "copy.onnx")
    folded, copy = str(only / "folded.onnx"), str(only / "copy.onnx")
    r = runner.invoke(main, ["verify", folded, copy, "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)["verification"]
    assert report["passed"] and report["verdict"]["criterion"] == "float64"
    assert "its own parameters" in report["float64"]
    assert report["details"]["parameter_ratio"] == 0.0  # the very same parameters


def test_absurd_sample_size_is_refused_up_front(trained_checkpoint):
    r = CliRunner().invoke(
        main,
        ["verify", str(trained_checkpoint), str(trained_checkpoint), "--sample-size", "10" * 6],
    )
    assert r.exit_code == 2 and "sample-size" in r.output
