"""Crafted and careless inputs to the ``bnfold`` command and its files: each must give one
``error:`` line and exit code 2, never a traceback, and never read or write what it should
not. The command runs in this process (``run_cli``), except where the process is what is
tested (usage errors as the console script names itself, Ctrl-C, a words file on a pipe):
there it is this venv's ``bnfold`` in a fresh process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import BNFOLD, SHIPPED, assert_one_error_line, bnfold, run_cli
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from bnfold.errors import BnfoldError
from bnfold.io.onnx_files import load_onnx_file

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
    # sample and serve read only self-contained files; verify also takes any ONNX pair, whose
    # external data may live beside the model (never in the cwd): here it is not there.
    for args, why in (
        (["sample", "m/evil.onnx", "-n", "3"], "self-contained"),
        (["verify", "m/bn.onnx", "m/evil.onnx"], "no such file"),
        (["serve", "m/evil.onnx", "--port", "0"], "self-contained"),
    ):
        r = run_cli(*args, cwd=tmp_path)
        assert_one_error_line(r, "evil.onnx", "tok_emb.weight", "secret.bin", why)
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


# ------------------------------------------------------------------------- messages --


@pytest.mark.slow  # ends with the console script in a fresh process
def test_usage_errors_are_one_line_and_a_hint():
    for args, needle, command in (
        (["train", "--steps", "0"], "'--steps': 0 is not in the range x>=1", "bnfold train"),
        (["sample", "--nope"], "No such option '--nope'", "bnfold sample"),
        (["bogus"], "No such command 'bogus'", "bnfold"),
    ):
        r = run_cli(*args)
        assert_one_error_line(r, needle)
        assert r.stderr.splitlines()[1] == f"hint: see '{command} --help'"
        assert "Usage:" not in r.stderr
    assert run_cli("--help").returncode == 0
    # the installed script in a fresh process, where click takes the command's name from
    # argv[0] (run_cli passes it): the same line and hint
    r = bnfold("sample", "--nope")
    assert_one_error_line(r, "No such option '--nope'")
    assert r.stderr.splitlines()[1] == "hint: see 'bnfold sample --help'"
    assert "Usage:" not in r.stderr


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_unsafe_and_foreign_pickles_give_their_cause(tmp_path):
    import pickle

    (tmp_path / "raw.pt").write_bytes(pickle.dumps({"format": "bnfold-checkpoint"}, protocol=4))
    torch.save({"format": "bnfold-checkpoint", "x": Evil()}, tmp_path / "evil.pt")
    r = run_cli("sample", "raw.pt", cwd=tmp_path)  # torch warned about the protocol first
    assert_one_error_line(r, "raw.pt", "not a torch file")
    r = run_cli("sample", "evil.pt", cwd=tmp_path)
    assert_one_error_line(r, "evil.pt", "system object, which could run code")
    assert "weights_only" not in r.stderr and not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------ crafted files --


@pytest.fixture(scope="module")
def payload() -> dict:
    return torch.load(SHIPPED / "bn.pt", weights_only=True)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"config": None}, "config"),
        ({"config": [1, 2, 3]}, "config"),
        ({"config": "n_hidden=100"}, "config"),
        (
            {
                "config": {
                    "vocab_size": 28,
                    "block_size": 3,
                    "n_embd": 10,
                    "n_hidden": "100",
                    "n_layers": 5,
                }
            },
            "n_hidden",
        ),  # fmt: skip
        (
            {
                "config": {
                    "vocab_size": 28,
                    "block_size": 3,
                    "n_embd": 10,
                    "n_hidden": 10**9,
                    "n_layers": 5,
                }
            },
            "inconsistent checkpoint",
        ),  # fmt: skip
        ({"vocab": "abc"}, "vocab"),
        ({"state_dict": [1, 2]}, "state_dict"),
        ({"meta": {"folded_from": "x"}}, "meta.folded_from"),
        ({"meta": {"data_sha256": 5}}, "meta.data_sha256"),
    ],
)
def test_checkpoint_structure_is_validated(tmp_path, payload, change, needle):
    torch.save({**payload, **change}, tmp_path / "bad.pt")
    r = run_cli("sample", tmp_path / "bad.pt", "-n", "2")
    assert_one_error_line(r, "bad.pt", needle)


def test_checkpoint_tensor_of_the_wrong_dtype(tmp_path, payload):
    state = dict(payload["state_dict"])
    state["net.0.weight"] = state["net.0.weight"].half()
    torch.save({**payload, "state_dict": state}, tmp_path / "half.pt")
    assert_one_error_line(run_cli("sample", tmp_path / "half.pt"), "net.0.weight", "float16")


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"layers": [{"saturation": "high"}]}, "layers.0.saturation"),
        ({"census": {"examples": 3, "layers": "none"}}, "census.layers"),
        ({"census": {"examples": 3, "layers": []}}, "census.layers"),
        ({"updates": {"w": {"log10": [1], "frozen": "no", "shape": [2, 2]}}}, "frozen"),
        ({"evals": [{"step": 1, "split": "dev", "loss": "2.1"}]}, "evals.0.loss"),
        ({"fold_comparison": [1]}, "fold_comparison"),
        ({"steps": None}, "steps"),
    ],
)
def test_diagnostics_report_structure_is_validated(tmp_path, change, needle):
    report = json.loads((SHIPPED / "report" / "diagnostics.json").read_text())
    (tmp_path / "diagnostics.json").write_text(json.dumps({**report, **change}))
    assert_one_error_line(run_cli("report", tmp_path), "malformed diagnostics report", needle)


# ------------------------------------------------------------- non-finite weights --


def test_nan_checkpoint_and_onnx_are_refused(tmp_path, payload, onnx_dir):
    state = dict(payload["state_dict"])
    state["net.3.weight"] = state["net.3.weight"].clone()
    state["net.3.weight"][0, 0] = float("nan")
    torch.save({**payload, "state_dict": state}, tmp_path / "nan.pt")
    for args in (
        ["sample", "nan.pt", "--json"],
        ["export", "nan.pt", "--out", "x"],
        ["fold", "nan.pt"],
        ["verify", str(SHIPPED / "bn.pt"), "nan.pt"],
    ):
        r = run_cli(*args, cwd=tmp_path)
        line = assert_one_error_line(r, "nan.pt", "NaN or infinite", "net.3.weight")
        # nothing on stdout, but with --json the error as a JSON document
        expected = (
            {"error": line.removeprefix("error: "), "hint": None} if "--json" in args else None
        )
        assert (json.loads(r.stdout) if r.stdout else None) == expected
    assert not (tmp_path / "x").exists() and not (tmp_path / "folded.pt").exists()
    proto = onnx.load(str(onnx_dir / "folded.onnx"))
    w = proto.graph.initializer[1]
    values = numpy_helper.to_array(w).copy()
    values.flat[3] = np.inf
    w.CopyFrom(numpy_helper.from_array(values, w.name))
    onnx.save(proto, str(onnx_dir / "inf.onnx"))
    assert_one_error_line(run_cli("sample", onnx_dir / "inf.onnx"), "inf.onnx", "NaN or infinite")


def test_json_output_has_no_nan():
    from bnfold.io import jsonsafe

    text = jsonsafe.dumps({"logprob": float("-inf"), "xs": [1.5, float("nan")]})
    assert json.loads(text) == {"logprob": None, "xs": [1.5, None]}
    assert "NaN" not in text and "Infinity" not in text


# ------------------------------------------------------------------- output paths --

NEVER_ENDS = "1000000"  # steps (hours of training): a run that trained first would time out
LONG_RUN = "100000"  # steps (minutes of training)


def test_output_paths_are_checked_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("keep me")
    (tmp_path / "adir" / "bn.onnx").mkdir(parents=True)
    (tmp_path / "d").mkdir()
    bn = SHIPPED / "bn.pt"
    cases = [
        (["train", "--out", "afile", "--steps", NEVER_ENDS], "afile: exists and is not a folder"),
        (["train-fold", "--out", "afile/sub", "--steps", NEVER_ENDS], "afile is a file"),
        (["train-fold", "--out", "adir", "--steps", NEVER_ENDS], "adir/bn.onnx: is a directory"),
        (["fold", bn, "--out", "d"], "d: is a directory"),
        (["export", bn, "--out", "adir"], "adir/bn.onnx: is a directory"),
        (["export", bn, "--out", "afile"], "afile: exists and is not a folder"),
    ]
    for args, needle in cases:
        assert_one_error_line(run_cli(*args, cwd=tmp_path, timeout=120), needle)
    assert (tmp_path / "afile").read_text() == "keep me"
    assert sorted(p.name for p in (tmp_path / "adir").iterdir()) == ["bn.onnx"]
    assert list((tmp_path / "d").iterdir()) == []


@pytest.fixture
def full_disk(tmp_path):
    """A 96 KiB tmpfs: too small for bn.pt (0.2 MB) or an ONNX file."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)],
                       capture_output=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_disk_is_one_line_and_leaves_nothing(full_disk, tmp_path):
    (full_disk / "filler").write_bytes(b"x" * 60_000)  # some space left, not enough
    for args, needle in (
        (["train", "--out", full_disk, "--steps", "3", "--batch-size", "32"], "bn.pt"),
        (["export", SHIPPED / "bn.pt", "--out", full_disk], "bn.onnx"),
        (["fold", SHIPPED / "bn.pt", "--out", full_disk / "folded.pt"], "folded.pt"),
        # written while verified, in another thread: its error is still this one line
        (["fold", SHIPPED / "bn.onnx", "--out", full_disk / "folded.onnx"], "folded.onnx"),
    ):
        r = run_cli(*args, cwd=tmp_path)
        assert_one_error_line(r, needle, "no space left on device")
        assert [p.name for p in full_disk.iterdir()] == ["filler"]  # no half file, no temp


# ------------------------------------------------------------ interrupts, temp files --


@pytest.mark.slow  # a fresh process on a pseudo-terminal, trained until Ctrl-C
def test_ctrl_c_in_train_fold_saves_the_checkpoint_aside_and_leaves_out_alone(tmp_path):
    """One SIGINT while training (seen on the progress bar of a pseudo-terminal). The run
    would take minutes; its bar first draws after steps // 200 steps (500 here), so the
    signal comes a second or two into training."""
    import pty
    import select
    import signal

    out = tmp_path / "models"
    out.mkdir()
    for name in ("bn.pt", "folded.pt", "bn.onnx", "folded.onnx", "README.md"):
        (out / name).write_text(f"shipped {name}")
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [BNFOLD, "train-fold", "--out", out, "--steps", LONG_RUN, "--batch-size", "64"],
        stdout=subprocess.PIPE,
        stderr=slave,
        text=True,
    )
    os.close(slave)
    seen = b""
    try:
        while b"train " not in seen:  # the progress bar: training has started
            ready, _, _ = select.select([master], [], [], 120)
            assert ready, seen
            seen += os.read(master, 4096)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        while select.select([master], [], [], 0.5)[0]:
            try:
                seen += os.read(master, 4096)
            except OSError:
                break
    finally:
        proc.kill()
        os.close(master)
    text = seen.decode(errors="replace")
    assert proc.returncode == 130, text
    assert "saved the partial model" in text and "Traceback" not in text
    for name in ("bn.pt", "folded.pt", "bn.onnx", "folded.onnx", "README.md"):
        assert (out / name).read_text() == f"shipped {name}"
    assert not (out / "report").exists()
    from bnfold.mlp.checkpoint import load_checkpoint

    partial = load_checkpoint(out / "bn.interrupted.pt")
    assert partial.meta["interrupted"] and 0 < partial.meta["steps_done"] < int(LONG_RUN)


def test_a_background_write_that_fails_leaves_nothing(tmp_path):
    """A file made in a thread (the folded model, serialised while it is verified) whose
    making fails half-way: commit raises that error, and neither the half-written temp
    file nor the folder made for it is left."""
    from bnfold.io.files import BackgroundWrite

    def write(tmp: str) -> None:
        Path(tmp).write_bytes(b"half of it")
        raise ValueError("a message over 2 GiB cannot be serialised")

    pending = BackgroundWrite(tmp_path / "new" / "model.onnx", write)
    with pytest.raises(ValueError, match="2 GiB"):
        pending.commit()
    assert list(tmp_path.iterdir()) == []


def test_stale_temp_files_are_removed_on_the_next_write(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    stale = out / f".bn.pt.{dead.pid}-abc123.tmp"
    live = out / f".bn.pt.{alive.pid}-def456.tmp"
    old_style = out / ".bn.pt.k2j3h4.tmp"  # no pid: removed once it is an hour old
    for p in (stale, live, old_style):
        p.write_bytes(b"half a checkpoint")
    os.utime(old_style, (1e9, 1e9))
    try:
        r = run_cli("train", "--out", out, "--steps", "2", "--batch-size", "32", "--n-layers", "1")
        assert r.returncode == 0, r.stderr
        assert sorted(p.name for p in out.iterdir()) == sorted(["bn.pt", live.name])
    finally:
        alive.kill()


def test_figures_are_written_atomically(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from bnfold.report import plots

    (tmp_path / "loss.png").write_bytes(b"the old figure")

    def half_then_crash(self, path, **kw):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_then_crash)
    with pytest.raises(BnfoldError, match="loss.png: cannot write: no space left on device"):
        plots.write_figure(plots.loss_figure({"train_loss": [3.0, 2.5]}), tmp_path / "loss.png")
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]
    assert (tmp_path / "loss.png").read_bytes() == b"the old figure"


# ------------------------------------------------------------------------- inputs --


def test_a_byte_order_mark_is_not_a_character(tmp_path):
    words = "\n".join(["anna", "bob", "carl", "dave", "emma", "fred", "gina"]) + "\n"
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + words.encode())
    r = run_cli("train", "--data", "bom.txt", "--out", "o", "--steps", "2", "--batch-size", "8",
               "--n-layers", "1", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    from bnfold.mlp.checkpoint import load_checkpoint

    vocab = load_checkpoint(tmp_path / "o" / "bn.pt").vocab
    assert "\ufeff" not in vocab.chars and vocab.chars == tuple(sorted(set(words.strip()) - {"\n"}))


def test_endless_and_huge_inputs_are_bounded(tmp_path):
    (tmp_path / "zero.pt").symlink_to("/dev/zero")
    (tmp_path / "zero.onnx").symlink_to("/dev/zero")
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    long_word = "a" * 5_000
    (tmp_path / "long.txt").write_text("anna\nbob\n" + long_word + "\ncarl\n")
    for args, needle in (
        (["sample", "zero.pt"], "zero.pt: is a device"),
        (["sample", "zero.onnx"], "zero.onnx: is a device"),
        (["report", "zero.json"], "zero.json: is a device"),
        (["train", "--data", "/dev/zero", "--out", "o"], "/dev/zero: is a device"),
        (["sample", SHIPPED / "folded.onnx", "--words", "/dev/zero", "-v"], "is a device"),
        (["train", "--data", "long.txt", "--out", "o"], "long.txt:3: a word of 5,000 characters"),
    ):
        assert_one_error_line(run_cli(*args, cwd=tmp_path, timeout=120), needle)


@pytest.mark.slow  # a fresh process
def test_words_from_a_pipe_are_read_with_a_bound(tmp_path):
    from bnfold.mlp.data import MAX_WORDS_BYTES

    fifo = tmp_path / "words.fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen([BNFOLD, "train", "--data", fifo, "--out", tmp_path / "o"],
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    # unbuffered, so a write after the reader has stopped fails inside the try, not at close
    with open(fifo, "wb", buffering=0) as f:
        try:  # more than the bound, in chunks: the reader stops after MAX_WORDS_BYTES + 1
            for _ in range(MAX_WORDS_BYTES // (1 << 20) + 2):
                f.write(b"anna\n" * ((1 << 20) // 5 + 1))
        except BrokenPipeError:
            pass
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.startswith("error: ") and "more than a words file" in err


def test_too_few_words_for_train_fold(tmp_path):
    (tmp_path / "three.txt").write_text("anna\nbob\ncarl\n")
    r = run_cli("train-fold", "--data", "three.txt", "--out", "o", cwd=tmp_path)
    assert_one_error_line(r, "3 words leave the dev split empty", "at least 6 words")
    assert not (tmp_path / "o").exists()
