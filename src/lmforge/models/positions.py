"""Positions: rotary (RoPE), ALiBi, sinusoidal, and the length check of absolute positions.

Learned absolute positions are a plain ``nn.Embedding`` in the model files.

Notation: B batch, T query length, S key/value length (past + new), D hidden size,
H query heads, Hkv key/value heads, hd head dim.

Config attributes read here: head_dim, rope_parameters, max_position_embeddings,
position_embedding_type. This file is copied next to saved weights: it imports only torch,
transformers and the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al., 2021) returning ``(cos, signed_sin)`` of shape
    (B, 1, T, hd), computed once per forward and ready for ``apply_rotary_pos_emb`` in every layer.

    ``config.rope_parameters["rope_type"]``: "default" (computed here), or "linear" / "dynamic"
    (NTK-aware) from transformers' ``ROPE_INIT_FUNCTIONS``. The frequencies are a non-persistent
    buffer that ``initialization.init_weights`` recomputes after ``from_pretrained``.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        inv_freq, self.attention_scaling = self.rope_init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @property
    def rope_init_fn(self) -> Callable:
        if self.rope_type == "default":
            return self.compute_default_rope_parameters
        return ROPE_INIT_FUNCTIONS[self.rope_type]

    @staticmethod
    def compute_default_rope_parameters(config, device=None, seq_len=None, **kwargs):
        """Plain RoPE frequencies 1 / theta^(2i/hd); attention scaling 1."""
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        return inv_freq, 1.0

    def reset_parameters(self) -> None:
        """Recompute the frequency buffers (they are not saved with the weights)."""
        inv_freq, self.attention_scaling = self.rope_init_fn(self.config)
        self.max_seq_len_cached = self.original_max_seq_len
        init.copy_(self.inv_freq, inv_freq)
        init.copy_(self.original_inv_freq, inv_freq)

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids (B, T) -> freqs (B, T, hd/2)
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        cos = freqs.cos() * self.attention_scaling
        sin = freqs.sin() * self.attention_scaling
        cos = torch.cat((cos, cos), dim=-1)  # (B, T, hd): Llama's cos(cat(freqs, freqs))
        signed_sin = torch.cat((-sin, sin), dim=-1)  # the sign rotate_half puts on the first half
        return cos.to(x.dtype).unsqueeze(1), signed_sin.to(x.dtype).unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim (the half-split RoPE convention of Llama)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, H, T, hd) and k (B, Hkv, T, hd) by ``RotaryEmbedding``'s (cos, signed_sin) (B, 1, T, hd).

    Equal to Llama's ``q * cos + rotate_half(q) * sin``: ``rotate_half(x) * sin`` is
    ``roll(x, hd/2) * cat(-sin1, sin2)``, which takes half the kernel launches (it matters on
    CPU, where each small op pays a thread-pool round trip).
    """
    half = cos.shape[-1] // 2
    return _rotate(q, cos, signed_sin, half), _rotate(k, cos, signed_sin, half)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, half: int) -> torch.Tensor:
    return torch.addcmul(x * cos, x.roll(half, dims=-1), signed_sin)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al., 2022): geometric 2^(-8/n), with the paper's rule for n not a power of 2."""

    def power_of_2_slopes(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_2_slopes(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_2_slopes(closest) + power_of_2_slopes(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(
    num_heads: int, q_len: int, kv_len: int, q_offset: int, causal: bool, device=None
) -> torch.Tensor:
    """Additive ALiBi bias (1, H, T, S): -slope * distance between query and key index.

    Only distances matter, so cache indices (query i sits at ``q_offset + i``) give the same bias
    with left padding and packed documents as true positions would.
    """
    q_idx = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]
    k_idx = torch.arange(kv_len, device=device)[None, :]
    dist = (q_idx - k_idx).float()  # (T, S)
    dist = dist.clamp(min=0) if causal else dist.abs()  # future keys are masked anyway when causal
    return -alibi_slopes(num_heads).to(device)[None, :, None, None] * dist[None, None]


class SinusoidalPositionalEmbedding(nn.Module):
    """Fixed sin/cos absolute positions (Vaswani et al., 2017), computed on the fly (nothing to save)."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim = dim
        self.base = base

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        # position_ids (B, T) -> (B, T, D); even dims sin, odd dims cos
        half = torch.arange(0, self.dim, 2, device=position_ids.device, dtype=torch.float32)
        freqs = position_ids[..., None].float() / (self.base ** (half / self.dim))  # (B, T, ceil(D/2))
        emb = torch.stack((freqs.sin(), freqs.cos()), dim=-1).flatten(-2)  # (B, T, 2*ceil(D/2))
        return emb[..., : self.dim]


def check_positions(position_ids: torch.Tensor, config) -> None:
    """Refuse positions beyond ``max_position_embeddings`` for learned / sinusoidal embeddings."""
    if config.position_embedding_type not in ("learned", "sinusoidal"):
        return  # RoPE and ALiBi extrapolate (quality beyond the trained length is another matter)
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return  # a data-dependent check: graphs (compile, ONNX export) cannot hold it; eager runs check
    if position_ids.numel() and int(position_ids.max()) >= config.max_position_embeddings:
        raise ValueError(
            f"position {int(position_ids.max())} is beyond max_position_embeddings="
            f"{config.max_position_embeddings} for position_embedding_type="
            f"{config.position_embedding_type!r}; use shorter inputs or a rope/alibi model"
        )
