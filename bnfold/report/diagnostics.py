"""Training diagnostics: the makemore lecture's health statistics, recorded cheaply.

``Diagnostics`` is a ``TrainObserver``. Every ``interval`` steps (the *recorded* steps) it
records, as in the lecture:

- per Tanh layer: activation mean/std and saturation (share of ``|tanh| > 0.97``), and the
  mean/std of the loss gradient at the Tanh output (a tensor hook, installed only on
  recorded steps);
- per 2-D weight (the embedding table and every Linear): gradient mean/std and the
  grad:data ratio ``std(grad) / std(weight)``;
- per parameter: ``log10(std(update) / std(data))``. The *update* is the parameter's actual
  change in that step (a copy before ``opt.step()`` minus the value after), not the
  lecture's ``lr * grad``: with AdamW the step is ``lr * m_hat / (sqrt(v_hat) + eps)`` plus
  weight decay, so ``lr * grad`` would not be the update at all. ``data`` is the parameter
  after the step, as in the lecture. A parameter that does not train
  (``requires_grad=False``, no gradient, or an update of exactly zero) is reported as
  *frozen* with no ratio, never as ``-inf``/NaN.

When the run trains on each batch's distinct contexts (``TrainConfig.distinct_rows``, the
``fast`` preset), a recorded step's activation and gradient statistics are over those
distinct rows, each counted once; the census after training counts every example.

Every step it keeps the minibatch train loss (a detached scalar: no sync, no copy), and it
keeps every dev loss the training loop reports through ``on_eval``. Histograms are built
from the tensors of the last recorded step only, when the report is written.

``finalize(model, x_train)`` runs once after training: one eval-mode pass over the whole
training set that counts *dead* units (saturated on every training example) and the
saturation over the set. ``save(dir)`` writes ``diagnostics.json``, the figures and
``index.html``; ``bnfold report DIR`` reads the JSON back (``load_report``/``verdict``).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from bnfold.errors import BnfoldError, first_validation_error
from bnfold.io import jsonsafe
from bnfold.io.files import MiB, atomic_write, read_bounded
from bnfold.io.jsonsafe import json_safe
from bnfold.mlp.data import distinct_contexts

FORMAT = "bnfold-diagnostics"
FORMAT_VERSION = 1
SATURATION = 0.97  # |tanh| above this counts as saturated (the lecture's threshold)
GUIDE_LOG10 = -3.0  # the lecture's ~1e-3 update:data guide line
FAR_DECADES = 1.0  # "far from 1e-3": median log10 ratio outside [-4, -2]
LECTURE_SATURATION = 0.05  # the lecture's rule of thumb: ~5% saturated or less
# Gradient flow counts as healthy while every Tanh layer's mean gradient std is within this
# factor of the last layer's (no vanishing or exploding gradient through the stack).
FLOW_FACTOR = 10.0
DEAD_SHARE = 0.10  # a layer with more than this share of dead units is unhealthy
# What saturation costs this model, measured (benchmarks/saturation_sweep.py, `fast` preset,
# seeds 42 and 1337; benchmarks/results/saturation_sweep.txt). BatchNorm re-centres and
# re-scales every layer's input, so a saturated tanh still passes gradient on the examples
# where it is not saturated; the sweep found no vanishing gradient and no dead unit at the
# default's ~50%, and lowering saturation by decaying the BN gains cost dev loss.
SATURATION_EVIDENCE = (
    "measured on the default model, saturation ~48% gives dev 2.075 with no vanishing"
    " gradient and no dead unit, and pushing it down to ~10% costs 0.010 dev loss, to ~4%"
    " 0.043 (benchmarks/results/saturation_sweep.txt)"
)
# The lecture's 1e-3 update:data guide is for SGD over 200,000 steps; a 500-step AdamW run
# must move faster. Measured on the default model by changing --lr alone:
UPDATE_RATIO_EVIDENCE = (
    "measured on the default model (fast preset, 500 AdamW steps), only lr 0.006 and 0.02"
    " keep every ratio within a decade of 1e-3, and they end at dev 2.1333 and 2.0803, against"
    " 2.0726 at lr 0.04 and 2.0747 at the default 0.06"
    " (benchmarks/results/update_ratio_sweep.txt)"
)
HIST_BINS = 60
REPORT_JSON = "diagnostics.json"
MAX_REPORT_BYTES = 256 * MiB  # the default run's diagnostics.json is 0.2 MB
UPDATE_RATIO_DEFINITION = (
    "log10(std(actual change of the parameter in the step) / std(parameter after the step)); "
    "the actual change is measured (not lr*grad) because AdamW rescales the gradient"
)


def default_interval(steps: int, records: int = 100) -> int:
    """Record about ``records`` times over a run of ``steps`` steps."""
    return max(1, steps // records)


def default_eval_interval(steps: int, evals: int = 10) -> int:
    return max(1, steps // evals)


def tanh_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's Tanh modules with their qualified names, in forward order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Tanh)]


def _std(t: torch.Tensor) -> torch.Tensor:
    return t.std() if t.numel() > 1 else t.new_zeros(())


# ---------------------------------------------------------------- statistics (pure) --


def activation_stats(t: torch.Tensor, threshold: float = SATURATION) -> dict:
    """Mean, std and saturation (share of ``|t| > threshold``) of a Tanh output."""
    t = t.detach().float()
    mean, std, sat = torch.stack([t.mean(), _std(t), (t.abs() > threshold).float().mean()]).tolist()
    return {"mean": mean, "std": std, "saturation": sat}


def gradient_stats(g: torch.Tensor) -> dict:
    g = g.detach().float()
    mean, std = torch.stack([g.mean(), _std(g)]).tolist()
    return {"mean": mean, "std": std}


def is_frozen(p: torch.Tensor) -> bool:
    """No gradient reaches the parameter (``requires_grad=False`` or unused)."""
    return not p.requires_grad or p.grad is None


def weight_grad_stats(p: torch.Tensor) -> dict:
    """The lecture's per-weight line: grad mean, grad std and grad:data = std(grad)/std(w).

    A parameter without a gradient is ``{"frozen": True}`` with ``None`` statistics.
    """
    if is_frozen(p):
        return {"frozen": True, "grad_mean": None, "grad_std": None, "grad_data_ratio": None}
    g, w = p.grad.detach().float(), p.detach().float()
    mean, gstd, wstd = torch.stack([g.mean(), _std(g), _std(w)]).tolist()
    ratio = gstd / wstd if wstd > 0 else None
    return {"frozen": False, "grad_mean": mean, "grad_std": gstd, "grad_data_ratio": ratio}


def update_ratio(before: torch.Tensor, after: torch.Tensor) -> dict:
    """``log10(std(after - before) / std(after))`` of one step's actual update.

    An update of exactly zero means the parameter did not train: ``{"frozen": True,
    "log10": None}`` (the ratio would be ``-inf``). A parameter whose values are all equal
    after the step (std 0) has no defined ratio: ``log10`` is ``None``, not frozen.
    """
    after = after.detach().float()
    delta = after - before.detach().float()
    ustd, dstd, moved = torch.stack([_std(delta), _std(after), delta.abs().max()]).tolist()
    if moved == 0:
        return {"frozen": True, "log10": None}
    if dstd == 0 or ustd == 0:  # constant parameter, or a uniform shift of all its values
        return {"frozen": False, "log10": None}
    return {"frozen": False, "log10": math.log10(ustd / dstd)}


def histogram(t: torch.Tensor, bins: int = HIST_BINS, lo=None, hi=None) -> dict:
    """Density histogram ``{"edges": [...], "density": [...]}`` (as the lecture plots)."""
    t = t.detach().float().flatten()
    lo = float(t.min()) if lo is None else lo
    hi = float(t.max()) if hi is None else hi
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5  # constant tensor: one visible bar, not a crash
    counts = torch.histc(t, bins, lo, hi)
    width = (hi - lo) / bins
    density = counts / max(float(counts.sum()) * width, 1e-30)
    edges = torch.linspace(lo, hi, bins + 1)
    return {"edges": _round(edges.tolist()), "density": _round(density.tolist())}


@torch.no_grad()
def saturation_census(
    model: nn.Module, x: torch.Tensor, threshold: float = SATURATION, chunk: int = 65536
) -> dict:
    """One eval-mode pass over ``x``: per Tanh layer, the units saturated on *every*
    example (dead: their gradient is ~0 whatever the input) and the saturated share.

    In eval mode the network is a fixed function of the context, so the pass runs over the
    *distinct* contexts only (a few thousand of the ~180k training examples of names.txt),
    each weighted by how often it occurs: same answer, a fraction of the work.
    """
    layers = tanh_layers(model)
    n = len(x)
    if n:
        x, inverse = distinct_contexts(x)
        weight = torch.bincount(inverse, minlength=len(x))
    always = [None] * len(layers)
    counts = [0.0] * len(layers)
    offset = [0]

    def hook(i):
        def fn(module, inputs, out):
            sat = out.abs() > threshold
            rows = sat.all(0)
            always[i] = rows if always[i] is None else always[i] & rows
            w = weight[offset[0] : offset[0] + len(out)]
            counts[i] += float(w.to(out.dtype) @ sat.sum(1).to(out.dtype))

        return fn

    handles = [m.register_forward_hook(hook(i)) for i, (_, m) in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(x), chunk):
            offset[0] = i
            model(x[i : i + chunk])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    out = []
    for (name, _), dead, c in zip(layers, always, counts, strict=True):
        units = 0 if dead is None else dead.numel()
        dead_idx = [] if dead is None else dead.nonzero().flatten().tolist()
        share = c / (n * units) if n and units else 0.0
        out.append({"module": name, "units": units, "dead": dead_idx, "saturation": share})
    return {"examples": n, "distinct": len(x), "threshold": threshold, "layers": out}


def _round(xs: list[float], digits: int = 6) -> list[float]:
    return [float(f"{x:.{digits}g}") for x in xs]


# ---------------------------------------------------------------------- observers --


class Observers:
    """Fan one training loop's observer calls out to several observers."""

    def __init__(self, *observers):
        self.observers = [o for o in observers if o is not None]

    def before_step(self, step, model):
        for o in self.observers:
            o.before_step(step, model)

    def after_backward(self, step, model, loss):
        for o in self.observers:
            o.after_backward(step, model, loss)

    def after_update(self, step, model, lr):
        for o in self.observers:
            o.after_update(step, model, lr)

    def on_eval(self, step, split, loss):
        for o in self.observers:
            o.on_eval(step, split, loss)


class Diagnostics:
    """A ``TrainObserver`` recording the lecture's statistics every ``interval`` steps."""

    def __init__(self, interval: int = 100, threshold: float = SATURATION, bins: int = HIST_BINS):
        if interval < 1:
            raise BnfoldError("diagnostics interval must be >= 1")
        self.interval, self.threshold, self.bins = interval, threshold, bins
        self.losses: list[torch.Tensor] = []  # every step, detached 0-d tensors
        self.evals: list[dict] = []
        self.steps: list[int] = []
        self.lrs: list[float] = []
        self.layers: list[dict] = []  # per Tanh layer: name + per-record series
        self.weights: dict[str, dict] = {}  # 2-D parameters: grad series
        self.updates: dict[str, dict] = {}  # every parameter: update-ratio series
        self.census: dict | None = None
        self.fold: dict | None = None
        self.last: dict = {}  # tensors of the last recorded step, for the histograms
        self._hooks: list = []
        self._acts: dict[int, torch.Tensor] = {}
        self._grads: dict[int, torch.Tensor] = {}
        self._before: dict[str, torch.Tensor] = {}
        self._wstats: dict[str, dict] = {}

    def recording(self, step: int) -> bool:
        return step % self.interval == 0

    # -- TrainObserver ------------------------------------------------------------------

    def before_step(self, step: int, model: nn.Module) -> None:
        if not self.recording(step):
            return
        self._remove_hooks()
        self._acts, self._grads = {}, {}
        for i, (_, m) in enumerate(tanh_layers(model)):
            self._hooks.append(m.register_forward_hook(self._capture(i)))

    def _capture(self, i: int):
        def hook(module, inputs, out):
            self._acts[i] = out.detach()
            if out.requires_grad:

                def keep_grad(g, i=i):
                    self._grads[i] = g.detach()

                out.register_hook(keep_grad)

        return hook

    def after_backward(self, step: int, model: nn.Module, loss: torch.Tensor) -> None:
        self.losses.append(loss.detach())
        if not self.recording(step):
            return
        self._remove_hooks()
        self._wstats = {}
        self._before = {}
        for name, p in model.named_parameters():
            if p.ndim == 2:
                self._wstats[name] = weight_grad_stats(p)
            self._before[name] = p.detach().clone()
        self.last = {
            "step": step,
            "acts": dict(self._acts),
            "grads": dict(self._grads),
            "wgrads": {
                n: p.grad.detach().clone()
                for n, p in model.named_parameters()
                if p.ndim == 2 and not is_frozen(p)
            },
        }

    def after_update(self, step: int, model: nn.Module, lr: float) -> None:
        self._remove_hooks()
        if not self._before:
            return
        names = [n for n, _ in tanh_layers(model)]
        if not self.layers:
            self.layers = [{"module": n} for n in names]
        for i, layer in enumerate(self.layers):
            a, g = self._acts.get(i), self._grads.get(i)
            s = activation_stats(a, self.threshold) if a is not None else {}
            gs = gradient_stats(g) if g is not None else {}
            for key in ("mean", "std", "saturation"):
                layer.setdefault(key, []).append(s.get(key))
            layer.setdefault("grad_mean", []).append(gs.get("mean"))
            layer.setdefault("grad_std", []).append(gs.get("std"))
        for name, p in model.named_parameters():
            if name in self._wstats:
                w = self.weights.setdefault(name, {"shape": list(p.shape)})
                for key, value in self._wstats[name].items():
                    w.setdefault(key, []).append(value)
            u = self.updates.setdefault(name, {"shape": list(p.shape)})
            if not p.requires_grad:
                r = {"frozen": True, "log10": None}
            else:
                r = update_ratio(self._before[name], p)
            u.setdefault("log10", []).append(r["log10"])
            u.setdefault("frozen", []).append(r["frozen"])
        self.steps.append(step)
        self.lrs.append(lr)
        self._before, self._wstats = {}, {}

    def on_eval(self, step: int, split: str, loss: float) -> None:
        self.evals.append({"step": step, "split": split, "loss": float(loss)})

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- after training -----------------------------------------------------------------

    def finalize(self, model: nn.Module, x_train: torch.Tensor) -> None:
        """Dead units and saturation over the whole training set (eval mode, one pass)."""
        self.census = saturation_census(model, x_train, self.threshold)

    def to_dict(self) -> dict:
        snapshot = {"step": self.last.get("step")}
        acts, grads = self.last.get("acts", {}), self.last.get("grads", {})
        snapshot["layers"] = [
            {
                "act_hist": histogram(acts[i], self.bins, -1.0, 1.0) if i in acts else None,
                "grad_hist": histogram(grads[i], self.bins) if i in grads else None,
            }
            for i in range(len(self.layers))
        ]
        snapshot["weights"] = {
            n: histogram(g, self.bins) for n, g in self.last.get("wgrads", {}).items()
        }
        losses = torch.stack(self.losses).tolist() if self.losses else []
        for i, layer in enumerate(self.layers):
            layer["name"] = f"layer {i + 1} (Tanh)"
        return json_safe(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "saturation_threshold": self.threshold,
                "interval": self.interval,
                "update_ratio_definition": UPDATE_RATIO_DEFINITION,
                "train_loss": _round(losses),
                "evals": self.evals,
                "steps": self.steps,
                "lr": _round(self.lrs),
                "layers": self.layers,
                "weights": self.weights,
                "updates": self.updates,
                "snapshot": snapshot,
                "census": self.census,
                "fold_comparison": self.fold,
            }
        )

    def save(self, report_dir: str | Path, meta: dict | None = None, figures=True) -> Path:
        """Write ``diagnostics.json``, the figures and ``index.html``; returns the index."""
        report = self.to_dict()
        if meta:
            report["meta"] = meta
        return write_report(report, report_dir, figures=figures)


# ------------------------------------------------------------- pipeline glue --


def attach_diagnostics(cfg, observer=None, interval: int | None = None):
    """``(diagnostics, observer, cfg)`` for a run that writes a report: a ``Diagnostics``
    recording every ``interval`` steps (default ~200 records), combined with ``observer``
    if one is given, and ``cfg`` with ~20 periodic dev evaluations unless it asks for some.
    """
    from dataclasses import replace

    diagnostics = Diagnostics(interval=interval or default_interval(cfg.steps))
    if not cfg.eval_interval:
        cfg = replace(cfg, eval_interval=default_eval_interval(cfg.steps))
    combined = Observers(observer, diagnostics) if observer is not None else diagnostics
    return diagnostics, combined, cfg


def write_training_report(
    diagnostics: Diagnostics,
    model: nn.Module,
    data,
    report_dir: str | Path,
    meta=None,
    figures: bool = True,
) -> Path:
    """After training: the dead-unit census over ``data``'s train split, the report files,
    and, when ``bnfold.fold.modules`` is available, the BN-vs-folded comparison figure. With
    ``figures=False`` only ``diagnostics.json`` and the index are written; the figures can
    be drawn later from the saved files (:func:`start_report_figures`)."""
    diagnostics.finalize(model, data.splits["train"][0])
    index = diagnostics.save(report_dir, meta=meta, figures=figures)
    folded = _fold_or_none(model) if figures else None
    if folded is not None:
        index = add_fold_comparison(report_dir, model, folded)
    return index


def render_report_figures(report_dir: str | Path, bn_checkpoint: str | Path) -> Path:
    """Draw the figures of a report saved with ``figures=False``, from its files alone:
    ``diagnostics.json`` and the BN checkpoint the run wrote."""
    from bnfold.mlp.checkpoint import load_checkpoint

    report = load_report(report_dir)
    index = write_report(report, report_dir)
    model = load_checkpoint(bn_checkpoint).model
    folded = _fold_or_none(model)
    return add_fold_comparison(report_dir, model, folded) if folded is not None else index


def start_report_figures(report_dir: str | Path, bn_checkpoint: str | Path) -> subprocess.Popen:
    """:func:`render_report_figures` in a child process (one torch thread), so that the
    main job folds, verifies and exports on one core while the figures (~2.5 s of CPU,
    matplotlib's import included) are drawn on the other. Wait with
    :func:`finish_report_figures`."""
    code = (
        "import sys; from bnfold.report.diagnostics import render_report_figures as r; "
        "r(*sys.argv[1:])"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code, str(report_dir), str(bn_checkpoint)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=_die_with_parent(os.getpid()) if sys.platform == "linux" else None,
    )


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent: int):
    """A ``preexec_fn`` that has the kernel SIGKILL the child when the thread that started
    it dies, however it dies (SIGKILL included, when no ``finally`` runs): the figures of a
    killed run must not go on writing into its staging folder. If the parent died before
    the request took effect, the child exits at once. (Best effort: where prctl is refused,
    e.g. by a seccomp filter, the figures are still drawn.)"""

    def arm() -> None:
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)  # orphaned before the request took effect: draw nothing

    return arm


def finish_report_figures(proc: subprocess.Popen, report_dir: str | Path) -> None:
    """Wait for :func:`start_report_figures`; its failure is ours (one error line)."""
    _, err = proc.communicate()
    if proc.returncode:
        last = (err or b"").decode("utf-8", "replace").strip().splitlines()[-1:] or ["?"]
        raise BnfoldError(
            f"{report_dir}: drawing the report's figures failed ({last[0]}); the models"
            " are written, the report has no figures"
        )


def _fold_or_none(model: nn.Module):
    try:
        from bnfold.fold.modules import fold_batchnorm
    except ImportError:  # the folding module is optional for a training report
        return None
    folded, report = fold_batchnorm(model)
    if getattr(folded, "config", None) is None or folded.config.batchnorm:
        return None  # not every BN folded: nothing like-for-like to compare
    return folded


# ------------------------------------------------------------------- report files --


def write_report(report: dict, report_dir: str | Path, extra_figures=(), figures=True) -> Path:
    """Render the figures of ``report`` into ``report_dir`` and write JSON + index
    (``figures=False``: JSON and index only, matplotlib not even imported)."""
    out = Path(report_dir)
    if out.exists() and not out.is_dir():
        raise BnfoldError(f"{out}: exists and is not a directory (give a report directory)")
    out.mkdir(parents=True, exist_ok=True)
    if figures:
        from bnfold.report import plots  # matplotlib is only imported when figures are drawn

        figures = plots.training_figures(report, out)
    else:
        figures = []
    figures.extend(extra_figures)
    report["figures"] = figures
    _write_json(report, out / REPORT_JSON)
    return write_index(report, out)


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _write_json(report: dict, path: Path) -> None:
    _write_text(path, jsonsafe.dumps(report))


class _Strict(BaseModel):
    # strict: "0.5" is not a number and 1 is not a bool; other keys are kept as they are
    model_config = ConfigDict(strict=True, extra="allow")


class _LayerSeries(_Strict):
    saturation: list[float | None] = []


class _UpdateSeries(_Strict):
    shape: list[int] = []
    log10: list[float | None] = []
    frozen: list[bool] = []


class _Eval(_Strict):
    step: int
    split: str
    loss: float | None


class _CensusLayer(_Strict):
    units: int
    dead: list[int]
    saturation: float


class _Census(_Strict):
    examples: int
    layers: list[_CensusLayer] = Field(min_length=1)


class _FoldComparison(_Strict):
    contexts: int
    domain: str
    max_abs_logit_diff: float


class _Figure(_Strict):
    file: str
    caption: str


class _ReportFile(_Strict):
    """The parts of ``diagnostics.json`` that ``bnfold report`` and the index page read."""

    format: Literal["bnfold-diagnostics"]
    format_version: Literal[1]
    interval: int | None = None
    saturation_threshold: float | None = None
    train_loss: list[float | None] = []
    evals: list[_Eval] = []
    steps: list[int] = []
    layers: list[_LayerSeries] = []
    updates: dict[str, _UpdateSeries] = {}
    census: _Census | None = None
    fold_comparison: _FoldComparison | None = None
    figures: list[_Figure] = []


def load_report(report_dir: str | Path) -> dict:
    d = Path(report_dir)
    path = d / REPORT_JSON if d.is_dir() else d
    if not path.exists():
        raise BnfoldError(
            f"{path}: no such report (write one with `bnfold train --report {report_dir}`)"
        )
    raw = read_bounded(path, MAX_REPORT_BYTES, "a diagnostics report")
    try:
        report = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BnfoldError(f"{path}: not a readable diagnostics report: {e}") from None
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        raise BnfoldError(f"{path}: not a bnfold diagnostics report (no '{FORMAT}' marker)")
    if report.get("format_version") != FORMAT_VERSION:
        raise BnfoldError(
            f"{path}: report format version {report.get('format_version')!r} is not supported"
        )
    try:
        _ReportFile.model_validate(report)
    except ValidationError as e:
        raise BnfoldError(
            f"{path}: malformed diagnostics report: {first_validation_error(e)}"
        ) from None
    return report


def add_fold_comparison(report_dir: str | Path, bn_model: nn.Module, folded: nn.Module) -> Path:
    """Add the BN-vs-folded comparison (figure + numbers) to a saved report."""
    from bnfold.report import plots

    out = Path(report_dir)
    report = load_report(out)
    stats, figure = plots.fold_comparison_figure(bn_model, folded, out)
    report["fold_comparison"] = stats
    report["figures"] = [f for f in report.get("figures", []) if f["file"] != figure["file"]]
    report["figures"].append(figure)
    _write_json(report, out / REPORT_JSON)
    return write_index(report, out)


def write_index(report: dict, out: Path) -> Path:
    import html

    lines = verdict_lines(report)
    items = "\n".join(
        f'<figure><img src="{html.escape(f["file"])}" alt="{html.escape(f["caption"])}">'
        f"<figcaption>{html.escape(f['caption'])}</figcaption></figure>"
        for f in report.get("figures", [])
    )
    summary = "\n".join(f"<li>{html.escape(line)}</li>" for line in lines)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>bnfold training report</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; }}
figure {{ margin: 2em 0; }} img {{ max-width: 100%; border: 1px solid #ddd; }}
figcaption {{ color: #444; margin-top: .3em; }}
</style></head><body>
<h1>bnfold training report</h1>
<ul>
{summary}
</ul>
<p><a href="{REPORT_JSON}">{REPORT_JSON}</a> holds every number behind these figures.</p>
{items}
</body></html>
"""
    path = out / "index.html"
    _write_text(path, page)
    return path


# ------------------------------------------------------------------------ verdict --


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2


def verdict(report: dict) -> dict:
    """The numbers behind ``bnfold report``: saturation, update ratios, dead units, fold."""
    layers = report.get("layers", [])
    steps = report.get("steps", [])
    census = report.get("census")
    sat_last = []
    for layer in layers:
        vals = [v for v in layer.get("saturation", []) if v is not None]
        sat_last.append(vals[-1] if vals else None)
    worst = None
    if census:
        i = max(range(len(census["layers"])), key=lambda k: census["layers"][k]["saturation"])
        worst = {"layer": i + 1, "saturation": census["layers"][i]["saturation"], "on": "train set"}
    elif any(s is not None for s in sat_last):
        i = max((k for k, s in enumerate(sat_last) if s is not None), key=lambda k: sat_last[k])
        on = f"batch at step {steps[-1]}" if steps else "the last recorded batch"
        worst = {"layer": i + 1, "saturation": sat_last[i], "on": on}
    far, frozen = [], []
    for name, u in report.get("updates", {}).items():
        vals = [v for v in u.get("log10", []) if v is not None]
        if u.get("frozen") and all(u["frozen"]):
            frozen.append(name)
            continue
        # Judged like the lecture: the 2-D weights. A BatchNorm gain sits near 1 in every
        # unit, so std(data) is a spread, not a scale, and its ratio is not comparable.
        if not vals or len(u.get("shape", [])) != 2:
            continue
        med = _median(vals)
        if abs(med - GUIDE_LOG10) > FAR_DECADES:
            far.append(
                {
                    "param": name,
                    "shape": u.get("shape"),
                    "median_log10": med,
                    "direction": "too slow" if med < GUIDE_LOG10 else "too fast",
                }
            )
    dead = None
    if census:
        dead = [
            {"layer": i + 1, "dead": len(lay["dead"]), "units": lay["units"]}
            for i, lay in enumerate(census["layers"])
        ]
    evals = [e for e in report.get("evals", []) if e.get("split") == "dev"]
    return {
        "gradient_flow": gradient_flow(layers),
        "steps": len(report.get("train_loss", [])),
        "records": len(steps),
        "final_dev_loss": evals[-1]["loss"] if evals else None,
        "saturation_last_step": sat_last,
        "worst_saturation": worst,
        "update_ratio_far": far,
        "frozen": frozen,
        "dead_units": dead,
        "examples": census["examples"] if census else None,
        "fold": report.get("fold_comparison"),
    }


def gradient_flow(layers: list[dict]) -> dict | None:
    """Per Tanh layer, the mean over recorded steps of the std of the loss gradient at its
    output, and each layer's ratio to the last layer's (1 = the gradient neither vanishes
    nor explodes on its way down the stack)."""
    means = []
    for layer in layers:
        vals = [g for g in layer.get("grad_std", []) if g is not None]
        means.append(sum(vals) / len(vals) if vals else None)
    if not means or any(m is None for m in means) or not means[-1]:
        return None
    ratios = [m / means[-1] for m in means]
    healthy = all(1 / FLOW_FACTOR <= r <= FLOW_FACTOR for r in ratios)
    return {"grad_std": means, "ratio_to_last": ratios, "healthy": healthy}


def saturation_verdict(v: dict) -> str:
    """Saturation judged by what it does here (gradient flow, dead units), not by the
    lecture's ~5% rule alone: see SATURATION_EVIDENCE."""
    w, flow, dead = v["worst_saturation"], v["gradient_flow"], v["dead_units"]
    if w["saturation"] < LECTURE_SATURATION:
        return "ok"
    dead_layers = [d for d in dead or [] if d["units"] and d["dead"] / d["units"] > DEAD_SHARE]
    if dead_layers:
        return (
            "unhealthy: more than 10% dead units in layer"
            f" {', '.join(str(d['layer']) for d in dead_layers)}"
        )
    if flow is None:
        return "above the lecture's ~5% (no gradient statistics recorded to judge it by)"
    if not flow["healthy"]:
        worst = min(flow["ratio_to_last"])
        return (
            "unhealthy: the gradient vanishes down the stack (layer gradient std down to"
            f" {worst:.2g}x the last layer's)"
        )
    spread = f"{min(flow['ratio_to_last']):.2f}-{max(flow['ratio_to_last']):.2f}"
    return (
        "above the lecture's ~5%, but harmless here: the gradient reaches every layer"
        f" (gradient std {spread}x the last layer's) and no layer has dead units; "
        + SATURATION_EVIDENCE
    )


def update_ratio_verdict(v: dict, report: dict) -> str:
    """Why weights flagged "too fast" are expected in a short AdamW run whose gradient flows
    (see UPDATE_RATIO_EVIDENCE); empty when that does not apply."""
    train_config = (report.get("meta") or {}).get("train_config") or {}
    flow = v["gradient_flow"]
    if (
        train_config.get("optimizer") != "adamw"
        or any(f["direction"] != "too fast" for f in v["update_ratio_far"])
        or flow is None
        or not flow["healthy"]
    ):
        return ""
    return (
        ": expected for a short AdamW schedule whose gradient reaches every layer, not a"
        " fault; " + UPDATE_RATIO_EVIDENCE
    )


def verdict_lines(report: dict) -> list[str]:
    v = verdict(report)
    dev = f", final dev loss {v['final_dev_loss']:.4f}" if v["final_dev_loss"] is not None else ""
    lines = [
        f"{v['steps']} training steps, statistics recorded at {v['records']} steps"
        f" (every {report.get('interval')}){dev}"
    ]
    w = v["worst_saturation"]
    if w:
        verdict_word = saturation_verdict(v)
        lines.append(
            f"worst saturation: layer {w['layer']} at {100 * w['saturation']:.1f}%"
            f" (|tanh| > {report.get('saturation_threshold')}, {w['on']}): {verdict_word}"
        )
    if v["update_ratio_far"]:
        parts = [
            f"{f['param']} {tuple(f['shape'])} {10 ** f['median_log10']:.0e} ({f['direction']})"
            for f in v["update_ratio_far"]
        ]
        lines.append(
            "update:data ratio far from 1e-3 (median over recorded steps off by more than a"
            " decade): " + "; ".join(parts) + update_ratio_verdict(v, report)
        )
    elif report.get("updates"):
        lines.append("update:data ratio: every trained 2-D weight's median within a decade of 1e-3")
    if v["frozen"]:
        lines.append("frozen (never updated): " + ", ".join(v["frozen"]))
    if v["dead_units"] is not None:
        total = sum(d["dead"] for d in v["dead_units"])
        if total:
            per = ", ".join(
                f"layer {d['layer']}: {d['dead']}/{d['units']}"
                for d in v["dead_units"]
                if d["dead"]
            )
            lines.append(f"dead neurons (saturated on all {v['examples']:,} train examples): {per}")
        else:
            lines.append(f"dead neurons: none (checked on all {v['examples']:,} train examples)")
    f = v["fold"]
    if f:
        lines.append(
            f"folded vs BN network: max |logit difference| {f['max_abs_logit_diff']:.2e}"
            f" over {f['contexts']:,} contexts ({f['domain']})"
        )
    return lines
