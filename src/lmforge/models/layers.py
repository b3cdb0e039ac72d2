"""Transformer building blocks shared by every lmforge family (GPT, BERT, Mamba).

This file is copied next to saved weights: it imports only torch, transformers and the standard
library. It reads bottom-up: norms, positions, attention, MLP, block, then mask and init helpers.

Notation: B batch, T query length, S key/value length (past + new), D hidden size,
H query heads, Hkv key/value heads, hd head dim, F intermediate size.

Config attributes read here (the "switchboard", shared by GPT and BERT): hidden_size,
num_attention_heads, num_key_value_heads, head_dim, intermediate_size, hidden_act,
position_embedding_type, rope_parameters, max_position_embeddings, norm_type, norm_position,
norm_eps, norm_bias, attention_bias, mlp_bias, attention_dropout, hidden_dropout,
initializer_range, is_causal, num_hidden_layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import transformers
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# transformers 5.24 renamed the cache argument and output field (``past_key_values``, Mamba's
# ``cache_params``) to ``cache``. lmforge models take ``cache`` and accept the old names through
# transformers' own ``deprecate_kwarg``, with the FutureWarning (and end version) of the stock models.
LEGACY_CACHE_NAMES_UNTIL = "5.40.0"
if "cache" not in BaseModelOutputWithPast.__dataclass_fields__:
    raise ImportError(f"lmforge models need transformers>=5.24 (found {transformers.__version__}): "
                      "they take the cache as `cache`, the name transformers 5.24 introduced")


# Valid values of each switch (configs validate against these).
NORM_TYPES = ("rmsnorm", "layernorm", "dyt")
NORM_POSITIONS = ("pre", "post", "deepnorm")
POSITION_TYPES = ("rope", "alibi", "learned", "sinusoidal", "none")
# hidden_act -> (ACT2FN name, gated)
ACTIVATIONS: dict[str, tuple[str, bool]] = {
    "gelu": ("gelu", False),  # exact (erf) GELU, as in BERT
    "gelu_tanh": ("gelu_pytorch_tanh", False),  # tanh approximation, as in GPT-2 ("gelu_new")
    "relu": ("relu", False),
    "silu": ("silu", False),
    "swiglu": ("silu", True),  # Shazeer 2020: silu(x W_gate) * (x W_up)
    "geglu": ("gelu", True),
}
ROPE_TYPES = ("default", "linear", "dynamic")


# --------------------------------------------------------------------------------- dropout


def apply_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout``, with the keep-mask drawn by ``torch.rand`` on CPU: the same distribution (a
    different random stream) at 1.5-2x the speed of torch's ``bernoulli_`` there, which took 10% of a
    BERT training step. Other devices use ``F.dropout``."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return nn.functional.dropout(x, p, training=True)
    keep = torch.rand(x.shape, device=x.device) >= p
    return torch.where(keep, x * (1.0 / (1.0 - p)), 0.0)


class Dropout(nn.Dropout):
    """``nn.Dropout`` through ``apply_dropout``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_dropout(x, self.p, self.training)


# ----------------------------------------------------------------------------------- norms


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


# ------------------------------------------------------------------------------- positions


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al., 2021) returning ``(cos, signed_sin)`` of shape
    (B, 1, T, hd), computed once per forward and ready for ``apply_rotary_pos_emb`` in every layer.

    ``config.rope_parameters["rope_type"]``: "default" (computed here), or "linear" / "dynamic"
    (NTK-aware) from transformers' ``ROPE_INIT_FUNCTIONS``. The frequencies are a non-persistent
    buffer that ``init_weights`` recomputes after ``from_pretrained``.
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
    if position_ids.numel() and int(position_ids.max()) >= config.max_position_embeddings:
        raise ValueError(
            f"position {int(position_ids.max())} is beyond max_position_embeddings="
            f"{config.max_position_embeddings} for position_embedding_type="
            f"{config.position_embedding_type!r}; use shorter inputs or a rope/alibi model"
        )


# ------------------------------------------------------------------------------- attention


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


# ------------------------------------------------------------------------------------- MLP


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


# ----------------------------------------------------------------------------------- block


class TransformerBlock(GradientCheckpointingLayer):
    """Attention + MLP with residuals; ``config.norm_position`` picks the norm placement.

    - ``pre``:      h = x + drop(attn(norm1(x)));      out = h + drop(mlp(norm2(h)))
    - ``post``:     h = norm1(x + drop(attn(x)));      out = norm2(h + drop(mlp(h)))   (BertLayer)
    - ``deepnorm``: h = norm1(alpha*x + drop(attn(x))); out = norm2(alpha*h + drop(mlp(h)))

    with alpha = (2N)^(1/4), and value/output/FFN weights initialised with gain (8N)^(-1/4)
    (DeepNet). Pre-norm models need a final norm after the last block; post/deepnorm do not.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.norm_position = config.norm_position
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(f"norm_position={self.norm_position!r} is not one of {NORM_POSITIONS}")
        self.attn_norm = build_norm(config)
        self.self_attn = Attention(config, layer_idx)
        self.mlp_norm = build_norm(config)
        self.mlp = MLP(config)
        self.dropout = Dropout(config.hidden_dropout)
        self.alpha = 1.0
        if self.norm_position == "deepnorm":
            self.alpha = deepnorm_alpha(config.num_hidden_layers)
            beta = deepnorm_beta(config.num_hidden_layers)
            mlp_linears = (self.mlp.gate_proj, self.mlp.up_proj, self.mlp.down_proj)
            for linear in (self.self_attn.v_proj, self.self_attn.o_proj, *mlp_linears):
                if linear is not None:
                    linear.init_gain = beta  # read by init_weights (xavier_normal_ with this gain)
            for linear in (self.self_attn.q_proj, self.self_attn.k_proj):
                linear.init_gain = 1.0

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """hidden_states (B, T, D) -> (B, T, D)."""
        x = hidden_states
        if self.norm_position == "pre":
            attn, _ = self.self_attn(self.attn_norm(x), attention_mask, position_embeddings, cache, **kwargs)
            h = x + self._dropout(attn)
            return h + self._dropout(self.mlp(self.mlp_norm(h)))
        attn, _ = self.self_attn(x, attention_mask, position_embeddings, cache, **kwargs)
        h = self.attn_norm(self._scaled(x) + self._dropout(attn))
        return self.mlp_norm(self._scaled(h) + self._dropout(self.mlp(h)))

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Residual dropout without a module call (decoding pays for each one)."""
        return apply_dropout(x, self.dropout.p, self.training)

    def _scaled(self, residual: torch.Tensor) -> torch.Tensor:
        """The residual branch scaled by DeepNorm's alpha (1 for post-norm: no extra op)."""
        return residual if self.alpha == 1.0 else self.alpha * residual


# ---------------------------------------------------------------------------------- losses


class _CrossEntropy(torch.autograd.Function):
    """Summed cross-entropy over rows whose target is not ``ignore_index``, divided by ``denom``.

    Same value and gradient as ``F.cross_entropy(reduction="sum") / denom``, with a cheaper
    backward: it saves the log-probabilities and turns them into the gradient (softmax - one-hot),
    where autograd would write a zero-filled NLL gradient and run a separate log-softmax backward
    over the (N, V) logits. The conversion is in place unless the backward keeps the graph
    (``retain_graph=True``): a second backward then finds the log-probabilities intact and gives
    the same gradient again, as the stock loss does.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, denom, ignore_index: int) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=-1)  # (N, V)
        valid = target != ignore_index
        safe = torch.where(valid, target, 0)
        picked = logp.gather(1, safe[:, None]).squeeze(1)  # (N,)
        ctx.save_for_backward(logp, safe, valid)
        ctx.denom = denom
        return -(picked * valid).sum() / denom

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        logp, safe, valid = ctx.saved_tensors
        scale = (grad / ctx.denom) * valid.to(logp.dtype)  # (N,)
        probs = logp.exp() if _backward_keeps_graph() else logp.exp_()  # (N, V)
        g = probs.mul_(scale[:, None])
        g.scatter_add_(1, safe[:, None], -scale[:, None])  # minus the one-hot
        return g, None, None, None


# torch's own query (used by its AOT autograd to free saved tensors early); absent: assume kept.
_KEEP_GRAPH_QUERY = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def _backward_keeps_graph() -> bool:
    """Whether the running backward was asked to keep the graph (``retain_graph`` / ``create_graph``).

    Under ``torch.compile`` the answer is "kept": the backward is traced once, Dynamo cannot call
    the query (a graph break per call), and the compiler plans the memory of the graph itself.
    """
    if torch.compiler.is_compiling():
        return True
    return _KEEP_GRAPH_QUERY is None or bool(_KEEP_GRAPH_QUERY())


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, num_items_in_batch=None, ignore_index: int = -100
) -> torch.Tensor:
    """transformers' ``fixed_cross_entropy`` (sum / num_items_in_batch, else the mean over targets)
    for logits (N, V) and targets (N,), through ``_CrossEntropy`` when a gradient is needed."""
    if not logits.requires_grad or not torch.is_grad_enabled():
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss = nn.functional.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
        return loss if num_items_in_batch is None else loss / _as_denominator(num_items_in_batch, loss)
    if num_items_in_batch is None:
        denom = (target != ignore_index).sum().to(logits.dtype)  # 0 targets: nan, as F.cross_entropy
    else:
        denom = _as_denominator(num_items_in_batch, logits)
    return _CrossEntropy.apply(logits, target, denom, ignore_index)


def _as_denominator(n, like: torch.Tensor):
    return n.to(like.device) if torch.is_tensor(n) else n


def causal_lm_loss(logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                   shift_labels=None, **kwargs) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` (float32 logits, labels shifted left by one, -100 ignored,
    ``num_items_in_batch`` for exact gradient accumulation) through ``cross_entropy`` above."""
    if shift_labels is None:
        labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    return masked_lm_loss(logits, shift_labels, vocab_size, num_items_in_batch, ignore_index)  # unshifted from here


def masked_lm_loss(logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                   **kwargs) -> torch.Tensor:
    """transformers' ``ForMaskedLMLoss`` (no shift) through ``cross_entropy`` above."""
    logits = logits.float()
    target = labels.reshape(-1).to(logits.device)
    return cross_entropy(logits.reshape(-1, vocab_size), target, num_items_in_batch, ignore_index)


# ------------------------------------------------------------------------- masks and init


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
        mask = create_bidirectional_mask(
            config=config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
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


def last_token_index(
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    pad_token_id: int | None,
    *,
    batch_size: int,
    length: int,
    device: torch.device | str,
) -> torch.LongTensor:
    """Position (B,) of each row's last real token: where a causal classifier pools.

    One rule for every family. With ``attention_mask`` (B, S): the rightmost position where it is
    nonzero, so left and right padding both work (the mask wins over ``pad_token_id``, which may
    also be a real token such as eos); only its last ``length`` columns are read, those of this
    call after a cache. Without a mask, with ``input_ids`` and ``pad_token_id``: the rightmost
    token that is not ``pad_token_id``. Without either, a batch of one row pools its last
    position, and a larger batch raises ``ValueError`` (its rows may be padded). A row with no
    real token gives 0.
    """
    if attention_mask is not None:
        real = attention_mask[:, -length:].to(device) != 0  # (B, T)
    elif input_ids is not None and pad_token_id is not None:
        real = input_ids.to(device) != pad_token_id  # (B, T)
    elif batch_size == 1:
        return torch.full((1,), length - 1, dtype=torch.long, device=device)
    else:
        raise ValueError(
            f"cannot tell where each row of a batch of {batch_size} ends without an attention_mask "
            "or config.pad_token_id: pass the tokenizer's attention_mask (or set pad_token_id in "
            "the model config)"
        )
    positions = torch.arange(length, device=device)  # (T,)
    return (positions * real).amax(-1)  # (B,) rightmost real position, 0 for an empty row


def init_weights(module: nn.Module, config) -> None:
    """Initialise one module of an lmforge model (call from ``PreTrainedModel._init_weights``).

    Normal(0, initializer_range) for linear and embedding weights (xavier_normal_ with
    ``module.init_gain`` under DeepNorm), zero biases, unit norms, DyT alpha, and the RoPE
    frequency buffers recomputed (``from_pretrained`` does not restore non-persistent buffers).
    Uses ``transformers.initialization`` so already-loaded weights are left alone.
    """
    std = config.initializer_range
    if isinstance(module, nn.Linear):
        gain = getattr(module, "init_gain", None)
        if gain is not None:
            init.xavier_normal_(module.weight, gain=gain)
        else:
            init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, (RMSNorm, nn.LayerNorm, DyT)):
        if module.weight is not None:
            init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            init.zeros_(module.bias)
        if isinstance(module, DyT):
            init.constant_(module.alpha, module.init_alpha)
    elif isinstance(module, RotaryEmbedding):
        module.reset_parameters()
