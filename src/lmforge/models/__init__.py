"""lmforge model families as real transformers models, registered with the Auto classes.

Importing this package registers every family with ``AutoConfig`` and the ``AutoModel*`` classes
in-process. Saved models carry their own code (``auto_map``), so they load with
``trust_remote_code=True`` where lmforge is not installed.

Class names follow one rule, ``Lmforge`` + family + transformers' role suffix
(``LmforgeGPTForCausalLM``), so none shadows a transformers class. Models saved under the earlier
names (``GPTForCausalLM``, ``MambaConfig``...) load through the Auto classes (they go by
``model_type``); ``LEGACY_ARCHITECTURES`` maps an old ``architectures`` entry to today's class name.

The folder is flat, one file per concept: ``switches`` (allowed values), ``norms``, ``positions``,
``attention``, ``feed_forward``, ``block``, ``losses``, ``pooling``, ``dropout``,
``initialization``, ``mamba_scan``; per family ``configuration_<family>`` and
``modeling_<family>``; ``compat`` and ``registration`` for names and Auto classes; ``convert``
(to and from stock transformers classes, never imported by the model files).

Each family module below calls its own ``register()``; add one import line per family.
"""

# Family registrations (one line each): GPT, BERT, Mamba, Mamba-2.
from .modeling_gpt import LmforgeGPTConfig, LmforgeGPTForCausalLM, LmforgeGPTForSequenceClassification, LmforgeGPTModel, register as _register_gpt  # noqa: F401,E402,I001
_register_gpt()
from .modeling_bert import LmforgeBertConfig, LmforgeBertForMaskedLM, LmforgeBertForSequenceClassification, LmforgeBertForTokenClassification, LmforgeBertModel, register as _register_bert  # noqa: F401,E402,I001
_register_bert()
from .modeling_mamba import LmforgeMambaConfig, LmforgeMambaForCausalLM, LmforgeMambaForSequenceClassification, LmforgeMambaModel, register as _register_mamba  # noqa: F401,E402,I001
_register_mamba()
from .modeling_mamba2 import LmforgeMamba2Config, LmforgeMamba2ForCausalLM, LmforgeMamba2ForSequenceClassification, LmforgeMamba2Model, register as _register_mamba2  # noqa: F401,E402,I001
_register_mamba2()
from .compat import LEGACY_ARCHITECTURES  # noqa: F401,E402,I001  (old class name -> today's, for old checkpoints)
