"""Exact weight conversion between lmforge models and stock transformers classes.

This is the correctness oracle: parity tests load the same weights into both and compare logits.

    to_hf(model)      -> the equivalent transformers model (Llama / GPT-2 / BERT / Mamba)
    from_hf(hf_model) -> the equivalent lmforge model

A configuration the target class cannot represent raises ``ValueError`` naming the switch.
Modeling files never import this module (it is not part of the exported model code).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

# model_type of the source model -> converter. Each family section registers its own.
_TO_HF: dict[str, Callable[[nn.Module], nn.Module]] = {}
_FROM_HF: dict[str, Callable[[nn.Module], nn.Module]] = {}


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
# (Llama <-> lmforge_gpt, GPT-2 <-> lmforge_gpt)


# ---------------------------------------------------------------------------------- BERT
# (BertModel / BertForMaskedLM / BertForSequenceClassification <-> lmforge_bert classic)


# --------------------------------------------------------------------------------- Mamba
# (MambaForCausalLM <-> lmforge_mamba)
