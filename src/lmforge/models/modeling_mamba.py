"""The lmforge Mamba family: selective state-space (S6) language models.

``LmforgeMambaMixer`` (in_proj -> causal depthwise conv -> SiLU -> input-dependent dt, B, C ->
selective scan with ``A = -exp(A_log)`` and ``D`` skip -> SiLU(z) gate -> out_proj) inside
pre-RMSNorm residual blocks (``LmforgeMambaBlock``); ``LmforgeMambaModel``,
``LmforgeMambaForCausalLM`` (``generate`` with O(1) decoding) and
``LmforgeMambaForSequenceClassification``. The class names keep "Mamba": transformers' ``generate``
picks the state-cache path by class name.

The scan has three paths: the sequential reference (``mamba_scan.selective_scan_ref``), the
default chunked PyTorch scan (``mamba_scan.selective_scan``), and the ``mamba_ssm`` /
``causal_conv1d`` CUDA kernels, used when installed, on GPU tensors, without ``seq_idx`` or a
carried state. Decoding keeps a conv state (B, Di, K) and an SSM state (B, Di, N) per layer in a
transformers ``DynamicCache`` of ``LinearAttentionLayer``s, passed as ``cache`` (``cache_params``,
its name before transformers 5.24, is accepted with a FutureWarning, as by transformers' Mamba).

Notation: B batch, L length, H hidden_size, Di inner width (expand * H), N state size, K conv kernel,
R time_step_rank. This file is copied next to saved weights: torch, transformers and siblings only.
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
from transformers.models.mamba.modeling_mamba import MambaCausalLMOutput, MambaOutput
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .causal_conv import causal_conv_silu
from .compat import LEGACY_CACHE_NAMES_UNTIL
from .configuration_mamba import LmforgeMambaConfig
from .losses import causal_lm_loss
from .mamba_scan import selective_scan, selective_state_step, seq_idx_to_reset
from .norms import RMSNorm
from .pooling import last_token_index
from .registration import merged_auto_map, register_family

try:  # optional CUDA kernels (pip install lmforge[mamba])
    from causal_conv1d import causal_conv1d_fn
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except ImportError:
    causal_conv1d_fn = selective_scan_fn = None


def causal_conv_docs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seq_idx: torch.Tensor):
    """Depthwise causal conv that does not look across documents.

    x (B, Di, L), weight (Di, 1, K), seq_idx (B, L) -> (B, Di, L). Tap k reads x[t - (K-1-k)] only
    when that position belongs to the same document as t.
    """
    length, k = x.shape[-1], weight.shape[-1]
    out = x.new_zeros(x.shape) if bias is None else bias[None, :, None].expand_as(x).clone()
    for tap in range(k):
        s = k - 1 - tap
        if s >= length:
            continue
        same = torch.ones_like(seq_idx, dtype=x.dtype)
        if s:
            same[:, :s] = 0
            same[:, s:] = (seq_idx[:, s:] == seq_idx[:, :-s]).to(x.dtype)
        shifted = F.pad(x, (s, 0))[..., :length]
        out = out + weight[None, :, 0, tap, None] * shifted * same[:, None, :]
    return out


class LmforgeMambaMixer(nn.Module):
    """The selective SSM branch of a Mamba block (the attention of a transformer)."""

    def __init__(self, config: LmforgeMambaConfig, layer_idx: int):
        super().__init__()
        h, di, n, r, k = (config.hidden_size, config.intermediate_size, config.state_size,
                          config.time_step_rank, config.conv_kernel)
        self.config, self.layer_idx = config, layer_idx
        self.inner, self.state_size, self.rank, self.kernel = di, n, r, k
        self.in_proj = nn.Linear(h, 2 * di, bias=config.use_bias)
        self.conv1d = nn.Conv1d(di, di, k, groups=di, padding=k - 1, bias=config.use_conv_bias)
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, di, bias=True)
        self.A_log = nn.Parameter(torch.empty(di, n))
        self.D = nn.Parameter(torch.empty(di))
        self.out_proj = nn.Linear(di, h, bias=config.use_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states (B, L, H) -> (B, L, H). ``attention_mask`` (B, L) zeroes padded positions."""
        dtype, length = hidden_states.dtype, hidden_states.shape[1]
        conv_state = ssm_state = None
        if cache is not None:  # read both before the conv update marks the layer as started
            conv_state = cache.get_conv_state(self.layer_idx)
            ssm_state = cache.get_recurrent_state(self.layer_idx)
        mask = None if attention_mask is None else attention_mask[:, -length:, None].to(dtype)

        xz = self.in_proj(hidden_states)  # (B, L, 2Di)
        if mask is not None:  # after in_proj (it may have a bias): padding stays exactly zero in the conv
            xz = xz * mask
        x, z = xz.chunk(2, dim=-1)  # (B, L, Di) each
        stepping = ssm_state is not None and conv_state is not None and length == 1  # O(1) decoding
        if cache is None and not _use_kernels(x):  # training: stays (B, L, Di)
            x = causal_conv_silu(x, self.conv1d.weight, self.conv1d.bias, seq_idx)
        else:
            x = F.silu(self._conv(x.transpose(1, 2), cache, seq_idx, stepping)).transpose(1, 2)  # (B, L, Di)
        if mask is not None:
            x = x * mask
        f = at_least_fp32(dtype)  # the SSM runs in float32 (float64 for float64 models)
        dt, b, c = self._ssm_inputs(x, f)
        a = -torch.exp(self.A_log.to(f))  # (Di, N)

        if stepping:
            y, h = selective_state_step(ssm_state.to(f), x[:, 0].to(f), dt[:, 0], a, b[:, 0], c[:, 0])
            y = y[:, None]  # (B, 1, Di)
        else:
            y, h = self._scan(x, dt, a, b, c, ssm_state, seq_idx)
        if cache is not None:
            cache.update_recurrent_state(h, self.layer_idx)
        y = (y.to(f) + x.to(f) * self.D.to(f)) * F.silu(z.to(f))
        return self.out_proj(y.to(dtype))

    def _conv(self, x: torch.Tensor, cache: Cache | None, seq_idx: torch.Tensor | None, stepping: bool):
        """Causal depthwise conv of x (B, Di, L); with a cache, prepends the cached last K inputs."""
        length = x.shape[-1]
        weight, bias = self.conv1d.weight, self.conv1d.bias  # (Di, 1, K), (Di,)
        if stepping:  # one new column: a dot product with the last K inputs, cheaper than conv1d
            window = cache.update_conv_state(x, self.layer_idx, conv_kernel_size=self.kernel)
            out = (window[..., -self.kernel :] * weight[:, 0]).sum(-1, keepdim=True)  # (B, Di, 1)
            return out if bias is None else out + bias[:, None]
        if seq_idx is not None:
            return causal_conv_docs(x, weight, bias, seq_idx)
        if cache is None and _use_kernels(x) and 2 <= self.kernel <= 4:
            return causal_conv1d_fn(x, weight[:, 0], bias, activation=None)
        if cache is not None:  # (B, Di, K + L) after a previous step, else (B, Di, max(L, K))
            x = cache.update_conv_state(x, self.layer_idx, conv_kernel_size=self.kernel)
        out = F.conv1d(x, weight, bias, padding=self.kernel - 1, groups=self.inner)
        return out[..., : x.shape[-1]][..., -length:]

    def _ssm_inputs(self, x: torch.Tensor, f: torch.dtype):
        """x (B, L, Di) -> dt (B, L, Di) > 0, B and C (B, L, N), all in dtype f."""
        dt, b, c = self.x_proj(x).split([self.rank, self.state_size, self.state_size], dim=-1)
        dt = F.softplus(F.linear(dt.to(f), self.dt_proj.weight.to(f), self.dt_proj.bias.to(f)))
        return dt, b.to(f), c.to(f)

    def _scan(self, x, dt, a, b, c, h0, seq_idx):
        """Full-sequence scan: CUDA kernel when usable, else the chunked PyTorch scan."""
        if h0 is None and seq_idx is None and _use_kernels(x):
            y, h = selective_scan_fn(  # the kernel wants u, delta, B, C in one dtype
                x.to(dt.dtype).transpose(1, 2).contiguous(), dt.transpose(1, 2).contiguous(), a,
                b.transpose(1, 2).contiguous(), c.transpose(1, 2).contiguous(), return_last_state=True,
            )
            return y.transpose(1, 2).float(), h.float()  # kernels: float32 or lower inputs only
        reset = None if seq_idx is None else seq_idx_to_reset(seq_idx)
        return selective_scan(x, dt, a, b, c, h0=h0, reset=reset, chunk_size=self.config.scan_chunk_size)


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _use_kernels(x: torch.Tensor) -> bool:
    return selective_scan_fn is not None and causal_conv1d_fn is not None and x.is_cuda


class LmforgeMambaBlock(GradientCheckpointingLayer):
    """Pre-norm residual block: x + mixer(norm(x)), the residual kept in float32 if configured."""

    def __init__(self, config: LmforgeMambaConfig, layer_idx: int):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mixer = LmforgeMambaMixer(config, layer_idx)

    def forward(self, hidden_states, cache=None, attention_mask=None, seq_idx=None):
        residual = hidden_states.to(at_least_fp32(hidden_states.dtype)) if self.residual_in_fp32 else hidden_states
        hidden_states = self.norm(hidden_states.to(self.norm.weight.dtype))
        return residual + self.mixer(hidden_states, cache, attention_mask, seq_idx)


# What ``save_pretrained`` writes into config.json's ``auto_map`` (files copied next to the weights):
# every head, so a classifier loads from a pretrained causal LM where lmforge is not installed.
AUTO_MAP = {
    "AutoConfig": "configuration_mamba.LmforgeMambaConfig",
    "AutoModel": "modeling_mamba.LmforgeMambaModel",
    "AutoModelForCausalLM": "modeling_mamba.LmforgeMambaForCausalLM",
    "AutoModelForSequenceClassification": "modeling_mamba.LmforgeMambaForSequenceClassification",
}


class LmforgeMambaPreTrainedModel(PreTrainedModel):
    """Shared settings and initialisation of the Mamba models."""

    config_class = LmforgeMambaConfig
    config: LmforgeMambaConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LmforgeMambaBlock"]
    _is_stateful = True

    def __init__(self, config: LmforgeMambaConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.config.auto_map = merged_auto_map(self.config, AUTO_MAP)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        cfg = self.config
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=cfg.initializer_range)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, LmforgeMambaMixer):
            self._init_mixer(module)

    def _init_mixer(self, m: LmforgeMambaMixer) -> None:
        """S4D-real A, unit D, dt bias = softplus^-1 of log-uniform steps in [dt_min, dt_max]."""
        cfg = self.config
        a = torch.arange(1, m.state_size + 1, dtype=torch.float32).expand(m.inner, -1)
        init.copy_(m.A_log, torch.log(a))
        init.ones_(m.D)
        std = m.rank**-0.5 * cfg.time_step_scale
        if cfg.time_step_init_scheme == "constant":
            init.constant_(m.dt_proj.weight, std)
        else:
            init.uniform_(m.dt_proj.weight, -std, std)
        lo, hi = math.log(cfg.time_step_min), math.log(cfg.time_step_max)
        dt = torch.exp(torch.rand(m.inner) * (hi - lo) + lo).clamp(min=cfg.time_step_floor)
        init.copy_(m.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))
        init.kaiming_uniform_(m.conv1d.weight, a=math.sqrt(5))
        if m.conv1d.bias is not None:
            init.zeros_(m.conv1d.bias)
        std_out = cfg.initializer_range
        if cfg.rescale_prenorm_residual:
            std_out /= math.sqrt(cfg.num_hidden_layers)
        init.normal_(m.out_proj.weight, mean=0.0, std=std_out)


class LmforgeMambaModel(LmforgeMambaPreTrainedModel):
    """Embeddings, ``num_hidden_layers`` Mamba blocks and a final RMSNorm."""

    def __init__(self, config: LmforgeMambaConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LmforgeMambaBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm_f = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    @deprecate_kwarg("cache_params", LEGACY_CACHE_NAMES_UNTIL, new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> MambaOutput:
        """input_ids (B, L) -> last_hidden_state (B, L, H).

        Args:
            cache: states from a previous call; the inputs continue that sequence.
            use_cache: return ``cache`` (default: config.use_cache, off in training).
            attention_mask: (B, L) 1 for real tokens, 0 for padding (left padding for generation).
            seq_idx: (B, L) document index of each position in packed rows; no state (conv or
                SSM) crosses a change of index. Not combinable with a cache.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("LmforgeMambaModel: pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embeddings(input_ids)  # (B, L, H)
        if seq_idx is not None and (cache is not None or use_cache):
            raise ValueError("LmforgeMambaModel: seq_idx (packed documents) cannot be combined with a cache")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training and seq_idx is None
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None

        output_hidden_states = output_hidden_states or self.config.output_hidden_states
        all_hidden = [] if output_hidden_states else None
        hidden_states = inputs_embeds
        for block in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = block(
                hidden_states, cache=cache, attention_mask=attention_mask, seq_idx=seq_idx
            )
        hidden_states = self.norm_f(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return MambaOutput(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )


class LmforgeMambaForCausalLM(LmforgeMambaPreTrainedModel, GenerationMixin):
    """Mamba with a language-model head; ``labels`` give the shifted next-token loss."""

    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}
    # read by transformers' ``loss_function`` property; assign ``model.loss_function`` to replace it
    _loss_function = staticmethod(causal_lm_loss)

    def __init__(self, config: LmforgeMambaConfig):
        super().__init__(config)
        self.backbone = LmforgeMambaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.backbone.embeddings = value

    @deprecate_kwarg("cache_params", LEGACY_CACHE_NAMES_UNTIL, new_name="cache")
    def prepare_inputs_for_generation(
        self, input_ids, inputs_embeds=None, use_cache=None, cache: Cache | None = None,
        attention_mask=None, is_first_iteration: bool | None = False, **kwargs,
    ):
        """After the prompt, only the new token is fed: it is never padding, so the mask is dropped."""
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, inputs_embeds=inputs_embeds, use_cache=use_cache, cache=cache,
            attention_mask=attention_mask, is_first_iteration=is_first_iteration, **kwargs,
        )
        if use_cache and not is_first_iteration:
            model_inputs["attention_mask"] = None
        return model_inputs

    @deprecate_kwarg("cache_params", LEGACY_CACHE_NAMES_UNTIL, new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        seq_idx: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MambaCausalLMOutput:
        """Logits (B, L, V) in float32; ``labels`` (B, L) give the mean shifted cross-entropy
        (``num_items_in_batch`` in kwargs for gradient accumulation)."""
        outputs: MambaOutput = self.backbone(
            input_ids, inputs_embeds=inputs_embeds, cache=cache, use_cache=use_cache,
            attention_mask=attention_mask, seq_idx=seq_idx, output_hidden_states=output_hidden_states,
        )
        hidden = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden.to(self.lm_head.weight.dtype))
        logits = logits.to(at_least_fp32(logits.dtype))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return MambaCausalLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states,
            cache=outputs.cache,
        )


class LmforgeMambaForSequenceClassification(LmforgeMambaPreTrainedModel):
    """Mamba with a linear head on the last real token (``pooling.last_token_index``: from
    ``attention_mask``, else ``config.pad_token_id``). The mask also zeroes padded positions
    inside the mixers, so left and right padding both give each row's own logits."""

    def __init__(self, config: LmforgeMambaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.backbone = LmforgeMambaModel(config)
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
        outputs: MambaOutput = self.backbone(
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
    """Register the Mamba family with the Auto classes (in-process and for ``save_pretrained`` code export)."""
    register_family(LmforgeMambaConfig, {
        "AutoModel": LmforgeMambaModel,
        "AutoModelForCausalLM": LmforgeMambaForCausalLM,
        "AutoModelForSequenceClassification": LmforgeMambaForSequenceClassification,
    })


__all__ = [
    "LmforgeMambaConfig",
    "LmforgeMambaPreTrainedModel",
    "LmforgeMambaModel",
    "LmforgeMambaForCausalLM",
    "LmforgeMambaForSequenceClassification",
]
