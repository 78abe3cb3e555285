"""The batched sampler: reproducibility, every option, every bad option, labels, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import bnfold.sampling.engine as engine_mod
import bnfold.sampling.sample as sample_mod
from bnfold.errors import BnfoldError
from bnfold.fold.modules import fold_batchnorm
from bnfold.mlp.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from bnfold.mlp.data import END, Vocab, read_words, split_words
from bnfold.mlp.model import MLP, ModelConfig
from bnfold.runtime.infer import TorchPredictor
from bnfold.sampling.sample import (
    Labeler,
    SampleOptions,
    SamplerEngine,
    forward,
    load_labeler,
    sample_names,
    uniforms,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def opts(**kw) -> SampleOptions:
    return SampleOptions(**{"count": 200, "seed": 5, **kw})


def model_logprob(p: TorchPredictor, name: str, end: bool = True) -> float:
    """Independent reference: sum of log_softmax over the name (+ end token), in float64."""
    ids = p.vocab.encode(name) + ([END] if end else [])
    ctx = [END] * p.block_size
    total = 0.0
    for ix in ids:
        z = torch.from_numpy(p.logits(np.asarray([ctx]))[0]).double()
        total += float(torch.log_softmax(z, 0)[ix])
        ctx = [*ctx[1:], ix]
    return total


# ------------------------------------------------------------------------ random streams


def test_uniforms_are_a_pure_function_of_seed_name_and_draw():
    key = sample_mod.stream_key(7)
    names = np.arange(50_000) // 10
    draws = np.arange(50_000) % 10
    u = uniforms(key, names, draws)
    assert u.dtype == np.float32 and u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    # any subset, in any order, gives the same values
    pick = np.random.default_rng(0).permutation(50_000)[:777]
    assert np.array_equal(uniforms(key, names[pick], draws[pick]), u[pick])
    # different seeds and different names give unrelated streams
    assert np.mean(uniforms(sample_mod.stream_key(8), names, draws) == u) < 0.001
    assert np.mean(u[:-10] == u[10:]) < 0.001
    # one key per row (rows of different seeds drawn together) = each seed's own stream
    seeds = np.arange(50_000) % 3
    keys = np.array([sample_mod.stream_key(int(s)) for s in seeds], dtype=np.uint64)
    mixed = uniforms(keys, names, draws)
    for s in range(3):
        rows = seeds == s
        assert np.array_equal(mixed[rows], uniforms(sample_mod.stream_key(s), names, draws)[rows])


# ---------------------------------------------------------------------- reproducibility


def test_same_names_whatever_the_batch_size(bn):
    o = opts(count=300)
    ref = sample_names(bn, o, batch_size=4096)
    assert len(ref) == 300 and [s.index for s in ref] == list(range(300))
    assert len({s.name for s in ref}) > 100  # really random
    for b in (1, 7, 64):
        got = sample_names(bn, o, batch_size=b)
        assert [s.name for s in got] == [s.name for s in ref]
        np.testing.assert_allclose([s.logprob for s in got], [s.logprob for s in ref], atol=1e-4)
    assert [s.name for s in sample_names(bn, dataclasses.replace(o, seed=6))] != [
        s.name for s in ref
    ]


def _step_together(predictor, engines, limit=None, on_step=None):
    """Drive several engines to completion, one forward pass per step for all of them (as
    the service does); ``on_step(step)`` may submit more work between steps."""
    step = 0
    while True:
        if on_step is not None:
            on_step(step)
        for e in engines:
            e.admit(limit)
        live = [e for e in engines if e.active]
        if not live:
            if all(e.done for e in engines):
                return step
            continue
        needs = [e.needs() for e in live]
        z = forward(predictor, np.concatenate(needs))
        cuts = np.cumsum([len(x) for x in needs])[:-1]
        parts = np.split(z, cuts) if z is not None else [None] * len(live)
        for e, part in zip(live, parts, strict=True):
            e.step(part)
        step += 1


def test_same_names_whatever_the_grouping_and_merged_engines(bn):
    """Names 100..299 alone, or merged step by step with another group's engine, are
    unchanged."""
    o = opts(count=300, temperature=0.8, top_k=10)
    ref = [s.name for s in sample_names(bn, o)]
    other = opts(count=50, seed=99, prefix="k")
    a = SamplerEngine(bn.spec, o, batch_size=32)
    b = SamplerEngine(bn.spec, other, batch_size=16, kind="network")
    ja = a.submit(o, start=100, stop=300)
    jb = b.submit(other)
    _step_together(bn, [a, b])
    assert ja.done and jb.done
    assert ja.names == ref[100:]
    alone = sample_names(bn, other)
    assert jb.names == [s.name for s in alone]
    np.testing.assert_allclose(jb.logprobs, [s.logprob for s in alone], atol=1e-4)


def test_requests_share_rows_of_one_engine_and_get_their_own_names(bn):
    """Jobs of different seeds, prefixes, counts and name ranges, arriving at different
    steps, share the rows (and each advance) of one engine; each gets exactly the names and
    log-probabilities it gets alone, and never more than ``job_rows`` rows at once."""
    group = opts(temperature=1.3, top_p=0.95, min_length=2, max_length=9)
    engine = SamplerEngine(bn.spec, group, batch_size=24, job_rows=10)
    arrivals = {  # step -> requests (options, name range) submitted before it
        0: [(dataclasses.replace(group, count=1, seed=s), None) for s in range(5)],
        2: [(dataclasses.replace(group, count=40, seed=7, prefix="ma"), None)],
        3: [(dataclasses.replace(group, count=30, seed=7), (100, 130))],
        9: [(dataclasses.replace(group, count=3, seed=2**64 - 1, prefix="zo"), None)],
    }
    jobs = []
    shared_steps = [0]

    def on_step(step):
        for o, rng in arrivals.get(step, []):
            start, stop = rng if rng else (0, o.count)
            jobs.append((o, engine.submit(o, start=start, stop=stop)))
        running = [j for _, j in jobs if j.inflight]
        assert all(j.inflight <= 10 for j in running)
        shared_steps[0] += len(running) > 1

    _step_together(bn, [engine], on_step=on_step)
    assert shared_steps[0] > 5, "the jobs never shared a step"
    assert engine.done and engine.jobs == 0 and engine.running == 0
    for o, job in jobs:
        assert job.done and None not in job.names
        alone = sample_names(bn, dataclasses.replace(o, count=job.stop))[job.start :]
        assert job.names == [s.name for s in alone], o
        np.testing.assert_allclose(job.logprobs, [s.logprob for s in alone], atol=1e-4)


def test_cancelled_jobs_leave_and_the_others_are_unchanged(bn):
    group = opts(count=60)
    engine = SamplerEngine(bn.spec, group, batch_size=32, job_rows=16)
    keep = engine.submit(dataclasses.replace(group, seed=1))
    drop = engine.submit(dataclasses.replace(group, seed=2))
    queued = engine.submit(dataclasses.replace(group, seed=3))
    engine.admit()
    assert drop.inflight > 0 and queued.inflight == 0 and engine.active == 32

    def on_step(step):
        if step == 2:
            engine.cancel(drop)
            engine.cancel(queued)
            assert not (set(engine.rows.job[: engine.n].tolist()) & {-1, drop.slot})
            engine.cancel(drop)  # twice: a no-op

    _step_together(bn, [engine], on_step=on_step)
    assert not drop.done and not queued.done and None in drop.names
    assert keep.names == [s.name for s in sample_names(bn, dataclasses.replace(group, seed=1))]
    assert engine.done and engine.jobs == 0 and engine.queued == 0


def test_engine_groups_and_ranges_are_checked(bn):
    engine = SamplerEngine(bn.spec, opts())
    with pytest.raises(BnfoldError, match="belong to another engine"):
        engine.submit(opts(temperature=0.5))
    with pytest.raises(BnfoldError, match="bad name range"):
        engine.submit(opts(), start=5, stop=4)
    with pytest.raises(BnfoldError, match="prefix"):
        engine.submit(opts(prefix="Q"))
    assert engine.submit(opts(), start=3, stop=3).done  # an empty range: nothing to do
    assert engine.done
    # seed, count and prefix may differ within a group; the engine takes them all
    for o in (opts(seed=1), opts(count=3), opts(prefix="ab")):
        engine.submit(o)
    assert engine.jobs == 3


def test_tiny_temperature_is_greedy_not_nan(bn):
    """0 < T so small that z / T overflows (and float32(T) is 0): the most likely allowed
    token wins, as at T = 0; no NaN probabilities (which used to give empty names)."""
    greedy = sample_names(bn, opts(count=6, temperature=0))
    for t in (1e-300, 5e-324, 1e-40, 1e-8):
        for extra in ({}, {"top_k": 3}, {"top_p": 0.5}):
            with np.errstate(over="raise", divide="raise", invalid="raise"):  # none left unhandled
                got = sample_names(bn, opts(count=6, temperature=t, **extra))
            assert [s.name for s in got] == [s.name for s in greedy], (t, extra)
            assert all(s.name and math.isfinite(s.logprob) for s in got)
    # min-length 3 masks the end token where it is the most likely: still no NaN
    got = sample_names(bn, opts(count=4, temperature=1e-300, min_length=3))
    ref = sample_names(bn, opts(count=4, temperature=0, min_length=3))
    assert [s.name for s in got] == [s.name for s in ref] and all(len(s.name) >= 3 for s in got)


def test_bn_and_folded_models_agree(bn, trained_checkpoint, tmp_path):
    ckpt = load_checkpoint(trained_checkpoint)
    folded_model, _ = fold_batchnorm(ckpt.model)
    path = save_checkpoint(
        Checkpoint(folded_model, ckpt.vocab, ckpt.metrics, ckpt.meta), tmp_path / "folded.pt"
    )
    folded = TorchPredictor(path)
    assert folded.folded and not bn.folded
    o = opts(count=3000, seed=11)
    a, b = sample_names(bn, o), sample_names(folded, o)
    same = sum(x.name == y.name for x, y in zip(a, b, strict=True))
    assert same / len(a) >= 0.999, f"only {same} of {len(a)} names agree"


# ------------------------------------------------------------------------------ options


def test_logprob_is_the_models_probability_of_the_whole_name(bn):
    for o in (opts(count=5), opts(count=5, temperature=1.7, top_k=5), opts(count=5, prefix="ma")):
        for s in sample_names(bn, o):
            assert s.logprob == pytest.approx(model_logprob(bn, s.name), abs=1e-4)
    # a name cut at max-length still gets its end-token term
    cut = sample_names(bn, opts(count=5, min_length=3, max_length=3))
    assert all(len(s.name) == 3 for s in cut)
    assert cut[0].logprob == pytest.approx(model_logprob(bn, cut[0].name), abs=1e-4)


def test_greedy_is_the_argmax_path(bn):
    name = ""
    while len(name) < 50:
        ix = int(np.argmax(bn.next_char_probs(name)))
        if ix == END:
            break
        name += bn.vocab.chars[ix - 1]
    greedy = sample_names(bn, opts(count=4, temperature=0, min_length=0))
    assert [s.name for s in greedy] == [name] * 4
    for other in (opts(count=4, top_k=1, min_length=0), opts(count=4, top_p=1e-6, min_length=0)):
        assert [s.name for s in sample_names(bn, other)] == [name] * 4


def test_first_character_follows_the_model_and_the_temperature(bn):
    """Single-character names: their frequencies must match softmax(z / T) without END."""
    z = bn.logits(np.zeros((1, bn.block_size), dtype=np.int64))[0].astype(np.float64)
    n = 20_000
    for t in (1.0, 0.6):
        names = sample_names(bn, opts(count=n, temperature=t, max_length=1))
        counts = np.bincount([bn.vocab.stoi(s.name) for s in names], minlength=bn.vocab.size)
        p = np.exp((z - z.max()) / t)
        p[END] = 0
        expected = n * p / p.sum()
        keep = expected > 5
        chi2 = (((counts - expected) ** 2)[keep] / expected[keep]).sum()
        assert counts[END] == 0 and counts[~keep].sum() < 30
        assert chi2 < keep.sum() + 6 * math.sqrt(2 * keep.sum()), chi2


def test_top_k_and_top_p_restrict_the_choices(bn):
    z = bn.logits(np.zeros((1, bn.block_size), dtype=np.int64))[0]
    order = np.argsort(-z)
    top3 = {bn.vocab.chars[i - 1] for i in order[:3] if i != END}
    names = sample_names(bn, opts(count=500, top_k=3, max_length=1))
    assert {s.name for s in names} <= top3 and len({s.name for s in names}) > 1
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    mass = np.cumsum(p[order])
    nucleus = {bn.vocab.chars[i - 1] for i in order[: int(np.searchsorted(mass, 0.5)) + 1]}
    names = sample_names(bn, opts(count=500, top_p=0.5, max_length=1))
    assert {s.name for s in names} <= nucleus


def test_prefix_and_lengths_are_honoured(bn):
    for s in sample_names(bn, opts(count=100, prefix="ka")):
        assert s.name.startswith("ka") and len(s.name) >= 2
    names = sample_names(bn, opts(count=300, min_length=6, max_length=8))
    assert all(6 <= len(s.name) <= 8 for s in names)
    assert {len(s.name) for s in names} == {6, 7, 8}
    assert [s.name for s in sample_names(bn, opts(count=3, prefix="abc", max_length=3))] == [
        "abc"
    ] * 3
    # min-length 0 allows the (rare) empty name, 1 never gives one
    assert all(s.name for s in sample_names(bn, opts(count=500)))


def test_labels_follow_the_training_split(labeler, names_path):
    train, dev, test = split_words(read_words(names_path))
    assert labeler.verified
    assert labeler(train[0]) == "train" and labeler(dev[0]) == "dev"
    assert labeler(test[0]) == "test" and labeler("zzqxj") == "new"


def test_labels_refuse_another_words_file(bn, tmp_path, names_path):
    other = tmp_path / "other.txt"
    other.write_text("anna\nbob\n")
    with pytest.raises(BnfoldError, match="not the words file this model was trained on"):
        load_labeler(bn, other)
    copy = tmp_path / "copy.txt"
    shutil.copy(names_path, copy)
    assert load_labeler(bn, copy).verified  # same content, another path: fine
    assert not Labeler(other).verified  # nothing to check against


def test_new_only(bn, labeler):
    o = opts(count=40, new_only=True)
    got = sample_names(bn, o, labeler)
    assert len(got) == 40 and all(s.label == "new" for s in got)
    plain = sample_names(bn, opts(count=got[-1].index + 1), labeler)
    first_new = [s for s in plain if s.label == "new"][:40]  # the first 40 new draws
    assert [(s.name, s.index) for s in got] == [(s.name, s.index) for s in first_new]
    assert {s.label for s in plain} > {"new"}
    with pytest.raises(BnfoldError, match="needs the training words file"):
        sample_names(bn, o)


def test_new_only_gives_up_with_an_explanation(bn, labeler, monkeypatch):
    class AllTrain(Labeler):
        def __init__(self):
            self.verified = True

        def __call__(self, name):
            return "train"

    monkeypatch.setattr(engine_mod, "NEW_ONLY_DRAWS", (2, 30))
    with pytest.raises(BnfoldError, match=r"only 0 of 50 sampled names were new"):
        sample_names(bn, opts(count=10, new_only=True), AllTrain())
    with pytest.raises(BnfoldError, match=r"only 0 of 10 sampled"):  # greedy: no retries
        sample_names(bn, opts(count=10, new_only=True, temperature=0), AllTrain())


def test_any_vocabulary_including_dot_and_nul(tmp_path):
    chars = (".", "\x00", "é", "中", "a")
    for vocab_chars in (chars[2:], chars):  # the fast str decoding, then the NUL fallback
        vocab = Vocab(tuple(sorted(vocab_chars)))
        torch.manual_seed(0)
        model = MLP(ModelConfig(vocab_size=vocab.size, n_hidden=8, n_layers=1)).eval()
        path = save_checkpoint(Checkpoint(model, vocab), tmp_path / "m.pt")
        p = TorchPredictor(path)
        names = sample_names(p, opts(count=100, max_length=6, prefix=vocab.chars[0]))
        assert all(set(s.name) <= set(vocab.chars) for s in names)
        assert any(len(s.name) > 1 for s in names)
        s = names[0]
        assert s.logprob == pytest.approx(model_logprob(p, s.name, end=len(s.name) < 6), abs=1e-4)


# -------------------------------------------------------------------------- bad options

BAD = [
    (dict(count=0), "count must be between 1 and"),
    (dict(count=10_000_001), "count must be between 1 and"),
    (dict(count=2.5), "count must be"),
    (dict(seed=-1), "seed must be"),
    (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be"),
    (dict(top_k=0), "top-k must be an integer >= 1"),
    (dict(top_p=0.0), r"top-p must lie in \(0, 1\]"),
    (dict(top_p=1.5), r"top-p must lie in \(0, 1\]"),
    (dict(prefix="aZ!"), r"outside the model's vocabulary: '!', 'Z'"),
    (dict(prefix="abcd", max_length=3), "prefix has 4 characters, more than max-length 3"),
    (dict(min_length=5, max_length=4), "min-length 5 is greater than max-length 4"),
    (dict(min_length=-1), "min-length must be"),
    (dict(max_length=0), "max-length must be between 1 and"),
    (dict(max_length=1001), "max-length must be between 1 and"),
]


@pytest.mark.parametrize(("bad", "message"), BAD, ids=[str(b) for b, _ in BAD])
def test_bad_options_are_clear_errors(bn, bad, message):
    with pytest.raises(BnfoldError, match=message):
        sample_names(bn, opts(**bad))


def test_bad_batch_size_and_logits(bn):
    with pytest.raises(BnfoldError, match="batch size must be a positive integer"):
        sample_names(bn, opts(), batch_size=0)
    with pytest.raises(BnfoldError, match="job rows must be a positive integer"):
        SamplerEngine(bn.spec, opts(), job_rows=0)
    with pytest.raises(BnfoldError, match="engine must be one of"):
        SamplerEngine(bn.spec, opts(), kind="cache")
    for kind in ("network", "table"):
        e = SamplerEngine(bn.spec, opts(count=4), kind=kind)
        e.submit(opts(count=4))
        assert e.admit() == 4
        assert len(e.needs()) >= 1
        with pytest.raises(BnfoldError, match="expected logits of shape"):
            e.step(np.zeros((3, bn.vocab.size), dtype=np.float32))


def test_extreme_logits_are_sampled_safely(bn):
    """Rows whose exp would overflow (or vanish) take the shifted path, row by row."""
    o = opts(count=3, min_length=2)
    e = SamplerEngine(bn.spec, o, kind="network")
    e.submit(o)
    e.admit()
    assert len(e.needs()) == 3
    z = np.zeros((3, bn.vocab.size), dtype=np.float32)
    z[0, 5] = 500.0  # exp overflows: token 5 is certain
    z[1] = -500.0
    z[1, END] = 100.0  # END masked (min-length 2); the rest vanish: uniform among them
    e.step(z.copy())
    toks, lp = e.rows.toks, e.rows.lp
    assert toks[0, 0] == 5 and toks[1, 0] != END
    assert lp[0] == pytest.approx(0.0, abs=1e-6)
    assert lp[1] == pytest.approx(-600.0, abs=1e-3)  # the model's P, not the masked one
    assert lp[2] == pytest.approx(-math.log(bn.vocab.size), abs=1e-5)


# -------------------------------------------------------------------------------- CLI


def test_cli_sample(trained_checkpoint):
    from bnfold.cli import main

    r = CliRunner()
    out = r.invoke(main, ["sample", str(trained_checkpoint), "-n", "7", "--seed", "3"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert len(lines) == 7
    same = r.invoke(
        main, ["sample", str(trained_checkpoint), "-n", "7", "--seed", "3", "--batch-size", "2"]
    )
    assert same.output.splitlines() == lines
    js = r.invoke(main, ["sample", str(trained_checkpoint), "-n", "7", "--seed", "3", "--json"])
    assert js.exit_code == 0, js.output
    data = json.loads(js.output)
    assert [d["name"] for d in data["names"]] == lines
    assert data["seed"] == 3 and len(data["model_sha256"]) == 64 and data["words"]["verified"]
    assert {d["label"] for d in data["names"]} <= {"train", "dev", "test", "new"}
    v = r.invoke(main, ["sample", str(trained_checkpoint), "-n", "3", "-v", "--new-only"])
    assert v.exit_code == 0, v.output
    assert all(line.split()[1] == "new" for line in v.output.splitlines())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "-1"], "'--temperature': -1.0 is not in the range x>=0"),
        (["--top-p", "0"], "'--top-p': 0.0 is not in the range 0<x<=1"),
        (["-n", "0"], "'--count': 0 is not in the range 1<=x<=10000000"),
        (["--prefix", "Q"], "outside the model's vocabulary"),
    ],
)
def test_cli_bad_options(trained_checkpoint, args, message):
    from bnfold.cli import main

    out = CliRunner().invoke(main, ["sample", str(trained_checkpoint), *args])
    assert out.exit_code == 2 and "error:" in out.output and message in out.output
    assert "Traceback" not in out.output


def test_cli_missing_default_model(monkeypatch, tmp_path):
    from bnfold import cli

    monkeypatch.setattr(cli, "DEFAULT_MODELS", tmp_path)
    out = CliRunner().invoke(cli.main, ["sample"])
    assert out.exit_code == 2 and "shipped model" in out.output and "folded.onnx" in out.output
