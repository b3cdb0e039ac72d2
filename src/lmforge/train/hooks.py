"""What layers above training hook into: a run's checkpoints and its end.

Training knows no Hub and writes no model card: ``pretrain`` and ``finetune`` take ``RunHooks``
(``lmforge.publish.RunPublisher`` writes the card and pushes) and describe the run by a
``RunSummary``, plain data a card can be made from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# export(folder) saves the trainer's current model into ``folder`` (main process; None elsewhere)
# and returns its summary there. Collective: every process calls it (a sharded model is gathered).
Export = Callable[[Path | None], "RunSummary | None"]


@dataclass
class RunSummary:
    """The facts of a trained model (a run's final model or one of its checkpoints) a card tells.

    ``metrics`` maps a split (validation, test) to its figures.
    """

    kind: Literal["pretrain", "finetune"]
    model_config: Any
    config: dict[str, Any]  # the run's resolved configuration
    data: str
    steps: int
    tokens_seen: int
    elapsed_seconds: float
    status: str
    n_params: int
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    objective: str | None = None  # pretraining: causal or mlm
    task: str | None = None  # fine-tuning: classification or sft
    method: str | None = None  # fine-tuning: full or lora
    base_model: str | None = None  # fine-tuning: what it started from
    trainable: int | None = None
    labels: list[str] | None = None
    license: str | None = None
    plot: str | None = None  # a loss-curve image beside the model


class RunHooks:
    """Callbacks of a training run; these do nothing. Each is called on every process."""

    def on_checkpoint(self, trainer: Any, checkpoint: Path, export: Export) -> None:
        """After each saved checkpoint (``export`` saves its model as a loadable folder)."""

    def on_end(self, final_dir: Path | None, summary: RunSummary | None) -> None:
        """When the run ends, also after a failure: ``final_dir`` is the saved model (None when the
        run ended without one) and ``summary`` describes it (on the main process)."""
