"""Spearman rank correlation coefficient (lmforge's offline copy).

Same statistic as ``scipy.stats.spearmanr(...).statistic`` and the Hub's
``evaluate-metric/spearmanr``, computed with numpy only (so no p-value). Load it by path or through
``lmforge.eval.classification.load_metric("spearmanr")``: no Hub access needed.

Tied values share the mean of the ranks they span (scipy's ``rankdata(method="average")``).
Undefined cases give nan, as in scipy: a constant input, a nan in the inputs, fewer than 2 pairs.
"""

import datasets  # evaluate needs datasets imported first when a module is loaded by path
import evaluate
import numpy as np

_DESCRIPTION = """
The Spearman rank correlation coefficient is the Pearson correlation of the ranks of predictions
and references: +1 when one increases exactly when the other does (monotonic, not necessarily
linear), -1 for an exact decreasing relationship, 0 for none. Ties share their average rank.
It is nan when it is undefined: a constant input, a nan input, or fewer than 2 pairs.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): predicted values.
    references (`list` of `float`): ground-truth values.
    return_pvalue (`bool`, defaults to False): p-values need scipy (`scipy.stats.spearmanr`);
        True raises ValueError.
Returns:
    spearmanr (`float`): in [-1, 1], or nan when undefined.
Examples:
    >>> spearmanr = lmforge.eval.classification.load_metric("spearmanr")
    >>> spearmanr.compute(predictions=[10, 9, 2.5, 6, 4], references=[1, 2, 3, 4, 5])
    {'spearmanr': -0.7}
"""

_CITATION = """
@article{spearman1904,
  title={The proof and measurement of association between two things},
  author={Spearman, Charles},
  journal={The American Journal of Psychology},
  volume={15},
  number={1},
  pages={72--101},
  year={1904}
}
"""


def rankdata(a) -> np.ndarray:
    """Ranks 1..n of a 1-D array; tied values get the mean of the ranks they span."""
    a = np.asarray(a)
    order = np.argsort(a, kind="mergesort")
    inverse = np.empty(len(a), dtype=np.intp)
    inverse[order] = np.arange(len(a))
    ordered = a[order]
    new_value = np.r_[True, ordered[1:] != ordered[:-1]]  # first element of each run of ties
    group = new_value.cumsum()[inverse]  # 1-based tie group of each element
    bounds = np.r_[np.flatnonzero(new_value), len(a)]  # group g spans sorted positions [bounds[g-1], bounds[g])
    return 0.5 * (bounds[group] + bounds[group - 1] + 1)


def spearman(x, y) -> float:
    """Spearman's rho of two 1-D arrays: Pearson's r of their average ranks."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"expected two 1-D arrays of the same length, got shapes {x.shape} and {y.shape}")
    if len(x) < 2 or np.isnan(x).any() or np.isnan(y).any():
        return float("nan")
    rx, ry = rankdata(x), rankdata(y)
    if (rx == rx[0]).all() or (ry == ry[0]).all():  # constant: the correlation is undefined
        return float("nan")
    rx, ry = rx - rx.mean(), ry - ry.mean()
    r = np.dot(rx, ry) / np.sqrt(np.dot(rx, rx) * np.dot(ry, ry))
    return float(np.clip(r, -1.0, 1.0))


class Spearmanr(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}),
            reference_urls=["https://docs.scipy.org/doc/scipy/reference/generated/scipy.stats.spearmanr.html"],
        )

    def _compute(self, predictions, references, return_pvalue=False):
        if return_pvalue:
            raise ValueError("lmforge's spearmanr computes no p-value (it uses numpy only); "
                             "use scipy.stats.spearmanr for one")
        return {"spearmanr": spearman(references, predictions)}
