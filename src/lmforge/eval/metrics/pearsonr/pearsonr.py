"""Pearson correlation coefficient (lmforge's offline copy).

Same statistic as ``scipy.stats.pearsonr(...).statistic`` and the Hub's ``evaluate-metric/pearsonr``,
computed with numpy only (so no p-value). Load it by path or through
``lmforge.eval.classification.load_metric("pearsonr")``: no Hub access needed.

Undefined cases give nan: a constant input (like scipy, which also warns), a nan in the inputs
(like scipy), and fewer than 2 pairs (scipy raises ValueError there; nan lets an evaluation of a
tiny split report the other metrics).
"""

import datasets  # evaluate needs datasets imported first when a module is loaded by path
import evaluate
import numpy as np

_DESCRIPTION = """
The Pearson correlation coefficient measures the linear relationship between predictions and
references, from -1 (exact negative linear relationship) through 0 (none) to +1 (exact positive):
    r = sum((x - mean(x)) * (y - mean(y))) / sqrt(sum((x - mean(x))^2) * sum((y - mean(y))^2)).
It is nan when it is undefined: a constant input, a nan input, or fewer than 2 pairs.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): predicted values.
    references (`list` of `float`): ground-truth values.
    return_pvalue (`bool`, defaults to False): p-values need scipy (`scipy.stats.pearsonr`);
        True raises ValueError.
Returns:
    pearsonr (`float`): in [-1, 1], or nan when undefined.
Examples:
    >>> pearsonr = lmforge.eval.classification.load_metric("pearsonr")
    >>> pearsonr.compute(predictions=[10, 9, 2.5, 6, 4], references=[1, 2, 3, 4, 5])
    {'pearsonr': -0.7426106572325057}
"""

_CITATION = """
@article{pearson1895,
  title={Note on regression and inheritance in the case of two parents},
  author={Pearson, Karl},
  journal={Proceedings of the Royal Society of London},
  volume={58},
  pages={240--242},
  year={1895}
}
"""


def pearson(x, y) -> float:
    """Pearson's r of two 1-D arrays, computed like scipy (centred, scaled, then normalised)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"expected two 1-D arrays of the same length, got shapes {x.shape} and {y.shape}")
    if len(x) < 2 or np.isnan(x).any() or np.isnan(y).any():
        return float("nan")
    if (x == x[0]).all() or (y == y[0]).all():  # constant: the correlation is undefined
        return float("nan")
    xm, ym = x - x.mean(), y - y.mean()
    xm, ym = xm / np.abs(xm).max(), ym / np.abs(ym).max()  # scaling first avoids overflow in the norms
    r = np.dot(xm / np.linalg.norm(xm), ym / np.linalg.norm(ym))
    return float(np.clip(r, -1.0, 1.0))


class Pearsonr(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}),
            reference_urls=["https://docs.scipy.org/doc/scipy/reference/generated/scipy.stats.pearsonr.html"],
        )

    def _compute(self, predictions, references, return_pvalue=False):
        if return_pvalue:
            raise ValueError("lmforge's pearsonr computes no p-value (it uses numpy only); "
                             "use scipy.stats.pearsonr for one")
        return {"pearsonr": pearson(references, predictions)}
