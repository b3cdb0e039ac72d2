"""F1 score, the harmonic mean of precision and recall (lmforge's offline copy).

Same results as ``sklearn.metrics.f1_score`` (binary, micro, macro, weighted, samples, per-class)
and the Hub's ``evaluate-metric/f1``, computed with numpy only. Load it by path or through
``lmforge.eval.classification.load_metric("f1")``: no Hub access needed.

Inputs are class ids, one per example, or for multi-label data one 0/1 row per example (each
column is a label, as sklearn's "multilabel-indicator" targets).
"""

import datasets  # evaluate needs datasets imported first when a module is loaded by path
import evaluate
import numpy as np

_DESCRIPTION = """
The F1 score is the harmonic mean of precision and recall:
    F1 = 2 * TP / (2 * TP + FP + FN).
A class that is neither predicted nor present has an undefined F1; it counts as `zero_division`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`, or `list` of `list` of `int` for multi-label): predicted labels.
    references (same shape as `predictions`): ground-truth labels.
    labels (`list` of `int`, optional): the classes to score (and their order for
        `average=None`); defaults to every class in references or predictions (every column for
        multi-label inputs).
    pos_label (`int`, defaults to 1): the positive class when `average="binary"`.
    average (`str` or None, defaults to "binary"):
        - "binary": the F1 of `pos_label` (only for data with at most two classes);
        - "micro": from the total true positives, false negatives and false positives;
        - "macro": the unweighted mean of the per-class F1;
        - "weighted": the per-class F1 weighted by each class's number of references;
        - "samples": the mean of the per-example F1 (multi-label only);
        - None: the per-class F1 as a list.
    sample_weight (`list` of `float`, optional): a weight per example.
    zero_division (0, 1, "nan" or "warn", defaults to "warn"): the value of an undefined F1;
        "warn" counts as 0 (sklearn warns; this module does not).
Returns:
    f1 (`float`, or `list` of `float` with `average=None`).
Examples:
    >>> f1 = lmforge.eval.classification.load_metric("f1")
    >>> f1.compute(predictions=[0, 2, 1, 0, 0, 1], references=[0, 1, 2, 0, 1, 2], average="macro")
    {'f1': 0.26666666666666666}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B. and
          Grisel, O. and Blondel, M. and Prettenhofer, P. and Weiss, R. and Dubourg, V. and
          Vanderplas, J. and Passos, A. and Cournapeau, D. and Brucher, M. and Perrot, M. and
          Duchesnay, E.},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""

_SINGLE = datasets.Features({"predictions": datasets.Value("int64"),
                             "references": datasets.Value("int64")})
_MULTI = datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64")),
                            "references": datasets.Sequence(datasets.Value("int64"))})
_AVERAGES = ("binary", "micro", "macro", "weighted", "samples", None)


def _divide(num: np.ndarray, den: np.ndarray, zero_division: float) -> np.ndarray:
    """num / den elementwise, ``zero_division`` where den == 0."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, zero_division, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _nanaverage(values: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Mean of the non-nan values (weighted; all-zero weights count as no weights)."""
    keep = ~np.isnan(values)
    if not keep.any():
        return float("nan")
    if weights is not None and np.asarray(weights)[keep].sum() != 0:
        return float(np.average(values[keep], weights=np.asarray(weights)[keep]))
    return float(values[keep].mean())


def _counts(y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray,
            weights: np.ndarray, multilabel: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true positives, predicted, true) per label, weighted: each (L,)."""
    if multilabel:  # (N, C) 0/1 matrices; labels are column indices
        t, p = y_true[:, labels] != 0, y_pred[:, labels] != 0
        w = weights[:, None]
        return (w * (t & p)).sum(0), (w * p).sum(0), (w * t).sum(0)
    t = y_true[:, None] == labels[None, :]  # (N, L) one-hot over the scored labels
    p = y_pred[:, None] == labels[None, :]
    w = weights[:, None]
    return (w * (t & p)).sum(0), (w * p).sum(0), (w * t).sum(0)


def f1_score(y_true, y_pred, *, labels=None, pos_label=1, average="binary", sample_weight=None,
             zero_division="warn"):
    """sklearn's ``f1_score`` in numpy (see the module's description for the arguments)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"predictions have shape {y_pred.shape}, references {y_true.shape}")
    if average not in _AVERAGES:
        raise ValueError(f"average has to be one of {_AVERAGES}, got {average!r}")
    zero = {"warn": 0.0, "nan": float("nan")}.get(zero_division, zero_division)
    if zero not in (0.0, 1.0) and not np.isnan(zero):
        raise ValueError(f"zero_division has to be 0, 1, 'nan' or 'warn', got {zero_division!r}")
    multilabel = y_true.ndim == 2
    if y_true.ndim not in (1, 2):
        raise ValueError(f"expected 1-D class ids or 2-D multi-label rows, got {y_true.ndim}-D inputs")
    if multilabel and not np.isin(np.concatenate([y_true.ravel(), y_pred.ravel()]), [0, 1]).all():
        raise ValueError("multi-label inputs must be 0/1 indicator rows")
    weights = (np.ones(len(y_true)) if sample_weight is None
               else np.asarray(sample_weight, dtype=np.float64))
    if weights.shape != (len(y_true),):
        raise ValueError(f"sample_weight has {weights.size} values for {len(y_true)} examples")

    present = np.arange(y_true.shape[1]) if multilabel else np.union1d(y_true, y_pred)
    if average == "binary":
        if multilabel or len(present) > 2:
            kind = "multilabel-indicator" if multilabel else "multiclass"
            raise ValueError(f"Target is {kind} but average='binary'; choose micro, macro, "
                             "weighted or None")
        if pos_label not in present and len(present) >= 2:
            raise ValueError(f"pos_label={pos_label} is not a valid label; it should be one of {present.tolist()}")
        labels = [pos_label]
    if average == "samples":
        if not multilabel:
            raise ValueError("average='samples' is only for multi-label inputs")
        cols = np.arange(y_true.shape[1]) if labels is None else np.asarray(labels)
        t, p = y_true[:, cols] != 0, y_pred[:, cols] != 0
        tp, pred, true = (t & p).sum(1), p.sum(1), t.sum(1)  # per example
        return _nanaverage(_divide(2 * tp, pred + true, zero), weights)
    labels = present if labels is None else np.asarray(labels)
    if multilabel and labels.size and (labels.min() < 0 or labels.max() >= y_true.shape[1]):
        raise ValueError(f"labels {labels.tolist()} are not column indices of the {y_true.shape[1]}-label inputs")

    tp, pred, true = _counts(y_true, y_pred, labels, weights, multilabel)
    if average == "micro":
        tp, pred, true = tp.sum(keepdims=True), pred.sum(keepdims=True), true.sum(keepdims=True)
    scores = _divide(2 * tp, pred + true, zero)  # (L,) per class, or (1,) for micro
    if average is None:
        return scores.tolist()
    return _nanaverage(scores, true if average == "weighted" else None)


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[_SINGLE, _MULTI],  # evaluate picks the one the first example fits
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary",
                 sample_weight=None, zero_division="warn"):
        score = f1_score(references, predictions, labels=labels, pos_label=pos_label, average=average,
                         sample_weight=sample_weight, zero_division=zero_division)
        return {"f1": score}
