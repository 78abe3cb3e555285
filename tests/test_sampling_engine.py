"""The table engine against the network engine, its memory cap, its model identity, new-only
jobs, and the streaming CLI."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnfold.cli import main
from bnfold.errors import BnfoldError
from bnfold.mlp.checkpoint import Checkpoint, load_checkpoint
from bnfold.mlp.data import Vocab
from bnfold.mlp.model import MLP, ModelConfig
from bnfold.runtime.infer import TorchPredictor
from bnfold.runtime.predictor import ModelSpec
from bnfold.sampling.sample import (
    SampleOptions,
    SamplerEngine,
    iter_names,
    make_engine,
    run_engine,
    sample_names,
)

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(predictor, options, labeler=None, **kw):
    got = sample_names(predictor, options, labeler, **kw)
    return [s.name for s in got], [s.logprob for s in got], [s.index for s in got]


option_sets = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**64 - 1),
        "temperature": st.sampled_from([1.0, 1.0, 0.0, 0.5, 1.6, 1e-30]),
        "top_k": st.sampled_from([None, None, 1, 4]),
        "top_p": st.sampled_from([None, None, 0.5, 0.95]),
        "prefix": st.sampled_from(["", "", "a", "mar", "zz"]),
        "min_length": st.integers(0, 5),
        "max_length": st.integers(5, 12),
    }
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(kw=option_sets, batch=st.sampled_from([1, 13, 4096]))
def test_table_and_network_engines_give_identical_names(onnx_predictor, kw, batch):
    o = SampleOptions(count=400, **kw)
    table = run(onnx_predictor, o, engine="table", batch_size=batch, chunk=150)
    network = run(onnx_predictor, o, engine="network")
    assert table == network  # names, log-probabilities (bit for bit) and indexes


def test_identical_on_torch_and_on_both_networks(bn, onnx_predictor, labeler):
    for o in (
        SampleOptions(count=2000, seed=5),
        SampleOptions(count=500, seed=9, temperature=0.7, top_p=0.9, prefix="ka"),
        SampleOptions(count=60, seed=2, new_only=True),
    ):
        for p in (bn, onnx_predictor):
            assert run(p, o, labeler, engine="table") == run(p, o, labeler, engine="network")


@pytest.mark.parametrize("cap", [40_000, 300_000, 3_000_000])
def test_the_memory_cap_is_respected_and_eviction_changes_nothing(onnx_predictor, cap):
    o = SampleOptions(count=3000, seed=21, min_length=3)
    e = make_engine(onnx_predictor, o, table_bytes=cap)
    job = e.submit(o)
    run_engine(onnx_predictor, e)
    assert e.table.nbytes <= cap and not e.table.exact
    assert e.table.stored > (e.table.key >= 0).sum()  # some rows replaced others
    names, lps, _ = run(onnx_predictor, o, engine="network")
    assert job.names == names and job.logprobs.tolist() == lps


def test_a_domain_that_fits_is_stored_whole_once(onnx_predictor):
    o = SampleOptions(count=5000, seed=1)
    e = make_engine(onnx_predictor, o)
    e.submit(o)
    run_engine(onnx_predictor, e)
    domain = onnx_predictor.vocab.size**onnx_predictor.block_size
    assert e.table.exact and e.table.nbytes <= 256 << 20
    assert domain <= e.forward_rows <= domain + 64  # every context once, plus masked starts
    e.submit(dataclasses.replace(o, seed=2))
    before = e.forward_rows
    run_engine(onnx_predictor, e)
    assert e.forward_rows == before  # a warm table needs no forward pass at all


def test_a_tiny_cap_is_refused():
    spec = ModelSpec(Vocab(tuple("abc")), 12, "0" * 64)
    e = SamplerEngine(spec, SampleOptions(), table_bytes=1000)
    e.submit(SampleOptions(count=1))
    e.admit()
    with pytest.raises(BnfoldError, match="holds fewer than 64 rows"):
        e.needs()


def _perturbed(path: Path) -> TorchPredictor:
    ckpt = load_checkpoint(path)
    with torch.no_grad():
        next(ckpt.model.parameters())[0, 0] += 1.0
    return TorchPredictor(Checkpoint(ckpt.model, ckpt.vocab, ckpt.metrics, ckpt.meta))


def test_a_different_model_never_reuses_a_table(bn, trained_checkpoint):
    other = _perturbed(trained_checkpoint)
    assert other.sha256 != bn.sha256 and other.sha256 == _perturbed(trained_checkpoint).sha256
    o = SampleOptions(count=300, seed=4)
    e = make_engine(bn, o)
    e.submit(o)
    run_engine(bn, e)
    e.submit(o)
    with pytest.raises(BnfoldError, match="table belongs to another model"):
        run_engine(other, e)
    mine = run(other, o, engine="table")
    assert mine == run(other, o, engine="network")
    assert mine[0] != run(bn, o)[0]


def test_new_only_jobs_share_an_engine_with_plain_jobs(bn, labeler):
    group = SampleOptions(count=50, temperature=0.9)
    e = make_engine(bn, group, labeler, batch_size=64)
    new_job = e.submit(dataclasses.replace(group, seed=3, new_only=True))
    plain = e.submit(dataclasses.replace(group, seed=3, count=400))
    run_engine(bn, e)
    assert new_job.done and plain.done and new_job.error is None
    first_new = [
        (i, n) for i, n in zip(plain.indexes, plain.names, strict=True) if labeler(n) == "new"
    ][:50]
    assert list(zip(new_job.indexes, new_job.names, strict=True)) == first_new
    assert len(first_new) == 50 and e.done and e.jobs == 0


def test_release_frees_the_table_and_the_engine_still_works(onnx_predictor):
    o = SampleOptions(count=500, seed=8)
    e = make_engine(onnx_predictor, o)
    first = e.submit(o)
    run_engine(onnx_predictor, e)
    assert e.nbytes > 1 << 20
    e.release()
    assert e.nbytes < 1 << 10 and e.table is None
    again = e.submit(o)
    e.admit()
    with pytest.raises(BnfoldError, match="cannot release"):
        e.release()
    run_engine(onnx_predictor, e)
    assert again.names == first.names


@pytest.mark.parametrize(("chars", "block"), [(90, 3), (27, 6)])
def test_big_domains_work_in_a_bounded_table(chars, block):
    """vocab 90 at block size 3 (729k contexts) and 27**6 (387M): lazy rows, bounded."""
    vocab = Vocab(tuple(chr(0x100 + i) for i in range(chars - 1)))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab.size, block_size=block, n_embd=4, n_hidden=16, n_layers=1)
    p = TorchPredictor(Checkpoint(MLP(cfg).eval(), vocab))
    o = SampleOptions(count=300, seed=1, max_length=8)
    cap = 4 << 20
    e = make_engine(p, o, table_bytes=cap)
    job = e.submit(o)
    run_engine(p, e)
    assert e.table.nbytes <= cap and not e.table.exact
    names, lps, _ = run(p, o, engine="network")
    assert job.names == names and job.logprobs.tolist() == lps


def test_streaming_yields_in_order_with_bounded_jobs(onnx_predictor):
    o = SampleOptions(count=1000, seed=6)
    it = iter_names(onnx_predictor, o, chunk=100)
    first = next(it)
    assert first.index == 0
    rest = list(it)
    assert [s.index for s in rest] == list(range(1, 1000))
    assert [first.name] + [s.name for s in rest] == run(onnx_predictor, o)[0]


# -------------------------------------------------------------------------------- CLI


def test_cli_engines_agree_and_json_is_one_streamed_document(onnx_model):
    r = CliRunner()
    base = ["sample", str(onnx_model), "-n", "300", "--seed", "5", "--top-k", "8"]
    table = r.invoke(main, base)
    network = r.invoke(main, [*base, "--engine", "network", "--batch-size", "7"])
    assert table.exit_code == 0 and network.exit_code == 0, table.output + network.output
    assert table.output == network.output and len(table.output.splitlines()) == 300
    js = r.invoke(main, [*base, "--json"])
    doc = json.loads(js.output)
    assert [d["name"] for d in doc["names"]] == table.output.splitlines()
    assert sum(doc["label_counts"].values()) == 300 and doc["engine"] == "table"
    assert doc["options"]["top_k"] == 8 and doc["words"]["verified"]
    small = r.invoke(main, [*base, "--table-mb", "1"])
    assert small.output == table.output
    bad = r.invoke(main, [*base, "--engine", "cache"])
    assert bad.exit_code == 2


def test_cli_full_disk_is_one_error_line(onnx_model):
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "bnfold", "sample", str(onnx_model), "-n", "5"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            timeout=120,
        )
    assert done.returncode == 2
    assert (
        done.stderr.startswith("error: cannot write the names") and "Traceback" not in done.stderr
    )
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_cli_closed_pipe_stops_quietly(onnx_model):
    cmd = [sys.executable, "-m", "bnfold", "sample", str(onnx_model), "-n", "200000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader goes away, as `| head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and first.strip()
    assert err == "", err


def test_new_only_streams_in_chunks_with_the_same_names(bn, labeler):
    o = SampleOptions(count=45, seed=12, new_only=True)
    whole = run(bn, o, labeler)
    assert run(bn, o, labeler, chunk=7) == whole and len(whole[0]) == 45
    assert all(labeler(n) == "new" for n in whole[0])
