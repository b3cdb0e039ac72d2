"""Configuration of the lmforge BERT encoder (``model_type`` ``lmforge_bert``).

The architecture is a switchboard shared with the GPT family (attribute names in ``layers.py``):
positions, norm type and placement, activation / gated MLP, grouped-query attention. Two presets:

- ``classic``: learned absolute positions, token types, embedding LayerNorm, post-LayerNorm, erf
  GELU, biases everywhere and an MLM transform (dense, GELU, LayerNorm) with a decoder bias. It is
  numerically identical to transformers' ``BertForMaskedLM`` (see ``lmforge.models.convert``).
- ``modern`` (the default): RoPE, pre-norm RMSNorm, GeGLU, no biases.

This file is copied next to saved weights: it imports only transformers and the standard library.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

HIDDEN_ACTS = ("gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu")
POSITION_TYPES = ("rope", "alibi", "learned", "sinusoidal", "none")
NORM_TYPES = ("rmsnorm", "layernorm", "dyt")
NORM_POSITIONS = ("pre", "post", "deepnorm")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

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


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"LmforgeBertConfig.{name}={value!r} is not valid; choose one of {list(choices)}")


class LmforgeBertConfig(PreTrainedConfig):
    """Configuration of an lmforge BERT encoder.

    Args:
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
        rope_parameters: RoPE settings (``rope_type`` and scaling); built from ``rope_theta`` if None.
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
        kwargs: ``PreTrainedConfig`` options (``num_labels``, ``problem_type``, ``id2label``...).
    """

    model_type = "lmforge_bert"

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        intermediate_size: int = 3072,
        hidden_act: str = _MODERN["hidden_act"],
        position_embedding_type: str = _MODERN["position_embedding_type"],
        rope_theta: float = 10000.0,
        rope_parameters: dict[str, Any] | None = None,
        max_position_embeddings: int = 512,
        norm_type: str = _MODERN["norm_type"],
        norm_position: str = _MODERN["norm_position"],
        norm_eps: float = _MODERN["norm_eps"],
        norm_bias: bool = _MODERN["norm_bias"],
        attention_bias: bool = _MODERN["attention_bias"],
        mlp_bias: bool = _MODERN["mlp_bias"],
        attention_dropout: float = _MODERN["attention_dropout"],
        hidden_dropout: float = _MODERN["hidden_dropout"],
        initializer_range: float = 0.02,
        type_vocab_size: int = 2,
        embedding_norm: bool = True,
        sparse_prediction: bool = False,
        classifier_dropout: float | None = None,
        pad_token_id: int | None = 0,
        tie_word_embeddings: bool = True,
        is_causal: bool = False,
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or (hidden_size // num_attention_heads if num_attention_heads else 0)
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.position_embedding_type = position_embedding_type
        self.rope_theta = rope_theta
        self.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta, **(rope_parameters or {})}
        self.max_position_embeddings = max_position_embeddings
        self.norm_type = norm_type
        self.norm_position = norm_position
        self.norm_eps = norm_eps
        self.norm_bias = norm_bias
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.attention_dropout = attention_dropout
        self.hidden_dropout = hidden_dropout
        self.initializer_range = initializer_range
        self.type_vocab_size = type_vocab_size
        self.embedding_norm = embedding_norm
        self.sparse_prediction = sparse_prediction
        self.classifier_dropout = classifier_dropout
        self.pad_token_id = pad_token_id
        self.tie_word_embeddings = tie_word_embeddings
        if is_causal:
            raise ValueError("LmforgeBertConfig.is_causal=True is not supported: BERT is bidirectional")
        self.is_causal = False
        # validate before PreTrainedConfig's own checks, so errors name lmforge's fields
        self._validate(kwargs.get("problem_type"))
        super().__init__(**kwargs)

    def _validate(self, problem_type: str | None) -> None:
        """Raise ValueError naming the field for any inconsistent setting."""
        _check_choice("hidden_act", self.hidden_act, HIDDEN_ACTS)
        _check_choice("position_embedding_type", self.position_embedding_type, POSITION_TYPES)
        _check_choice("norm_type", self.norm_type, NORM_TYPES)
        _check_choice("norm_position", self.norm_position, NORM_POSITIONS)
        if problem_type is not None:
            _check_choice("problem_type", problem_type, PROBLEM_TYPES)
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
