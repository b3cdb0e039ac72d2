"""``lmforge pretrain``: tokenizer + preset model + packed corpus -> the training loop -> a
``save_pretrained`` folder with a model card.

Run directory layout::

    run_dir/config.yaml        the resolved configuration (every key, after flags)
    run_dir/metrics.jsonl      one JSON object per log/eval line
    run_dir/checkpoints/step_N accelerate state + trainer_state.json (the last K)
    run_dir/loss.png           the loss curve
    run_dir/final/             model, tokenizer, generation config, README.md (model card)
"""

from __future__ import annotations

import inspect
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmforge.config import to_dict
from lmforge.errors import LmforgeError
from lmforge.hub import RunPublisher
from lmforge.train.batches import BatchStream, eval_batches
from lmforge.train.checkpoint import resolve_resume
from lmforge.train.config import PretrainConfig
from lmforge.train.factory import build_model, count_parameters
from lmforge.train.loop import Trainer, TrainResult, make_accelerator
from lmforge.train.tracking import flops_per_token, read_metrics

CONFIG_FILE = "config.yaml"
_RUN_FILES = (CONFIG_FILE, "metrics.jsonl", "checkpoints", "final", "loss.png")


@dataclass
class PretrainResult:
    """Where things are after ``pretrain``."""

    run_dir: Path
    final_dir: Path | None
    train: TrainResult
    strategy: str


# ----------------------------------------------------------------------------------- run dir
# Nothing is written or removed before every check has passed: ``check_run_dir`` only reads,
# ``start_run_dir`` is the first write, called when training is about to start.


def check_run_dir(run_dir: Path, *, resuming: bool, overwrite: bool, files: tuple[str, ...] = _RUN_FILES) -> None:
    """Refuse to mix two runs in one folder unless resuming or told to overwrite (reads only).
    ``files``: the names a run of this task writes."""
    existing = [name for name in files if (run_dir / name).exists()]
    if existing and not resuming and not overwrite:
        raise LmforgeError(
            f"output_dir {run_dir} already holds a run ({', '.join(existing)}); set resume: auto to continue "
            "it (--resume auto), overwrite: true to replace it (--overwrite), or choose another output_dir")


def start_run_dir(run_dir: Path, config: Any, *, restart: bool, is_main: bool,
                  files: tuple[str, ...] = _RUN_FILES) -> None:
    """Create (or, with ``overwrite``, clear ``files`` of) the run folder and write the resolved
    config (a ``PretrainConfig`` or ``FinetuneConfig``).

    ``restart``: ``resume: auto`` found no checkpoint, so earlier metrics belong to nothing.
    """
    if not is_main:
        return
    if config.overwrite and config.resume is None:
        for name in files:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    if restart:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def load_tokenizer(path: str) -> Any:
    """``data.tokenizer``: any saved tokenizer folder, a run's ``final/`` too, with errors naming the key."""
    from lmforge.tokenizers.metrics import load_tokenizer as load_folder

    if not path:
        raise LmforgeError("data.tokenizer is required: a folder written by 'lmforge tokenizer train "
                           "... --output DIR' (or any saved transformers tokenizer)")
    if not Path(path).is_dir():
        raise LmforgeError(f"data.tokenizer: {path} is not a directory with a saved tokenizer (train one "
                           f"with 'lmforge tokenizer train ... --output {path}')")
    try:
        return load_folder(path)
    except LmforgeError as e:
        raise LmforgeError(f"data.tokenizer: {e}") from None


def model_inputs_filter(model: Any, collate: Any) -> Any:
    """Drop batch columns the model's forward does not name (seq_idx for GPT, position_ids for
    Mamba, token_type_ids for GPT). Under a peft wrapper, the wrapped model's forward decides."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(inspect.signature(base.forward).parameters) | {"labels"}

    def collate_for_model(rows: list[dict]) -> dict:
        return {k: v for k, v in collate(rows).items() if k in names}

    if hasattr(collate, "set_epoch"):
        collate_for_model.set_epoch = collate.set_epoch  # dynamic masking per epoch
    return collate_for_model


def _collator(objective: str, tokenizer: Any, config: PretrainConfig) -> Any:
    from lmforge.data.collators import CausalLMCollator, MLMCollator

    if objective == "mlm":
        return MLMCollator(tokenizer, mlm_probability=config.data.mlm_probability,
                           whole_word=config.data.whole_word_masking, seed=config.train.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return CausalLMCollator(pad if pad is not None else 0)


def _data(config: PretrainConfig, tokenizer: Any, model: Any, accelerator: Any) -> tuple[BatchStream, Any]:
    """This process's training batches and the evaluation function (None without an eval split).

    Every process packs the whole corpus the same way and takes its slice of each global batch
    (``lmforge.train.batches``), so the data does not depend on the number of processes.
    """
    from lmforge.data.pipeline import build_lm_dataset
    from lmforge.eval.perplexity import evaluate_lm, token_byte_lengths

    data, train = config.data, config.train
    common = dict(streaming=data.streaming, document_masks=data.document_masks, text_column=data.text_column)
    train_ds = build_lm_dataset(data.source, tokenizer, data.block_size, split=data.train_split, **common)
    ranks = dict(process_index=accelerator.process_index, num_processes=accelerator.num_processes)
    collate = model_inputs_filter(model, _collator(config.objective, tokenizer, config))
    train_data = BatchStream(train_ds, train.micro_batch_size, collate, seed=train.seed,
                             grad_accum_steps=train.grad_accum_steps, **ranks)
    if not data.streaming and len(train_data) == 0:
        raise LmforgeError(
            f"data.source {data.source} ({data.train_split}) packs into {len(train_ds)} rows of "
            f"{data.block_size} tokens, fewer than one optimizer step of {train_data.rows_per_step} rows "
            f"(train.micro_batch_size {train.micro_batch_size} x train.grad_accum_steps "
            f"{train.grad_accum_steps} x {accelerator.num_processes} process(es)); lower them or "
            "data.block_size, or use more data")
    if not data.eval_split:
        return train_data, None
    eval_ds = build_lm_dataset(data.source, tokenizer, data.block_size, split=data.eval_split, **common)
    byte_lengths, scale = None, 1.0
    if config.objective == "causal":
        byte_lengths = token_byte_lengths(tokenizer, model.config.vocab_size)
        if not data.streaming:  # per byte of the text itself, whatever the tokenizer drops
            scale = _text_bytes_scale(data, eval_ds, byte_lengths)

    def evaluate(prepared_model: Any, final: bool) -> dict[str, float]:
        limit = None if final else train.eval_batches  # the last evaluation sees everything
        batches = eval_batches(eval_ds, train.micro_batch_size, collate, limit, **ranks)
        return evaluate_lm(prepared_model, batches, byte_lengths=byte_lengths, accelerator=accelerator,
                           bytes_scale=scale)

    return train_data, evaluate


def _text_bytes_scale(data: Any, rows: Any, byte_lengths: Any) -> float:
    """``text_bytes_scale`` of the eval split (``data``: the DataSection) and its packed rows."""
    from lmforge.data.sources import load_corpus
    from lmforge.eval.perplexity import packed_token_ids, text_bytes_scale

    texts = load_corpus(data.source, data.eval_split, text_column=data.text_column)["text"]
    return text_bytes_scale(texts, packed_token_ids(rows), byte_lengths)


def _flops_per_token(model: Any, block_size: int) -> float:
    matmul_params = count_parameters(model, exclude_embeddings=True)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and head.weight is model.get_input_embeddings().weight:
        matmul_params += head.weight.numel()  # a tied head is still a matmul per token
    return flops_per_token(matmul_params, getattr(model.config, "num_hidden_layers", 0),
                           getattr(model.config, "hidden_size", 0), block_size)


# ----------------------------------------------------------------------------------- the task


def pretrain(config: PretrainConfig) -> PretrainResult:
    """Pretrain a model as described by ``config`` (see ``PretrainConfig``); usable from Python.

    Every check (launch, run folder, tokenizer, model, data, checkpoint) runs before the run
    folder is created or changed.
    """
    from lmforge.train import distributed

    run_dir = Path(config.output_dir)
    accelerator = make_accelerator(run_dir, config.train.mixed_precision)
    distributed.check_launch(accelerator)  # first: a broken launch must not race on the run folder
    checkpoint = resolve_resume(config.resume, run_dir)
    check_run_dir(run_dir, resuming=config.resume is not None, overwrite=config.overwrite)
    RunPublisher.check(config)

    tokenizer = load_tokenizer(config.data.tokenizer)
    model = build_model(config.objective, config.model.preset, tokenizer, overrides=config.model.overrides,
                        block_size=config.data.block_size, seed=config.train.seed)
    model = distributed.shard_model(accelerator, model, config.distributed)
    train_data, evaluate = _data(config, tokenizer, model, accelerator)

    n_params = count_parameters(model)
    publisher = None
    if config.push_to_hub:
        publisher = RunPublisher(config, is_main=accelerator.is_main_process,
                                 export=_checkpoint_export(tokenizer, config, n_params))
    trainer = Trainer(model, train_data, config.train, config.optim, run_dir, accelerator=accelerator,
                      evaluate=evaluate, flops_per_token=_flops_per_token(model, config.data.block_size),
                      on_checkpoint=publisher.on_checkpoint if publisher else None)
    if checkpoint is not None:
        trainer.resume(checkpoint)
    accelerator.wait_for_everyone()  # every process passed every check
    start_run_dir(run_dir, config, restart=config.resume is not None and checkpoint is None,
                  is_main=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    strategy = distributed.strategy_name(accelerator, trainer.model)  # what really runs, after prepare
    if accelerator.is_main_process:
        print(f"lmforge pretrain: {type(model).__name__} {n_params / 1e6:.2f}M params, strategy {strategy}, "
              f"{accelerator.num_processes} process(es), run dir {run_dir}"
              + (f", resuming from {checkpoint}" if checkpoint else ""), flush=True)
    final_dir = None
    try:
        result = trainer.fit()
        if result.status != "interrupted":
            final_dir = save_final(trainer, tokenizer, config, result, n_params)
        accelerator.wait_for_everyone()
    finally:  # the checkpoints already queued are pushed even when training failed
        if publisher is not None:
            publisher.finish(final_dir)
    return PretrainResult(run_dir=run_dir, final_dir=final_dir, train=result, strategy=strategy)


def set_generation_ids(model: Any, tokenizer: Any) -> Any:
    """The tokenizer's bos/eos/pad ids into the model's generation config (None without one)."""
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, key, None)
            if value is not None:
                setattr(generation, key, value)
    return generation


def export_model(trainer: Trainer, tokenizer: Any, folder: Path | None) -> Any:
    """``save_pretrained`` of the trained model (gathered when sharded: call on every process),
    tokenizer and generation config into ``folder`` on the main process; returns the saved model."""
    from lmforge.train.distributed import full_state_dict

    state_dict = full_state_dict(trainer.model)  # collective when sharded: every process calls it
    if not trainer.accelerator.is_main_process:
        return None
    model = _unsharded(trainer.accelerator.unwrap_model(trainer.model), state_dict)
    set_generation_ids(model, tokenizer)
    model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return model


def _facts(model: Any, config: PretrainConfig, *, step: int, tokens_seen: int, elapsed: float,
           metrics: dict[str, float], n_params: int, status: str, plot: str | None = None) -> Any:
    from lmforge.eval.report import pretrain_facts

    return pretrain_facts(model_config=model.config, objective=config.objective, config=to_dict(config),
                          data=config.data.source, steps=step, tokens_seen=tokens_seen, elapsed_seconds=elapsed,
                          metrics=metrics, eval_split=config.data.eval_split, n_params=n_params, status=status,
                          plot=plot, license=config.license)


def save_final(trainer: Trainer, tokenizer: Any, config: PretrainConfig, result: TrainResult,
               n_params: int) -> Path | None:
    """``save_pretrained`` model + tokenizer + generation config, loss plot and model card."""
    from lmforge.eval.report import plot_loss_curve, write_card

    run_dir = Path(config.output_dir)
    final = run_dir / "final"
    model = export_model(trainer, tokenizer, final)
    if model is None:
        return final
    plot = plot_loss_curve(read_metrics(run_dir), run_dir / "loss.png",
                           title=f"{model.config.model_type} on {config.data.source}")
    if plot is not None:
        shutil.copy(plot, final / "loss.png")
    write_card(final, _facts(model, config, step=result.step, tokens_seen=result.tokens_seen,
                             elapsed=result.elapsed_seconds, metrics=result.last_eval, n_params=n_params,
                             status=result.status, plot="loss.png" if plot else None))
    return final


def _checkpoint_export(tokenizer: Any, config: PretrainConfig, n_params: int) -> Any:
    """``export(trainer, folder)`` for ``RunPublisher``: a checkpoint as a loadable model with its card."""
    from lmforge.eval.report import write_card

    def export(trainer: Trainer, folder: Path | None) -> None:
        saved = export_model(trainer, tokenizer, folder)
        if saved is not None:
            state = trainer.state
            write_card(folder, _facts(saved, config, step=state.step, tokens_seen=state.tokens_seen,
                                      elapsed=state.elapsed_seconds, metrics=trainer.last_eval,
                                      n_params=n_params, status=f"checkpoint of a {state.total_steps}-step run"))
    return export


def _unsharded(model: Any, state_dict: dict) -> Any:
    """A plain copy of an FSDP2-sharded model (whose class torch renamed ``FSDP<Name>``), so that
    ``save_pretrained`` writes the model's own class and code, not torch's FSDP modules."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return model
    base = next(c for c in type(model).__mro__[1:]
                if not issubclass(c, FSDPModule) and hasattr(c, "save_pretrained"))
    from lmforge.train.distributed import tied_keys

    plain = base(model.config)
    missing, unexpected = plain.load_state_dict(state_dict, strict=False)
    missing = sorted(set(missing) - tied_keys(plain))  # tied copies were dropped from the full state dict
    if unexpected or missing:
        raise LmforgeError(f"final model: unexpected weights {unexpected}, missing {missing}")
    plain.generation_config = model.generation_config
    return plain


def pretrain_command(config: PretrainConfig) -> int:
    """Pretrain a language model (causal LM for GPT/Mamba, masked LM for BERT).

    Reads a YAML config (``--config configs/pretrain/<preset>.yaml``) and dotted flags that
    override it (``--train.max-steps 200``). Runs on one process, or many under
    ``accelerate launch -m lmforge.cli pretrain ...``. Ctrl-C saves a checkpoint; continue with
    ``--resume auto``.

    Args:
        config: the run configuration (see the settings below).
    """
    from accelerate import PartialState

    result = pretrain(config)
    if result.final_dir is not None and PartialState().is_main_process:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.train.last_eval.items() if isinstance(v, float))
        print(f"done: {result.train.step} steps ({result.train.status}), {metrics}\n"
              f"model: {result.final_dir}  (AutoModel*.from_pretrained(path, trust_remote_code=True))")
    return result.train.exit_code
