"""Names from other versions that lmforge models still accept: cache arguments and class names.

Cache arguments: transformers 5.24 renamed the cache argument and output field
(``past_key_values``, Mamba's ``cache_params``) to ``cache``. lmforge models take ``cache`` and
accept the old names through transformers' own ``deprecate_kwarg``, with the FutureWarning (and
end version) of the stock models.

Class names: lmforge's classes were once named ``GPTConfig``, ``GPTForCausalLM``, ``MambaConfig``,
``MambaForCausalLM``... (BERT's were already ``LmforgeBert*``). A model saved then still loads
through the Auto classes, which find the class by ``model_type``; ``LEGACY_ARCHITECTURES`` maps an
old ``config.architectures`` entry to today's class name, ``LEGACY_CLASS_NAMES`` every old name an
``auto_map`` can hold.

This file is copied next to saved weights: it imports only transformers and the standard library.
"""

from __future__ import annotations

import transformers
from transformers.modeling_outputs import BaseModelOutputWithPast

LEGACY_CACHE_NAMES_UNTIL = "5.40.0"
if "cache" not in BaseModelOutputWithPast.__dataclass_fields__:
    raise ImportError(f"lmforge models need transformers>=5.24 (found {transformers.__version__}): "
                      "they take the cache as `cache`, the name transformers 5.24 introduced")

# Old model class name -> today's: what ``config.architectures`` of an old checkpoint holds.
LEGACY_ARCHITECTURES = {
    "GPTModel": "LmforgeGPTModel",
    "GPTForCausalLM": "LmforgeGPTForCausalLM",
    "GPTForSequenceClassification": "LmforgeGPTForSequenceClassification",
    "MambaModel": "LmforgeMambaModel",
    "MambaForCausalLM": "LmforgeMambaForCausalLM",
    "MambaForSequenceClassification": "LmforgeMambaForSequenceClassification",
}
# Every old class name a saved file can hold (an old ``auto_map`` also names the configs).
LEGACY_CLASS_NAMES = {**LEGACY_ARCHITECTURES, "GPTConfig": "LmforgeGPTConfig", "MambaConfig": "LmforgeMambaConfig"}


def current_class_name(name: str) -> str:
    """Today's name of an lmforge class named ``name`` (itself when it is not an old name)."""
    return LEGACY_CLASS_NAMES.get(name, name)

