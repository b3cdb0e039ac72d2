"""The lmforge GPT family: a decoder-only transformer built from the shared blocks (``block.py``,
``attention.py``, ``positions.py``, ``norms.py``...).

``LmforgeGPTModel`` (embeddings, blocks, final norm), ``LmforgeGPTForCausalLM`` (LM head, shifted
loss, ``generate``) and ``LmforgeGPTForSequenceClassification`` (last non-pad token). Real transformers models:
Cache objects, attention masks from transformers' masking utils, ``attn_implementation``
eager / sdpa / flash_attention_2, gradient checkpointing, ``logits_to_keep``, ``num_items_in_batch``.

Mixture of experts (``num_experts > 0``, see ``feed_forward.py``): the heads add
``router_aux_loss_coef * aux + router_z_loss_coef * z`` to their loss when labels are given, from
the router logits recorded during the forward (``output_router_logits``, as Mixtral); the causal LM
returns ``aux_loss``, ``z_loss`` and, when asked, ``router_logits``. Padded tokens (attention_mask 0)
take no part in either loss nor in the load statistics. With ``num_items_in_batch`` (gradient
accumulation) the router term of a micro-batch is weighted by its share of the window's target
tokens, so the weights of a window sum to 1 as in one big batch. Exact: the cross-entropy, and the
z-loss when every micro-batch has the same ratio of real tokens to targets; not exact: the aux loss,
a product of batch means (the window's value is the target-weighted mean of the micro-batches').
In training mode the heads count routed tokens per expert into each MoE layer (``MoE.count_load``)
and sum the two losses (``take_router_losses``) for ``lmforge.train.moe_stats``. Gradient
checkpointing must be non-reentrant (transformers' default) for the router losses to reach the
router: a reentrant checkpoint returns the recorded logits without a graph.

This file is copied next to saved weights: it imports only torch, transformers and siblings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .attention import Attention, build_attention_mask
from .block import TransformerBlock
from .compat import LEGACY_CACHE_NAMES_UNTIL
from .configuration_gpt import LmforgeGPTConfig
from .dropout import Dropout
from .feed_forward import MoE, Router, router_losses
from .initialization import init_weights
from .losses import causal_lm_loss
from .norms import build_norm
from .pooling import last_token_index
from .positions import RotaryEmbedding, SinusoidalPositionalEmbedding, check_positions
from .registration import merged_auto_map, register_family

# What ``save_pretrained`` writes into config.json's ``auto_map`` (files copied next to the weights):
# every head, so a classifier loads from a pretrained causal LM where lmforge is not installed.
AUTO_MAP = {
    "AutoConfig": "configuration_gpt.LmforgeGPTConfig",
    "AutoModel": "modeling_gpt.LmforgeGPTModel",
    "AutoModelForCausalLM": "modeling_gpt.LmforgeGPTForCausalLM",
    "AutoModelForSequenceClassification": "modeling_gpt.LmforgeGPTForSequenceClassification",
}


class LmforgeGPTPreTrainedModel(PreTrainedModel):
    """Shared settings of the GPT models (init, attention backends, checkpointing, device maps)."""

    config_class = LmforgeGPTConfig
    config: LmforgeGPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TransformerBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "hidden_states": TransformerBlock,
        "attentions": Attention,
        "router_logits": OutputRecorder(Router, index=0),
    }

    def __init__(self, config: LmforgeGPTConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.config.auto_map = merged_auto_map(self.config, AUTO_MAP)
        self._router_loss_sums: torch.Tensor | None = None  # (aux, z, forwards) in training mode

    def _init_weights(self, module: nn.Module) -> None:
        init_weights(module, self.config)

    def _route(self, output_router_logits: bool | None, labels) -> tuple[bool, bool]:
        """(record the router logits, return them): recorded to return them, for a loss (labels) or
        for the training statistics."""
        wanted = self.config.output_router_logits if output_router_logits is None else output_router_logits
        moe = self.config.num_experts > 0
        return moe and (bool(wanted) or labels is not None or self.training), moe and bool(wanted)

    def _router_losses(self, outputs, attention_mask) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(aux, z) of the forward's recorded router logits over its real tokens (``attention_mask``'s
        last T columns when it is 2D); in training mode, also counts the load and sums the losses."""
        if not outputs.router_logits:
            return None, None
        moes = [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]
        t = outputs.last_hidden_state.shape[1]
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -t:].reshape(-1).bool()  # (B T,)
        aux, z, counts = router_losses(outputs.router_logits, self.config.num_experts_per_tok,
                                       [moe.gate.e_score_correction_bias for moe in moes], token_mask,
                                       per_layer=self.config.router_aux_loss_per_layer)
        if self.training:
            for moe, count in zip(moes, counts, strict=True):
                moe.count_load(count)
            sums = torch.stack([aux.detach().double(), z.detach().double(), aux.new_ones((), dtype=torch.float64)])
            self._router_loss_sums = sums if self._router_loss_sums is None else self._router_loss_sums + sums
        return aux, z

    def _router_loss(self, aux: torch.Tensor, z: torch.Tensor, share=1.0) -> torch.Tensor:
        """The router term added to a head's loss, times ``share`` (gradient accumulation)."""
        return share * (self.config.router_aux_loss_coef * aux + self.config.router_z_loss_coef * z)

    def take_router_losses(self) -> tuple[float, float, int]:
        """(sum of aux losses, sum of z-losses, forwards) counted in training mode since the last
        call; resets them (read by ``lmforge.train.moe_stats``)."""
        sums, self._router_loss_sums = self._router_loss_sums, None
        if sums is None:
            return 0.0, 0.0, 0
        aux, z, n = sums.tolist()
        return aux, z, int(n)


class LmforgeGPTModel(LmforgeGPTPreTrainedModel):
    """Token (+ absolute position) embeddings, ``num_hidden_layers`` blocks and a final norm (pre-norm only)."""

    def __init__(self, config: LmforgeGPTConfig):
        super().__init__(config)
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        kind = config.position_embedding_type
        self.embed_positions = None
        if kind == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, d)
        elif kind == "sinusoidal":
            self.embed_positions = SinusoidalPositionalEmbedding(d)
        self.rotary_emb = RotaryEmbedding(config) if kind == "rope" else None
        self.dropout = Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.num_hidden_layers))
        # post-norm and DeepNorm blocks already end in a norm
        self.norm = build_norm(config) if config.norm_position == "pre" else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @deprecate_kwarg("past_key_values", LEGACY_CACHE_NAMES_UNTIL, new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """input_ids (B, T) -> last_hidden_state (B, T, D).

        ``position_ids`` (B, T) restarting at 0 marks packed documents (pass ``use_cache=False``
        when training on packed data: transformers ignores packing when a cache is present).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("LmforgeGPTModel: pass exactly one of input_ids or inputs_embeds")
        kwargs.pop("output_router_logits", None)  # read by capture_outputs; the layers need not see it
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, D)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None] + past
        check_positions(position_ids, self.config)

        hidden_states = inputs_embeds
        if self.embed_positions is not None:
            hidden_states = hidden_states + self.embed_positions(position_ids).to(hidden_states.dtype)
        hidden_states = self.dropout(hidden_states)
        mask = build_attention_mask(self.config, hidden_states, attention_mask, cache, position_ids)
        rotary = self.rotary_emb(hidden_states, position_ids) if self.rotary_emb is not None else None

        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=mask,
                position_embeddings=rotary,
                cache=cache,
                **kwargs,
            )
        if self.norm is not None:
            hidden_states = self.norm(hidden_states)
        if self.config.num_experts:
            return MoeModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


@dataclass
class LmforgeMoeCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """transformers' MoE causal-LM output (loss, aux_loss, logits, cache, router_logits...) with the
    router z-loss."""

    z_loss: torch.Tensor | None = None


def _target_share(labels: torch.Tensor, num_items_in_batch, shift_labels=None, ignore_index: int = -100):
    """This micro-batch's share of the accumulation window's targets (1 without ``num_items_in_batch``)."""
    if num_items_in_batch is None:
        return 1.0
    targets = shift_labels if shift_labels is not None else labels[..., 1:]
    n = num_items_in_batch.to(labels.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    return (targets != ignore_index).sum() / n


class LmforgeGPTForCausalLM(LmforgeGPTPreTrainedModel, GenerationMixin):
    """GPT with a language-model head; ``labels`` give the shifted next-token loss."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # read by transformers' ``loss_function`` property; assign ``model.loss_function`` to replace it
    _loss_function = staticmethod(causal_lm_loss)

    def __init__(self, config: LmforgeGPTConfig):
        super().__init__(config)
        self.model = LmforgeGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @deprecate_kwarg("past_key_values", LEGACY_CACHE_NAMES_UNTIL, new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | LmforgeMoeCausalLMOutputWithPast:
        """Logits (B, T', V) for the last ``logits_to_keep`` positions (0 = all).

        ``labels`` (B, T) are the input ids (shifted inside; -100 ignored). Pass
        ``num_items_in_batch`` (target tokens over the accumulation window) so gradient
        accumulation equals one big batch. MoE models add the router losses to ``loss`` (module
        docstring) and return ``aux_loss`` / ``z_loss`` whenever the router logits were recorded.
        """
        record, keep = self._route(output_router_logits, labels)
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **({"output_router_logits": True} if record else {}),
            **kwargs,
        )
        aux_loss, z_loss = self._router_losses(outputs, attention_mask) if record else (None, None)
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if aux_loss is not None:
                share = _target_share(labels, kwargs.get("num_items_in_batch"), kwargs.get("shift_labels"))
                loss = loss + self._router_loss(aux_loss, z_loss, share)
        if self.config.num_experts:
            return LmforgeMoeCausalLMOutputWithPast(
                loss=loss,
                aux_loss=aux_loss,
                z_loss=z_loss,
                logits=logits,
                cache=outputs.cache,
                hidden_states=outputs.hidden_states,
                attentions=outputs.attentions,
                router_logits=outputs.router_logits if keep else None,
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class LmforgeGPTForSequenceClassification(LmforgeGPTPreTrainedModel):
    """GPT with a linear head on the last real token (``pooling.last_token_index``: from
    ``attention_mask``, else ``config.pad_token_id``; left or right padding)."""

    def __init__(self, config: LmforgeGPTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = LmforgeGPTModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    @deprecate_kwarg("past_key_values", LEGACY_CACHE_NAMES_UNTIL, new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        """Pooled logits (B, num_labels); ``labels`` (B,) give cross-entropy (or MSE for one label),
        plus the router losses of an MoE model."""
        record, _ = self._route(output_router_logits, labels)
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **({"output_router_logits": True} if record else {}),
            **kwargs,
        )
        aux_loss, z_loss = self._router_losses(outputs, attention_mask) if record else (None, None)
        hidden = outputs.last_hidden_state  # (B, T, D)
        b, t = hidden.shape[:2]
        last = last_token_index(input_ids, attention_mask, self.config.pad_token_id, batch_size=b, length=t,
                                device=hidden.device)  # (B,)
        logits = self.score(hidden[torch.arange(b, device=hidden.device), last])  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)
            if aux_loss is not None:
                loss = loss + self._router_loss(aux_loss, z_loss)
        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


def register() -> None:
    """Register the GPT family with the Auto classes (in-process and for ``save_pretrained`` code export)."""
    register_family(LmforgeGPTConfig, {
        "AutoModel": LmforgeGPTModel,
        "AutoModelForCausalLM": LmforgeGPTForCausalLM,
        "AutoModelForSequenceClassification": LmforgeGPTForSequenceClassification,
    })


__all__ = [
    "LmforgeMoeCausalLMOutputWithPast",
    "LmforgeGPTPreTrainedModel",
    "LmforgeGPTModel",
    "LmforgeGPTForCausalLM",
    "LmforgeGPTForSequenceClassification",
]
