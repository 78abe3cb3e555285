"""The four networks of a trained model (torch BN, torch folded, ONNX BN, ONNX folded)
side by side: every pair's logits over the input domain in one walk (the float32-aware
verdict of :mod:`bnfold.rounding` for each pair), and single-example latency.

Used by ``bnfold bench`` and the main job (``train-fold``); neither imports the other.
"""

from __future__ import annotations

import gc
import time
from itertools import combinations
from pathlib import Path

import numpy as np

from bnfold.domain import DomainPlan, compare_over_domain, plan_domain
from bnfold.errors import BnfoldError
from bnfold.infer import Predictor


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


def compare_networks(
    nets: dict[str, Predictor],
    float64_model=None,
    *,
    plan: DomainPlan | None = None,
    max_exhaustive: int = 4_000_000,
    sample_size: int = 200_000,
    seed: int = 0,
) -> dict:
    """Every network's logits on the whole input domain (or a seeded sample when it is
    larger than ``max_exhaustive``), in one walk: pairwise max |logit difference| and
    rounding verdict, argmax agreement with the first network, and each network's max error
    against ``float64_model`` (an object with ``logits``, e.g.
    :class:`bnfold.verify.Float64Model`) when given."""
    names = list(nets)
    first = nets[names[0]]
    V, T = first.vocab.size, first.block_size
    for k, p in nets.items():
        if p.vocab.chars != first.vocab.chars or p.block_size != T:
            raise BnfoldError(f"{k} ({p.path}) is not comparable with {first.path}")
    if plan is None:
        plan = plan_domain(V, T, max_exhaustive=max_exhaustive, sample_size=sample_size, seed=seed)
    pairs = list(combinations(names, 2))
    cmp = compare_over_domain(
        nets,
        pairs,
        plan,
        float64_logits=float64_model.logits if float64_model is not None else None,
    )
    pair = {a: dict.fromkeys(names, 0.0) for a in names}
    verdicts = {}
    for (a, b), s in cmp.pairs.items():
        pair[a][b] = pair[b][a] = s.max_abs
        verdicts[f"{b} vs {a}"] = s.verdict().to_dict()
    agree = {names[0]: 1.0}
    for b in names[1:]:
        agree[b] = 1 - cmp.pairs[(names[0], b)].disagree / cmp.contexts
    return {
        "coverage": plan.coverage,
        "contexts": cmp.contexts,
        "pairwise_max_abs_logit_diff": pair,
        "pairwise_verdicts": verdicts,
        "argmax_agreement_with": {"network": names[0], **agree},
        "max_abs_logit_error_vs_float64": cmp.float64_error,
    }


def four_networks(
    bn_pt: str | Path,
    folded_pt: str | Path,
    bn_onnx: str | Path,
    folded_onnx: str | Path,
    latency_repeats: int = 1_000,
) -> dict:
    """torch BN, torch folded, ONNX BN and ONNX folded (the files ``train-fold`` wrote)
    against each other: logits over the whole domain and single-example latency."""
    import torch

    from bnfold.infer import TorchPredictor
    from bnfold.onnx_runtime import OnnxPredictor
    from bnfold.verify import Float64Model

    bn = TorchPredictor(bn_pt)
    nets: dict[str, Predictor] = {
        "torch BN": bn,
        "torch folded": TorchPredictor(folded_pt),
        "ONNX BN": OnnxPredictor(bn_onnx),
        "ONNX folded": OnnxPredictor(folded_onnx),
    }
    result = compare_networks(nets, Float64Model(bn.checkpoint, str(bn_pt)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result["latency_us"] = single_latency(nets, latency_repeats, rounds=4)
    finally:
        torch.set_num_threads(threads)
    result["files"] = {k: str(p.path) for k, p in nets.items()}
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
