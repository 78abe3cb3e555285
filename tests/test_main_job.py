"""The main job (``train-fold``) walks the input domain once for all its verdicts, and
writes its output set atomically: a run that fails leaves an existing set untouched."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from itertools import combinations
from pathlib import Path

import pytest
from torch import nn

from bnfold.errors import BnfoldError
from bnfold.io.files import StagedOutputs
from bnfold.pipeline.train_fold import UNVERIFIED_CHECKPOINT, run_main_job
from bnfold.report import diagnostics
from bnfold.runtime.twins import TorchTwin
from bnfold.verify.domain import PairStats
from bnfold.verify.networks import FOUR_NETWORKS
from bnfold.verify.verdict import Float64Model, verify

pytestmark = pytest.mark.slow  # every test runs the main job (train -> fold -> verify -> export)

NAMES = Path(__file__).resolve().parent.parent / "data" / "names.txt"
SMALL = {"data_path": NAMES, "steps": 30, "batch_size": 256, "n_hidden": 16, "progress": False}
DOMAIN = 27**3  # names.txt: 26 letters + the end token, block size 3: every context


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def shipped(main_job) -> Path:
    """An output set made by a small main job (the session's: read-only, copy it)."""
    return main_job[0]


def test_each_pair_is_compared_once_and_float64_evaluated_once(tmp_path, monkeypatch):
    compared: Counter = Counter()  # (reference, candidate) -> contexts compared
    add = PairStats.add

    def counting_add(self, ctx, a, b, z):
        compared[(self.reference, self.candidate)] += len(ctx)
        return add(self, ctx, a, b, z)

    truth: Counter = Counter()  # contexts the float64 BN network evaluated
    logits = Float64Model.logits

    def counting_logits(self, contexts):
        truth["contexts"] += len(contexts)
        return logits(self, contexts)

    bn_in_float64: Counter = Counter()  # contexts any float64 copy of the BN network saw
    twin_logits = TorchTwin.logits

    def counting_twin_logits(self, contexts):
        if any(isinstance(m, nn.BatchNorm1d) for m in self.module.modules()):
            bn_in_float64["contexts"] += len(contexts)
        return twin_logits(self, contexts)

    written: Counter = Counter()  # report files written, by name
    write_text = diagnostics._write_text

    def counting_write_text(path, text):
        written[Path(path).name] += 1
        return write_text(path, text)

    monkeypatch.setattr(PairStats, "add", counting_add)
    monkeypatch.setattr(Float64Model, "logits", counting_logits)
    monkeypatch.setattr(TorchTwin, "logits", counting_twin_logits)
    monkeypatch.setattr(diagnostics, "_write_text", counting_write_text)
    out = tmp_path / "models"
    result = run_main_job(out, **SMALL)
    assert result.passed
    assert compared == {pair: DOMAIN for pair in combinations(FOUR_NETWORKS, 2)}
    assert truth == {"contexts": DOMAIN}
    # the report's fold figure included: the truth is evaluated once, in this process
    assert bn_in_float64 == {"contexts": DOMAIN}
    assert written["diagnostics.json"] == 1
    # and the figure shows what the walk measured
    figure = json.loads((out / "report" / "diagnostics.json").read_text())["fold_comparison"]
    v = result.verification
    assert figure["max_abs_logit_diff"] == v.max_abs_logit_error
    assert figure["contexts"] == v.contexts_checked == DOMAIN
    assert figure["verdict"]["margin"] == v.margin and figure["verdict"]["passed"]
    assert (out / "report" / "fold_comparison.png").is_file()
    # the verdicts read from the one walk are the ones each command gives on its own
    monkeypatch.undo()
    alone = verify(out / "bn.pt", out / "folded.pt")
    mine = result.verification.to_dict()
    for key in ("contexts_checked", "max_abs_logit_error", "bound", "margin", "passed"):
        assert mine[key] == alone.to_dict()[key], key
    assert mine["reference"] == str(out / "bn.pt") and mine["candidate"] == str(out / "folded.pt")
    assert [k for k in result.export.verification] == [
        "bn.onnx (ORT) vs bn.pt (torch)",
        "folded.onnx (ORT) vs folded.pt (torch)",
        "folded.onnx (ORT) vs bn.pt (torch)",
    ]
    assert result.networks["contexts"] == DOMAIN and set(result.networks["files"]) == set(
        FOUR_NETWORKS
    )


def test_a_failure_in_export_leaves_the_old_set_byte_identical(shipped, tmp_path, monkeypatch):
    out = tmp_path / "models"
    shutil.copytree(shipped, out)
    before = snapshot(out)

    def broken_write(*args, **kwargs):
        raise BnfoldError("injected: the disk broke while writing the ONNX files")

    monkeypatch.setattr("bnfold.pipeline.train_fold.write_onnx", broken_write)
    with pytest.raises(BnfoldError, match="injected"):
        run_main_job(out, **{**SMALL, "seed": 7})
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["models"]  # no staging folder left


def test_a_failed_verification_changes_nothing_but_keeps_the_model_aside(shipped, tmp_path):
    out = tmp_path / "models"
    shutil.copytree(shipped, out)
    before = snapshot(out)
    result = run_main_job(out, tolerance=0.0, **SMALL)  # no float32 difference allowed
    assert not result.passed and result.export is None
    assert [r["stage"] for r in result.rows] == ["train", "fold", "verify"]
    assert result.rows[1]["output"] == "(not written)"
    assert result.rows[0]["output"] == str(out / UNVERIFIED_CHECKPOINT)
    after = snapshot(out)
    assert after.pop(UNVERIFIED_CHECKPOINT)[:2] == b"PK"  # a torch zip checkpoint
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["models"]


def test_a_new_set_replaces_the_old_one_and_other_files_stay(shipped, tmp_path):
    out = tmp_path / "models"
    shutil.copytree(shipped, out)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    assert run_main_job(out, **{**SMALL, "seed": 7}).passed
    after = snapshot(out)
    assert after.keys() == before.keys() and after["notes.txt"] == b"mine"
    for name in ("bn.pt", "folded.pt", "bn.onnx", "folded.onnx", "README.md"):
        assert after[name] != before[name], name


def test_a_staging_folder_of_a_dead_process_is_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid now names no process
    stale = tmp_path / f".models.staging-{dead.pid}-x1"
    (stale / "report").mkdir(parents=True)
    (stale / "bn.pt").write_text("half a run")
    stage = StagedOutputs(tmp_path / "models")
    assert not stale.exists() and stage.root.parent == tmp_path
    (stage.path(tmp_path / "models" / "report")).mkdir()
    (stage.root / "report" / "index.html").write_text("new")
    assert stage.commit() == [tmp_path / "models" / "report" / "index.html"]
    assert [p.name for p in tmp_path.iterdir()] == ["models"]


def test_a_report_folder_elsewhere_is_staged_beside_it(tmp_path):
    out, report = tmp_path / "models", tmp_path / "elsewhere" / "report"
    result = run_main_job(out, report_dir=report, **SMALL)
    assert result.passed and result.train["report"] == str(report / "index.html")
    # the summary names the report's page
    assert result.rows[-1]["stage"] == "report"
    assert result.rows[-1]["output"] == str(report / "index.html")
    assert str(report / "index.html") in result.format()
    assert (report / "index.html").is_file() and (report / "fold_comparison.png").is_file()
    assert not (out / "report").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "models"]
    assert [p.name for p in (tmp_path / "elsewhere").iterdir()] == ["report"]
