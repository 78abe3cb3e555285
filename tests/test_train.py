from __future__ import annotations

import copy
import math
import os
import signal
import threading

import pytest
import torch
import torch.nn.functional as F

from bnfold.data import load_dataset
from bnfold.errors import BnfoldError
from bnfold.model import MLP, ModelConfig
from bnfold.train import PRESETS, TrainConfig, calibrate_batchnorm, split_loss, train


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


def test_short_run_learns_and_is_deterministic(data):
    cfg = TrainConfig.from_preset("fast", steps=300, batch_size=256)
    a = train(data, ModelConfig(), cfg, progress=False)
    b = train(data, ModelConfig(), cfg, progress=False)
    assert a.metrics["dev_loss"] < math.log(27) - 0.8  # 3.30 at init
    for (ka, va), (kb, vb) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert ka == kb and torch.equal(va, vb), ka
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


def test_ctrl_c_stops_cleanly_and_keeps_completed_steps(data):
    cfg = TrainConfig.from_preset("fast", steps=50_000)
    timer = threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    result = train(data, ModelConfig(), cfg, progress=False)
    timer.join()
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
