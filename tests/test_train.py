from __future__ import annotations

import copy
import math
import os
import signal
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from bnfold.errors import BnfoldError
from bnfold.mlp.checkpoint import non_finite_tensors
from bnfold.mlp.data import distinct_contexts, load_dataset
from bnfold.mlp.model import MLP, ModelConfig
from bnfold.mlp.train import (
    PRESETS,
    FusedAdamW,
    TrainConfig,
    _SigmoidTanh,
    adamw,
    calibrate_batchnorm,
    distinct_rows_loss,
    fast_tanh,
    split_loss,
    train,
    training_memory_bytes,
)


@pytest.fixture(scope="module")
def data(names_path):
    return load_dataset(names_path)


def test_model_structure_is_stock_torch():
    m = MLP(ModelConfig())
    kinds = [type(layer).__name__ for layer in m.net]
    assert kinds == ["Linear", "BatchNorm1d", "Tanh"] * 5 + ["Linear", "BatchNorm1d"]
    assert all(lin.bias is None for lin in m.net if isinstance(lin, torch.nn.Linear))
    assert m.num_params() == 47024  # the lecture's count
    folded = MLP(ModelConfig(batchnorm=False))
    assert [type(layer).__name__ for layer in folded.net] == ["Linear", "Tanh"] * 5 + ["Linear"]


def test_initial_loss_is_close_to_uniform(data):
    torch.manual_seed(0)
    m = MLP(ModelConfig(vocab_size=data.vocab.size))
    x, y = data.splits["train"]
    loss = F.cross_entropy(m(x[:20000]), y[:20000]).item()  # train mode, as at step 0
    assert abs(loss - math.log(27)) < 0.05


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_short_run_learns_and_is_deterministic(data, threads):
    """Same data, config and seed give bit-identical weights, with one thread and with two
    (the thread count is part of the config: one and two threads round differently)."""
    cfg = TrainConfig.from_preset("fast", steps=300, batch_size=256, threads=threads)
    a = train(data, ModelConfig(), cfg, progress=False)
    b = train(data, ModelConfig(), cfg, progress=False)
    assert a.config.threads == threads
    assert a.metrics["dev_loss"] < math.log(27) - 0.8  # 3.30 at init
    assert_same_weights(a.model, b.model)
    assert a.summary().keys() >= {
        "train_loss",
        "dev_loss",
        "test_loss",
        "steps",
        "seconds",
        "params",
        "preset",
    }
    c = train(
        data,
        ModelConfig(),
        TrainConfig.from_preset("fast", steps=300, batch_size=256, seed=7),
        progress=False,
    )
    assert not torch.equal(c.model.tok_emb.weight, a.model.tok_emb.weight)


def test_lecture_preset_is_the_lecture():
    cfg = TrainConfig.from_preset("lecture")
    assert (cfg.steps, cfg.batch_size, cfg.optimizer, cfg.lr) == (200_000, 32, "sgd", 0.1)
    assert cfg.lr_at(0) == 0.1 and cfg.lr_at(149_999) == 0.1 and cfg.lr_at(150_000) == 0.01
    assert PRESETS["fast"]["steps"] < 200_000


@pytest.mark.slow
def test_short_runs_warm_up_and_average_batchnorm_statistics(data):
    """A shortened `fast` run must still train and evaluate with settled BN statistics:
    warm-up is capped at a quarter of the run, and running stats start as a cumulative mean."""
    cfg = TrainConfig.from_preset("fast", steps=20, batch_size=128)
    assert cfg.lr_at(4) == cfg.lr and cfg.lr_at(0) < cfg.lr
    r = train(data, ModelConfig(), cfg, progress=False)
    x = data.splits["train"][0]
    calibrated = copy.deepcopy(r.model)
    calibrate_batchnorm(calibrated, x)
    assert r.metrics["dev_loss"] < 2.8
    bn, exact = r.model.net[1], calibrated.net[1]
    # within sampling noise of the whole-train-set statistics, not stuck near their init
    assert (bn.running_mean - exact.running_mean).abs().max() < 0.5 * exact.running_var.sqrt().max()


def test_bad_train_config():
    with pytest.raises(BnfoldError, match="unknown preset"):
        TrainConfig.from_preset("turbo")
    with pytest.raises(BnfoldError, match="steps must be >= 1"):
        TrainConfig.from_preset("fast", steps=0)
    with pytest.raises(BnfoldError, match="block-size must be a positive integer"):
        ModelConfig(block_size=0)


def test_calibration_stores_exact_population_statistics(data):
    torch.manual_seed(0)
    m = MLP(ModelConfig())
    x = data.splits["train"][0][:5000]
    calibrate_batchnorm(m, x)
    h = m.net[0](m.tok_emb(x).flatten(1))
    bn = m.net[1]
    torch.testing.assert_close(bn.running_mean, h.mean(0))
    torch.testing.assert_close(bn.running_var, h.var(0, unbiased=True), rtol=1e-5, atol=1e-5)
    assert bn.momentum == 0.1  # restored


class CtrlCAfter:
    """A training observer that presses Ctrl-C (SIGINT to this process) once step ``step``
    has updated the weights: an event, not a timer that guesses how long steps take."""

    def __init__(self, step: int):
        self.step = step

    def before_step(self, step, model):
        pass

    def after_backward(self, step, model, loss):
        pass

    def after_update(self, step, model, lr):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGINT)

    def on_eval(self, step, split, loss):
        pass


def test_ctrl_c_stops_cleanly_and_keeps_completed_steps(data):
    cfg = TrainConfig.from_preset("fast", steps=50_000)
    result = train(data, ModelConfig(), cfg, observer=CtrlCAfter(3), progress=False)
    assert result.interrupted and 0 < result.steps_done < cfg.steps
    assert len(result.losses) == result.steps_done
    assert math.isfinite(result.metrics["dev_loss"])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_split_loss_equals_plain_cross_entropy(data):
    """split_loss runs the network once per distinct context; the mean is the same."""
    m = train(
        data,
        ModelConfig(),
        TrainConfig.from_preset("fast", steps=20, batch_size=64),
        progress=False,
    ).model
    x, y = data.splits["test"]
    with torch.no_grad():
        plain = F.cross_entropy(m(x).double(), y).item()
    assert split_loss(m, x, y) == pytest.approx(plain, abs=1e-6)


def test_split_loss_uses_running_statistics(data):
    m = train(
        data,
        ModelConfig(),
        TrainConfig.from_preset("fast", steps=50, batch_size=256),
        progress=False,
    ).model
    x, y = data.splits["dev"]
    m.train()
    before = split_loss(m, x, y)
    assert m.training  # mode restored
    m.eval()
    assert split_loss(m, x, y) == before


def test_auto_threads_are_resolved_and_recorded(data):
    cfg = TrainConfig.from_preset("fast", steps=5, batch_size=64, threads=0)
    r = train(data, ModelConfig(), cfg, progress=False)
    assert r.config.threads in (1, 2) and r.summary()["threads"] == r.config.threads
    again = train(data, ModelConfig(), replace(cfg, threads=r.config.threads), progress=False)
    assert_same_weights(r.model, again.model)


def test_sigmoid_tanh_matches_torch_tanh():
    x = (torch.randn(4096, dtype=torch.float64) * 4).float().requires_grad_()
    y = _SigmoidTanh.apply(x)
    y.backward(torch.ones_like(y))
    ref = torch.tanh(x.detach().double())
    assert (y.detach().double() - ref).abs().max() < 4e-7  # float32 rounding
    assert (x.grad.double() - (1 - ref**2)).abs().max() < 1e-6


def test_fast_tanh_keeps_stock_modules_and_hooks():
    m = MLP(ModelConfig())
    seen, pre = [], []
    m.net[1].register_forward_hook(lambda mod, inp, out: pre.append(out))
    m.net[2].register_forward_hook(lambda mod, inp, out: seen.append(out))
    x = torch.randint(0, 27, (64, 3))
    with fast_tanh(m):
        m(x)
    assert len(seen) == 1  # the hook fired through the swapped forward
    assert all(type(t) is torch.nn.Tanh and "forward" not in vars(t) for t in m.net[2::3])
    torch.testing.assert_close(seen[0], torch.tanh(pre[0]), rtol=0, atol=4e-7)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_distinct_rows_step_equals_stock_batchnorm_on_the_full_batch(data, momentum):
    """One train-mode step on the distinct contexts of a batch, weighted by their counts,
    gives torch's own nn.BatchNorm1d/cross_entropy loss, gradients and running statistics
    on the whole batch, to float32 rounding."""
    x, y = data.splits["train"]
    ix = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:3000]
    torch.manual_seed(0)
    stock = MLP(ModelConfig())
    for bn in stock.modules():
        if isinstance(bn, torch.nn.BatchNorm1d):
            bn.momentum = momentum
    ours = copy.deepcopy(stock)
    stock.train(), ours.train()
    ref = F.cross_entropy(stock(x[ix]), y[ix])
    ref.backward()
    loss = distinct_rows_loss(ours, x[ix], y[ix])
    loss.backward()
    assert len(distinct_contexts(x[ix])[0]) < len(ix) / 2  # the point: fewer rows
    torch.testing.assert_close(loss, ref)
    for (name, a), (_, b) in zip(stock.named_parameters(), ours.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-7, msg=name)
    for (name, a), (_, b) in zip(stock.named_buffers(), ours.named_buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)


def test_memory_estimate_refuses_impossible_sizes_before_allocating(data):
    huge = ModelConfig(n_hidden=1_000_000)
    parts = training_memory_bytes(huge, TrainConfig.from_preset("fast"), 200_000)
    assert parts["parameters and optimizer"] > 4 * 16 * 10**12  # 4 layers of 1e6 x 1e6
    with pytest.raises(BnfoldError, match=r"training needs about .* GiB .* available"):
        train(data, huge, TrainConfig.from_preset("fast", steps=1), progress=False)
    # the default model is a few MiB
    assert sum(training_memory_bytes(ModelConfig(), TrainConfig(), 200_000).values()) < 2**30


def test_a_diverging_run_stops_with_an_error(data):
    cfg = TrainConfig.from_preset("fast", steps=30, batch_size=256, lr=1e30, threads=1)
    with pytest.raises(BnfoldError, match="training diverged"):
        train(data, ModelConfig(), cfg, progress=False)
    with pytest.raises(BnfoldError, match="finite"):
        TrainConfig.from_preset("fast", lr=float("inf"))


def test_non_finite_tensors_names_them():
    m = MLP(ModelConfig())
    assert non_finite_tensors(m.state_dict()) == []
    with torch.no_grad():
        m.net[4].running_var[3] = float("nan")
        m.net[0].weight[0, 0] = float("inf")
    assert non_finite_tensors(m.state_dict()) == ["net.0.weight", "net.4.running_var"]


def test_the_private_adamw_kernel_is_there_and_has_a_public_fallback(monkeypatch):
    """bnfold's AdamW calls ``torch._fused_adamw_``: this fails loudly the day torch drops
    it, and without it training falls back to the public ``torch.optim.AdamW``."""
    assert callable(torch._fused_adamw_), "torch dropped _fused_adamw_: see FusedAdamW"
    params = [torch.nn.Parameter(torch.ones(3))]
    assert isinstance(adamw([{"params": params}], lr=0.1), FusedAdamW)
    monkeypatch.delattr(torch, "_fused_adamw_")
    fallback = adamw([{"params": params}], lr=0.1, weight_decay=0.01)
    assert isinstance(fallback, torch.optim.AdamW) and fallback.defaults["fused"]
    assert fallback.param_groups[0]["weight_decay"] == 0.01


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_adamw_is_torchs_adamw_bit_for_bit(weight_decay):
    torch.manual_seed(0)
    a = MLP(ModelConfig(n_hidden=16, n_layers=2))
    b = copy.deepcopy(a)
    kw = dict(lr=0.01, betas=(0.9, 0.99), weight_decay=weight_decay)
    ref = torch.optim.AdamW(a.parameters(), fused=True, **kw)
    ours = FusedAdamW([{"params": b.parameters()}], **kw)
    x = torch.randint(0, 27, (256, 3))
    y = torch.randint(0, 27, (256,))
    for lr in (0.01, 0.02, 0.005):
        for model, opt in ((a, ref), (b, ours)):
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert_same_weights(a, b)
