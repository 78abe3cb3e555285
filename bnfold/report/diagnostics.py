"""Training diagnostics: the makemore lecture's health statistics, recorded cheaply.

``Diagnostics`` is a ``TrainObserver``. Every ``interval`` steps (the *recorded* steps) it
records, as in the lecture:

- per Tanh layer: activation mean/std and the *batch saturation* (share of
  ``|tanh| > 0.97`` over that step's train-mode batch), and the mean/std of the loss gradient
  at the Tanh output (a tensor hook, installed only on recorded steps);
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
``fast`` preset), a recorded step's activation statistics weight each distinct row by how
often its context occurs in the batch (``on_batch``), so they count every example as the
censuses do; its gradient statistics are over those distinct rows, each counted once (a
row's gradient is the sum over the examples that share its context).

Every step it keeps the minibatch train loss (a detached scalar: no sync, no copy), and it
keeps every dev loss the training loop reports through ``on_eval``. The gradient histograms
are built from the tensors of two recorded steps, the first (the initialisation) and the
last, when the report is written.

The report's one saturation figure is the *train-set saturation*: the share of
``|tanh| > 0.97`` over every training example (:func:`saturation_census`). It is measured
twice: by ``on_start`` on the untrained network (each BatchNorm normalising with the
training set's own statistics, as a train-mode pass does; its running statistics hold no
estimate yet) and by ``finalize(model, x_train)`` after training (eval mode, the network as
deployed), which also counts *dead* units (saturated on every training example). The
activation histograms, the saturation image and the verdict all read these two censuses.
``save(dir)`` writes ``diagnostics.json``, the figures and ``index.html``; ``bnfold report
DIR`` reads the JSON back (``load_report``/``verdict``).
"""

from __future__ import annotations

import json
import math
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
from bnfold.report.verdict import (  # noqa: F401  (re-exported: `bnfold report` reads them here)
    BATCH_SATURATION,
    SATURATION_MEASURE,
    verdict,
    verdict_items,
    verdict_lines,
)

FORMAT = "bnfold-diagnostics"
FORMAT_VERSION = 1
SATURATION = 0.97  # |tanh| above this counts as saturated (the lecture's threshold)
HIST_BINS = 60
# Gradient histograms span +-(this quantile of |gradient|): a few outliers must not squeeze
# the bulk of the distribution into one bin (the default run's spread is ~3e-5, its extreme
# values ~50x that). The share left outside is recorded with the histogram.
ROBUST_QUANTILE = 0.995
PANEL_QUANTILE = 0.99  # per curve, when several share one axis (see panel_limit)
SNAPSHOT_BINS = 120  # gradient histograms: a narrow curve on a shared axis keeps its shape
IMAGE_EXAMPLES = 64  # training examples (rows) in the saturation image, a fixed sample
IMAGE_SEED = 0
REPORT_JSON = "diagnostics.json"
# every file a report folder may get (the figures a run draws depend on what it recorded):
# train-fold checks each name before training, so no commit can fail half-way on one
REPORT_FILES = (
    REPORT_JSON,
    "index.html",
    "loss.png",
    "saturation.png",
    "activations.png",
    "saturation_image.png",
    "gradients.png",
    "weight_gradients.png",
    "update_ratio.png",
    "fold_comparison.png",
)
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


def module_labels(model: nn.Module) -> dict[str, str]:
    """The report's name for every module that holds parameters: ``embedding``, ``layer N``
    (the modules up to and including the N-th Tanh) or ``output`` (after the last Tanh).
    The N-th Tanh is ``layer N`` too: one name per block, in every figure and sentence."""
    n_tanh = len(tanh_layers(model))
    labels, seen = {}, 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Tanh):
            seen += 1
        elif isinstance(m, nn.Embedding):
            labels[name] = "embedding"
        elif next(m.parameters(recurse=False), None) is not None:
            labels[name] = f"layer {seen + 1}" if seen < n_tanh else "output"
    return labels


def parameter_labels(model: nn.Module) -> dict[str, str]:
    """``{"net.3.weight": "layer 2 Linear", "net.4.weight": "layer 2 BN gain", ...}``."""
    blocks = module_labels(model)
    labels = {}
    for mname, m in model.named_modules():
        if mname not in blocks:
            continue
        for pname, _ in m.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if isinstance(m, nn.Embedding):
                labels[full] = "embedding"
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                labels[full] = f"{blocks[mname]} BN {'gain' if pname == 'weight' else pname}"
            elif isinstance(m, nn.Linear):
                labels[full] = f"{blocks[mname]} Linear" + ("" if pname == "weight" else " bias")
            else:
                labels[full] = f"{blocks[mname]} {type(m).__name__}.{pname}"
    return labels


def _std(t: torch.Tensor) -> torch.Tensor:
    return t.std() if t.numel() > 1 else t.new_zeros(())


# ---------------------------------------------------------------- statistics (pure) --


def activation_stats(
    t: torch.Tensor, threshold: float = SATURATION, row_weight: torch.Tensor | None = None
) -> dict:
    """Mean, std and saturation (share of ``|t| > threshold``) of a Tanh output; with
    ``row_weight``, row ``j`` counts ``row_weight[j]`` times (std: the population std)."""
    t = t.detach().float()
    if row_weight is None:
        sat = (t.abs() > threshold).float().mean()
        mean, std, sat = torch.stack([t.mean(), _std(t), sat]).tolist()
        return {"mean": mean, "std": std, "saturation": sat}
    w = row_weight.to(t.dtype) / (row_weight.sum() * t[0].numel())
    mean = w @ t.flatten(1).sum(1)
    var = w @ ((t - mean) ** 2).flatten(1).sum(1)
    sat = w @ (t.abs() > threshold).flatten(1).sum(1).to(t.dtype)
    mean, std, sat = torch.stack([mean, var.sqrt(), sat]).tolist()
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
    """Density histogram over ``[lo, hi]`` (default: the data's range), as the lecture plots.

    ``{"edges", "density", "outside"}``: the density is relative to *every* value, so the
    curve's area is the share inside the range and ``outside`` the share beyond it.
    """
    t = t.detach().float().flatten()
    if t.numel() == 0:
        lo, hi = -1.0, 1.0
    lo = float(t.min()) if lo is None else float(lo)
    hi = float(t.max()) if hi is None else float(hi)
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5  # constant tensor: one visible bar, not a crash
    counts = torch.histogram(t, bins=bins, range=(lo, hi)).hist
    return _density(counts, lo, hi, float(t.numel()))


def _density(counts: torch.Tensor, lo: float, hi: float, total: float) -> dict:
    width = (hi - lo) / len(counts)
    density = counts / max(total * width, 1e-30)
    outside = 1 - float(counts.sum()) / total if total else 0.0
    edges = torch.linspace(lo, hi, len(counts) + 1)
    return {
        "edges": _round(edges.tolist()),
        "density": _round(density.tolist()),
        "outside": max(0.0, round(outside, 6)),
    }


def robust_limit(tensors, q: float = ROBUST_QUANTILE) -> float:
    """The ``q``-quantile of ``|value|`` over all ``tensors``: ``+-limit`` holds all but
    ``1 - q`` of the values. Falls back to the largest ``|value|`` when the quantile is 0,
    and to 1 when there are no values (never an empty axis)."""
    parts = [t.detach().float().abs().flatten() for t in tensors]
    vals = torch.cat(parts) if parts else torch.zeros(0)
    if vals.numel() == 0:
        return 1.0
    k = min(vals.numel(), max(1, math.ceil(q * vals.numel())))
    limit = float(vals.kthvalue(k).values)
    if limit <= 0:
        limit = float(vals.max())
    return limit if limit > 0 else 1.0


def panel_limit(tensors, q: float = PANEL_QUANTILE) -> float:
    """One symmetric axis ``+-limit`` for several distributions drawn together: the widest
    of their :func:`robust_limit` at ``q``, so every curve keeps all but ``1 - q`` of its
    values on the axis while a handful of outliers cannot stretch it."""
    return max((robust_limit([t], q) for t in tensors), default=1.0)


def _dataset_norm(weight: torch.Tensor):
    """A BatchNorm forward hook that normalises with the (``weight``-ed) statistics of its
    input rows, as train mode does on one batch, but leaves the running statistics alone."""

    def hook(bn, inputs, out):
        h = inputs[0]
        w = (weight / weight.sum()).to(h.dtype).unsqueeze(0)
        mean = w @ h
        centered = h - mean
        scale = torch.rsqrt(w @ (centered * centered) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        return centered * scale + (bn.bias if bn.bias is not None else 0)

    return hook


@torch.no_grad()
def saturation_census(
    model: nn.Module,
    x: torch.Tensor,
    threshold: float = SATURATION,
    chunk: int = 65536,
    statistics: Literal["running", "dataset"] = "running",
    image_examples: int = IMAGE_EXAMPLES,
    bins: int = HIST_BINS,
) -> dict:
    """One pass over ``x``: per Tanh layer, the *train-set saturation* (share of
    ``|tanh| > threshold`` over every example and unit), the units saturated on *every*
    example (dead: their gradient is ~0 whatever the input), the mean, std and density
    histogram of the outputs, and the lecture's image: ``|tanh| > threshold`` for a fixed
    seeded sample of ``image_examples`` examples (one string of 0/1 per example).

    ``statistics="running"``: eval mode, BatchNorm with its running statistics (the network
    as deployed). ``"dataset"``: each BatchNorm normalises with the statistics of ``x``
    itself, as a train-mode pass over all of ``x`` as one batch would (what a calibration
    pass estimates, to the n/(n-1) of its unbiased variance); the running statistics are
    not touched. That is the honest view of
    an untrained network, whose running statistics hold no estimate yet.

    The network is a fixed function of the context here, so the pass runs over the
    *distinct* contexts only (a few thousand of the ~180k training examples of names.txt),
    each weighted by how often it occurs: same answer, a fraction of the work.
    """
    if statistics not in ("running", "dataset"):
        raise BnfoldError(f"unknown census statistics {statistics!r} (running, dataset)")
    layers = tanh_layers(model)
    n = len(x)
    x, weight, sample = _distinct_with_image_rows(x, image_examples)
    if statistics == "dataset":
        chunk = max(1, len(x))  # the statistics are the whole set's: one pass, one batch
    tallies = [_LayerTally(bins) for _ in layers]
    offset = [0]  # the first row of the chunk running now, for the hooks

    def hook(tally: _LayerTally):
        def fn(module, inputs, out):
            lo = offset[0]
            tally.add(out.float(), weight[lo : lo + len(out)], lo, sample, threshold)

        return fn

    handles = [m.register_forward_hook(hook(t)) for t, (_, m) in zip(tallies, layers, strict=True)]
    if statistics == "dataset":
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        handles += [bn.register_forward_hook(_dataset_norm(weight)) for bn in bns]
    _eval_pass(model, x, chunk, offset, handles)
    return {
        "examples": n,
        "distinct": len(x),
        "threshold": threshold,
        "statistics": statistics,
        "image_examples": len(sample),
        "layers": [t.to_dict(name, n) for (name, _), t in zip(layers, tallies, strict=True)],
    }


def _distinct_with_image_rows(
    x: torch.Tensor, image_examples: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(contexts, weight, sample)``: the distinct rows of ``x``, how often each occurs,
    and for a fixed seeded sample of at most ``image_examples`` examples (in order) the
    distinct row each one is. Empty ``x`` gives itself and two empty tensors."""
    if not len(x):
        return x, torch.zeros(0), torch.zeros(0, dtype=torch.long)
    gen = torch.Generator().manual_seed(IMAGE_SEED)
    pick = torch.randperm(len(x), generator=gen)[:image_examples].sort().values
    contexts, inverse = distinct_contexts(x)
    return contexts, torch.bincount(inverse, minlength=len(contexts)), inverse[pick]


class _LayerTally:
    """One Tanh layer's census, summed chunk by chunk over weighted distinct rows: units
    saturated on every row so far, the weighted saturated count, sum and sum of squares,
    the output histogram on [-1, 1], and the image rows of the sampled examples."""

    def __init__(self, bins: int):
        self.always: torch.Tensor | None = None
        self.sat = self.s1 = self.s2 = 0.0
        self.hist = torch.zeros(bins)
        self.img: torch.Tensor | None = None

    def add(
        self, out: torch.Tensor, w: torch.Tensor, lo: int, sample: torch.Tensor, threshold: float
    ) -> None:
        """A chunk's outputs ``out`` (rows ``lo..``), each row weighted by ``w``."""
        sat = out.abs() > threshold
        rows = sat.all(0)
        self.always = rows if self.always is None else self.always & rows
        w = w.to(out.dtype)
        self.sat += float(w @ sat.sum(1).to(out.dtype))
        self.s1 += float(w @ out.sum(1))
        self.s2 += float(w @ (out * out).sum(1))
        rw = w.unsqueeze(1).expand_as(out).flatten()
        bins = len(self.hist)
        self.hist += torch.histogram(out.flatten(), bins, range=(-1.0, 1.0), weight=rw).hist
        if self.img is None:
            self.img = torch.zeros(len(sample), out.shape[1], dtype=torch.bool)
        here = (sample >= lo) & (sample < lo + len(out))
        self.img[here] = sat[sample[here] - lo]

    def to_dict(self, name: str, n: int) -> dict:
        """The layer's line of the census, over ``n`` examples (duplicates included)."""
        dead = self.always
        units = 0 if dead is None else dead.numel()
        total = n * units
        mean = self.s1 / total if total else 0.0
        var = max(0.0, self.s2 / total - mean * mean) if total else 0.0
        img = [] if self.img is None else self.img
        return {
            "module": name,
            "units": units,
            "dead": [] if dead is None else dead.nonzero().flatten().tolist(),
            "saturation": self.sat / total if total else 0.0,
            "mean": mean,
            "std": math.sqrt(var),
            "act_hist": _density(self.hist, -1.0, 1.0, float(total)),
            "image": ["".join("1" if v else "0" for v in row.tolist()) for row in img],
        }


def _eval_pass(model: nn.Module, x: torch.Tensor, chunk: int, offset: list, handles) -> None:
    """Run ``model`` in eval mode over ``x``, ``chunk`` rows at a time (``offset[0]``: the
    chunk's first row); then restore its mode and remove the hooks ``handles``."""
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


def _round(xs: list[float], digits: int = 6) -> list[float]:
    return [float(f"{x:.{digits}g}") for x in xs]


# ---------------------------------------------------------------------- observers --


class Observers:
    """Fan one training loop's observer calls out to several observers."""

    def __init__(self, *observers):
        self.observers = [o for o in observers if o is not None]

    def on_start(self, model, x_train):
        for o in self.observers:
            start = getattr(o, "on_start", None)  # optional in the TrainObserver protocol
            if start is not None:
                start(model, x_train)

    def on_batch(self, step, x_batch):
        for o in self.observers:
            on_batch = getattr(o, "on_batch", None)  # optional in the TrainObserver protocol
            if on_batch is not None:
                on_batch(step, x_batch)

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
        self.labels: dict[str, dict] = {}  # the report's names of parameters and modules
        self.census_init: dict | None = None
        self.census: dict | None = None
        self.fold: dict | None = None
        self.first: dict = {}  # tensors of the first recorded step (the initialisation)
        self.last: dict = {}  # tensors of the last recorded step
        self._hooks: list = []
        self._acts: dict[int, torch.Tensor] = {}
        self._grads: dict[int, torch.Tensor] = {}
        self._before: dict[str, torch.Tensor] = {}
        self._wstats: dict[str, dict] = {}
        self._batch: tuple[int, torch.Tensor] | None = None  # (examples, distinct counts)

    def recording(self, step: int) -> bool:
        return step % self.interval == 0

    # -- TrainObserver ------------------------------------------------------------------

    def on_start(self, model: nn.Module, x_train: torch.Tensor) -> None:
        """The untrained network's train-set saturation (BatchNorm on the set's own
        statistics: see :func:`saturation_census`)."""
        self._label(model)
        self.census_init = saturation_census(
            model, x_train, self.threshold, statistics="dataset", bins=self.bins
        )

    def _label(self, model: nn.Module) -> None:
        if not self.labels:
            self.labels = {
                "parameters": parameter_labels(model),
                "modules": module_labels(model),
            }

    def on_batch(self, step: int, x_batch: torch.Tensor) -> None:
        """A recorded step's batch: how often each of its distinct contexts occurs, so
        that, when the loop runs on the distinct contexts, the batch saturation still
        counts every example (as the census does), not every distinct context once."""
        if self.recording(step):
            _, inverse = distinct_contexts(x_batch)
            self._batch = (len(x_batch), torch.bincount(inverse))

    def _row_weight(self, rows: int) -> torch.Tensor | None:
        """The distinct contexts' counts when ``rows`` activations are one per distinct
        context of the batch; ``None`` when they are one per example (or unknown)."""
        if self._batch is None:
            return None
        examples, counts = self._batch
        return counts if rows == len(counts) and rows != examples else None

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
            "record": len(self.steps),
            "grads": dict(self._grads),
            "wgrads": {
                n: p.grad.detach().clone()
                for n, p in model.named_parameters()
                if p.ndim == 2 and not is_frozen(p)
            },
        }
        if not self.first:
            self.first = self.last

    def after_update(self, step: int, model: nn.Module, lr: float) -> None:
        self._remove_hooks()
        if not self._before:
            return
        self._label(model)
        names = [n for n, _ in tanh_layers(model)]
        if not self.layers:
            self.layers = [{"module": n} for n in names]
        for i, layer in enumerate(self.layers):
            a, g = self._acts.get(i), self._grads.get(i)
            s = (
                activation_stats(a, self.threshold, self._row_weight(len(a)))
                if a is not None
                else {}
            )
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
        self._before, self._wstats, self._batch = {}, {}, None

    def on_eval(self, step: int, split: str, loss: float) -> None:
        self.evals.append({"step": step, "split": split, "loss": float(loss)})

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- after training -----------------------------------------------------------------

    def finalize(self, model: nn.Module, x_train: torch.Tensor) -> None:
        """Dead units and train-set saturation after training (eval mode, one pass)."""
        self._label(model)
        self.census = saturation_census(model, x_train, self.threshold, bins=self.bins)

    def _snapshot(self, snap: dict) -> dict | None:
        """Histograms of one recorded step's gradients, each panel on one robust axis."""
        if not snap:
            return None
        grads, wgrads = snap["grads"], snap["wgrads"]
        glim, wlim = panel_limit(grads.values()), panel_limit(wgrads.values())
        layers = []
        for i in range(len(self.layers)):
            g = grads.get(i)
            hist = histogram(g, SNAPSHOT_BINS, -glim, glim) if g is not None else None
            layers.append({"grad_hist": hist, **(gradient_stats(g) if g is not None else {})})
        weights = {
            n: {"hist": histogram(g, SNAPSHOT_BINS, -wlim, wlim), **gradient_stats(g)}
            for n, g in wgrads.items()
        }
        return {
            "step": snap["step"],
            "record": snap["record"],
            "layers": layers,
            "weights": weights,
        }

    def to_dict(self) -> dict:
        losses = torch.stack(self.losses).tolist() if self.losses else []
        for i, layer in enumerate(self.layers):
            layer["name"] = f"layer {i + 1} (Tanh)"
        return json_safe(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "saturation_threshold": self.threshold,
                "saturation_measure": SATURATION_MEASURE,
                "interval": self.interval,
                "update_ratio_definition": UPDATE_RATIO_DEFINITION,
                "train_loss": _round(losses),
                "evals": self.evals,
                "steps": self.steps,
                "lr": _round(self.lrs),
                "labels": self.labels,
                "layers": self.layers,
                "weights": self.weights,
                "updates": self.updates,
                "snapshots": {"init": self._snapshot(self.first), "end": self._snapshot(self.last)},
                "census_init": self.census_init,
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
    *,
    folded: nn.Module | None = None,
    measured: dict | None = None,
) -> Path:
    """After training: the dead-unit census over ``data``'s train split, then the report
    (``diagnostics.json``, figures, ``index.html``), each file written once. With
    ``folded`` (``model`` with every BatchNorm folded) the report gains the BN-vs-folded
    figure; ``measured`` holds what the pipeline's walk found for that pair
    (:func:`bnfold.report.plots.fold_comparison_stats`), so the figure judges nothing
    again."""
    diagnostics.finalize(model, data.splits["train"][0])
    report = diagnostics.to_dict()
    if meta:
        report["meta"] = meta
    out = _report_dir(report_dir)
    extra = []
    if folded is not None:
        from bnfold.report import plots

        stats, figure = plots.fold_comparison_figure(model, folded, out, measured=measured)
        report["fold_comparison"] = stats
        extra.append(figure)
    return write_report(report, out, extra_figures=extra)


# ------------------------------------------------------------------- report files --


def write_report(report: dict, report_dir: str | Path, extra_figures=(), figures=True) -> Path:
    """Render the figures of ``report`` into ``report_dir`` and write JSON + index
    (``figures=False``: JSON and index only, matplotlib not even imported)."""
    out = _report_dir(report_dir)
    if figures:
        from bnfold.report import plots  # matplotlib is only imported when figures are drawn

        figures = plots.training_figures(report, out)
    else:
        figures = []
    figures.extend(extra_figures)
    report["figures"] = figures
    _write_json(report, out / REPORT_JSON)
    return write_index(report, out)


def _report_dir(report_dir: str | Path) -> Path:
    """``report_dir``, made if missing; refused when a file is in its place."""
    out = Path(report_dir)
    if out.exists() and not out.is_dir():
        raise BnfoldError(f"{out}: exists and is not a directory (give a report directory)")
    out.mkdir(parents=True, exist_ok=True)
    return out


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


class _Calibration(_Strict):
    dev_loss_before: float | None
    dev_loss_after: float | None
    layers: list[dict] = []


class _Meta(_Strict):
    calibration: _Calibration | None = None


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
    census_init: _Census | None = None
    meta: _Meta | None = None
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


def write_index(report: dict, out: Path) -> Path:
    """``index.html``: the verdict (one sentence per finding, its details folded away
    under ``<details>``), the measures' definitions, then every figure with its caption."""
    import html

    def item(it: dict) -> str:
        details = "".join(f"<p>{html.escape(d)}</p>" for d in it["details"])
        more = f"<details><summary>details</summary>{details}</details>" if details else ""
        return f"<li>{html.escape(it['sentence'])}.{more}</li>"

    summary = "\n".join(item(it) for it in verdict_items(report))
    items = "\n".join(
        f'<figure><img src="{html.escape(f["file"])}" alt="{html.escape(f["caption"])}">'
        f"<figcaption>{html.escape(f['caption'])}</figcaption></figure>"
        for f in report.get("figures", [])
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>bnfold training report</title>
<style>
body {{ font-family: sans-serif; max-width: 1300px; margin: 2em auto; padding: 0 1em; }}
li {{ margin: .4em 0; }} details {{ color: #333; margin: .2em 0 .6em 1em; }}
details p {{ margin: .3em 0; }} summary {{ cursor: pointer; color: #555; }}
figure {{ margin: 2em 0; }} img {{ max-width: 100%; border: 1px solid #ddd; }}
figcaption {{ color: #444; margin-top: .3em; }} dt {{ font-weight: bold; }}
</style></head><body>
<h1>bnfold training report</h1>
<ul>
{summary}
</ul>
<dl>
<dt>Saturation</dt><dd>{html.escape(SATURATION_MEASURE)}; the saturation-over-training
figure also shows the {html.escape(BATCH_SATURATION)}.</dd>
</dl>
<p><a href="{REPORT_JSON}">{REPORT_JSON}</a> holds every number behind these figures.</p>
{items}
</body></html>
"""
    path = out / "index.html"
    _write_text(path, page)
    return path
