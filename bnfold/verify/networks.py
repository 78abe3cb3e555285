"""The four networks of a trained model (torch BN, torch folded, ONNX BN, ONNX folded)
side by side: every pair's logits over the input domain in one walk (the float32-aware
verdict of :mod:`bnfold.verify.rounding` for each pair), and single-example latency. The main job
reads its fold verification and export check from the same walk.

Used by ``bnfold bench`` and the main job (``train-fold``); neither imports the other.
"""

from __future__ import annotations

import gc
import time
from itertools import combinations
from pathlib import Path

import numpy as np

from bnfold.errors import BnfoldError
from bnfold.mlp.threads import torch_threads
from bnfold.runtime.infer import Predictor
from bnfold.verify.domain import DomainComparison, DomainPlan, compare_over_domain


def percentiles_us(ns: np.ndarray) -> dict:
    us = ns / 1e3
    return {
        "p50": round(float(np.percentile(us, 50)), 2),
        "p99": round(float(np.percentile(us, 99)), 2),
        "mean": round(float(us.mean()), 2),
        "n": int(len(us)),
    }


def single_latency(nets: dict[str, Predictor], repeats: int, rounds: int = 10) -> dict:
    """p50/p99/mean microseconds of ``logits`` on one context, interleaved in rounds."""
    any_net = next(iter(nets.values()))
    V, T = any_net.vocab.size, any_net.block_size
    rng = np.random.default_rng(0)
    ctxs = [c.reshape(1, T) for c in rng.integers(0, V, size=(256, T), dtype=np.int64)]
    per_round = max(1, repeats // rounds)
    times = {k: np.empty(per_round * rounds, np.int64) for k in nets}
    clock = time.perf_counter_ns
    for net in nets.values():  # warm up every session / allocator
        for c in ctxs:
            net.logits(c)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            for name, net in nets.items():
                f, buf = net.logits, times[name]
                base = r * per_round
                for i in range(per_round):
                    c = ctxs[i & 255]
                    t0 = clock()
                    f(c)
                    buf[base + i] = clock() - t0
    finally:
        if gc_was:
            gc.enable()
    return {k: percentiles_us(v) for k, v in times.items()}


# the four networks, in the order of the table
FOUR_NETWORKS = ("torch BN", "torch folded", "ONNX BN", "ONNX folded")


def compare_networks(
    nets: dict[str, Predictor],
    pairs: list[tuple[str, str]],
    plan: DomainPlan,
    float64_model=None,
    *,
    tolerance: float | None = None,
) -> DomainComparison:
    """One walk over ``plan`` judging each of ``pairs`` (names in ``nets``), each network
    and ``float64_model`` (an object with ``logits``, e.g.
    :class:`bnfold.verify.verdict.Float64Model`) evaluated once per chunk, on one torch
    thread (on a shared 2-core CPU about twice as fast as two, and a fixed float32
    reduction order). Networks of another vocabulary or block size are refused."""
    names = list(nets)
    first = nets[names[0]]
    for k, p in nets.items():
        if p.vocab.chars != first.vocab.chars or p.block_size != first.block_size:
            raise BnfoldError(f"{k} ({p.path}) is not comparable with {first.path}")
    with torch_threads(1):
        return compare_over_domain(
            nets,
            pairs,
            plan,
            float64_logits=float64_model.logits if float64_model is not None else None,
            tolerance=tolerance,
        )


def compare_all_pairs(
    nets: dict[str, Predictor],
    plan: DomainPlan,
    float64_model=None,
    *,
    tolerance: float | None = None,
) -> DomainComparison:
    """:func:`compare_networks` on every pair of ``nets`` (in order)."""
    pairs = list(combinations(list(nets), 2))
    return compare_networks(nets, pairs, plan, float64_model, tolerance=tolerance)


def networks_summary(comparison: DomainComparison) -> dict:
    """What a :func:`compare_all_pairs` walk found, by network: pairwise max |logit
    difference| and verdict, argmax agreement with the first network, and each network's
    max error against the float64 truth (``None`` without one)."""
    names = list(dict.fromkeys(name for pair in comparison.pairs for name in pair))
    pair = {a: dict.fromkeys(names, 0.0) for a in names}
    verdicts = {}
    for (a, b), s in comparison.pairs.items():
        pair[a][b] = pair[b][a] = s.max_abs
        verdicts[f"{b} vs {a}"] = s.verdict().to_dict()
    agree = {names[0]: 1.0}
    for b in names[1:]:
        agree[b] = 1 - comparison.pairs[(names[0], b)].disagree / comparison.contexts
    return {
        "coverage": comparison.plan.coverage,
        "contexts": comparison.contexts,
        "pairwise_max_abs_logit_diff": pair,
        "pairwise_verdicts": verdicts,
        "argmax_agreement_with": {"network": names[0], **agree},
        "max_abs_logit_error_vs_float64": comparison.float64_error,
    }


def four_networks(
    comparison: DomainComparison,
    nets: dict[str, Predictor],
    files: dict[str, Path],
    latency_repeats: int = 1_000,
) -> dict:
    """torch BN, torch folded, ONNX BN and ONNX folded (``nets``, named as
    :data:`FOUR_NETWORKS`, the networks of ``files``) side by side: the figures of the walk
    that compared them (:func:`compare_all_pairs`) and single-example latency."""
    if tuple(nets) != FOUR_NETWORKS:
        raise BnfoldError(
            f"internal error: expected the networks {FOUR_NETWORKS}, got {tuple(nets)}"
        )
    result = networks_summary(comparison)
    with torch_threads(1):
        result["latency_us"] = single_latency(nets, latency_repeats, rounds=4)
    result["files"] = {k: str(files[k]) for k in nets}
    return result


def format_four_networks(r: dict) -> str:
    pair, lat = r["pairwise_max_abs_logit_diff"], r["latency_us"]
    f64 = r["max_abs_logit_error_vs_float64"] or {}
    agree = r["argmax_agreement_with"]
    names = list(pair)
    head = f"{'':14s}" + "".join(f"{n:>14s}" for n in names)
    lines = [
        f"the four networks: max |logit difference| over {r['coverage']}",
        head + f"{'vs float64':>12s}{'argmax=BN':>11s}{'p50 us':>9s}{'p99 us':>9s}",
    ]
    for a in names:
        cells = "".join(f"{'-' if a == b else format(pair[a][b], '.1e'):>14s}" for b in names)
        lines.append(
            f"{a:14s}{cells}{format(f64.get(a, float('nan')), '.1e'):>12s}"
            f"{agree[a]:>10.3%} {lat[a]['p50']:8.1f} {lat[a]['p99']:8.1f}"
        )
    lines.append(
        f"single example, 1 thread ({lat[names[0]]['n']:,} calls each; `bnfold bench` for"
        " the full benchmark)"
    )
    return "\n".join(lines)
