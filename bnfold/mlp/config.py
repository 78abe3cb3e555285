"""The run's configuration, torch-free: the model's shape (:class:`ModelConfig`) and the
training recipe (:class:`TrainConfig`, its presets). The command line reads its defaults
here without importing torch; :mod:`bnfold.mlp.model` and :mod:`bnfold.mlp.train` build on it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from bnfold.errors import BnfoldError


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 27
    block_size: int = 3
    n_embd: int = 10
    n_hidden: int = 100
    n_layers: int = 5  # hidden Linear -> BN -> Tanh blocks, as in the lecture's deep net
    batchnorm: bool = True  # False: the folded network (Linear with bias, no BN)

    def __post_init__(self) -> None:
        for f in ("vocab_size", "block_size", "n_embd", "n_hidden", "n_layers"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise BnfoldError(f"{f.replace('_', '-')} must be a positive integer")
        if self.vocab_size < 2:
            raise BnfoldError("vocab_size must be at least 2 (end token + one character)")

    def to_dict(self) -> dict:
        return asdict(self)


# the default architecture: every default of the model's shape (CLI, pipeline) reads it here
DEFAULT_MODEL = ModelConfig()


DEFAULT_PRESET = "fast"  # the recipe a run takes unless told otherwise


class _FromPreset:
    """The default of every recipe field: "the preset's value" (see :class:`TrainConfig`)."""

    def __repr__(self) -> str:
        return "<from preset>"


FROM_PRESET: Any = _FromPreset()


@dataclass(frozen=True)
class TrainConfig:
    """A training recipe: ``preset`` names one (:data:`PRESETS`), and every field not given
    takes that preset's value. ``TrainConfig()`` is the default preset (``fast``),
    ``TrainConfig(preset="lecture")`` the lecture's, ``TrainConfig(steps=100)`` the default
    preset cut to 100 steps."""

    preset: str = DEFAULT_PRESET
    steps: int = FROM_PRESET
    batch_size: int = FROM_PRESET
    optimizer: str = FROM_PRESET  # "sgd" | "adamw"
    lr: float = FROM_PRESET
    schedule: str = FROM_PRESET  # "step": lr, then lr/10 for the last quarter | "cosine"
    warmup_steps: int = FROM_PRESET
    min_lr_frac: float = FROM_PRESET  # cosine floor, as a fraction of lr
    weight_decay: float = FROM_PRESET
    # Decoupled decay of the hidden BatchNorms' gains only (AdamW): a smaller gain keeps
    # tanh out of saturation; see the saturation sweep in benchmarks/saturation_sweep.py.
    bn_gain_decay: float = FROM_PRESET
    adam_beta2: float = FROM_PRESET  # AdamW's second-moment decay (beta1 stays 0.9)
    sampling: str = FROM_PRESET  # "random": i.i.d. indices per step | "epoch": reshuffle each epoch
    bn_momentum: float | None = FROM_PRESET  # BN running-stat momentum while training (None: 0.1)
    calibrate_bn: bool = FROM_PRESET  # recompute running stats over the whole train set at the end
    # Run each step on the batch's distinct contexts, weighted by how often each occurs: the
    # same loss, gradient and BatchNorm statistics as the whole batch (to float rounding),
    # for 2.4x (batch 2048) to 4x (batch 8192) fewer rows through the network.
    distinct_rows: bool = FROM_PRESET
    seed: int = FROM_PRESET
    # torch threads; 0 = decide at run time from the cores that are free (at most 2). Two
    # threads are faster on an idle machine but collapse when a core is shared, and they
    # round differently from one: the number actually used is recorded in the checkpoint.
    threads: int = FROM_PRESET
    eval_interval: int = FROM_PRESET  # steps between dev-loss evaluations (0: only at the end)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise BnfoldError(f"unknown preset {self.preset!r} (choose {', '.join(PRESETS)})")
        recipe = {**BASE_RECIPE, **PRESETS[self.preset]}
        for f in fields(self):
            if getattr(self, f.name) is FROM_PRESET:
                object.__setattr__(self, f.name, recipe[f.name])
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise BnfoldError(f"{name.replace('_', '-')} must be >= 1")
        if self.threads < 0:
            raise BnfoldError("threads must be >= 0")
        if self.optimizer not in ("sgd", "adamw"):
            raise BnfoldError(f"unknown optimizer {self.optimizer!r}")
        if self.schedule not in ("step", "cosine"):
            raise BnfoldError(f"unknown schedule {self.schedule!r}")
        if self.sampling not in ("random", "epoch"):
            raise BnfoldError(f"unknown sampling {self.sampling!r} (choose random, epoch)")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise BnfoldError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.adam_beta2 < 1:
            raise BnfoldError("adam-beta2 must be in [0, 1)")
        if self.bn_momentum is not None and not 0 < self.bn_momentum <= 1:
            raise BnfoldError("bn-momentum must be in (0, 1]")

    @classmethod
    def from_preset(cls, preset: str = DEFAULT_PRESET, **overrides) -> TrainConfig:
        if preset not in PRESETS:
            raise BnfoldError(f"unknown preset {preset!r} (choose {', '.join(PRESETS)})")
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(preset=preset, **given)

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


# Every field's value unless the preset says otherwise: the lecture's recipe.
BASE_RECIPE: dict[str, Any] = dict(
    steps=200_000,
    batch_size=32,
    optimizer="sgd",
    lr=0.1,
    schedule="step",
    warmup_steps=0,
    min_lr_frac=0.0,
    weight_decay=0.0,
    bn_gain_decay=0.0,
    adam_beta2=0.999,
    sampling="random",
    bn_momentum=None,
    calibrate_bn=False,
    distinct_rows=False,
    seed=42,
    threads=1,
    eval_interval=0,
)

PRESETS: dict[str, dict] = {
    # Karpathy's makemore part 3, line for line: SGD, batch 32, 200k steps, 0.1 -> 0.01.
    "lecture": dict(steps=200_000, batch_size=32, optimizer="sgd", lr=0.1, schedule="step"),
    # Engineered for time to dev loss on a 2-core CPU (benchmarks/train_presets.py, #14).
    "fast": dict(
        steps=500,
        batch_size=8192,  # big batches, yet cheap: 8192 examples hold ~1,900 distinct contexts
        distinct_rows=True,  # so each step runs those ~1,900 rows, weighted (same gradient)
        optimizer="adamw",
        lr=6e-2,
        adam_beta2=0.99,
        schedule="cosine",
        warmup_steps=80,
        min_lr_frac=0.01,
        sampling="epoch",  # without replacement: ~0.007 lower dev loss than i.i.d. draws
        bn_momentum=0.01,  # running stats as good as a calibration pass, 1.3 s cheaper
        threads=0,  # as many as are free, up to 2, decided when the run starts
    ),
}


def train_config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
