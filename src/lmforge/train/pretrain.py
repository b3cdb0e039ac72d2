"""Pretraining: tokenizer + model preset + packed corpus -> the training loop -> a
``save_pretrained`` folder (``final/``), in a run folder laid out as ``lmforge.runs`` describes.

    result = pretrain(config)                          # config: a PretrainConfig
    result = pretrain(config, hooks=RunPublisher(config, ...))   # + model card and Hub pushes
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lmforge import runs
from lmforge.config import to_dict
from lmforge.data.batches import BatchStream, eval_batches
from lmforge.data.collators import CausalLMCollator, MLMCollator
from lmforge.data.pipeline import build_lm_dataset
from lmforge.data.sources import load_corpus, resolve_split
from lmforge.errors import LmforgeError
from lmforge.eval.lm import model_inputs_filter
from lmforge.eval.perplexity import (
    evaluate_lm,
    packed_token_ids,
    text_bytes_scale,
    token_byte_lengths,
)
from lmforge.train import distributed
from lmforge.train.config import PretrainConfig
from lmforge.train.hooks import RunHooks, RunSummary
from lmforge.train.loop import Trainer, TrainResult, make_accelerator
from lmforge.train.model_presets import build_model, count_parameters, describe_model
from lmforge.train.saving import export_trained
from lmforge.train.tracking import flops_per_token, plot_loss_curve


@dataclass
class PretrainResult:
    """Where things are after ``pretrain``."""

    run_dir: Path
    final_dir: Path | None
    train: TrainResult
    strategy: str


def _collator(objective: str, tokenizer: Any, config: PretrainConfig) -> Any:
    if objective == "mlm":
        return MLMCollator(tokenizer, mlm_probability=config.data.mlm_probability,
                           whole_word=config.data.whole_word_masking, seed=config.train.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return CausalLMCollator(pad if pad is not None else 0)


def _data(config: PretrainConfig, tokenizer: Any, model: Any, accelerator: Any) -> tuple[BatchStream, Any]:
    """This process's training batches and the evaluation function (None without an eval split).

    Every process packs the whole corpus the same way and takes its slice of each global batch
    (``lmforge.data.batches``), so the data does not depend on the number of processes.
    """
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
    texts = load_corpus(data.source, data.eval_split, text_column=data.text_column)["text"]
    return text_bytes_scale(texts, packed_token_ids(rows), byte_lengths)


def _flops_per_token(model: Any, block_size: int) -> float:
    matmul_params = count_parameters(model, exclude_embeddings=True) - _idle_expert_parameters(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and head.weight is model.get_input_embeddings().weight:
        matmul_params += head.weight.numel()  # a tied head is still a matmul per token
    return flops_per_token(matmul_params, getattr(model.config, "num_hidden_layers", 0),
                           getattr(model.config, "hidden_size", 0), block_size)


def _idle_expert_parameters(model: Any) -> float:
    """The routed experts' parameters a token does not use: each token runs k of the E experts."""
    experts = getattr(model.config, "num_experts", 0) or 0
    if not experts:
        return 0.0
    routed = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    return routed * (experts - model.config.num_experts_per_tok) / experts


# ----------------------------------------------------------------------------------- the task


def with_resolved_splits(config: PretrainConfig) -> PretrainConfig:
    """``config`` with its data splits named (``auto`` resolved; a named split checked)."""
    data = config.data
    train = resolve_split(data.source, data.train_split, default="train", what="data.train_split")
    held_out = resolve_split(data.source, data.eval_split, default="validation", what="data.eval_split")
    return replace(config, data=replace(data, train_split=train, eval_split=held_out))


def pretrain(config: PretrainConfig, *, hooks: RunHooks | None = None) -> PretrainResult:
    """Pretrain a model as described by ``config`` (see ``PretrainConfig``).

    Every check (launch, run folder, tokenizer, model, data, checkpoint) runs before the run
    folder is created or changed. ``hooks`` (e.g. ``lmforge.publish.RunPublisher``) see every
    checkpoint and the end of the run: the model card and Hub pushes live there.
    """
    hooks = hooks or RunHooks()
    config = with_resolved_splits(config)
    run_dir = Path(config.output_dir)
    accelerator = make_accelerator(run_dir, config.train.mixed_precision)
    runs.check_launch(accelerator)  # first: a broken launch must not race on the run folder
    checkpoint = runs.resolve_resume(config.resume, run_dir)
    runs.check_run_dir(run_dir, resuming=config.resume is not None, overwrite=config.overwrite,
                       files=runs.RUN_FILES)

    tokenizer = runs.load_tokenizer(config.data.tokenizer, what="data.tokenizer")
    model = build_model(config.objective, config.model.preset, tokenizer, overrides=config.model.overrides,
                        block_size=config.data.block_size, seed=config.train.seed)
    model = distributed.shard_model(accelerator, model, config.distributed)
    train_data, evaluate = _data(config, tokenizer, model, accelerator)

    n_params = count_parameters(model)
    summarize = _summarizer(config, n_params)

    def export(folder: Path | None) -> RunSummary | None:  # a checkpoint as a loadable model
        saved = export_trained(trainer, tokenizer, folder)
        state = trainer.state
        return None if saved is None else summarize(
            saved, step=state.step, tokens_seen=state.tokens_seen, elapsed=state.elapsed_seconds,
            metrics=trainer.last_eval, status=f"checkpoint of a {state.total_steps}-step run")

    trainer = Trainer(model, train_data, config.train, config.optim, run_dir, accelerator=accelerator,
                      evaluate=evaluate, flops_per_token=_flops_per_token(model, config.data.block_size),
                      on_checkpoint=lambda trainer, path: hooks.on_checkpoint(trainer, path, export))
    if checkpoint is not None:
        trainer.resume(checkpoint)
    accelerator.wait_for_everyone()  # every process passed every check
    if accelerator.is_main_process:
        runs.start_run_dir(run_dir, config, clear=config.overwrite and config.resume is None,
                           restart=config.resume is not None and checkpoint is None, files=runs.RUN_FILES)
    accelerator.wait_for_everyone()
    strategy = distributed.strategy_name(accelerator, trainer.model)  # what really runs, after prepare
    if accelerator.is_main_process:
        print(f"lmforge pretrain: {describe_model(model.config)}, {n_params / 1e6:.2f}M parameters, "
              f"{config.objective} LM on {config.data.source}; strategy {strategy}, "
              f"{accelerator.num_processes} process(es), run folder {run_dir}"
              + (f", resuming from {checkpoint}" if checkpoint else "")
              + ("" if config.data.eval_split else f"; no validation split in {config.data.source}: nothing is "
                 "evaluated (name one with --data.eval-split)"), flush=True)
    final_dir, summary = None, None
    try:
        result = trainer.fit()
        if result.status != "interrupted":
            final_dir, summary = save_final(trainer, tokenizer, config, result, summarize)
        accelerator.wait_for_everyone()
    finally:  # the checkpoints already queued are published even when training failed
        hooks.on_end(final_dir, summary)
    return PretrainResult(run_dir=run_dir, final_dir=final_dir, train=result, strategy=strategy)


def _summarizer(config: PretrainConfig, n_params: int) -> Any:
    """``summarize(model, step=..., ...)`` -> the ``RunSummary`` of this run at that point."""
    def summarize(model: Any, *, step: int, tokens_seen: int, elapsed: float, metrics: dict[str, float],
                  status: str, plot: str | None = None) -> RunSummary:
        return RunSummary(kind="pretrain", model_config=model.config, config=to_dict(config),
                          data=config.data.source, steps=step, tokens_seen=tokens_seen, elapsed_seconds=elapsed,
                          status=status, n_params=n_params, objective=config.objective,
                          metrics={config.data.eval_split: metrics} if metrics and config.data.eval_split else {},
                          license=config.license, plot=plot)
    return summarize


def save_final(trainer: Trainer, tokenizer: Any, config: PretrainConfig, result: TrainResult,
               summarize: Any) -> tuple[Path, RunSummary | None]:
    """``final/``: model, tokenizer, generation config and loss plot; its summary (main process)."""
    run_dir = Path(config.output_dir)
    final = run_dir / runs.FINAL
    model = export_trained(trainer, tokenizer, final)
    if model is None:
        return final, None
    plot = plot_loss_curve(runs.read_metrics(run_dir), run_dir / "loss.png",
                           title=f"{model.config.model_type} on {config.data.source}")
    if plot is not None:
        shutil.copy(plot, final / "loss.png")
    return final, summarize(model, step=result.step, tokens_seen=result.tokens_seen, elapsed=result.elapsed_seconds,
                            metrics=result.last_eval, status=result.status, plot="loss.png" if plot else None)
