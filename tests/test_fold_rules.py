"""The fold planner's pieces on their own: the traced-graph facts (_Graph), each rule's
pattern and check (_IntoPreceding, _IntoFollowing), and _match, which applies one rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnfold.fold.modules import (
    INTO_FOLLOWING,
    INTO_PRECEDING,
    RULES,
    _Graph,
    _IntoFollowing,
    _IntoPreceding,
    _match,
    _Plan,
    _trace,
)


def graph(model: nn.Module) -> _Graph:
    model = model.eval()
    return _Graph(model, _trace(model))


def bn_call(g: _Graph, name: str) -> torch.fx.Node:
    return g.calls[name][0]


class TwoCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.lin(self.bn(self.lin(x)))


class Forked(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.bn, self.out = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.lin(x)
        return self.out(self.bn(h)) + h.sum()


def test_the_graph_knows_shared_modules_and_why():
    g = graph(TwoCalls())
    assert g.shared("lin") == "called 2 times (shared by several paths)"
    assert g.shared("bn") is None
    layer, clone_of, note = g.target(g.calls["lin"][0])
    assert clone_of == "lin" and layer != "lin" and "lin" in note  # a copy for this call
    aliased = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    aliased.alias = aliased[0]
    assert "several names" in graph(aliased).shared("0")


def test_a_bn_refusal_comes_before_any_rule():
    bn = nn.BatchNorm1d(4, track_running_stats=False)
    g = graph(nn.Sequential(nn.Linear(4, 4), bn))
    assert "track_running_stats=False" in g.bn_refusal("1")
    hooked = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    hooked[1].register_forward_hook(lambda *a: None)
    assert graph(hooked).bn_refusal("1") == "the BN has forward hooks"
    assert graph(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))).bn_refusal("1") is None


def test_into_preceding_matches_a_layer_output_that_feeds_only_the_bn():
    rule = _IntoPreceding()
    g = graph(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    call = rule.pattern(bn_call(g, "1"))
    assert call.target == "0" and rule.check(g, call, bn_call(g, "1")) is None
    g = graph(nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 4)))
    assert "model input" in rule.pattern(bn_call(g, "0"))  # no layer before it
    g = graph(Forked())
    call = rule.pattern(bn_call(g, "bn"))
    assert "also used by" in rule.check(g, call, bn_call(g, "bn"))


def test_into_following_refuses_zero_padding_and_forks():
    rule = _IntoFollowing()
    g = graph(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)))
    call = rule.pattern(bn_call(g, "0"))
    assert "zero-pads" in rule.check(g, call, bn_call(g, "0"))
    g = graph(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)))  # no padding: folds
    call = rule.pattern(bn_call(g, "0"))
    assert rule.check(g, call, bn_call(g, "0")) is None
    g = graph(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    assert "goes to output" in rule.pattern(bn_call(g, "1"))  # the model's output: no layer


def test_match_plans_the_fold_and_a_layer_side_takes_one_bn():
    g = graph(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)))
    plans = [_match(rule, g, "1", (5, 4), set()) for rule in RULES]
    assert [p.direction for p in plans] == [INTO_PRECEDING, INTO_FOLLOWING]
    assert all(isinstance(p, _Plan) for p in plans)
    assert (plans[0].layer, plans[1].layer) == ("0", "2")
    taken = {(plans[0].call.name, "out")}
    assert _match(RULES[0], g, "1", (5, 4), taken).endswith("already absorbed a BN on its output")


@pytest.mark.parametrize("shape, folds", [((5, 4), True), ((2, 4, 4), False)])
def test_match_checks_the_channel_axis_on_the_recorded_shape(shape, folds):
    g = graph(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    found = _match(RULES[0], g, "1", shape, set())
    assert isinstance(found, _Plan) is folds
