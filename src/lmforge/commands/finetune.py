"""``lmforge finetune``: classification or chat SFT of a pretrained model, full or LoRA."""

from __future__ import annotations

from accelerate import PartialState

from lmforge.publish import run_publisher
from lmforge.train.config import FinetuneConfig
from lmforge.train.finetune import finetune as run_finetuning


def finetune(config: FinetuneConfig) -> int:
    """Fine-tune a pretrained model: sequence classification or chat SFT, full or LoRA.

    Start from a packaged preset (``--config rotten-tomatoes-lora``; ``lmforge presets finetune``
    lists them) or a YAML file, and override any setting with a dotted flag (``--lora.r 16``).
    ``model.path`` is any folder lmforge wrote (a run, its final/, a quickstart folder), a saved
    model, the built-in all-minilm-l6-v2 or a Hub id (stock BERT, Llama, GPT-2, Mamba...). final/
    holds the selected model, or the LoRA adapter (``lmforge merge`` folds it into the base).
    Validation and test splits are used when the data has them. Runs on one process, or many
    under ``accelerate launch -m lmforge.cli finetune ...``; Ctrl-C saves a checkpoint, continue
    with ``--resume``. Example: ``lmforge finetune --config rotten-tomatoes-lora --output-dir runs/rt``

    Args:
        config: the run configuration (see the settings below).
    """
    result = run_finetuning(config, hooks=run_publisher(config))
    if PartialState().is_main_process:
        if result.final_dir is not None:
            lines = [f"done: {result.train.step} steps ({result.train.status})"]
            for split, values in result.metrics.items():
                shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float))
                lines.append(f"  {split}: {shown}")
            if "test" not in result.metrics:
                why = "data.test_split is null" if config.data.test_split is None else "the data has no test split"
                lines.append(f"  test: nothing tested ({why})")
            lines.append(f"model: {result.final_dir}")
            print("\n".join(lines))
        else:
            print(f"stopped at step {result.train.step} ({result.train.status}); continue with: "
                  f"lmforge finetune --config {result.run_dir / 'config.yaml'} --resume")
    return result.train.exit_code
