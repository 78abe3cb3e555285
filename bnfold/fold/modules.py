"""Fold every eval-mode BatchNorm into the neighbouring Linear/Conv/ConvTranspose layer, and say
what was done.

In eval mode a BatchNorm is a fixed per-channel affine map ``bn(x) = x * s + t`` with
``s = gamma / sqrt(running_var + eps)`` and ``t = beta - running_mean * s``. That map can be
absorbed by the layer just before it (scale the layer's output rows) or, when nothing else
sits in between, by the layer just after it (scale the layer's input columns and push the
shift through the weights). All arithmetic is done in float64 and cast back once, to the
layer's own dtype.

The fold arithmetic is :mod:`bnfold.fold.algebra`'s (float64 numpy, shared with the ONNX folder);
its torch face (:func:`bn_scale_shift`, :func:`fold_bn_into_preceding`,
:func:`fold_bn_into_following`) works on tensors, in the spirit of
``torch.nn.utils.fusion``. The module-level helpers (:func:`fold_linear_bn`,
:func:`fold_conv_bn`, :func:`fold_bn_linear`, :func:`fold_bn_conv`) return new layers. The
entry point :func:`fold_batchnorm` folds a whole model (any ``nn.Sequential``, any
``torch.fx``-traceable module; a model may say how it is folded, see :class:`FoldsItself`)
into a *new* model in eval mode and
returns a :class:`FoldReport` listing what it folded and what it left alone and why. It
never folds when it cannot show the fold is exact: it skips with a reason instead.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from bnfold.errors import BnfoldError
from bnfold.fold import algebra

Tensor = torch.Tensor
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LAYER_TYPES = (nn.Linear, *CONV_TYPES, *TRANSPOSED_TYPES)
INTO_PRECEDING, INTO_FOLLOWING = algebra.INTO_PRECEDING, algebra.INTO_FOLLOWING


# --------------------------------------------------------------------------------------
# The algebra's torch face (the arithmetic itself is bnfold.fold.algebra's, in float64)
# --------------------------------------------------------------------------------------


def _f64(t: Tensor | None) -> np.ndarray | None:
    """A tensor's values as a float64 numpy array (exact for every float dtype)."""
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float64).numpy()


def _cast(
    new_w: np.ndarray,
    new_b: np.ndarray,
    weight: Tensor,
    bias: Tensor | None,
    dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor]:
    """The float64 results cast once: to ``dtype``, else the layer's own dtypes (the
    bias's, or the weight's for a layer without one), on the weight's device."""
    wd = dtype or weight.dtype
    bd = dtype or (bias.dtype if bias is not None else weight.dtype)
    return (
        torch.from_numpy(new_w).to(device=weight.device, dtype=wd),
        torch.from_numpy(new_b).to(device=weight.device, dtype=bd),
    )


def _scale_shift(
    mean: Tensor, var: Tensor, eps: float, gamma: Tensor | None, beta: Tensor | None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`bnfold.fold.algebra.bn_scale_shift` of a BatchNorm's tensors (float64 numpy)."""
    return algebra.bn_scale_shift(_f64(mean), _f64(var), eps, _f64(gamma), _f64(beta))


def bn_scale_shift(
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The eval-mode BatchNorm as ``x * scale + shift`` per channel, both float64 (C,):
    ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale``; ``weight`` and
    ``bias`` (gamma, beta) ``None`` for ``affine=False``.

    Raises:
        ValueError: ``running_var + eps`` is not positive, or the statistics or
        parameters are not finite.
    """
    scale, shift = _scale_shift(running_mean, running_var, eps, weight, bias)
    return torch.from_numpy(scale), torch.from_numpy(shift)


def bias64(bias: Tensor | None, out: int) -> Tensor:
    """A layer's bias in float64, zeros for a layer without one."""
    return torch.from_numpy(algebra.bias64(_f64(bias), out))


def fold_bn_into_preceding(
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    bn_weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Weights of ``layer`` such that ``layer'(x) == bn(layer(x))`` (BN after the layer):
    ``W' = W * s`` per output row, ``b' = (b - mean) * s + beta``
    (:func:`bnfold.fold.algebra.fold_into_preceding`), computed in float64 and cast once
    to ``dtype`` (default: the layer's own). ``weight``: Linear ``(out, in)`` or Conv
    ``(out, in/groups, *k)``; ``bias`` ``None`` is zero (the result always has one)."""
    scale, shift = _scale_shift(running_mean, running_var, eps, bn_weight, bn_bias)
    new_w, new_b = algebra.fold_into_preceding(_f64(weight), _f64(bias), scale, shift)
    return _cast(new_w, new_b, weight, bias, dtype)


def fold_bn_into_following(
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    bn_weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
    groups: int = 1,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Weights of ``layer`` such that ``layer'(x) == layer(bn(x))`` (BN before the layer):
    ``W' = W * s`` along the input axis, ``b' = b + W @ t``
    (:func:`bnfold.fold.algebra.fold_into_following`; exact for a Conv only when it never
    reads padding zeros: the caller checks that), in float64, cast once to ``dtype``."""
    scale, shift = _scale_shift(running_mean, running_var, eps, bn_weight, bn_bias)
    new_w, new_b = algebra.fold_into_following(_f64(weight), _f64(bias), scale, shift, groups)
    return _cast(new_w, new_b, weight, bias, dtype)


# --------------------------------------------------------------------------------------
# Module-level helpers (new modules; inputs untouched)
# --------------------------------------------------------------------------------------


def _bn_stats(bn: _BatchNorm) -> tuple[Tensor, Tensor, float, Tensor | None, Tensor | None]:
    reason = bn_refusal(bn)
    if reason:
        raise ValueError(reason)
    return bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias  # type: ignore[return-value]


def _with_params(layer: nn.Module, weight: Tensor, bias: Tensor) -> nn.Module:
    new = copy.deepcopy(layer)
    rg = layer.weight.requires_grad
    new.weight = nn.Parameter(weight, requires_grad=rg)
    new.bias = nn.Parameter(bias, requires_grad=rg)
    return new.eval()


def fold_linear_bn(linear: nn.Linear, bn: _BatchNorm) -> nn.Linear:
    """A new Linear computing ``bn(linear(x))`` in eval mode, for 2-D ``x`` (or any ``x``
    when the BN has one channel). Works without a Linear bias and with ``affine=False``."""
    return _with_params(linear, *fold_bn_into_preceding(linear.weight, linear.bias, *_bn_stats(bn)))


def fold_into_layer_output(
    layer: nn.Module, weight: Tensor, bias: Tensor | None, bn_stats: tuple, dtype=None
) -> tuple[Tensor, Tensor]:
    """:func:`fold_bn_into_preceding` for any Linear/Conv/ConvTranspose ``layer`` (whose
    ``weight``/``bias`` are given separately, e.g. as float64 work copies): a transposed
    convolution's weight is permuted to output-major layout and back (exact)."""
    if not isinstance(layer, nn.modules.conv._ConvTransposeNd):
        return fold_bn_into_preceding(weight, bias, *bn_stats, dtype=dtype)
    scale, shift = _scale_shift(*bn_stats)
    w = algebra.transposed_as_conv_weight(_f64(weight), layer.groups)
    new_w, new_b = algebra.fold_into_preceding(w, _f64(bias), scale, shift)
    new_w = np.ascontiguousarray(algebra.conv_as_transposed_weight(new_w, layer.groups))
    return _cast(new_w, new_b, weight, bias, dtype)


def fold_conv_bn(conv: nn.modules.conv._ConvNd, bn: _BatchNorm) -> nn.modules.conv._ConvNd:
    """A new Conv or ConvTranspose (any groups) computing ``bn(conv(x))`` in eval mode
    (batched ``x``)."""
    return _with_params(conv, *fold_into_layer_output(conv, conv.weight, conv.bias, _bn_stats(bn)))


def fold_bn_linear(bn: _BatchNorm, linear: nn.Linear) -> nn.Linear:
    """A new Linear computing ``linear(bn(x))`` in eval mode, for 2-D ``x`` (or any ``x``
    when the BN has one channel)."""
    return _with_params(linear, *fold_bn_into_following(linear.weight, linear.bias, *_bn_stats(bn)))


def conv_following_refusal(conv: nn.Module) -> str | None:
    """Why a BN in front of ``conv`` cannot be folded into it, or ``None`` if it can.

    The BN's shift ``t`` becomes a constant per-channel input offset; the convolution maps
    it to a constant output offset only if it never sees zero padding (zero-padding pads
    with 0, not with ``t``). Replicate/reflect/circular padding keeps constants constant.
    """
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        return (
            f"a BN before a {type(conv).__name__} does not fold: a transposed convolution spreads"
            " the BN's shift unevenly over its output, so it is not a constant bias"
        )
    if not isinstance(conv, CONV_TYPES):
        return f"{type(conv).__name__} is not a supported convolution"
    if conv.padding_mode != "zeros":
        return None
    pad = conv.padding
    if pad == "valid":
        return None
    if pad == "same":
        if all(d * (k - 1) == 0 for d, k in zip(conv.dilation, conv.kernel_size, strict=True)):
            return None
        return (
            "the convolution zero-pads its input ('same'); the BN shift would not reach the padding"
        )
    if any(int(p) != 0 for p in pad):
        return (
            f"the convolution zero-pads its input (padding={tuple(pad)}); the BN shift would"
            " not reach the padding, so folding forward is not exact"
        )
    return None


def fold_bn_conv(bn: _BatchNorm, conv: nn.modules.conv._ConvNd) -> nn.modules.conv._ConvNd:
    """A new Conv computing ``conv(bn(x))`` in eval mode (batched ``x``). Refuses
    (``ValueError``) when the convolution zero-pads, since then no fold is exact."""
    reason = conv_following_refusal(conv)
    if reason:
        raise ValueError(reason)
    w, b = fold_bn_into_following(conv.weight, conv.bias, *_bn_stats(bn), groups=conv.groups)
    return _with_params(conv, w, b)


def bn_refusal(bn: nn.Module) -> str | None:
    """Why ``bn`` cannot be folded at all (no usable running statistics), or ``None``."""
    if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
        return "lazy BatchNorm that has not been initialised yet"
    if not getattr(bn, "track_running_stats", False):
        return (
            "track_running_stats=False: it normalises with each batch's own statistics even"
            " in eval mode, which is not a fixed affine map"
        )
    if bn.running_mean is None or bn.running_var is None:
        return "no running statistics (running_mean/running_var are None)"
    try:
        bn_scale_shift(bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    except ValueError as e:
        return str(e)
    return None


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FoldedBN:
    """One BatchNorm folded away: ``direction`` is ``into_preceding`` (``layer`` ran just
    before the BN) or ``into_following`` (``layer`` ran just after it)."""

    bn: str
    layer: str
    direction: str
    note: str = ""


@dataclass(frozen=True)
class SkippedBN:
    """One BatchNorm left in the model, and why."""

    bn: str
    reason: str


@dataclass
class FoldReport:
    model_type: str
    folded: list[FoldedBN] = field(default_factory=list)
    skipped: list[SkippedBN] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shapes_checked: bool = False  # channel axes checked by shape propagation on an example
    seconds: float = 0.0
    example_max_abs_diff: float | None = None  # original vs folded on the example input

    @property
    def complete(self) -> bool:
        """Every BatchNorm in the model was folded."""
        return not self.skipped

    def to_dict(self) -> dict:
        d = asdict(self)
        d["complete"] = self.complete
        return d

    def format(self) -> str:
        lines = [
            f"folded {len(self.folded)} BatchNorm(s) of {self.model_type}, left {len(self.skipped)}"
        ]
        for f in self.folded:
            arrow = (
                f"{f.layer} <- {f.bn}" if f.direction == INTO_PRECEDING else f"{f.bn} -> {f.layer}"
            )
            lines.append(f"  folded  {arrow}  ({f.direction.replace('_', ' ')})")
            if f.note:
                lines.append(f"          note: {f.note}")
        for s in self.skipped:
            lines.append(f"  left    {s.bn}: {s.reason}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        if self.example_max_abs_diff is not None:
            lines.append(
                f"  example input: max |original - folded| = {self.example_max_abs_diff:.3g}"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Whole-model folding
# --------------------------------------------------------------------------------------


@dataclass
class _Plan:
    bn: str
    layer: str  # the module folded into (a clone's name when ``clone_of`` is set)
    direction: str
    note: str = ""
    clone_of: str | None = None  # the shared module this call's clone copies
    call: torch.fx.Node | None = None  # the layer's call node (retargeted to the clone)


class _Tracer(torch.fx.Tracer):
    """Stock tracer; BatchNorm, Linear and Conv stay leaves (they are torch.nn modules)."""


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, NotImplementedError)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BnfoldError(
            f"cannot fold {type(model).__name__}: it is not torch.fx-traceable ({msg[:160]});"
            " fold its traceable submodules (e.g. nn.Sequential parts) instead"
        ) from None
    return torch.fx.GraphModule(model, graph)


class _ShapeRecorder(torch.fx.Interpreter):
    """Run the graph once and record each tensor-valued node's shape in ``node.meta``.
    (torch's ShapeProp does the same but imports sympy on first use: ~1 s.)"""

    def run_node(self, n: torch.fx.Node):
        result = super().run_node(n)
        if isinstance(result, Tensor):
            n.meta["bnfold_shape"] = tuple(result.shape)
        return result


def _describe(arg) -> str:
    """A node in words, without object addresses (reasons must be reproducible)."""
    if not isinstance(arg, torch.fx.Node):
        return type(arg).__name__
    if arg.op == "placeholder":
        return f"the model input {arg.target}"
    if arg.op == "call_function":
        name = getattr(arg.target, "__qualname__", None) or getattr(arg.target, "__name__", "")
        module = getattr(arg.target, "__module__", None) or ""
        return f"function {module + '.' if module else ''}{name or type(arg.target).__name__}"
    if arg.op == "call_method":
        return f"method .{arg.target}()"
    return str(arg.target)


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    return node.meta.get("bnfold_shape")


def _axis_problem(
    layer: nn.Module, bn: _BatchNorm, shape: tuple[int, ...] | None
) -> tuple[str | None, str]:
    """(reason to refuse or None, note). ``shape`` is the BN's input shape when known.

    The BN normalises axis 1 of its input; the layer's feature axis is the last axis for a
    Linear and axis ``ndim - spatial - 1`` for a Conv (axis 1 when batched). A one-channel
    BN is a scalar affine map and folds whatever the axes.
    """
    if bn.num_features == 1:
        return None, ""
    is_linear = isinstance(layer, nn.Linear)
    spatial = 0 if is_linear else len(layer.kernel_size)
    bn_rank = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}.get(type(bn))
    lname = type(layer).__name__
    if shape is not None:
        ndim = len(shape)
        layer_axis = ndim - 1 if is_linear else ndim - spatial - 1
        if layer_axis != 1:
            return (
                f"the BN normalises axis 1 of a {ndim}-D tensor {list(shape)} but the {lname}'s"
                f" feature axis is {layer_axis}: the channel axes differ, folding would be wrong",
                "",
            )
        return None, ""
    # No example input: decide from module types alone and say so.
    if bn_rank is None:  # SyncBatchNorm or a subclass: accepts any rank
        return (
            f"{type(bn).__name__} accepts inputs of any rank; pass an example input so the"
            " channel axis can be checked",
            "",
        )
    if is_linear:
        if 2 not in bn_rank:
            return (
                f"{type(bn).__name__} normalises axis 1 of a {bn_rank[0]}-D tensor but a Linear"
                " acts on the last axis: the channel axes differ",
                "",
            )
        # On 3-D input (N, L, F) a Linear acts on F but BatchNorm1d on L: the same module
        # pair folds right for one rank and wrong for the other, so only shapes can tell.
        return (
            f"{type(bn).__name__} after a Linear: its channel axis is the Linear's feature"
            " axis only on 2-D input, and with no example input the rank cannot be proven;"
            " pass example_input",
            "",
        )
    conv_rank = spatial + 2
    if conv_rank not in bn_rank:
        return (
            f"{type(bn).__name__} expects {bn_rank[-1]}-D input but {lname} works on"
            f" {conv_rank}-D batches: the channel axes cannot match",
            "",
        )
    if len(bn_rank) > 1:  # BatchNorm1d with Conv1d: unbatched (C, L) would also run
        return (
            f"{type(bn).__name__} with a {lname}: on unbatched (C, L) input the channel axes"
            " differ, and with no example input the rank cannot be proven; pass example_input",
            "",
        )
    return None, ""


class _Graph:
    """What planning knows of the traced model: its modules by name, every name each module
    is registered under, and the call nodes of each module."""

    def __init__(self, root: nn.Module, gm: torch.fx.GraphModule):
        self.gm = gm
        self.modules = dict(root.named_modules())
        self.aliases: dict[int, list[str]] = {}
        for name, m in root.named_modules(remove_duplicate=False):
            self.aliases.setdefault(id(m), []).append(name)
        self.calls: dict[str, list[torch.fx.Node]] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.calls.setdefault(node.target, []).append(node)

    def shared(self, name: str) -> str | None:
        """Why module ``name`` is shared (several names, or several calls), or None."""
        names = self.aliases.get(id(self.modules[name]), [name])
        if len(names) > 1:
            return f"registered under several names ({', '.join(names)})"
        if len(self.calls.get(name, [])) > 1:
            return f"called {len(self.calls[name])} times (shared by several paths)"
        return None

    def layer_refusal(self, name: str) -> str | None:
        """Why module ``name`` cannot take a BN in at all, or None."""
        m = self.modules[name]
        if not isinstance(m, LAYER_TYPES):
            return f"{type(m).__name__} is not a Linear/Conv/ConvTranspose layer"
        if parametrize.is_parametrized(m):
            return f"{name} has parametrizations (e.g. weight_norm)"
        if m._forward_hooks or m._forward_pre_hooks:
            return f"{name} has forward hooks"
        return None

    def bn_refusal(self, name: str) -> str | None:
        """Why BN ``name`` folds nowhere (no usable statistics, shared, hooked, never or
        oddly called), or None: then it has exactly one plain call."""
        bn = self.modules[name]
        why = bn_refusal(bn)
        if why is None and self.shared(name):
            why = f"the BN is {self.shared(name)}"
        if why is None and (bn._forward_hooks or bn._forward_pre_hooks):
            why = "the BN has forward hooks"
        nodes = self.calls.get(name, [])
        if why is None and not nodes:
            why = "never called in forward()"
        if why is None and (len(nodes[0].args) != 1 or nodes[0].kwargs):
            why = "called with extra arguments"
        return why

    def target(self, call: torch.fx.Node) -> tuple[str, str | None, str]:
        """(module to fold into, module it clones or None, note). A shared layer is
        cloned for this one call: its other calls keep the original weights, so the fold
        stays exact (the result is then a torch.fx.GraphModule)."""
        why = self.shared(call.target)
        if why is None:
            return call.target, None, ""
        clone = f"{call.target.replace('.', '_')}_bnfold_{call.name}"
        return clone, call.target, f"{call.target} is {why}: folded into a copy for this call"


class _IntoPreceding:
    """Rule: a BN right after a layer whose output feeds nothing else folds into the
    layer's output rows."""

    direction, label, side, side_name = INTO_PRECEDING, "preceding", "out", "output"

    def pattern(self, bn_call: torch.fx.Node) -> torch.fx.Node | str:
        """The layer's call node, or why the BN's input is not a layer's output."""
        src = bn_call.args[0]
        if isinstance(src, torch.fx.Node) and src.op == "call_module":
            return src
        return f"its input comes from {_describe(src)}, not a Linear/Conv/ConvTranspose layer"

    def check(self, g: _Graph, call: torch.fx.Node, bn_call: torch.fx.Node) -> str | None:
        """Why this layer cannot absorb the BN on its output, or None."""
        why = g.layer_refusal(call.target)
        if why is None and len(call.users) > 1:
            others = [u.name for u in call.users if u is not bn_call]
            why = (
                f"the output of {call.target} (the BN's input) is also used by {', '.join(others)}"
            )
        return why


class _IntoFollowing:
    """Rule: a BN whose only consumer is a layer (called on the BN's output alone) folds
    into the layer's input columns, unless the layer zero-pads (see
    :func:`conv_following_refusal`)."""

    direction, label, side, side_name = INTO_FOLLOWING, "following", "in", "input"

    def pattern(self, bn_call: torch.fx.Node) -> torch.fx.Node | str:
        """The consuming layer's call node, or why the BN's output does not go to one."""
        users = list(bn_call.users)
        if len(users) != 1:
            return f"its output has {len(users)} consumers, so it cannot be removed"
        if users[0].op != "call_module":
            return f"its output goes to {_describe(users[0])}, not a layer"
        return users[0]

    def check(self, g: _Graph, call: torch.fx.Node, bn_call: torch.fx.Node) -> str | None:
        """Why this layer cannot absorb the BN on its input, or None."""
        name = call.target
        why = g.layer_refusal(name)
        if why is None and (len(call.args) != 1 or call.kwargs or call.args[0] is not bn_call):
            why = f"{name} is called with extra arguments"
        if why is None and isinstance(g.modules[name], nn.modules.conv._ConvNd):
            why = conv_following_refusal(g.modules[name])
        return why


RULES = (_IntoPreceding(), _IntoFollowing())  # tried in this order: a BN folds once


def _match(
    rule, g: _Graph, bn_name: str, shape: tuple[int, ...] | None, used: set[tuple[str, str]]
) -> _Plan | str:
    """``rule`` applied to BN ``bn_name``: its plan, or why it does not apply. A layer
    takes at most one BN per side (``used``: the sides taken so far)."""
    bn_call = g.calls[bn_name][0]
    call = rule.pattern(bn_call)
    if isinstance(call, str):
        return call
    why = rule.check(g, call, bn_call)
    if why is None and (call.name, rule.side) in used:
        why = f"{call.target} already absorbed a BN on its {rule.side_name}"
    if why is None:
        why, note = _axis_problem(g.modules[call.target], g.modules[bn_name], shape)
    if why is not None:
        return why
    layer, clone_of, cloned = g.target(call)
    note = "; ".join(x for x in (note, cloned) if x)
    return _Plan(bn_name, layer, rule.direction, note, clone_of, call)


def _plan(
    root: nn.Module, gm: torch.fx.GraphModule, shapes_known: bool
) -> tuple[list[_Plan], list[SkippedBN], list[str]]:
    """Decide, for every BN of ``root`` (traced as ``gm``), where it folds (the first of
    :data:`RULES` that applies) or why it can't (every rule's reason)."""
    g = _Graph(root, gm)
    notes: list[str] = []
    if any(
        n.op == "call_function" and n.target in (F.batch_norm, torch.batch_norm)
        for n in gm.graph.nodes
    ):
        notes.append("functional batch_norm calls (F.batch_norm) are not folded")
    plans: list[_Plan] = []
    skipped: list[SkippedBN] = []
    used: set[tuple[str, str]] = set()
    for bn_name in [n for n, m in g.modules.items() if isinstance(m, _BatchNorm)]:
        why = g.bn_refusal(bn_name)
        if why:
            skipped.append(SkippedBN(bn_name, why))
            continue
        src = g.calls[bn_name][0].args[0]
        shape = _shape(src) if shapes_known and isinstance(src, torch.fx.Node) else None
        reasons = []
        for rule in RULES:
            found = _match(rule, g, bn_name, shape, used)
            if isinstance(found, _Plan):
                plans.append(found)
                used.add((found.call.name, rule.side))
                break
            reasons.append(f"{rule.label}: {found}")
        else:
            skipped.append(SkippedBN(bn_name, "; ".join(reasons)))
    return plans, skipped, notes


def _apply(modules: dict[str, nn.Module], plans: list[_Plan]) -> None:
    """Fold the planned BNs into their layers: float64 throughout, one cast at the end."""
    work: dict[str, tuple[Tensor, Tensor]] = {}
    for p in plans:
        layer, bn = modules[p.layer], modules[p.bn]
        if p.layer not in work:
            w = layer.weight.detach().double()
            transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
            out = w.shape[1] * layer.groups if transposed else w.shape[0]
            work[p.layer] = (w, bias64(layer.bias, out))
        w, b = work[p.layer]
        stats = (bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        if p.direction == INTO_PRECEDING:
            work[p.layer] = fold_into_layer_output(layer, w, b, stats, dtype=torch.float64)
        else:
            groups = getattr(layer, "groups", 1)
            work[p.layer] = fold_bn_into_following(w, b, *stats, groups=groups, dtype=torch.float64)
    for name, (w, b) in work.items():
        layer = modules[name]
        wd = layer.weight.dtype
        bd = layer.bias.dtype if layer.bias is not None else wd
        w_new, b_new = w.to(wd), b.to(bd)
        rg = layer.weight.requires_grad
        layer.weight = nn.Parameter(w_new, requires_grad=rg)
        layer.bias = nn.Parameter(b_new, requires_grad=rg)


def _overflow(modules: dict[str, nn.Module], plans: list[_Plan]) -> dict[str, str]:
    """BNs whose fold would overflow the layer's dtype: {bn: reason}."""
    bad: dict[str, str] = {}
    trial = {p.layer: copy.deepcopy(modules[p.layer]) for p in plans}
    _apply({**modules, **trial}, plans)
    for p in plans:
        layer = trial[p.layer]
        if not (
            bool(torch.isfinite(layer.weight).all()) and bool(torch.isfinite(layer.bias).all())
        ):
            bad[p.bn] = (
                f"folding into {p.layer} overflows {layer.weight.dtype} (non-finite weights)"
            )
    return bad


@runtime_checkable
class FoldsItself(Protocol):
    """A model that says how it is folded (bnfold's MLP does): the folder knows this
    protocol, not the model."""

    def fold_example_input(self) -> tuple[Tensor, ...]:
        """Positional inputs to check every BatchNorm's channel axis on."""
        ...

    def without_batchnorm(self, folded: nn.Module) -> nn.Module:
        """This model's own form once every BatchNorm folded; ``folded`` is a copy of it
        whose BatchNorms are ``nn.Identity``."""
        ...


def _as_args(example_input) -> tuple:
    if example_input is None:
        return ()
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


def fold_batchnorm(
    model: nn.Module, example_input: Tensor | Sequence[Tensor] | None = None
) -> tuple[nn.Module, FoldReport]:
    """Fold every foldable eval-mode BatchNorm of ``model`` into a neighbouring layer.

    Args:
        model: an ``nn.Sequential``, or any ``torch.fx``-traceable module. Left untouched
            (the work is done on a deep copy).
        example_input: optional input (a tensor or a tuple of positional inputs). With it,
            shapes are propagated so every BN's channel axis is checked against the layer's
            feature axis, and the original and folded models are compared on it. Without it
            the check relies on module types and the report says what was assumed. A
            :class:`FoldsItself` model gives its own.

    Returns:
        ``(new_model, report)``; ``new_model`` is in eval mode. For a :class:`FoldsItself`
        model it is the model's own BatchNorm-free form when every BN folds (bnfold's MLP:
        ``MLP(batchnorm=False)``); a top-level
        ``nn.Sequential`` loses its folded BN entries; any other module keeps its class
        with each folded BN replaced by ``nn.Identity``.

    Folding is defined by eval-mode behaviour: a model in train mode is folded with its
    running statistics (the report says so). BNs are preferably folded into the layer
    before them, otherwise into the layer after them; a BN is left alone, with the reason
    in the report, when it has no running statistics, is shared, its input feeds other
    consumers, its channel axis is not (or, without an example input, cannot be shown to
    be) the layer's feature axis, or the fold would not be exact for another reason. A
    shared *layer* is copied for the call whose BN is folded; the result is then a
    ``torch.fx.GraphModule``.
    """
    if not isinstance(model, nn.Module):
        raise BnfoldError(f"expected an nn.Module, got {type(model).__name__}")
    t0 = time.perf_counter()
    report = FoldReport(model_type=type(model).__name__)
    if any(m.training for m in model.modules()):
        report.notes.append(
            "the model was in train mode: folded with its running statistics, i.e. its"
            " eval-mode behaviour (the result is in eval mode)"
        )
    work = copy.deepcopy(model).eval()
    own = isinstance(model, FoldsItself)
    args = _as_args(example_input) or (model.fold_example_input() if own else ())
    gm = _trace(work)
    if args:
        _record_shapes(gm, args)
        report.shapes_checked = True
    modules = dict(work.named_modules())
    plans, skipped, notes = _plan(work, gm, shapes_known=bool(args))
    report.notes.extend(notes)
    _add_clones(work, modules, plans)
    bad = _overflow(modules, plans)
    skipped.extend(SkippedBN(bn, why) for bn, why in bad.items())
    plans = [p for p in plans if p.bn not in bad]
    _retarget_clones(gm, modules, plans)
    _apply(modules, plans)
    for p in plans:
        work.set_submodule(p.bn, nn.Identity())
    report.folded = [FoldedBN(p.bn, p.clone_of or p.layer, p.direction, p.note) for p in plans]
    order = {n: i for i, n in enumerate(modules)}
    report.skipped = sorted(skipped, key=lambda s: order.get(s.bn, 0))
    result = _result_module(model, work, gm, plans, report).eval()
    if args:
        report.example_max_abs_diff = _example_diff(model, result, args)
    report.seconds = round(time.perf_counter() - t0, 4)
    return result, report


def _record_shapes(gm: torch.fx.GraphModule, args: tuple) -> None:
    """Run ``gm`` on ``args`` once, recording each node's shape; a ``BnfoldError`` when
    the example does not run through the model."""
    try:
        with torch.no_grad():
            _ShapeRecorder(gm).run(*args)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BnfoldError(
            f"the example input does not run through the model: {msg[:200]}"
        ) from None


def _add_clones(work: nn.Module, modules: dict[str, nn.Module], plans: list[_Plan]) -> None:
    """Register a copy of each shared layer a plan folds into (under the plan's layer
    name), in ``work`` and in ``modules``."""
    for p in plans:
        if p.clone_of is not None and p.layer not in modules:
            work.add_module(p.layer, copy.deepcopy(modules[p.clone_of]))
            modules[p.layer] = getattr(work, p.layer)


def _retarget_clones(
    gm: torch.fx.GraphModule, modules: dict[str, nn.Module], plans: list[_Plan]
) -> None:
    """Point each cloned plan's call node at its copy (the graph's owner must know it)."""
    for p in plans:
        if p.clone_of is not None:
            gm.add_submodule(p.layer, modules[p.layer])
            p.call.target = p.layer


def _result_module(
    model: nn.Module,
    work: nn.Module,
    gm: torch.fx.GraphModule,
    plans: list[_Plan],
    report: FoldReport,
) -> nn.Module:
    """The folded model's form: the traced graph when a shared layer was copied (the
    forward changed); the model's own BatchNorm-free form when it folds itself and every
    BN folded; an ``nn.Sequential`` without its folded entries; else ``work`` itself, its
    folded BNs ``nn.Identity`` (the report says which, and why)."""
    removed = {p.bn for p in plans}
    own = isinstance(model, FoldsItself)
    if any(p.clone_of is not None for p in plans):
        gm.graph.eliminate_dead_code()
        report.notes.append(
            "shared layers were copied for their folded calls, so the result is a"
            " torch.fx.GraphModule"
        )
        return torch.fx.GraphModule(work, gm.graph)
    if own and removed and report.complete:
        return model.without_batchnorm(work)
    if isinstance(work, nn.Sequential):
        keep = [(k, m) for k, m in work.named_children() if k not in removed]
        if all(k.isdigit() for k, _ in work.named_children()):
            return nn.Sequential(*[m for _, m in keep])
        return nn.Sequential(OrderedDict(keep))
    if own and removed:
        report.notes.append(
            f"not every BatchNorm folded, so the result is not a {type(model).__name__}"
            " without BatchNorm; folded BNs were replaced by nn.Identity"
        )
    elif removed:
        report.notes.append("folded BatchNorms were replaced by nn.Identity")
    return work


def _example_diff(model: nn.Module, result: nn.Module, args: tuple) -> float | None:
    """max |original - folded| on the example (None unless both give one tensor of the
    same shape)."""
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        a, b = reference(*args), result(*args)
    if isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape:
        return float((a.double() - b.double()).abs().max())
    return None
