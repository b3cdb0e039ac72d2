"""Norms: RMSNorm, Dynamic Tanh and LayerNorm behind one switch, and DeepNorm's residual scales.

Config attributes read here: hidden_size, norm_type, norm_eps, norm_bias, dyt_init_alpha.
This file is copied next to saved weights: it imports only torch and siblings.
"""

from __future__ import annotations

import torch
from torch import nn

from .switches import NORM_TYPES


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich, 2019), computed in float32 like Llama's."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # torch's fused kernel: same formula, fewer passes over memory
            return nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class DyT(nn.Module):
    """Dynamic Tanh (Zhu et al., 2025): ``weight * tanh(alpha * x) + bias``, a norm-free drop-in.

    ``alpha`` is one learnable scalar (initialised to ``init_alpha``, 0.5 in the paper).
    """

    def __init__(self, hidden_size: int, bias: bool = True, init_alpha: float = 0.5):
        super().__init__()
        self.init_alpha = init_alpha
        self.alpha = nn.Parameter(torch.full((1,), init_alpha))
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.alpha * x) * self.weight
        return x if self.bias is None else x + self.bias

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, init_alpha={self.init_alpha}, bias={self.bias is not None}"


def build_norm(config, dim: int | None = None) -> nn.Module:
    """The norm named by ``config.norm_type`` ("rmsnorm", "layernorm" or "dyt") over ``dim``.

    ``dim`` defaults to ``config.hidden_size``; ``norm_eps`` and ``norm_bias`` apply where they mean
    something (RMSNorm has no bias, DyT no eps).
    """
    dim = config.hidden_size if dim is None else dim
    norm_type = config.norm_type
    bias = getattr(config, "norm_bias", True)
    if norm_type == "rmsnorm":
        return RMSNorm(dim, eps=config.norm_eps)
    if norm_type == "layernorm":
        return nn.LayerNorm(dim, eps=config.norm_eps, bias=bias)
    if norm_type == "dyt":
        return DyT(dim, bias=bias, init_alpha=getattr(config, "dyt_init_alpha", 0.5))
    raise ValueError(f"norm_type={norm_type!r} is not one of {NORM_TYPES}")


def deepnorm_alpha(num_layers: int) -> float:
    """DeepNet residual scale alpha = (2N)^(1/4) (Wang et al., 2022, decoder-/encoder-only, N layers)."""
    return (2.0 * num_layers) ** 0.25


def deepnorm_beta(num_layers: int) -> float:
    """DeepNet init gain beta = (8N)^(-1/4) for the value/output/FFN projections."""
    return (8.0 * num_layers) ** -0.25
