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

from bnfold.data import Dataset, distinct_contexts
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
    adam_beta2: float = 0.999  # AdamW's second-moment decay (beta1 stays 0.9)
    sampling: str = "random"  # "random": i.i.d. indices per step | "epoch": reshuffle each epoch
    bn_momentum: float | None = None  # BN running-stat momentum while training (None: 0.1)
    calibrate_bn: bool = False  # recompute running stats over the whole train set at the end
    seed: int = 42
    threads: int = 1  # two are faster on an idle machine, but collapse when cores are shared
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
        if self.sampling not in ("random", "epoch"):
            raise BnfoldError(f"unknown sampling {self.sampling!r} (choose random, epoch)")
        if not self.lr > 0:
            raise BnfoldError("lr must be > 0")
        if not 0 <= self.adam_beta2 < 1:
            raise BnfoldError("adam-beta2 must be in [0, 1)")
        if self.bn_momentum is not None and not 0 < self.bn_momentum <= 1:
            raise BnfoldError("bn-momentum must be in (0, 1]")

    @classmethod
    def from_preset(cls, preset: str = "fast", **overrides) -> TrainConfig:
        if preset not in PRESETS:
            raise BnfoldError(f"unknown preset {preset!r} (choose {', '.join(PRESETS)})")
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(preset=preset, **{**PRESETS[preset], **given})

    def lr_at(self, step: int) -> float:
        # Warm-up never takes more than a quarter of the run, so a shortened run still trains.
        warmup = min(self.warmup_steps, self.steps // 4)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        if self.schedule == "step":
            return self.lr if step < 0.75 * self.steps else self.lr / 10
        t = (step - warmup) / max(1, self.steps - warmup)
        floor = self.lr * self.min_lr_frac
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * t))


PRESETS: dict[str, dict] = {
    # Karpathy's makemore part 3, line for line: SGD, batch 32, 200k steps, 0.1 -> 0.01.
    "lecture": dict(steps=200_000, batch_size=32, optimizer="sgd", lr=0.1, schedule="step"),
    # Engineered for time-to-dev-loss on a 2-core CPU (see benchmarks/train_presets.py).
    "fast": dict(
        steps=1_200,
        batch_size=2048,  # one thread: big batches cost ~25% less per example than 256
        optimizer="adamw",
        lr=4e-2,
        adam_beta2=0.99,
        schedule="cosine",
        warmup_steps=200,
        min_lr_frac=0.01,
        sampling="epoch",  # without replacement: ~0.007 lower dev loss than i.i.d. draws
        bn_momentum=0.01,  # running stats as good as a calibration pass, 1.3 s cheaper
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
        opt = _adamw(params, cfg)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    saved_momentum = [bn.momentum for bn in bns]
    # With bn_momentum, a slow running average over the last ~1/momentum batches (taken
    # while the lr has decayed to almost nothing) matches a full calibration pass at no
    # cost. Until 1/momentum batches have been seen it is a plain cumulative mean instead,
    # so that a short run never evaluates with half-initialised statistics.
    warm_steps = 0 if cfg.bn_momentum is None else math.ceil(1 / cfg.bn_momentum)
    gen = torch.Generator().manual_seed(cfg.seed)
    n, order, pos = len(xtr), None, 0
    losses = torch.zeros(cfg.steps)
    bar = Progress(cfg.steps, "train", enabled=progress)
    model.train()
    steps_done = 0
    t0 = time.perf_counter()
    with _StopOnSigint() as stop:
        for step in range(cfg.steps):
            if stop.requested:
                break
            # Batches are drawn from one seeded generator: same seed, same batches.
            if cfg.sampling == "random":
                ix = torch.randint(0, n, (cfg.batch_size,), generator=gen)
            else:  # "epoch": without replacement, a fresh permutation each epoch
                if order is None or pos + cfg.batch_size > len(order):
                    order, pos = torch.randperm(n, generator=gen), 0
                ix = order[pos : pos + cfg.batch_size]
                pos += cfg.batch_size
            lr = cfg.lr_at(step)
            for g in opt.param_groups:
                g["lr"] = lr
            if step <= warm_steps and cfg.bn_momentum is not None:
                for bn in bns:
                    bn.momentum = max(cfg.bn_momentum, 1 / (step + 1))
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
    for bn, m in zip(bns, saved_momentum, strict=True):
        bn.momentum = m
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


def _adamw(params, cfg: TrainConfig) -> torch.optim.AdamW:
    kw = dict(lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    try:  # the fused CPU kernel (torch >= 2.4) takes ~0.3 ms off every step
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, foreach=True, **kw)


def train_config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
