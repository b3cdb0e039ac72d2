"""Benchmarks through lm-evaluation-harness (``lm-eval``, the extra ``lmforge[harness]``), on a
model already loaded by lmforge (``lmforge.runs.load_model``: lmforge's families, stock models,
LoRA adapters on their base).

    tasks = resolve_tasks(["lmforge_rotten_tomatoes", "my/task.yaml"])   names and include paths
    manager = task_manager(tasks)          lm-eval's TaskManager; unknown names refused (near matches)
    results = run_harness(model, tokenizer, tasks, manager=manager, limit=100)
    task_figures(results)                  {task: {"metrics": {...}, "num_fewshot": ..., ...}}
    save_harness_results(folder, figures)  <folder>/harness_results.json, read by the model card

A task is a name (the harness's built-ins, lmforge's own tasks in ``lmforge.eval.tasks``, or any
task under an include path) or the path of a task YAML file, whose folder goes on the include path
and whose ``task:`` (or ``group:``) names it. Everything about the tasks is checked before a model
is loaded: the harness's 14,000 built-in task files are indexed (seconds) only when a name is not
found among lmforge's and the given ones.

The model runs through the harness's own ``HFLM`` wrapper (``pretrained=`` the loaded model), so
the figures are those of ``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True``
on the same folder. ``continuation_logprobs`` is lmforge's own scoring of (context, continuation)
pairs, the reference the harness's log-likelihoods are tested against.

Only the ``lm_eval`` import is optional: without it ``import_harness`` raises an ``LmforgeError``
that says what to install.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.metadata
import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.nn import functional as F

from lmforge.data.pipeline import separator_id
from lmforge.errors import LmforgeError
from lmforge.eval.lm import forward_params, model_context
from lmforge.eval.tasks import TASKS_DIR

HARNESS_RESULTS = "harness_results.json"  # beside the model: the figures its model card shows
INSTALL_HINT = "pip install 'lmforge[harness]'"
_NEAR_MATCHES = 5
_NOT_FIGURES = ("alias", "sample_len")  # lm-eval's per-task entries that are no metric


def import_harness() -> Any:
    """The ``lm_eval`` module, or an ``LmforgeError`` saying how to install it."""
    try:
        return importlib.import_module("lm_eval")
    except ImportError as e:
        raise LmforgeError(f"--tasks runs lm-evaluation-harness, which is not installed ({e}); "
                           f"install it with: {INSTALL_HINT}") from None


@contextlib.contextmanager
def _quiet_harness() -> Iterator[None]:
    """lm-eval logs a warning per task and per setting it takes as given (a model object passed
    in, metadata, few-shot overrides); keep errors only while it runs."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ----------------------------------------------------------------------------------- tasks


@dataclass
class HarnessTasks:
    """Task names (in the order given) and the folders the harness indexes for them: lmforge's own
    tasks first, then each ``--include-path`` and the folder of each task YAML given by path."""

    names: list[str]
    include_paths: list[Path] = field(default_factory=lambda: [TASKS_DIR])


class _NamesOnly(yaml.SafeLoader):
    """Reads a task YAML without running it: ``!function`` tags are kept as their text."""


_NamesOnly.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_scalar(node))


def task_file_name(path: Path) -> str:
    """The name a task YAML file defines (its ``task:``, or ``group:`` for a group), read without
    importing the functions it names."""
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_NamesOnly)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise LmforgeError(f"--tasks {path}: not a readable task YAML file ({type(e).__name__}: "
                           f"{str(e).splitlines()[0]})") from None
    name = config.get("task") or config.get("group") if isinstance(config, dict) else None
    if not isinstance(name, str) or not name:
        raise LmforgeError(f"--tasks {path}: the file names no task (a top-level 'task: NAME', or 'group: NAME' "
                           "for a group); see lm-evaluation-harness's docs/new_task_guide.md")
    return name


def _is_task_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or "/" in spec or "\\" in spec


def resolve_tasks(tasks: Sequence[str], include_paths: Sequence[str | Path] = ()) -> HarnessTasks:
    """The task names and include paths of ``--tasks`` (names, comma-separated names, or YAML
    files) and ``--include-path`` (folders of task YAML files), checked on disk."""
    folders = [TASKS_DIR]
    for given in include_paths:
        folder = Path(given).expanduser()
        if not folder.is_dir():
            raise LmforgeError(f"--include-path {given}: no such folder (give a folder of task YAML files)")
        folders.append(folder.resolve())
    names = []
    for spec in (part.strip() for given in tasks for part in str(given).split(",")):
        if not spec:
            continue
        if _is_task_file(spec):
            path = Path(spec).expanduser()
            if not path.is_file():
                raise LmforgeError(f"--tasks {spec}: no such task file (a task is a name, e.g. "
                                   "lmforge_rotten_tomatoes, or the path of a task YAML file)")
            if path.suffix != ".yaml":
                raise LmforgeError(f"--tasks {spec}: lm-evaluation-harness reads task files named *.yaml only "
                                   f"(its index skips others); rename it to {path.with_suffix('.yaml').name}")
            names.append(task_file_name(path))
            folders.append(path.resolve().parent)
        else:
            names.append(spec)
    if not names:
        raise LmforgeError("--tasks: no task given (names such as lmforge_rotten_tomatoes, or task YAML files)")
    return HarnessTasks(list(dict.fromkeys(names)), list(dict.fromkeys(folders)))


def task_manager(tasks: HarnessTasks) -> Any:
    """lm-eval's ``TaskManager`` that knows every name of ``tasks``: over the include paths alone
    when they hold them all, else with the harness's built-in tasks too. A name found nowhere is
    refused with the closest known names."""
    import_harness()
    from lm_eval.tasks import TaskManager

    with _quiet_harness():
        manager = TaskManager(include_path=[str(p) for p in tasks.include_paths], include_defaults=False)
        if not set(tasks.names) <= set(manager.all_tasks):
            manager = TaskManager(include_path=[str(p) for p in tasks.include_paths])
    known = set(manager.all_tasks)
    unknown = [name for name in tasks.names if name not in known]
    if unknown:
        lines = []
        for name in unknown:
            near = difflib.get_close_matches(name, manager.all_tasks, n=_NEAR_MATCHES, cutoff=0.6)
            lines.append(f"{name!r}" + (f" (near: {', '.join(near)})" if near else ""))
        raise LmforgeError(f"--tasks: unknown task{'s' if len(unknown) > 1 else ''} {'; '.join(lines)}. "
                           f"lmforge's own: {', '.join(lmforge_tasks())}; `lm_eval ls tasks` lists the "
                           f"{len(known):,} names known here; a task YAML file can be given by its path")
    return manager


def lmforge_tasks() -> list[str]:
    """The names of the tasks that ship with lmforge (``lmforge.eval.tasks``)."""
    return [task_file_name(p) for p in sorted(TASKS_DIR.glob("*.yaml"))]


# ----------------------------------------------------------------------------------- running


def run_harness(model: Any, tokenizer: Any, tasks: HarnessTasks, *, manager: Any = None,
                num_fewshot: int | None = None, limit: float | None = None, batch_size: int = 8,
                max_length: int | None = None, log_samples: bool = False) -> dict[str, Any]:
    """Run ``tasks`` on a loaded causal LM through lm-eval's ``simple_evaluate`` and its ``HFLM``
    (which seeds Python's, NumPy's and torch's global generators, as the harness's command line does).

    Args:
        model: a causal LM (a peft model for an adapter), on the device to run on.
        tokenizer: its tokenizer.
        tasks: from ``resolve_tasks``.
        manager: from ``task_manager`` (default: built here).
        num_fewshot: examples in each prompt (default: each task's own, else 0).
        limit: evaluate only the first ``limit`` examples of each task (below 1: that share).
        batch_size: requests (rolling: windows) per forward pass.
        max_length: tokens per input (rolling: per window); default the harness's own choice
            (``n_positions``/``max_position_embeddings``, else the tokenizer's limit, else 2048).
        log_samples: keep each example's requests and responses (``results["samples"]``).

    Returns:
        lm-eval's results dict (``results``, ``configs``, ``n-shot``, ``n-samples``, ``samples``
        with ``log_samples``...) and ``lmforge_max_length``, the tokens per input the harness used.
    """
    lm_eval = import_harness()
    from lm_eval.models.huggingface import HFLM

    manager = manager or task_manager(tasks)
    with _quiet_harness():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                  max_length=max_length)
        results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks.names), task_manager=manager,
                                          num_fewshot=num_fewshot, limit=limit, log_samples=log_samples)
    results["lmforge_max_length"] = lm.max_length
    return results


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def task_figures(results: dict[str, Any], *, limit: float | None = None) -> dict[str, dict[str, Any]]:
    """Per task (and group) of lm-eval ``results``: its ``metrics`` (``acc``, ``acc_stderr``,
    ``bits_per_byte``...; a filter other than ``none`` is kept in the name, ``exact_match,strict``),
    ``num_fewshot``, the ``split`` scored, ``samples`` (examples evaluated, of ``samples_total``),
    ``limit``, ``higher_is_better`` and the task ``version``."""
    out = {}
    for task, values in results["results"].items():
        metrics = {}
        for key, value in values.items():
            metric, _, kept = key.partition(",")
            number = _number(value)
            if number is not None and metric not in _NOT_FIGURES:
                metrics[metric if kept in ("", "none") else f"{metric},{kept}"] = number
        config = results.get("configs", {}).get(task, {})
        counts = results.get("n-samples", {}).get(task, {})
        out[task] = {"metrics": metrics, "num_fewshot": results.get("n-shot", {}).get(task),
                     "split": config.get("test_split") or config.get("validation_split"),
                     "samples": counts.get("effective"), "samples_total": counts.get("original"),
                     "limit": limit, "higher_is_better": results.get("higher_is_better", {}).get(task, {}),
                     "version": results.get("versions", {}).get(task)}
    return out


# ----------------------------------------------------------------------------------- saved figures


def read_harness_results(folder: str | Path) -> dict[str, dict[str, Any]]:
    """The harness figures saved beside the model in ``folder`` (task -> ``task_figures`` entry);
    empty when there are none."""
    path = Path(folder) / HARNESS_RESULTS
    if not path.is_file():
        return {}
    try:
        tasks = json.loads(path.read_text(encoding="utf-8")).get("tasks", {})
    except (ValueError, AttributeError) as e:
        raise LmforgeError(f"{path}: not a harness results file written by lmforge eval --tasks ({e}); "
                           "delete it or run the evaluation again") from None
    return tasks if isinstance(tasks, dict) else {}


def _harness_version() -> str | None:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return None


def save_harness_results(folder: str | Path, figures: dict[str, dict[str, Any]]) -> Path:
    """Merge ``figures`` (``task_figures``) into ``<folder>/harness_results.json``: a task
    evaluated again replaces its entry, the others stay. ``lmforge push`` puts them into the
    model card's model-index."""
    path = Path(folder) / HARNESS_RESULTS
    tasks = {**read_harness_results(folder), **figures}
    text = json.dumps({"lm_eval_version": _harness_version(), "tasks": tasks}, indent=2) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------- reference


def _move_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """A context's trailing whitespace moved to the start of the continuation: a byte-level BPE
    writes a word's leading space into the word's token (" positive" is one token)."""
    head = context.rstrip()
    return head, context[len(head):] + continuation


@torch.no_grad()
def continuation_logprobs(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], *,
                          max_length: int | None = None) -> list[float]:
    """lmforge's own scoring of ``(context, continuation)`` pairs: the sum of the log-probabilities
    (nats) of the continuation's tokens given the context, one plain forward pass per pair.

    The tokens are the tokenizer's, without special tokens added (as lmforge's data pipeline
    encodes documents). As in lm-evaluation-harness, the context's trailing whitespace is moved to
    the continuation, the pair is encoded as one string, and the continuation's tokens are those
    after the context's own; an empty context is the document separator (EOS). An input longer
    than ``max_length`` tokens (default: the model's context) keeps its last ``max_length``.
    """
    max_length = max_length or model_context(model, tokenizer) or 2048
    device = next(model.parameters()).device
    extra = {"use_cache": False} if "use_cache" in forward_params(model) else {}

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    was_training = model.training
    model.eval()
    scores = []
    for context, continuation in pairs:
        context, continuation = _move_trailing_space(context, continuation)
        if context:
            context_ids = encode(context)
            continuation_ids = encode(context + continuation)[len(context_ids):]
        else:
            context_ids, continuation_ids = [separator_id(tokenizer)], encode(continuation)
        if not continuation_ids or len(continuation_ids) > max_length:
            raise LmforgeError(f"continuation {continuation!r}: {len(continuation_ids)} tokens; it must have "
                               f"1..{max_length} (the window)")
        ids = (context_ids + continuation_ids)[-(max_length + 1):]
        inputs = torch.tensor(ids[:-1], device=device)[None]  # (1, T)
        logits = model(input_ids=inputs, **extra).logits[0, -len(continuation_ids):].float()  # (C, V)
        targets = torch.tensor(continuation_ids, device=device)  # (C,)
        scores.append(float(F.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum()))
    model.train(was_training)
    return scores


def harness_summary(figures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One flat row of a model's figures for ``format_table``: ``TASK METRIC`` -> value (standard
    errors left out), ``TASK n-shot`` and ``TASK samples``."""
    row: dict[str, Any] = {}
    for task, entry in figures.items():
        for metric, value in entry["metrics"].items():
            if not re.search(r"_stderr(,|$)", metric):
                row[f"{task} {metric}"] = value
        if entry.get("num_fewshot") is not None:
            row[f"{task} n-shot"] = int(entry["num_fewshot"])
        if entry.get("samples") is not None:
            row[f"{task} samples"] = int(entry["samples"])
    return row
