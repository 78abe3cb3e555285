"""The makemore BatchNorm MLP as an ordinary ``nn.Module``.

Embedding -> flatten -> n_layers x (Linear(bias=False) -> BatchNorm1d -> Tanh)
-> Linear(bias=False) -> BatchNorm1d(vocab). Built only from stock torch modules so that
torch's fusion utilities and the ONNX exporter understand it. With ``batchnorm=False`` the
same class describes the folded network: Linear(bias=True) -> Tanh blocks, no BatchNorm.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from bnfold.errors import BnfoldError
from bnfold.mlp.config import DEFAULT_MODEL, ModelConfig

__all__ = ["DEFAULT_MODEL", "MLP", "TANH_GAIN", "ModelConfig"]

TANH_GAIN = 5 / 3  # torch.nn.init.calculate_gain("tanh")


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        bn = config.batchnorm
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        layers: list[nn.Module] = []
        fan_in = config.n_embd * config.block_size
        for _ in range(config.n_layers):
            layers.append(nn.Linear(fan_in, config.n_hidden, bias=not bn))
            if bn:
                layers.append(nn.BatchNorm1d(config.n_hidden))
            layers.append(nn.Tanh())
            fan_in = config.n_hidden
        layers.append(nn.Linear(fan_in, config.vocab_size, bias=not bn))
        if bn:
            layers.append(nn.BatchNorm1d(config.vocab_size))
        self.net = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The lecture's init: N(0,1) embedding, fan-in scaled Linears with tanh gain 5/3 on
        hidden layers, and the last BN's gamma x 0.1 so the first predictions are nearly
        uniform (initial loss ~ ln(vocab))."""
        nn.init.normal_(self.tok_emb.weight)
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        for i, lin in enumerate(linears):
            gain = 1.0 if i == len(linears) - 1 else TANH_GAIN
            nn.init.normal_(lin.weight, std=gain / math.sqrt(lin.in_features))
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        last = self.net[-1]
        if isinstance(last, nn.BatchNorm1d):
            last.weight.mul_(0.1)
        else:  # no BN to damp the output: scale the last Linear instead
            linears[-1].weight.mul_(0.1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, block_size) int64 contexts -> (B, vocab_size) logits."""
        return self.net(self.tok_emb(idx).flatten(1))

    # -- how bnfold.fold.modules folds it (its FoldsItself protocol) -------------------

    def fold_example_input(self) -> tuple[torch.Tensor]:
        """Two all-zero contexts, to check every BatchNorm's channel axis on."""
        return (torch.zeros(2, self.config.block_size, dtype=torch.long),)

    def without_batchnorm(self, folded: nn.Module) -> MLP:
        """``folded`` (a copy of this MLP whose BatchNorms folded into their Linears and
        became ``nn.Identity``) as exactly ``MLP(batchnorm=False)``, in eval mode."""
        plain = MLP(replace(self.config, batchnorm=False))
        layers = [m for m in folded.net if not isinstance(m, nn.Identity)]
        state = {"tok_emb.weight": folded.tok_emb.weight.detach().clone()}
        for i, m in enumerate(layers):
            for k, v in m.state_dict().items():
                state[f"net.{i}.{k}"] = v.detach().clone()
        try:
            plain.load_state_dict(state)
        except RuntimeError as e:  # would mean the MLP changed shape: a bug, not a user error
            raise BnfoldError(f"folded MLP does not match MLP(batchnorm=False): {e}") from None
        return plain.eval()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
