"""Classification and regression metrics through ``evaluate``, and evaluating a classifier.

``evaluate.load("accuracy")`` fetches the metric script from the Hugging Face Hub. lmforge ships
its own modules (numpy only, checked against scikit-learn and scipy in the tests) under
``lmforge/eval/metrics/<name>/<name>.py`` and loads them by path, so evaluation works offline:

- single-label classification: accuracy, macro-F1, Matthews correlation;
- multi-label classification (0/1 rows): accuracy (the whole row right), micro-F1, macro-F1;
- regression: Pearson and Spearman correlation (nan when undefined, e.g. constant predictions),
  mean squared error.

``evaluate_classifier`` runs a model over batches from ``ClassificationCollator`` (through
``lmforge.data.batches.eval_batches`` for several processes), gathers every process's
predictions with ``accelerator.gather_for_metrics`` and computes the metrics on all of them, so
the figures do not depend on the number of processes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lmforge.data.classification import PROBLEM_TYPES
from lmforge.errors import LmforgeError

if TYPE_CHECKING:
    import evaluate

METRICS_DIR = Path(__file__).resolve().parent / "metrics"
METRICS = ("accuracy", "f1", "matthews_correlation", "pearsonr", "spearmanr")
IGNORE_INDEX = -100  # eval_batches' filler rows carry only this label


def load_metric(name: str) -> evaluate.EvaluationModule:
    """One of lmforge's metric modules (``METRICS``), loaded by path: no Hub access.

    The module keeps its inputs in memory (no cache files, no locks): lmforge gathers
    predictions across processes itself and computes on one complete set.
    """
    import datasets  # noqa: F401  (evaluate needs datasets imported first)
    import evaluate  # lazy: it imports transformers.pipelines (~0.7 s); only these metrics need it

    if name not in METRICS:
        raise LmforgeError(f"unknown metric {name!r}; lmforge ships {', '.join(METRICS)}")
    return evaluate.load(str(METRICS_DIR / name), keep_in_memory=True)


def _compute(name: str, predictions: Any, references: Any, **kwargs: Any) -> float:
    """One figure from a metric module (each returns ``{name: value}``)."""
    result = load_metric(name).compute(predictions=predictions, references=references, **kwargs)
    return float(result[name])


def classification_metrics(problem_type: str, predictions: np.ndarray,
                           references: np.ndarray) -> dict[str, float]:
    """The metrics of a problem type, computed with lmforge's ``evaluate`` modules.

    Args:
        problem_type: ``single_label_classification``, ``multi_label_classification`` or
            ``regression``.
        predictions: class ids (N,), 0/1 rows (N, L), or values (N,) (an (N, 1) array is
            flattened).
        references: the same shape as ``predictions``.

    Returns:
        single-label: ``accuracy``, ``macro_f1``, ``matthews_correlation``; multi-label:
        ``accuracy`` (exact match of the whole row), ``micro_f1``, ``macro_f1``; regression:
        ``pearson``, ``spearman`` (nan when undefined), ``mse``.
    """
    if problem_type not in PROBLEM_TYPES:
        raise LmforgeError(f"problem_type {problem_type!r} is not one of {', '.join(PROBLEM_TYPES)}")
    predictions, references = np.asarray(predictions), np.asarray(references)
    if problem_type == "regression":
        predictions, references = predictions.reshape(len(predictions), -1), references.reshape(len(references), -1)
        if predictions.shape[1:] != (1,) or references.shape[1:] != (1,):
            raise LmforgeError(f"regression needs one value per row, got predictions {predictions.shape} "
                               f"and references {references.shape}")
        predictions, references = predictions[:, 0], references[:, 0]
    if predictions.shape != references.shape:
        raise LmforgeError(f"predictions have shape {predictions.shape}, references {references.shape}")
    if len(predictions) == 0:
        raise LmforgeError("no rows to compute metrics on (empty evaluation data?)")
    if problem_type == "single_label_classification":
        preds, refs = predictions.astype(np.int64).tolist(), references.astype(np.int64).tolist()
        return {"accuracy": _compute("accuracy", preds, refs),
                "macro_f1": _compute("f1", preds, refs, average="macro"),
                "matthews_correlation": _compute("matthews_correlation", preds, refs)}
    if problem_type == "multi_label_classification":
        if predictions.ndim != 2:
            raise LmforgeError(f"multi-label metrics need 0/1 rows (N, labels), got shape {predictions.shape}")
        preds, refs = predictions.astype(np.int64).tolist(), references.astype(np.int64).tolist()
        return {"accuracy": _compute("accuracy", preds, refs),
                "micro_f1": _compute("f1", preds, refs, average="micro"),
                "macro_f1": _compute("f1", preds, refs, average="macro")}
    preds, refs = predictions.astype(np.float64), references.astype(np.float64)
    return {"pearson": _compute("pearsonr", preds.tolist(), refs.tolist()),
            "spearman": _compute("spearmanr", preds.tolist(), refs.tolist()),
            "mse": float(np.mean((preds - refs) ** 2))}


def _rows_of_batch(logits: torch.Tensor, labels: torch.Tensor, problem_type: str) -> torch.Tensor:
    """One float64 row per real example: [1 (real), loss, reference(s), prediction(s)].

    Filler rows (all labels -100) are dropped. The leading 1 tells real rows from the zero rows
    that padding across processes adds.
    """
    logits = logits.float()
    if problem_type == "single_label_classification":
        keep = labels != IGNORE_INDEX
        logits, labels = logits[keep], labels[keep]
        loss = F.cross_entropy(logits, labels, reduction="none")  # (n,)
        refs, preds = labels[:, None], logits.argmax(-1)[:, None]
    elif problem_type == "multi_label_classification":
        keep = (labels != IGNORE_INDEX).any(-1)
        logits, labels = logits[keep], labels[keep].float()
        loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(-1)  # (n,)
        refs, preds = labels, (logits > 0).to(labels.dtype)  # sigmoid > 0.5
    else:
        labels = labels.reshape(len(labels))
        keep = labels != IGNORE_INDEX
        values, labels = logits.reshape(len(logits), -1)[keep], labels[keep].float()
        if values.size(-1) != 1:
            raise LmforgeError(f"regression needs a model with one output (num_labels=1), got {values.size(-1)}")
        loss = (values[:, 0] - labels) ** 2
        refs, preds = labels[:, None], values
    ones = torch.ones_like(loss)
    return torch.cat([ones[:, None], loss[:, None], refs.to(loss.dtype), preds.to(loss.dtype)], dim=1).double()


@torch.no_grad()
def evaluate_classifier(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], *, problem_type: str,
                        accelerator: Any = None) -> dict[str, float]:
    """Loss and ``classification_metrics`` of a sequence-classification model.

    Args:
        model: a ``...ForSequenceClassification`` model (possibly wrapped by accelerate).
        batches: dicts with ``input_ids``, ``attention_mask`` (``token_type_ids``) and
            ``labels`` from ``ClassificationCollator``. Rows whose labels are all -100 (the filler
            rows ``eval_batches`` gives a process without rows in the last global batch) are
            ignored.
        problem_type: ``single_label_classification`` (cross-entropy, argmax),
            ``multi_label_classification`` (BCE with logits averaged over labels, logit > 0) or
            ``regression`` (squared error).
        accelerator: with several processes, every process's rows are gathered
            (``gather_for_metrics``) before computing; every process returns the same figures.

    Returns:
        ``loss`` (mean over rows), the metrics of ``classification_metrics`` and ``rows`` (the
        number of rows evaluated, all processes together).
    """
    if problem_type not in PROBLEM_TYPES:
        raise LmforgeError(f"problem_type {problem_type!r} is not one of {', '.join(PROBLEM_TYPES)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts = []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        if "labels" not in batch:
            raise LmforgeError("evaluation batches carry no labels (unlabelled data cannot be scored)")
        labels = batch.pop("labels")
        parts.append(_rows_of_batch(model(**batch).logits, labels, problem_type))
    model.train(was_training)
    width = parts[0].size(1) if parts else 0
    rows = torch.cat(parts) if parts else torch.zeros(0, width, dtype=torch.float64, device=device)
    if accelerator is not None and accelerator.num_processes > 1:
        # processes can hold different numbers of rows (the last global batch): pad with zero
        # rows (first column 0) to a common length, gather, then drop the padding
        rows = accelerator.pad_across_processes(rows, dim=0, pad_index=0)
        rows = accelerator.gather_for_metrics(rows)
        rows = rows[rows[:, 0] == 1]
    rows = rows.cpu().numpy()
    if len(rows) == 0:
        raise LmforgeError("evaluation saw no labelled rows (empty evaluation data?)")
    k = (rows.shape[1] - 2) // 2  # 1 column each for class ids / values, L for multi-label rows
    refs, preds = rows[:, 2:2 + k], rows[:, 2 + k:]
    if problem_type != "multi_label_classification":
        refs, preds = refs[:, 0], preds[:, 0]
    out = {"loss": float(rows[:, 1].mean())}
    out.update(classification_metrics(problem_type, preds, refs))
    out["rows"] = int(len(rows))
    return out
