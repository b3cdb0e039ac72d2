"""Exact weight conversion between lmforge models and stock transformers classes.

This is the correctness oracle: parity tests load the same weights into both and compare logits.

    to_hf(model)      -> the equivalent transformers model (Llama / GPT-2 / BERT / Mamba)
    from_hf(hf_model) -> the equivalent lmforge model

A configuration the target class cannot represent raises ``ValueError`` naming the switch.
Modeling files never import this module (it is not part of the exported model code).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch.nn as nn

# model_type of the source model -> converter. Each family section registers its own.
_TO_HF: dict[str, Callable[[nn.Module], nn.Module]] = {}
_FROM_HF: dict[str, Callable[[nn.Module], nn.Module]] = {}
# config fields of classification heads, copied as they are
_LABEL_FIELDS = ("num_labels", "id2label", "label2id", "problem_type")


def to_hf(model: nn.Module) -> nn.Module:
    """Convert an lmforge model to the equivalent stock transformers model (same weights)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _TO_HF:
        raise ValueError(f"to_hf: no converter for model_type {model_type!r}; known: {sorted(_TO_HF)}")
    return _TO_HF[model_type](model)


def from_hf(hf_model: nn.Module) -> nn.Module:
    """Convert a stock transformers model (Llama, GPT-2, BERT, Mamba) to the lmforge equivalent."""
    model_type = getattr(hf_model.config, "model_type", None)
    if model_type not in _FROM_HF:
        raise ValueError(f"from_hf: no converter for model_type {model_type!r}; known: {sorted(_FROM_HF)}")
    return _FROM_HF[model_type](hf_model)


# ----------------------------------------------------------------------------------- GPT
# (LlamaModel / LlamaForCausalLM / LlamaForSequenceClassification <-> lmforge_gpt,
#  GPT2LMHeadModel <-> the learned-position lmforge_gpt)

_GPT_SHARED_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_GPT_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# lmforge GPT class name -> transformers Llama class name (same parameter names but the norms')
_LLAMA_HEADS = {
    "GPTModel": "LlamaModel",
    "GPTForCausalLM": "LlamaForCausalLM",
    "GPTForSequenceClassification": "LlamaForSequenceClassification",
}


def _gpt_require(config, target: str, **expected) -> None:
    """Raise ValueError naming the first switch whose value ``target`` cannot represent."""
    for name, valid in expected.items():
        value = getattr(config, name)
        ok = value in valid if isinstance(valid, tuple) else value == valid
        if not ok:
            raise ValueError(
                f"to_hf: {target} cannot represent {name}={value!r} (needs {valid!r}); "
                "this lmforge_gpt model has no stock transformers equivalent"
            )


def _gpt_token_ids(config) -> dict:
    return {name: getattr(config, name, None) for name in _GPT_TOKEN_IDS}


def _gpt_load(target: nn.Module, state: dict, like: nn.Module) -> nn.Module:
    """Load ``state`` strictly into ``target`` and match the source's dtype; eval mode like the source."""
    target.load_state_dict(state, strict=True)
    target.to(next(like.parameters()).dtype)
    return target.train(like.training)


def _gpt_to_llama(model: nn.Module) -> nn.Module:
    import transformers
    from transformers import LlamaConfig

    cfg = model.config
    name = type(model).__name__
    if name not in _LLAMA_HEADS:
        raise ValueError(f"to_hf: no transformers Llama class for {name}; known: {sorted(_LLAMA_HEADS)}")
    _gpt_require(
        cfg, _LLAMA_HEADS[name], position_embedding_type="rope", norm_type="rmsnorm", norm_position="pre",
        hidden_act="swiglu", is_causal=True, hidden_dropout=0.0,
    )
    rope = dict(cfg.rope_parameters)
    if rope.get("rope_type", "default") not in ("default", "linear", "dynamic"):
        raise ValueError(f"to_hf: unsupported rope_parameters {rope!r}")
    hf_cfg = LlamaConfig(
        **{k: getattr(cfg, k) for k in _GPT_SHARED_SIZES},
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
        rope_parameters=rope, attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias,
        attention_dropout=cfg.attention_dropout, initializer_range=cfg.initializer_range,
        tie_word_embeddings=cfg.tie_word_embeddings, **_gpt_token_ids(cfg),
        **{k: getattr(cfg, k) for k in _LABEL_FIELDS},
    )
    hf = getattr(transformers, _LLAMA_HEADS[name])(hf_cfg)
    names = {".attn_norm.": ".input_layernorm.", ".mlp_norm.": ".post_attention_layernorm."}
    state = {}
    for key, value in model.state_dict().items():
        for ours, theirs in names.items():
            key = key.replace(ours, theirs)
        state[key] = value
    return _gpt_load(hf, state, model)


def _gpt_from_llama(hf_model: nn.Module) -> nn.Module:
    from . import modeling_gpt

    cfg = hf_model.config
    heads = {v: k for k, v in _LLAMA_HEADS.items()}
    name = type(hf_model).__name__
    if name not in heads:
        raise ValueError(f"from_hf: no lmforge GPT class for {name}; known: {sorted(heads)}")
    if cfg.hidden_act != "silu":
        raise ValueError(f"from_hf: LlamaConfig.hidden_act={cfg.hidden_act!r} is not 'silu' (lmforge 'swiglu')")
    rope = dict(cfg.rope_parameters)
    if rope.get("rope_type", "default") not in ("default", "linear", "dynamic"):
        raise ValueError(f"from_hf: LlamaConfig rope_type={rope.get('rope_type')!r}; lmforge supports default, linear, dynamic")
    ours = modeling_gpt.GPTConfig(
        **{k: getattr(cfg, k) for k in _GPT_SHARED_SIZES},
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, hidden_act="swiglu",
        position_embedding_type="rope", rope_theta=rope.get("rope_theta", 10000.0), rope_parameters=rope,
        max_position_embeddings=cfg.max_position_embeddings, norm_type="rmsnorm", norm_position="pre",
        norm_eps=cfg.rms_norm_eps, attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias,
        attention_dropout=float(cfg.attention_dropout or 0.0), initializer_range=cfg.initializer_range,
        tie_word_embeddings=bool(cfg.tie_word_embeddings), **_gpt_token_ids(cfg),
        **{k: getattr(cfg, k) for k in _LABEL_FIELDS},
    )
    model = getattr(modeling_gpt, heads[name])(ours)
    names = {".input_layernorm.": ".attn_norm.", ".post_attention_layernorm.": ".mlp_norm."}
    state = {}
    for key, value in hf_model.state_dict().items():
        for theirs, mine in names.items():
            key = key.replace(theirs, mine)
        state[key] = value
    return _gpt_load(model, state, hf_model)


def _gpt_to_gpt2(model: nn.Module) -> nn.Module:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.config
    if type(model).__name__ != "GPTForCausalLM":
        raise ValueError(f"to_hf: the learned-position GPT converts to GPT2LMHeadModel only, not from {type(model).__name__}")
    _gpt_require(
        cfg, "GPT2LMHeadModel", position_embedding_type="learned", norm_type="layernorm", norm_position="pre",
        hidden_act="gelu_tanh", is_causal=True, norm_bias=True, attention_bias=True, mlp_bias=True,
        num_key_value_heads=cfg.num_attention_heads, head_dim=cfg.hidden_size // cfg.num_attention_heads,
    )
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_position_embeddings, n_embd=cfg.hidden_size,
        n_layer=cfg.num_hidden_layers, n_head=cfg.num_attention_heads, n_inner=cfg.intermediate_size,
        activation_function="gelu_new", resid_pdrop=cfg.hidden_dropout, embd_pdrop=cfg.hidden_dropout,
        attn_pdrop=cfg.attention_dropout, layer_norm_epsilon=cfg.norm_eps, initializer_range=cfg.initializer_range,
        tie_word_embeddings=cfg.tie_word_embeddings, **_gpt_token_ids(cfg),
    )
    hf = GPT2LMHeadModel(hf_cfg)
    sd = model.state_dict()
    state = {
        "transformer.wte.weight": sd["model.embed_tokens.weight"],
        "transformer.wpe.weight": sd["model.embed_positions.weight"],
        "transformer.ln_f.weight": sd["model.norm.weight"],
        "transformer.ln_f.bias": sd["model.norm.bias"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(cfg.num_hidden_layers):
        ours, theirs = f"model.layers.{i}.", f"transformer.h.{i}."
        attn = ours + "self_attn."
        for norm, ln in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            state[f"{theirs}{ln}.weight"] = sd[f"{ours}{norm}.weight"]
            state[f"{theirs}{ln}.bias"] = sd[f"{ours}{norm}.bias"]
        # Conv1D stores (in, out): transpose every nn.Linear weight; q, k, v fuse into c_attn
        qkv = [attn + p for p in ("q_proj", "k_proj", "v_proj")]
        state[theirs + "attn.c_attn.weight"] = torch.cat([sd[p + ".weight"] for p in qkv], 0).t()
        state[theirs + "attn.c_attn.bias"] = torch.cat([sd[p + ".bias"] for p in qkv], 0)
        pairs = (("self_attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj"))
        for mine, hf_name in pairs:
            state[f"{theirs}{hf_name}.weight"] = sd[f"{ours}{mine}.weight"].t()
            state[f"{theirs}{hf_name}.bias"] = sd[f"{ours}{mine}.bias"]
    state = {k: v.contiguous() for k, v in state.items()}
    return _gpt_load(hf, state, model)


_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu", "silu": "silu"}


def _gpt_from_gpt2(hf_model: nn.Module) -> nn.Module:
    import torch

    from .modeling_gpt import GPTConfig, GPTForCausalLM

    cfg = hf_model.config
    if type(hf_model).__name__ != "GPT2LMHeadModel":
        raise ValueError(f"from_hf: GPT-2 converts from GPT2LMHeadModel only, not {type(hf_model).__name__}")
    if cfg.activation_function not in _GPT2_ACTIVATIONS:
        raise ValueError(f"from_hf: GPT2Config.activation_function={cfg.activation_function!r} is not one of {sorted(_GPT2_ACTIVATIONS)}")
    if cfg.scale_attn_by_inverse_layer_idx or not cfg.scale_attn_weights:
        raise ValueError("from_hf: GPT-2 attention scaling switches (scale_attn_by_inverse_layer_idx / scale_attn_weights) are not representable")
    if getattr(cfg, "add_cross_attention", False):
        raise ValueError("from_hf: GPT-2 with add_cross_attention=True is not representable")
    d = cfg.n_embd
    ours = GPTConfig(
        vocab_size=cfg.vocab_size, hidden_size=d, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head, intermediate_size=cfg.n_inner or 4 * d,
        hidden_act=_GPT2_ACTIVATIONS[cfg.activation_function], position_embedding_type="learned",
        max_position_embeddings=cfg.n_positions, norm_type="layernorm", norm_position="pre",
        norm_eps=cfg.layer_norm_epsilon, norm_bias=True, attention_bias=True, mlp_bias=True,
        attention_dropout=cfg.attn_pdrop, hidden_dropout=cfg.resid_pdrop, initializer_range=cfg.initializer_range,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)), **_gpt_token_ids(cfg),
    )
    model = GPTForCausalLM(ours)
    sd = hf_model.state_dict()
    state = {
        "model.embed_tokens.weight": sd["transformer.wte.weight"],
        "model.embed_positions.weight": sd["transformer.wpe.weight"],
        "model.norm.weight": sd["transformer.ln_f.weight"],
        "model.norm.bias": sd["transformer.ln_f.bias"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(cfg.n_layer):
        ours_p, theirs = f"model.layers.{i}.", f"transformer.h.{i}."
        for norm, ln in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            state[f"{ours_p}{norm}.weight"] = sd[f"{theirs}{ln}.weight"]
            state[f"{ours_p}{norm}.bias"] = sd[f"{theirs}{ln}.bias"]
        w = sd[theirs + "attn.c_attn.weight"].t()  # (3D, D)
        b = sd[theirs + "attn.c_attn.bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            state[f"{ours_p}self_attn.{name}.weight"] = w[j * d : (j + 1) * d]
            state[f"{ours_p}self_attn.{name}.bias"] = b[j * d : (j + 1) * d]
        pairs = (("self_attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj"))
        for mine, hf_name in pairs:
            state[f"{ours_p}{mine}.weight"] = sd[f"{theirs}{hf_name}.weight"].t()
            state[f"{ours_p}{mine}.bias"] = sd[f"{theirs}{hf_name}.bias"]
    state = {k: torch.Tensor.contiguous(v) for k, v in state.items()}
    return _gpt_load(model, state, hf_model)


def _gpt_to_hf(model: nn.Module) -> nn.Module:
    """lmforge_gpt -> LlamaForCausalLM (RoPE variant) or GPT2LMHeadModel (learned-position variant)."""
    if model.config.position_embedding_type == "learned":
        return _gpt_to_gpt2(model)
    return _gpt_to_llama(model)


_TO_HF["lmforge_gpt"] = _gpt_to_hf
_FROM_HF["llama"] = _gpt_from_llama
_FROM_HF["gpt2"] = _gpt_from_gpt2


# ---------------------------------------------------------------------------------- BERT
# (BertModel / BertForMaskedLM / BertForSequenceClassification <-> lmforge_bert classic)
# Parameter names inside one encoder layer: transformers' BertLayer -> lmforge TransformerBlock.
_BERT_LAYER_NAMES = {
    "attention.self.query.": "self_attn.q_proj.",
    "attention.self.key.": "self_attn.k_proj.",
    "attention.self.value.": "self_attn.v_proj.",
    "attention.output.dense.": "self_attn.o_proj.",
    "attention.output.LayerNorm.": "attn_norm.",
    "intermediate.dense.": "mlp.up_proj.",
    "output.dense.": "mlp.down_proj.",
    "output.LayerNorm.": "mlp_norm.",
}
# Everything else (prefix renames; the MLM decoder bias is BERT's `cls.predictions.bias`).
_BERT_NAMES = {
    "embeddings.LayerNorm.": "embeddings.norm.",
    "cls.predictions.transform.dense.": "lm_head.dense.",
    "cls.predictions.transform.LayerNorm.": "lm_head.norm.",
    "cls.predictions.decoder.weight": "lm_head.decoder.weight",
    "cls.predictions.bias": "lm_head.decoder.bias",
}
# hidden_act: transformers BertConfig -> lmforge (ungated activations only)
_BERT_ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu"}
# lmforge head class name -> transformers class name
_BERT_HEADS = {
    "LmforgeBertModel": "BertModel",
    "LmforgeBertForMaskedLM": "BertForMaskedLM",
    "LmforgeBertForSequenceClassification": "BertForSequenceClassification",
    "LmforgeBertForTokenClassification": "BertForTokenClassification",
}


def _bert_key_from_hf(key: str) -> str | None:
    """transformers BERT parameter name -> lmforge name (None: a duplicate of a tied parameter)."""
    if key.endswith("cls.predictions.decoder.bias"):
        return None  # the same Parameter as cls.predictions.bias
    match = re.match(r"(.*)encoder\.layer\.(\d+)\.(.*)", key)
    if match:
        prefix, i, rest = match.groups()
        for theirs, ours in _BERT_LAYER_NAMES.items():
            if rest.startswith(theirs):
                return f"{prefix}layers.{i}.{ours}{rest[len(theirs):]}"
        raise ValueError(f"from_hf: unexpected BERT parameter {key!r}")
    for theirs, ours in _BERT_NAMES.items():
        key = key.replace(theirs, ours)
    return key


def _bert_key_to_hf(key: str) -> list[str]:
    """lmforge parameter name -> transformers BERT name(s)."""
    match = re.match(r"(.*)layers\.(\d+)\.(.*)", key)
    if match:
        prefix, i, rest = match.groups()
        for theirs, ours in _BERT_LAYER_NAMES.items():
            if rest.startswith(ours):
                return [f"{prefix}encoder.layer.{i}.{theirs}{rest[len(ours):]}"]
    if key == "lm_head.decoder.bias":
        return ["cls.predictions.bias", "cls.predictions.decoder.bias"]
    for theirs, ours in _BERT_NAMES.items():
        key = key.replace(ours, theirs)
    return [key]


def _bert_load(target: nn.Module, state: dict, like: nn.Module) -> nn.Module:
    """Load ``state`` strictly into ``target``; same dtype and train/eval mode as the source ``like``."""
    target.load_state_dict(state, strict=True)
    target.to(next(like.parameters()).dtype)
    return target.train(like.training)


def _bert_require(cfg) -> None:
    """Raise ValueError naming the first switch that transformers' BERT cannot represent."""
    expected = {
        "position_embedding_type": "learned", "norm_type": "layernorm", "norm_position": "post",
        "norm_bias": True, "attention_bias": True, "mlp_bias": True, "embedding_norm": True,
        "num_key_value_heads": cfg.num_attention_heads, "head_dim": cfg.hidden_size // cfg.num_attention_heads,
    }
    if cfg.hidden_act not in _BERT_ACTS.values():
        raise ValueError(f"to_hf: BERT cannot represent hidden_act={cfg.hidden_act!r} (needs one of "
                         f"{sorted(_BERT_ACTS.values())}; gated MLPs have no BERT equivalent)")
    if cfg.type_vocab_size < 1:
        raise ValueError("to_hf: BERT cannot represent type_vocab_size=0 (it always has token types)")
    for name, valid in expected.items():
        if getattr(cfg, name) != valid:
            raise ValueError(f"to_hf: BERT cannot represent {name}={getattr(cfg, name)!r} (needs {valid!r}); "
                             "only the classic lmforge_bert preset converts")


def _bert_to_hf(model: nn.Module) -> nn.Module:
    """lmforge_bert (classic switches) -> BertModel / BertForMaskedLM / BertFor{Sequence,Token}Classification."""
    import transformers

    cfg = model.config
    _bert_require(cfg)
    name = type(model).__name__
    if name not in _BERT_HEADS:
        raise ValueError(f"to_hf: no transformers BERT class for {name}; known: {sorted(_BERT_HEADS)}")
    inverse_acts = {v: k for k, v in _BERT_ACTS.items()}
    hf_cfg = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        hidden_act=inverse_acts[cfg.hidden_act], hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout, max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=cfg.type_vocab_size, initializer_range=cfg.initializer_range, layer_norm_eps=cfg.norm_eps,
        pad_token_id=cfg.pad_token_id, classifier_dropout=cfg.classifier_dropout,
        tie_word_embeddings=cfg.tie_word_embeddings,
        **{k: getattr(cfg, k) for k in _LABEL_FIELDS},
    )
    hf_cfg._attn_implementation = cfg._attn_implementation
    hf_cls = getattr(transformers, _BERT_HEADS[name])
    hf = hf_cls(hf_cfg, add_pooling_layer=model.pooler is not None) if name == "LmforgeBertModel" else hf_cls(hf_cfg)
    state = {hf_key: value for key, value in model.state_dict().items() for hf_key in _bert_key_to_hf(key)}
    return _bert_load(hf, state, model)


def _bert_from_hf(hf_model: nn.Module) -> nn.Module:
    """transformers BertModel / BertForMaskedLM / BertFor{Sequence,Token}Classification -> lmforge_bert classic."""
    from . import modeling_bert

    cfg = hf_model.config
    name = type(hf_model).__name__
    heads = {v: k for k, v in _BERT_HEADS.items()}
    if name not in heads:
        raise ValueError(f"from_hf: no lmforge_bert class for {name}; known: {sorted(heads)}")
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"from_hf: BertConfig.position_embedding_type={cfg.position_embedding_type!r} "
                         "is not representable (lmforge_bert has 'absolute' as 'learned')")
    if cfg.is_decoder or cfg.add_cross_attention:
        raise ValueError("from_hf: BERT as a decoder (is_decoder / add_cross_attention) is not representable")
    if cfg.hidden_act not in _BERT_ACTS:
        raise ValueError(f"from_hf: BertConfig.hidden_act={cfg.hidden_act!r} is not one of {sorted(_BERT_ACTS)}")
    ours = modeling_bert.LmforgeBertConfig.from_preset(
        "classic", vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        hidden_act=_BERT_ACTS[cfg.hidden_act], hidden_dropout=float(cfg.hidden_dropout_prob),
        attention_dropout=float(cfg.attention_probs_dropout_prob), max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=cfg.type_vocab_size, initializer_range=cfg.initializer_range, norm_eps=cfg.layer_norm_eps,
        pad_token_id=cfg.pad_token_id, classifier_dropout=cfg.classifier_dropout,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
        **{k: getattr(cfg, k) for k in _LABEL_FIELDS},
    )
    ours._attn_implementation = cfg._attn_implementation
    cls = getattr(modeling_bert, heads[name])
    if name == "BertModel":
        model = cls(ours, add_pooling_layer=hf_model.pooler is not None)
    else:
        model = cls(ours)
    state = {}
    for key, value in hf_model.state_dict().items():
        new_key = _bert_key_from_hf(key)
        if new_key is not None:
            state[new_key] = value
    return _bert_load(model, state, hf_model)


_TO_HF["lmforge_bert"] = _bert_to_hf
_FROM_HF["bert"] = _bert_from_hf


# --------------------------------------------------------------------------------- Mamba
# (MambaForCausalLM <-> lmforge_mamba)

# Parameter names are identical on both sides (backbone.layers.i.mixer.{in_proj,conv1d,x_proj,
# dt_proj,A_log,D,out_proj}, norm, norm_f, embeddings, lm_head): only the configs differ.
_MAMBA_SHARED = (
    "vocab_size", "hidden_size", "num_hidden_layers", "state_size", "expand", "conv_kernel",
    "time_step_rank", "time_step_min", "time_step_max", "time_step_floor", "time_step_init_scheme",
    "time_step_scale", "use_bias", "use_conv_bias", "residual_in_fp32", "rescale_prenorm_residual",
    "initializer_range", "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id",
)


def _mamba_classes(model: nn.Module, hf: bool) -> tuple[type, type]:
    """(source-side check) -> matching (transformers class, lmforge class) for a causal LM or a backbone."""
    import transformers

    from . import modeling_mamba as lm

    causal = isinstance(model, (transformers.MambaForCausalLM, lm.MambaForCausalLM))
    backbone = isinstance(model, (transformers.MambaModel, lm.MambaModel))
    if not (causal or backbone):
        side = "transformers" if hf else "lmforge"
        raise ValueError(
            f"Mamba conversion handles MambaForCausalLM and MambaModel, not {type(model).__name__} ({side}); "
            "transformers has no Mamba sequence-classification class"
        )
    if causal:
        return transformers.MambaForCausalLM, lm.MambaForCausalLM
    return transformers.MambaModel, lm.MambaModel


def _mamba_load(target: nn.Module, source: nn.Module) -> nn.Module:
    target.load_state_dict(source.state_dict(), strict=True)
    target.to(next(source.parameters()).dtype)
    return target.train(source.training)


def _mamba_to_hf(model: nn.Module) -> nn.Module:
    from transformers import MambaConfig as HFMambaConfig

    hf_cls, _ = _mamba_classes(model, hf=False)
    cfg = model.config
    hf_cfg = HFMambaConfig(
        **{k: getattr(cfg, k) for k in _MAMBA_SHARED},
        layer_norm_epsilon=cfg.norm_eps, hidden_act="silu", use_mambapy=False,
    )
    return _mamba_load(hf_cls(hf_cfg), model)


def _mamba_from_hf(hf_model: nn.Module) -> nn.Module:
    from .configuration_mamba import MambaConfig

    _, lm_cls = _mamba_classes(hf_model, hf=True)
    hf_cfg = hf_model.config
    if hf_cfg.hidden_act != "silu":
        raise ValueError(
            f"from_hf: lmforge Mamba uses SiLU; cannot represent hidden_act={hf_cfg.hidden_act!r}"
        )
    if hf_cfg.intermediate_size != hf_cfg.expand * hf_cfg.hidden_size:
        raise ValueError(
            f"from_hf: intermediate_size={hf_cfg.intermediate_size} is not expand * hidden_size; "
            "lmforge Mamba derives it from expand"
        )
    cfg = MambaConfig(**{k: getattr(hf_cfg, k) for k in _MAMBA_SHARED}, norm_eps=hf_cfg.layer_norm_epsilon)
    return _mamba_load(lm_cls(cfg), hf_model)


_TO_HF["lmforge_mamba"] = _mamba_to_hf
_FROM_HF["mamba"] = _mamba_from_hf
