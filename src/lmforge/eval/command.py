"""``lmforge eval MODEL_DIR --data SOURCE``: measure language models and classifiers on a corpus.

A model folder is an lmforge run folder (its ``final/``), a ``save_pretrained`` folder (lmforge's
own families or stock transformers models) or a LoRA adapter folder (``adapter_config.json``: the
base model named there is loaded, then the adapter). What is measured follows the model's head
(``--task auto``):

- causal LM: strided sliding-window perplexity, bits per byte and next-token accuracy
  (``lmforge.eval.lm.evaluate_lm_strided``);
- masked LM: masked-token loss and accuracy on a fixed-seed masking (``evaluate_mlm``);
- sequence classifier: loss, accuracy, macro-F1 and Matthews correlation, or Pearson and Spearman
  for regression, with the label mapping saved in the model's config
  (``lmforge.eval.classification.evaluate_classifier``).

``--compare`` evaluates more models on the same data and prints them side by side; ``--output``
writes the figures as JSON. Runs on one process, or several under ``accelerate launch``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmforge.errors import LmforgeError
from lmforge.tokenizers.metrics import auto_tokenizer, has_tokenizer

Task = Literal["auto", "lm", "classification"]
Kind = Literal["causal", "mlm", "classification"]

# (suffix of a transformers architecture name, what it is)
_HEADS: tuple[tuple[str, Kind], ...] = (
    ("ForSequenceClassification", "classification"), ("ForMaskedLM", "mlm"),
    ("ForCausalLM", "causal"), ("LMHeadModel", "causal"),
)
_PEFT_TASKS: dict[str, Kind] = {"SEQ_CLS": "classification", "CAUSAL_LM": "causal"}
# table order of the figures (others follow in the order they come)
_ORDER = ("task", "loss", "perplexity", "bits_per_byte", "next_token_accuracy", "masked_accuracy", "accuracy",
          "macro_f1", "micro_f1", "matthews_correlation", "pearson", "spearman", "mse", "tokens",
          "bytes", "masked_tokens", "max_length", "stride")


# --------------------------------------------------------------------------- model folders


def resolve_model_dir(path: str | Path) -> Path:
    """The folder that holds the model: a run folder's ``final/``, or the folder itself when it
    has ``config.json`` (a saved model) or ``adapter_config.json`` (a LoRA adapter)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise LmforgeError(f"{path}: model folder not found")
    if (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file():
        return folder
    final = folder / "final"
    if (final / "config.json").is_file() or (final / "adapter_config.json").is_file():
        return final
    if (folder / "checkpoints").is_dir():
        raise LmforgeError(f"{path}: this lmforge run has no final/ model yet (training not finished?); "
                           "its checkpoints/ hold training states, not models")
    found = ", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "nothing"
    raise LmforgeError(f"{path}: no model in this folder: expected config.json (a saved model), "
                       f"adapter_config.json (a LoRA adapter) or final/ (an lmforge run folder); it holds {found}")


def head_kind(config: Any) -> Kind | None:
    """What the checkpoint's head is, from ``config.architectures`` (None: a bare base model)."""
    from transformers.models.auto import modeling_auto

    architectures = list(getattr(config, "architectures", None) or [])
    for name in architectures:
        for suffix, kind in _HEADS:
            if name.endswith(suffix):
                return kind
    if architectures:
        return None
    for mapping, kind in ((modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "causal"),
                          (modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES, "mlm")):
        if config.model_type in mapping:  # no architectures recorded: the family's default head
            return kind
    return None


def _auto_class(kind: Kind) -> Any:
    import transformers

    return getattr(transformers, {"causal": "AutoModelForCausalLM", "mlm": "AutoModelForMaskedLM",
                                  "classification": "AutoModelForSequenceClassification"}[kind])


def _load_config(folder: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        hint = " (a model with custom code needs --trust-remote-code)" if "trust_remote_code" in str(e) else ""
        raise LmforgeError(f"{folder}/config.json: cannot be read: {str(e).strip().splitlines()[0]}{hint}") from None


def _check_task(where: Any, kind: Kind | None, task: Task, architectures: Any) -> Kind:
    shown = ", ".join(architectures or []) or "none recorded"
    if kind is None:
        raise LmforgeError(f"{where}: the model has no language-modelling or classification head "
                           f"(architectures: {shown}); fine-tune it first (lmforge finetune)")
    if task == "lm" and kind == "classification":
        raise LmforgeError(f"{where}: --task lm, but the model is a sequence classifier ({shown}); "
                           "use --task classification (or auto)")
    if task == "classification" and kind != "classification":
        raise LmforgeError(f"{where}: --task classification, but the model has no classification head "
                           f"({shown}); fine-tune it with 'lmforge finetune' (task: classification) first, "
                           "or use --task lm")
    return kind


@dataclass
class LoadedModel:
    """A model ready to evaluate, its tokenizer and what its head does."""

    folder: Path
    model: Any
    tokenizer: Any
    kind: Kind


def _base_path(adapter_dir: Path, base: str) -> str:
    """``base_model_name_or_path`` of an adapter as a loadable folder (run folders resolved;
    relative paths tried from the working directory, then from the adapter folder)."""
    for candidate in (Path(base).expanduser(), adapter_dir / base):
        if candidate.is_dir():
            return str(resolve_model_dir(candidate))
    return base  # a Hub id


def _head_from_adapter(adapter_dir: Path, base_config: Any) -> dict[str, Any]:
    """num_labels and the label mapping of a LoRA classifier, from (in this order) a config.json
    saved in the adapter folder, the base model's own classification head when the trained head has
    its size, else the size of the trained head with the labels named by their ids ("0", "1", ...:
    integer labels in the data match)."""
    config_file = adapter_dir / "config.json"
    if config_file.is_file():
        saved = json.loads(config_file.read_text())
        out = {k: saved[k] for k in ("num_labels", "id2label", "label2id", "problem_type") if k in saved}
        if "id2label" in out:
            out["id2label"] = {int(k): v for k, v in out["id2label"].items()}
            out.setdefault("num_labels", len(out["id2label"]))
        return out
    n = _trained_head_size(adapter_dir / "adapter_model.safetensors")
    has_head = base_config is not None and head_kind(base_config) == "classification"
    if n is None or (has_head and n == base_config.num_labels):
        return {}  # the base's own head and labels
    return {"num_labels": n, "id2label": {i: str(i) for i in range(n)}, "label2id": {str(i): i for i in range(n)}}


def _adapter_weight_names(adapter_dir: Path) -> set[str]:
    """The model weights an adapter saves in full (``modules_to_save``), named as in the model."""
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return set()
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return {k.removeprefix("base_model.model.") for k in f.keys()}


def _trained_head_size(weights: Path) -> int | None:
    """Outputs of the classification head saved with an adapter (``modules_to_save``), if any."""
    if not weights.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if key.endswith((".classifier.weight", ".score.weight", ".classifier.out_proj.weight")):
                return f.get_slice(key).get_shape()[0]
    return None


def _adapter_kind(folder: Path, task: Task, trust_remote_code: bool) -> tuple[Kind, Any, str]:
    """What a LoRA adapter's model does, its peft config and its base model (a folder or Hub id)."""
    from peft import PeftConfig

    try:
        peft_config = PeftConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as e:
        raise LmforgeError(f"{folder}/adapter_config.json: cannot be read: {str(e).splitlines()[0]}") from None
    base = _base_path(folder, peft_config.base_model_name_or_path or "")
    kind = _PEFT_TASKS.get(str(getattr(peft_config, "task_type", None) or ""))
    if kind is None:
        kind = head_kind(_load_config(Path(base), trust_remote_code))
    return _check_task(folder, kind, task, [f"adapter task_type {peft_config.task_type}"]), peft_config, base


def model_kind(path: str | Path, *, task: Task = "auto", trust_remote_code: bool = False) -> Kind:
    """What the model in ``path`` does (causal, mlm, classification), read from its config only;
    a model that cannot do ``task`` raises ``LmforgeError``."""
    import lmforge.models  # noqa: F401  (registers the lmforge families with AutoConfig)

    folder = resolve_model_dir(path)
    if (folder / "adapter_config.json").is_file():
        return _adapter_kind(folder, task, trust_remote_code)[0]
    config = _load_config(folder, trust_remote_code)
    return _check_task(folder, head_kind(config), task, getattr(config, "architectures", None))


def _load_adapter(folder: Path, task: Task, trust_remote_code: bool) -> tuple[Any, Kind, Path]:
    from peft import PeftModel

    kind, _, base = _adapter_kind(folder, task, trust_remote_code)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if kind == "classification":
        base_config = _load_config(Path(base), trust_remote_code) if Path(base).is_dir() else None
        kwargs.update(_head_from_adapter(folder, base_config), ignore_mismatched_sizes=True)
    try:
        model, info = _auto_class(kind).from_pretrained(base, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise LmforgeError(f"{folder}: the adapter's base model {base!r} cannot be loaded: "
                           f"{str(e).strip().splitlines()[0]}") from None
    new_weights = set(info.get("missing_keys", [])) | {k for k, *_ in info.get("mismatched_keys", [])}
    uncovered = sorted(new_weights - _adapter_weight_names(folder))
    if uncovered:
        raise LmforgeError(f"{folder}: the base model {base!r} has no weights for {', '.join(uncovered)} and "
                           "the adapter does not hold them either (modules_to_save): the figures would come "
                           "from random weights")
    model = PeftModel.from_pretrained(model, str(folder))
    tokenizer_dir = folder if has_tokenizer(folder) else Path(base)
    return model, kind, tokenizer_dir


def load_for_eval(path: str | Path, *, task: Task = "auto", trust_remote_code: bool = False) -> LoadedModel:
    """Load the model in ``path`` (run folder, saved model or LoRA adapter) and its tokenizer.

    lmforge's families load from the classes registered in this process (no remote code runs);
    other custom-code models need ``trust_remote_code``.
    """
    import lmforge.models  # noqa: F401  (registers the lmforge families with the Auto classes)

    folder = resolve_model_dir(path)
    if (folder / "adapter_config.json").is_file():
        model, kind, tokenizer_dir = _load_adapter(folder, task, trust_remote_code)
    else:
        kind = model_kind(folder, task=task, trust_remote_code=trust_remote_code)
        try:
            model = _auto_class(kind).from_pretrained(folder, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as e:
            raise LmforgeError(f"{folder}: cannot load the model: {str(e).strip().splitlines()[0]}") from None
        tokenizer_dir = folder
    tokenizer = _load_tokenizer(tokenizer_dir, folder)
    if kind == "classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(folder=folder, model=model, tokenizer=tokenizer, kind=kind)


def _load_tokenizer(tokenizer_dir: Path, model_dir: Path) -> Any:

    try:
        tokenizer = auto_tokenizer(tokenizer_dir)
    except (OSError, ValueError, TypeError) as e:
        raise LmforgeError(f"{model_dir}: no tokenizer could be loaded from {tokenizer_dir} "
                           f"({str(e).strip().splitlines()[0]}); save the tokenizer with the model") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out; classification needs one
    return tokenizer


# --------------------------------------------------------------------------- evaluation


def evaluate_classification(loaded: LoadedModel, ds: Any, *, where: str, text_column: str,
                            text_pair_column: str | None, label_column: str, max_length: int | None,
                            batch_size: int, accelerator: Any = None) -> dict[str, float]:
    """A sequence classifier's metrics on labelled rows (from ``load_labelled``), the labels mapped
    to ids through the model's config (``id2label``)."""
    from lmforge.data.classification import ClassificationCollator, LabelSpec, encode_classification
    from lmforge.eval.classification import evaluate_classifier
    from lmforge.eval.lm import forward_params, model_context
    from lmforge.train.batches import eval_batches

    model, tokenizer = loaded.model, loaded.tokenizer
    spec = LabelSpec.from_config(model.config)
    length = max_length or model_context(model, tokenizer) or 512
    encoded = encode_classification(ds, tokenizer, spec, text_column=text_column, text_pair_column=text_pair_column,
                                    label_column=label_column, max_length=length, where=where)
    keep = [c for c in ("input_ids", "attention_mask", "token_type_ids", "labels") if c in encoded.column_names]
    encoded = encoded.select_columns(keep)
    names = forward_params(model) | {"labels"}
    collate = ClassificationCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                                     spec.problem_type)

    def collate_for_model(rows: list[dict]) -> dict:
        return {k: v for k, v in collate(rows).items() if k in names}

    ranks = {"process_index": accelerator.process_index, "num_processes": accelerator.num_processes} if accelerator else {}
    batches = eval_batches(encoded, batch_size, collate_for_model, **ranks)
    metrics = evaluate_classifier(model, batches, problem_type=spec.problem_type, accelerator=accelerator)
    return {**metrics, "rows": len(encoded), "max_length": length}


def _lm_texts(source: str, split: str, text_column: str) -> list[str]:
    from lmforge.data.sources import load_corpus

    ds = load_corpus(source, split, text_column=text_column)
    texts = [t for t in ds["text"] if t and t.strip()]
    if not texts:
        raise LmforgeError(f"{source} (split {split!r}): no text to evaluate on (every {text_column!r} is empty)")
    return texts


def _check_flags(stride: int | None, max_length: int | None, batch_size: int) -> None:
    """The checks that need no model, before anything is loaded."""
    if stride is not None and stride <= 0:
        raise LmforgeError(f"--stride must be a positive number of tokens, got {stride}")
    if max_length is not None and max_length < 2:
        raise LmforgeError(f"--max-length must be at least 2 tokens, got {max_length}")
    if stride is not None and max_length is not None and stride > max_length:
        raise LmforgeError(f"--stride {stride} is larger than --max-length {max_length}: the tokens between "
                           f"two windows would never be scored; use a stride of 1..{max_length}")
    if batch_size < 1:
        raise LmforgeError(f"--batch-size must be at least 1, got {batch_size}")


# --------------------------------------------------------------------------- output


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}"


def format_table(results: list[dict[str, Any]]) -> str:
    """A Markdown table with one column per model and one row per figure."""
    keys = [k for k in _ORDER if any(k in r for r in results)]
    keys += [k for r in results for k in r if k not in ("name", "path")]
    keys = list(dict.fromkeys(keys))
    headers = ["", *(r["name"] for r in results)]
    cells = [[k, *(_format(r.get(k)) for r in results)] for k in keys]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) if i == 0 else v.rjust(w)
                                 for i, (v, w) in enumerate(zip(values, widths, strict=True))) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ("-" if i == 0 else ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), sep, *(line(c) for c in cells)])


def _names(dirs: list[str]) -> list[str]:
    from lmforge.tokenizers.metrics import _names as short_names

    return short_names([Path(d).expanduser() for d in dirs])


def eval_command(
    model_dir: str,
    *,
    data: str,
    split: str = "test",
    task: Task = "auto",
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    mlm_probability: float = 0.15,
    seed: int = 0,
    compare: list[str] | None = None,
    output: Path | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> int:
    """Evaluate a model (and others with --compare) on a corpus and print the figures side by side.

    Causal LMs: strided sliding-window perplexity, bits per byte, next-token accuracy. Masked LMs:
    masked-token accuracy. Classifiers: accuracy, macro-F1, Matthews correlation (Pearson and
    Spearman for regression). MODEL_DIR is an lmforge run folder (its final/), a saved model
    (lmforge or stock transformers) or a LoRA adapter folder.

    Args:
        model_dir: the model folder.
        data: the evaluation corpus (built-in name, jsonl/csv/parquet file or split-aware folder, Hub id).
        split: which split of the corpus.
        task: lm (causal or masked LM), classification, or auto (from the model's head).
        text_column: the column holding the text.
        text_pair_column: classification: the column holding the second text of a pair.
        label_column: classification: the column holding the labels.
        max_length: tokens per window (LM) or per text (classification); default: the model's context.
        stride: causal LM: how far each window advances (default max_length: disjoint windows);
            smaller strides give every token more context and cost more forward passes.
        batch_size: windows, rows or texts per forward pass.
        mlm_probability: masked LM: share of tokens masked (fixed seed: same positions for every model).
        seed: masked LM: masking seed.
        compare: more model folders to evaluate on the same data, printed side by side.
        output: write the figures to this JSON file.
        trust_remote_code: allow models that need their own code (lmforge's load without it).
        progress: show progress bars.
    """
    from accelerate import Accelerator

    from lmforge.eval.lm import evaluate_lm_strided, evaluate_mlm
    from lmforge.train.distributed import check_launch

    _check_flags(stride, max_length, batch_size)
    dirs = [model_dir, *(compare or [])]
    # every folder, the task and the data are checked before any model is loaded
    kinds = [model_kind(d, task=task, trust_remote_code=trust_remote_code) for d in dirs]
    where = f"{data} (split {split!r})"
    texts = _lm_texts(data, split, text_column) if any(k != "classification" for k in kinds) else None
    labelled = None
    if "classification" in kinds:
        from lmforge.data.classification import load_labelled

        labelled = load_labelled(data, split, text_column=text_column, text_pair_column=text_pair_column,
                                 label_column=label_column)
    accelerator = Accelerator()
    check_launch(accelerator)
    main = accelerator.is_main_process
    results = []
    for name, d in zip(_names(dirs), dirs, strict=True):
        loaded = load_for_eval(d, task=task, trust_remote_code=trust_remote_code)
        loaded.model.to(accelerator.device)
        common = {"max_length": max_length, "batch_size": batch_size, "accelerator": accelerator}
        if loaded.kind == "classification":
            metrics = evaluate_classification(loaded, labelled, where=where, text_column=text_column,
                                              text_pair_column=text_pair_column, label_column=label_column, **common)
        elif loaded.kind == "causal":
            metrics = evaluate_lm_strided(loaded.model, loaded.tokenizer, texts, stride=stride, progress=progress,
                                          **common)
        else:
            metrics = evaluate_mlm(loaded.model, loaded.tokenizer, texts, mlm_probability=mlm_probability,
                                   seed=seed, progress=progress, **common)
        results.append({"name": name, "path": str(loaded.folder), "task": loaded.kind, **metrics})
        del loaded
    if main:
        print(f"\n{data} (split {split!r}):\n")
        print(format_table(results))
        if output is not None:
            path = Path(output).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            settings = {"task": task, "max_length": max_length, "stride": stride, "batch_size": batch_size,
                        "mlm_probability": mlm_probability, "seed": seed}
            path.write_text(json.dumps({"data": str(data), "split": split, "settings": settings,
                                        "models": results}, indent=2) + "\n", encoding="utf-8")
            print(f"\nwrote {path}")
    return 0
