"""Evaluate a loaded model (``lmforge.runs.load_model``) on data, with the figures its head calls for:

- causal LM: strided sliding-window perplexity, bits per byte, next-token accuracy
  (``lmforge.eval.lm.evaluate_lm_strided``);
- masked LM: masked-token loss and accuracy on a fixed-seed masking (``evaluate_mlm``);
- sequence classifier: loss, accuracy, macro-F1, Matthews correlation, or Pearson and Spearman for
  regression, with the label mapping saved in the model's config (``evaluate_classifier``).

A model trained by lmforge is read, by default, through windows as long as its training rows
(the run's ``data.block_size``): the figure ``lmforge eval`` gives for a run is the one the run
(and the quickstart) reports for the same split. Other models use their whole context.
"""

from __future__ import annotations

from typing import Any, Literal

from lmforge.data.batches import eval_batches
from lmforge.data.classification import ClassificationCollator, LabelSpec, encode_classification
from lmforge.errors import LmforgeError
from lmforge.eval.classification import evaluate_classifier
from lmforge.eval.lm import evaluate_lm_strided, evaluate_mlm, model_context, model_inputs_filter
from lmforge.runs import ADAPTER_CONFIG, LoadedModel, ModelFolder, auto_class_for, read_json

Kind = Literal["causal", "mlm", "classification"]
Task = Literal["auto", "lm", "classification"]
_KINDS: dict[str, Kind] = {"AutoModelForCausalLM": "causal", "AutoModelForMaskedLM": "mlm",
                           "AutoModelForSequenceClassification": "classification"}
AUTO_CLASSES = {kind: auto for auto, kind in _KINDS.items()}


def model_kind(folder: ModelFolder, task: Task = "auto") -> Kind:
    """What the model in ``folder`` does (causal, mlm, classification), read from its config only;
    a model that cannot do ``task`` raises ``LmforgeError``."""
    auto = auto_class_for(folder)
    kind = _KINDS.get(auto)
    shown = _architecture(folder)
    if kind is None:
        raise LmforgeError(f"{folder.path}: the model has no language-modelling or classification head "
                           f"({shown}); fine-tune it first (lmforge finetune)")
    if task == "lm" and kind == "classification":
        raise LmforgeError(f"{folder.path}: --task lm, but the model is a sequence classifier ({shown}); use "
                           "--task classification (or auto)")
    if task == "classification" and kind != "classification":
        raise LmforgeError(f"{folder.path}: --task classification, but the model has no classification head "
                           f"({shown}); fine-tune it with 'lmforge finetune' (task: classification) first, or "
                           "use --task lm")
    return kind


def _architecture(folder: ModelFolder) -> str:
    """The model's class as its config records it (an adapter: its task type), for messages."""
    if folder.is_adapter:
        return f"adapter task_type {read_json(folder.path / ADAPTER_CONFIG).get('task_type')}"
    return ", ".join(read_json(folder.path / "config.json").get("architectures") or []) or "none recorded"


def run_window(folder: ModelFolder) -> int | None:
    """The length of the training rows of the lmforge run that wrote ``folder`` (None: not a run)."""
    config = folder.run_config or {}
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    length = data.get("block_size") or data.get("max_length")
    return int(length) if isinstance(length, int) and length > 1 else None


def evaluate_classification(loaded: LoadedModel, ds: Any, *, where: str, text_column: str,
                            text_pair_column: str | None, label_column: str, max_length: int | None,
                            batch_size: int, accelerator: Any = None) -> dict[str, float]:
    """A sequence classifier's metrics on labelled rows (from ``load_labelled``), the labels mapped
    to ids through the model's config (``id2label``)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    spec = LabelSpec.from_config(model.config)
    length = max_length or model_context(model, tokenizer) or 512
    encoded = encode_classification(ds, tokenizer, spec, text_column=text_column, text_pair_column=text_pair_column,
                                    label_column=label_column, max_length=length, where=where)
    keep = [c for c in ("input_ids", "attention_mask", "token_type_ids", "labels") if c in encoded.column_names]
    encoded = encoded.select_columns(keep)
    collate = model_inputs_filter(model, ClassificationCollator(
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, spec.problem_type))
    ranks = {"process_index": accelerator.process_index, "num_processes": accelerator.num_processes} if accelerator else {}
    batches = eval_batches(encoded, batch_size, collate, **ranks)
    metrics = evaluate_classifier(model, batches, problem_type=spec.problem_type, accelerator=accelerator)
    return {**metrics, "rows": len(encoded), "max_length": length}


def evaluate_model(loaded: LoadedModel, kind: Kind, *, texts: list[str] | None = None, labelled: Any = None,
                   where: str = "", max_length: int | None = None, stride: int | None = None,
                   batch_size: int = 8, mlm_probability: float = 0.15, seed: int = 0,
                   text_column: str = "text", text_pair_column: str | None = None, label_column: str = "label",
                   accelerator: Any = None, progress: bool = True) -> dict[str, Any]:
    """The figures of a loaded model of ``kind`` (see ``model_kind``): on ``texts`` for a language
    model, on the ``labelled`` rows for a classifier. Without ``max_length``, a language model
    trained by lmforge reads windows of its training rows' length (``run_window``) and reports
    ``window`` = "run" (else "context")."""
    if loaded.tokenizer is None:
        raise LmforgeError(f"{loaded.folder.path}: no tokenizer saved with the model; save the tokenizer it "
                           "was trained with into that folder")
    if kind == "classification":
        if loaded.tokenizer.pad_token is None and loaded.tokenizer.eos_token is not None:
            loaded.tokenizer.pad_token = loaded.tokenizer.eos_token  # padding is masked out
        if loaded.model.config.pad_token_id is None:
            loaded.model.config.pad_token_id = loaded.tokenizer.pad_token_id
        return evaluate_classification(loaded, labelled, where=where, text_column=text_column,
                                       text_pair_column=text_pair_column, label_column=label_column,
                                       max_length=max_length, batch_size=batch_size, accelerator=accelerator)
    window = "given"
    if max_length is None:
        max_length = run_window(loaded.folder)
        window = "run" if max_length is not None else "context"
    common = {"max_length": max_length, "batch_size": batch_size, "accelerator": accelerator, "progress": progress}
    if kind == "causal":
        metrics = evaluate_lm_strided(loaded.model, loaded.tokenizer, texts, stride=stride, **common)
    else:
        metrics = evaluate_mlm(loaded.model, loaded.tokenizer, texts, mlm_probability=mlm_probability, seed=seed,
                               **common)
    return {**metrics, "window": window}
