"""Cases whose verdict is known by construction, for testing the verifier.

* Correct candidates: bnfold's own fold, and torch's ``fuse_linear_bn_eval`` applied to
  every Linear+BatchNorm pair (a second opinion nobody here wrote). Both must PASS.
* Seven real errors (:data:`FAULTS`), each a wrong network that must FAIL: perturbed
  folded weights, and folds computed with a wrong formula (:func:`fold_with`).
* Word lists with larger alphabets (~60 and ~90 characters: capitals, accents, spaces,
  hyphens, apostrophes) made deterministically from a list of plain names, because real
  vocabularies are larger than the lecture's 27 and rounding grows with them.

Used by ``benchmarks/verify_matrix.py`` (the full matrix) and the test suite (a subset).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_linear_bn_eval

from bnfold.mlp.model import MLP

# ---------------------------------------------------------------- correct candidates --


def _linear_bn_pairs(bn_model: MLP) -> list[tuple[nn.Linear, nn.BatchNorm1d]]:
    mods = list(bn_model.net)
    pairs = [
        (m, mods[i + 1])
        for i, m in enumerate(mods[:-1])
        if isinstance(m, nn.Linear) and isinstance(mods[i + 1], nn.BatchNorm1d)
    ]
    if not pairs:
        raise ValueError("the model has no Linear+BatchNorm pair (is it already folded?)")
    return pairs


def _folded_like(bn_model: MLP, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> MLP:
    """A BN-free MLP with ``bn_model``'s embedding and the given (weight, bias) per Linear."""
    folded = MLP(replace(bn_model.config, batchnorm=False))
    with torch.no_grad():
        folded.tok_emb.weight.copy_(bn_model.tok_emb.weight)
        linears = [m for m in folded.net if isinstance(m, nn.Linear)]
        if len(linears) != len(layers):
            raise ValueError(f"{len(layers)} layers for {len(linears)} Linears")
        for lin, (w, b) in zip(linears, layers, strict=True):
            lin.weight.copy_(w)
            lin.bias.copy_(b)
    return folded.eval()


def torch_fused(bn_model: MLP) -> MLP:
    """The folded network as torch's own ``fuse_linear_bn_eval`` computes it."""
    layers = []
    for lin, bn in _linear_bn_pairs(bn_model):
        fused = fuse_linear_bn_eval(copy.deepcopy(lin).eval(), copy.deepcopy(bn).eval())
        layers.append((fused.weight.detach(), fused.bias.detach()))
    return _folded_like(bn_model, layers)


def fold_with(
    bn_model: MLP,
    *,
    eps: dict[int, float] | None = None,
    forget_beta: bool = False,
    variance_factor: float = 1.0,
) -> MLP:
    """Fold in float64 with the textbook formula ``W' = W * g / sqrt(var + eps)``,
    ``b' = beta - mean * g / sqrt(var + eps)``, optionally *wrong*: ``eps`` overrides the
    epsilon of the given layer indices, ``forget_beta`` drops beta, ``variance_factor``
    multiplies the running variance (``(n - 1) / n``: the biased instead of the unbiased
    estimate). With no option it is a correct fold."""
    layers = []
    for i, (lin, bn) in enumerate(_linear_bn_pairs(bn_model)):
        w = lin.weight.detach().double()
        b = lin.bias.detach().double() if lin.bias is not None else torch.zeros(w.shape[0])
        var = bn.running_var.double() * variance_factor
        e = (eps or {}).get(i, bn.eps)
        scale = bn.weight.detach().double() / torch.sqrt(var + e)
        shift = torch.zeros_like(scale) if forget_beta else bn.bias.detach().double()
        layers.append((w * scale[:, None], (b.double() - bn.running_mean.double()) * scale + shift))
    return _folded_like(bn_model, [(w.float(), b.float()) for w, b in layers])


# ------------------------------------------------------------------- the seven faults --


def _linears(model: MLP) -> list[nn.Linear]:
    return [m for m in model.net if isinstance(m, nn.Linear)]


def _middle(model: MLP) -> nn.Linear:
    lins = _linears(model)
    return lins[(len(lins) - 1) // 2]


def scale_row(folded: MLP, rng: random.Random) -> MLP:
    """One row of a middle layer scaled by 1 + 1e-3."""
    m = copy.deepcopy(folded)
    lin = _middle(m)
    with torch.no_grad():
        r = rng.randrange(lin.weight.shape[0])
        lin.weight[r] *= 1 + 1e-3
        lin.bias[r] *= 1 + 1e-3
    return m


def nudge_bias(folded: MLP, rng: random.Random) -> MLP:
    """One bias element of a middle layer nudged by 1e-3 of that layer's max |bias|."""
    m = copy.deepcopy(folded)
    lin = _middle(m)
    with torch.no_grad():
        lin.bias[rng.randrange(len(lin.bias))] += 1e-3 * lin.bias.abs().max()
    return m


def swap_output_rows(folded: MLP, rng: random.Random) -> MLP:
    """Two rows of the output layer swapped."""
    m = copy.deepcopy(folded)
    lin = _linears(m)[-1]
    i, j = rng.sample(range(lin.weight.shape[0]), 2)
    with torch.no_grad():
        lin.weight[[i, j]] = lin.weight[[j, i]].clone()
        lin.bias[[i, j]] = lin.bias[[j, i]].clone()
    return m


def raise_weight(folded: MLP, rng: random.Random) -> MLP:
    """One weight element of a middle layer raised by 1% of the layer's max |w|."""
    m = copy.deepcopy(folded)
    lin = _middle(m)
    with torch.no_grad():
        r, c = rng.randrange(lin.weight.shape[0]), rng.randrange(lin.weight.shape[1])
        lin.weight[r, c] += 0.01 * lin.weight.abs().max()
    return m


def fold_wrong_eps(bn_model: MLP, rng: random.Random) -> MLP:
    """A fold computed with eps 1e-3 instead of 1e-5 in one layer: the layer whose running
    variance is smallest (median over channels). Where the variance is ~1e3 the wrong eps
    changes that layer's scale by ~5e-7, below float32 rounding of the network itself:
    there is no different function to detect, so the fault goes where eps matters."""
    pairs = _linear_bn_pairs(bn_model)
    layer = min(range(len(pairs)), key=lambda i: float(pairs[i][1].running_var.median()))
    return fold_with(bn_model, eps={layer: 1e-3})


def fold_forgetting_beta(bn_model: MLP, rng: random.Random) -> MLP:
    """A fold that forgets beta (the BatchNorm shift)."""
    return fold_with(bn_model, forget_beta=True)


def fold_biased_variance(bn_model: MLP, rng: random.Random, batch_size: int = 32) -> MLP:
    """A fold that uses the biased variance where torch's running estimate is unbiased
    (factor ``(n - 1) / n`` for the training batch size ``n``)."""
    return fold_with(bn_model, variance_factor=(batch_size - 1) / batch_size)


# name -> (function, takes the BN model (True) or the correct folded model (False))
FAULTS: dict[str, tuple[Callable[..., MLP], bool]] = {
    "row x (1+1e-3)": (scale_row, False),
    "bias + 1e-3 max|b|": (nudge_bias, False),
    "output rows swapped": (swap_output_rows, False),
    "weight + 1% max|w|": (raise_weight, False),
    "eps 1e-3 in one layer": (fold_wrong_eps, True),
    "beta forgotten": (fold_forgetting_beta, True),
    "biased variance": (fold_biased_variance, True),
}


def faulty_networks(
    bn_model: MLP, folded: MLP, seed: int = 0, batch_size: int = 32
) -> dict[str, MLP]:
    """Every fault of :data:`FAULTS` applied once (seeded choice of row/element/layer)."""
    out = {}
    for k, (name, (fn, from_bn)) in enumerate(FAULTS.items()):
        rng = random.Random(seed * 1000 + k)
        if fn is fold_biased_variance:
            out[name] = fn(bn_model, rng, batch_size)
        else:
            out[name] = fn(bn_model if from_bn else folded, rng)
    return out


# --------------------------------------------------------------------- word lists --

# lower-case letter -> accented forms used by :func:`wider_alphabet`
ACCENTS = {
    "a": "áàâäãå",
    "e": "éèêë",
    "i": "íìîï",
    "o": "óòôöõø",
    "u": "úùûü",
    "n": "ñ",
    "c": "ç",
    "y": "ýÿ",
    "s": "š",
    "z": "ž",
}


def wider_alphabet(words: list[str], level: int, seed: int = 0) -> list[str]:
    """Deterministically rewrite plain lower-case names into a larger alphabet.

    ``level`` 1 (~60 symbols): capitalised first letter, some vowels accented (é, á, ö, ...).
    ``level`` 2 (~90 symbols): up to two accents per letter of :data:`ACCENTS`,
    plus double names joined by a hyphen or a space, and an apostrophe now and then.
    """
    rng = random.Random(seed)
    level1_accents = {k: v[:1] for k, v in ACCENTS.items() if k in "aeiou"}
    level2_accents = {k: v[:2] for k, v in ACCENTS.items()}
    out = []
    for w in words:
        table = level2_accents if level >= 2 else level1_accents
        chars = [rng.choice(table[c]) if c in table and rng.random() < 0.25 else c for c in w]
        word = "".join(chars)
        word = word[:1].upper() + word[1:]
        if level >= 2:
            r = rng.random()
            if r < 0.1:
                word = f"{word}-{rng.choice(words).capitalize()}"
            elif r < 0.2:
                word = f"{word} {rng.choice(words).capitalize()}"
            elif r < 0.25 and len(word) > 2:
                word = f"{word[0]}'{word[1:]}"
        out.append(word)
    return out
