"""Verification: exhaustive domain coverage, the error figures, verdicts, sampling, float64."""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest
import torch

from bnfold.errors import BnfoldError
from bnfold.mlp.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from bnfold.mlp.model import MLP, ModelConfig
from bnfold.pipeline.assemble import fold_checkpoint
from bnfold.runtime.infer import TorchPredictor, load_predictor
from bnfold.verify.domain import all_contexts
from bnfold.verify.verdict import verify


@pytest.fixture(scope="module")
def pair(trained_checkpoint, tmp_path_factory):
    """(bn.pt, folded.pt) in a private directory."""
    d = tmp_path_factory.mktemp("verify")
    bn = shutil.copy(trained_checkpoint, d / "bn.pt")
    path, _, report = fold_checkpoint(bn)
    assert path is not None and report.passed
    return d / "bn.pt", path


def test_all_contexts_is_the_whole_domain_in_order():
    got = all_contexts(4, 3)
    assert got.shape == (64, 3) and got.dtype == np.int64
    assert got.tolist() == [list(t) for t in itertools.product(range(4), repeat=3)]
    assert all_contexts(4, 3, 10, 20).tolist() == got[10:20].tolist()


def test_folded_model_verified_over_every_context(pair):
    bn, folded = pair
    r = verify(bn, folded)
    assert r.exhaustive and r.contexts_checked == r.domain_size == 27**3
    assert r.passed and r.criterion == "float64" and 0 < r.margin <= 1
    assert r.near_ties == r.flips == 0
    assert r.argmax_disagreements == 0 and r.argmax_agreement == 1.0
    assert r.float64_reference == str(bn)
    assert r.reference_vs_float64 > 0 and r.candidate_vs_float64 > 0
    # independent recomputation of the headline figures over the same domain
    ctx = np.array(list(itertools.product(range(27), repeat=3)), dtype=np.int64)
    a = load_predictor(bn).logits(ctx).astype(np.float64)
    b = load_predictor(folded).logits(ctx).astype(np.float64)
    assert r.max_abs_logit_error == pytest.approx(np.abs(a - b).max(), rel=1e-12)
    assert r.mean_abs_logit_error == pytest.approx(np.abs(a - b).mean(), rel=1e-6)
    srt = np.sort(a, axis=1)
    assert r.min_top2_gap == pytest.approx((srt[:, -1] - srt[:, -2]).min(), rel=1e-6)
    d = r.to_dict()
    for key in (
        "contexts_checked",
        "exhaustive",
        "max_abs_logit_error",
        "argmax_agreement",
        "passed",
        "criterion",
        "bound",
        "margin",
    ):
        assert key in d
    assert "exhaustive" in r.format() and "PASSED" in r.format()


def test_corrupted_candidate_fails(pair, tmp_path):
    bn, folded = pair
    ckpt = load_checkpoint(folded)
    with torch.no_grad():
        ckpt.model.net[0].weight[3, 7] += 1e-2
    bad = save_checkpoint(ckpt, tmp_path / "bad.pt")
    r = verify(bn, bad)
    assert not r.passed and r.max_abs_logit_error > 1e-5
    assert r.candidate_vs_float64 > r.reference_vs_float64
    assert "FAILED" in r.format()
    # an explicit tolerance overrides the rounding criterion: a loose one accepts it
    loose = verify(bn, bad, tolerance=1.0)
    assert loose.passed and loose.criterion == "absolute" and loose.bound == 1.0


def test_nonfinite_output_fails_and_serialises(pair, tmp_path):
    bn, folded = pair
    ckpt = load_checkpoint(folded)
    with torch.no_grad():
        ckpt.model.net[-1].bias[0] = float("nan")
    r = verify(TorchPredictor(load_checkpoint(bn)), TorchPredictor(ckpt))
    assert not r.passed and r.nonfinite == r.domain_size
    assert r.to_dict()["max_abs_logit_error"] is None  # JSON-safe


def test_sampled_when_domain_exceeds_limit(pair):
    bn, folded = pair
    extra = np.array([[0, 0, 0], [1, 2, 3]])
    r = verify(bn, folded, max_exhaustive=1000, sample_size=5000, seed=1, extra_contexts=extra)
    assert not r.exhaustive and r.contexts_checked == 5002
    assert "sampled" in r.coverage and "seed 1" in r.coverage and "2 dev/test" in r.coverage
    again = verify(bn, folded, max_exhaustive=1000, sample_size=5000, seed=1, extra_contexts=extra)
    assert again.max_abs_logit_error == r.max_abs_logit_error  # seeded: reproducible


def test_float64_reference_found_from_folded_metadata(pair, tmp_path):
    bn, folded = pair
    r = verify(folded, folded)
    assert r.passed and r.max_abs_logit_error == 0
    assert r.float64_reference == str(bn.resolve())  # recorded as folded_from
    moved = shutil.copy(folded, tmp_path / "f.pt")
    assert verify(moved, moved, float64_reference=bn).float64_reference == str(bn)
    with pytest.raises(BnfoldError, match="already folded"):
        verify(moved, moved, float64_reference=folded)


def test_different_model_families_are_refused(pair, tmp_path):
    bn, _ = pair
    ckpt = load_checkpoint(bn)
    other = Checkpoint(MLP(ModelConfig(vocab_size=27, block_size=2)), ckpt.vocab)
    path = save_checkpoint(other, tmp_path / "other.pt")
    with pytest.raises(BnfoldError, match="not comparable"):
        verify(bn, path)


def test_fold_and_verify_in_memory(pair):
    """Fold and verify without files (speed is measured in benchmarks, not asserted)."""
    from bnfold.fold.modules import fold_batchnorm

    bn, _ = pair
    ckpt = load_checkpoint(bn)
    folded, _ = fold_batchnorm(ckpt.model)
    cand = Checkpoint(folded, ckpt.vocab)
    r = verify(TorchPredictor(ckpt), TorchPredictor(cand))
    assert r.passed and r.criterion == "float64"
