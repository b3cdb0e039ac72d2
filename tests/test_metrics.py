"""lmforge's metric modules for ``evaluate`` equal scikit-learn and scipy, and evaluating a
classifier gives the same figures in one process and gathered from two.

- Each module (accuracy, f1, matthews_correlation, pearsonr, spearmanr) is loaded by path,
  offline, imports numpy only, and matches sklearn/scipy on random inputs over many seeds:
  binary, multiclass, multi-label, sample weights, absent classes, ties, constant inputs.
- ``classification_metrics`` per problem type equals the sklearn/scipy figures.
- ``evaluate_classifier`` on a tiny BERT: its loss equals the model's own loss for each problem
  type, its metrics equal those of the argmax predictions, filler rows are ignored, the
  train/eval mode is restored.
- One 2-process gloo launch: the gathered figures for 9 rows (processes holding 5 and 4 rows,
  one with a filler row) equal the 1-process figures, for all three problem types.
"""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn import metrics as skm

from lmforge.data.batches import eval_batches
from lmforge.data.classification import ClassificationCollator
from lmforge.errors import LmforgeError
from lmforge.eval.classification import (
    METRICS,
    METRICS_DIR,
    classification_metrics,
    evaluate_classifier,
    load_metric,
)
from lmforge.presets import find_preset
from tests.torch_threads import single_thread  # noqa: F401  (fixture)
from tests.train_fixtures import launch_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SEEDS = range(15)


@pytest.fixture(scope="module")
def metric():
    """name -> loaded module (loading once per test module keeps the tests fast)."""
    return {name: load_metric(name) for name in METRICS}


def _sk(fn, *args, **kwargs):
    with warnings.catch_warnings():  # undefined-metric and constant-input warnings
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _same(got, want, tol=1e-12):
    if isinstance(want, float) and math.isnan(want):
        return isinstance(got, float) and math.isnan(got)
    return got == pytest.approx(want, abs=tol, rel=tol, nan_ok=True)


# --------------------------------------------------------------------------- the modules themselves


@pytest.mark.parametrize("name", METRICS)
def test_module_loads_by_path_offline_and_imports_numpy_only(name):
    """evaluate.load(<folder>) finds <folder>/<folder>.py; the module needs no sklearn/scipy."""
    import datasets  # noqa: F401
    import evaluate

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    module = evaluate.load(str(METRICS_DIR / name), keep_in_memory=True)
    assert module.name == name
    tree = ast.parse((METRICS_DIR / name / f"{name}.py").read_text())
    imported = [a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
    imported += [node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert imported == ["datasets", "evaluate", "numpy"]  # datasets first: evaluate needs it


def test_load_metric_refuses_unknown_names():
    with pytest.raises(LmforgeError, match="unknown metric 'bleu'.*accuracy, f1"):
        load_metric("bleu")


def test_documented_examples(metric):
    assert metric["accuracy"].compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1]) == {"accuracy": 0.75}
    f1 = metric["f1"].compute(predictions=[0, 2, 1, 0, 0, 1], references=[0, 1, 2, 0, 1, 2], average="macro")
    assert f1["f1"] == pytest.approx(0.26666666666666666)
    mcc = metric["matthews_correlation"].compute(references=[1, 3, 2, 0, 3, 2], predictions=[1, 2, 2, 0, 3, 3])
    assert mcc["matthews_correlation"] == pytest.approx(0.5384615384615384)
    r = metric["pearsonr"].compute(predictions=[10, 9, 2.5, 6, 4], references=[1, 2, 3, 4, 5])
    assert r["pearsonr"] == pytest.approx(-0.7426106572325057)
    rho = metric["spearmanr"].compute(predictions=[10, 9, 2.5, 6, 4], references=[1, 2, 3, 4, 5])
    assert rho["spearmanr"] == pytest.approx(-0.7)


def _labels(rng, n, k, shape=None):
    return rng.integers(0, k, size=shape or n)


def test_accuracy_equals_sklearn(metric):
    acc = metric["accuracy"]
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        n, k = int(rng.integers(1, 60)), int(rng.integers(2, 6))
        y, p = _labels(rng, n, k), _labels(rng, n, k)
        w = rng.random(n)
        assert _same(acc.compute(predictions=p, references=y)["accuracy"], skm.accuracy_score(y, p))
        assert _same(acc.compute(predictions=p, references=y, sample_weight=w)["accuracy"],
                     skm.accuracy_score(y, p, sample_weight=w))
        assert _same(acc.compute(predictions=p, references=y, normalize=False)["accuracy"],
                     skm.accuracy_score(y, p, normalize=False))
        # multi-label 0/1 rows: subset accuracy (mostly right, so that some rows match exactly)
        y2 = _labels(rng, n, 2, (n, 3))
        p2 = np.where(rng.random((n, 3)) < 0.2, 1 - y2, y2)
        assert _same(acc.compute(predictions=p2, references=y2)["accuracy"], skm.accuracy_score(y2, p2))
        assert _same(acc.compute(predictions=p2.tolist(), references=y2.tolist(), sample_weight=w)["accuracy"],
                     skm.accuracy_score(y2, p2, sample_weight=w))


def test_f1_equals_sklearn_single_label(metric):
    f1 = metric["f1"]
    for seed in range(8):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(1, 80))
        for k in (2, 3, 5):
            y, p = _labels(rng, n, k), _labels(rng, n, k)
            if seed % 3 == 0:
                p[p == 0] = 1  # class 0 never predicted: its precision is undefined
            w = rng.random(n)
            cases = [(average, None) for average in ("binary", "micro", "macro", "weighted", None)]
            cases += [("macro", w), ("weighted", w), ("binary", w)]
            for average, weights in cases:
                try:
                    want = _sk(skm.f1_score, y, p, average=average, sample_weight=weights)
                except ValueError:  # binary with more classes, or without class 1
                    with pytest.raises(ValueError):
                        f1.compute(predictions=p, references=y, average=average)
                    continue
                got = f1.compute(predictions=p, references=y, average=average, sample_weight=weights)["f1"]
                assert got == pytest.approx(np.asarray(want).tolist(), abs=1e-12), (seed, k, average)
            zero_division = (0.0, 1.0, "nan")[seed % 3]
            want = _sk(skm.f1_score, y, p, average="macro",
                       zero_division=np.nan if zero_division == "nan" else zero_division)
            got = f1.compute(predictions=p, references=y, average="macro", zero_division=zero_division)["f1"]
            assert _same(got, float(want)), (seed, k, zero_division)
            labels = [1, 0] if k == 2 else [2, 0, 7]  # a subset, in another order, with an absent class
            for average in ("macro", "micro", None):
                want = _sk(skm.f1_score, y, p, labels=labels, average=average)
                got = f1.compute(predictions=p, references=y, labels=labels, average=average)["f1"]
                assert got == pytest.approx(np.asarray(want).tolist(), abs=1e-12, nan_ok=True), (seed, labels, average)


def test_f1_binary_positive_class_and_degenerate_cases(metric):
    f1 = metric["f1"]
    y, p = [0, 1, 1, 0, 1], [0, 1, 0, 0, 1]
    for pos_label in (0, 1):
        assert _same(f1.compute(predictions=p, references=y, pos_label=pos_label)["f1"],
                     skm.f1_score(y, p, pos_label=pos_label))
    # one class present: binary F1 of an absent positive class is undefined -> 0, like sklearn
    assert f1.compute(predictions=[0, 0], references=[0, 0])["f1"] == _sk(skm.f1_score, [0, 0], [0, 0]) == 0.0
    with pytest.raises(ValueError, match="multiclass but average='binary'"):
        f1.compute(predictions=[0, 1, 2], references=[0, 1, 1])
    with pytest.raises(ValueError, match="pos_label=5 is not a valid label"):
        f1.compute(predictions=[0, 1], references=[1, 0], pos_label=5)
    with pytest.raises(ValueError, match="average has to be one of"):
        f1.compute(predictions=[0, 1], references=[1, 0], average="median")


def test_f1_equals_sklearn_multi_label(metric):
    """2-D 0/1 rows (sklearn's multilabel-indicator targets), with all-zero rows and columns."""
    f1 = metric["f1"]
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        n, k = int(rng.integers(1, 50)), int(rng.integers(2, 6))
        y, p = _labels(rng, n, 2, (n, k)), _labels(rng, n, 2, (n, k))
        y[:, 0] = 0  # a label never present
        p[: n // 2] = 0  # rows with nothing predicted
        w = rng.random(n)
        for average in ("micro", "macro", "weighted", "samples", None):
            for weights in (None, w):
                want = _sk(skm.f1_score, y, p, average=average, sample_weight=weights)
                got = f1.compute(predictions=p.tolist(), references=y.tolist(), average=average,
                                 sample_weight=weights)["f1"]
                assert got == pytest.approx(np.asarray(want).tolist(), abs=1e-12), (seed, average)
        with pytest.raises(ValueError, match="multilabel-indicator but average='binary'"):
            f1.compute(predictions=p, references=y)


def test_matthews_correlation_equals_sklearn(metric):
    mcc = metric["matthews_correlation"]
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        n, k = int(rng.integers(1, 80)), int(rng.integers(2, 6))
        y = _labels(rng, n, k)
        p = np.where(rng.random(n) < 0.6, y, _labels(rng, n, k))  # correlated
        w = rng.random(n)
        for weights in (None, w):
            got = mcc.compute(predictions=p, references=y, sample_weight=weights)["matthews_correlation"]
            assert _same(got, float(skm.matthews_corrcoef(y, p, sample_weight=weights))), (seed, k)
    # undefined (all references, or all predictions, in one class): 0, like sklearn
    for y, p in (([1, 1, 1], [0, 1, 0]), ([0, 1, 2], [2, 2, 2]), ([3], [3])):
        assert mcc.compute(predictions=p, references=y)["matthews_correlation"] == _sk(skm.matthews_corrcoef, y, p) == 0.0


def test_correlations_equal_scipy(metric):
    """Random floats (some huge, some tiny), integers with many ties, and exact relationships."""
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        n = int(rng.integers(2, 60))
        scale = 10.0 ** rng.integers(-6, 7)
        x = rng.normal(size=n) * scale
        y = 0.5 * x + rng.normal(size=n) * scale
        ties_x, ties_y = rng.integers(0, 4, n).astype(float), rng.integers(0, 3, n).astype(float)
        for a, b in ((x, y), (ties_x, ties_y), (x, x**3), (x, -2 * x + 1)):
            for name, ref in (("pearsonr", stats.pearsonr), ("spearmanr", stats.spearmanr)):
                got = metric[name].compute(predictions=b, references=a)[name]
                want = float(_sk(ref, a, b).statistic)
                assert _same(got, want, tol=1e-10), (seed, name)


def test_correlations_of_undefined_inputs_are_nan(metric):
    """Constant inputs and nan inputs give nan, as in scipy; fewer than 2 pairs give nan (scipy's
    pearsonr raises there). Ties alone are not undefined."""
    for name, ref in (("pearsonr", stats.pearsonr), ("spearmanr", stats.spearmanr)):
        for a, b in (([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]), ([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]),
                     ([1.0, np.nan, 2.0], [1.0, 2.0, 3.0])):
            assert math.isnan(metric[name].compute(predictions=b, references=a)[name])
            assert math.isnan(_sk(ref, a, b).statistic)
        assert math.isnan(metric[name].compute(predictions=[1.0], references=[2.0])[name])
        with pytest.raises(ValueError, match="no p-value"):
            metric[name].compute(predictions=[1.0, 2.0], references=[2.0, 1.0], return_pvalue=True)
    ties = [1.0, 1.0, 2.0, 2.0]
    assert metric["spearmanr"].compute(predictions=ties, references=[1, 2, 3, 4])["spearmanr"] == pytest.approx(
        stats.spearmanr(ties, [1, 2, 3, 4]).statistic)


# --------------------------------------------------------------------------- classification_metrics


def test_classification_metrics_per_problem_type():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 3, 40), rng.integers(0, 3, 40)
    got = classification_metrics("single_label_classification", p, y)
    assert got == pytest.approx({"accuracy": skm.accuracy_score(y, p),
                                 "macro_f1": skm.f1_score(y, p, average="macro"),
                                 "matthews_correlation": skm.matthews_corrcoef(y, p)})
    y2, p2 = rng.integers(0, 2, (40, 4)), rng.integers(0, 2, (40, 4))
    got = classification_metrics("multi_label_classification", p2.astype(float), y2.astype(float))
    assert got == pytest.approx({"accuracy": skm.accuracy_score(y2, p2),
                                 "micro_f1": skm.f1_score(y2, p2, average="micro"),
                                 "macro_f1": _sk(skm.f1_score, y2, p2, average="macro")})
    a, b = rng.normal(size=40), rng.normal(size=40)
    got = classification_metrics("regression", b[:, None], a)  # (N, 1) model outputs are fine
    assert got == pytest.approx({"pearson": stats.pearsonr(a, b).statistic,
                                 "spearman": stats.spearmanr(a, b).statistic,
                                 "mse": skm.mean_squared_error(a, b)})
    constant = classification_metrics("regression", np.zeros(5), np.arange(5.0))
    assert math.isnan(constant["pearson"]) and math.isnan(constant["spearman"]) and constant["mse"] == 6.0
    with pytest.raises(LmforgeError, match="problem_type 'ranking' is not one of"):
        classification_metrics("ranking", p, y)
    with pytest.raises(LmforgeError, match="no rows"):
        classification_metrics("single_label_classification", np.zeros(0), np.zeros(0))
    with pytest.raises(LmforgeError, match="shape"):
        classification_metrics("single_label_classification", p[:3], y)


# --------------------------------------------------------------------------- evaluate_classifier


def _tiny_bert(num_labels: int, problem_type: str, seed: int = 0):
    from lmforge.models import LmforgeBertConfig, LmforgeBertForSequenceClassification

    torch.manual_seed(seed)
    config = LmforgeBertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=32, num_labels=num_labels,
                               problem_type=problem_type)
    return LmforgeBertForSequenceClassification(config)


def _rows(problem_type: str, n: int, num_labels: int, seed: int = 0) -> list[dict]:
    """Encoded rows of random lengths (with token types), labels of the problem type."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        length = int(rng.integers(3, 12))
        row = {"input_ids": rng.integers(5, 50, length).tolist(), "attention_mask": [1] * length,
               "token_type_ids": [0] * (length // 2) + [1] * (length - length // 2)}
        if problem_type == "single_label_classification":
            row["labels"] = int(rng.integers(0, num_labels))
        elif problem_type == "multi_label_classification":
            row["labels"] = rng.integers(0, 2, num_labels).astype(float).tolist()
        else:
            row["labels"] = float(rng.normal())
        rows.append(row)
    return rows


CASES = [("single_label_classification", 3), ("multi_label_classification", 4), ("regression", 1)]


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("problem_type,num_labels", CASES)
def test_evaluate_classifier_matches_the_models_loss_and_the_metrics(problem_type, num_labels):
    model = _tiny_bert(num_labels, problem_type)
    model.train()
    rows = _rows(problem_type, 11, num_labels)
    collate = ClassificationCollator(0, problem_type)
    # batches of 4, 4, 3, plus a filler row (labels all -100) as eval_batches makes them
    batches = [collate(rows[i:i + 4]) for i in range(0, len(rows), 4)]
    filler = collate(rows[:1])
    filler["labels"] = torch.full_like(filler["labels"], -100)
    got = evaluate_classifier(model, [*batches, filler], problem_type=problem_type)
    assert model.training  # restored

    model.eval()
    with torch.no_grad():
        everything = collate(rows)
        out = model(**everything)  # one batch: the model's own loss (problem_type from its config)
    assert got["rows"] == len(rows)
    assert got["loss"] == pytest.approx(out.loss.item(), rel=1e-5)
    logits, labels = out.logits, everything["labels"]
    if problem_type == "single_label_classification":
        preds = logits.argmax(-1).numpy()
    elif problem_type == "multi_label_classification":
        preds = (torch.sigmoid(logits) > 0.5).float().numpy()
    else:
        preds = logits[:, 0].numpy()
    want = classification_metrics(problem_type, preds, labels.numpy())
    assert {k: got[k] for k in want} == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.usefixtures("single_thread")
def test_evaluate_classifier_refuses_unlabelled_or_empty_data():
    model = _tiny_bert(2, "single_label_classification")
    rows = [{k: v for k, v in r.items() if k != "labels"} for r in _rows("single_label_classification", 2, 2)]
    with pytest.raises(LmforgeError, match="no labels"):
        evaluate_classifier(model, [ClassificationCollator(0, "single_label_classification")(rows)],
                            problem_type="single_label_classification")
    with pytest.raises(LmforgeError, match="no labelled rows"):
        evaluate_classifier(model, [], problem_type="single_label_classification")
    with pytest.raises(LmforgeError, match="problem_type 'binary' is not one of"):
        evaluate_classifier(model, [], problem_type="binary")


_GATHER = """
import json, sys
import torch
from accelerate import Accelerator
from lmforge.data.classification import ClassificationCollator
from lmforge.eval.classification import evaluate_classifier
from lmforge.data.batches import eval_batches
from tests.test_metrics import CASES, _rows, _tiny_bert

torch.set_num_threads(1)
accelerator = Accelerator()
rank, world = accelerator.process_index, accelerator.num_processes
report = {"rank": rank, "world": world, "results": {}, "my_rows": {}}
for problem_type, num_labels in CASES:
    model = _tiny_bert(num_labels, problem_type)
    collate = ClassificationCollator(0, problem_type)
    batches = list(eval_batches(_rows(problem_type, int(sys.argv[1]), num_labels), 2, collate,
                                process_index=rank, num_processes=world))
    report["my_rows"][problem_type] = [int((b["labels"].reshape(len(b["labels"]), -1) != -100).any(-1).sum())
                                       for b in batches]
    report["results"][problem_type] = evaluate_classifier(model, batches, problem_type=problem_type,
                                                          accelerator=accelerator)
with open(f"{sys.argv[2]}/report-{rank}.json", "w") as f:  # a file each: both ranks share one stdout
    json.dump(report, f)
"""


@pytest.mark.usefixtures("single_thread")
def test_two_process_gather_equals_one_process(tmp_path):
    """9 rows, 2 rows per process: global batches of 4, 4, 1 -> rank 0 holds 5 rows, rank 1 holds
    4 and a filler row. The gathered figures equal one process evaluating all 9 rows."""
    n = 9
    script = tmp_path / "gather.py"
    script.write_text(_GATHER)
    env = launch_env(ROOT, ACCELERATE_USE_CPU="1")
    cmd = [str(BIN / "accelerate"), "launch", "--main_process_port", "0", "--config_file",
           str(find_preset("accelerate", "cpu_multiprocess")), str(script), str(n), str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"report-{rank}.json").read_text()) for rank in range(2)]
    assert [(r["rank"], r["world"]) for r in reports] == [(0, 2), (1, 2)]
    for problem_type, num_labels in CASES:
        assert reports[0]["my_rows"][problem_type] == [2, 2, 1]
        assert reports[1]["my_rows"][problem_type] == [2, 2, 0]  # the last batch is a filler row
        model = _tiny_bert(num_labels, problem_type)
        collate = ClassificationCollator(0, problem_type)
        alone = evaluate_classifier(model, eval_batches(_rows(problem_type, n, num_labels), 4, collate),
                                    problem_type=problem_type)
        assert alone["rows"] == n
        for report in reports:  # every process returns the same figures
            assert report["results"][problem_type] == pytest.approx(alone, rel=1e-5, abs=1e-6), problem_type
