from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import bnfold, run_cli

from bnfold.cli import main
from bnfold.mlp.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parent.parent


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


@pytest.mark.parametrize(
    "option, value",
    [
        ("--n-hidden", "1000000"),
        ("--n-embd", "100000000"),
        # i.i.d. batches (the lecture's sampling) are allocated whole; `fast` draws without
        # replacement, so a batch never exceeds the training split there
        ("--batch-size", "100000000000 --preset lecture"),
        ("--block-size", "1000000"),
    ],
)
def test_impossible_sizes_are_refused_before_allocating(tmp_path, option, value):
    r = run_cli("train", option, *value.split(), "--steps", "1", "--out", str(tmp_path))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: training needs about"), r.stderr
    assert "GiB" in lines[0] and "available" in lines[0]
    assert not (tmp_path / "bn.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "command, lr, message",
    [
        ("train", "1e30", "error: training diverged"),
        ("train-fold", "1e30", "error: training diverged"),
        ("train-fold", "inf", "error: lr must be a finite number > 0"),
    ],
)
def test_a_diverged_run_writes_nothing(tmp_path, command, lr, message):
    r = run_cli(command, "--lr", lr, "--steps", "20", "--out", str(tmp_path / "m"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].lower().startswith(message), r.stderr
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


@pytest.mark.slow
def test_same_seed_and_threads_give_the_same_checkpoint_weights(tmp_path):
    """Two processes, same data/config/seed/threads: bit-identical weights, and the thread
    count `--threads 0` chose is recorded in the checkpoint."""
    common = ["--steps", "40", "--batch-size", "1024", "--json"]
    r0 = bnfold("train", *common, "--threads", "0", "--out", str(tmp_path / "auto"))
    assert r0.returncode == 0, r0.stderr
    threads = load_checkpoint(tmp_path / "auto" / "bn.pt").meta["train_config"]["threads"]
    assert threads in (1, 2)
    r1 = bnfold("train", *common, "--threads", str(threads), "--out", str(tmp_path / "again"))
    assert r1.returncode == 0, r1.stderr
    a = load_checkpoint(tmp_path / "auto" / "bn.pt").model.state_dict()
    b = load_checkpoint(tmp_path / "again" / "bn.pt").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_train_reports_its_wall_time_and_keeps_pipes_clean(tmp_path):
    r = bnfold("train", "--steps", "30", "--batch-size", "512", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no progress bar when stderr is not a terminal
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("wall time ") and last.endswith("s (process start to exit)")
    float(last.split()[2])  # a number of seconds
    r = bnfold(
        "train", "--steps", "30", "--batch-size", "512", "--out", str(tmp_path / "j"), "--json"
    )
    summary = json.loads(r.stdout)
    assert summary["wall_seconds"] >= summary["seconds"]  # the process includes its training
