"""Training: one accelerate loop for every task, checkpoints, and the pretraining task.

    Trainer(model, BatchStream(...), LoopConfig(), OptimConfig(), run_dir).fit()

``lmforge.train.pretrain.pretrain`` builds model, tokenizer and data from a ``PretrainConfig``
and runs the loop; ``lmforge.train.finetune.finetune`` (from a ``FinetuneConfig``) reuses the
same ``Trainer`` with other data, collators and model wrapping.
"""

from lmforge.data.batches import BatchStream
from lmforge.train.config import (
    DataSection,
    FinetuneConfig,
    LoopConfig,
    ModelSection,
    OptimConfig,
    PretrainConfig,
)
from lmforge.train.loop import NonFiniteLossError, Trainer, TrainResult, make_accelerator

__all__ = [
    "BatchStream",
    "DataSection",
    "FinetuneConfig",
    "LoopConfig",
    "ModelSection",
    "NonFiniteLossError",
    "OptimConfig",
    "PretrainConfig",
    "TrainResult",
    "Trainer",
    "make_accelerator",
]
