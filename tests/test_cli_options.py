"""Every option of every command has help text and a range; defaults are shown as they
apply wherever bnfold runs (./models, the packaged names.txt), never as install paths."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import bnfold
from bnfold.cli import main

COMMANDS = sorted(main.commands)
PACKAGE_DIR = str(Path(bnfold.__file__).resolve().parent.parent)


def options(name: str) -> list[click.Option]:
    return [
        p
        for p in main.commands[name].params
        if isinstance(p, click.Option) and not p.hidden and p.name != "help"
    ]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help_and_a_range(name):
    for opt in options(name):
        assert opt.help, f"{name} {opt.opts[0]} has no help text"
        if opt.is_flag or isinstance(opt.type, (click.Choice, click.Path)):
            continue
        if isinstance(opt.type, (click.types.IntParamType, click.types.FloatParamType)):
            assert isinstance(opt.type, (click.IntRange, click.FloatRange)), (
                f"{name} {opt.opts[0]} takes any number"
            )


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_no_install_paths(name):
    r = CliRunner().invoke(main, [name, "--help"])
    assert r.exit_code == 0
    assert PACKAGE_DIR not in r.output and "site-packages" not in r.output


def test_words_file_has_one_name_everywhere():
    for name in ("train", "train-fold", "fold", "verify", "sample", "serve"):
        names = {o for p in options(name) for o in p.opts}
        assert "--words" in names and "--data" not in names, name
    text = " ".join(CliRunner().invoke(main, ["train", "--help"]).output.split())
    assert "default: (the packaged names.txt)" in text and "default: (./models)" in text
