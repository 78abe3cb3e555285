"""The batching loop (admit / step / deliver) driven one phase at a time on a fake
predictor: admission within the row budget, one forward pass per step for every group,
cancel, deadline, the one failure path, new-only jobs, and the engines' memory bound."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bnfold.errors import BnfoldError
from bnfold.mlp.data import Vocab
from bnfold.runtime.predictor import Predictor
from bnfold.sampling.sample import SampleOptions, sample_names
from bnfold.serve.batcher import Batcher, DeadlineExceeded, Request
from bnfold.serve.metrics import Metrics
from bnfold.serve.service import NameService
from bnfold.serve.settings import ServeSettings


class FakePredictor(Predictor):
    """Logits from a fixed random table indexed by the context (a 5-letter, block-2 model),
    counting its calls; ``fail`` makes the next call raise, ``gate`` can hold calls."""

    def __init__(self):
        self.path = Path("fake.onnx")
        self.backend = "fake"
        self.folded = True
        self.vocab = Vocab(tuple("abcde"))
        self.block_size = 2
        self.sha256 = "f" * 64
        self.metadata = {}
        rng = np.random.default_rng(0)
        self._table = rng.normal(size=(self.vocab.size**2, self.vocab.size)).astype(np.float32)
        self._table[:, 0] -= 1.0  # names a few letters long
        self.calls: list[int] = []
        self.fail: Exception | None = None
        self.gate = threading.Event()
        self.gate.set()

    def logits(self, contexts: np.ndarray) -> np.ndarray:
        self.gate.wait(30)
        self.calls.append(len(contexts))
        if self.fail is not None:
            raise self.fail
        x = np.asarray(contexts)
        return self._table[x[:, 0] * self.vocab.size + x[:, 1]]


def new_if_no_a(name: str) -> str:
    """A labeler: names with an "a" are training names, the others new."""
    return "train" if "a" in name else "new"


def make_batcher(engine="network", **limits):
    predictor = FakePredictor()
    settings = ServeSettings(model="fake.onnx", words="words.txt", engine=engine, **limits)
    delivered = []
    model = SimpleNamespace(predictor=predictor, labeler=new_if_no_a)
    return Batcher(model, settings, Metrics(), delivered.extend), delivered


def run_to_completion(b: Batcher, delivered: list, max_rounds: int = 10_000) -> None:
    for _ in range(max_rounds):
        if not (b._pending or b._held or b._busy or b._cancels):
            return
        b.deliver(b.admit() + b.step())
    raise AssertionError("the loop did not finish")


def names_of(outcome):
    req, value, exc = outcome
    assert exc is None, exc
    return value


def alone(predictor, options: SampleOptions):
    got = sample_names(predictor, options, new_if_no_a, engine="network")
    return [s.name for s in got], [s.logprob for s in got], [s.index for s in got]


@pytest.mark.parametrize("engine", ["network", "table"])
def test_requests_of_several_groups_get_what_they_get_alone(engine):
    b, delivered = make_batcher(engine)
    opts = [
        SampleOptions(count=7, seed=1),
        SampleOptions(count=5, seed=2, temperature=0.5, prefix="d"),
        SampleOptions(count=9, seed=1, top_k=2),
        SampleOptions(count=4, seed=3, new_only=True),
        SampleOptions(count=6, seed=4, prefix="eb"),
    ]
    reqs = [Request(o) for o in opts]
    for r in reqs:
        b.submit(r)
    run_to_completion(b, delivered)
    got = {id(req): names_of((req, v, e)) for req, v, e in delivered}
    assert len(got) == len(reqs)
    for r in reqs:
        names, lps, index = got[id(r)]
        ref = alone(b.predictor, r.options)
        assert (names, index) == (ref[0], ref[2])
        np.testing.assert_array_equal(lps, ref[1])
    assert all(new_if_no_a(n) == "new" for n in got[id(reqs[3])][0])


def test_one_forward_pass_per_step_for_every_group():
    b, delivered = make_batcher("network")
    for o in (SampleOptions(count=3, seed=1), SampleOptions(count=3, seed=1, temperature=2.0)):
        b.submit(Request(o))
    b.admit()
    assert len(b._busy) == 2 and sum(e.n for e in b._busy) == 6
    b.step()
    assert b.predictor.calls == [16]  # one call: both groups' 6 rows (padded to 16, as the CLI)


def test_admission_is_first_come_first_served_within_the_row_budget():
    b, delivered = make_batcher("network", max_rows=8)
    first, second = Request(SampleOptions(count=6, seed=1)), Request(SampleOptions(count=6))
    b.submit(first)
    b.submit(second)
    b.admit()
    assert first.job.inflight == 6 and second.job.inflight == 2  # 8 rows in all
    assert b.waiting == 0 and b.depth == 0  # both started, none waiting
    run_to_completion(b, delivered)
    assert {id(r) for r, _, _ in delivered} == {id(first), id(second)}


def test_batching_off_admits_one_request_at_a_time():
    b, delivered = make_batcher("network", batching=False)
    first, second = Request(SampleOptions(count=3, seed=1)), Request(SampleOptions(count=3))
    b.submit(first)
    b.submit(second)
    b.admit()
    assert first.job is not None and second.job is None and b.depth == 1
    run_to_completion(b, delivered)
    assert [r for r, _, _ in delivered] == [first, second]


def test_a_cancelled_request_leaves_the_batch_and_is_never_answered():
    b, delivered = make_batcher("network")
    keep, drop = Request(SampleOptions(count=50, seed=1)), Request(SampleOptions(count=50))
    b.submit(keep)
    b.submit(drop)
    b.deliver(b.admit() + b.step())
    engine = drop.engine
    assert engine.n == 100
    b.cancel(drop)
    b.admit()
    assert drop.job.inflight == 0 and engine.n == keep.job.inflight
    run_to_completion(b, delivered)
    assert [r for r, _, _ in delivered] == [keep]
    cancelled_before_admission = Request(SampleOptions(count=5))
    b.submit(cancelled_before_admission)
    b.cancel(cancelled_before_admission)
    run_to_completion(b, delivered)
    assert cancelled_before_admission.job is None and len(delivered) == 1


def test_a_failing_step_answers_every_request_in_it_and_the_loop_goes_on():
    b, delivered = make_batcher("network")
    reqs = [Request(SampleOptions(count=5, seed=i, temperature=t)) for i, t in ((1, 1.0), (2, 0.7))]
    for r in reqs:
        b.submit(r)
    b.predictor.fail = RuntimeError("the runtime fell over")
    b.deliver(b.admit() + b.step())
    assert sorted(id(r) for r, _, _ in delivered) == sorted(id(r) for r in reqs)
    assert all(isinstance(e, RuntimeError) and v is None for _, v, e in delivered)
    assert not b._busy and not b.pool.engines  # the failed engines are gone
    b.predictor.fail = None
    later = Request(SampleOptions(count=4, seed=1))
    b.submit(later)
    run_to_completion(b, delivered)
    assert (
        delivered[-1][0] is later
        and names_of(delivered[-1])[0] == alone(b.predictor, later.options)[0]
    )


def test_a_new_only_job_that_finds_too_few_names_fails_alone():
    b, delivered = make_batcher("network")
    hopeless = Request(SampleOptions(count=3, seed=1, prefix="a", new_only=True))
    fine = Request(SampleOptions(count=3, seed=1))
    b.submit(hopeless)
    b.submit(fine)
    run_to_completion(b, delivered)
    outcome = {id(r): (v, e) for r, v, e in delivered}
    assert isinstance(outcome[id(hopeless)][1], BnfoldError)
    assert "were new" in str(outcome[id(hopeless)][1])
    assert outcome[id(fine)][1] is None


def test_the_engines_stay_within_the_memory_budget():
    """A budget that holds one engine: a second option group waits for the first to be
    idle (its engine is then freed for the newcomer); both are answered."""
    b, delivered = make_batcher("table", memory_mb=1, table_mb=1, max_rows=256)
    first = Request(SampleOptions(count=300, seed=1))
    second = Request(SampleOptions(count=300, seed=1, temperature=0.5))
    b.submit(first)
    b.submit(second)
    budget = b.settings.memory_bytes
    rounds = held = 0
    while b._pending or b._held or b._busy:
        b.deliver(b.admit() + b.step())
        assert len(b.pool.engines) == 1 and b.pool.nbytes <= budget
        held += second in b._held
        rounds += 1
        assert rounds < 10_000
    assert held > 0  # the second group did wait
    assert [r for r, _, _ in delivered] == [first, second]
    b.pool.release_all()
    assert not b.pool.engines


def test_deadline_answers_504_and_drops_the_request(monkeypatch):
    """Through the service: a request whose steps are held past its deadline raises
    DeadlineExceeded, and the batcher drops it; the next one is served."""
    b, _ = make_batcher("network", deadline=0.2)
    svc = NameService(b.settings)
    svc.ready = True
    svc.model = SimpleNamespace(predictor=b.predictor, labeler=new_if_no_a, sha256="f" * 64)

    async def scenario():
        svc._loop = asyncio.get_running_loop()
        svc.batcher = Batcher(svc.model, b.settings, svc.metrics, svc._deliver)
        svc.batcher.start()
        svc.model.predictor.gate.clear()  # every forward pass waits
        try:
            with pytest.raises(DeadlineExceeded):
                await svc.sample(SampleOptions(count=20, seed=1))
        finally:
            svc.model.predictor.gate.set()
        names, _, _ = await svc.sample(SampleOptions(count=2, seed=1))
        await asyncio.to_thread(svc.batcher.stop, 10)
        return names

    names = asyncio.run(scenario())
    assert names == alone(b.predictor, SampleOptions(count=2, seed=1))[0]
    assert not any(e.jobs for e in svc.batcher.pool.engines.values())
