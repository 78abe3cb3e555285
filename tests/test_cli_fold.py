"""The fold / verify / train-fold commands, end to end on a short-trained checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from bnfold.cli import main
from bnfold.io.files import file_sha256
from bnfold.mlp.checkpoint import load_checkpoint, save_checkpoint

REQUIRED = (
    "contexts_checked",
    "exhaustive",
    "max_abs_logit_error",
    "max_abs_prob_error",
    "argmax_agreement",
    "passed",
)


@pytest.fixture()
def bn(trained_checkpoint, tmp_path):
    return shutil.copy(trained_checkpoint, tmp_path / "bn.pt")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_fold_writes_verified_checkpoint(bn, tmp_path):
    r = run("fold", bn)
    assert r.exit_code == 0, r.output
    assert "PASSED" in r.output and "19,683" in r.output
    ckpt = load_checkpoint(tmp_path / "folded.pt")
    assert not ckpt.config.batchnorm
    assert ckpt.meta["verification"]["passed"] and ckpt.meta["verification"]["exhaustive"]
    assert len(ckpt.meta["fold_report"]["folded"]) == 6
    assert ckpt.meta["folded_from"]["path"] == str(bn.resolve())


def test_fold_json_and_out(bn, tmp_path):
    out = tmp_path / "sub" / "f.pt"
    r = run("fold", bn, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["path"] == str(out) and out.exists() and d["passed"]
    assert d["fold"]["complete"] and all(k in d["verification"]["details"] for k in REQUIRED)
    assert d["verification"]["reference"] == str(bn)
    assert d["verification"]["candidate"] == str(out)


def test_fold_that_fails_verification_exits_1_and_writes_nothing(bn, tmp_path):
    r = run("fold", bn, "--tolerance", "1e-12")
    assert r.exit_code == 1
    assert "FAILED" in r.output and "nothing written" in r.output
    assert not (tmp_path / "folded.pt").exists()


def test_verify_json(bn, tmp_path):
    assert run("fold", bn).exit_code == 0
    r = run("verify", bn, tmp_path / "folded.pt", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["command"] == "verify" and d["fold"] is None and d["passed"]
    figures = d["verification"]["details"]
    assert all(k in figures for k in REQUIRED)
    assert figures["contexts_checked"] == 19683 and figures["exhaustive"]
    assert figures["argmax_agreement"] == 1.0 and figures["max_abs_logit_error"] <= 1e-5
    assert d["verification"]["verdict"]["criterion"] == "float64"


def test_verify_fails_on_corrupted_folded_weight(bn, tmp_path):
    assert run("fold", bn).exit_code == 0
    ckpt = load_checkpoint(tmp_path / "folded.pt")
    with torch.no_grad():
        ckpt.model.net[4].weight[0, 0] += 0.05  # a deliberately corrupted folded weight
    bad = save_checkpoint(ckpt, tmp_path / "bad.pt")
    r = run("verify", bn, bad, "--json")
    assert r.exit_code == 1
    d = json.loads(r.output)
    assert not d["passed"] and d["verification"]["details"]["max_abs_logit_error"] > 1e-5
    assert d["verification"]["verdict"]["reason"].startswith("FAIL")
    r = run("verify", bn, bad)
    assert r.exit_code == 1 and "FAILED" in r.output


def test_verify_prints_reference_and_candidate_in_the_order_given(bn, tmp_path):
    assert run("fold", bn).exit_code == 0
    folded = tmp_path / "folded.pt"
    for a, b in ((bn, folded), (folded, bn)):
        r = run("verify", a, b)
        assert r.exit_code == 0, r.output
        assert r.output.splitlines()[0] == f"verification PASSED: reference {a}, candidate {b}"


def test_errors_are_one_line(bn, tmp_path):
    assert run("fold", bn).exit_code == 0
    r = run("fold", tmp_path / "folded.pt")
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0
    assert "already folded" in r.output
    r = run("verify", bn, tmp_path / "missing.pt")
    assert r.exit_code == 2 and "no such checkpoint" in r.output
    r = run("verify", bn, tmp_path / "model.txt")
    assert r.exit_code == 2 and "unknown model type" in r.output


@pytest.mark.slow
def test_train_fold_main_job(tmp_path, main_job):
    r = run(
        "train-fold", "--steps", "30", "--batch-size", "256", "--out", tmp_path, "--n-hidden", "16"
    )
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    table = lines[lines.index(next(ln for ln in lines if ln.startswith("stage"))) :]
    table = table[: table.index("")]  # the stage table ends at the four-networks table
    rows = []  # a row's details wrap onto indented continuation lines
    for ln in table[2:]:
        if ln.startswith(" "):
            rows[-1] += " " + ln.strip()
        else:
            rows.append(ln)
    stages = ["train", "fold", "verify", "export", "card", "report"]
    assert [row.split()[0] for row in rows] == stages
    assert "PASS" in rows[2] and "exhaustive" in rows[2]
    assert "PASS" in rows[3] and "bn.onnx (6 BN nodes)" in rows[3]
    assert str(tmp_path / "report" / "index.html") in rows[-1]
    card = (tmp_path / "README.md").read_text()
    for name in ("bn.pt", "folded.pt", "bn.onnx", "folded.onnx"):
        assert f"`{name}`" in card and file_sha256(tmp_path / name) in card
    assert "bnfold train-fold" in card and "seed 42" in card
    assert (tmp_path / "report" / "index.html").exists()
    assert "the four networks" in r.output and "ONNX folded" in r.output
    assert (tmp_path / "bn.pt").exists() and (tmp_path / "folded.pt").exists()
    assert (tmp_path / "bn.onnx").exists() and (tmp_path / "folded.onnx").exists()
    # the same run with --json (the session's, conftest.main_job): one JSON document, and
    # nothing else on either stream
    assert main_job[1].stderr == ""
    d = json.loads(main_job[1].stdout)
    assert d["passed"] and [s["stage"] for s in d["stages"]] == [
        "train",
        "fold",
        "verify",
        "export",
        "card",
        "report",
    ]
    assert d["export"]["passed"] and set(d["networks"]["latency_us"]) == {
        "torch BN",
        "torch folded",
        "ONNX BN",
        "ONNX folded",
    }
