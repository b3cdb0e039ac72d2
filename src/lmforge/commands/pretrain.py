"""``lmforge pretrain``: pretrain a causal (GPT, Mamba) or masked (BERT) language model."""

from __future__ import annotations

from accelerate import PartialState

from lmforge.publish import run_publisher
from lmforge.train.config import PretrainConfig
from lmforge.train.pretrain import pretrain as run_pretraining


def pretrain(config: PretrainConfig) -> int:
    """Pretrain a language model (causal LM for GPT/Mamba, masked LM for BERT).

    Start from a packaged preset (``--config gpt-debug``; ``lmforge presets pretrain`` lists them)
    or a YAML file, and override any setting with a dotted flag (``--train.max-steps 200``). The
    run folder gets the resolved config, metrics, checkpoints and final/ (model, tokenizer, model
    card). Runs on one process, or many under ``accelerate launch -m lmforge.cli pretrain ...``.
    Ctrl-C saves a checkpoint; continue with ``--resume``. Example:
    ``lmforge pretrain --config gpt-debug --data.tokenizer tok --output-dir runs/gpt``

    Args:
        config: the run configuration (see the settings below).
    """
    result = run_pretraining(config, hooks=run_publisher(config))
    if result.final_dir is not None and PartialState().is_main_process:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.train.last_eval.items() if isinstance(v, float))
        print(f"done: {result.train.step} steps ({result.train.status}), {metrics}\n"
              f"model: {result.final_dir}  (AutoModel*.from_pretrained(path, trust_remote_code=True))")
    elif result.final_dir is None and PartialState().is_main_process:
        print(f"stopped at step {result.train.step} ({result.train.status}); continue with: "
              f"lmforge pretrain --config {result.run_dir / 'config.yaml'} --resume")
    return result.train.exit_code
