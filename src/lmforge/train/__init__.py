"""Training: one accelerate loop for every task, checkpoints, and the pretraining task.

    Trainer(model, BatchStream(...), LoopConfig(), OptimConfig(), run_dir).fit()

``lmforge.train.pretrain.pretrain`` builds model, tokenizer and data from a ``PretrainConfig``
and runs the loop; the fine-tuning task reuses the same ``Trainer``.
"""

from lmforge.train.batches import BatchStream
from lmforge.train.config import DataSection, LoopConfig, ModelSection, OptimConfig, PretrainConfig
from lmforge.train.loop import NonFiniteLossError, Trainer, TrainResult, make_accelerator

__all__ = [
    "BatchStream",
    "DataSection",
    "LoopConfig",
    "ModelSection",
    "NonFiniteLossError",
    "OptimConfig",
    "PretrainConfig",
    "TrainResult",
    "Trainer",
    "make_accelerator",
]
