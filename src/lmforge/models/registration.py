"""How a family becomes known to transformers: the Auto classes in-process, and the ``auto_map``
that ``save_pretrained`` writes so the saved code loads with ``trust_remote_code=True``.

This file is copied next to saved weights: it imports only transformers and siblings.
"""

from __future__ import annotations

import transformers

from .compat import current_class_name


def merged_auto_map(config, ours: dict[str, str]) -> dict[str, str]:
    """``config.auto_map`` completed with the family's own entries (``ours``: every head, so any head
    loads from any checkpoint where lmforge is not installed); entries already there are kept, with
    old class names (``modeling_gpt.GPTForCausalLM``) brought up to date."""
    kept = {}
    for auto_class, reference in (getattr(config, "auto_map", None) or {}).items():
        if isinstance(reference, str) and "." in reference:  # (tokenizer entries are lists)
            module, _, name = reference.rpartition(".")
            reference = f"{module}.{current_class_name(name)}"
        kept[auto_class] = reference
    return {**ours, **kept}


def register_family(config_class: type, heads: dict[str, type]) -> None:
    """Register ``config_class`` with ``AutoConfig`` and each model class with its Auto class
    (``heads``: Auto class name -> model class), in-process and for ``save_pretrained``'s code export."""
    transformers.AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    config_class.register_for_auto_class()
    for auto_name, model_class in heads.items():
        getattr(transformers, auto_name).register(config_class, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_name)
