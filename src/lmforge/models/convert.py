"""Exact weight conversion between lmforge models and stock transformers classes.

This is the correctness oracle: parity tests load the same weights into both and compare logits.

    to_hf(model)      -> the equivalent transformers model (Llama / GPT-2 / Mixtral / BERT / Mamba / Mamba2)
    from_hf(hf_model) -> the equivalent lmforge model

Each pairing of an lmforge family with a stock one (GPT <-> Llama, GPT <-> GPT-2, MoE GPT <-> Mixtral,
BERT <-> BERT, Mamba <-> Mamba, Mamba-2 <-> Mamba2) is stated once, as data: the classes that correspond, a key map (lmforge
parameter names <-> stock names, with the few transforms such as GPT-2's fused, transposed
``c_attn``), and the config fields that hold the same value under another name. One generic
function reads them in both directions; the config functions of a pairing hold only what is
irregular (the switches the stock class has one value of, activation names).

A configuration the target class cannot represent raises ``ValueError`` naming the switch and its
value. Modeling files never import this module (it is not part of the exported model code).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import transformers
from torch import nn

from . import modeling_bert, modeling_gpt, modeling_mamba, modeling_mamba2
from .compat import current_class_name
from .switches import ROPE_TYPES

Tensors = list[torch.Tensor]


def to_hf(model: nn.Module) -> nn.Module:
    """Convert an lmforge model to the equivalent stock transformers model (same weights)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _TO_HF:
        raise ValueError(f"to_hf: no converter for model_type {model_type!r}; known: {sorted(_TO_HF)}")
    return _convert(model, _TO_HF[model_type](model.config), to_stock=True)


def from_hf(hf_model: nn.Module) -> nn.Module:
    """Convert a stock transformers model (Llama, GPT-2, BERT, Mamba, Mamba2) to the lmforge equivalent."""
    model_type = getattr(hf_model.config, "model_type", None)
    if model_type not in _FROM_HF:
        raise ValueError(f"from_hf: no converter for model_type {model_type!r}; known: {sorted(_FROM_HF)}")
    return _convert(hf_model, _FROM_HF[model_type], to_stock=False)


# ------------------------------------------------------------------------ key maps, both ways


@dataclass(frozen=True)
class Transform:
    """How the values of one key-map entry change on the way to the stock model and back (lists
    of tensors, in the order of the entry's names)."""

    to_stock: Callable[[Tensors], Tensors]
    from_stock: Callable[[Tensors], Tensors]


SAME = Transform(lambda v: v, lambda v: v)
# transformers' Conv1D (GPT-2) stores a linear layer's weight as (in, out); nn.Linear as (out, in)
TRANSPOSED = Transform(lambda v: [v[0].t()], lambda v: [v[0].t()])
# q, k, v of equal sizes <-> one fused tensor: (3 x out,) biases, and Conv1D weights (in, 3 x out)
QKV_FUSED = Transform(lambda v: [torch.cat(v)], lambda v: list(v[0].chunk(3)))
QKV_FUSED_TRANSPOSED = Transform(lambda v: [torch.cat(v).t()], lambda v: list(v[0].t().chunk(3)))
# one parameter the stock model lists under two names (a tied bias)
TIED = Transform(lambda v: v[:1] * 2, lambda v: v[:1])


@dataclass(frozen=True)
class Key:
    """lmforge parameter name(s) <-> stock parameter name(s), and how the values change.

    A name may hold ``{i}`` (a layer index); a name ending in "." names a module (its weight and
    bias follow). Names match at the start of a key or after a ".", so a head's prefix ("bert.",
    "model.") is kept. Parameters that no entry names are called the same on both sides.
    """

    ours: str | tuple[str, ...]
    stock: str | tuple[str, ...]
    transform: Transform = SAME


def _conv1d(ours: str, stock: str) -> tuple[Key, Key]:
    """An ``nn.Linear`` module <-> a GPT-2 ``Conv1D`` module: the weight transposed, the bias as it is."""
    return Key(ours + "weight", stock + "weight", TRANSPOSED), Key(ours + "bias", stock + "bias")


def _names(names: str | tuple[str, ...]) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else names


def _pattern(name: str) -> re.Pattern:
    """The keys ``name`` matches: any prefix ending in ".", the name (``{i}`` a layer index), and for a
    module name (ending in ".") the rest of the parameter name."""
    body = r"(?P<i>\d+)".join(re.escape(part) for part in name.split("{i}"))
    rest = r"(?P<rest>.*)" if name.endswith(".") else r"(?P<rest>)"
    return re.compile(r"(?P<prefix>(?:.*\.)?)" + body + rest)


def _fill(match: re.Match, name: str) -> str:
    """``name`` where ``match`` stands: its prefix, its layer index, the rest of its parameter name."""
    return match["prefix"] + name.replace("{i}", match.groupdict().get("i") or "") + match["rest"]


def _rename(state: dict[str, torch.Tensor], keys: tuple[Key, ...], *, to_stock: bool) -> dict[str, torch.Tensor]:
    """``state`` under the other side's parameter names: lmforge -> stock (``to_stock``) or back."""
    left, renamed = dict(state), {}
    for key in keys:
        source, target = (key.ours, key.stock) if to_stock else (key.stock, key.ours)
        source, target = _names(source), _names(target)
        move = key.transform.to_stock if to_stock else key.transform.from_stock
        for match in [m for m in map(_pattern(source[0]).fullmatch, list(left)) if m]:
            names = [_fill(match, name) for name in source]
            missing = [name for name in names if name not in left]
            if missing:
                raise ValueError(f"{names[0]} comes with {', '.join(missing)}, which this model does not have")
            values = move([left.pop(name) for name in names])
            renamed.update(zip([_fill(match, name) for name in target], values, strict=True))
    return {name: value.contiguous() for name, value in {**left, **renamed}.items()}


# ----------------------------------------------------------------------------- the pairings


@dataclass(frozen=True)
class Pairing:
    """An lmforge family and a stock transformers family it converts to and from."""

    stock: str  # the stock family, for messages
    ours: ModuleType  # the lmforge modeling module holding the classes
    classes: dict[str, str]  # lmforge model class -> stock model class
    keys: tuple[Key, ...]  # parameter names, both ways
    to_stock_config: Callable[[Any], Any]  # lmforge config -> stock config (ValueError: not representable)
    from_stock_config: Callable[[Any], Any]  # stock config -> lmforge config (ValueError: not representable)
    note: str = ""  # said when a class has no counterpart


def _convert(source: nn.Module, pairing: Pairing, *, to_stock: bool) -> nn.Module:
    """``source`` as the corresponding class on the other side, with the same weights, dtype and mode."""
    verb = "to_hf" if to_stock else "from_hf"
    classes = pairing.classes if to_stock else {stock: ours for ours, stock in pairing.classes.items()}
    name = type(source).__name__
    if to_stock:
        name = current_class_name(name)  # also a model loaded with lmforge's code of before (GPTForCausalLM)
    if name not in classes:
        side = f"transformers {pairing.stock}" if to_stock else "lmforge"
        raise ValueError(f"{verb}: no {side} class for {type(source).__name__}; known: {sorted(classes)}{pairing.note}")
    config = (pairing.to_stock_config if to_stock else pairing.from_stock_config)(source.config)
    target_class = getattr(transformers if to_stock else pairing.ours, classes[name])
    kwargs = {}
    if "add_pooling_layer" in inspect.signature(target_class.__init__).parameters:  # BERT's base model
        kwargs["add_pooling_layer"] = getattr(source, "pooler", None) is not None
    target = target_class(config, **kwargs)
    target.load_state_dict(_rename(source.state_dict(), pairing.keys, to_stock=to_stock), strict=True)
    target.to(next(source.parameters()).dtype)
    return target.train(source.training)


def _require(config, verb: str, target: str, **expected) -> None:
    """Raise ValueError naming the first setting of ``config`` whose value ``target`` cannot represent
    (``expected``: name -> the one value, or a tuple of the values, it can)."""
    for name, valid in expected.items():
        value = getattr(config, name)
        if not (value in valid if isinstance(valid, tuple) else value == valid):
            raise ValueError(f"{verb}: {target} cannot represent {type(config).__name__}.{name}={value!r} "
                             f"(needs {valid!r})")


def _fields(config, names: dict[str, str], *, to_stock: bool) -> dict[str, Any]:
    """The values of ``config`` under the other side's field names (``names``: lmforge -> stock)."""
    pairs = names.items() if to_stock else [(stock, ours) for ours, stock in names.items()]
    return {target: getattr(config, source) for source, target in pairs}


def _same(*names: str) -> dict[str, str]:
    return {name: name for name in names}


_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_LABELS = ("num_labels", "id2label", "label2id", "problem_type")  # classification heads' fields


def _rope(parameters: dict, verb: str) -> dict:
    rope = dict(parameters)
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        raise ValueError(f"{verb}: rope_parameters rope_type={rope.get('rope_type')!r} is not representable; "
                         f"lmforge supports {', '.join(ROPE_TYPES)}")
    return rope


# ------------------------------------------------------- GPT <-> Llama (the RoPE lmforge GPT)

_LLAMA_FIELDS = {
    **_same("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "attention_bias", "mlp_bias",
            "attention_dropout", "initializer_range", "tie_word_embeddings", *_TOKEN_IDS, *_LABELS),
    "norm_eps": "rms_norm_eps",
}
# the lmforge switches Llama has one value of (hidden_act "swiglu" is Llama's gated "silu")
_LLAMA_SWITCHES = dict(position_embedding_type="rope", norm_type="rmsnorm", norm_position="pre",
                       hidden_act="swiglu", is_causal=True, hidden_dropout=0.0)


def _to_llama(cfg) -> transformers.LlamaConfig:
    _require(cfg, "to_hf", "Llama", **_LLAMA_SWITCHES)
    return transformers.LlamaConfig(**_fields(cfg, _LLAMA_FIELDS, to_stock=True), hidden_act="silu",
                                    rope_parameters=_rope(cfg.rope_parameters, "to_hf"))


def _from_llama(cfg) -> modeling_gpt.LmforgeGPTConfig:
    _require(cfg, "from_hf", "lmforge_gpt", hidden_act="silu")
    rope = _rope(cfg.rope_parameters, "from_hf")
    values = _fields(cfg, _LLAMA_FIELDS, to_stock=False)
    values.update(_LLAMA_SWITCHES, rope_parameters=rope, rope_theta=rope.get("rope_theta", 10000.0),
                  attention_dropout=float(cfg.attention_dropout or 0.0), tie_word_embeddings=bool(cfg.tie_word_embeddings))
    return modeling_gpt.LmforgeGPTConfig(**values)


LLAMA = Pairing(
    stock="Llama",
    ours=modeling_gpt,
    classes={
        "LmforgeGPTModel": "LlamaModel",
        "LmforgeGPTForCausalLM": "LlamaForCausalLM",
        "LmforgeGPTForSequenceClassification": "LlamaForSequenceClassification",
    },
    keys=(  # the same names but the norms'
        Key("layers.{i}.attn_norm.", "layers.{i}.input_layernorm."),
        Key("layers.{i}.mlp_norm.", "layers.{i}.post_attention_layernorm."),
    ),
    to_stock_config=_to_llama,
    from_stock_config=_from_llama,
)


# ---------------------------------------------------- GPT <-> GPT-2 (the learned-position GPT)

_GPT2_FIELDS = {
    **_same("vocab_size", "initializer_range", "tie_word_embeddings", *_TOKEN_IDS),
    "max_position_embeddings": "n_positions",
    "hidden_size": "n_embd",
    "num_hidden_layers": "n_layer",
    "num_attention_heads": "n_head",
    "intermediate_size": "n_inner",
    "hidden_dropout": "resid_pdrop",  # (and embd_pdrop)
    "attention_dropout": "attn_pdrop",
    "norm_eps": "layer_norm_epsilon",
}
_GPT2_SWITCHES = dict(position_embedding_type="learned", norm_type="layernorm", norm_position="pre",
                      hidden_act="gelu_tanh", is_causal=True, norm_bias=True, attention_bias=True, mlp_bias=True)
# GPT2Config.activation_function -> lmforge hidden_act
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
                     "silu": "silu"}


def _to_gpt2(cfg) -> transformers.GPT2Config:
    _require(cfg, "to_hf", "GPT-2", **_GPT2_SWITCHES, num_key_value_heads=cfg.num_attention_heads,
             head_dim=cfg.hidden_size // cfg.num_attention_heads)
    return transformers.GPT2Config(**_fields(cfg, _GPT2_FIELDS, to_stock=True), activation_function="gelu_new",
                                   embd_pdrop=cfg.hidden_dropout)


def _from_gpt2(cfg) -> modeling_gpt.LmforgeGPTConfig:
    _require(cfg, "from_hf", "lmforge_gpt", activation_function=tuple(_GPT2_ACTIVATIONS),
             scale_attn_by_inverse_layer_idx=False, scale_attn_weights=True)
    if getattr(cfg, "add_cross_attention", False):
        raise ValueError("from_hf: GPT-2 with add_cross_attention=True is not representable")
    values = _fields(cfg, _GPT2_FIELDS, to_stock=False)
    values.update(_GPT2_SWITCHES, hidden_act=_GPT2_ACTIVATIONS[cfg.activation_function], num_key_value_heads=cfg.n_head,
                  intermediate_size=cfg.n_inner or 4 * cfg.n_embd,
                  tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)))
    return modeling_gpt.LmforgeGPTConfig(**values)


def _qkv(kind: str) -> tuple[str, str, str]:
    return tuple(f"model.layers.{{i}}.self_attn.{p}_proj.{kind}" for p in "qkv")


GPT2 = Pairing(
    stock="GPT-2",
    ours=modeling_gpt,
    classes={"LmforgeGPTForCausalLM": "GPT2LMHeadModel"},
    keys=(
        Key("model.embed_tokens.", "transformer.wte."),
        Key("model.embed_positions.", "transformer.wpe."),
        Key("model.norm.", "transformer.ln_f."),
        Key("model.layers.{i}.attn_norm.", "transformer.h.{i}.ln_1."),
        Key("model.layers.{i}.mlp_norm.", "transformer.h.{i}.ln_2."),
        Key(_qkv("weight"), "transformer.h.{i}.attn.c_attn.weight", QKV_FUSED_TRANSPOSED),
        Key(_qkv("bias"), "transformer.h.{i}.attn.c_attn.bias", QKV_FUSED),
        *_conv1d("model.layers.{i}.self_attn.o_proj.", "transformer.h.{i}.attn.c_proj."),
        *_conv1d("model.layers.{i}.mlp.up_proj.", "transformer.h.{i}.mlp.c_fc."),
        *_conv1d("model.layers.{i}.mlp.down_proj.", "transformer.h.{i}.mlp.c_proj."),
    ),
    to_stock_config=_to_gpt2,
    from_stock_config=_from_gpt2,
    note="; the learned-position GPT converts to GPT2LMHeadModel only",
)


# ------------------------------------------------------ GPT <-> Mixtral (the mixture-of-experts GPT)

# Llama's fields (Mixtral has no attention or MLP biases), the experts' settings under Mixtral's names
_MIXTRAL_FIELDS = {
    **{ours: stock for ours, stock in _LLAMA_FIELDS.items() if ours not in ("intermediate_size", "attention_bias",
                                                                            "mlp_bias")},
    **_same("num_experts_per_tok", "router_aux_loss_coef", "output_router_logits"),
    "num_experts": "num_local_experts",
}
# the settings Mixtral has one value of: Llama's, and renormalised top-k routing without a shared
# expert, z-loss or selection bias (training-only settings are refused too, as hidden_dropout is)
_MIXTRAL_SWITCHES = dict(_LLAMA_SWITCHES, attention_bias=False, norm_topk_prob=True, router_z_loss_coef=0.0,
                         router_bias_update_rate=0.0, router_aux_loss_per_layer=False)


def _to_mixtral(cfg) -> transformers.MixtralConfig:
    if cfg.num_shared_experts:
        raise ValueError(
            f"to_hf: no stock transformers class matches num_shared_experts={cfg.num_shared_experts} (an ungated "
            "shared expert beside softmax top-k routing and Llama attention): Mixtral and Qwen3-MoE have no shared "
            "expert (and Qwen3-MoE normalises q and k), Qwen2-MoE scales its shared expert by a sigmoid gate, "
            "DeepSeek-V2/V3 use latent attention and Ernie-4.5-MoE interleaved RoPE; set num_shared_experts=0 "
            "to convert to Mixtral")
    _require(cfg, "to_hf", "Mixtral", **_MIXTRAL_SWITCHES)
    return transformers.MixtralConfig(**_fields(cfg, _MIXTRAL_FIELDS, to_stock=True), hidden_act="silu",
                                      intermediate_size=cfg.moe_intermediate_size or cfg.intermediate_size,
                                      rope_parameters=_rope(cfg.rope_parameters, "to_hf"), sliding_window=None,
                                      router_jitter_noise=0.0)


def _from_mixtral(cfg) -> modeling_gpt.LmforgeGPTConfig:
    _require(cfg, "from_hf", "lmforge_gpt", hidden_act="silu", sliding_window=None, router_jitter_noise=0.0)
    rope = _rope(cfg.rope_parameters, "from_hf")
    values = _fields(cfg, _MIXTRAL_FIELDS, to_stock=False)
    values.update(_MIXTRAL_SWITCHES, rope_parameters=rope, rope_theta=rope.get("rope_theta", 10000.0),
                  intermediate_size=cfg.intermediate_size, moe_intermediate_size=cfg.intermediate_size,
                  attention_dropout=float(cfg.attention_dropout or 0.0), tie_word_embeddings=bool(cfg.tie_word_embeddings),
                  router_aux_loss_coef=float(cfg.router_aux_loss_coef))
    return modeling_gpt.LmforgeGPTConfig(**values)


MIXTRAL = Pairing(
    stock="Mixtral",
    ours=modeling_gpt,
    classes={
        "LmforgeGPTModel": "MixtralModel",
        "LmforgeGPTForCausalLM": "MixtralForCausalLM",
        "LmforgeGPTForSequenceClassification": "MixtralForSequenceClassification",
    },
    keys=LLAMA.keys,  # the norms renamed; router (mlp.gate) and experts (mlp.experts) share Mixtral's names
    to_stock_config=_to_mixtral,
    from_stock_config=_from_mixtral,
)


# ------------------------------------------------------------------- BERT (the classic preset)

_BERT_FIELDS = {
    **_same("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "type_vocab_size", "initializer_range", "pad_token_id", "classifier_dropout",
            "tie_word_embeddings", *_LABELS),
    "hidden_dropout": "hidden_dropout_prob",
    "attention_dropout": "attention_probs_dropout_prob",
    "norm_eps": "layer_norm_eps",
}
_BERT_SWITCHES = dict(position_embedding_type="learned", norm_type="layernorm", norm_position="post", norm_bias=True,
                      attention_bias=True, mlp_bias=True, embedding_norm=True)
# BertConfig.hidden_act -> lmforge hidden_act (ungated activations only: BERT has no gated MLP)
_BERT_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu"}


def _to_bert(cfg) -> transformers.BertConfig:
    stock_activations = {ours: stock for stock, ours in _BERT_ACTIVATIONS.items()}
    _require(cfg, "to_hf", "BERT", hidden_act=tuple(stock_activations))
    if cfg.type_vocab_size < 1:
        raise ValueError("to_hf: BERT cannot represent type_vocab_size=0 (it always has token types)")
    _require(cfg, "to_hf", "BERT", **_BERT_SWITCHES, num_key_value_heads=cfg.num_attention_heads,
             head_dim=cfg.hidden_size // cfg.num_attention_heads)
    stock = transformers.BertConfig(**_fields(cfg, _BERT_FIELDS, to_stock=True),
                                    hidden_act=stock_activations[cfg.hidden_act])
    stock._attn_implementation = cfg._attn_implementation
    return stock


def _from_bert(cfg) -> modeling_bert.LmforgeBertConfig:
    _require(cfg, "from_hf", "lmforge_bert", hidden_act=tuple(_BERT_ACTIVATIONS), is_decoder=False,
             add_cross_attention=False)
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"from_hf: BertConfig.position_embedding_type={cfg.position_embedding_type!r} "
                         "is not representable (lmforge_bert has 'absolute' as 'learned')")
    values = _fields(cfg, _BERT_FIELDS, to_stock=False)
    values.update(hidden_act=_BERT_ACTIVATIONS[cfg.hidden_act], hidden_dropout=float(cfg.hidden_dropout_prob),
                  attention_dropout=float(cfg.attention_probs_dropout_prob),
                  tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)))
    ours = modeling_bert.LmforgeBertConfig.from_preset("classic", **values)
    ours._attn_implementation = cfg._attn_implementation
    return ours


_BERT_LAYER = "encoder.layer.{i}."  # transformers' BertLayer; lmforge's TransformerBlock is "layers.{i}."

BERT = Pairing(
    stock="BERT",
    ours=modeling_bert,
    classes={
        "LmforgeBertModel": "BertModel",
        "LmforgeBertForMaskedLM": "BertForMaskedLM",
        "LmforgeBertForSequenceClassification": "BertForSequenceClassification",
        "LmforgeBertForTokenClassification": "BertForTokenClassification",
    },
    keys=(
        Key("layers.{i}.self_attn.q_proj.", _BERT_LAYER + "attention.self.query."),
        Key("layers.{i}.self_attn.k_proj.", _BERT_LAYER + "attention.self.key."),
        Key("layers.{i}.self_attn.v_proj.", _BERT_LAYER + "attention.self.value."),
        Key("layers.{i}.self_attn.o_proj.", _BERT_LAYER + "attention.output.dense."),
        Key("layers.{i}.attn_norm.", _BERT_LAYER + "attention.output.LayerNorm."),
        Key("layers.{i}.mlp.up_proj.", _BERT_LAYER + "intermediate.dense."),
        Key("layers.{i}.mlp.down_proj.", _BERT_LAYER + "output.dense."),
        Key("layers.{i}.mlp_norm.", _BERT_LAYER + "output.LayerNorm."),
        Key("embeddings.norm.", "embeddings.LayerNorm."),
        Key("lm_head.dense.", "cls.predictions.transform.dense."),
        Key("lm_head.norm.", "cls.predictions.transform.LayerNorm."),
        Key("lm_head.decoder.weight", "cls.predictions.decoder.weight"),
        Key("lm_head.decoder.bias", ("cls.predictions.bias", "cls.predictions.decoder.bias"), TIED),
    ),
    to_stock_config=_to_bert,
    from_stock_config=_from_bert,
)


# -------------------------------------------------------------------------------------- Mamba

# Field names follow transformers' MambaConfig: only the norm epsilon is renamed.
_MAMBA_FIELDS = {
    **_same("vocab_size", "hidden_size", "num_hidden_layers", "state_size", "expand", "conv_kernel",
            "time_step_rank", "time_step_min", "time_step_max", "time_step_floor", "time_step_init_scheme",
            "time_step_scale", "use_bias", "use_conv_bias", "residual_in_fp32", "rescale_prenorm_residual",
            "initializer_range", "tie_word_embeddings", *_TOKEN_IDS),
    "norm_eps": "layer_norm_epsilon",
}


def _to_mamba(cfg) -> transformers.MambaConfig:
    return transformers.MambaConfig(**_fields(cfg, _MAMBA_FIELDS, to_stock=True), hidden_act="silu",
                                    use_mambapy=False)


def _from_mamba(cfg) -> modeling_mamba.LmforgeMambaConfig:
    _require(cfg, "from_hf", "lmforge_mamba (SiLU only)", hidden_act="silu")
    if cfg.intermediate_size != cfg.expand * cfg.hidden_size:
        raise ValueError(f"from_hf: intermediate_size={cfg.intermediate_size} is not expand * hidden_size; "
                         "lmforge Mamba derives it from expand")
    return modeling_mamba.LmforgeMambaConfig(**_fields(cfg, _MAMBA_FIELDS, to_stock=False))


MAMBA = Pairing(
    stock="Mamba",
    ours=modeling_mamba,
    classes={"LmforgeMambaForCausalLM": "MambaForCausalLM", "LmforgeMambaModel": "MambaModel"},
    keys=(),  # the same parameter names on both sides: only the configs differ
    to_stock_config=_to_mamba,
    from_stock_config=_from_mamba,
    note="; transformers has no Mamba sequence-classification class",
)


# ------------------------------------------------------------------------------------ Mamba-2

# Field names follow transformers' Mamba2Config: only the norm epsilon is renamed. chunk_size None
# (the scan's default) becomes the stock default, 256.
_MAMBA2_FIELDS = {
    **_same("vocab_size", "hidden_size", "num_hidden_layers", "state_size", "expand", "num_heads", "head_dim",
            "n_groups", "conv_kernel", "time_step_min", "time_step_max", "time_step_floor", "use_bias",
            "use_conv_bias", "residual_in_fp32", "rescale_prenorm_residual", "initializer_range",
            "tie_word_embeddings", *_TOKEN_IDS),
    "norm_eps": "layer_norm_epsilon",
}
# Mamba2Config checks types strictly (an int is not a float)
_MAMBA2_FLOATS = ("time_step_min", "time_step_max", "time_step_floor", "initializer_range", "layer_norm_epsilon")


def _to_mamba2(cfg) -> transformers.Mamba2Config:
    others = [f"{i}: {kind!r}" for i, kind in enumerate(cfg.layer_types) if kind != "linear_attention"]
    if others:
        raise ValueError(f"to_hf: transformers' Mamba2 has Mamba-2 layers only, and this hybrid's layer_types has "
                         f"{', '.join(others)}; no stock class matches a hybrid")
    values = _fields(cfg, _MAMBA2_FIELDS, to_stock=True)
    values.update({name: float(values[name]) for name in _MAMBA2_FLOATS})
    return transformers.Mamba2Config(**values, hidden_act="silu", chunk_size=cfg.chunk_size or 256,
                                     time_step_limit=tuple(float(v) for v in cfg.time_step_limit))


def _from_mamba2(cfg) -> modeling_mamba2.LmforgeMamba2Config:
    _require(cfg, "from_hf", "lmforge_mamba2 (SiLU only)", hidden_act="silu")
    return modeling_mamba2.LmforgeMamba2Config(**_fields(cfg, _MAMBA2_FIELDS, to_stock=False),
                                               chunk_size=cfg.chunk_size, time_step_limit=tuple(cfg.time_step_limit))


MAMBA2 = Pairing(
    stock="Mamba2",
    ours=modeling_mamba2,
    classes={"LmforgeMamba2ForCausalLM": "Mamba2ForCausalLM", "LmforgeMamba2Model": "Mamba2Model"},
    keys=(),  # the same parameter names on both sides: only the configs differ
    to_stock_config=_to_mamba2,
    from_stock_config=_from_mamba2,
    note="; transformers has no Mamba2 sequence-classification class",
)


# lmforge model_type -> the pairing for a config; stock model_type -> its pairing
_TO_HF: dict[str, Callable[[Any], Pairing]] = {
    "lmforge_gpt": lambda cfg: (MIXTRAL if getattr(cfg, "num_experts", 0) else
                                GPT2 if cfg.position_embedding_type == "learned" else LLAMA),
    "lmforge_bert": lambda cfg: BERT,
    "lmforge_mamba": lambda cfg: MAMBA,
    "lmforge_mamba2": lambda cfg: MAMBA2,
}
_FROM_HF: dict[str, Pairing] = {"llama": LLAMA, "mixtral": MIXTRAL, "gpt2": GPT2, "bert": BERT, "mamba": MAMBA, "mamba2": MAMBA2}
