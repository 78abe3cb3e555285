"""The report's figures, drawn headless with matplotlib's Agg canvas.

Figures are built as ``matplotlib.figure.Figure`` objects on an explicit Agg canvas, never
through ``pyplot``: no GUI backend, no global figure state, safe in servers and threads.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless, whatever the environment says

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import nn  # noqa: E402

from bnfold.errors import BnfoldError  # noqa: E402
from bnfold.io.files import atomic_write  # noqa: E402
from bnfold.runtime.twins import TorchTwin, rerounded_copies  # noqa: E402
from bnfold.verify.domain import plan_domain  # noqa: E402
from bnfold.verify.rounding import judge_outputs  # noqa: E402

DPI = 100
MAX_DOMAIN = 300_000  # enumerate every context up to this many; sample beyond
SAMPLE = 100_000


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> None:
    """Atomically, like every other file bnfold writes: never half a PNG under its name."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def _centers(hist: dict) -> tuple[np.ndarray, np.ndarray]:
    e = np.asarray(hist["edges"], dtype=float)
    return (e[:-1] + e[1:]) / 2, np.asarray(hist["density"], dtype=float)


def _series(xs) -> np.ndarray:
    return np.asarray([np.nan if x is None else x for x in xs], dtype=float)


# ------------------------------------------------------------------ training figures --


def loss_figure(report: dict, path: Path) -> str:
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    loss = np.asarray(report.get("train_loss", []), dtype=float)
    if len(loss):
        steps = np.arange(len(loss))
        ax.plot(steps, loss, color="tab:blue", alpha=0.15, lw=0.5, label="train (minibatch)")
        w = max(1, len(loss) // 100)
        n = len(loss) // w * w
        if n:
            # The lecture's smoothing: mean of log-loss over consecutive blocks of steps.
            smooth = 10 ** np.log10(loss[:n]).reshape(-1, w).mean(1)
            ax.plot(
                steps[:n].reshape(-1, w).mean(1),
                smooth,
                color="tab:blue",
                lw=2,
                label=f"train, mean over {w} steps",
            )
    dev = [e for e in report.get("evals", []) if e["split"] == "dev"]
    if dev:
        ax.plot(
            [e["step"] for e in dev],
            [e["loss"] for e in dev],
            "o-",
            color="tab:orange",
            ms=4,
            label="dev (eval mode)",
        )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (log scale)")
    ax.set_title("Loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _save(fig, path)
    last = f", final dev {dev[-1]['loss']:.4f}" if dev else ""
    return f"Train loss per step (smoothed, log scale) and periodic dev loss{last}."


def _layer_hist_figure(report: dict, path: Path, key: str, title: str, xlabel: str) -> None:
    fig = _figure(9, 4.5)
    ax = fig.add_subplot()
    snap = report.get("snapshot") or {}
    for i, (layer, s) in enumerate(zip(report["layers"], snap.get("layers", []), strict=False)):
        hist = s.get(key)
        if not hist:
            continue
        x, y = _centers(hist)
        j = _last_index(layer)
        if key == "act_hist":
            label = (
                f"layer {i + 1}: mean {layer['mean'][j]:+.2f}, std {layer['std'][j]:.2f}, "
                f"saturated {100 * layer['saturation'][j]:.1f}%"
            )
        else:
            label = (
                f"layer {i + 1}: mean {layer['grad_mean'][j]:+.1e}, std {layer['grad_std'][j]:.1e}"
            )
        ax.plot(x, y, label=label)
    ax.set_title(f"{title} (train-mode batch at step {snap.get('step')})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    _save(fig, path)


def _last_index(layer: dict) -> int:
    vals = layer.get("mean", [])
    for j in range(len(vals) - 1, -1, -1):
        if vals[j] is not None:
            return j
    return -1


def weight_grad_figure(report: dict, path: Path) -> None:
    fig = _figure(9, 4.5)
    ax = fig.add_subplot()
    snap = report.get("snapshot") or {}
    for name, hist in snap.get("weights", {}).items():
        w = report["weights"][name]
        ratio = [r for r in w.get("grad_data_ratio", []) if r is not None]
        rtxt = f"{ratio[-1]:.1e}" if ratio else "n/a"
        x, y = _centers(hist)
        ax.plot(x, y, label=f"{name} {tuple(w['shape'])}: grad:data {rtxt}")
    frozen = [n for n, w in report.get("weights", {}).items() if all(w.get("frozen", [False]))]
    if frozen:
        ax.plot([], [], " ", label="frozen (no gradient): " + ", ".join(frozen))
    ax.set_title(f"Weight gradient distribution (step {snap.get('step')})")
    ax.set_xlabel("gradient")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    _save(fig, path)


def update_ratio_figure(report: dict, path: Path) -> None:
    steps = np.asarray(report.get("steps", []), dtype=float)
    updates = report.get("updates", {})
    two_d = [n for n, u in updates.items() if len(u["shape"]) == 2]
    other = [n for n, u in updates.items() if len(u["shape"]) != 2]
    groups = [
        ("2-D weights (embedding, Linear)", two_d),
        ("other parameters (BatchNorm gain/bias, biases)", other),
    ]
    groups = [(t, names) for t, names in groups if names]
    fig = _figure(9, 3.6 * max(1, len(groups)))
    for k, (title, names) in enumerate(groups):
        ax = fig.add_subplot(len(groups), 1, k + 1)
        for name in names:
            u = updates[name]
            y = _series(u["log10"])
            label = f"{name} {tuple(u['shape'])}"
            if all(u.get("frozen", [])):
                ax.plot([], [], " ", label=f"{label}: frozen")
                continue
            ax.plot(steps, y, lw=1, label=label)
        ax.axhline(-3, color="k", ls="--", lw=1.2, label="1e-3 guide")
        ax.set_title(f"log10 update:data ratio: {title}")
        ax.set_xlabel("step")
        ax.set_ylabel("log10 std(update)/std(data)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def training_figures(report: dict, out: Path) -> list[dict]:
    """Draw every training figure into ``out``; returns ``[{"file", "caption"}]``."""
    out = Path(out)
    figures = [{"file": "loss.png", "caption": loss_figure(report, out / "loss.png")}]
    if report.get("layers") and report.get("snapshot", {}).get("layers"):
        _layer_hist_figure(
            report,
            out / "activations.png",
            "act_hist",
            "Tanh activation distribution",
            "tanh output",
        )
        figures.append(
            {
                "file": "activations.png",
                "caption": "Tanh output histograms per layer; legend gives the share with"
                f" |tanh| > {report['saturation_threshold']} (saturated).",
            }
        )
        _layer_hist_figure(
            report,
            out / "gradients.png",
            "grad_hist",
            "Gradient distribution at Tanh outputs",
            "d loss / d tanh output",
        )
        figures.append(
            {
                "file": "gradients.png",
                "caption": "Histograms of the loss gradient at each Tanh output"
                " (healthy: similar spread in every layer).",
            }
        )
    if report.get("weights"):
        weight_grad_figure(report, out / "weight_gradients.png")
        figures.append(
            {
                "file": "weight_gradients.png",
                "caption": "Gradient histograms of every 2-D weight, with its grad:data ratio.",
            }
        )
    if report.get("updates") and report.get("steps"):
        update_ratio_figure(report, out / "update_ratio.png")
        figures.append(
            {
                "file": "update_ratio.png",
                "caption": "log10 of std(actual update)/std(data) per parameter over training;"
                " dashed line: the lecture's ~1e-3 guide.",
            }
        )
    return figures


# ------------------------------------------------------------ BN vs folded comparison --


def input_domain(vocab_size: int, block_size: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """Every possible context (vocab ** block_size of them) if that is at most
    ``MAX_DOMAIN``; otherwise ``SAMPLE`` uniformly random ones (seeded): the plan of
    :func:`bnfold.verify.domain.plan_domain`, held at once (the figure needs all of them)."""
    plan = plan_domain(
        vocab_size, block_size, max_exhaustive=MAX_DOMAIN, sample_size=SAMPLE, seed=seed
    )
    x = np.concatenate(list(plan.chunks())) if plan.total else np.zeros((0, block_size))
    return torch.from_numpy(x.astype(np.int64)), plan.coverage


@torch.no_grad()
def preactivations(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Eval-mode inputs of every Tanh, then the logits: one tensor per Linear(+BN) block."""
    captured: list[torch.Tensor] = []
    tanhs = [m for m in model.modules() if isinstance(m, nn.Tanh)]
    handles = [t.register_forward_hook(lambda m, i, o: captured.append(i[0])) for t in tanhs]
    was_training = model.training
    model.eval()
    try:
        logits = model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return [*captured, logits]


def fold_comparison_stats(bn_model: nn.Module, folded: nn.Module, measured: dict | None = None):
    """Pre-activations and logits of both networks over the input domain (float32: what
    the figure draws), and the numbers.

    ``measured``: what a walk over the domain already found for this pair (``contexts``,
    ``domain``, ``max_abs_logit_diff``, ``argmax_agreement``, ``verdict``), as the main
    job passes it; those numbers are taken as they are and nothing is evaluated in float64
    here. Without it (a training report on its own) the verdict is judged here, against
    the BN network in float64, as :mod:`bnfold.verify.rounding` judges everywhere."""
    cb, cf = bn_model.config, folded.config
    if (cb.vocab_size, cb.block_size, cb.n_layers) != (cf.vocab_size, cf.block_size, cf.n_layers):
        raise BnfoldError("BN and folded models differ in vocabulary, block size or depth")
    x, domain = input_domain(cb.vocab_size, cb.block_size)
    pb, pf = preactivations(bn_model, x), preactivations(folded, x)
    if len(pb) != len(pf) or any(a.shape != b.shape for a, b in zip(pb, pf, strict=True)):
        raise BnfoldError("BN and folded models have different layer shapes")
    diffs = [(b - a).abs().max().item() for a, b in zip(pb, pf, strict=True)]
    if measured is not None:
        return {**measured, "max_abs_preactivation_diff": diffs[:-1]}, pb, pf
    xs = x.numpy()
    z = TorchTwin(bn_model).logits(xs)
    twin = TorchTwin(folded)
    rerounded = [r.logits(xs) for r in rerounded_copies(twin)]
    verdict = judge_outputs(
        pb[-1].numpy(), pf[-1].numpy(), z, twin=twin.logits(xs), rerounded=rerounded
    )
    stats = {
        "contexts": len(x),
        "domain": domain,
        "max_abs_logit_diff": diffs[-1],
        "max_abs_preactivation_diff": diffs[:-1],
        "argmax_agreement": (pb[-1].argmax(1) == pf[-1].argmax(1)).float().mean().item(),
        "verdict": verdict.to_dict(),
    }
    return stats, pb, pf


def fold_comparison_figure(
    bn_model: nn.Module, folded: nn.Module, out: Path, measured: dict | None = None
):
    """``fold_comparison.png``: |logit difference| distribution over the input domain and,
    per block, the BN network's Linear+BN pre-activations against the folded Linear's
    (``measured``: see :func:`fold_comparison_stats`)."""
    stats, pb, pf = fold_comparison_stats(bn_model, folded, measured)
    n = len(pb)
    ncols = 4
    nrows = math.ceil((n + 1) / ncols)
    fig = _figure(4 * ncols, 3.2 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    d = (pf[-1] - pb[-1]).abs().flatten().numpy().astype(np.float64)
    zeros = int((d == 0).sum())
    ax = axes[0]
    nz = d[d > 0]
    if len(nz):
        ax.hist(np.log10(nz), bins=60, color="tab:purple")
    ax.set_title("logits: folded - BN", fontsize=10)
    ax.set_xlabel("log10 |difference|")
    ax.set_ylabel("count")
    ax.plot([], [], " ", label=f"max {stats['max_abs_logit_diff']:.1e}")
    ax.plot([], [], " ", label=f"exactly equal: {zeros:,} of {d.size:,} logits")
    ax.plot([], [], " ", label=f"same argmax: {100 * stats['argmax_agreement']:.2f}%")
    v = stats["verdict"]
    ax.plot(
        [], [], " ", label=f"{'PASS' if v['passed'] else 'FAIL'}: error/bound {v['margin']:.2g}"
    )
    ax.legend(fontsize=8, handlelength=0)
    diffs = [*stats["max_abs_preactivation_diff"], stats["max_abs_logit_diff"]]
    for k in range(n):
        ax = axes[k + 1]
        a, b = pb[k].flatten(), pf[k].flatten()
        lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
        hi = hi if hi > lo else lo + 1
        edges = np.linspace(lo, hi, 61)
        ha, hb = torch.histc(a, 60, lo, hi).numpy(), torch.histc(b, 60, lo, hi).numpy()
        ax.stairs(ha, edges, fill=True, color="tab:blue", alpha=0.45, label="Linear+BN")
        ax.stairs(hb, edges, color="tab:red", lw=1.2, label="folded Linear")
        diff = diffs[k]
        ax.plot([], [], " ", label=f"max |diff| {diff:.1e}")
        name = "output (logits)" if k == n - 1 else f"layer {k + 1} pre-activation"
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7)
    for ax in axes[n + 1 :]:
        ax.set_visible(False)
    fig.suptitle(f"BN network vs folded network, eval mode, {stats['domain']}")
    _save(fig, Path(out) / "fold_comparison.png")
    caption = (
        f"BN vs folded network over {stats['domain']}: max |logit difference|"
        f" {stats['max_abs_logit_diff']:.1e}; worst folded-Linear vs Linear+BN pre-activation"
        f" difference {max(stats['max_abs_preactivation_diff'], default=0.0):.1e}."
        f" Verdict: {stats['verdict']['reason']}."
    )
    return stats, {"file": "fold_comparison.png", "caption": caption}
