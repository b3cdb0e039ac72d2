"""``lmforge eval MODEL --data SOURCE``: measure language models and classifiers on a corpus;
``lmforge eval MODEL --tasks TASK...``: benchmarks through lm-evaluation-harness."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from accelerate import Accelerator

from lmforge.config import Option
from lmforge.data.classification import load_labelled
from lmforge.data.sources import load_corpus
from lmforge.errors import LmforgeError
from lmforge.eval.harness import (
    HARNESS_RESULTS,
    harness_summary,
    resolve_tasks,
    run_harness,
    save_harness_results,
    task_figures,
    task_manager,
)
from lmforge.eval.model import AUTO_CLASSES, Task, evaluate_model, model_kind
from lmforge.runs import ModelFolder, check_launch, find_model, load_model, short_names

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
    data: Annotated[str | None, Option(input_path=True)] = None,
    tasks: list[str] | None = None,
    include_path: list[str] | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    record: bool = True,
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
    """Evaluate a model (and others with --compare) on a corpus or benchmark tasks, side by side.

    With --data: causal LMs get strided sliding-window perplexity, bits per byte, next-token
    accuracy; masked LMs masked-token accuracy; classifiers accuracy, macro-F1, Matthews correlation
    (Pearson and Spearman for regression). A model lmforge trained is read in windows as long as its
    training rows, so it gets the figure its run reported. With --tasks: lm-evaluation-harness
    tasks on a causal LM (pip install 'lmforge[harness]'), saved beside the model for its model card.
    MODEL is any folder lmforge wrote (a run, its final/, a quickstart folder), a saved model
    (lmforge or stock transformers) or a LoRA adapter. Examples:
    ``lmforge eval runs/quickstart --data shakespeare --split test``,
    ``lmforge eval runs/quickstart --tasks lmforge_rotten_tomatoes lmforge_shakespeare``

    Args:
        model: the model folder.
        data: the evaluation corpus (built-in name, jsonl/csv/parquet file or split-aware folder, Hub id).
        tasks: lm-evaluation-harness tasks instead of --data: names (the harness's, lmforge's own
            lmforge_rotten_tomatoes and lmforge_shakespeare, or tag lmforge for both) or task YAML files.
        include_path: --tasks: more folders of task YAML files to find task names in.
        num_fewshot: --tasks: examples in each prompt (default: each task's own, else 0).
        limit: --tasks: evaluate the first LIMIT examples of each task only (below 1: that share).
        record: --tasks: save the figures beside the model (harness_results.json), where
            lmforge push puts them into the model card's model-index.
        split: which split of the corpus.
        task: lm (causal or masked LM), classification, or auto (from the model's head).
        text_column: the column holding the text.
        text_pair_column: classification: the column holding the second text of a pair.
        label_column: classification: the column holding the labels.
        max_length: tokens per window (LM) or per text (classification); default: the run's
            training rows (data.block_size) for a model lmforge trained, else the model's context.
            --tasks: tokens per input (default: the harness's choice, the model's context).
        stride: causal LM: how far each window advances (default max_length: disjoint windows);
            smaller strides give every token more context and cost more forward passes.
        batch_size: windows, rows, texts or (--tasks) requests per forward pass.
        mlm_probability: masked LM: share of tokens masked (fixed seed: same positions for every model).
        seed: masked LM: masking seed.
        compare: more model folders to evaluate on the same data (or tasks), printed side by side.
        output_json: write the figures to this JSON file.
        trust_remote_code: allow models that need their own code (lmforge's load without it).
        progress: show progress bars.
    """
    _check_flags(stride, max_length, batch_size)
    _check_mode(data, tasks, include_path=include_path, num_fewshot=num_fewshot, limit=limit, stride=stride)
    paths = [model, *(compare or [])]
    # every folder, the task and the data are checked before any model is loaded
    folders = [find_model(p, what="MODEL") for p in paths]
    if tasks is not None:
        return _evaluate_tasks(paths, folders, tasks, include_path=include_path or [], num_fewshot=num_fewshot,
                               limit=limit, record=record, max_length=max_length, batch_size=batch_size,
                               output_json=output_json, trust_remote_code=trust_remote_code)
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
            settings = {"task": task, "max_length": max_length, "stride": stride, "batch_size": batch_size,
                        "mlm_probability": mlm_probability, "seed": seed}
            _write_json(output_json, {"data": str(data), "split": split, "settings": settings, "models": results})
    return 0


def _write_json(output_json: Path, content: dict[str, Any]) -> None:
    path = Path(output_json).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")


# ----------------------------------------------------------------------------------- --tasks


def _check_mode(data: str | None, tasks: list[str] | None, *, include_path: list[str] | None,
                num_fewshot: int | None, limit: float | None, stride: int | None) -> None:
    """--data and --tasks are two evaluations: exactly one is given, with the flags it takes."""
    if data is not None and tasks is not None:
        raise LmforgeError("--data and --tasks are two different evaluations (--data SOURCE: perplexity or "
                           "classification figures on a corpus; --tasks TASK...: lm-evaluation-harness "
                           "benchmarks); give one of them per run")
    if data is None and tasks is None:
        raise LmforgeError("nothing to evaluate on: give --data SOURCE (a corpus: perplexity, masked-token or "
                           "classification figures) or --tasks TASK... (lm-evaluation-harness benchmarks, e.g. "
                           "--tasks lmforge_rotten_tomatoes)")
    if tasks is None:
        given = [flag for flag, value in (("--include-path", include_path), ("--num-fewshot", num_fewshot),
                                          ("--limit", limit)) if value is not None]
        if given:
            raise LmforgeError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only to --tasks "
                               "(lm-evaluation-harness), not to --data")
        return
    if stride is not None:
        raise LmforgeError("--stride applies to --data only: the harness's rolling perplexity reads disjoint "
                           "windows of --max-length tokens")
    if num_fewshot is not None and num_fewshot < 0:
        raise LmforgeError(f"--num-fewshot must be 0 or more examples, got {num_fewshot}")
    if limit is not None and not (0 < limit < 1 or (limit >= 1 and float(limit).is_integer())):
        raise LmforgeError(f"--limit must be a whole number of examples, or a share of them between 0 and 1, "
                           f"got {limit:g}")


def _causal_only(folder: ModelFolder) -> None:
    kind = model_kind(folder)
    if kind != "causal":
        what = "a masked language model" if kind == "mlm" else "a sequence classifier"
        raise LmforgeError(f"{folder.path}: --tasks runs lm-evaluation-harness on causal language models; this is "
                           f"{what} (--data gives its figures on a corpus)")


def _evaluate_tasks(paths: list[str], folders: list[ModelFolder], tasks: list[str], *, include_path: list[str],
                    num_fewshot: int | None, limit: float | None, record: bool, max_length: int | None,
                    batch_size: int, output_json: Path | None, trust_remote_code: bool) -> int:
    """``lmforge eval MODEL --tasks ...``: every model through lm-evaluation-harness, one process."""
    for folder in folders:
        _causal_only(folder)
    if limit is not None and limit >= 1:
        limit = int(limit)  # a count of examples (below 1: a share)
    harness_tasks = resolve_tasks(tasks, include_path)
    manager = task_manager(harness_tasks)  # unknown names are refused here, before any model is loaded
    accelerator = Accelerator()
    check_launch(accelerator)
    if accelerator.num_processes > 1:
        raise LmforgeError("--tasks runs in one process (lm-evaluation-harness on a loaded model); launch "
                           "lmforge eval without accelerate launch")
    results = []
    for name, folder in zip(short_names(paths), folders, strict=True):
        loaded = load_model(folder, auto_class="AutoModelForCausalLM", trust_remote_code=trust_remote_code)
        if loaded.tokenizer is None:
            raise LmforgeError(f"{folder.path}: no tokenizer saved with the model; save the tokenizer it was "
                               "trained with into that folder")
        loaded.model.to(accelerator.device)
        raw = run_harness(loaded.model, loaded.tokenizer, harness_tasks, manager=manager, num_fewshot=num_fewshot,
                          limit=limit, batch_size=batch_size, max_length=max_length)
        figures = task_figures(raw, limit=limit)
        saved = save_harness_results(folder.path, figures) if record else None
        results.append({"name": name, "path": str(folder.path), "max_length": raw["lmforge_max_length"],
                        "saved": str(saved) if saved else None, "tasks": figures})
        del loaded
    print(f"\nlm-evaluation-harness: {', '.join(harness_tasks.names)}"
          + (f", first {limit:g} examples of each" if limit is not None else "") + "\n")
    print(format_table([{"name": r["name"], **harness_summary(r["tasks"])} for r in results]))
    for r in results:
        print(f"{r['name']}: inputs of up to {r['max_length']} tokens"
              + (f"; figures saved to {r['saved']} (lmforge push puts them into the model card)" if r["saved"]
                 else f"; not saved (--no-record), {HARNESS_RESULTS} unchanged"))
    if output_json is not None:
        settings = {"num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size, "max_length": max_length}
        _write_json(output_json, {"tasks": harness_tasks.names,
                                  "include_paths": [str(p) for p in harness_tasks.include_paths],
                                  "settings": settings, "models": results})
    return 0
