"""``lmforge finetune``: a pretrained model (ours or a stock checkpoint) + labelled or chat data ->
the same training loop as pretraining -> the selected model (or LoRA adapter) in ``final/``.

Run directory layout::

    run_dir/config.yaml        the resolved configuration
    run_dir/metrics.jsonl      one JSON object per log/eval line (test_* at the end)
    run_dir/checkpoints/step_N accelerate state + trainer_state.json (the last K)
    run_dir/best/              the best model (or adapter) so far by train.metric_for_best
    run_dir/final/             the selected model (or adapter) + tokenizer + README.md (model card)
    run_dir/eval_results.json  the selected model's eval and test metrics

Tasks: ``classification`` (``AutoModelForSequenceClassification``; a head is added when the
checkpoint has none, with the labels of the training split), ``sft`` (``AutoModelForCausalLM``;
conversations rendered with the tokenizer's chat template, loss on assistant turns only) and
``preference`` (``AutoModelForCausalLM``; DPO, IPO, SimPO or ORPO on prompt/chosen/rejected pairs,
see ``lmforge.train.preference``; with ``preference.reference: precomputed`` the reference
log-probabilities are stored in ``run_dir/reference_logps.safetensors``).
Methods: ``full`` or ``lora`` (peft; the new head and any other newly initialised module train
fully through ``modules_to_save``, everything else is frozen).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, TaskType, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS
from torch import nn

from lmforge import runs
from lmforge.config import to_dict
from lmforge.data.batches import BatchStream, eval_batches
from lmforge.data.chat import build_sft_dataset, check_chat_tokenizer
from lmforge.data.classification import (
    ClassificationCollator,
    encode_classification,
    infer_label_spec,
    load_labelled,
)
from lmforge.data.collators import CausalLMCollator
from lmforge.data.preference import PreferenceCollator, load_preference_pairs
from lmforge.data.sources import resolve_split
from lmforge.errors import LmforgeError
from lmforge.eval.classification import evaluate_classifier
from lmforge.eval.lm import model_inputs_filter
from lmforge.eval.perplexity import evaluate_lm, token_byte_lengths
from lmforge.train import distributed
from lmforge.train.config import FinetuneConfig
from lmforge.train.hooks import RunHooks, RunSummary
from lmforge.train.loop import ModelSelection, Trainer, TrainResult, make_accelerator, rows_of
from lmforge.train.model_presets import count_parameters
from lmforge.train.preference import (
    DEFAULT_BETA,
    PREFERENCE_METRICS,
    REFERENCE_FILE,
    REFERENCE_FREE,
    PreferenceObjective,
    adapter_off_reference,
    compute_reference_logps,
    evaluate_preference,
    frozen_copy_reference,
    load_reference_logps,
    pairs_of,
    save_reference_logps,
    with_reference_columns,
)
from lmforge.train.saving import inner_model, load_saved_weights, save_model_folder
from lmforge.train.tracking import plot_loss_curve

RESULTS_FILE = "eval_results.json"
RUN_FILES = (*runs.RUN_FILES, "best", RESULTS_FILE, REFERENCE_FILE)

# LoRA target modules per model_type when lora.target_modules is not set (peft's own table covers
# the stock families it knows; ours and Mamba are added here)
DEFAULT_LORA_TARGETS = {
    "lmforge_gpt": ["q_proj", "v_proj"],
    "lmforge_bert": ["q_proj", "v_proj"],
    "lmforge_mamba": ["in_proj", "out_proj"],
    "mamba": ["in_proj", "out_proj"],
    # a hybrid's attention and MLP layers too (a name no layer has is ignored while one matches)
    "lmforge_mamba2": ["in_proj", "out_proj", "q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
    "mamba2": ["in_proj", "out_proj"],
}


@dataclass
class FinetuneResult:
    """Where things are after ``finetune``."""

    run_dir: Path
    final_dir: Path | None
    train: TrainResult
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # {"eval": ..., "test": ...}


# ----------------------------------------------------------------------------------- model


def resolve_model_path(path: str) -> str:
    """``model.path`` -> what ``from_pretrained`` should read: the model of any folder lmforge wrote
    (``lmforge.runs.find_model``), a built-in model, or a Hub id."""
    source = runs.resolve_model_source(path, what="model.path")
    if runs.is_local_path(source) and runs.find_model(source, what="model.path").is_adapter:
        raise LmforgeError(f"model.path: {path} holds a LoRA adapter, not a model; merge it first "
                           f"(lmforge merge {path} --output-dir DIR) and fine-tune DIR")
    return source


def finetune_tokenizer(config: FinetuneConfig, model_path: str) -> Any:
    """``data.tokenizer``, or the tokenizer saved with the model; a pad token is guaranteed."""
    source = config.data.tokenizer or model_path
    what = "data.tokenizer" if config.data.tokenizer else f"model.path {model_path} (its tokenizer)"
    tokenizer = runs.load_tokenizer(source, what=what, trust_remote_code=config.model.trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LmforgeError(f"{what}: the tokenizer has neither a pad nor an eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
        print(f"tokenizer: no pad token; padding with the eos token {tokenizer.eos_token!r} "
              "(masked out of the loss and of pooling by the attention mask)")
    return tokenizer


def _check_vocab(model: nn.Module, tokenizer: Any, config: FinetuneConfig) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) <= vocab:
        return
    if config.method == "lora":
        raise LmforgeError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {vocab}; "
                           "LoRA cannot train new embedding rows: use method: full (the embedding is resized), "
                           "or a tokenizer that fits the model")
    model.resize_token_embeddings(len(tokenizer))
    print(f"model: embedding resized from {vocab} to {len(tokenizer)} tokens for the tokenizer")


def load_base_model(config: FinetuneConfig, model_path: str, tokenizer: Any,
                    spec: Any | None) -> tuple[nn.Module, list[str]]:
    """The model to fine-tune and the names of the modules it had to initialise (a new head).

    Classification: ``num_labels``, ``id2label``/``label2id`` and ``problem_type`` come from the
    training labels (``spec``); a checkpoint whose head has another size gets a new head.
    """
    kwargs: dict[str, Any] = {}
    if config.task == "classification":
        auto = "AutoModelForSequenceClassification"
        kwargs.update(spec.config_kwargs(), ignore_mismatched_sizes=True)
    else:
        auto = "AutoModelForCausalLM"
    torch.manual_seed(config.train.seed)  # the new head's initialisation
    model, info = runs.load_pretrained(auto, model_path, what="model.path",
                                  trust_remote_code=config.model.trust_remote_code, **kwargs)
    new_keys = sorted(set(info.get("missing_keys", [])) | {k for k, *_ in info.get("mismatched_keys", [])})
    new_modules = sorted({key.rsplit(".", 1)[0] for key in new_keys})
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # last-token pooling without a mask
    _check_vocab(model, tokenizer, config)
    return model.train(), new_modules


def default_target_modules(model: nn.Module) -> list[str]:
    """The family's LoRA targets; for a model we do not know, the linear layers of its attention."""
    model_type = getattr(model.config, "model_type", "")
    targets = DEFAULT_LORA_TARGETS.get(model_type) or PEFT_TARGETS.get(model_type)
    if targets:
        return list(targets)
    found = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(part in name.lower() for part in ("attn", "attention"))}
    if not found:
        raise LmforgeError(f"lora.target_modules: no default for model_type {model_type!r} and no linear layers "
                           "inside attention modules; set lora.target_modules (the linear layers are: "
                           f"{', '.join(_linear_names(model))})")
    return sorted(found)


def _linear_names(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def apply_lora(model: nn.Module, config: FinetuneConfig, new_modules: list[str]) -> nn.Module:
    """Wrap ``model`` with LoRA adapters; the newly initialised modules (the head) train fully."""
    lora = config.lora
    targets = list(lora.target_modules) if lora.target_modules else default_target_modules(model)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unmatched = [t for t in targets if t not in names and not any(n.endswith(t) for n, _ in model.named_modules())]
    if unmatched:
        raise LmforgeError(f"lora.target_modules: {', '.join(unmatched)} match no module of "
                           f"{type(model).__name__}; its linear layers are: {', '.join(_linear_names(model))}")
    task_type = TaskType.SEQ_CLS if config.task == "classification" else TaskType.CAUSAL_LM
    peft_config = LoraConfig(task_type=task_type, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=targets, modules_to_save=new_modules or None)
    print(f"LoRA: r {lora.r}, alpha {lora.alpha}, dropout {lora.dropout} on {', '.join(targets)}"
          + (f"; trained fully: {', '.join(new_modules)}" if new_modules else ""))
    return get_peft_model(model, peft_config)


# ----------------------------------------------------------------------------------- data


@dataclass
class _Data:
    train: Any
    eval: Any | None
    test: Any | None
    spec: Any | None  # LabelSpec for classification


def _where(config: FinetuneConfig, split: str) -> str:
    return f"data.source {config.data.source} (split {split!r})"


def _sample(ds: Any, rows: int | None, seed: int) -> Any:
    """``rows`` rows drawn at random (seeded) from ``ds``, in their original order; all without
    ``rows``. Files are often sorted (by label, by date): the first N rows are no sample."""
    if rows is None or rows >= len(ds):
        return ds
    keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:rows]
    return ds.select(sorted(keep.tolist()))


def resolve_splits(data: Any) -> dict[str, str | None]:
    """The split names to read (``data``: the FinetuneDataSection), see ``resolve_split``."""
    return {"train": resolve_split(data.source, data.train_split, default="train", what="data.train_split"),
            "eval": resolve_split(data.source, data.eval_split, default="validation", what="data.eval_split"),
            "test": resolve_split(data.source, data.test_split, default="test", what="data.test_split")}


def load_data(config: FinetuneConfig, tokenizer: Any, splits: dict[str, str | None]) -> _Data:
    """Every split of ``splits`` (see ``resolve_splits``), tokenized and checked, before anything
    is written."""
    data = config.data
    if config.task == "classification":
        raw = {}
        for key, split in splits.items():
            if split is None:
                continue
            ds = load_labelled(data.source, split, text_column=data.text_column,
                               text_pair_column=data.text_pair_column, label_column=data.label_column)
            if key == "train":
                ds = _sample(ds, data.train_rows, config.train.seed)
            raw[key] = ds
        spec = infer_label_spec(raw["train"], data.label_column, where=_where(config, data.train_split),
                                problem_type=data.problem_type)
        encoded = {key: encode_classification(ds, tokenizer, spec, text_column=data.text_column,
                                              text_pair_column=data.text_pair_column,
                                              label_column=data.label_column, max_length=data.max_length,
                                              where=_where(config, splits[key]))
                   for key, ds in raw.items()}
        return _Data(encoded["train"], encoded.get("eval"), encoded.get("test"), spec)
    if config.task == "preference":
        return _preference_data(config, tokenizer, splits)

    check_chat_tokenizer(tokenizer, where="data.tokenizer" if data.tokenizer else f"model.path {config.model.path}")
    built = {}
    for key, split in splits.items():
        if split is None:
            continue
        ds = build_sft_dataset(data.source, split, tokenizer, messages_column=data.messages_column,
                               max_length=data.max_length, pack=data.pack)
        if key == "train":
            ds = _sample(ds, data.train_rows, config.train.seed)
        built[key] = ds
    return _Data(built["train"], built.get("eval"), built.get("test"), None)


def _preference_data(config: FinetuneConfig, tokenizer: Any, splits: dict[str, str | None]) -> _Data:
    data = config.data
    built = {}
    for key, split in splits.items():
        if split is None:
            continue
        loaded = load_preference_pairs(data.source, split, tokenizer, max_length=data.max_length,
                                       truncation=data.truncation, prompt_column=data.prompt_column,
                                       chosen_column=data.chosen_column, rejected_column=data.rejected_column)
        if loaded.truncated:
            dropped = (f"; {loaded.dropped} of them dropped: their completions became identical" if loaded.dropped
                       else "")
            print(f"data: {loaded.truncated:,} of {loaded.rows:,} {split} pairs are longer than data.max_length "
                  f"{data.max_length} and were truncated ({data.truncation.replace('_', ' ')}){dropped}")
        pairs = loaded.pairs
        if key == "train":
            pairs = _sample(pairs, data.train_rows, config.train.seed)
        built[key] = pairs
    return _Data(built["train"], built.get("eval"), built.get("test"), None)


def _collator(config: FinetuneConfig, tokenizer: Any, spec: Any | None) -> Any:
    if config.task == "classification":
        return ClassificationCollator(tokenizer.pad_token_id, spec.problem_type)
    if config.task == "preference":
        return PreferenceCollator(tokenizer.pad_token_id)
    return CausalLMCollator(tokenizer.pad_token_id)


# what each kind of run's evaluation reports (train.metric_for_best must be one of them)
EVAL_METRICS = {
    "single_label_classification": ("accuracy", "macro_f1", "matthews_correlation", "loss"),
    "multi_label_classification": ("accuracy", "micro_f1", "macro_f1", "loss"),
    "regression": ("pearson", "spearman", "mse", "loss"),
    "sft": ("loss", "perplexity", "bits_per_byte"),
    "preference": PREFERENCE_METRICS,
}


def _selection_metric(config: FinetuneConfig, spec: Any | None) -> tuple[str, bool]:
    """(metric, greater is better) of model selection, checked before training starts."""
    kind = spec.problem_type if config.task == "classification" else config.task
    metric = config.train.metric_for_best
    if metric == "auto":
        metric = {"sft": "loss", "preference": "loss", "regression": "pearson"}.get(kind, "accuracy")
    elif metric == "nll" and config.preference.loss != "orpo":
        raise LmforgeError("train.metric_for_best: nll is reported only for preference.loss orpo")
    elif metric not in EVAL_METRICS[kind]:
        raise LmforgeError(f"train.metric_for_best: {metric!r} is not reported for {kind.replace('_', ' ')}; "
                           f"choose one of {', '.join(EVAL_METRICS[kind])} (or auto)")
    greater = config.train.greater_is_better
    if greater is None:
        greater = metric not in ("loss", "mse", "perplexity", "bits_per_byte")
    return metric, greater


# ----------------------------------------------------------------------------------- the task


def finetune(config: FinetuneConfig, *, hooks: RunHooks | None = None) -> FinetuneResult:
    """Fine-tune a model as described by ``config`` (see ``FinetuneConfig``).

    Every check (launch, run folder, model, tokenizer, data, LoRA targets, checkpoint) runs
    before the run folder is created or changed. ``hooks`` (e.g. ``lmforge.publish.RunPublisher``)
    see every checkpoint and the end of the run: the model card and Hub pushes live there.
    """
    hooks = hooks or RunHooks()
    run_dir = Path(config.output_dir)
    accelerator = make_accelerator(run_dir, config.train.mixed_precision)
    runs.check_launch(accelerator)  # first: a broken launch must not race on the run folder
    checkpoint = runs.resolve_resume(config.resume, run_dir)
    runs.check_run_dir(run_dir, resuming=config.resume is not None, overwrite=config.overwrite, files=RUN_FILES)
    is_main = accelerator.is_main_process

    model_path = resolve_model_path(config.model.path)
    tokenizer = finetune_tokenizer(config, model_path)
    splits = resolve_splits(config.data)
    data = load_data(config, tokenizer, splits)
    model, new_modules = load_base_model(config, model_path, tokenizer, data.spec)
    frozen_reference = _frozen_reference(config, model, accelerator)  # the starting model, before LoRA
    if config.method == "lora":
        model = apply_lora(model, config, new_modules)
    trainable, total = count_parameters(model, trainable_only=True), count_parameters(model)

    ranks = dict(process_index=accelerator.process_index, num_processes=accelerator.num_processes)
    collate = _collator(config, tokenizer, data.spec)
    objective, stored_reference = None, None
    if config.task == "preference":
        objective = _preference_objective(config, accelerator, frozen_reference)
        stored_reference = _stored_reference(config, data, model, collate, accelerator, checkpoint)
    else:
        collate = model_inputs_filter(model, collate)
    train = config.train
    train_data = BatchStream(data.train, train.micro_batch_size, collate, seed=train.seed,
                             grad_accum_steps=train.grad_accum_steps, **ranks)
    if len(train_data) == 0:
        raise LmforgeError(
            f"{_where(config, config.data.train_split)} has {len(data.train)} rows, fewer than one optimizer "
            f"step of {train_data.rows_per_step} (train.micro_batch_size {train.micro_batch_size} x "
            f"train.grad_accum_steps {train.grad_accum_steps} x {accelerator.num_processes} process(es))")
    if train.epochs is not None:
        train.max_steps = max(1, math.ceil(train.epochs * len(train_data)))

    evaluate = _evaluator(config, data, collate, accelerator, tokenizer, model, objective)  # eval and/or test split
    periodic = evaluate is not None and data.eval is not None
    select = _model_selection(config, data, run_dir, accelerator, tokenizer) if periodic else None
    summarize = _summarizer(config, model_path, trainable, total)

    def export(folder: Path | None) -> RunSummary | None:  # a checkpoint's model or adapter
        if folder is None:  # not the main process (fine-tuning does not shard)
            return None
        inner = save_model_folder(trainer.accelerator.unwrap_model(trainer.model), tokenizer, folder,
                                  generation=config.task != "classification")
        state = trainer.state
        return summarize(inner, step=state.step, tokens_seen=state.tokens_seen, elapsed=state.elapsed_seconds,
                         metrics={}, status=f"checkpoint of a {state.total_steps}-step run")

    trainer = Trainer(model, train_data, train, config.optim, run_dir, accelerator=accelerator,
                      evaluate=(lambda m, final: evaluate(m, "eval", final)) if periodic else None,
                      count_targets={"classification": rows_of, "preference": pairs_of}.get(config.task),
                      select=select, objective=objective,
                      on_checkpoint=lambda trainer, path: hooks.on_checkpoint(trainer, path, export))
    if checkpoint is not None:
        trainer.resume(checkpoint)
    accelerator.wait_for_everyone()  # every process passed every check
    strategy = distributed.strategy_name(accelerator, trainer.model)  # what really runs, after prepare
    if is_main:
        runs.start_run_dir(run_dir, config, clear=config.overwrite and config.resume is None,
                      restart=config.resume is not None and checkpoint is None, files=RUN_FILES)
        if stored_reference is not None and not (run_dir / REFERENCE_FILE).exists():
            save_reference_logps(run_dir / REFERENCE_FILE, stored_reference)
        untested = "" if data.test is not None else "; no test split: nothing will be tested"
        unevaluated = "" if data.eval is not None else "; no validation split: no evaluation during training"
        print(f"lmforge finetune: {config.task} ({config.method}) of {model_path}: "
              f"{type(inner_model(model)).__name__}, trainable {trainable:,} of {total:,} parameters "
              f"({100 * trainable / total:.2f}%), {len(data.train):,} training rows ({splits['train']}), "
              f"{train.max_steps} steps, strategy {strategy}, {accelerator.num_processes} process(es), "
              f"run folder {run_dir}" + (f", resuming from {checkpoint}" if checkpoint else "")
              + unevaluated + untested, flush=True)
    accelerator.wait_for_everyone()
    final_dir, metrics, summary = None, {}, None
    try:
        result = trainer.fit()
        final_dir, metrics, summary = _finish(trainer, result, config, data, evaluate, select, tokenizer, summarize)
    finally:  # the checkpoints already queued are published even when training failed
        hooks.on_end(final_dir, summary)
    return FinetuneResult(run_dir=run_dir, final_dir=final_dir, train=result, metrics=metrics)


REFERENCE_SOURCES = {None: "none (reference-free)", "copy": "a frozen copy of the starting model",
                     "adapter": "the model with its LoRA adapter off",
                     "precomputed": "log-probabilities of the starting model, computed before training"}


def _reference_kind(config: FinetuneConfig) -> str | None:
    """The reference of a preference run: adapter, copy or precomputed (auto: adapter with LoRA,
    copy with full fine-tuning); None for reference-free losses and other tasks."""
    pref = config.preference
    if config.task != "preference" or pref.loss in REFERENCE_FREE:
        return None
    if pref.reference == "auto":
        return "adapter" if config.method == "lora" else "copy"
    return pref.reference


def _frozen_reference(config: FinetuneConfig, model: nn.Module, accelerator: Any) -> Any:
    """preference.reference copy (or auto with full fine-tuning): the frozen starting model."""
    if _reference_kind(config) != "copy":
        return None
    return frozen_copy_reference(model, accelerator.device, autocast=accelerator.autocast)


def _preference_objective(config: FinetuneConfig, accelerator: Any, frozen: Any) -> PreferenceObjective:
    pref = config.preference
    beta = pref.beta if pref.beta is not None else DEFAULT_BETA[pref.loss]
    kind = _reference_kind(config)
    reference = adapter_off_reference(accelerator.autocast) if kind == "adapter" else frozen
    source = REFERENCE_SOURCES[kind]
    if accelerator.is_main_process:
        gamma = f", gamma {pref.simpo_gamma}" if pref.loss == "simpo" else ""
        print(f"preference: loss {pref.loss}, beta {beta}{gamma}; reference: {source}")
    return PreferenceObjective(pref.loss, beta, reference, simpo_gamma=pref.simpo_gamma)


def _stored_reference(config: FinetuneConfig, data: _Data, model: nn.Module, collate: Any, accelerator: Any,
                      checkpoint: Path | None) -> dict[str, dict[str, torch.Tensor]] | None:
    """preference.reference precomputed: the reference log-probabilities of every split as
    columns of ``data`` (computed now with the starting model, or read back when resuming).
    Returns the values to store with the run (None when not used)."""
    if _reference_kind(config) != "precomputed":
        return None
    splits = {key: pairs for key, pairs in (("train", data.train), ("eval", data.eval), ("test", data.test))
              if pairs is not None}
    sizes = {key: len(pairs) for key, pairs in splits.items()}
    if checkpoint is not None:
        run_dir = Path(config.output_dir)
        stored = next((p for p in (run_dir / REFERENCE_FILE, checkpoint.parent.parent / REFERENCE_FILE)
                       if p.is_file()), None)
        if stored is None:
            raise LmforgeError(f"resume: {checkpoint} belongs to a run with preference.reference precomputed, but "
                               f"its {REFERENCE_FILE} is missing (looked in {run_dir} and {checkpoint.parent.parent}); "
                               "the reference must come from the starting model, so start a new run")
        values = load_reference_logps(stored, sizes)
    else:
        values = {
            key: compute_reference_logps(model, pairs, collate, batch_size=config.train.micro_batch_size,
                                         device=next(model.parameters()).device, autocast=accelerator.autocast,
                                         desc=f"reference log-probabilities ({key})",
                                         progress=config.train.progress and accelerator.is_main_process)
            for key, pairs in splits.items()}
    data.train, data.eval, data.test = (with_reference_columns(pairs, values[key]) if pairs is not None else None
                                        for key, pairs in (("train", data.train), ("eval", data.eval),
                                                           ("test", data.test)))
    return values


def _model_selection(config: FinetuneConfig, data: _Data, run_dir: Path, accelerator: Any,
                     tokenizer: Any) -> ModelSelection:
    """Keep the best model by ``train.metric_for_best`` in ``run_dir/best`` (written aside, then
    swapped in: never half-written)."""
    metric, greater = _selection_metric(config, data.spec)
    best_dir = run_dir / "best"

    def on_best(prepared: nn.Module, step: int, metrics: dict[str, float]) -> None:
        if accelerator.is_main_process:
            tmp, old = run_dir / ".best-tmp", run_dir / ".best-old"
            for stale in (tmp, old):
                shutil.rmtree(stale, ignore_errors=True)
            save_model_folder(accelerator.unwrap_model(prepared), tokenizer, tmp, generation=False)
            (tmp / "best_step.json").write_text(json.dumps({"step": step, **metrics}, indent=2))
            if best_dir.exists():
                best_dir.rename(old)
            tmp.rename(best_dir)
            shutil.rmtree(old, ignore_errors=True)

    return ModelSelection(metric, greater, on_best, patience=config.train.early_stopping_patience, folder=best_dir)


def _finish(trainer: Trainer, result: TrainResult, config: FinetuneConfig, data: _Data, evaluate: Any,
            select: ModelSelection | None, tokenizer: Any,
            summarize: Any) -> tuple[Path | None, dict[str, dict[str, float]], RunSummary | None]:
    """After training: the selected model back in place, its eval/test metrics, final/ written."""
    accelerator, run_dir, is_main = trainer.accelerator, Path(config.output_dir), trainer.accelerator.is_main_process
    final_dir, metrics, summary = None, {}, None
    if result.status != "interrupted":
        unwrapped = accelerator.unwrap_model(trainer.model)
        reload = select is not None and result.best_step is not None and result.best_step != result.step
        if reload:
            load_saved_weights(unwrapped, run_dir / "best")  # the selected model, on every process
            if is_main:
                print(f"selected the model of step {result.best_step} ({select.metric} {result.best_value:.4f})")
        if data.eval is not None:  # the trainer's closing evaluation is of this model unless it was reloaded
            reuse = result.last_eval_final and not reload
            metrics["eval"] = dict(result.last_eval) if reuse else evaluate(trainer.model, "eval", True)
        if data.test is not None:
            metrics["test"] = evaluate(trainer.model, "test", True)
        if is_main:
            final_dir, summary = _save_final(unwrapped, tokenizer, config, result, metrics, summarize)
    accelerator.wait_for_everyone()
    return final_dir, metrics, summary


def _evaluator(config: FinetuneConfig, data: _Data, collate: Any, accelerator: Any, tokenizer: Any,
               model: nn.Module, objective: PreferenceObjective | None = None) -> Any:
    """``evaluate(model, "eval" | "test", final) -> metrics``, or None without eval and test splits."""
    if data.eval is None and data.test is None:
        return None
    ranks = dict(process_index=accelerator.process_index, num_processes=accelerator.num_processes)
    batch_size, limit = config.train.micro_batch_size, config.train.eval_batches
    splits = {"eval": data.eval, "test": data.test}
    if limit is not None and data.eval is not None:  # periodic ones: a fixed random sample, not a file's head
        rows = limit * batch_size * accelerator.num_processes
        splits["eval-sample"] = _sample(data.eval, rows, config.train.seed)

    def rows_of_split(split: str, final: bool) -> Any:
        return splits[split] if final or limit is None or split != "eval" else splits["eval-sample"]
    if config.task == "classification":
        def evaluate(prepared: nn.Module, split: str, final: bool) -> dict[str, float]:
            batches = eval_batches(rows_of_split(split, final), batch_size, collate, None, **ranks)
            return evaluate_classifier(prepared, batches, problem_type=data.spec.problem_type,
                                       accelerator=accelerator)
        return evaluate
    if config.task == "preference":
        def evaluate_pairs(prepared: nn.Module, split: str, final: bool) -> dict[str, float]:
            batches = eval_batches(rows_of_split(split, final), batch_size, collate, None, **ranks)
            return evaluate_preference(prepared, batches, objective, accelerator=accelerator)
        return evaluate_pairs

    byte_lengths = token_byte_lengths(tokenizer, inner_model(model).config.vocab_size)

    def evaluate_sft(prepared: nn.Module, split: str, final: bool) -> dict[str, float]:
        batches = eval_batches(rows_of_split(split, final), batch_size, collate, None, **ranks)
        return evaluate_lm(prepared, batches, byte_lengths=byte_lengths, accelerator=accelerator, shift=1)
    return evaluate_sft


def _summarizer(config: FinetuneConfig, model_path: str, trainable: int, total: int) -> Any:
    """``summarize(inner, step=..., ...)`` -> the ``RunSummary`` of this run at that point."""
    def summarize(inner: nn.Module, *, step: int, tokens_seen: int, elapsed: float,
                  metrics: dict[str, dict[str, float]], status: str, plot: str | None = None) -> RunSummary:
        labels = list(getattr(inner.config, "id2label", {}).values()) if config.task == "classification" else None
        return RunSummary(kind="finetune", model_config=inner.config, config=to_dict(config),
                          data=config.data.source, steps=step, tokens_seen=tokens_seen, elapsed_seconds=elapsed,
                          status=status, n_params=total, trainable=trainable, task=config.task,
                          method=config.method, base_model=model_path, labels=labels, license=config.license,
                          metrics={"validation" if k == "eval" else k: v for k, v in metrics.items()}, plot=plot)
    return summarize


def _save_final(model: nn.Module, tokenizer: Any, config: FinetuneConfig, result: TrainResult,
                metrics: dict[str, dict[str, float]], summarize: Any) -> tuple[Path, RunSummary]:
    """final/: the selected model or adapter, tokenizer, generation config, loss plot;
    eval_results.json. Returns the folder and its summary."""
    run_dir = Path(config.output_dir)
    final = run_dir / runs.FINAL
    if final.exists():
        shutil.rmtree(final)
    inner = save_model_folder(model, tokenizer, final, generation=config.task != "classification")
    results = {"step": result.step, "status": result.status, "best_step": result.best_step, **metrics}
    for folder in (run_dir, final):
        (folder / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    logged = {f"{split}_{k}": v for split, values in metrics.items() for k, v in values.items()}
    if logged:
        with open(run_dir / runs.METRICS_FILE, "a") as f:
            f.write(json.dumps({"step": result.step, "selected_step": result.best_step, **logged}) + "\n")
    plot = plot_loss_curve(runs.read_metrics(run_dir), run_dir / "loss.png",
                           title=f"{config.task} fine-tuning of {config.model.path}")
    if plot is not None:
        shutil.copy(plot, final / "loss.png")
    return final, summarize(inner, step=result.step, tokens_seen=result.tokens_seen, elapsed=result.elapsed_seconds,
                            metrics=metrics, status=result.status, plot="loss.png" if plot else None)
