"""The model to pretrain: from a model preset (``lmforge presets model``), a YAML file of config
keys or a saved model folder; and the checks that it fits the tokenizer and the data."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from torch import nn
from transformers import CONFIG_MAPPING

from lmforge.errors import LmforgeError, closest
from lmforge.presets import find_preset
from lmforge.runs import load_model

_AUTO_CLASS = {"causal": "AutoModelForCausalLM", "mlm": "AutoModelForMaskedLM"}


def resolve_preset(preset: str) -> Path:
    """A model preset name (``gpt-small``), a YAML path, or a saved model folder -> its path."""
    path = Path(preset).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    try:
        return find_preset("model", preset)
    except LmforgeError as e:
        raise LmforgeError(f"model.preset: {e}, nor a saved model folder (with config.json)") from None


def load_preset(preset: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The preset's config keys (with ``model_type``) with ``overrides`` applied."""
    path = resolve_preset(preset)
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict) or "model_type" not in values:
        raise LmforgeError(f"{path}: a model preset is a mapping of config keys including model_type "
                           "(lmforge_gpt, lmforge_bert, lmforge_mamba or lmforge_mamba2)")
    return {**values, **(overrides or {})}


def _special_ids(tokenizer: Any) -> dict[str, int]:
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}
    return {k: v for k, v in ids.items() if v is not None}


def build_model(objective: str, preset: str, tokenizer: Any, *, overrides: dict[str, Any] | None = None,
                block_size: int | None = None, seed: int = 0):
    """A freshly initialised (or loaded) model for ``objective`` ("causal" or "mlm").

    The vocabulary follows the tokenizer unless ``overrides`` sets ``vocab_size`` (then it must hold
    every token id). ``block_size`` is checked against the model's positions. Raises
    ``LmforgeError`` naming the field for every mismatch.
    """
    auto = getattr(transformers, _AUTO_CLASS[objective])
    path = resolve_preset(preset)
    n_tokens = len(tokenizer)
    if path.is_dir():
        if overrides:
            raise LmforgeError(f"model.overrides cannot change a saved model ({path}); use a preset")
        model = load_model(path, auto_class=_AUTO_CLASS[objective], what="model.preset").model
        source = f"model.preset {path}"
    else:
        values = load_preset(preset, overrides)
        check_config_keys(values, overrides or {}, path)
        explicit_vocab = "vocab_size" in (overrides or {})
        if not explicit_vocab:
            values["vocab_size"] = n_tokens
        values = {**values, **{k: v for k, v in _special_ids(tokenizer).items() if k not in (overrides or {})}}
        model_type = values.pop("model_type")
        try:
            config = transformers.AutoConfig.for_model(model_type, **values)
        except ValueError as e:
            raise LmforgeError(f"model preset {path}: {e}") from None
        torch.manual_seed(seed)
        try:
            model = auto.from_config(config)
        except ValueError as e:
            raise LmforgeError(f"model preset {path} ({model_type}) cannot be trained with objective "
                               f"{objective!r}: {str(e).splitlines()[0]}") from None
        source = "model.overrides.vocab_size" if explicit_vocab else f"model preset {path}"
    check_model_fits(model, tokenizer, block_size, source=source)
    return model


# read by every PreTrainedConfig from its keyword arguments, whatever the family
_GENERIC_CONFIG_KEYS = {"attn_implementation", "output_attentions", "bos_token_id", "eos_token_id",
                        "pad_token_id", "sep_token_id", "tokenizer_class"}


def config_keys(config_class: type) -> set[str]:
    """The settings a config class declares: its fields and ``__init__`` parameters, their aliases
    (``attribute_map``) and the generic ones every ``PreTrainedConfig`` reads."""
    keys = set(inspect.signature(config_class.__init__).parameters) - {"self", "args", "kwargs"}
    if dataclasses.is_dataclass(config_class):
        keys |= {f.name for f in dataclasses.fields(config_class)}
    return keys | set(getattr(config_class, "attribute_map", {})) | _GENERIC_CONFIG_KEYS


def check_config_keys(values: dict[str, Any], overrides: dict[str, Any], preset: Path) -> None:
    """Refuse a setting the model's config class does not declare (a typo would otherwise be kept
    as a stray attribute while the preset's value silently applies), naming the closest valid one."""
    model_type = values["model_type"]
    if model_type not in CONFIG_MAPPING:
        raise LmforgeError(f"{preset}: unknown model_type {model_type!r}; lmforge presets use lmforge_gpt, "
                           "lmforge_bert, lmforge_mamba or lmforge_mamba2")
    config_class = CONFIG_MAPPING[model_type]
    valid = config_keys(config_class)
    for key in values:
        if key == "model_type" or key in valid:
            continue
        where = f"model.overrides.{key}" if key in overrides else f"{preset}: '{key}'"
        close = closest(key, sorted(valid))
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"
        raise LmforgeError(f"{where}: {config_class.__name__} ({model_type}) has no setting '{key}'{hint}")


def check_model_fits(model: Any, tokenizer: Any, block_size: int | None, *, source: str) -> None:
    """Refuse a tokenizer larger than the embedding and a block longer than the positions."""
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise LmforgeError(f"{source}: the model's vocabulary has {vocab} entries but the tokenizer has "
                           f"{len(tokenizer)} tokens (ids up to {len(tokenizer) - 1}); use a tokenizer of at "
                           f"most {vocab} tokens or a model with vocab_size >= {len(tokenizer)}")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if block_size is not None and max_pos is not None and block_size > max_pos:
        raise LmforgeError(f"data.block_size {block_size} is longer than the model's positions "
                           f"(max_position_embeddings {max_pos} in {source}); lower data.block_size or "
                           f"set model.overrides.max_position_embeddings >= {block_size}")


def count_parameters(model: Any, *, exclude_embeddings: bool = False, trainable_only: bool = False) -> int:
    """Parameters (tied weights counted once), optionally without embedding tables or only those
    that train (``requires_grad``)."""
    skip = set()
    if exclude_embeddings:
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                skip.update(id(p) for p in m.parameters(recurse=False))
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or id(p) in skip or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def describe_model(config: Any) -> str:
    """A model in a few words, for start-up lines: ``3-layer, 128-wide lmforge_gpt (rope, rmsnorm
    pre-norm, swiglu, 4 heads / 4 key-value heads)``; a Mamba-2 hybrid counts its kinds of layer
    (``5 mamba2 + 1 attention + 1 mlp layers``), an MoE its experts (``8 experts, top-2``)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    if get("model_type") == "lmforge_mamba2":
        switches = _describe_mamba2(get)
    else:
        switches = [get("position_embedding_type")]
        if get("norm_type"):
            switches.append(f"{get('norm_type')} {get('norm_position', 'pre')}-norm")
        switches.append(get("hidden_act"))
        heads, kv = get("num_attention_heads"), get("num_key_value_heads")
        if heads:
            switches.append(f"{heads} heads" + (f" / {kv} key-value heads" if kv and kv != heads else ""))
        if get("state_size"):
            switches.append(f"state size {get('state_size')}")
    if get("num_experts"):
        shared = get("num_shared_experts") or 0
        switches.append(f"{get('num_experts')} experts, top-{get('num_experts_per_tok')}"
                        + (f" + {shared} shared" if shared else ""))
    shown = ", ".join(str(s) for s in switches if s)
    return (f"{get('num_hidden_layers')}-layer, {get('hidden_size')}-wide {get('model_type')}"
            + (f" ({shown})" if shown else ""))


_MAMBA2_LAYER_NAMES = {"linear_attention": "mamba2", "full_attention": "attention", "mlp": "mlp"}


def _describe_mamba2(get) -> list[str]:
    """Mamba-2's SSM shape, and for a hybrid the count of each kind of layer."""
    kinds = [_MAMBA2_LAYER_NAMES.get(t, t) for t in get("layer_types") or []]
    switches = []
    if any(kind != "mamba2" for kind in kinds):
        counts = {kind: kinds.count(kind) for kind in dict.fromkeys(kinds)}
        switches.append(" + ".join(f"{n} {kind}" for kind, n in counts.items()) + " layers")
    groups = get("n_groups")
    switches.append(f"{get('num_heads')} SSM heads of {get('head_dim')}, state size {get('state_size')}"
                    + (f", {groups} B/C groups" if groups and groups > 1 else ""))
    return switches
