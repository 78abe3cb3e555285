"""Folding: the tensor rules, the whole-model entry point, and every refusal.

Ground truth is always an independent float64 evaluation of the *unfolded* network by
torch's own BatchNorm modules in eval mode (``copy.deepcopy(model).double().eval()``), never
anything computed by bnfold.fold.modules.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from bnfold.errors import BnfoldError
from bnfold.fold.modules import (
    INTO_FOLLOWING,
    INTO_PRECEDING,
    fold_batchnorm,
    fold_bn_conv,
    fold_bn_into_following,
    fold_bn_into_preceding,
    fold_bn_linear,
    fold_conv_bn,
    fold_linear_bn,
)
from bnfold.mlp.model import MLP, ModelConfig

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def randomise_bn(bn: nn.modules.batchnorm._BatchNorm, gen: torch.Generator, tiny: bool) -> None:
    """Random running stats (log-uniform variances, down to 1e-8 when ``tiny``) and, for an
    affine BN, random gamma (either sign) and beta."""
    c = bn.num_features
    lo = math.log(1e-8) if tiny else math.log(1e-2)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen) * 2)
        bn.running_var.copy_(torch.exp(torch.empty(c).uniform_(lo, math.log(10), generator=gen)))
        if bn.affine:
            bn.weight.copy_(torch.randn(c, generator=gen))
            bn.bias.copy_(torch.randn(c, generator=gen))


def float64_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    ref = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        return ref(x.double() if x.is_floating_point() else x)


def bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# ------------------------------------------------------------------ model builders


def build(kind: str, draw, gen: torch.Generator):
    """(model, example input) for one topology; all BNs randomised."""
    c_in = draw(st.integers(1, 6))
    c_out = draw(st.integers(1, 6))
    bias = draw(st.booleans())
    affine = draw(st.booleans())
    tiny = draw(st.booleans())
    batch = draw(st.integers(1, 5))
    if kind == "linear_bn":
        model = nn.Sequential(
            nn.Linear(c_in, c_out, bias=bias), nn.BatchNorm1d(c_out, affine=affine)
        )
        x = torch.randn(batch, c_in, generator=gen)
    elif kind == "bn_linear":
        model = nn.Sequential(
            nn.BatchNorm1d(c_in, affine=affine), nn.Linear(c_in, c_out, bias=bias)
        )
        x = torch.randn(batch, c_in, generator=gen)
    elif kind == "tanh_bn_linear_bn":  # BN folded forward and backward into the same Linear
        model = nn.Sequential(
            nn.Tanh(),
            nn.BatchNorm1d(c_in, affine=affine),
            nn.Linear(c_in, c_out, bias=bias),
            nn.BatchNorm1d(c_out, affine=not affine),
        )
        x = torch.randn(batch, c_in, generator=gen)
    elif kind in ("conv1d_bn", "conv2d_bn"):
        d = 1 if kind == "conv1d_bn" else 2
        conv = (nn.Conv1d, nn.Conv2d)[d - 1]
        bnc = (nn.BatchNorm1d, nn.BatchNorm2d)[d - 1]
        k = draw(st.integers(1, 3))
        pad = draw(st.integers(0, 1))
        model = nn.Sequential(
            conv(c_in, c_out, k, padding=pad, bias=bias), bnc(c_out, affine=affine)
        )
        x = torch.randn(batch, c_in, *([k + 2] * d), generator=gen)
    elif kind in ("bn_conv1d", "bn_conv2d"):
        d = 1 if kind == "bn_conv1d" else 2
        conv = (nn.Conv1d, nn.Conv2d)[d - 1]
        bnc = (nn.BatchNorm1d, nn.BatchNorm2d)[d - 1]
        k = draw(st.integers(1, 3))
        groups = draw(st.sampled_from([1, 2]))
        padding_mode = draw(st.sampled_from(["zeros", "replicate", "circular"]))
        pad = 0 if padding_mode == "zeros" else draw(st.integers(0, 1))
        c_in, c_out = c_in * groups, c_out * groups
        layer = conv(
            c_in, c_out, k, padding=pad, padding_mode=padding_mode, bias=bias, groups=groups
        )
        model = nn.Sequential(bnc(c_in, affine=affine), layer)
        x = torch.randn(batch, c_in, *([k + 2] * d), generator=gen)
    elif kind == "scalar_bn_3d":  # BatchNorm1d(1) on (N, 1, F): a scalar map, folds anyway
        model = nn.Sequential(nn.Linear(c_in, c_out, bias=bias), nn.BatchNorm1d(1, affine=affine))
        x = torch.randn(batch, 1, c_in, generator=gen)
    else:
        raise AssertionError(kind)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            randomise_bn(m, gen, tiny)
    return model.eval(), x


KINDS = [
    "linear_bn",
    "bn_linear",
    "tanh_bn_linear_bn",
    "conv1d_bn",
    "conv2d_bn",
    "bn_conv1d",
    "bn_conv2d",
    "scalar_bn_3d",
]


@SETTINGS
@given(kind=st.sampled_from(KINDS), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_fold_matches_float64_unfolded_network(kind, data, seed):
    """Folding in float64 reproduces the unfolded float64 network to ~1e-12 relative, for
    every topology, with and without bias/affine, tiny variances and one-channel BNs."""
    gen = torch.Generator().manual_seed(seed)
    model, x = build(kind, data.draw, gen)
    expected = float64_reference(model, x)
    folded, report = fold_batchnorm(model.double(), example_input=x.double())
    assert report.complete and bn_count(folded) == 0, report.format()
    assert not folded.training
    with torch.no_grad():
        got = folded(x.double())
    scale = 1 + expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 1e-10 * scale
    directions = {f.direction for f in report.folded}
    if kind.startswith("bn_"):
        assert directions == {INTO_FOLLOWING}
    elif kind == "tanh_bn_linear_bn":
        assert directions == {INTO_FOLLOWING, INTO_PRECEDING}
    else:
        assert directions == {INTO_PRECEDING}


@SETTINGS
@given(kind=st.sampled_from(KINDS), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_float32_fold_stays_float32_and_close(kind, data, seed):
    """A float32 model folds to float32 weights (computed in float64, cast once) whose
    error against the float64 unfolded network is float32-rounding sized."""
    gen = torch.Generator().manual_seed(seed)
    model, x = build(kind, data.draw, gen)
    folded, report = fold_batchnorm(model, example_input=x)
    assert report.complete
    assert all(p.dtype == torch.float32 for p in folded.parameters())
    expected = float64_reference(model, x)
    with torch.no_grad():
        got = folded(x).double()
    # bound: float32 rounding of every term, amplified by the largest BN scale
    s_max = max(
        (m.weight.abs().max().item() if m.affine else 1.0) / math.sqrt(m.running_var.min() + m.eps)
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    )
    scale = (1 + expected.abs().max().item()) * (1 + s_max) * (1 + x.abs().max().item())
    assert (got - expected).abs().max().item() <= 1e-5 * scale


@SETTINGS
@given(
    out=st.integers(1, 8),
    inp=st.integers(1, 8),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_agrees_with_torch_fusion_linear(out, inp, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    lin, bn = nn.Linear(inp, out, bias=bias).eval(), nn.BatchNorm1d(out).eval()
    randomise_bn(bn, gen, tiny=False)
    ours, theirs = fold_linear_bn(lin, bn), fuse_linear_bn_eval(lin, bn)
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.bias, theirs.bias, rtol=1e-5, atol=1e-6)


@SETTINGS
@given(
    d=st.sampled_from([1, 2]),
    out=st.integers(1, 6),
    inp=st.integers(1, 6),
    k=st.integers(1, 3),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_agrees_with_torch_fusion_conv(d, out, inp, k, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    conv = (nn.Conv1d, nn.Conv2d)[d - 1](inp, out, k, bias=bias).eval()
    bn = (nn.BatchNorm1d, nn.BatchNorm2d)[d - 1](out).eval()
    randomise_bn(bn, gen, tiny=False)
    ours, theirs = fold_conv_bn(conv, bn), fuse_conv_bn_eval(conv, bn)
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.bias, theirs.bias, rtol=1e-5, atol=1e-6)


def test_affine_false_folds_where_torch_fusion_raises():
    gen = torch.Generator().manual_seed(0)
    lin, bn = nn.Linear(3, 4).eval(), nn.BatchNorm1d(4, affine=False).eval()
    randomise_bn(bn, gen, tiny=False)
    with pytest.raises(TypeError):  # pytorch#122183: bn.weight is None
        fuse_linear_bn_eval(lin, bn)
    x = torch.randn(5, 3, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(fold_linear_bn(lin, bn)(x), bn(lin(x)), rtol=1e-5, atol=1e-5)


def test_pure_functions_on_one_channel_and_missing_bias():
    w = torch.tensor([[2.0, -1.0]])
    new_w, new_b = fold_bn_into_preceding(
        w, None, torch.tensor([0.5]), torch.tensor([3.0]), 1.0, torch.tensor([4.0]), None
    )
    s = 4.0 / 2.0  # gamma / sqrt(var + eps)
    torch.testing.assert_close(new_w, w * s)
    torch.testing.assert_close(new_b, torch.tensor([-0.5 * s]))
    # following: BN over 2 inputs, one output
    new_w, new_b = fold_bn_into_following(
        w, torch.tensor([1.0]), torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]), 0.25
    )
    torch.testing.assert_close(new_w, torch.tensor([[4.0, -2.0]]))  # s = 2
    # b + W @ t, t = -mean * s = [-2, -4]: 1 + (2*-2 + -1*-4) = 1
    torch.testing.assert_close(new_b, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="channels"):
        fold_bn_into_preceding(w, None, torch.zeros(3), torch.ones(3), 1e-5)
    with pytest.raises(ValueError, match="not positive"):
        fold_bn_into_preceding(w, None, torch.zeros(1), -torch.ones(1), 1e-5)


def test_module_helpers_refuse_padded_conv_and_fold_linear():
    bn = nn.BatchNorm1d(3).eval()
    randomise_bn(bn, torch.Generator().manual_seed(1), tiny=False)
    with pytest.raises(ValueError, match="zero-pads"):
        fold_bn_conv(bn, nn.Conv1d(3, 2, 3, padding=1))
    lin = nn.Linear(3, 2).eval()
    x = torch.randn(4, 3)
    with torch.no_grad():
        torch.testing.assert_close(fold_bn_linear(bn, lin)(x), lin(bn(x)), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ our MLP


def trained_like_mlp(config: ModelConfig) -> MLP:
    torch.manual_seed(0)
    model = MLP(config).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(0, config.vocab_size, (64, config.block_size)))
    return model.eval()


def test_mlp_folds_to_batchnorm_false_mlp():
    config = ModelConfig(n_layers=3, n_hidden=16)
    model = trained_like_mlp(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, report = fold_batchnorm(model)
    assert type(folded) is MLP and folded.config == replace(config, batchnorm=False)
    assert report.complete and len(report.folded) == 4 and report.shapes_checked
    fresh = MLP(replace(config, batchnorm=False))
    fresh.load_state_dict(folded.state_dict())  # strict: identical layout
    assert bn_count(folded) == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # input untouched
    x = torch.cartesian_prod(*[torch.arange(config.vocab_size)] * config.block_size)
    expected = float64_reference(model, x)
    with torch.no_grad():
        assert (folded(x).double() - expected).abs().max().item() < 1e-5


def test_train_mode_is_folded_with_running_stats_and_said_so():
    model = trained_like_mlp(ModelConfig(n_layers=2, n_hidden=8)).train()
    folded, report = fold_batchnorm(model)
    assert model.training  # the input is left as it was
    assert not folded.training
    assert any("train mode" in n for n in report.notes)
    x = torch.randint(0, 27, (10, 3))
    with torch.no_grad():
        ref = copy.deepcopy(model).eval()(x)
        torch.testing.assert_close(folded(x), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ refusals


def test_refuses_bn_without_running_stats():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    folded, report = fold_batchnorm(model)
    assert not report.complete and "track_running_stats=False" in report.skipped[0].reason
    assert bn_count(folded) == 1
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[1].running_var = None
    _, report = fold_batchnorm(model)
    assert "no running statistics" in report.skipped[0].reason


def _close_to_float64(model: nn.Module, folded: nn.Module, x: torch.Tensor) -> None:
    expected = float64_reference(model, x)
    with torch.no_grad():
        got = folded(x).double()
    assert (got - expected).abs().max().item() <= 1e-4 * (1 + expected.abs().max().item())


def test_shared_layer_is_cloned_for_the_folded_call():
    """A layer registered twice, or called twice: the call before the BN gets a copy with
    the BN folded in, the other call keeps the original weights."""
    gen = torch.Generator().manual_seed(11)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.BatchNorm1d(4), nn.Tanh(), lin).eval()
    randomise_bn(model[1], gen, tiny=False)
    x = torch.randn(3, 4, generator=gen)
    folded, report = fold_batchnorm(model, example_input=x)
    assert report.complete and "folded into a copy" in report.folded[0].note
    assert isinstance(folded, torch.fx.GraphModule) and bn_count(folded) == 0
    _close_to_float64(model, folded, x)
    assert torch.equal(lin.weight, model[3].weight)  # the input model is untouched

    class TwiceLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.lin(x)) + self.lin(x * 2)

    model = TwiceLinear().eval()
    randomise_bn(model.bn, gen, tiny=False)
    folded, report = fold_batchnorm(model, example_input=x)
    assert report.complete and report.folded[0].layer == "lin"
    assert "lin is called 2 times" in report.folded[0].note
    _close_to_float64(model, folded, x)
    # the same structure but no example input: the axis cannot be proven, it is refused
    _, report = fold_batchnorm(TwiceLinear())
    assert not report.complete and "pass example_input" in report.skipped[0].reason


def test_refuses_shared_bn():
    class TwiceBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Linear(4, 4), nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.a(x)) + self.bn(self.b(x))

    _, report = fold_batchnorm(TwiceBN(), example_input=torch.randn(2, 4))
    assert "called 2 times" in report.skipped[0].reason


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_transpose_bn_folds(dims, groups):
    gen = torch.Generator().manual_seed(dims * 10 + groups)
    conv_t = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1]
    bn_t = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
    model = nn.Sequential(
        conv_t(4, 6, 3, stride=2, groups=groups, output_padding=1, bias=groups == 1),
        bn_t(6),
    ).eval()
    randomise_bn(model[1], gen, tiny=False)
    x = torch.randn(2, 4, *([4] * dims), generator=gen)
    folded, report = fold_batchnorm(model, example_input=x)
    assert report.complete and report.folded[0].direction == INTO_PRECEDING
    assert bn_count(folded) == 0
    _close_to_float64(model, folded, x)


def test_bn_before_conv_transpose_is_refused():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 2, 2, stride=2))
    _, report = fold_batchnorm(model, example_input=torch.randn(1, 3, 4, 4))
    assert not report.complete and "spreads the BN's shift" in report.skipped[0].reason


def test_skip_reasons_name_functions_without_addresses():
    class Relu(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn = nn.Linear(3, 3), nn.BatchNorm1d(3)

        def forward(self, x):
            return torch.sigmoid(self.bn(torch.relu(self.lin(x))))

    _, report = fold_batchnorm(Relu(), example_input=torch.randn(2, 3))
    reason = report.skipped[0].reason
    assert "relu" in reason and "sigmoid" in reason and "0x" not in reason, reason
    assert reason == fold_batchnorm(Relu(), example_input=torch.randn(2, 3))[1].skipped[0].reason


def test_refuses_bn_whose_input_has_other_consumers():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x):
            h = self.lin(x)
            return self.bn(h) + h

    folded, report = fold_batchnorm(Skip())
    assert not report.complete and "also used by" in report.skipped[0].reason
    assert isinstance(folded.bn, nn.BatchNorm1d)


def test_refuses_bn_whose_output_has_other_consumers_when_folding_forward():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.lin = nn.BatchNorm1d(4), nn.Linear(4, 4)

        def forward(self, x):
            y = self.bn(x)
            return self.lin(y) + y

    _, report = fold_batchnorm(Fork())
    assert "2 consumers" in report.skipped[0].reason


def test_channel_axis_mismatch_is_refused_with_example_input():
    """BatchNorm1d after a Linear on 3-D input normalises axis 1, not the Linear's features:
    torch's fuse_linear_bn_eval folds this silently wrong; bnfold refuses."""
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5)).eval()
    randomise_bn(model[1], torch.Generator().manual_seed(3), tiny=False)
    x = torch.randn(2, 5, 4)
    folded, report = fold_batchnorm(model, example_input=x)
    assert not report.complete and "channel axes differ" in report.skipped[0].reason
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))
        wrong = fuse_linear_bn_eval(model[0], model[1])(x)
    assert (wrong - model(x)).abs().max() > 1e-3  # the silent error we refuse to make


def test_linear_bn1d_without_example_input_is_refused_not_folded_wrong():
    """BatchNorm1d after a Linear folds right on 2-D input and wrong on 3-D input (max
    error 2.73 on this model): without an example input the rank is unknown, so refuse."""
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5)).eval()
    randomise_bn(model[1], torch.Generator().manual_seed(3), tiny=False)
    folded, report = fold_batchnorm(model)
    assert not report.complete and "pass example_input" in report.skipped[0].reason
    x3 = torch.randn(2, 5, 4)
    with torch.no_grad():
        torch.testing.assert_close(folded(x3), model(x3))
    folded, report = fold_batchnorm(model, example_input=torch.randn(2, 4))
    assert report.complete and report.shapes_checked
    _, report = fold_batchnorm(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm2d(5)))
    assert "channel axes differ" in report.skipped[0].reason
    _, report = fold_batchnorm(nn.Sequential(nn.Conv1d(2, 5, 1), nn.BatchNorm1d(5)))
    assert "unbatched" in report.skipped[0].reason


def test_bn_before_zero_padded_conv_is_refused():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 2, 3, padding=1))
    _, report = fold_batchnorm(model, example_input=torch.randn(1, 3, 5, 5))
    assert not report.complete and "zero-pads" in report.skipped[0].reason


def test_bn_with_no_neighbouring_layer_is_left_with_reason():
    model = nn.Sequential(nn.Tanh(), nn.BatchNorm1d(3), nn.ReLU())
    _, report = fold_batchnorm(model)
    reason = report.skipped[0].reason
    assert "preceding:" in reason and "following:" in reason


def test_untraceable_model_is_a_clear_error():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn = nn.Linear(2, 2), nn.BatchNorm1d(2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: not fx-traceable
                return self.bn(self.lin(x))
            return x

    with pytest.raises(BnfoldError, match="not torch.fx-traceable"):
        fold_batchnorm(Dynamic())


def test_generic_module_keeps_its_class_with_identity():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x))).mean((2, 3))

    model = Net().eval()
    randomise_bn(model.bn, torch.Generator().manual_seed(5), tiny=True)
    x = torch.randn(2, 2, 6, 6)
    folded, report = fold_batchnorm(model, x)
    assert type(folded) is Net and isinstance(folded.bn, nn.Identity)
    assert report.complete and report.example_max_abs_diff is not None
    expected = float64_reference(model, x)
    with torch.no_grad():
        got = folded(x).double()
    assert (got - expected).abs().max().item() <= 1e-4 * (1 + expected.abs().max().item())
