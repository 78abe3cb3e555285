"""``bnfold bench``: the four networks against each other, in one run, on one thread.

Networks: torch BN (``bn.pt``), torch folded (``folded.pt``, or ``bn.pt`` folded in memory),
ONNX BN (``bn.onnx``) and ONNX folded (``folded.onnx``), each behind its
:class:`~bnfold.runtime.infer.Predictor`, i.e. exactly what the CLI and the service call.

Figures:

* single-example latency of ``logits`` on a (1, block_size) context, p50/p99/mean over
  ``repeats`` calls per network. The calls are interleaved in rounds (net A, B, C, D, A,
  B, ...) so drift in machine load hits every network alike, and the garbage collector is
  paused while timing;
* batched throughput: rows/s of ``logits`` at batch 1024 (median of repeated calls);
* names/s: the lecture's loop (one name at a time, torch BN, ``torch.multinomial``) as the
  baseline, and the batched sampler's network engine (:mod:`bnfold.sampling.sample`) on every
  network; plus the forward-pass ceiling ``rows/s / forward steps per name`` and how close
  the sampler gets; and, side by side on ``folded.onnx``, the table engine (warm, and cold
  with its table build), the network engine and a plain batched ONNX Runtime sampling loop;
* ratios: everything against torch BN, and ONNX folded against ONNX BN.

Models come from ``models_dir`` (``bn.pt`` is required there; missing or stale derived files
are made in a temporary directory). With no ``bn.pt`` at all a quick model is trained first
(the report says so: a barely trained model makes names of a different length, so its
names/s is not representative).
"""

from __future__ import annotations

import gc
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bnfold.errors import BnfoldError
from bnfold.io.onnx_files import load_onnx_file
from bnfold.mlp.checkpoint import load_checkpoint
from bnfold.mlp.data import DEFAULT_WORDS
from bnfold.mlp.threads import torch_threads
from bnfold.pipeline.assemble import IN_MEMORY_FOLDED, export_onnx, fold_to_checkpoint
from bnfold.pipeline.train_fold import save_trained, train_run
from bnfold.runtime.infer import Predictor, TorchPredictor
from bnfold.runtime.onnx_runtime import OnnxPredictor
from bnfold.runtime.ort_session import cpu_session
from bnfold.verify.networks import FOUR_NETWORKS, percentiles_us, single_latency

NETS = FOUR_NETWORKS
BATCH = 1024
LECTURE_NAMES = 200  # names for the one-at-a-time baseline (~0.2 s at ~1,000 names/s)
QUICK_STEPS = 2_000
# the targets, measured on this machine (1 thread); shown next to the figures
TARGETS = {
    "onnx_folded_p50_us": 8.1,
    "speedup_vs_torch_bn": 10.0,
    "names_per_s": 150_000,
    "table_names_per_s": 1_000_000,
    "table_vs_plain_ort": 6,
}


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def load_networks(models_dir: str | Path, work_dir: Path, progress: bool = False):
    """The four predictors (dict name -> Predictor) and notes on where each came from.

    ``bn.pt`` is read once; a ``folded.pt`` or ONNX file not made from it is not used, and
    what is missing is made by the pipeline's assembler (folded in memory, the ONNX files
    exported into ``work_dir`` after the same verification ``bnfold export`` does)."""
    models = Path(models_dir)
    notes: list[str] = []
    bn_path = models / "bn.pt"
    if bn_path.is_file():
        bn = load_checkpoint(bn_path)
    else:
        _log(progress, f"no {bn_path}: training a quick model ({QUICK_STEPS} steps)...")
        bn_path = work_dir / "bn.pt"
        run = train_run(DEFAULT_WORDS, steps=QUICK_STEPS, progress=False)
        save_trained(run, bn_path)
        bn = run.checkpoint
        notes.append(
            f"no bn.pt in {models}: benchmarked a quick {QUICK_STEPS}-step model"
            " (names/s is not representative of a fully trained one)"
        )
    nets: dict[str, Predictor] = {"torch BN": TorchPredictor(bn, str(bn_path))}

    folded_path = models / "folded.pt"
    folded = load_checkpoint(folded_path) if folded_path.is_file() else None
    if folded is not None and (
        folded.config.batchnorm or (folded.meta.get("folded_from") or {}).get("sha256") != bn.sha256
    ):
        folded = None  # not made from this bn.pt
    if folded is None:
        folded, _ = fold_to_checkpoint(bn, bn_path)
        folded_path = IN_MEMORY_FOLDED
        notes.append("torch folded: bn.pt folded in memory (no matching folded.pt)")
    nets["torch folded"] = TorchPredictor(folded, str(folded_path))

    onnx_nets: dict[str, Predictor] = {}
    for name, file in (("ONNX BN", "bn.onnx"), ("ONNX folded", "folded.onnx")):
        try:
            pred = OnnxPredictor(models / file, threads=1)
        except BnfoldError:
            continue
        if pred.metadata.get("source_sha256") == bn.sha256:
            onnx_nets[name] = pred
    if len(onnx_nets) < 2:
        _log(progress, "exporting bn.pt to ONNX (no bn.onnx/folded.onnx made from it)...")
        res = export_onnx(bn, bn_path, work_dir / "onnx", folded=folded, folded_path=folded_path)
        onnx_nets = {
            "ONNX BN": OnnxPredictor(res.paths["bn"], threads=1),
            "ONNX folded": OnnxPredictor(res.paths["folded"], threads=1),
        }
        notes.append("ONNX files exported to a temporary directory (none made from bn.pt)")
    nets.update(onnx_nets)
    return nets, {k: str(v.path) for k, v in nets.items()}, notes


PLAIN_ORT = "ORT plain run"


class PlainOrtRun(Predictor):
    """``folded.onnx`` run the way a user would by default: an ``InferenceSession`` with one
    thread and the public ``session.run``. The baseline bnfold's ONNX path must not lose to."""

    backend = "onnxruntime"

    def __init__(self, onnx_predictor: Predictor):
        # the same bytes bnfold runs (read by bnfold's one ONNX loader), a plain session
        self.session = cpu_session(load_onnx_file(onnx_predictor.path).data, plain=True)
        self.input_name = self.session.get_inputs()[0].name
        self.path, self.vocab = onnx_predictor.path, onnx_predictor.vocab
        self.block_size, self.folded = onnx_predictor.block_size, onnx_predictor.folded
        self.sha256, self.metadata = onnx_predictor.sha256, onnx_predictor.metadata
        self.parameters, self.threads = onnx_predictor.parameters, 1

    def logits(self, contexts: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: contexts})[0]


def probs_latency(nets: dict[str, Predictor], repeats: int, prefix: str = "em") -> dict:
    """p50/p99 of the public single-example call ``next_char_probs(prefix)`` (context
    encoding + forward pass + float64 softmax), per network."""
    out = {}
    clock = time.perf_counter_ns
    for name, net in nets.items():
        f = net.next_char_probs
        for _ in range(min(repeats, 200)):
            f(prefix)
        buf = np.empty(repeats, np.int64)
        gc_was = gc.isenabled()
        gc.disable()
        try:
            for i in range(repeats):
                t0 = clock()
                f(prefix)
                buf[i] = clock() - t0
        finally:
            if gc_was:
                gc.enable()
        out[name] = percentiles_us(buf)
    return out


def batched_rows(nets: dict[str, Predictor], batch: int = BATCH, seconds: float = 0.4) -> dict:
    """Rows/s of ``logits`` at ``batch`` rows per call (median call time), per network."""
    any_net = next(iter(nets.values()))
    V, T = any_net.vocab.size, any_net.block_size
    x = np.random.default_rng(1).integers(0, V, size=(batch, T), dtype=np.int64)
    out = {}
    for name, net in nets.items():
        net.logits(x)
        ts = []
        start = time.perf_counter()
        while time.perf_counter() - start < seconds or len(ts) < 5:
            t0 = time.perf_counter()
            net.logits(x)
            ts.append(time.perf_counter() - t0)
        out[name] = round(batch / float(np.median(ts)))
    return out


def lecture_names(bn: Predictor, n: int = LECTURE_NAMES, seed: int = 2147483647) -> dict:
    """The lecture's sampling loop, one name at a time on the torch BN model."""
    import torch
    import torch.nn.functional as F

    model = bn.model  # type: ignore[attr-defined]
    T = bn.block_size
    g = torch.Generator().manual_seed(seed)
    steps = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(n):
            context = [0] * T
            while True:
                logits = model(torch.tensor([context]))
                probs = F.softmax(logits, dim=1)
                ix = torch.multinomial(probs, num_samples=1, generator=g).item()
                context = context[1:] + [ix]
                steps += 1
                if ix == 0:
                    break
    dt = time.perf_counter() - t0
    return {"names_per_s": round(n / dt), "names": n, "steps_per_name": round(steps / n, 3)}


def batched_names(nets: dict[str, Predictor], n: int, seed: int = 42) -> dict:
    """names/s of the network engine (the model every step) on each network."""
    from bnfold.sampling.sample import SampleOptions, sample_names

    out: dict = {}
    names: dict[str, list[str]] = {}
    for name, net in nets.items():
        sample_names(net, SampleOptions(count=min(n, 2000), seed=seed + 1), engine="network")
        t0 = time.perf_counter()
        got = sample_names(net, SampleOptions(count=n, seed=seed), engine="network")
        dt = time.perf_counter() - t0
        names[name] = [s.name for s in got]
        steps = sum(len(s) + 1 for s in names[name])
        out[name] = {
            "names_per_s": round(n / dt),
            "names": n,
            "steps_per_name": round(steps / n, 3),
        }
    if "ONNX BN" in names and "ONNX folded" in names:
        same = sum(a == b for a, b in zip(names["ONNX BN"], names["ONNX folded"], strict=True))
        out["same_names_onnx_bn_vs_folded"] = round(same / n, 6)
    return out


def _timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn()``, the garbage collector paused."""
    gc_was = gc.isenabled()
    gc.disable()
    try:
        w, c = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - w, time.process_time() - c
    finally:
        if gc_was:
            gc.enable()


def engine_names_per_s(net: Predictor, n: int, engine: str, seed: int = 42) -> dict:
    """names/s of one engine on ``net``: a first (cold) job that builds what the engine keeps
    (the table engine's rows), then a second job of ``n`` names on the warm engine (startup
    excluded). Wall and CPU time both: on a shared machine CPU time is the robust one."""
    from bnfold.sampling.sample import SampleOptions, make_engine, run_engine

    e = make_engine(net, SampleOptions(count=n, seed=seed), engine=engine)
    cold = _timed(lambda: (e.submit(SampleOptions(count=n, seed=seed + 1)), run_engine(net, e)))
    job = e.submit(SampleOptions(count=n, seed=seed))
    wall, cpu = _timed(lambda: run_engine(net, e))
    steps = sum(len(w) + 1 for w in job.names)
    return {
        "names_per_s": round(n / wall),
        "names_per_cpu_s": round(n / cpu),
        "cold_names_per_s": round(n / cold[0]),
        "names": n,
        "steps_per_name": round(steps / n, 3),
        "table_mib": round(e.table.nbytes / 2**20, 1) if e.table is not None else 0,
    }


def plain_ort_sampler(onnx_path: str | Path, n: int, batch: int = 4096, seed: int = 0) -> dict:
    """names/s of a plain batched ONNX Runtime sampling loop, the way one would write it:
    one session (one thread), ``batch`` names in flight, each step ``session.run`` on every
    row, a numpy softmax, one uniform per row against the cumulative sum, finished rows
    restarted. It builds no strings (a generous baseline)."""
    # the file's bytes through bnfold's one ONNX loader (bounded, no external data)
    sess = cpu_session(load_onnx_file(onnx_path).data, plain=True)
    inp = sess.get_inputs()[0]
    T = int(inp.shape[1])
    rng = np.random.default_rng(seed)
    ctx = np.zeros((batch, T), dtype=np.int64)
    length = np.zeros(batch, dtype=np.int64)
    done = steps = 0

    def loop() -> None:
        nonlocal done, steps
        while done < n:
            z = sess.run(None, {inp.name: ctx})[0]
            p = np.exp(z - z.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            tok = (np.cumsum(p, axis=1) < rng.random((batch, 1))).sum(axis=1)
            np.minimum(tok, p.shape[1] - 1, out=tok)
            tok[length >= 50] = 0
            ended = tok == 0
            ctx[:, :-1] = ctx[:, 1:]
            ctx[:, -1] = tok
            ctx[ended] = 0
            length[:] = np.where(ended, 0, length + 1)
            done += int(ended.sum())
            steps += batch

    wall, cpu = _timed(loop)
    return {
        "names_per_s": round(done / wall),
        "names_per_cpu_s": round(done / cpu),
        "names": done,
        "batch": batch,
        "steps_per_name": round(steps / done, 3),
    }


TABLE_NAMES_PER_NAME = 10  # the side-by-side run samples 10x --names (the table is fast)


def engine_side_by_side(folded: Predictor, n: int, rounds: int = 3) -> dict:
    """The table engine, the network engine and a plain batched ORT sampling loop on
    ``folded.onnx``, alternating in ``rounds`` (best of each), so load drift hits all alike."""
    best: dict[str, dict] = {}
    for _ in range(rounds):
        runs = {
            "table": engine_names_per_s(folded, n, "table"),
            "network": engine_names_per_s(folded, max(1, n // 5), "network"),
            "plain ORT loop": plain_ort_sampler(folded.path, max(1, n // 5)),
        }
        for k, v in runs.items():
            if k not in best or v["names_per_cpu_s"] > best[k]["names_per_cpu_s"]:
                best[k] = v
    out: dict = dict(best)
    out["table_vs_plain_ort"] = {
        "wall": _ratio(best["table"]["names_per_s"], best["plain ORT loop"]["names_per_s"]),
        "cpu": _ratio(best["table"]["names_per_cpu_s"], best["plain ORT loop"]["names_per_cpu_s"]),
    }
    out["network_vs_plain_ort_cpu"] = _ratio(
        best["network"]["names_per_cpu_s"], best["plain ORT loop"]["names_per_cpu_s"]
    )
    out["rounds"] = rounds
    return out


def _ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("nan")


def run_bench(
    models_dir: str | Path,
    repeats: int = 20_000,
    n_names: int = 20_000,
    progress: bool = False,
) -> dict:
    """Every figure of ``bnfold bench`` as a JSON-ready dict (one thread throughout)."""
    import onnxruntime
    import torch

    if repeats < 1 or n_names < 1:
        raise BnfoldError("repeats and names must be >= 1")
    with torch_threads(1), tempfile.TemporaryDirectory(prefix="bnfold-bench-") as tmp:
        nets, paths, notes = load_networks(models_dir, Path(tmp), progress)
        _log(progress, f"single-example latency ({repeats:,} calls per network)...")
        lat = single_latency({**nets, PLAIN_ORT: PlainOrtRun(nets["ONNX folded"])}, repeats)
        probs_lat = probs_latency(nets, max(1, repeats // 10))
        _log(progress, f"batched throughput (batch {BATCH})...")
        rows = batched_rows(nets)
        _log(progress, f"names/s (lecture loop: {LECTURE_NAMES} names; batched: {n_names:,})...")
        lecture = lecture_names(nets["torch BN"])
        sampled = batched_names(nets, n_names)
        _log(progress, "names/s side by side: table engine, network engine, plain ORT loop...")
        engines = engine_side_by_side(nets["ONNX folded"], TABLE_NAMES_PER_NAME * n_names)

    ratios: dict = {
        "latency_p50_speedup_vs_torch_bn": {
            k: _ratio(lat["torch BN"]["p50"], v["p50"]) for k, v in lat.items()
        },
        "onnx_folded_vs_onnx_bn_p50": _ratio(lat["ONNX BN"]["p50"], lat["ONNX folded"]["p50"]),
        "onnx_folded_vs_plain_ort_run_p50": _ratio(
            lat[PLAIN_ORT]["p50"], lat["ONNX folded"]["p50"]
        ),
        "torch_folded_vs_torch_bn_p50": _ratio(lat["torch BN"]["p50"], lat["torch folded"]["p50"]),
        "rows_per_s_vs_torch_bn": {k: _ratio(v, rows["torch BN"]) for k, v in rows.items()},
    }
    names_fig: dict = {"lecture (torch BN, one name at a time)": lecture}
    names_fig["batched sampler"] = sampled
    ratios["names_per_s_vs_lecture"] = {
        k: _ratio(sampled[k]["names_per_s"], lecture["names_per_s"]) for k in nets
    }
    ceiling = {k: rows[k] / sampled[k]["steps_per_name"] for k in nets}
    names_fig["forward_ceiling_names_per_s"] = {k: round(v) for k, v in ceiling.items()}
    ratios["names_per_s_of_ceiling"] = {
        k: _ratio(sampled[k]["names_per_s"], ceiling[k]) for k in nets
    }
    names_fig["engines on ONNX folded"] = engines
    ratios["table_engine_vs_plain_ort_sampler"] = engines["table_vs_plain_ort"]
    result = {
        "machine": {
            "threads": 1,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": str(torch.__version__),
            "onnxruntime": onnxruntime.__version__,
            "load_average": [round(x, 2) for x in os.getloadavg()],
        },
        "models": paths,
        "latency_us": lat,
        "next_char_probs_latency_us": probs_lat,
        "rows_per_s": {"batch": BATCH, **rows},
        "names_per_s": names_fig,
        "ratios": ratios,
        "targets": TARGETS,
        "notes": notes,
    }
    return result


def format_bench(r: dict) -> str:
    lat, rows, ratios = r["latency_us"], r["rows_per_s"], r["ratios"]
    sp = ratios["latency_p50_speedup_vs_torch_bn"]
    rv = ratios["rows_per_s_vs_torch_bn"]
    m = r["machine"]
    lines = [
        f"bnfold bench: 1 thread, torch {m['torch']}, onnxruntime {m['onnxruntime']},"
        f" load average {m['load_average'][0]}",
        "",
        f"{'network':14s} {'p50 us':>8s} {'p99 us':>8s} {'x torch BN':>10s}"
        f" {'rows/s @' + str(rows['batch']):>14s} {'x torch BN':>10s}",
    ]
    for k in NETS:
        lines.append(
            f"{k:14s} {lat[k]['p50']:8.1f} {lat[k]['p99']:8.1f} {sp[k]:9.1f}x"
            f" {rows[k]:14,d} {rv[k]:9.1f}x"
        )
    pl = r["next_char_probs_latency_us"]
    lines.append(
        "next_char_probs(prefix) p50 us (encode + forward + softmax): "
        + ", ".join(f"{k} {pl[k]['p50']:.1f}" for k in NETS)
    )
    lines.append(
        f"folded vs BN (p50): torch {ratios['torch_folded_vs_torch_bn_p50']}x,"
        f" ONNX {ratios['onnx_folded_vs_onnx_bn_p50']}x"
    )
    names = r["names_per_s"]
    lec = names["lecture (torch BN, one name at a time)"]
    lines += ["", f"names/s  lecture loop (torch BN, one at a time): {lec['names_per_s']:,}"]
    eng = names["engines on ONNX folded"]
    lines.append(
        f"names/s side by side on ONNX folded, 1 thread, best of {eng['rounds']} alternating"
        " rounds (wall / CPU):"
    )
    for k in ("table", "network", "plain ORT loop"):
        v = eng[k]
        cold = f"; cold {v['cold_names_per_s']:,}" if "cold_names_per_s" in v else ""
        lines.append(
            f"         {k + (' engine' if k != 'plain ORT loop' else ''):16s}"
            f" {v['names_per_s']:10,d} / {v['names_per_cpu_s']:10,d}"
            f"  ({v['names']:,} names{cold})"
        )
    tv = eng["table_vs_plain_ort"]
    lines.append(
        f"         table engine vs plain ORT loop: {tv['wall']}x wall, {tv['cpu']}x CPU;"
        f" network engine vs plain ORT loop: {eng['network_vs_plain_ort_cpu']}x CPU"
    )
    if "batched sampler" in names:
        b = names["batched sampler"]
        ceil = names["forward_ceiling_names_per_s"]
        of = ratios["names_per_s_of_ceiling"]
        vl = ratios["names_per_s_vs_lecture"]
        for k in NETS:
            lines.append(
                f"         batched sampler, {k:13s} {b[k]['names_per_s']:9,d}"
                f"  ({vl[k]:.0f}x lecture; {of[k]:.0%} of its {ceil[k]:,} forward ceiling)"
            )
        lines.append(
            f"         {b['ONNX folded']['steps_per_name']:.2f} forward steps per name;"
            f" same names ONNX BN vs folded: {b.get('same_names_onnx_bn_vs_folded', 0):.4%}"
        )
    t = r["targets"]
    lines += [
        "",
        f"targets: ONNX folded p50 <= {t['onnx_folded_p50_us']} us"
        f" (got {lat['ONNX folded']['p50']}),"
        f" >= {t['speedup_vs_torch_bn']:.0f}x torch BN (got {sp['ONNX folded']}x)",
        f"         ONNX folded p50 <= {PLAIN_ORT} of folded.onnx (got {lat['ONNX folded']['p50']}"
        f" vs {lat[PLAIN_ORT]['p50']} us: {ratios['onnx_folded_vs_plain_ort_run_p50']}x)",
    ]
    table = names["engines on ONNX folded"]["table"]
    lines.append(
        f"         table engine >= {t['table_names_per_s']:,} names/s (got"
        f" {table['names_per_s']:,} wall, {table['names_per_cpu_s']:,} CPU) and"
        f" >= {t['table_vs_plain_ort']}x the plain ORT loop (got {tv['wall']}x wall,"
        f" {tv['cpu']}x CPU)"
    )
    lines.extend(f"note: {n}" for n in r["notes"])
    return "\n".join(lines)


# ----------------------------------------------------------- the four networks, side by side
