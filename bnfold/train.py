"""Training: the lecture's recipe exactly (``lecture``) and a CPU time-to-quality recipe
(``fast``, the default). Deterministic for the same data, config and seed.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F

from bnfold.data import Dataset
from bnfold.errors import BnfoldError
from bnfold.model import MLP, ModelConfig
from bnfold.progress import Progress


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "fast"
    steps: int = 200_000
    batch_size: int = 32
    optimizer: str = "sgd"  # "sgd" | "adamw"
    lr: float = 0.1
    schedule: str = "step"  # "step": lr, then lr/10 for the last quarter | "cosine"
    warmup_steps: int = 0
    min_lr_frac: float = 0.0  # cosine floor, as a fraction of lr
    weight_decay: float = 0.0
    calibrate_bn: bool = False  # recompute running stats over the whole train set at the end
    seed: int = 42
    threads: int = 1  # small matmuls: one thread beats two, and fixes the reduction order
    eval_interval: int = 0  # steps between dev-loss evaluations (0: only at the end)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise BnfoldError(f"unknown preset {self.preset!r} (choose {', '.join(PRESETS)})")
        for name in ("steps", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise BnfoldError(f"{name.replace('_', '-')} must be >= 1")
        if self.optimizer not in ("sgd", "adamw"):
            raise BnfoldError(f"unknown optimizer {self.optimizer!r}")
        if self.schedule not in ("step", "cosine"):
            raise BnfoldError(f"unknown schedule {self.schedule!r}")
        if not self.lr > 0:
            raise BnfoldError("lr must be > 0")

    @classmethod
    def from_preset(cls, preset: str = "fast", **overrides) -> TrainConfig:
        if preset not in PRESETS:
            raise BnfoldError(f"unknown preset {preset!r} (choose {', '.join(PRESETS)})")
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(preset=preset, **{**PRESETS[preset], **given})

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "step":
            return self.lr if step < 0.75 * self.steps else self.lr / 10
        t = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        floor = self.lr * self.min_lr_frac
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * t))


PRESETS: dict[str, dict] = {
    # Karpathy's makemore part 3, line for line: SGD, batch 32, 200k steps, 0.1 -> 0.01.
    "lecture": dict(steps=200_000, batch_size=32, optimizer="sgd", lr=0.1, schedule="step"),
    # Engineered for time-to-dev-loss on a 2-core CPU (see benchmarks/train_presets.py).
    "fast": dict(
        steps=12_000,
        batch_size=256,
        optimizer="adamw",
        lr=1e-2,
        schedule="cosine",
        warmup_steps=200,
        min_lr_frac=0.01,
        calibrate_bn=True,
    ),
}


class TrainObserver(Protocol):
    """Hooks for diagnostics; every method is optional in spirit (no-ops are fine)."""

    def before_step(self, step: int, model: MLP) -> None: ...
    def after_backward(self, step: int, model: MLP, loss: torch.Tensor) -> None: ...
    def after_update(self, step: int, model: MLP, lr: float) -> None: ...
    def on_eval(self, step: int, split: str, loss: float) -> None: ...


@dataclass
class TrainResult:
    model: MLP
    config: TrainConfig
    steps_done: int
    seconds: float
    interrupted: bool
    losses: torch.Tensor  # per-step train (minibatch) loss
    metrics: dict

    def summary(self) -> dict:
        return {
            **self.metrics,
            "steps": self.steps_done,
            "seconds": round(self.seconds, 3),
            "params": self.model.num_params(),
            "preset": self.config.preset,
            "interrupted": self.interrupted,
        }


@torch.no_grad()
def split_loss(model: MLP, x: torch.Tensor, y: torch.Tensor, chunk: int = 65536) -> float:
    """Mean cross-entropy in eval mode (BatchNorm uses its running statistics)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(x), chunk):
        total += F.cross_entropy(model(x[i : i + chunk]), y[i : i + chunk], reduction="sum").item()
    model.train(was_training)
    return total / len(x)


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
    """Train a fresh model; returns it in eval mode with train/dev/test eval-mode losses."""
    if model_config.vocab_size != data.vocab.size:
        model_config = replace(model_config, vocab_size=data.vocab.size)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(data, model_config, cfg, observer, progress)
    finally:
        torch.set_num_threads(threads_before)


def _train(data, model_config, cfg, observer, progress) -> TrainResult:
    torch.manual_seed(cfg.seed)
    model = MLP(model_config)
    xtr, ytr = data.splits["train"]
    xdev, ydev = data.splits["dev"]
    if len(xtr) == 0:
        raise BnfoldError("the training split is empty: the words file needs more words")
    params = list(model.parameters())
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = torch.zeros(cfg.steps)
    bar = Progress(cfg.steps, "train", enabled=progress)
    model.train()
    steps_done = 0
    t0 = time.perf_counter()
    with _StopOnSigint() as stop:
        for step in range(cfg.steps):
            if stop.requested:
                break
            # Batches are drawn per step from one seeded generator: same seed, same batches.
            ix = torch.randint(0, len(xtr), (cfg.batch_size,), generator=gen)
            lr = cfg.lr_at(step)
            for g in opt.param_groups:
                g["lr"] = lr
            if observer:
                observer.before_step(step, model)
            loss = F.cross_entropy(model(xtr[ix]), ytr[ix])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if observer:
                observer.after_backward(step, model, loss)
            opt.step()
            if observer:
                observer.after_update(step, model, lr)
            losses[step] = loss.detach()
            steps_done = step + 1
            if cfg.eval_interval and (steps_done % cfg.eval_interval == 0) and observer:
                observer.on_eval(steps_done, "dev", split_loss(model, xdev, ydev))
            if bar.enabled:
                bar.update(steps_done, loss=float(losses[max(0, step - 99) : step + 1].mean()))
    bar.close()
    if cfg.calibrate_bn and steps_done:
        calibrate_batchnorm(model, xtr)
    seconds = time.perf_counter() - t0
    model.eval()
    metrics = evaluate(model, data)
    if observer:
        observer.on_eval(steps_done, "dev", metrics["dev_loss"])
    return TrainResult(
        model, cfg, steps_done, seconds, stop.requested, losses[:steps_done], metrics
    )


def train_config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
