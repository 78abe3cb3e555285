"""The training loop's named pieces, each on its own: batch drawing, the running-statistics
warm-up, the optimizer choice, the batch loss and the observer's optional hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnfold.mlp.model import MLP, ModelConfig
from bnfold.mlp.train import (
    BatchSampler,
    FusedAdamW,
    TrainConfig,
    _Hooks,
    batch_loss,
    make_optimizer,
    set_lr,
    warm_running_stats,
)


def small_mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(ModelConfig(vocab_size=5, block_size=2, n_embd=3, n_hidden=8, n_layers=2))


def test_epoch_batches_use_every_row_once_per_epoch():
    sampler = BatchSampler(n=10, batch_size=3, sampling="epoch", seed=0)
    epoch = [sampler.next() for _ in range(3)]  # 9 of the 10 rows; the 10th is dropped
    rows = torch.cat(epoch).tolist()
    assert len(rows) == len(set(rows)) == 9
    assert all(len(b) == 3 for b in epoch)
    # a batch never straddles two epochs: the next one starts a fresh permutation
    assert len(set(sampler.next().tolist())) == 3


def test_random_batches_repeat_with_the_seed_and_stay_in_range():
    a = BatchSampler(n=7, batch_size=50, sampling="random", seed=3)
    b = BatchSampler(n=7, batch_size=50, sampling="random", seed=3)
    c = BatchSampler(n=7, batch_size=50, sampling="random", seed=4)
    first = [a.next() for _ in range(4)]
    assert all(torch.equal(x, b.next()) for x in first)
    assert not torch.equal(first[0], c.next())
    assert all(int(x.min()) >= 0 and int(x.max()) < 7 for x in first)
    assert len(set(torch.cat(first).tolist())) == 7  # i.i.d.: 200 draws of 7 hit each


def test_running_stats_warm_up_is_a_cumulative_mean_then_the_momentum():
    model = small_mlp()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    with warm_running_stats(model, 0.25) as at:  # 1 / 0.25 = 4 warm-up batches
        seen = []
        for step in range(7):
            at(step)
            seen.append(bns[0].momentum)
        assert {bn.momentum for bn in bns} == {0.25}
    assert seen == [1.0, 0.5, 1 / 3, 0.25, 0.25, 0.25, 0.25]
    assert {bn.momentum for bn in bns} == {0.1}  # torch's default, restored


def test_no_momentum_leaves_the_batchnorms_alone():
    model = small_mlp()
    with warm_running_stats(model, None) as at:
        at(0)
        assert {m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm1d)} == {0.1}


def test_the_recipe_chooses_the_optimizer():
    model = small_mlp()
    sgd = make_optimizer(model, TrainConfig(preset="lecture"))
    assert isinstance(sgd, torch.optim.SGD)
    adamw = make_optimizer(model, TrainConfig(bn_gain_decay=0.5))
    assert isinstance(adamw, FusedAdamW)
    # the hidden BatchNorms' gains decay in a group of their own; the output BN's does not
    assert [g["weight_decay"] for g in adamw.param_groups] == [TrainConfig().weight_decay, 0.5]
    assert len(adamw.param_groups[1]["params"]) == 2  # two hidden layers
    assert set_lr(adamw, 0.125) == 0.125
    assert {g["lr"] for g in adamw.param_groups} == {0.125}


def test_batch_loss_is_the_same_on_distinct_rows_and_on_the_whole_batch():
    x = torch.tensor([[1, 2], [1, 2], [3, 4], [1, 2], [0, 0]])
    y = torch.tensor([1, 2, 3, 1, 4])
    plain, distinct = small_mlp(1).train(), small_mlp(1).train()
    a = float(batch_loss(plain, x, y, distinct_rows=False).detach())
    b = float(batch_loss(distinct, x, y, distinct_rows=True).detach())
    with torch.no_grad():
        assert a == pytest.approx(float(F.cross_entropy(small_mlp(1).train()(x), y)))
    assert b == pytest.approx(a, rel=1e-5)


def test_hooks_call_what_the_observer_defines_and_nothing_else():
    calls = []

    class Partial:  # no on_start / on_batch: they are optional
        def before_step(self, step, model):
            calls.append(("before", step))

        def on_eval(self, step, split, loss):
            calls.append(("eval", step, split))

    hooks = _Hooks(Partial())
    hooks.on_start(None, None)
    hooks.on_batch(0, None)
    hooks.before_step(0, None)
    hooks.on_eval(5, "dev", 1.0)
    assert calls == [("before", 0), ("eval", 5, "dev")]
    quiet = _Hooks(None)  # no observer at all: every hook is a no-op
    assert quiet.after_update(0, None, 0.1) is None and quiet.on_eval(1, "dev", 0.0) is None
