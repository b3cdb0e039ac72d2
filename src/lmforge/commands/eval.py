"""``lmforge eval MODEL --data SOURCE``: measure language models and classifiers on a corpus."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from accelerate import Accelerator

from lmforge.config import Option
from lmforge.data.classification import load_labelled
from lmforge.data.sources import load_corpus
from lmforge.errors import LmforgeError
from lmforge.eval.model import AUTO_CLASSES, Task, evaluate_model, model_kind
from lmforge.runs import check_launch, find_model, load_model, short_names

# table order of the figures (others follow in the order they come)
_ORDER = ("task", "loss", "perplexity", "bits_per_byte", "next_token_accuracy", "masked_accuracy", "accuracy",
          "macro_f1", "micro_f1", "matthews_correlation", "pearson", "spearman", "mse", "tokens",
          "bytes", "masked_tokens", "max_length", "stride", "window")
_WINDOWS = {"run": "the run's data.block_size", "context": "the model's context", "given": "--max-length"}


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


def _lm_texts(source: str, split: str, text_column: str) -> list[str]:
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


def evaluate(
    model: str,
    *,
    data: Annotated[str, Option(input_path=True)],
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
    output_json: Path | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> int:
    """Evaluate a model (and others with --compare) on a corpus and print the figures side by side.

    Causal LMs: strided sliding-window perplexity, bits per byte, next-token accuracy. Masked LMs:
    masked-token accuracy. Classifiers: accuracy, macro-F1, Matthews correlation (Pearson and
    Spearman for regression). MODEL is any folder lmforge wrote (a run, its final/, a quickstart
    folder), a saved model (lmforge or stock transformers) or a LoRA adapter. A model lmforge
    trained is read in windows as long as its training rows, so it gets the figure its run
    reported. Example: ``lmforge eval runs/quickstart --data shakespeare --split test``

    Args:
        model: the model folder.
        data: the evaluation corpus (built-in name, jsonl/csv/parquet file or split-aware folder, Hub id).
        split: which split of the corpus.
        task: lm (causal or masked LM), classification, or auto (from the model's head).
        text_column: the column holding the text.
        text_pair_column: classification: the column holding the second text of a pair.
        label_column: classification: the column holding the labels.
        max_length: tokens per window (LM) or per text (classification); default: the run's
            training rows (data.block_size) for a model lmforge trained, else the model's context.
        stride: causal LM: how far each window advances (default max_length: disjoint windows);
            smaller strides give every token more context and cost more forward passes.
        batch_size: windows, rows or texts per forward pass.
        mlm_probability: masked LM: share of tokens masked (fixed seed: same positions for every model).
        seed: masked LM: masking seed.
        compare: more model folders to evaluate on the same data, printed side by side.
        output_json: write the figures to this JSON file.
        trust_remote_code: allow models that need their own code (lmforge's load without it).
        progress: show progress bars.
    """
    _check_flags(stride, max_length, batch_size)
    paths = [model, *(compare or [])]
    # every folder, the task and the data are checked before any model is loaded
    folders = [find_model(p, what="MODEL") for p in paths]
    kinds = [model_kind(f, task) for f in folders]
    where = f"{data} (split {split!r})"
    texts = _lm_texts(data, split, text_column) if any(k != "classification" for k in kinds) else None
    labelled = None
    if "classification" in kinds:
        labelled = load_labelled(data, split, text_column=text_column, text_pair_column=text_pair_column,
                                 label_column=label_column)
    accelerator = Accelerator()
    check_launch(accelerator)
    results = []
    for name, folder, kind in zip(short_names(paths), folders, kinds, strict=True):
        loaded = load_model(folder, auto_class=AUTO_CLASSES[kind], trust_remote_code=trust_remote_code)
        loaded.model.to(accelerator.device)
        metrics = evaluate_model(loaded, kind, texts=texts, labelled=labelled, where=where, max_length=max_length,
                                 stride=stride, batch_size=batch_size, mlm_probability=mlm_probability, seed=seed,
                                 text_column=text_column, text_pair_column=text_pair_column,
                                 label_column=label_column, accelerator=accelerator, progress=progress)
        results.append({"name": name, "path": str(folder.path), "task": kind, **metrics})
        del loaded
    if accelerator.is_main_process:
        print(f"\n{data} (split {split!r}):\n")
        print(format_table(results))
        windows = {r["name"]: r.get("window") for r in results if r.get("window")}
        for name, window in windows.items():
            r = next(r for r in results if r["name"] == name)
            print(f"{name}: windows of {r['max_length']} tokens ({_WINDOWS[window]}), stride {r.get('stride', r['max_length'])}")
        if output_json is not None:
            path = Path(output_json).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            settings = {"task": task, "max_length": max_length, "stride": stride, "batch_size": batch_size,
                        "mlm_probability": mlm_probability, "seed": seed}
            path.write_text(json.dumps({"data": str(data), "split": split, "settings": settings,
                                        "models": results}, indent=2) + "\n", encoding="utf-8")
            print(f"\nwrote {path}")
    return 0
