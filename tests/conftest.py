"""Shared fixtures: a short-trained default-architecture checkpoint (built once per session),
its ONNX export, predictors and the novelty labeler; and the two ways tests run the ``bnfold``
command: ``run_cli`` in this process (most tests) and ``bnfold`` in a fresh one (where the
process itself is what is tested)."""

from __future__ import annotations

import contextlib
import locale
import os
import signal
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NAMES = REPO / "data" / "names.txt"
SHIPPED = REPO / "models"
# the installed console script (``bnfold``), for tests that start it as a user would
BNFOLD = str(Path(sys.executable).with_name("bnfold"))


def bnfold(*args, cwd=REPO, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """The real command (the console script, as a user types it) in a fresh process, run
    from the repository root; stdout and stderr captured apart (not a terminal: no
    progress bar). For what only a process shows: its exit status, import-time output,
    signals, pipes, ``serve``; everything else uses ``run_cli``."""
    cmd = [BNFOLD, *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw)


class CliTimeout(BaseException):
    """``run_cli`` ran past its timeout (a BaseException: click and the command let it
    through, so the test fails here instead of hanging)."""


@contextlib.contextmanager
def _deadline(seconds: float):
    def expire(signum, frame):
        raise CliTimeout(f"the command ran past its {seconds} s timeout")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _in_folder(cwd):
    before = os.getcwd()
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def _global_state_kept():
    """What a command may change for the rest of its process (random generators, torch's
    thread count) is put back, so no later test sees what an earlier command left."""
    import random

    import numpy as np
    import torch

    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    np_rng, py_rng = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        torch.random.set_rng_state(rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)


@contextlib.contextmanager
def _fresh_process_warnings():
    """Warnings as a fresh interpreter shows them (its default filters, each printed on
    stderr), instead of pytest's recording: yields the list they are collected in."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                         ResourceWarning):  # fmt: skip
            warnings.simplefilter("ignore", category, append=True)
        warnings.simplefilter("default", append=True)
        yield caught


def run_cli(*args, cwd=REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    """``bnfold ARGS`` run in this process (click's CliRunner on ``bnfold.cli:main``, the
    console script's entry point), answered like ``bnfold(...)``: returncode, stdout and
    stderr apart. What would reach a real process's stderr reaches ``stderr`` here too:
    writes to file descriptors 1 and 2 (ONNX Runtime's log), warnings (shown as a fresh
    interpreter shows them), and the traceback of an exception the command let escape
    (exit code 1, as Python's). Run from ``cwd`` (then back); a run past ``timeout``
    seconds fails the test (CliTimeout) rather than hanging the suite."""
    from click.testing import CliRunner

    from bnfold.cli import main

    argv = [str(a) for a in args]
    runner = CliRunner(capture="fd")
    with (
        _in_folder(cwd),
        _global_state_kept(),
        _deadline(timeout),
        _fresh_process_warnings() as caught,
    ):
        r = runner.invoke(main, argv, prog_name="bnfold", catch_exceptions=True)
    stderr = _as_text(r.stderr_bytes)
    for w in caught:
        stderr += warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*r.exc_info))
    stdout = _as_text(r.stdout_bytes)
    return subprocess.CompletedProcess(["bnfold", *argv], r.exit_code, stdout, stderr)


def _as_text(data: bytes) -> str:
    """Bytes as ``subprocess.run(..., text=True)`` reads them: the locale's encoding,
    universal newlines."""
    text = data.decode(locale.getpreferredencoding(False))
    return text.replace("\r\n", "\n").replace("\r", "\n")


def assert_one_error_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, stderr exactly one ``error:`` line (plus an optional ``hint:`` line) holding
    every needle, no traceback; the line is returned."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if not line.startswith("hint: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def names_path() -> Path:
    return NAMES


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """``bn.pt`` of the default architecture after a short `fast` run (a few seconds).

    Read-only for tests: copy it before modifying.
    """
    from bnfold.pipeline.train_fold import train_to_checkpoint

    out = tmp_path_factory.mktemp("trained")
    path, _ = train_to_checkpoint(
        NAMES, out, preset="fast", steps=400, batch_size=512, progress=False
    )
    return path


@pytest.fixture(scope="session")
def exported(trained_checkpoint, tmp_path_factory):
    """The session checkpoint's export (``bn.onnx`` and ``folded.onnx``, alone in their
    folder): the ``ExportResult``. Read-only: copy a file before changing it or writing
    beside it."""
    from bnfold.pipeline.assemble import export_checkpoint

    return export_checkpoint(trained_checkpoint, tmp_path_factory.mktemp("exported"))


@pytest.fixture(scope="session")
def onnx_model(exported, tmp_path_factory) -> Path:
    """``folded.onnx`` exported from the session's short-trained checkpoint (a copy in a
    folder of its own: some tests write beside it)."""
    import shutil

    return Path(shutil.copy(exported.paths["folded"], tmp_path_factory.mktemp("onnx")))


# ``bnfold train-fold`` as small as a full run gets (seconds)
SMALL_MAIN_JOB = ("--steps", "30", "--batch-size", "256", "--n-hidden", "16")


@pytest.fixture(scope="session")
def main_job(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One small ``bnfold train-fold --json`` (``run_cli``): its output folder (the whole
    set, report included) and what the command returned. Read-only: copy the folder
    before changing anything in it."""
    out = tmp_path_factory.mktemp("main_job") / "models"
    r = run_cli("train-fold", *SMALL_MAIN_JOB, "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    return out, r


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (batch-1 calls on a busy 2-core machine are ~10x slower
    with two), restored afterwards: other modules' float tolerances assume the default."""
    from bnfold.mlp.threads import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def bn(trained_checkpoint):
    """The trained BN checkpoint as a torch predictor."""
    from bnfold.runtime.infer import TorchPredictor

    return TorchPredictor(trained_checkpoint)


@pytest.fixture(scope="session")
def onnx_predictor(onnx_model):
    from bnfold.runtime.infer import load_predictor

    return load_predictor(onnx_model)


@pytest.fixture(scope="session")
def labeler(bn, names_path):
    from bnfold.sampling.sample import load_labeler

    return load_labeler(bn, names_path)


# ------------------------------------------------------------------ the HTTP service


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, timeout: float = 60) -> None:
    import contextlib
    import time

    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"{url} not ready after {timeout} s")


@pytest.fixture(scope="session")
def wait_ready():
    """``wait_ready(url)``: poll ``/readyz`` until 200 (at most 60 s)."""
    return _wait_ready


@pytest.fixture(scope="session")
def serve_settings(onnx_model):
    """``serve_settings(**limits)``: ServeSettings for the session's ONNX model."""
    from bnfold.serve import ServeSettings

    def make(**kw) -> ServeSettings:
        return ServeSettings(model=str(onnx_model), words=str(NAMES), **kw)

    return make


@pytest.fixture(scope="session", params=["edge", "fastapi"])
def front(request) -> str:
    """What answers ``/v1/names``: ``edge``, the app as ``bnfold serve`` runs it (the Edge's
    shortcut into ``NamesEndpoint.answer``), or ``fastapi``, the bare FastAPI app (its
    documented routes, no Edge in front). Every ``/v1/names`` test runs on both, so the
    two paths cannot drift apart."""
    return request.param


@pytest.fixture(scope="session")
def front_app(front):
    """``front_app(settings, loader=None)``: a new app of the ``front`` under test."""
    from bnfold.serve import create_app, create_fastapi_app

    return create_app if front == "edge" else create_fastapi_app


@pytest.fixture(scope="session")
def live():
    """``with live(settings, loader=None, ready=True) as url``: the app under a real uvicorn
    (with the service's own protocol and limits) in a thread, on 127.0.0.1:<free port>."""
    import contextlib
    import threading
    import time

    import uvicorn

    from bnfold.serve import create_app
    from bnfold.serve.server import uvicorn_options

    @contextlib.contextmanager
    def run(settings, loader=None, ready: bool = True, app=None):
        app = app or create_app(settings, loader=loader)
        port = _free_port()
        opts = {**uvicorn_options(settings), "loop": "asyncio"}
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **opts)
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        if ready:
            _wait_ready(url)
        try:
            yield url
        finally:
            server.should_exit = True
            thread.join(30)

    return run


def stop_server(proc) -> None:
    """SIGTERM a ``spawn_serve`` process and reap it (killed if it has not drained in 30 s)."""
    import signal
    import subprocess

    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def spawn_serve():
    """``spawn_serve(model, *args) -> (Popen, url)``: ``cli.py serve`` as a subprocess."""
    import subprocess
    import sys

    def spawn(model: Path, *extra: str):
        port = _free_port()
        cmd = [sys.executable, str(REPO / "cli.py"), "serve", str(model), "--port", str(port)]
        cmd += ["--log-level", "warning", *extra]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return proc, f"http://127.0.0.1:{port}"

    return spawn
