"""Accuracy: the fraction of predictions equal to their reference (lmforge's offline copy).

Same results as ``sklearn.metrics.accuracy_score`` and the Hub's ``evaluate-metric/accuracy``,
computed with numpy only. Load it by path (``evaluate.load(".../metrics/accuracy")``) or through
``lmforge.eval.classification.load_metric("accuracy")``: no Hub access needed.

Inputs are class ids, one per example, or for multi-label data one 0/1 row per example; a row
counts as correct only when every label matches (sklearn's subset accuracy).
"""

import datasets  # evaluate needs datasets imported first when a module is loaded by path
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among the examples:
    accuracy = (number of correct predictions) / (number of examples).
For multi-label inputs (one 0/1 row per example) an example is correct only when its whole row
matches the reference row (subset accuracy).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`, or `list` of `list` of `int` for multi-label): predicted labels.
    references (same shape as `predictions`): ground-truth labels.
    normalize (`bool`, defaults to True): return the fraction correct; False returns the number
        (the summed weight with `sample_weight`) of correct examples.
    sample_weight (`list` of `float`, optional): a weight per example.
Returns:
    accuracy (`float`): in [0, 1] with `normalize`, else a count.
Examples:
    >>> accuracy = lmforge.eval.classification.load_metric("accuracy")
    >>> accuracy.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1])
    {'accuracy': 0.75}
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


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[_SINGLE, _MULTI],  # evaluate picks the one the first example fits
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(f"predictions have shape {predictions.shape}, references {references.shape}")
        correct = predictions == references
        if correct.ndim == 2:  # multi-label: the whole row must match
            correct = correct.all(axis=1)
        weights = np.ones(len(correct)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if weights.shape != correct.shape:
            raise ValueError(f"sample_weight has {weights.size} values for {correct.size} examples")
        hits = float(np.dot(correct, weights))
        if not normalize:
            return {"accuracy": hits}
        if len(correct) == 0:
            return {"accuracy": float("nan")}
        return {"accuracy": hits / float(weights.sum())}
