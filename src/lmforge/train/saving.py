"""Trained models as ``save_pretrained`` folders (pretraining and fine-tuning share these).

``save_model_folder`` writes a model (or, under peft, its adapter with the fine-tuned config) with
its tokenizer and generation settings; ``export_trained`` does it for the model a ``Trainer`` is
training, gathering it first when it is sharded; ``load_saved_weights`` reads a saved folder back
into a model in place (the best model of a fine-tuning run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from torch.distributed.fsdp import FSDPModule

from lmforge.errors import LmforgeError
from lmforge.train import distributed


def set_generation_ids(model: Any, tokenizer: Any) -> Any:
    """The tokenizer's bos/eos/pad ids into the model's generation config (None without one)."""
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, key, None)
            if value is not None:
                setattr(generation, key, value)
    return generation


def inner_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def save_model_folder(model: nn.Module, tokenizer: Any, folder: Path, *, generation: bool = True,
                      state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """``save_pretrained`` of ``model`` (an unwrapped model; under peft: the adapter, with the
    fine-tuned config beside it for its labels) and ``tokenizer`` into ``folder``; with
    ``generation``, the tokenizer's bos/eos/pad ids go into the generation config. Returns the
    transformers model (inside peft's wrapper)."""
    inner = inner_model(model)
    settings = set_generation_ids(inner, tokenizer) if generation else None
    model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if hasattr(model, "peft_config"):  # the adapter's labels (id2label, problem_type), generation settings
        inner.config.save_pretrained(folder)
        if settings is not None:
            settings.save_pretrained(folder)
    return inner


def export_trained(trainer: Any, tokenizer: Any, folder: Path | None, *, generation: bool = True) -> nn.Module | None:
    """``save_model_folder`` of the model ``trainer`` trains, gathered when it is sharded (call it
    on every process); writes on the main process only, which gets the saved model (others None)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    sharded = isinstance(model, FSDPModule)
    state_dict = distributed.full_state_dict(trainer.model) if sharded else None  # collective when sharded
    if not trainer.accelerator.is_main_process:
        return None
    if sharded:
        model = _unsharded(model, state_dict)
    return save_model_folder(model, tokenizer, folder, generation=generation, state_dict=state_dict)


def _unsharded(model: Any, state_dict: dict) -> Any:
    """A plain copy of an FSDP2-sharded model (whose class torch renamed ``FSDP<Name>``), so that
    ``save_pretrained`` writes the model's own class and code, not torch's FSDP modules."""
    base = next(c for c in type(model).__mro__[1:] if not issubclass(c, FSDPModule) and hasattr(c, "save_pretrained"))
    plain = base(model.config)
    missing, unexpected = plain.load_state_dict(state_dict, strict=False)
    missing = sorted(set(missing) - distributed.tied_keys(plain))  # tied copies were dropped from the full state
    if unexpected or missing:
        raise LmforgeError(f"final model: unexpected weights {unexpected}, missing {missing}")
    plain.generation_config = model.generation_config
    return plain


def load_saved_weights(model: nn.Module, folder: Path) -> None:
    """Load the weights ``save_model_folder`` wrote into ``folder`` back into ``model`` (in place)."""
    if hasattr(model, "peft_config"):
        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        return
    state: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith(("lm_head.weight", "decoder.weight"))}
    if unexpected or set(missing) - tied:
        raise LmforgeError(f"{folder}: the saved weights do not fit the model (missing "
                           f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
