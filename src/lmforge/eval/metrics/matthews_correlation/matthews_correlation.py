"""Matthews correlation coefficient (lmforge's offline copy).

Same results as ``sklearn.metrics.matthews_corrcoef`` (binary and multiclass) and the Hub's
``evaluate-metric/matthews_correlation``, computed with numpy only. Load it by path or through
``lmforge.eval.classification.load_metric("matthews_correlation")``: no Hub access needed.
"""

import datasets  # evaluate needs datasets imported first when a module is loaded by path
import evaluate
import numpy as np

_DESCRIPTION = """
The Matthews correlation coefficient (MCC) is the correlation between predicted and true classes,
from -1 (always wrong) through 0 (no better than chance) to +1 (always right). It stays
informative when the classes are very unbalanced. For K classes with confusion matrix C
(rows: references, columns: predictions), t = row sums, p = column sums, c = trace, s = total:
    MCC = (c * s - t . p) / sqrt((s^2 - p . p) * (s^2 - t . t)).
When the denominator is 0 (all references, or all predictions, in one class) MCC is 0.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): ground-truth class ids.
    sample_weight (`list` of `float`, optional): a weight per example.
Returns:
    matthews_correlation (`float`): in [-1, 1].
Examples:
    >>> mcc = lmforge.eval.classification.load_metric("matthews_correlation")
    >>> mcc.compute(references=[1, 3, 2, 0, 3, 2], predictions=[1, 2, 2, 0, 3, 3])
    {'matthews_correlation': 0.5384615384615384}
"""

_CITATION = """
@article{matthews1975comparison,
  title={Comparison of the predicted and observed secondary structure of T4 phage lysozyme},
  author={Matthews, Brian W},
  journal={Biochimica et Biophysica Acta (BBA)-Protein Structure},
  volume={405},
  number={2},
  pages={442--451},
  year={1975}
}
"""


def matthews_corrcoef(y_true, y_pred, sample_weight=None) -> float:
    """sklearn's ``matthews_corrcoef`` in numpy."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.ndim != 1 or y_true.shape != y_pred.shape:
        raise ValueError(f"expected two 1-D arrays of the same length, got shapes {y_true.shape} "
                         f"and {y_pred.shape} (multi-label inputs are not supported)")
    weights = (np.ones(len(y_true)) if sample_weight is None
               else np.asarray(sample_weight, dtype=np.float64))
    if weights.shape != y_true.shape:
        raise ValueError(f"sample_weight has {weights.size} values for {y_true.size} examples")
    classes, ids = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    k, n = len(classes), len(y_true)
    confusion = np.zeros((k, k), dtype=np.float64)  # (K, K): rows references, columns predictions
    np.add.at(confusion, (ids[:n], ids[n:]), weights)
    t_sum, p_sum = confusion.sum(axis=1), confusion.sum(axis=0)
    correct, total = np.trace(confusion), p_sum.sum()
    cov_tp = correct * total - np.dot(t_sum, p_sum)
    cov_pp = total**2 - np.dot(p_sum, p_sum)
    cov_tt = total**2 - np.dot(t_sum, t_sum)
    if cov_pp * cov_tt == 0:
        return 0.0
    return float(cov_tp / np.sqrt(cov_pp * cov_tt))


class MatthewsCorrelation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.matthews_corrcoef.html"],
        )

    def _compute(self, predictions, references, sample_weight=None):
        return {"matthews_correlation": matthews_corrcoef(references, predictions, sample_weight)}
