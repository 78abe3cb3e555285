"""Shared fixtures: a short-trained default-architecture checkpoint (built once per session),
its ONNX export, predictors and the novelty labeler."""

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


@pytest.fixture(scope="session")
def onnx_model(trained_checkpoint, tmp_path_factory) -> Path:
    """``folded.onnx`` exported from the session's short-trained checkpoint."""
    from bnfold.export import export_checkpoint

    out = tmp_path_factory.mktemp("onnx")
    return export_checkpoint(trained_checkpoint, out).paths["folded"]


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (batch-1 calls on a busy 2-core machine are ~10x slower
    with two), restored afterwards: other modules' float tolerances assume the default."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def bn(trained_checkpoint):
    """The trained BN checkpoint as a torch predictor."""
    from bnfold.infer import TorchPredictor

    return TorchPredictor(trained_checkpoint)


@pytest.fixture(scope="session")
def onnx_predictor(onnx_model):
    from bnfold.infer import load_predictor

    return load_predictor(onnx_model)


@pytest.fixture(scope="session")
def labeler(bn, names_path):
    from bnfold.sample import load_labeler

    return load_labeler(bn, names_path)
