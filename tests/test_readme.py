"""Every ```python block of README.md runs, as written, in an empty folder; and
examples/lecture.py walks the lecture's steps to the end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks() -> list[str]:
    return BLOCK.findall(README.read_text(encoding="utf-8"))


def test_readme_has_the_two_python_blocks():
    text = README.read_text(encoding="utf-8")
    assert "\n## Python\n" in text
    blocks = python_blocks()
    assert len(blocks) >= 2
    assert "bnfold.train(" in blocks[0] and "bnfold.sample(" in blocks[0]
    assert "resnet18" in blocks[1] and "bnfold.export(" in blocks[1]


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index, tmp_path, monkeypatch, capsys):
    from onnx_zoo import torchvision

    torchvision()  # torchvision 0.28's import needs its ops' schemas here (see onnx_zoo)
    monkeypatch.chdir(tmp_path)
    code = python_blocks()[index]
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    assert "verification PASSED" in printed
    assert "FAILED" not in printed


def test_examples_lecture_walks_every_step(tmp_path):
    script = ROOT / "examples" / "lecture.py"
    r = subprocess.run(
        [sys.executable, str(script), "--out", "walk", "--steps", "200"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    headings = [line for line in r.stdout.splitlines() if line.startswith("== ")]
    assert [h.split(".")[0] for h in headings] == [f"== {i}" for i in range(1, 8)]
    assert "verification PASSED" in r.stdout
    for name in ("bn.pt", "folded.pt", "bn.onnx", "folded.onnx"):
        assert (tmp_path / "walk" / name).is_file()
    labels = [line.split()[1] for line in r.stdout.split("== 7.")[1].splitlines()[1:] if line]
    assert len(labels) == 10 and set(labels) <= {"train", "dev", "test", "new"}
