"""Conversion of saved models: an lmforge model <-> the equivalent stock transformers checkpoint.

``--to-hf`` writes ``LlamaForCausalLM`` / ``LlamaForSequenceClassification`` (RoPE GPT),
``GPT2LMHeadModel`` (learned-position GPT), ``BertModel`` / ``BertFor*`` (classic BERT) or
``MambaForCausalLM`` / ``MambaModel``: a folder with no ``auto_map`` and no lmforge code, which loads
with ``trust_remote_code=False`` in any tool that reads those formats. ``--from-hf`` goes the other
way and saves the lmforge model with its own code (``auto_map``), which loads with
``trust_remote_code=True`` where lmforge is not installed.

The weights are mapped exactly by ``lmforge.models.convert``; this module finds the model, loads
it with the right class, keeps its dtype, generation settings (bos/eos/pad ids), labels and
tokenizer, and writes the result to a temporary sibling folder renamed into place when complete.
Every check on the inputs and the output folder runs before anything is written. The model card
(README.md) is not written or copied here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers

from lmforge import models as families
from lmforge.errors import LmforgeError
from lmforge.models import convert as weights
from lmforge.runs import (
    check_output_dir,
    find_model,
    first_line,
    has_tokenizer,
    load_tokenizer,
    read_json,
    write_model_folder,
)

# What converts, for the messages: model_type -> the classes on the other side.
TO_HF = {
    "lmforge_gpt": "LmforgeGPTForCausalLM -> LlamaForCausalLM (RoPE) or GPT2LMHeadModel (learned positions), "
                   "LmforgeGPTModel -> LlamaModel, LmforgeGPTForSequenceClassification -> LlamaForSequenceClassification; "
                   "with experts (num_experts > 0, no shared expert): the Mixtral classes",
    "lmforge_bert": "the classic preset: LmforgeBertModel / ForMaskedLM / ForSequenceClassification / "
                    "ForTokenClassification -> BertModel / BertFor*",
    "lmforge_mamba": "LmforgeMambaForCausalLM / LmforgeMambaModel -> MambaForCausalLM / MambaModel",
    "lmforge_mamba2": "LmforgeMamba2ForCausalLM / LmforgeMamba2Model -> Mamba2ForCausalLM / Mamba2Model "
                      "(Mamba-2 layers only: a hybrid has no stock class)",
}
FROM_HF = {
    "llama": ("LlamaForCausalLM", "LlamaModel", "LlamaForSequenceClassification"),
    "gpt2": ("GPT2LMHeadModel",),
    "bert": ("BertModel", "BertForMaskedLM", "BertForSequenceClassification", "BertForTokenClassification"),
    "mamba": ("MambaForCausalLM", "MambaModel"),
    "mamba2": ("Mamba2ForCausalLM", "Mamba2Model"),
    "mixtral": ("MixtralForCausalLM", "MixtralModel", "MixtralForSequenceClassification"),
}


@dataclass
class Conversion:
    """What ``convert`` did, for the command's report."""

    source: Path  # the model folder read (a run folder's final/)
    output: Path
    to_hf: bool
    source_type: str  # the source's model_type and class, the target's class
    source_class: str
    target_class: str
    tokenizer: bool  # whether a tokenizer was written


# ----------------------------------------------------------------------------------- inputs


def find_model_dir(source: Path) -> Path:
    """The saved model folder ``source`` names (any folder lmforge wrote, see
    ``lmforge.runs.find_model``), refusing LoRA adapters."""
    try:
        found = find_model(source, what="MODEL")
    except LmforgeError as e:
        raise LmforgeError(f"{e}; lmforge convert takes a saved model: {_supported()}") from None
    if found.is_adapter:
        raise LmforgeError(f"{found.path} holds a LoRA adapter, not a full model; merge it first: "
                           f"lmforge merge {source} --output-dir MERGED, then convert MERGED")
    return found.path


def _supported() -> str:
    lmforge = ", ".join(TO_HF)
    stock = "; ".join(f"{t} ({', '.join(classes)})" for t, classes in FROM_HF.items())
    return f"--to-hf converts model_type {lmforge}; --from-hf converts {stock}"


def read_config(folder: Path) -> tuple[str, str]:
    """(model_type, architecture) from ``folder/config.json``."""
    values = read_json(folder / "config.json")
    architectures = values.get("architectures") or []
    return str(values.get("model_type") or ""), str(architectures[0]) if architectures else ""


def check_direction(folder: Path, model_type: str, architecture: str, *, to_hf: bool) -> None:
    """Refuse a model_type the requested direction does not convert, saying which one would."""
    if model_type in (TO_HF if to_hf else FROM_HF):
        if not architecture:
            raise LmforgeError(f"{folder / 'config.json'}: no 'architectures' entry naming the model class")
        if not to_hf and architecture not in FROM_HF[model_type]:
            raise LmforgeError(f"{folder}: {architecture} has no lmforge equivalent; --from-hf converts "
                               f"{', '.join(FROM_HF[model_type])} for model_type {model_type}")
        return
    if to_hf and model_type in FROM_HF:
        raise LmforgeError(f"{folder} is already a stock transformers model (model_type {model_type}); "
                           "--from-hf converts it to lmforge")
    if not to_hf and model_type in TO_HF:
        raise LmforgeError(f"{folder} is an lmforge model (model_type {model_type}); "
                           "--to-hf converts it to a stock transformers class")
    what = f"model_type {model_type!r}" if model_type else "a config.json without model_type"
    raise LmforgeError(f"{folder}: {what} cannot be converted; {_supported()}")


# ----------------------------------------------------------------------------------- convert


def _load(cls: Any, folder: Path) -> Any:
    """``cls.from_pretrained(folder)`` in the dtype it was saved in, errors as ``LmforgeError``."""
    try:
        return cls.from_pretrained(folder, dtype="auto").eval()
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise LmforgeError(f"{folder}: {cls.__name__} cannot load it: {first_line(e)}") from None


def source_model(folder: Path, model_type: str, architecture: str, *, to_hf: bool) -> Any:
    """The model in ``folder``, loaded with lmforge's own class (to_hf) or transformers' (from_hf)."""
    if to_hf:
        architecture = families.LEGACY_ARCHITECTURES.get(architecture, architecture)  # saved before the renames
    cls = getattr(families if to_hf else transformers, architecture, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        side = "an lmforge" if to_hf else "a transformers"
        raise LmforgeError(f"{folder / 'config.json'}: architectures names {architecture!r}, not {side} model "
                           f"class of model_type {model_type}")
    return _load(cls, folder)


def converted_model(model: Any, folder: Path, *, to_hf: bool) -> Any:
    """The converted model, with the source's generation settings; a config the target cannot
    represent is an ``LmforgeError`` naming the switch and its value."""
    try:
        target = weights.to_hf(model) if to_hf else weights.from_hf(model)
    except ValueError as e:
        raise LmforgeError(f"{folder}: {e}") from None
    generation = getattr(model, "generation_config", None)
    if generation is not None and target.can_generate():
        target.generation_config = copy.deepcopy(generation)  # bos/eos/pad ids saved with the source
    return target.eval()


def source_tokenizer(folder: Path) -> Any:
    """The tokenizer saved with the model, or None when the folder has none."""
    if not has_tokenizer(folder):
        return None
    return load_tokenizer(folder, what=f"the tokenizer of {folder}")


def convert(source: str | Path, output: str | Path, *, to_hf: bool, overwrite: bool = False,
            flag: str = "--output-dir") -> Conversion:
    """``convert_folder`` that also reports what it converted (for the command's message);
    ``flag`` names the output in messages."""
    source, output = Path(source), Path(output)
    folder = find_model_dir(source)
    model_type, architecture = read_config(folder)
    check_direction(folder, model_type, architecture, to_hf=to_hf)
    check_output_dir(output, overwrite=overwrite, inputs=(source, folder), what="converted model", flag=flag)
    tokenizer = source_tokenizer(folder)
    model = source_model(folder, model_type, architecture, to_hf=to_hf)
    target = converted_model(model, folder, to_hf=to_hf)
    write_model_folder(output, target, tokenizer, overwrite=overwrite, doing="converting")
    return Conversion(folder, output, to_hf, model_type, type(model).__name__, type(target).__name__,
                      tokenizer is not None)


def convert_folder(source: str | Path, output: str | Path, *, to_hf: bool, overwrite: bool = False) -> Path:
    """Convert a saved model to (``to_hf=True``) or from (``to_hf=False``) a stock transformers class.

    to_hf: ``source`` is an lmforge run folder (its ``final/``) or saved lmforge model; ``output``
    gets a stock checkpoint (config.json without ``auto_map``, model.safetensors, generation
    config, tokenizer) that loads with ``trust_remote_code=False``. from_hf: ``source`` is a stock
    Llama / GPT-2 / BERT / Mamba folder; ``output`` gets the lmforge model with its code.
    Raises ``LmforgeError`` before writing anything for a config the target cannot represent
    (naming the switch and its value), an adapter or tokenizer-only folder, an unknown model type,
    or a non-empty ``output`` without ``overwrite``. Returns ``output``.
    """
    return convert(source, output, to_hf=to_hf, overwrite=overwrite).output
