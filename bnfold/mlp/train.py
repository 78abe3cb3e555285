"""Training: the lecture's recipe exactly (``lecture``) and a CPU time-to-quality recipe
(``fast``, the default). Deterministic for the same data, config and seed.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Protocol

import click
import torch
import torch.nn.functional as F
from torch import nn

from bnfold.errors import BnfoldError
from bnfold.mlp.checkpoint import non_finite_tensors
from bnfold.mlp.config import PRESETS, TrainConfig, train_config_dict  # noqa: F401 (re-exported)
from bnfold.mlp.data import Dataset, distinct_contexts
from bnfold.mlp.model import MLP, ModelConfig
from bnfold.mlp.threads import torch_threads


class TrainObserver(Protocol):
    """Hooks for diagnostics; every method is optional in spirit (no-ops are fine)."""

    def before_step(self, step: int, model: MLP) -> None: ...
    def after_backward(self, step: int, model: MLP, loss: torch.Tensor) -> None: ...
    def after_update(self, step: int, model: MLP, lr: float) -> None: ...
    def on_eval(self, step: int, split: str, loss: float) -> None: ...
    # Optional: called once before the first step, with the untrained model and the
    # training inputs (the report's view of the network at initialisation).
    def on_start(self, model: MLP, x_train: torch.Tensor) -> None: ...
    # Optional: each step's batch of contexts, before ``before_step`` (when the loop runs
    # on the distinct contexts, their counts weight what the observer sees).
    def on_batch(self, step: int, x_batch: torch.Tensor) -> None: ...


@dataclass
class TrainResult:
    model: MLP
    config: TrainConfig
    steps_done: int
    seconds: float
    interrupted: bool
    losses: torch.Tensor  # per-step train (minibatch) loss
    metrics: dict
    calibration: dict | None = None  # what calibration_pass measured, when it ran

    def summary(self) -> dict:
        extra = {"calibration": self.calibration} if self.calibration is not None else {}
        return {
            **self.metrics,
            **extra,
            "steps": self.steps_done,
            "seconds": round(self.seconds, 3),
            "params": self.model.num_params(),
            "preset": self.config.preset,
            "threads": self.config.threads,
            "interrupted": self.interrupted,
        }


@torch.inference_mode()
def split_loss(model: MLP, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cross-entropy in eval mode (BatchNorm uses its running statistics).

    In eval mode a context's logits do not depend on its batch, and contexts repeat a lot
    (the 182,625 training rows of names.txt hold 5,438 distinct contexts), so the network
    runs once per distinct context: 7x to 30x less work than one row at a time.
    """
    was_training = model.training
    model.eval()
    contexts, inverse = distinct_contexts(x)
    logp = F.log_softmax(model(contexts), dim=-1)
    model.train(was_training)
    return -logp[inverse, y].double().mean().item()


@torch.no_grad()
def calibrate_batchnorm(model: MLP, x: torch.Tensor) -> None:
    """Set every BN's running stats to the exact statistics of the whole training set.

    The lecture's "calibrate the batch norm at the end of training": with momentum=None
    PyTorch keeps a cumulative average, so one train-mode pass over all of ``x`` as a single
    batch stores its mean and (unbiased) variance, each layer seeing inputs normalised by
    the statistics it is about to store.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    was_training = model.training
    model.train()
    model(x)
    for bn, m in zip(bns, saved, strict=True):
        bn.momentum = m
    model.train(was_training)


@torch.no_grad()
def calibration_pass(
    model: MLP, x_train: torch.Tensor, x_dev: torch.Tensor, y_dev: torch.Tensor
) -> dict:
    """:func:`calibrate_batchnorm`, measured: per BatchNorm, how far its running mean moved
    (in running standard deviations, after calibration) and the range of new/old running
    std; and the dev loss before and after (``None`` when the dev split is empty)."""
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm1d)]
    old = [(m.running_mean.clone(), m.running_var.clone()) for _, m in bns]
    has_dev = len(x_dev) > 0
    before = split_loss(model, x_dev, y_dev) if has_dev else None
    calibrate_batchnorm(model, x_train)
    after = split_loss(model, x_dev, y_dev) if has_dev else None
    layers = []
    for (name, bn), (mean0, var0) in zip(bns, old, strict=True):
        sd = (bn.running_var + bn.eps).sqrt()
        shift = ((bn.running_mean - mean0).abs() / sd).max()
        ratio = sd / (var0 + bn.eps).sqrt()
        layers.append(
            {
                "module": name,
                "max_mean_shift_sd": float(shift),
                "std_ratio_min": float(ratio.min()),
                "std_ratio_max": float(ratio.max()),
            }
        )
    return {"dev_loss_before": before, "dev_loss_after": after, "layers": layers}


class _StopOnSigint:
    """Turn Ctrl-C into a flag checked between steps, so a step is never half-applied."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopOnSigint:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def evaluate(model: MLP, data: Dataset) -> dict:
    return {f"{name}_loss": round(split_loss(model, *data.splits[name]), 6) for name in data.splits}


def train(
    data: Dataset,
    model_config: ModelConfig,
    cfg: TrainConfig,
    observer: TrainObserver | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """Train a fresh model; returns it in eval mode with train/dev/test eval-mode losses.

    ``progress``: a bar on stderr (None: only when stderr is a terminal). Raises
    ``BnfoldError`` before allocating anything when the run would not fit in memory, and
    when the loss or the weights stop being finite (nothing is returned to be saved).
    """
    if model_config.vocab_size != data.vocab.size:
        model_config = replace(model_config, vocab_size=data.vocab.size)
    check_training_memory(model_config, cfg, len(data.splits["train"][0]))
    if not cfg.threads:
        cfg = replace(cfg, threads=free_cores())
    with torch_threads(cfg.threads):
        return _train(data, model_config, cfg, observer, progress)


def free_cores(limit: int = 2, window: float = 0.15) -> int:
    """How many cores this process may use now (1..``limit``): the cores it may run on,
    minus what other processes keep busy over the last ``window`` seconds (/proc/stat).

    What is busy *now*, not the one-minute load average: the first command after a
    ``pip install`` (or any other burst that has just ended) would see load ~1 for a minute
    and train on one thread on an idle machine (about 1.6x slower on two cores). Two threads
    on a core another process wants are not a little slower but 3-10x slower (measured:
    4.2 s vs 14 s and 49 s for the same run), so a core counts as free only when about
    three quarters of it is idle. Without /proc/stat (not Linux), the load average is the
    only clock there is."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        idle = _idle_cores(window)  # this process sleeps while measuring
    except (OSError, ValueError, IndexError):
        idle = cores - os.getloadavg()[0] if hasattr(os, "getloadavg") else 1.0
    return max(1, min(limit, cores, math.floor(idle + 0.25)))


def _idle_cores(window: float) -> float:
    """Idle cores of the whole machine over the next ``window`` seconds (/proc/stat)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields[:8])  # idle + iowait, total (no guest)

    idle0, total0 = sample()
    time.sleep(window)
    idle1, total1 = sample()
    if total1 <= total0:
        raise ValueError("no ticks counted")
    # The first line of /proc/stat sums over every CPU of the machine.
    return (idle1 - idle0) / (total1 - total0) * (os.cpu_count() or 1)


def training_memory_bytes(model_config: ModelConfig, cfg: TrainConfig, n_examples: int) -> dict:
    """An estimate of what a run allocates, by part, in bytes: parameters, gradients and
    AdamW's two moments (SGD keeps none), the activations a step keeps for backward (plus
    their gradients), and the one-pass evaluation over the distinct contexts."""
    c = model_config
    fan_in = c.block_size * c.n_embd
    params = (
        c.vocab_size * c.n_embd
        + fan_in * c.n_hidden
        + (c.n_layers - 1) * c.n_hidden**2
        + c.n_hidden * c.vocab_size
        + 4 * (c.n_layers * c.n_hidden + c.vocab_size)  # BN gain, bias, running mean/var
    )
    copies = 4 if cfg.optimizer == "adamw" else 2  # weights, grads (+ 2 moments)
    width = 2 * fan_in + 3 * c.n_layers * c.n_hidden + 4 * c.vocab_size  # floats per row
    rows = min(n_examples, c.vocab_size**c.block_size)  # distinct contexts, at most
    batch = min(cfg.batch_size, n_examples) if cfg.sampling == "epoch" else cfg.batch_size
    widest = max(fan_in, c.n_hidden, c.vocab_size)
    return {
        "parameters and optimizer": 4 * copies * params,
        "activations": 4 * 2 * batch * width,
        "evaluation": 4 * 3 * rows * widest,
        # the int64 tensors plus as much again while building them (an upper bound)
        "data": n_examples * (8 * (c.block_size + 1) + 56 + 8 * c.block_size),
    }


def available_memory() -> int:
    """Bytes the system can give without swapping (MemAvailable), else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_training_memory(model_config: ModelConfig, cfg: TrainConfig, n_examples: int) -> None:
    """Refuse, before anything is allocated, a run whose estimate exceeds free memory."""
    parts = training_memory_bytes(model_config, cfg, n_examples)
    need, have = sum(parts.values()), available_memory()
    if need > have:
        detail = ", ".join(f"{k} {_gib(v)}" for k, v in parts.items())
        raise BnfoldError(
            f"training needs about {_gib(need)} of memory ({detail}) but {_gib(have)} is"
            " available: lower --n-hidden, --n-embd, --n-layers, --batch-size or --block-size"
        )


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


class _SigmoidTanh(torch.autograd.Function):
    """``tanh(x) = 2 * sigmoid(2x) - 1``: the same function to float32 rounding (max
    difference ~2e-7), computed ~5x faster, because torch's CPU tanh kernel is about ten
    times slower than its sigmoid (0.43 ms vs 0.04 ms on a 2048 x 100 batch, one thread),
    which made tanh a fifth of a training step. Backward is torch's own tanh_backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = torch.sigmoid(x * 2).mul_(2).sub_(1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, y)


@contextmanager
def fast_tanh(model: nn.Module) -> Iterator[None]:
    """While training, every ``nn.Tanh`` computes through :class:`_SigmoidTanh`. The
    modules stay stock ``nn.Tanh`` (their hooks still fire, folding and export see the
    same model); only the instance's ``forward`` is swapped, and restored afterwards."""
    tanhs = [m for m in model.modules() if isinstance(m, nn.Tanh)]
    for m in tanhs:
        m.forward = _SigmoidTanh.apply
    try:
        yield
    finally:
        for m in tanhs:
            del m.forward


def batch_norm_weighted(h: torch.Tensor, bn: nn.BatchNorm1d, weight: torch.Tensor) -> torch.Tensor:
    """Train-mode ``bn(h_full)`` computed on the distinct rows ``h`` of a batch ``h_full``,
    row ``j`` standing for ``weight[j]`` identical rows (``weight`` sums to the batch size).

    Batch mean and biased variance are the weighted ones; the running statistics move
    exactly as nn.BatchNorm1d moves them on the full batch (momentum, or a cumulative mean
    when it is None; unbiased variance), so the stock module evaluates the result.
    """
    n = float(weight.sum())
    w = (weight / n).unsqueeze(0)  # (1, rows): a matrix product does the weighted sums
    mean = w @ h
    centered = h - mean
    var = w @ (centered * centered)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    out = centered * scale
    if bn.bias is not None:
        out = out + bn.bias
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            m = 1 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.lerp_(mean.squeeze(0), m)
            bn.running_var.lerp_(var.squeeze(0) * (n / max(n - 1, 1)), m)
    return out


def distinct_rows_loss(model: MLP, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(model(x), y)`` in train mode, run on the distinct rows of ``x``:
    each distinct context goes through the network once, its BatchNorm statistics weighted
    by its count, and its loss is the cross-entropy against the counts of its targets."""
    contexts, inverse = distinct_contexts(x)
    counts = torch.zeros(len(contexts), model.config.vocab_size)
    counts.index_put_((inverse, y), torch.ones(len(y)), accumulate=True)
    weight = counts.sum(1)
    h = model.tok_emb(contexts).flatten(1)
    for layer in model.net:
        h = batch_norm_weighted(h, layer, weight) if isinstance(layer, nn.BatchNorm1d) else layer(h)
    return -(counts * F.log_softmax(h, dim=-1)).sum() / len(y)


class _Progress:
    """click's bar on stderr, only on a terminal (or when asked): piped output stays clean.
    Shows the mean loss of the last 100 steps; every method is a no-op when disabled."""

    def __init__(self, steps: int, enabled: bool | None):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.bar = None
        if enabled:
            self.bar = click.progressbar(
                length=steps,
                label="train",
                file=sys.stderr,
                show_pos=True,
                update_min_steps=max(1, steps // 200),  # a few hundred redraws, not one a step
                item_show_func=lambda loss: None if loss is None else f"loss {loss:.4f}",
            )

    def update(self, losses: torch.Tensor) -> None:
        """One more step done; ``losses``: every step's loss so far."""
        if self.bar is not None:
            self.bar.update(1, float(losses[-100:].mean()))

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.render_finish()


class BatchSampler:
    """The indices of each step's batch, drawn from one generator seeded with ``seed``:
    the same seed gives the same batches. ``"random"``: i.i.d. indices every step;
    ``"epoch"``: without replacement, a fresh permutation of all ``n`` rows each epoch (a
    batch never straddles two epochs)."""

    def __init__(self, n: int, batch_size: int, sampling: str, seed: int):
        self.n, self.batch_size, self.sampling = n, batch_size, sampling
        self.gen = torch.Generator().manual_seed(seed)
        self.order: torch.Tensor | None = None
        self.pos = 0

    def next(self) -> torch.Tensor:
        if self.sampling == "random":
            return torch.randint(0, self.n, (self.batch_size,), generator=self.gen)
        if self.order is None or self.pos + self.batch_size > len(self.order):
            self.order, self.pos = torch.randperm(self.n, generator=self.gen), 0
        ix = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return ix


@contextmanager
def warm_running_stats(model: nn.Module, momentum: float | None) -> Iterator[Callable[[int], None]]:
    """Yield ``at(step)``, to call before each step: with a ``momentum``, every BatchNorm's
    running statistics are a plain cumulative mean (momentum ``1 / (step + 1)``) until
    ``1 / momentum`` batches have been seen, then a slow average with ``momentum``. Without
    one (None), ``at`` does nothing. Each BN's own momentum is restored on exit.

    Why: a slow running average over the last ~1/momentum batches (taken while the lr has
    decayed to almost nothing) matches a full calibration pass at no cost, and the warm-up
    keeps a short run from evaluating with half-initialised statistics."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    saved = [bn.momentum for bn in bns]
    warm_steps = 0 if momentum is None else math.ceil(1 / momentum)

    def at(step: int) -> None:
        if momentum is not None and step <= warm_steps:
            for bn in bns:
                bn.momentum = max(momentum, 1 / (step + 1))

    try:
        yield at
    finally:
        for bn, m in zip(bns, saved, strict=True):
            bn.momentum = m


class _Hooks:
    """The observer's hooks, each a no-op when there is no observer (or, for the optional
    ``on_start`` / ``on_batch``, when it does not define them)."""

    def __init__(self, observer: TrainObserver | None):
        self.observer = observer
        self.on_start = getattr(observer, "on_start", _nothing)
        self.on_batch = getattr(observer, "on_batch", _nothing)
        self.before_step = getattr(observer, "before_step", _nothing)
        self.after_backward = getattr(observer, "after_backward", _nothing)
        self.after_update = getattr(observer, "after_update", _nothing)
        self.on_eval = getattr(observer, "on_eval", _nothing)


def _nothing(*args) -> None:
    return None


def make_optimizer(model: MLP, cfg: TrainConfig):
    """The recipe's optimizer over every parameter: SGD, or AdamW (:func:`_adamw`)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return _adamw(model, cfg)


def set_lr(opt, lr: float) -> float:
    """Set every parameter group's learning rate to ``lr``; return it."""
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


def batch_loss(model: MLP, x: torch.Tensor, y: torch.Tensor, distinct_rows: bool) -> torch.Tensor:
    """The train-mode cross-entropy of a batch: on its distinct contexts, weighted (the same
    loss and gradient for 2.4x-4x fewer rows), or plainly."""
    if distinct_rows:
        return distinct_rows_loss(model, x, y)
    return F.cross_entropy(model(x), y)


def _train(
    data: Dataset,
    model_config: ModelConfig,
    cfg: TrainConfig,
    observer: TrainObserver | None,
    progress: bool | None,
) -> TrainResult:
    """makemore's loop: draw a batch, set the lr, forward, backward, update, record.
    Requires a non-empty training split; stops early (between steps) on Ctrl-C."""
    torch.manual_seed(cfg.seed)  # the weights' init: same seed, same network
    model = MLP(model_config)
    xtr, ytr = data.splits["train"]
    if len(xtr) == 0:
        raise BnfoldError("the training split is empty: the words file needs more words")
    opt = make_optimizer(model, cfg)  # AdamW without importing torch.optim (seconds saved)
    batches = BatchSampler(len(xtr), cfg.batch_size, cfg.sampling, cfg.seed)
    hooks, bar = _Hooks(observer), _Progress(cfg.steps, progress)
    losses, steps_done = torch.zeros(cfg.steps), 0
    model.train()
    hooks.on_start(model, xtr)
    t0 = time.perf_counter()
    with (
        _StopOnSigint() as stop,  # Ctrl-C ends the run between steps, never mid-update
        fast_tanh(model),  # torch's CPU tanh is ~10x slower than its sigmoid
        warm_running_stats(model, cfg.bn_momentum) as warm,
    ):
        for step in range(cfg.steps):
            if stop.requested:
                break
            ix = batches.next()
            lr = set_lr(opt, cfg.lr_at(step))
            warm(step)
            hooks.on_batch(step, xtr[ix])
            hooks.before_step(step, model)
            # fast: each distinct context once, weighted (a batch of 8192 holds ~1,900)
            loss = batch_loss(model, xtr[ix], ytr[ix], cfg.distinct_rows)
            if not torch.isfinite(loss):  # stop before a NaN reaches the weights
                bar.finish()
                raise _diverged(step, float(loss.detach()), lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            hooks.after_backward(step, model, loss)
            opt.step()
            hooks.after_update(step, model, lr)
            losses[step] = loss.detach()
            steps_done = step + 1
            # a dev-loss curve only for an observer (it costs a pass over the dev split)
            if observer is not None and cfg.eval_interval and steps_done % cfg.eval_interval == 0:
                hooks.on_eval(steps_done, "dev", split_loss(model, *data.splits["dev"]))
            bar.update(losses[:steps_done])
    bar.finish()
    return _finish(model, data, cfg, hooks, losses[:steps_done], t0, stop.requested)


def _finish(
    model: MLP,
    data: Dataset,
    cfg: TrainConfig,
    hooks: _Hooks,
    losses: torch.Tensor,
    t0: float,
    interrupted: bool,
) -> TrainResult:
    """After the last step: the calibration pass (when the recipe asks and a step ran), the
    refusal of non-finite weights, then the eval-mode losses of every split."""
    steps_done = len(losses)
    calibration = None
    if cfg.calibrate_bn and steps_done:
        calibration = calibration_pass(model, data.splits["train"][0], *data.splits["dev"])
    seconds = time.perf_counter() - t0
    bad = non_finite_tensors(model.state_dict())
    if bad:
        raise BnfoldError(
            f"training diverged: {', '.join(bad[:3])} hold non-finite values after"
            f" {steps_done} steps (lr {cfg.lr:g}); nothing was saved: lower --lr"
        )
    model.eval()
    metrics = evaluate(model, data)
    hooks.on_eval(steps_done, "dev", metrics["dev_loss"])
    return TrainResult(model, cfg, steps_done, seconds, interrupted, losses, metrics, calibration)


def _diverged(step: int, loss: float, lr: float) -> BnfoldError:
    return BnfoldError(
        f"training diverged: the loss is {loss} at step {step + 1} (lr {lr:g}); nothing was"
        " saved: lower --lr"
    )


class FusedAdamW:
    """``torch.optim.AdamW(fused=True)``, the same kernel (``torch._fused_adamw_``) and the
    same state, bit for bit (tests/test_train.py checks it against torch's), without
    ``torch.optim``: constructing any torch.optim optimizer imports ``torch._dynamo``,
    0.9 to 1.4 s on this machine, a tenth of the `fast` preset's whole budget.

    ``param_groups`` is a list of ``{"params": [...], "lr", "weight_decay"}`` dicts, as in
    torch.optim; the training loop sets each group's ``lr`` before every step.
    """

    def __init__(
        self,
        groups: list[dict],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        self.betas, self.eps = betas, eps
        self.param_groups = [{"lr": lr, "weight_decay": weight_decay, **g} for g in groups]
        for g in self.param_groups:
            g["params"] = list(g["params"])
            g["exp_avg"] = [torch.zeros_like(p) for p in g["params"]]
            g["exp_avg_sq"] = [torch.zeros_like(p) for p in g["params"]]
            g["step"] = [torch.zeros((), dtype=torch.float32) for _ in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for g in self.param_groups:
            live = [i for i, p in enumerate(g["params"]) if p.grad is not None]
            if not live:
                continue
            steps = [g["step"][i] for i in live]
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(
                [g["params"][i] for i in live],
                [g["params"][i].grad for i in live],
                [g["exp_avg"][i] for i in live],
                [g["exp_avg_sq"][i] for i in live],
                [],
                steps,
                amsgrad=False,
                lr=g["lr"],
                beta1=self.betas[0],
                beta2=self.betas[1],
                weight_decay=g["weight_decay"],
                eps=self.eps,
                maximize=False,
                grad_scale=None,
                found_inf=None,
            )


def _adamw(model: MLP, cfg: TrainConfig):
    params = list(model.parameters())
    gains = {id(m.weight) for m in model.net[:-1] if isinstance(m, nn.BatchNorm1d)}
    decayed = gains if cfg.bn_gain_decay else set()
    groups = [{"params": [p for p in params if id(p) not in decayed]}]
    if decayed:
        gain_params = [p for p in params if id(p) in decayed]
        groups.append({"params": gain_params, "weight_decay": cfg.bn_gain_decay})
    return adamw(groups, lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay)


def adamw(groups: list[dict], **hyper):
    """AdamW over ``groups``: :class:`FusedAdamW` (no ``torch.optim`` import) while torch
    has the private kernel it calls, else the public ``torch.optim.AdamW(fused=True)``,
    the same arithmetic (tests/test_train.py checks both, and fails when the kernel goes)."""
    if hasattr(torch, "_fused_adamw_"):
        return FusedAdamW(groups, **hyper)
    return torch.optim.AdamW(groups, fused=True, **hyper)
