"""Configuration of the lmforge BERT encoder (``model_type`` ``lmforge_bert``).

The architecture is a switchboard shared with the GPT family (allowed values in ``switches.py``):
positions, norm type and placement, activation / gated MLP, grouped-query attention. Two presets:

- ``classic``: learned absolute positions, token types, embedding LayerNorm, post-LayerNorm, erf
  GELU, biases everywhere and an MLM transform (dense, GELU, LayerNorm) with a decoder bias. It is
  numerically identical to transformers' ``BertForMaskedLM`` (see ``lmforge.models.convert``).
- ``modern`` (the default): RoPE, pre-norm RMSNorm, GeGLU, no biases.

This file is copied next to saved weights: it imports only transformers, the standard library and
siblings.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from .switches import PROBLEM_TYPES, check_choice, check_switches

# Architecture presets. Sizes are bert-base's; `debug` presets are tiny, for tests and smoke runs.
_CLASSIC: dict[str, Any] = {
    "position_embedding_type": "learned",
    "norm_type": "layernorm",
    "norm_position": "post",
    "norm_eps": 1e-12,
    "norm_bias": True,
    "hidden_act": "gelu",
    "attention_bias": True,
    "mlp_bias": True,
    "type_vocab_size": 2,
    "attention_dropout": 0.1,
    "hidden_dropout": 0.1,
}
_MODERN: dict[str, Any] = {
    "position_embedding_type": "rope",
    "norm_type": "rmsnorm",
    "norm_position": "pre",
    "norm_eps": 1e-6,
    "norm_bias": False,
    "hidden_act": "geglu",
    "attention_bias": False,
    "mlp_bias": False,
    "type_vocab_size": 2,
    "attention_dropout": 0.0,
    "hidden_dropout": 0.1,
}
_DEBUG_SIZE: dict[str, Any] = {
    "vocab_size": 1024,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 128,
}
PRESETS: dict[str, dict[str, Any]] = {
    "classic": _CLASSIC,
    "modern": _MODERN,
    "debug": {**_MODERN, **_DEBUG_SIZE},
    "classic-debug": {**_CLASSIC, **_DEBUG_SIZE},
}


class LmforgeBertConfig(PreTrainedConfig):
    """Configuration of an lmforge BERT encoder. Invalid settings raise ``ValueError`` naming the field.

    Args (all keyword; the switch defaults are the ``modern`` preset's):
        vocab_size: Number of tokens (rows of the word embedding and of the tied MLM decoder).
        hidden_size: Width of the residual stream.
        num_hidden_layers: Number of Transformer blocks.
        num_attention_heads: Query heads.
        num_key_value_heads: Key/value heads (equal: MHA, 1: MQA, in between: GQA). Default: heads.
        head_dim: Width of one head. Default: ``hidden_size // num_attention_heads``.
        intermediate_size: Width of the MLP's hidden layer (of each branch for gated MLPs).
        hidden_act: ``gelu`` (erf), ``gelu_tanh``, ``relu``, ``silu``, or gated ``swiglu``/``geglu``.
        position_embedding_type: ``rope``, ``alibi``, ``learned``, ``sinusoidal`` or ``none``.
        rope_theta: RoPE base frequency.
        rope_parameters: RoPE settings (``rope_type`` and scaling); completed with ``rope_type``
            "default" and ``rope_theta`` where they are missing.
        max_position_embeddings: Longest sequence (size of the learned position table).
        norm_type: ``rmsnorm``, ``layernorm`` or ``dyt`` (Dynamic Tanh).
        norm_position: ``pre`` (norm inside the residual branch, final norm at the end), ``post``
            (original BERT: norm after each residual sum) or ``deepnorm`` (post-norm, scaled residual).
        norm_eps: Epsilon of the norms.
        norm_bias: Whether LayerNorms have a bias.
        attention_bias: Bias on the q/k/v/o projections.
        mlp_bias: Bias on the MLP projections.
        attention_dropout: Dropout on attention probabilities.
        hidden_dropout: Dropout on embeddings and on each residual branch.
        initializer_range: Standard deviation of the normal initialisation.
        type_vocab_size: Number of token types (segments); 0 disables token-type embeddings.
        embedding_norm: Normalise the embeddings (classic BERT's embedding LayerNorm).
        sparse_prediction: In masked-LM training (``labels`` given), run the MLM head on the
            labelled tokens only (ModernBERT's trick): the same loss, ``logits`` shaped (N, V).
        classifier_dropout: Dropout before classification heads. Default: ``hidden_dropout``.
        pad_token_id: Padding token id (its word embedding row is kept at zero at init).
        tie_word_embeddings: Share the MLM decoder weight with the word embedding.
        is_causal: Always False: BERT attends in both directions.
        PreTrainedConfig's fields (``num_labels``, ``problem_type``, ``id2label``...) as usual.
    """

    model_type = "lmforge_bert"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int = 3072
    hidden_act: str = _MODERN["hidden_act"]
    position_embedding_type: str = _MODERN["position_embedding_type"]
    rope_theta: float = 10000.0
    rope_parameters: dict | None = None
    max_position_embeddings: int = 512
    norm_type: str = _MODERN["norm_type"]
    norm_position: str = _MODERN["norm_position"]
    norm_eps: float = _MODERN["norm_eps"]
    norm_bias: bool = _MODERN["norm_bias"]
    attention_bias: bool = _MODERN["attention_bias"]
    mlp_bias: bool = _MODERN["mlp_bias"]
    attention_dropout: float = _MODERN["attention_dropout"]
    hidden_dropout: float = _MODERN["hidden_dropout"]
    initializer_range: float = 0.02
    type_vocab_size: int = 2
    embedding_norm: bool = True
    sparse_prediction: bool = False
    classifier_dropout: float | None = None
    pad_token_id: int | None = 0
    tie_word_embeddings: bool = True
    is_causal: bool = False

    def __post_init__(self, **kwargs):
        if self.is_causal:
            raise ValueError("LmforgeBertConfig.is_causal=True is not supported: BERT is bidirectional")
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        heads = self.num_attention_heads
        self.head_dim = self.head_dim or (self.hidden_size // heads if isinstance(heads, int) and heads else 0)
        self.rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_parameters or {})}
        # validate before PreTrainedConfig's own checks, so errors name lmforge's fields
        self._validate()
        super().__post_init__(**kwargs)

    def _validate(self) -> None:
        """Raise ValueError naming the field for any inconsistent setting."""
        check_switches(self)
        if self.problem_type is not None:
            check_choice("LmforgeBertConfig", "problem_type", self.problem_type, PROBLEM_TYPES)
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"LmforgeBertConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"LmforgeBertConfig.num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.position_embedding_type == "rope" and self.head_dim % 2:
            raise ValueError(f"LmforgeBertConfig.head_dim={self.head_dim} must be even for RoPE")
        if self.type_vocab_size < 0:
            raise ValueError(f"LmforgeBertConfig.type_vocab_size must be >= 0, got {self.type_vocab_size}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"LmforgeBertConfig.pad_token_id={self.pad_token_id} is outside the vocabulary "
                f"(vocab_size={self.vocab_size})"
            )
        for name in ("attention_dropout", "hidden_dropout", "classifier_dropout"):
            p = getattr(self, name)
            if p is not None and not 0.0 <= p < 1.0:
                raise ValueError(f"LmforgeBertConfig.{name}={p} must be in [0, 1)")

    @classmethod
    def from_preset(cls, name: str = "modern", **overrides: Any) -> LmforgeBertConfig:
        """Build a config from a named preset (``classic``, ``modern``, ``debug``, ``classic-debug``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown BERT preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


__all__ = ["PRESETS", "LmforgeBertConfig"]
