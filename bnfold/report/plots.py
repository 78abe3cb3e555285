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


def write_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (atomically); the plot functions only draw."""
    _save(fig, Path(path))
    return Path(path)


# ------------------------------------------------------------------ training figures --

# One colour per block in every figure: layer N is the N-th colour of the cycle; the
# embedding and the output layer sit outside it, in black and grey.
_CYCLE = [
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
]
LEGEND_SIZE = 9
PEAK_CAP = 2.5  # gradient panels: y axis up to this many times the median curve's peak
PHASES = (("init", "at initialisation"), ("end", "after training"))


def layer_colour(label: str) -> str:
    """``"layer 3 ..."`` -> the third colour; ``embedding`` black; ``output`` grey."""
    if label.startswith("embedding"):
        return "black"
    if label.startswith("output"):
        return "0.55"
    words = label.split()
    if len(words) > 1 and words[0] == "layer" and words[1].isdigit():
        return _CYCLE[(int(words[1]) - 1) % len(_CYCLE)]
    return "tab:gray"


def _label(report: dict, param: str) -> str:
    return ((report.get("labels") or {}).get("parameters") or {}).get(param, param)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _shape(shape) -> str:
    return "×".join(str(d) for d in shape)


def loss_figure(report: dict) -> Figure:
    """Train loss per step (raw and smoothed) and the periodic dev loss, on a linear axis
    whose range is the smoothed curve's and the dev points' (the noisiest minibatches of
    the first steps may leave it)."""
    fig = _figure(10, 4.2)
    ax = fig.add_subplot()
    loss = np.asarray(report.get("train_loss", []), dtype=float)
    shown = []
    if len(loss):
        steps = np.arange(len(loss))
        w = max(1, len(loss) // 100)
        if w == 1:  # a short run: every step is drawn as it is
            ax.plot(steps, loss, color="tab:blue", lw=1.5, label="train (minibatch)")
            shown += list(loss)
        else:
            ax.plot(steps, loss, color="tab:blue", alpha=0.25, lw=0.6, label="train (minibatch)")
            n = len(loss) // w * w
            # The lecture's smoothing: mean of log-loss over consecutive blocks of steps.
            smooth = 10 ** np.log10(loss[:n]).reshape(-1, w).mean(1)
            x = steps[:n].reshape(-1, w).mean(1)
            ax.plot(x, smooth, color="tab:blue", lw=2, label=f"train, mean over {w} steps")
            shown += [*smooth, float(np.nanmin(loss))]
    dev = [e for e in report.get("evals", []) if e["split"] == "dev" and e["loss"] is not None]
    if dev:
        ax.plot(
            [e["step"] for e in dev],
            [e["loss"] for e in dev],
            "o-",
            color="tab:orange",
            ms=4,
            label=f"dev (eval mode), final {dev[-1]['loss']:.4f}",
        )
        shown += [e["loss"] for e in dev]
    calibration = (report.get("meta") or {}).get("calibration") or {}
    before = calibration.get("dev_loss_before")
    if before is not None and dev:
        ax.plot(
            [dev[-1]["step"]],
            [before],
            "o",
            mfc="none",
            mec="tab:orange",
            ms=8,
            label=f"dev before the BatchNorm calibration, {before:.4f}",
        )
        shown.append(before)
    finite = [v for v in shown if math.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        pad = max(0.05 * (hi - lo), 0.01)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("Loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=LEGEND_SIZE)
    return fig


def saturation_figure(report: dict) -> Figure:
    """Per layer, the batch saturation at every recorded step (lines) and the train-set
    saturation at initialisation and after training (markers), with the lecture's 5%."""
    fig = _figure(10, 4.2)
    ax = fig.add_subplot()
    steps = np.asarray(report.get("steps", []), dtype=float)
    last = float(len(report.get("train_loss", [])) or (steps[-1] if len(steps) else 0))
    censuses = [(report.get("census_init"), 0.0, "o"), (report.get("census"), last, "D")]
    for i, layer in enumerate(report.get("layers", [])):
        colour = layer_colour(f"layer {i + 1}")
        y = 100 * _series(layer.get("saturation", []))
        if len(y) == len(steps):
            ax.plot(steps, y, color=colour, lw=1.3, label=f"layer {i + 1}")
        for census, x, marker in censuses:
            if census and i < len(census["layers"]):
                sat = 100 * census["layers"][i]["saturation"]
                ax.plot([x], [sat], marker, color=colour, ms=7, mec="k", mew=0.6)
    ax.axhline(5, color="k", ls="--", lw=1, label="the lecture's ~5%")
    ax.plot([], [], "-", color="0.3", label="batch saturation (train-mode batch)")
    if report.get("census_init"):
        ax.plot([], [], "o", color="0.6", mec="k", label="train set, at initialisation")
    if report.get("census"):
        ax.plot([], [], "D", color="0.6", mec="k", label="train set, after training")
    ax.set_xlabel("step")
    ax.set_ylabel(f"% of tanh outputs with |tanh| > {report.get('saturation_threshold')}")
    ax.set_ylim(bottom=0)
    ax.set_title("Saturation over training")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=LEGEND_SIZE, ncol=2, loc="best")
    return fig


def _phase_axes(fig: Figure, n: int = 2):
    return fig.subplots(1, n, squeeze=False)[0]


def activations_figure(report: dict) -> Figure:
    """The lecture's tanh-output histograms, at initialisation and after training, over
    every training example (the train-set censuses): the legend's saturation is the one
    the verdict quotes."""
    fig = _figure(13, 5.6)
    axes = _phase_axes(fig)
    thr = report.get("saturation_threshold")
    for ax, (census, title) in zip(
        axes,
        [(report.get("census_init"), PHASES[0][1]), (report.get("census"), PHASES[1][1])],
        strict=True,
    ):
        if not census:
            ax.set_visible(False)
            continue
        for i, layer in enumerate(census["layers"]):
            x, y = _centers(layer["act_hist"])
            ax.plot(
                x,
                y,
                color=layer_colour(f"layer {i + 1}"),
                lw=1.4,
                label=f"layer {i + 1}: mean {layer['mean']:+.2f}, std {layer['std']:.2f},"
                f" saturated {_pct(layer['saturation'])}",
            )
        for edge in (-thr, thr):
            ax.axvline(edge, color="k", ls=":", lw=0.8)
        ax.set_title(f"Tanh outputs {title} ({census['examples']:,} train examples)")
        ax.set_xlabel(f"tanh output (dotted: ±{thr}, the saturation threshold)")
        ax.set_ylabel("density")
        ax.set_xlim(-1.05, 1.05)
        ax.set_ylim(bottom=0)
        _legend_below(ax)
    return fig


def _image(rows: list[str]) -> np.ndarray:
    return np.asarray([[c == "1" for c in r] for r in rows], dtype=float)


def saturation_image_figure(report: dict) -> Figure:
    """The lecture's image per layer: ``|tanh| > threshold`` for a fixed sample of training
    examples (rows) and every unit (columns), white where saturated, at initialisation and
    after training; dead units (saturated on every training example) marked in red."""
    pairs = [report.get("census_init"), report.get("census")]
    n = max((len(c["layers"]) for c in pairs if c), default=0)
    fig = _figure(13, 1.0 + 1.55 * max(n, 1))
    axes = fig.subplots(max(n, 1), 2, squeeze=False)
    thr = report.get("saturation_threshold")
    for col, (census, (_, when)) in enumerate(zip(pairs, PHASES, strict=True)):
        for i in range(n):
            ax = axes[i][col]
            if not census or i >= len(census["layers"]) or not census["layers"][i]["image"]:
                ax.set_visible(False)
                continue
            layer = census["layers"][i]
            img = _image(layer["image"])
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
            dead = layer["dead"]
            if dead:  # just above the image, outside the axes (the limits stay the image's)
                ax.plot(dead, [-0.5 - 0.06 * len(img)] * len(dead), "v", color="red", ms=6)
                ax.set_ylim(len(img) - 0.5, -0.5)
                ax.lines[-1].set_clip_on(False)
            ax.set_yticks([])
            ax.set_title(
                f"layer {i + 1} {when}: {_pct(layer['saturation'])} saturated (train set),"
                f" {len(dead)} dead",
                fontsize=10,
            )
            if i == n - 1:
                ax.set_xlabel("unit")
            if col == 0:
                ax.set_ylabel(f"{len(img)} examples", fontsize=9)
    fig.suptitle(
        f"|tanh| > {thr}: white where saturated (rows: the same sampled training"
        " examples in every panel; red ▼: dead unit, saturated on every training example)",
        fontsize=11,
    )
    return fig


def _grad_panels(report: dict, title: str, xlabel: str, legend) -> Figure:
    """Init | end panels of one snapshot kind, each on the axis its histograms were cut to
    (a robust ±quantile range, see ``diagnostics.ROBUST_QUANTILE``)."""
    snaps = report.get("snapshots") or {}
    fig = _figure(13, 6.0)
    axes = _phase_axes(fig)
    for ax, (phase, when) in zip(axes, PHASES, strict=True):
        snap = snaps.get(phase)
        if not snap:
            ax.set_visible(False)
            continue
        curves = [(label, *_centers(hist), hist, text) for label, hist, text in legend(snap)]
        # A sparse gradient (the embedding rows a small batch never used) is a spike at 0
        # that would flatten every other curve: the y axis stops at PEAK_CAP x the typical
        # peak, and the legend says which curves run past it.
        peaks = sorted(float(y.max()) for _, _, y, _, _ in curves) or [1.0]
        top = min(peaks[-1], PEAK_CAP * peaks[(len(peaks) - 1) // 2]) * 1.05
        lim = 0.0
        for label, x, y, hist, text in curves:
            outside = hist.get("outside", 0.0)
            if outside > 0.015:  # the axis is cut at the 99% quantile: say when more is lost
                text += f" ({outside:.0%} beyond the axis)"
            if y.max() > top:
                text += " (peak cut off)"
            ax.plot(x, y, color=layer_colour(label), lw=1.4, label=text)
            lim = max(lim, abs(hist["edges"][0]), abs(hist["edges"][-1]))
        ax.set_xlim(-lim or -1.0, lim or 1.0)
        ax.set_ylim(0, top if top > 0 else 1.0)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
        ax.set_title(f"{title} {when} (step {snap['step']})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        _legend_below(ax)
    return fig


def _legend_below(ax) -> None:
    """The legend under the axes, off the curves."""
    ax.legend(fontsize=LEGEND_SIZE, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)


def gradients_figure(report: dict) -> Figure:
    """The lecture's histograms of the loss gradient at each Tanh output."""

    def legend(snap):
        for i, layer in enumerate(snap["layers"]):
            if layer and layer.get("grad_hist"):
                yield (
                    f"layer {i + 1}",
                    layer["grad_hist"],
                    f"layer {i + 1}: mean {layer['mean']:+.1e}, std {layer['std']:.1e}",
                )

    return _grad_panels(
        report, "Tanh-output gradient", "d loss / d tanh output (one train-mode batch)", legend
    )


def weight_gradients_figure(report: dict) -> Figure:
    """The lecture's histograms of every 2-D weight's gradient, with its grad:data ratio."""
    weights = report.get("weights", {})

    def legend(snap):
        for name, w in snap["weights"].items():
            ratios = weights.get(name, {}).get("grad_data_ratio", [])
            r = snap.get("record")
            ratio = ratios[r] if r is not None and r < len(ratios) else None
            rtxt = f"{ratio:.1e}" if ratio is not None else "n/a"
            shape = _shape(weights.get(name, {}).get("shape", []))
            label = _label(report, name)
            yield label, w["hist"], f"{label} ({shape}): std {w['std']:.1e}, grad:data {rtxt}"

    return _grad_panels(report, "Weight gradients", "gradient (one train-mode batch)", legend)


def update_ratio_figure(report: dict) -> Figure:
    """log10 update:data per parameter over the run: the 2-D weights, then the rest (BN
    gain solid, BN bias and other biases dashed), coloured by layer."""
    steps = np.asarray(report.get("steps", []), dtype=float)
    updates = report.get("updates", {})
    two_d = [n for n, u in updates.items() if len(u["shape"]) == 2]
    other = [n for n, u in updates.items() if len(u["shape"]) != 2]
    groups = [
        ("2-D weights (embedding, Linear)", two_d),
        ("other parameters (BatchNorm gain: solid, bias: dashed)", other),
    ]
    groups = [(t, names) for t, names in groups if names]
    fig = _figure(13, 3.8 * max(1, len(groups)))
    for k, (title, names) in enumerate(groups):
        ax = fig.add_subplot(len(groups), 1, k + 1)
        for name in names:
            u = updates[name]
            label = f"{_label(report, name)} ({_shape(u['shape'])})"
            colour = layer_colour(_label(report, name))
            style = "--" if name.endswith("bias") else "-"
            if all(u.get("frozen", [])):
                ax.plot([], [], " ", label=f"{label}: frozen")
                continue
            ax.plot(steps, _series(u["log10"]), style, color=colour, lw=1.1, label=label)
        ax.axhline(-3, color="k", ls=":", lw=1.4, label="1e-3 guide")
        ax.set_title(f"log10 update:data ratio: {title}")
        ax.set_xlabel("step")
        ax.set_ylabel("log10 std(update)/std(data)")
        ax.grid(True, alpha=0.3)
        ax.legend(
            fontsize=8,
            ncol=2 if len(names) > 10 else 1,
            loc="center left",
            bbox_to_anchor=(1.01, 0.5),
        )
    return fig


def training_figures(report: dict, out: Path) -> list[dict]:
    """Draw every training figure into ``out``; returns ``[{"file", "caption"}]``."""
    out = Path(out)
    thr = report.get("saturation_threshold")
    dev = [e for e in report.get("evals", []) if e["split"] == "dev" and e["loss"] is not None]
    plan = [
        (
            "loss.png",
            loss_figure,
            "Train loss per step (raw and smoothed) and periodic dev loss"
            + (f", final dev {dev[-1]['loss']:.4f}." if dev else "."),
        )
    ]
    has_census = report.get("census") or report.get("census_init")
    if report.get("layers") and report.get("steps"):
        plan.append(
            (
                "saturation.png",
                saturation_figure,
                f"Share of |tanh| > {thr} per layer: in each recorded train-mode batch"
                " (lines), and over every training example at initialisation and after"
                " training (markers: the figures the verdict quotes).",
            )
        )
    if has_census:
        plan.append(
            (
                "activations.png",
                activations_figure,
                "Tanh output histograms over every training example, at initialisation and"
                " after training; the legend's saturation is the train-set saturation.",
            )
        )
        plan.append(
            (
                "saturation_image.png",
                saturation_image_figure,
                f"The lecture's image: |tanh| > {thr} per unit (columns) for the same sampled"
                " training examples (rows), white where saturated; the lecture draws it at"
                f" 0.99, this report uses its one threshold, {thr}.",
            )
        )
    snaps = report.get("snapshots") or {}
    if any(s and any(lay and lay.get("grad_hist") for lay in s["layers"]) for s in snaps.values()):
        plan.append(
            (
                "gradients.png",
                gradients_figure,
                "Histograms of the loss gradient at each Tanh output, at the first and the"
                " last recorded step (healthy: a similar spread in every layer). Each axis"
                " spans the widest curve's 99th percentile of |gradient|.",
            )
        )
    if any(s and s.get("weights") for s in snaps.values()):
        plan.append(
            (
                "weight_gradients.png",
                weight_gradients_figure,
                "Gradient histograms of every 2-D weight at the first and the last recorded"
                " step, with its grad:data ratio (std of gradient / std of weight). Each axis"
                " spans the widest curve's 99th percentile of |gradient|.",
            )
        )
    if report.get("updates") and report.get("steps"):
        plan.append(
            (
                "update_ratio.png",
                update_ratio_figure,
                "log10 of std(actual update)/std(data) per parameter over training;"
                " dotted line: the lecture's ~1e-3 guide.",
            )
        )
    figures = []
    for file, draw, caption in plan:
        write_figure(draw(report), out / file)
        figures.append({"file": file, "caption": caption})
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
    ncols = 3  # three panels a row: legends and tick labels stay readable at page width
    nrows = math.ceil((n + 1) / ncols)
    fig = _figure(4.4 * ncols, 3.4 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    d = (pf[-1] - pb[-1]).abs().flatten().numpy().astype(np.float64)
    zeros = int((d == 0).sum())
    ax = axes[0]
    nz = d[d > 0]
    if len(nz):
        ax.hist(np.log10(nz), bins=60, color="tab:purple")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.7)  # headroom: the numbers sit above the bars
    ax.set_title("logits: folded - BN", fontsize=11)
    ax.set_xlabel("log10 |difference|")
    ax.set_ylabel("count")
    ax.plot([], [], " ", label=f"max {stats['max_abs_logit_diff']:.1e}")
    ax.plot([], [], " ", label=f"exactly equal: {zeros:,} of {d.size:,} logits")
    ax.plot([], [], " ", label=f"same argmax: {100 * stats['argmax_agreement']:.2f}%")
    v = stats["verdict"]
    ax.plot(
        [], [], " ", label=f"{'PASS' if v['passed'] else 'FAIL'}: error/bound {v['margin']:.2g}"
    )
    ax.legend(fontsize=LEGEND_SIZE, handlelength=0, loc="upper left")
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
        name = "output (logits)" if k == n - 1 else f"layer {k + 1} pre-activation"
        ax.set_title(f"{name}: max |diff| {diffs[k]:.1e}", fontsize=11)
        ax.set_xlabel("logit" if k == n - 1 else "value fed to tanh")
        ax.set_ylabel("count")
    # one legend for the pre-activation panels, above them, off the histograms
    fig.legend(*axes[1].get_legend_handles_labels(), loc="outside upper right", ncol=2)
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
