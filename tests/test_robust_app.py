"""Hostile and careless inputs to the application side (issue #21, items 3, 4, 10, 11, 14,
15), each through the whole command on real files (in this process, ``run_cli``; a service
that must exit, in a fresh one) or the real server (``bnfold serve`` under uvicorn): a
failed ``train-fold`` commit keeps the old output set, models past 2**63 contexts sample,
bench and serve, a service whose model does not load exits, an untrusted vocabulary cannot
drive the terminal, a tiny ``top_p`` keeps the top token, no figure process can outlive
``train-fold``, and ``Host`` names outside ``--allowed-hosts`` get 400."""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import torch
from conftest import NAMES, SHIPPED, assert_one_error_line, bnfold, run_cli, stop_server

from bnfold.errors import BnfoldError
from bnfold.io.files import StagedOutputs, commit_files
from bnfold.mlp.checkpoint import Checkpoint, save_checkpoint
from bnfold.mlp.data import Vocab
from bnfold.mlp.model import MLP, ModelConfig

LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
# a train-fold run as small as the pipeline allows (seconds, not minutes)
SMALL_RUN = ("--steps", "50", "--n-hidden", "20", "--n-layers", "2", "--batch-size", "64")


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path) -> sha256; folders as ``<dir>``."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        out[key] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def card_hashes(card: Path) -> dict[str, str]:
    """The ``| `file` | bytes | `sha256` |`` rows of a model card."""
    rows = {}
    for line in card.read_text("utf-8").splitlines():
        cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
        if len(cells) == 3 and len(cells[2]) == 64:
            rows[cells[0]] = cells[2]
    return rows


def random_model(path: Path, chars: tuple[str, ...], block_size: int = 3, **kw) -> Path:
    """An untrained (seeded) model with vocabulary ``chars``, saved as a checkpoint."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=len(chars) + 1,
        block_size=block_size,
        n_embd=kw.get("n_embd", 4),
        n_hidden=kw.get("n_hidden", 16),
        n_layers=2,
        batchnorm=kw.get("batchnorm", False),
    )
    return save_checkpoint(Checkpoint(MLP(cfg).eval(), Vocab(chars)), path)


@contextlib.contextmanager
def serving(spawn_serve, wait_ready, model: Path, *extra: str):
    proc, url = spawn_serve(model, *extra)
    try:
        wait_ready(url)
        yield url
    finally:
        stop_server(proc)


# ------------------------------------------------- item 3: the output set, all or none


@pytest.fixture(scope="module")
def done_run(main_job) -> Path:
    """The output folder of one finished small ``train-fold`` (the session's: read-only,
    copy it)."""
    return main_job[0]


@pytest.mark.parametrize(
    "name", ["report/index.html", "report/loss.png", "report/fold_comparison.png"]
)
def test_a_folder_in_the_way_of_a_report_file_is_refused_before_training(tmp_path, done_run, name):
    out = tmp_path / "out"
    shutil.copytree(done_run, out)
    (out / name).unlink()
    (out / name).mkdir()
    before = tree_digest(out)
    r = run_cli("train-fold", "--data", NAMES, "--out", out, *SMALL_RUN)
    assert_one_error_line(r, name.split("/")[-1], "is a directory")
    assert r.stdout == ""  # refused before training: no stage table
    assert tree_digest(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left


def test_a_commit_that_fails_half_way_keeps_the_old_set_and_its_card(tmp_path, done_run):
    """An immutable ``folded.pt`` (chattr +i) cannot be replaced: found only when the new
    set is moved into place, after bn.pt and the ONNX files could have been. Every file
    must be the old one, the card's checksums must match, nothing staged must remain."""
    out = tmp_path / "out"
    shutil.copytree(done_run, out)
    if shutil.which("chattr") is None or os.geteuid() != 0:
        pytest.skip("needs root and chattr to make a file immutable")
    if subprocess.run(["chattr", "+i", str(out / "folded.pt")]).returncode != 0:
        pytest.skip("this file system has no immutable flag")
    try:
        before = tree_digest(out)
        r = run_cli("train-fold", "--data", NAMES, "--out", out, *SMALL_RUN, "--seed", "7")
        after = tree_digest(out)
    finally:
        subprocess.run(["chattr", "-i", str(out / "folded.pt")], check=True)
    assert_one_error_line(r, "folded.pt", "cannot move the outputs into place", "previous files")
    assert after == before
    cards = card_hashes(out / "README.md")
    assert set(cards) == {"bn.pt", "folded.pt", "bn.onnx", "folded.onnx"}
    assert all(after[name] == sha for name, sha in cards.items())
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def staged_set(tmp_path: Path, names: list[str]) -> tuple[Path, StagedOutputs]:
    """A target folder holding ``old`` versions of ``names`` and a stage of ``new`` ones."""
    target = tmp_path / "target"
    target.mkdir()
    for n in names:
        (target / n).parent.mkdir(parents=True, exist_ok=True)
        (target / n).write_text("old " + n)
    stage = StagedOutputs(target)
    for n in names:
        stage.path(target / n).parent.mkdir(parents=True, exist_ok=True)
        stage.path(target / n).write_text("new " + n)
    return target, stage


def test_commit_files_puts_back_what_it_moved_when_a_later_move_fails(tmp_path):
    names = ["a.pt", "b.onnx", "sub/c.png", "z.md"]
    target, stage = staged_set(tmp_path, names)
    moves = stage.staged()
    blocked = stage.path(target / "z.md")  # the last move's source vanishes: ENOENT
    blocked.unlink()
    new_folder = target / "brand" / "new"
    extra = stage.root / "brand" / "new" / "d.txt"  # a file whose folder must be made
    extra.parent.mkdir(parents=True)
    extra.write_text("new d")
    moves.insert(0, (extra, new_folder / "d.txt"))
    with pytest.raises(BnfoldError, match=r"z\.md: cannot move the outputs into place"):
        commit_files(moves)
    assert {n: (target / n).read_text() for n in names} == {n: "old " + n for n in names}
    assert not (target / "brand").exists()  # the folders made for new files are gone
    stage.discard()


def test_commit_files_checks_every_destination_before_moving_any(tmp_path):
    names = ["a.pt", "b.onnx"]
    target, stage = staged_set(tmp_path, names)
    (target / "report").mkdir()
    (target / "report" / "index.html").mkdir()  # a folder where a file must go
    page = stage.path(target / "report" / "index.html")
    page.parent.mkdir()
    page.write_text("new page")
    with pytest.raises(BnfoldError, match=r"index\.html: is a directory"):
        stage.commit()
    assert {n: (target / n).read_text() for n in names} == {n: "old " + n for n in names}
    assert not stage.root.exists()  # discarded


# ------------------------------------------- item 4: domains past 2**63 contexts


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> Path:
    """A folded model of block size 14: 27**14 contexts, more than 2**63."""
    return random_model(tmp_path_factory.mktemp("wide") / "wide.pt", LETTERS, block_size=14)


def test_a_model_past_2_63_contexts_samples_with_either_engine(wide_model):
    got = {}
    for engine in ("network", "table"):
        r = run_cli("sample", wide_model, "-n", "20", "--engine", engine, "--max-length", "30")
        assert r.returncode == 0 and r.stderr == "", r.stderr
        got[engine] = r.stdout.splitlines()
    assert len(got["network"]) == 20 and all(got["network"])
    assert got["table"] == got["network"]  # same names: the table hands the domain over
    long = run_cli("sample", wide_model, "-n", "5", "--min-length", "20", "--max-length", "30")
    assert long.returncode == 0, long.stderr
    assert all(20 <= len(n) <= 30 for n in long.stdout.splitlines())


def test_bench_runs_on_a_model_past_2_63_contexts(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    random_model(models / "bn.pt", LETTERS, block_size=14, batchnorm=True)
    r = run_cli("bench", "--models", models, "--repeats", "20", "--names", "20", "--json")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    figures = json.loads(r.stdout)
    assert figures  # a report, not a crash


@pytest.mark.slow  # a live server
def test_serve_answers_from_a_model_past_2_63_contexts(wide_model, spawn_serve, wait_ready):
    with serving(spawn_serve, wait_ready, wide_model) as url:
        r = httpx.post(url + "/v1/names", json={"count": 7, "seed": 1, "max_length": 30})
        assert r.status_code == 200, r.text
        assert r.json()["count"] == 7
        info = httpx.get(url + "/v1/model").json()
        assert info["block_size"] == 14 and info["service"]["engine"] == "network"


@pytest.mark.slow  # fresh processes
@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_exits_when_its_model_fails_to_load(tmp_path, workers):
    """A vocabulary of 5,000 characters under --memory-mb 1: every table row is 60 KB, so
    the worker cannot build the default engine when it warms up (after the CLI's own
    checks passed). The service must stop with the reason, not answer "not ready" for
    ever."""
    model = random_model(
        tmp_path / "big.pt", tuple(chr(0x4E00 + i) for i in range(5000)), n_hidden=4
    )
    r = bnfold(
        "serve", model, "--port", "0", "--memory-mb", "1", "--max-rows", "64",
        "--workers", workers, "--log-level", "critical",
        timeout=240,
    )  # fmt: skip
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [errors[-1]] and "the model failed to load" in errors[0]
    assert "holds fewer than 64 rows" in errors[0]


# --------------------------------------------------- item 10: the terminal is safe


def test_sample_escapes_control_characters_of_an_untrusted_vocabulary(tmp_path):
    """A vocabulary with ESC, BEL, a line break, a bidi override and a backslash in place
    of frequent letters: the text output holds none of them raw, has one line per name,
    and each line reads back (as a Python escape) as the name ``--json`` gives."""
    hostile = {"a": "\x1b", "e": "\n", "i": "\x07", "n": "\u202e", "o": "\\"}
    chars = tuple(hostile.get(c, c) for c in LETTERS)
    model = random_model(tmp_path / "evil.pt", chars)
    args = ("sample", model, "-n", "300", "--seed", "5", "--max-length", "12")
    text = run_cli(*args)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.split("\n")
    assert lines[-1] == "" and len(lines) == 301
    assert not any(c in text.stdout for c in "\x1b\x07\u202e")
    data = run_cli(*args, "--json", "--words", NAMES)
    names = [d["name"] for d in json.loads(data.stdout)["names"]]
    assert [codecs.decode(line, "unicode_escape") for line in lines[:-1]] == names
    assert any(c in "".join(names) for c in "\x1b\n\x07\u202e\\")  # the test means something
    verbose = run_cli(*args, "-v", "--words", NAMES)
    assert verbose.returncode == 0 and len(verbose.stdout.splitlines()) == 300
    assert not any(c in verbose.stdout for c in "\x1b\x07\u202e")


# -------------------------------------------------- item 11: top_p below float32


def test_a_top_p_below_float32s_smallest_value_keeps_only_the_top_token():
    model = SHIPPED / "folded.onnx"
    greedy = run_cli("sample", model, "-n", "1", "--temperature", "0").stdout.split()
    assert len(greedy) == 1
    for p in ("1e-46", "1e-300", "5e-324"):
        r = run_cli("sample", model, "-n", "5", "--top-p", p, "--seed", "3")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == greedy * 5, p


@pytest.mark.slow  # a live server
def test_a_top_p_below_float32_over_http_keeps_only_the_top_token(spawn_serve, wait_ready):
    with serving(spawn_serve, wait_ready, SHIPPED / "folded.onnx") as url:
        greedy = httpx.post(url + "/v1/names", json={"count": 1, "temperature": 0}).json()
        tiny = httpx.post(url + "/v1/names", json={"count": 6, "seed": 9, "top_p": 1e-300})
        assert tiny.status_code == 200, tiny.text
        want = greedy["names"][0]["name"]
        assert [n["name"] for n in tiny.json()["names"]] == [want] * 6


# ------------------------------------------- item 14: no orphaned figure process


def test_train_fold_draws_its_report_without_a_child_process(tmp_path, monkeypatch):
    """A killed train-fold leaves nothing behind running: the report, figures included, is
    drawn in train-fold's own process from what the walk measured, so there is no figure
    process that could outlive it and write into a dead run's staging folder."""
    from bnfold.pipeline.train_fold import run_main_job

    started = []
    real_popen, real_fork = subprocess.Popen.__init__, os.fork

    def popen(self, args, *a, **k):
        started.append(args)
        real_popen(self, args, *a, **k)

    def fork():
        started.append("fork")
        return real_fork()

    monkeypatch.setattr(subprocess.Popen, "__init__", popen)
    monkeypatch.setattr(os, "fork", fork)
    out = tmp_path / "out"
    result = run_main_job(
        out, data_path=NAMES, steps=50, n_hidden=20, n_layers=2, batch_size=64, progress=False
    )
    assert result.passed and (out / "report" / "index.html").is_file()
    assert (out / "report" / "fold_comparison.png").is_file()
    assert started == []


# ------------------------------------------------------ item 15: the Host header


@pytest.mark.slow  # a live server
def test_serve_answers_400_to_a_host_it_does_not_serve(spawn_serve, wait_ready):
    with serving(spawn_serve, wait_ready, SHIPPED / "folded.onnx") as url:
        port = url.rsplit(":", 1)[1]
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
            r = httpx.get(url + "/readyz", headers={"Host": host})
            assert r.status_code == 200, host
        for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.evil.example"):
            for method, path, body in (
                ("GET", "/readyz", None),
                ("GET", "/v1/names?count=2", None),
                ("POST", "/v1/names", {"count": 2}),
                ("GET", "/", None),
            ):
                r = httpx.request(method, url + path, json=body, headers={"Host": host})
                assert r.status_code == 400, (host, path, r.status_code)
        bad = 'bnfold_request_seconds_count{endpoint="/v1/names",status="400"} 6.0'
        assert bad in httpx.get(url + "/metrics").text  # counted like any other answer


@pytest.mark.slow  # live servers
def test_allowed_hosts_replaces_the_default(spawn_serve, wait_ready):
    model = SHIPPED / "folded.onnx"
    hosts = "names.example, *.lan,127.0.0.1"  # the last one for wait_ready
    with serving(spawn_serve, wait_ready, model, "--allowed-hosts", hosts) as url:
        ok = ("names.example", "NAMES.example:8000", "box.lan")
        for host in (*ok, "localhost", "lan"):
            r = httpx.get(url + "/v1/names?count=1", headers={"Host": host})
            assert r.status_code == (200 if host in ok else 400), host
    with serving(spawn_serve, wait_ready, model, "--allowed-hosts", "*") as url:
        r = httpx.get(url + "/v1/names?count=1", headers={"Host": "anything.example"})
        assert r.status_code == 200


@pytest.mark.parametrize("hosts", ["a*b", "", "x/y", " , ", "*.*.lan", "localhost:8000"])
def test_a_bad_allowed_hosts_is_one_error_line(hosts):
    r = run_cli("serve", SHIPPED / "folded.onnx", "--port", "0", "--allowed-hosts", hosts)
    assert_one_error_line(r, "allowed-hosts")


def test_the_bare_fastapi_app_checks_host_too(live, serve_settings):
    from bnfold.serve import create_fastapi_app

    settings = serve_settings(allowed_hosts=("names.example",))
    with live(settings, app=create_fastapi_app(settings), ready=False) as url:
        assert httpx.get(url + "/livez", headers={"Host": "names.example"}).status_code == 200
        assert httpx.get(url + "/livez").status_code == 400  # Host: 127.0.0.1:<port>
