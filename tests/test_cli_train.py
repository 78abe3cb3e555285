from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from bnfold.checkpoint import load_checkpoint
from cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_train_json_writes_a_loadable_checkpoint(tmp_path):
    r = run(
        "train",
        "--steps",
        "150",
        "--batch-size",
        "256",
        "--out",
        str(tmp_path),
        "--n-hidden",
        "32",
        "--n-layers",
        "2",
        "--json",
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary.keys() >= {
        "train_loss",
        "dev_loss",
        "test_loss",
        "steps",
        "seconds",
        "params",
        "preset",
    }
    assert summary["steps"] == 150 and summary["preset"] == "fast"
    ck = load_checkpoint(tmp_path / "bn.pt")
    assert ck.config.n_hidden == 32 and ck.config.n_layers == 2
    assert ck.metrics["dev_loss"] == summary["dev_loss"]


def test_train_human_output(tmp_path):
    r = run(
        "train", "--steps", "50", "--batch-size", "64", "--out", str(tmp_path), "--n-layers", "1"
    )
    assert r.exit_code == 0, r.output
    assert "dev" in r.output and str(tmp_path / "bn.pt") in r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "'--steps': 0 is not in the range x>=1"),
        (["--block-size", "-1"], "'--block-size': -1 is not in the range x>=1"),
        (["--batch-size", "abc"], "'abc' is not a valid integer"),
        (["--preset", "turbo"], "'turbo' is not one of"),
        (["--lr", "0"], "'--lr'"),
        (["--data", "/definitely/not/here.txt"], "no such file"),
    ],
)
def test_bad_options_give_one_line_errors(tmp_path, args, message):
    r = run("train", "--out", str(tmp_path), *args)
    assert r.exit_code == 2
    assert message in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "bn.pt").exists()


def test_non_utf8_data_is_reported_with_line_number(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"anna\n\xc3\x28oops\n")
    r = run("train", "--data", str(bad), "--out", str(tmp_path))
    assert r.exit_code == 2 and "bad.txt:2:" in r.output and "UTF-8" in r.output
