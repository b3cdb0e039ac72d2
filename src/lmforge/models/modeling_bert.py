"""lmforge BERT: a bidirectional Transformer encoder with masked-LM and classification heads.

Only what is BERT's own lives here: the embeddings (words + token types + absolute positions, an
embedding norm and dropout), the pooler, the MLM head (dense, activation, norm, decoder tied to the
word embedding, with a bias) and the classification heads. Norms, positions, attention, MLP and
the Transformer block come from the shared sibling files (``norms.py``, ``positions.py``,
``attention.py``, ``feed_forward.py``, ``block.py``) and follow the config's switchboard; attention is
bidirectional (``config.is_causal = False``).

The ``classic`` preset is numerically identical to transformers' ``BertForMaskedLM`` (see
``lmforge.models.convert``). This file is copied next to saved weights: it imports only torch,
transformers and its siblings.

Notation: B batch, T sequence length, D hidden size, V vocabulary size, L labels.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .attention import Attention, build_attention_mask
from .block import TransformerBlock
from .configuration_bert import LmforgeBertConfig
from .dropout import Dropout
from .initialization import init_weights
from .losses import masked_lm_loss
from .norms import build_norm
from .positions import RotaryEmbedding, SinusoidalPositionalEmbedding, check_positions
from .registration import merged_auto_map, register_family
from .switches import ACTIVATIONS

# What ``save_pretrained`` writes into config.json's ``auto_map`` (files copied next to the weights).
AUTO_MAP = {
    "AutoConfig": "configuration_bert.LmforgeBertConfig",
    "AutoModel": "modeling_bert.LmforgeBertModel",
    "AutoModelForMaskedLM": "modeling_bert.LmforgeBertForMaskedLM",
    "AutoModelForSequenceClassification": "modeling_bert.LmforgeBertForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_bert.LmforgeBertForTokenClassification",
}


class LmforgeBertEmbeddings(nn.Module):
    """Word + token-type + absolute-position embeddings, then the embedding norm and dropout.

    Token types exist when ``type_vocab_size > 0``; absolute positions for ``learned`` (a table)
    and ``sinusoidal`` (computed); RoPE and ALiBi act inside attention instead.
    """

    def __init__(self, config: LmforgeBertConfig):
        super().__init__()
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d) if config.type_vocab_size else None
        self.position_type = config.position_embedding_type
        if self.position_type == "learned":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, d)
        elif self.position_type == "sinusoidal":
            self.position_embeddings = SinusoidalPositionalEmbedding(d)
        else:
            self.position_embeddings = None
        self.norm = build_norm(config) if config.embedding_norm else nn.Identity()
        self.dropout = Dropout(config.hidden_dropout)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        position_ids: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ids (B, T) or inputs_embeds (B, T, D) -> (B, T, D)."""
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
            x = x + self.token_type_embeddings(token_type_ids)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids).to(x.dtype)
        return self.dropout(self.norm(x))


class LmforgeBertPooler(nn.Module):
    """tanh(dense(h_[CLS])): the sentence vector of BERT's classification head."""

    def __init__(self, config: LmforgeBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))  # (B, T, D) -> (B, D)


class LmforgeBertMLMHead(nn.Module):
    """dense -> activation -> norm -> decoder (tied to the word embedding) + bias: (B, T, D) -> (B, T, V).

    The activation is the MLP's, ungated (``geglu`` -> GELU, ``swiglu`` -> SiLU).
    """

    def __init__(self, config: LmforgeBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[ACTIVATIONS[config.hidden_act][0]]
        self.norm = build_norm(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act_fn(self.dense(hidden_states))))


class LmforgeBertPreTrainedModel(PreTrainedModel):
    """Weight init, attention backends and output recording shared by every BERT head."""

    config_class = LmforgeBertConfig
    config: LmforgeBertConfig
    base_model_prefix = "bert"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TransformerBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": TransformerBlock, "attentions": Attention}

    def __init__(self, config: LmforgeBertConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        # every head loads from any BERT checkpoint (pretrain MLM, then fine-tune a classifier)
        self.config.auto_map = merged_auto_map(self.config, AUTO_MAP)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        init_weights(module, self.config)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            if not getattr(module.weight, "_is_hf_initialized", False):
                module.weight[module.padding_idx].zero_()


class LmforgeBertModel(LmforgeBertPreTrainedModel):
    """The encoder: embeddings, ``num_hidden_layers`` bidirectional blocks, final norm (pre-norm
    only), and the optional pooler. Returns ``last_hidden_state`` (B, T, D) and ``pooler_output`` (B, D).
    """

    def __init__(self, config: LmforgeBertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = LmforgeBertEmbeddings(config)
        self.rotary_emb = RotaryEmbedding(config) if config.position_embedding_type == "rope" else None
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = build_norm(config) if config.norm_position == "pre" else None
        self.pooler = LmforgeBertPooler(config) if add_pooling_layer else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """Encode ``input_ids`` (B, T) (or ``inputs_embeds`` (B, T, D)); ``attention_mask`` (B, T) is 1
        for real tokens and 0 for padding; ``token_type_ids`` (B, T) are segment ids."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        b, t = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        device = input_ids.device if input_ids is not None else inputs_embeds.device
        packing = position_ids  # only given positions can mark packed documents (restarts at 0)
        if position_ids is None:
            position_ids = torch.arange(t, device=device).unsqueeze(0)  # (1, T)
        check_positions(position_ids, self.config)

        hidden_states = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        mask = build_attention_mask(self.config, hidden_states, attention_mask, None, packing)
        position_embeddings = None
        if self.rotary_emb is not None:
            position_embeddings = self.rotary_emb(hidden_states, position_ids.expand(b, -1))  # (B, 1, T, hd) x2
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask, position_embeddings=position_embeddings, **kwargs)
        if self.norm is not None:
            hidden_states = self.norm(hidden_states)
        pooled = self.pooler(hidden_states) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=pooled)


class LmforgeBertForMaskedLM(LmforgeBertPreTrainedModel):
    """BERT with the masked-LM head; ``labels`` (B, T) hold target ids, -100 where no loss is taken."""

    _tied_weights_keys = {"lm_head.decoder.weight": "bert.embeddings.word_embeddings.weight"}
    # read by transformers' ``loss_function`` property; assign ``model.loss_function`` to replace it
    _loss_function = staticmethod(masked_lm_loss)

    def __init__(self, config: LmforgeBertConfig):
        super().__init__(config)
        self.bert = LmforgeBertModel(config, add_pooling_layer=False)
        self.lm_head = LmforgeBertMLMHead(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head.decoder = new_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MaskedLMOutput:
        """Logits (B, T, V); the loss is the mean over labelled tokens (or per ``num_items_in_batch``).

        With ``config.sparse_prediction`` and ``labels``, the head runs on labelled tokens only and
        ``logits`` is (N, V) for the N labelled tokens in row-major order: same loss, less compute.
        """
        outputs = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, **kwargs)
        hidden = outputs.last_hidden_state  # (B, T, D)
        if labels is not None and self.config.sparse_prediction:
            keep = labels != -100
            hidden, labels = hidden[keep], labels[keep]  # (N, D), (N,)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                              attentions=outputs.attentions)


class LmforgeBertForSequenceClassification(LmforgeBertPreTrainedModel):
    """BERT + dropout + linear on the pooled [CLS] vector: logits (B, L).

    The loss follows ``config.problem_type`` like transformers: ``regression`` (MSE; the default for
    one label), ``single_label_classification`` (cross-entropy; integer labels) or
    ``multi_label_classification`` (BCE with logits; float multi-hot labels).
    """

    def __init__(self, config: LmforgeBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = LmforgeBertModel(config, add_pooling_layer=True)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout
        self.dropout = Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutput:
        outputs = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, **kwargs)
        logits = self.classifier(self.dropout(outputs.pooler_output))  # (B, L)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                        attentions=outputs.attentions)


class LmforgeBertForTokenClassification(LmforgeBertPreTrainedModel):
    """BERT + dropout + linear on every token: logits (B, T, L); labels (B, T), -100 is ignored."""

    def __init__(self, config: LmforgeBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = LmforgeBertModel(config, add_pooling_layer=False)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout
        self.dropout = Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> TokenClassifierOutput:
        outputs = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, **kwargs)
        logits = self.classifier(self.dropout(outputs.last_hidden_state))  # (B, T, L)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config, **kwargs)
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions)


def register() -> None:
    """Register ``lmforge_bert`` with AutoConfig / AutoModel* in-process, and make ``save_pretrained``
    write ``auto_map`` and copy this code next to the weights (``trust_remote_code`` loading)."""
    register_family(LmforgeBertConfig, {
        "AutoModel": LmforgeBertModel,
        "AutoModelForMaskedLM": LmforgeBertForMaskedLM,
        "AutoModelForSequenceClassification": LmforgeBertForSequenceClassification,
        "AutoModelForTokenClassification": LmforgeBertForTokenClassification,
    })


__all__ = [
    "LmforgeBertConfig",
    "LmforgeBertForMaskedLM",
    "LmforgeBertForSequenceClassification",
    "LmforgeBertForTokenClassification",
    "LmforgeBertModel",
    "LmforgeBertPreTrainedModel",
    "register",
]
