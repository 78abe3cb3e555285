"""Shared fixtures: a short-trained default-architecture checkpoint, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NAMES = REPO / "data" / "names.txt"


@pytest.fixture(scope="session")
def names_path() -> Path:
    return NAMES


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """``bn.pt`` of the default architecture after a short `fast` run (a few seconds).

    Read-only for tests: copy it before modifying.
    """
    from bnfold.pipeline import train_to_checkpoint

    out = tmp_path_factory.mktemp("trained")
    path, _ = train_to_checkpoint(
        NAMES, out, preset="fast", steps=400, batch_size=512, progress=False
    )
    return path
