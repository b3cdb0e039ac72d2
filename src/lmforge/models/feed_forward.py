"""Feed-forward: the MLP of a transformer block, plain or gated (SwiGLU / GeGLU).

Notation: D hidden size, F intermediate size.

Config attributes read here: hidden_size, intermediate_size, hidden_act, mlp_bias.
This file is copied next to saved weights: it imports only torch, transformers and siblings.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from .switches import ACTIVATIONS


class MLP(nn.Module):
    """Feed-forward block: ``down(act(up(x)))``, or gated ``down(act(gate(x)) * up(x))`` for swiglu / geglu."""

    def __init__(self, config):
        super().__init__()
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={config.hidden_act!r} is not one of {tuple(ACTIVATIONS)}")
        act_name, self.gated = ACTIVATIONS[config.hidden_act]
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=bias) if self.gated else None
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        self.act_fn = ACT2FN[act_name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act_fn(self.up_proj(x)))
