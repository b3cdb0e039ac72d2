"""Attention: multi-head / grouped-query / multi-query attention over transformers' attention
interface, its eager reference, and the mask every layer gets (causal or bidirectional, padding,
packed documents, ALiBi bias).

Notation: B batch, T query length, S key/value length (past + new), D hidden size,
H query heads, Hkv key/value heads, hd head dim.

Config attributes read here: hidden_size, num_attention_heads, num_key_value_heads, head_dim,
attention_bias, attention_dropout, is_causal, position_embedding_type, _attn_implementation.
This file is copied next to saved weights: it imports only torch, transformers and siblings.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_causal_mask,
    find_packed_sequence_indices,
    packed_sequence_mask_function,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .dropout import apply_dropout
from .positions import alibi_bias, apply_rotary_pos_emb


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, S, hd) -> (B, Hkv * n_rep, S, hd): each key/value head serves n_rep query heads."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention: softmax(q k^T * scaling + mask) v. Returns ((B, T, H, hd), weights)."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, T, S)
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # SDPA's format: True = attend
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:  # additive
        scores = scores + attention_mask
    elif module.is_causal and query.shape[2] > 1:
        t, s = query.shape[2], key.shape[2]
        future = torch.ones(t, s, dtype=torch.bool, device=query.device).triu(s - t + 1)
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = apply_dropout(weights, dropout, module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, T, H, hd)
    return out, weights


class Attention(nn.Module):
    """Multi-head attention with MHA / GQA / MQA (``num_key_value_heads``), optional RoPE and a KV cache.

    The kernel comes from transformers' attention interface (``config._attn_implementation``:
    eager, sdpa, flash_attention_2), so ``model.set_attn_implementation`` works. Causal or
    bidirectional per ``config.is_causal``. ALiBi and padding arrive inside ``attention_mask``.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = getattr(config, "is_causal", True)
        bias = config.attention_bias
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states (B, T, D) -> (output (B, T, D), attention weights or None)."""
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, Hkv, S, hd)

        implementation = self.config._attn_implementation
        if implementation == "sdpa" and self.training and self.attention_dropout > 0 and q.device.type == "cpu":
            implementation = "eager"  # torch's CPU SDPA with dropout is this same math with a slower mask
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        out, weights = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        out = out.reshape(b, t, -1).contiguous()  # (B, T, H * hd)
        return self.o_proj(out), weights


def build_attention_mask(
    config,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    position_ids: torch.Tensor | None,
) -> torch.Tensor | None:
    """The mask every layer gets: causal or bidirectional (``config.is_causal``), padding, packed
    documents (``position_ids`` restarting at 0, only without a cache), plus the ALiBi bias.

    Uses transformers' ``create_causal_mask`` / ``create_bidirectional_mask``, so its format
    follows ``config._attn_implementation`` (None when SDPA can use ``is_causal``). With ALiBi it
    is a float additive mask (B, H, T, S).
    """
    causal = getattr(config, "is_causal", True)
    alibi = config.position_embedding_type == "alibi"
    if alibi and "flash" in (config._attn_implementation or ""):
        raise ValueError(
            "position_embedding_type='alibi' needs an additive attention bias, which "
            f"attn_implementation={config._attn_implementation!r} cannot take; use 'sdpa' or 'eager'"
        )
    if causal:
        mask = create_causal_mask(
            config=config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            allow_is_causal_skip=not alibi,
        )
    else:
        # packed documents: transformers reads position_ids for this only in the causal mask (and, from
        # 5.25, in the bidirectional one); the same segments through and_mask_function work on 5.24 too
        packed = find_packed_sequence_indices(position_ids) if position_ids is not None and cache is None else None
        mask = create_bidirectional_mask(
            config=config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            and_mask_function=packed_sequence_mask_function(packed) if packed is not None else None,
            allow_is_bidirectional_skip=not alibi,
        )
    if not alibi:
        return mask
    b, t = inputs_embeds.shape[:2]
    past = cache.get_seq_length() if cache is not None else 0
    dtype, device = inputs_embeds.dtype, inputs_embeds.device
    if mask is None:  # nothing masked (bidirectional, no padding)
        mask = torch.zeros(b, 1, t, past + t, dtype=dtype, device=device)
    elif mask.dtype == torch.bool:  # True = attend
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    bias = alibi_bias(config.num_attention_heads, t, mask.shape[-1], past, causal, device).to(dtype)
    # keep masked entries at the dtype minimum (adding a bias to it must not overflow to -inf)
    return torch.where(mask <= torch.finfo(dtype).min / 2, mask, mask + bias)
