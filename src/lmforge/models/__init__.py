"""lmforge model families as real transformers models, registered with the Auto classes.

Importing this package registers every family with ``AutoConfig`` and the ``AutoModel*`` classes
in-process. Saved models carry their own code (``auto_map``), so they load with
``trust_remote_code=True`` where lmforge is not installed.

Each family module below calls its own ``register()``; add one import line per family.
"""

# Family registrations (one line each): GPT, BERT, Mamba.
from .modeling_gpt import GPTConfig, GPTForCausalLM, GPTForSequenceClassification, GPTModel, register as _register_gpt  # noqa: F401,E402,I001
_register_gpt()
from .modeling_bert import LmforgeBertConfig, LmforgeBertForMaskedLM, LmforgeBertForSequenceClassification, LmforgeBertForTokenClassification, LmforgeBertModel, register as _register_bert  # noqa: F401,E402,I001
_register_bert()
from .modeling_mamba import MambaConfig, MambaForCausalLM, MambaForSequenceClassification, MambaModel, register as _register_mamba  # noqa: F401,E402,I001
_register_mamba()
