"""Publishing: model cards and the Hugging Face Hub.

``push_folder(folder, "user/name")`` pushes a model, adapter or tokenizer as one commit;
``RunPublisher`` is the hook a training run is given to write its model card and push its
checkpoints and final model (``pretrain(config, hooks=run_publisher(config))``).
"""

from lmforge.publish.cards import write_card
from lmforge.publish.hub import RunPublisher, push_folder, run_publisher

__all__ = ["RunPublisher", "push_folder", "run_publisher", "write_card"]
