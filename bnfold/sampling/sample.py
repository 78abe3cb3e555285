"""Batched, reproducible name sampling on any :class:`~bnfold.runtime.predictor.Predictor`.

The pieces live in :mod:`bnfold.sampling`: pure token functions (:mod:`~bnfold.sampling.tokens`),
row state (:mod:`~bnfold.sampling.rows`), the row table (:mod:`~bnfold.sampling.table`) and
the engine that schedules jobs (:mod:`~bnfold.sampling.engine`, whose docstring is the API).
This module drives an engine on a predictor, streams names out in stream order, and labels
them (train / dev / test / new).

Reproducibility: name ``i`` of a request has its own random stream, and its ``k``-th draw is
``splitmix64(key(seed) + ((i << 16) + k + 1) * golden)``. A name therefore depends only on
(model, seed, options, i), never on the batch size, on which other names share its batch,
on how requests are merged, or on the engine (``table`` or ``network``): both derive each
context's sampling row with the same functions from the same predictor's logits. Only
float rounding of the logits (which a runtime may change with the batch shape) could move
a draw across a probability boundary; that is measured, not assumed
(``benchmarks/sampler.py``).

Log-probability: ``SampledName.logprob`` is the model's natural-log probability, at
temperature 1 and without any top-k / top-p / min-length filtering, of the whole name
*as a complete word*: prefix characters, sampled characters and the end token,
``log P(c_1 ... c_n END)`` (a name cut at ``max_length`` still gets its end-token term).

Memory: :func:`iter_names` submits ``chunk`` names at a time (two chunks in flight, so the
batch stays full across chunk boundaries; new-only chunks one after the other, each
starting after the last new name of the one before) and yields each chunk as it
completes, so sampling 10 million names holds a few chunks, never the whole list.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

import numpy as np

from bnfold.errors import BnfoldError
from bnfold.io import jsonsafe
from bnfold.mlp.data import read_words_and_sha256, split_words
from bnfold.runtime.predictor import Predictor
from bnfold.sampling.engine import (
    DEFAULT_ENGINE,
    DEFAULT_TABLE_BYTES,
    ENGINES,
    SampleJob,
    SamplerEngine,
    new_only_failure,
    new_only_limit,
)
from bnfold.sampling.options import (
    DEFAULT_BATCH,
    DEFAULT_MAX_LENGTH,
    LABELS,
    MAX_COUNT,
    MAX_LENGTH_CAP,
    NEW_ONLY_DRAWS,
    SampledName,
    SampleOptions,
    group_key,
)
from bnfold.sampling.tokens import stream_key, uniforms

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_ENGINE",
    "DEFAULT_MAX_LENGTH",
    "DEFAULT_TABLE_BYTES",
    "ENGINES",
    "LABELS",
    "MAX_COUNT",
    "MAX_LENGTH_CAP",
    "NEW_ONLY_DRAWS",
    "Labeler",
    "SampleJob",
    "SampleOptions",
    "SampledName",
    "SamplerEngine",
    "group_key",
    "iter_names",
    "label_counts",
    "load_labeler",
    "make_engine",
    "run_engine",
    "sample_names",
    "stream_key",
    "uniforms",
    "write_json",
    "write_text",
]

CHUNK = 65_536  # names per job when streaming
MIN_FORWARD_ROWS = 16  # tiny forward batches are padded: some kernels round one row differently
MAX_FORWARD_ROWS = 8192  # bigger ones are split


def make_engine(
    predictor: Predictor,
    options: SampleOptions,
    labeler: Labeler | None = None,
    *,
    engine: str = DEFAULT_ENGINE,
    batch_size: int = DEFAULT_BATCH,
    table_bytes: int = DEFAULT_TABLE_BYTES,
) -> SamplerEngine:
    """An engine for ``predictor``'s model (its spec: vocab, block_size, sha256)."""
    return SamplerEngine(
        predictor.spec,
        options,
        kind=engine,
        batch_size=batch_size,
        table_bytes=table_bytes,
        labeler=labeler,
    )


def forward(predictor: Predictor, contexts: np.ndarray) -> np.ndarray | None:
    """The logits an engine step needs (None for none), small batches padded to
    ``MIN_FORWARD_ROWS`` rows so a context's logits never come from a one-row kernel,
    big ones run ``MAX_FORWARD_ROWS`` at a time."""
    m = len(contexts)
    if m == 0:
        return None
    if m < MIN_FORWARD_ROWS:
        pad = np.resize(contexts, (MIN_FORWARD_ROWS, contexts.shape[1]))
        return predictor.logits(pad)[:m]
    if m > MAX_FORWARD_ROWS:  # a whole-domain first step: bounded activations
        return np.concatenate(
            [
                predictor.logits(contexts[s : s + MAX_FORWARD_ROWS])
                for s in range(0, m, MAX_FORWARD_ROWS)
            ]
        )
    return predictor.logits(contexts)


def run_engine(predictor: Predictor, engine: SamplerEngine, until: SampleJob | None = None):
    """Step ``engine`` on ``predictor`` until ``until`` is done (default: until the engine
    is done); returns the jobs that finished meanwhile."""
    if predictor.sha256 != engine.model.sha256:
        raise BnfoldError(
            f"this engine's table belongs to another model (sha256 {engine.model.sha256[:12]}...),"
            f" not {predictor.path} (sha256 {predictor.sha256[:12]}...)"
        )
    finished: list[SampleJob] = []
    while not (engine.done if until is None else until.done):
        engine.admit()
        finished += engine.step(forward(predictor, engine.needs()))
    return finished


def iter_names(
    predictor: Predictor,
    options: SampleOptions,
    labeler: Labeler | None = None,
    *,
    chunk: int = CHUNK,
    **engine_options,
) -> Iterator[SampledName]:
    """Yield ``options.count`` names (only new ones with ``new_only``) in stream order.

    ``engine_options`` are :func:`make_engine`'s (``engine``, ``batch_size``,
    ``table_bytes``). The result depends on the model, ``options`` and the labeler's
    words, not on ``batch_size``, ``chunk`` or ``engine``. ``new_only`` needs a
    ``labeler``: it draws names 0, 1, 2, ... and yields the first ``count`` labelled new,
    failing with a ``BnfoldError`` after ``20 * count + 10,000`` draws (``count`` when
    greedy).
    """
    options.check(predictor.vocab)
    if options.new_only and labeler is None:
        raise BnfoldError("new-only sampling needs the training words file (--words)")
    e = make_engine(predictor, options, labeler, **engine_options)
    chunk = max(1, int(chunk))
    if options.new_only:  # one job per chunk of new names, each from where the last ended
        limit = new_only_limit(options)
        start = done = 0
        while done < options.count:
            want = min(chunk, options.count - done)
            job = e.submit(dataclasses.replace(options, count=want), start=start, stop=limit)
            run_engine(predictor, e, until=job)
            if job.error is not None:
                raise new_only_failure(done + len(job.found), limit, options.count)
            yield from _named(job, labeler)
            done += want
            start = job.indexes[-1] + 1
        return
    count = options.count
    jobs = []
    nxt = 0
    while nxt < count or jobs:
        while nxt < count and len(jobs) < 2:  # two in flight: the batch stays full
            jobs.append(e.submit(options, start=nxt, stop=min(count, nxt + chunk)))
            nxt = min(count, nxt + chunk)
        job = jobs.pop(0)
        run_engine(predictor, e, until=job)
        yield from _named(job, labeler)


def _named(job: SampleJob, labeler: Labeler | None) -> list[SampledName]:
    names = job.names
    labels = map(labeler, names) if labeler else [None] * len(names)
    rows = zip(names, labels, job.logprobs.tolist(), job.indexes, strict=True)
    with _gc_paused():  # 100k new tuples would otherwise set off many GC passes
        return list(map(_make_sampled_name, rows))


def sample_names(
    predictor: Predictor,
    options: SampleOptions,
    labeler: Labeler | None = None,
    **kwargs,
) -> list[SampledName]:
    """:func:`iter_names` as a list (for modest counts; stream big ones)."""
    return list(iter_names(predictor, options, labeler, **kwargs))


_make_sampled_name = functools.partial(tuple.__new__, SampledName)  # C-speed constructor


@contextlib.contextmanager
def _gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Labeler:
    """Novelty labels as in makemore: is a name in the train, dev or test split, or new?

    The split is ``bnfold.mlp.data.split_words`` of the words file the model was trained on; the
    file's sha256 is checked against the model's ``data_sha256`` metadata when the model
    carries it (``verified``), and a different file is refused (its labels would be wrong).
    """

    def __init__(self, words_file: str | Path, expected_sha256: str | None = None):
        self.path = Path(words_file)
        words, self.sha256 = read_words_and_sha256(self.path)  # one read: words and hash
        if expected_sha256 is not None and expected_sha256 != self.sha256:
            raise BnfoldError(
                f"{self.path} (sha256 {self.sha256[:12]}...) is not the words file this model"
                f" was trained on (sha256 {expected_sha256[:12]}...); pass the training file"
                " with --words so the train/dev/test/new labels are right"
            )
        self.verified = expected_sha256 is not None
        self._label: dict[str, str] = {}
        for label, split in reversed(list(zip(LABELS[:3], split_words(words), strict=True))):
            self._label.update(dict.fromkeys(split, label))  # train wins over dev over test

    def __call__(self, name: str) -> str:
        return self._label.get(name, "new")


def load_labeler(predictor: Predictor, words_file: str | Path) -> Labeler:
    return Labeler(words_file, predictor.data_sha256)


def label_counts(names: Iterable[SampledName]) -> dict[str, int]:
    """How many names carry each label."""
    counts = dict.fromkeys(LABELS, 0)
    for s in names:
        if s.label is not None:
            counts[s.label] += 1
    return counts


# ------------------------------------------------------------------------------- output


def _chunks(names: Iterable[SampledName], size: int = 4096) -> Iterator[list[SampledName]]:
    chunk: list[SampledName] = []
    for s in names:
        chunk.append(s)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_text(out: TextIO, names: Iterable[SampledName], verbose: bool = False) -> None:
    """One name per line, written as they come (bounded memory whatever the count).

    ``verbose`` adds the label and log-probability in columns, the name column as wide as
    the longest name of each block of 4,096 names. A name with a character that is not
    printable is written escaped (:func:`escape_name`): a model's vocabulary is untrusted.
    """
    for chunk in _chunks(names):
        shown = [s.name for s in chunk]
        if not _plain("".join(shown)):  # an untrusted model's vocabulary: escape it
            shown = [escape_name(name) for name in shown]
        if verbose:
            width = max(map(len, shown))
            lines = [
                f"{name:<{width}}  {s.label or '-':<5}  {s.logprob:9.4f}"
                for name, s in zip(shown, chunk, strict=True)
            ]
        else:
            lines = shown
        out.write("\n".join(lines) + "\n")


def _plain(text: str) -> bool:
    """Whether ``text`` can go to a terminal as it is: printable, no backslash."""
    return text.isprintable() and "\\" not in text


_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_name(name: str) -> str:
    """``name`` with every character that is not printable (control characters, a line
    break, escape sequences, bidirectional overrides, other separators) written as a
    Python-style escape (``\\n``, ``\\x1b``, ``\\u202e``), and a backslash as ``\\\\``, so
    a model's vocabulary can neither drive the terminal nor break the one-name-per-line
    output, and every line still reads back as exactly one name."""
    out = []
    for c in name:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif c.isprintable():
            out.append(c)
        elif ord(c) < 0x100:
            out.append(f"\\x{ord(c):02x}")
        elif ord(c) < 0x10000:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    return "".join(out)


def write_json(out: TextIO, header: dict, names: Iterable[SampledName]) -> None:
    """One JSON document, streamed: ``header``'s keys, then ``"names"``, an array with one
    name object per line written as the names come, then ``"label_counts"`` (known only
    at the end). Memory stays bounded whatever the count."""
    head = jsonsafe.dumps(header, indent=2, sort_keys=True)
    out.write(head[: head.rindex("}")].rstrip() + (",\n" if header else "\n"))
    out.write('  "names": [\n')
    counts = dict.fromkeys(LABELS, 0)
    first = True
    for chunk in _chunks(names):
        for label, k in label_counts(chunk).items():
            counts[label] += k
        body = ",\n".join("    " + jsonsafe.dumps(s.to_dict()) for s in chunk)
        out.write(body if first else ",\n" + body)
        first = False
    out.write(f'\n  ],\n  "label_counts": {jsonsafe.dumps(counts)}\n}}\n')
