"""The lmforge Mamba-2 family: state-space duality (SSD) language models, pure or hybrid.

``LmforgeMamba2Mixer`` is the SSD layer as transformers' ``Mamba2Mixer`` computes it::

    z, xBC, dt = in_proj(u)                                   (Di, Di + 2GN, nh)
    x, B, C    = split(silu(causal depthwise conv(xBC)))      (nh x P, G x N, G x N)
    dt         = clamp(softplus(dt + dt_bias), time_step_limit);   A = -exp(A_log)   (one per head)
    h_t        = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T;   y_t = h_t C_t + D x_t    (per head; B, C per group)
    out        = out_proj(RMSNorm_G(y * silu(z)))             (the norm per group of Di / G channels)

Every layer is a pre-RMSNorm residual block, x + mixer(norm(x)) (the residual in float32 if
configured), whose mixer is the SSD layer, or in a hybrid lmforge's ``attention.Attention`` or
``feed_forward.MLP`` (``config.layer_types``). ``LmforgeMamba2Model``, ``LmforgeMamba2ForCausalLM``
(``generate``, O(1) per token in the Mamba-2 layers) and ``LmforgeMamba2ForSequenceClassification``
(last real token). The class names keep "Mamba2", as Mamba's do.

The scan (``ssd_scan``: chunked SSD, ``ssd_step``: one token) runs in float32 (float64 for
float64 models); ``mamba_ssm``'s ``mamba_chunk_scan_combined`` and ``causal_conv1d`` replace it
and the convolution when installed, on CUDA tensors. One transformers ``DynamicCache`` (built from
``layer_types``) holds a conv state (B, Dc, K) and an SSM state (B, nh, P, N) per Mamba-2 layer
and the keys/values of attention layers side by side; it is passed as ``cache`` (``cache_params``,
as by transformers' Mamba2, and ``past_key_values``, as by its hybrids, are accepted with a FutureWarning).

Padding: ``attention_mask`` (B, L) zeroes padded positions inside the Mamba-2 mixers (after
in_proj, so a bias cannot leak into the conv or state: left padding for generation, right
padding for classification) and becomes the causal 4D mask of the attention layers (RoPE
positions count its real tokens, so a left-padded row sees the positions it has alone). Packed
documents: ``seq_idx`` (B, L) stops the conv and the SSM state at each change of index, and the
attention layers get a block-diagonal mask (positions restart at 0 in each document, which RoPE
also uses); padding in packed rows is marked as a document of its own, not by ``attention_mask``.

Where it differs from transformers' Mamba2, on purpose: padding is zeroed after in_proj (transformers
zeroes in_proj's input, so with ``use_bias`` its bias leaks into the conv state of left-padded rows);
dt is clamped in one-token steps too (transformers' step skips ``time_step_limit``, so with a limit
its cached decoding departs from its full forward); A is drawn uniform in [1, 16] at init, as in
mamba_ssm (transformers: 1..nh). Same weights, same outputs otherwise (tests/test_mamba2_model.py).

Notation: B batch, L length, H hidden_size, Di inner width (expand * H = nh * P), nh SSM heads,
P SSM head dim, G groups, N state size, K conv kernel, Dc conv channels (Di + 2 G N).
This file is copied next to saved weights: torch, transformers and siblings only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.mamba2.modeling_mamba2 import Mamba2CausalLMOutput, Mamba2Output
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .attention import Attention, build_attention_mask
from .causal_conv import causal_conv_silu
from .compat import LEGACY_CACHE_NAMES_UNTIL
from .configuration_mamba2 import LmforgeMamba2Config
from .feed_forward import MLP
from .initialization import init_weights
from .losses import causal_lm_loss
from .modeling_mamba import at_least_fp32, causal_conv_docs
from .norms import RMSNorm
from .pooling import last_token_index
from .positions import RotaryEmbedding
from .registration import merged_auto_map, register_family
from .ssd_scan import ssd_scan, ssd_step

try:  # optional CUDA kernels (pip install lmforge[mamba])
    from causal_conv1d import causal_conv1d_fn
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except ImportError:
    causal_conv1d_fn = mamba_chunk_scan_combined = None


class RMSNormGated(nn.Module):
    """RMSNorm(y * silu(z)) over groups of ``group_size`` channels, in float32 (transformers'
    ``Mamba2RMSNormGated``; float64 stays float64)."""

    def __init__(self, hidden_size: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        f = at_least_fp32(dtype)
        y = y.to(f) * F.silu(z.to(f))
        groups = y.view(*y.shape[:-1], -1, self.group_size)  # (..., G, Di / G)
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * groups.view(y.shape).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, group_size={self.group_size}, eps={self.eps}"


class LmforgeMamba2Mixer(nn.Module):
    """The SSD layer of a Mamba-2 block (the attention of a transformer)."""

    def __init__(self, config: LmforgeMamba2Config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.inner, self.num_heads, self.head_dim = config.intermediate_size, config.num_heads, config.head_dim
        self.n_groups, self.state_size, self.kernel = config.n_groups, config.state_size, config.conv_kernel
        self.conv_dim = self.inner + 2 * self.n_groups * self.state_size  # Dc: x, B and C are convolved
        projected = self.inner + self.conv_dim + self.num_heads  # z, xBC, dt
        self.in_proj = nn.Linear(config.hidden_size, projected, bias=config.use_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim,
                                padding=self.kernel - 1, bias=config.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = RMSNormGated(self.inner, self.inner // self.n_groups, eps=config.norm_eps)
        self.out_proj = nn.Linear(self.inner, config.hidden_size, bias=config.use_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states (B, L, H) -> (B, L, H). ``attention_mask`` (B, >= L) zeroes padded positions."""
        dtype, (b, length, _) = hidden_states.dtype, hidden_states.shape
        conv_state = ssm_state = None
        if cache is not None:  # read both before the conv update marks the layer as started
            conv_state = cache.get_conv_state(self.layer_idx)
            ssm_state = cache.get_recurrent_state(self.layer_idx)
        stepping = conv_state is not None and ssm_state is not None and length == 1  # O(1) decoding
        mask = None if attention_mask is None else attention_mask[:, -length:, None].to(dtype)

        zxbcdt = self.in_proj(hidden_states)  # (B, L, Di + Dc + nh)
        if mask is not None:  # after in_proj (it may have a bias): padding stays exactly zero in the conv
            zxbcdt = zxbcdt * mask
        z, xbc, dt = zxbcdt.split([self.inner, self.conv_dim, self.num_heads], dim=-1)
        if cache is None and not _use_kernels(xbc):  # training: stays (B, L, Dc)
            xbc = causal_conv_silu(xbc, self.conv1d.weight, self.conv1d.bias, seq_idx)
        else:
            xbc = F.silu(self._conv(xbc.transpose(1, 2), cache, seq_idx, stepping)).transpose(1, 2)  # (B, L, Dc)
        if mask is not None:
            xbc = xbc * mask
        gn = self.n_groups * self.state_size
        x, bmat, cmat = xbc.split([self.inner, gn, gn], dim=-1)
        f = at_least_fp32(dtype)  # the SSM runs in float32 (float64 for float64 models)
        x = x.reshape(b, length, self.num_heads, self.head_dim).to(f)  # (B, L, nh, P)
        bmat = bmat.reshape(b, length, self.n_groups, self.state_size).to(f)  # (B, L, G, N)
        cmat = cmat.reshape(b, length, self.n_groups, self.state_size).to(f)
        low, high = self.config.time_step_limit
        dt = F.softplus(dt.to(f) + self.dt_bias.to(f)).clamp(low, high)  # (B, L, nh)
        a = -torch.exp(self.A_log.to(f))  # (nh,)

        if stepping:
            y, h = ssd_step(ssm_state.to(f), x[:, 0], dt[:, 0], a, bmat[:, 0], cmat[:, 0])
            y = y[:, None]  # (B, 1, nh, P)
        else:
            y, h = self._scan(x, dt, a, bmat, cmat, ssm_state, seq_idx)
        if cache is not None:
            cache.update_recurrent_state(h, self.layer_idx)
        y = y.to(f) + x * self.D.to(f)[:, None]  # D skip, per head
        y = self.norm(y.reshape(b, length, self.inner), z)  # gated RMSNorm, (B, L, Di)
        return self.out_proj(y.to(dtype))

    def _conv(self, x: torch.Tensor, cache: Cache | None, seq_idx: torch.Tensor | None, stepping: bool):
        """Causal depthwise conv of x (B, Dc, L); with a cache, prepends the cached last K inputs."""
        length = x.shape[-1]
        weight, bias = self.conv1d.weight, self.conv1d.bias  # (Dc, 1, K), (Dc,)
        if stepping:  # one new column: a dot product with the last K inputs, cheaper than conv1d
            window = cache.update_conv_state(x, self.layer_idx, conv_kernel_size=self.kernel)
            out = (window[..., -self.kernel :] * weight[:, 0]).sum(-1, keepdim=True)  # (B, Dc, 1)
            return out if bias is None else out + bias[:, None]
        if seq_idx is not None:
            return causal_conv_docs(x, weight, bias, seq_idx)
        if cache is None and _use_kernels(x) and 2 <= self.kernel <= 4:
            return causal_conv1d_fn(x, weight[:, 0], bias, activation=None)
        if cache is not None:  # (B, Dc, K + L) after a previous step, else (B, Dc, max(L, K))
            x = cache.update_conv_state(x, self.layer_idx, conv_kernel_size=self.kernel)
        out = F.conv1d(x, weight, bias, padding=self.kernel - 1, groups=self.conv_dim)
        return out[..., : x.shape[-1]][..., -length:]

    def _scan(self, x, dt, a, b, c, h0, seq_idx):
        """Full-sequence scan: the CUDA kernel when usable, else the chunked PyTorch SSD scan."""
        if _use_kernels(x) and x.dtype != torch.float64:
            y, h = mamba_chunk_scan_combined(
                x, dt, a, b, c, self.config.chunk_size or 256, initial_states=h0,
                seq_idx=None if seq_idx is None else seq_idx.to(torch.int32), return_final_states=True,
            )
            return y.float(), h.float()
        return ssd_scan(x, dt, a, b, c, h0=h0, seq_idx=seq_idx, chunk_size=self.config.chunk_size)


def _use_kernels(x: torch.Tensor) -> bool:
    return mamba_chunk_scan_combined is not None and causal_conv1d_fn is not None and x.is_cuda


class AttentionConfigView:
    """The field names ``Attention``, ``RotaryEmbedding``, ``build_attention_mask`` and ``MLP`` read,
    over a Mamba-2 config (whose ``head_dim`` and ``intermediate_size`` are the SSM's); every other
    field is the config's own, read when used (``_attn_implementation`` follows
    ``set_attn_implementation``)."""

    is_causal = True
    max_position_embeddings = None  # RoPE here is the plain kind, which has no length limit

    def __init__(self, config: LmforgeMamba2Config):
        self._config = config

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_config":  # copy / pickle protocols, and before __init__ ran
            raise AttributeError(name)
        return getattr(self._config, name)

    @property
    def head_dim(self) -> int:
        return self._config.attention_head_dim

    @property
    def intermediate_size(self) -> int:
        return self._config.mlp_intermediate_size

    @property
    def position_embedding_type(self) -> str:
        return self._config.attention_position_embedding

    @property
    def rope_parameters(self) -> dict:
        return {"rope_type": "default", "rope_theta": self._config.rope_theta}


class LmforgeMamba2Block(GradientCheckpointingLayer):
    """Pre-norm residual block, x + mixer(norm(x)): the mixer is the SSD layer, attention or an
    MLP (``config.layer_types[layer_idx]``); the residual in float32 if configured."""

    def __init__(self, config: LmforgeMamba2Config, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        if self.layer_type == "linear_attention":
            self.mixer = LmforgeMamba2Mixer(config, layer_idx)
        elif self.layer_type == "full_attention":
            self.mixer = Attention(AttentionConfigView(config), layer_idx)
            self.mixer.o_proj.residual_output = True  # read by _init_weights (rescale_prenorm_residual)
        else:
            self.mixer = MLP(AttentionConfigView(config))
            self.mixer.down_proj.residual_output = True

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: Cache | None = None,
        padding_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        seq_idx: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """hidden_states (B, L, H) -> (B, L, H). ``padding_mask`` (B, L) is for the SSD layer,
        ``attention_mask`` (the 4D mask or None) and ``position_embeddings`` for attention."""
        residual = hidden_states.to(at_least_fp32(hidden_states.dtype)) if self.residual_in_fp32 else hidden_states
        hidden_states = self.norm(hidden_states.to(self.norm.weight.dtype))
        if self.layer_type == "linear_attention":
            out = self.mixer(hidden_states, cache, padding_mask, seq_idx)
        elif self.layer_type == "full_attention":
            out, _ = self.mixer(hidden_states, attention_mask, position_embeddings, cache, **kwargs)
        else:
            out = self.mixer(hidden_states)
        return residual + out


def document_positions(seq_idx: torch.Tensor) -> torch.LongTensor:
    """seq_idx (B, L) -> each token's position in its document (B, L): 0 wherever the index changes."""
    length = seq_idx.shape[-1]
    index = torch.arange(length, device=seq_idx.device).expand_as(seq_idx)
    start = torch.ones_like(seq_idx, dtype=torch.bool)
    start[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return index - torch.where(start, index, 0).cummax(-1).values


# What ``save_pretrained`` writes into config.json's ``auto_map`` (files copied next to the weights):
# every head, so a classifier loads from a pretrained causal LM where lmforge is not installed.
AUTO_MAP = {
    "AutoConfig": "configuration_mamba2.LmforgeMamba2Config",
    "AutoModel": "modeling_mamba2.LmforgeMamba2Model",
    "AutoModelForCausalLM": "modeling_mamba2.LmforgeMamba2ForCausalLM",
    "AutoModelForSequenceClassification": "modeling_mamba2.LmforgeMamba2ForSequenceClassification",
}


class LmforgeMamba2PreTrainedModel(PreTrainedModel):
    """Shared settings and initialisation of the Mamba-2 models."""

    config_class = LmforgeMamba2Config
    config: LmforgeMamba2Config
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LmforgeMamba2Block"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _is_stateful = True

    def __init__(self, config: LmforgeMamba2Config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.config.auto_map = merged_auto_map(self.config, AUTO_MAP)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) linears and embeddings, zero biases, unit norms (and the RoPE
        buffers recomputed); then each mixer as the stock Mamba2, below."""
        cfg = self.config
        init_weights(module, cfg)
        scale = 1 / math.sqrt(cfg.num_hidden_layers) if cfg.rescale_prenorm_residual else 1.0
        if isinstance(module, RMSNormGated):
            init.ones_(module.weight)
        elif isinstance(module, LmforgeMamba2Mixer):
            self._init_mixer(module, scale)
        elif getattr(module, "residual_output", False) and scale != 1.0:  # attention o_proj, MLP down_proj
            init.normal_(module.weight, mean=0.0, std=cfg.initializer_range * scale)

    def _init_mixer(self, m: LmforgeMamba2Mixer, scale: float) -> None:
        """A = -exp(A_log) with A uniform in [1, 16] per head, unit D, dt_bias = softplus^-1 of
        log-uniform steps in [time_step_min, time_step_max] (at least time_step_floor), PyTorch's
        default (kaiming-uniform) conv and out_proj, out_proj scaled by ``scale``."""
        cfg = self.config
        init.copy_(m.A_log, torch.log(torch.empty(m.num_heads).uniform_(1, 16)))
        init.ones_(m.D)
        lo, hi = math.log(cfg.time_step_min), math.log(cfg.time_step_max)
        dt = torch.exp(torch.rand(m.num_heads) * (hi - lo) + lo).clamp(min=cfg.time_step_floor)
        init.copy_(m.dt_bias, dt + torch.log(-torch.expm1(-dt)))
        init.kaiming_uniform_(m.conv1d.weight, a=math.sqrt(5))
        if m.conv1d.bias is not None:
            init.zeros_(m.conv1d.bias)
        bound = scale / math.sqrt(m.inner)  # kaiming_uniform_(a=sqrt(5)) is uniform(+-1/sqrt(fan_in))
        init.uniform_(m.out_proj.weight, -bound, bound)


class LmforgeMamba2Model(LmforgeMamba2PreTrainedModel):
    """Embeddings, ``num_hidden_layers`` blocks (Mamba-2, attention or MLP) and a final RMSNorm."""

    def __init__(self, config: LmforgeMamba2Config):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LmforgeMamba2Block(config, i) for i in range(config.num_hidden_layers))
        self.norm_f = RMSNorm(config.hidden_size, eps=config.norm_eps)
        rope = config.has_attention and config.attention_position_embedding == "rope"
        self.rotary_emb = RotaryEmbedding(AttentionConfigView(config)) if rope else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    @deprecate_kwarg("cache_params", LEGACY_CACHE_NAMES_UNTIL, new_name="cache")
    @deprecate_kwarg("past_key_values", LEGACY_CACHE_NAMES_UNTIL, new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        seq_idx: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> Mamba2Output:
        """input_ids (B, L) -> last_hidden_state (B, L, H).

        Args:
            cache: states from a previous call; the inputs continue that sequence.
            use_cache: return ``cache`` (default: config.use_cache, off in training).
            attention_mask: (B, L) 1 for real tokens, 0 for padding (left padding for generation).
            position_ids: (B, L) positions for RoPE attention layers (default: real tokens counted
                in ``attention_mask``, so left padding changes nothing; without it, after the cache).
            seq_idx: (B, L) document index of each position in packed rows: no state (conv or
                SSM) and no attention crosses a change of index. Not combinable with a cache.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("LmforgeMamba2Model: pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embeddings(input_ids)  # (B, L, H)
        if seq_idx is not None and (cache is not None or use_cache):
            raise ValueError("LmforgeMamba2Model: seq_idx (packed documents) cannot be combined with a cache")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training and seq_idx is None
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        mask, rotary = self._attention_inputs(inputs_embeds, attention_mask, cache, position_ids, seq_idx)

        output_hidden_states = output_hidden_states or self.config.output_hidden_states
        all_hidden = [] if output_hidden_states else None
        hidden_states = inputs_embeds
        for block in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = block(
                hidden_states, cache=cache, padding_mask=attention_mask, attention_mask=mask,
                position_embeddings=rotary, seq_idx=seq_idx,
            )
        hidden_states = self.norm_f(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return Mamba2Output(
            last_hidden_state=hidden_states, cache=cache,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )

    def _attention_inputs(self, inputs_embeds, attention_mask, cache, position_ids, seq_idx):
        """The attention layers' mask and RoPE (cos, sin), or (None, None) without attention layers.

        With ``seq_idx`` the mask is block-diagonal: transformers reads packed documents from
        positions restarting at 0 when no 2D mask is given (``masking_utils``), so padding in
        packed rows must be a document of its own rather than an ``attention_mask``.
        """
        if not self.config.has_attention:
            return None, None
        view = AttentionConfigView(self.config)
        if seq_idx is not None:
            if attention_mask is not None and not bool(attention_mask.all()):
                raise ValueError(
                    "LmforgeMamba2Model: with seq_idx (packed documents) the attention layers take no padding "
                    "attention_mask; mark padding as a document of its own in seq_idx (lmforge's collators do)"
                )
            documents = document_positions(seq_idx)
            position_ids = documents if position_ids is None else position_ids
            mask = build_attention_mask(view, inputs_embeds, None, None, documents)
        else:
            length = inputs_embeds.shape[1]
            if position_ids is None and attention_mask is not None:  # real tokens counted, as generate() does
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            elif position_ids is None:
                first = self.config.layer_types.index("full_attention")
                past = cache.get_seq_length(first) if cache is not None else 0
                position_ids = torch.arange(length, device=inputs_embeds.device)[None] + past
            mask = build_attention_mask(view, inputs_embeds, attention_mask, cache, position_ids)
        rotary = self.rotary_emb(inputs_embeds, position_ids) if self.rotary_emb is not None else None
        return mask, rotary


class LmforgeMamba2ForCausalLM(LmforgeMamba2PreTrainedModel, GenerationMixin):
    """Mamba-2 with a language-model head; ``labels`` give the shifted next-token loss."""

    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}
    # read by transformers' ``loss_function`` property; assign ``model.loss_function`` to replace it
    _loss_function = staticmethod(causal_lm_loss)

    def __init__(self, config: LmforgeMamba2Config):
        super().__init__(config)
        self.backbone = LmforgeMamba2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.backbone.embeddings = value

    @staticmethod
    def create_masks_for_generate(attention_mask=None, **kwargs):
        """``generate`` turns the 2D mask into masks per layer type for compilable caches (a
        StaticCache); the SSD layers need the 2D mask, and the attention layers build theirs from it."""
        return attention_mask

    @deprecate_kwarg("cache_params", LEGACY_CACHE_NAMES_UNTIL, new_name="cache")
    @deprecate_kwarg("past_key_values", LEGACY_CACHE_NAMES_UNTIL, new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        seq_idx: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> Mamba2CausalLMOutput:
        """Logits (B, L, V) in float32; ``labels`` (B, L) give the mean shifted cross-entropy
        (``num_items_in_batch`` in kwargs for gradient accumulation)."""
        outputs: Mamba2Output = self.backbone(
            input_ids, inputs_embeds=inputs_embeds, cache=cache, use_cache=use_cache,
            attention_mask=attention_mask, position_ids=position_ids, seq_idx=seq_idx,
            output_hidden_states=output_hidden_states,
        )
        hidden = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden.to(self.lm_head.weight.dtype))
        logits = logits.to(at_least_fp32(logits.dtype))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return Mamba2CausalLMOutput(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
        )


class LmforgeMamba2ForSequenceClassification(LmforgeMamba2PreTrainedModel):
    """Mamba-2 with a linear head on the last real token (``pooling.last_token_index``: from
    ``attention_mask``, else ``config.pad_token_id``). The mask also zeroes padded positions
    inside the mixers, so left and right padding both give each row's own logits."""

    def __init__(self, config: LmforgeMamba2Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.backbone = LmforgeMamba2Model(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.backbone.embeddings = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        """Pooled logits (B, num_labels); ``labels`` (B,) give cross-entropy (MSE for one label)."""
        outputs: Mamba2Output = self.backbone(
            input_ids, inputs_embeds=inputs_embeds, use_cache=False, attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
        )
        hidden = outputs.last_hidden_state  # (B, L, H)
        b, length = hidden.shape[:2]
        last = last_token_index(input_ids, attention_mask, self.config.pad_token_id, batch_size=b, length=length,
                                device=hidden.device)  # (B,)
        logits = self.score(hidden[torch.arange(b, device=hidden.device), last].to(self.score.weight.dtype))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


def register() -> None:
    """Register the Mamba-2 family with the Auto classes (in-process and for ``save_pretrained`` code export)."""
    register_family(LmforgeMamba2Config, {
        "AutoModel": LmforgeMamba2Model,
        "AutoModelForCausalLM": LmforgeMamba2ForCausalLM,
        "AutoModelForSequenceClassification": LmforgeMamba2ForSequenceClassification,
    })


__all__ = [
    "LmforgeMamba2Config",
    "LmforgeMamba2PreTrainedModel",
    "LmforgeMamba2Model",
    "LmforgeMamba2ForCausalLM",
    "LmforgeMamba2ForSequenceClassification",
]
