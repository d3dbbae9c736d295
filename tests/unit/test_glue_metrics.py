"""GLUE metrics checked against scikit-learn / scipy and hand-computed values."""
import math

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from distil_scale.glue import metrics as M
from distil_scale.glue.tasks import TASKS, get_task

Y = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1]
P = [1, 0, 0, 1, 1, 1, 0, 0, 1, 0]


def test_classification_metrics_match_sklearn_and_hand_values():
    out = M.compute(["accuracy", "f1", "mcc"], P, Y)
    assert out["accuracy"] == pytest.approx(accuracy_score(Y, P)) == pytest.approx(0.7)
    # TP 4, FP 1, FN 2, TN 3
    assert out["f1"] == pytest.approx(f1_score(Y, P)) == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))
    mcc = (4 * 3 - 1 * 2) / math.sqrt((4 + 1) * (4 + 2) * (3 + 1) * (3 + 2))
    assert out["mcc"] == pytest.approx(matthews_corrcoef(Y, P)) == pytest.approx(mcc)


def test_three_class_accuracy_and_mismatched_name():
    y, p = [0, 1, 2, 2, 1, 0], [0, 2, 2, 2, 1, 1]
    assert M.compute(["accuracy_mm"], p, y)["accuracy_mm"] == pytest.approx(accuracy_score(y, p))
    mnli = get_task("mnli")
    assert M.split_metric_names(mnli, "dev") == ["accuracy"]
    assert M.split_metric_names(mnli, "dev_mm") == ["accuracy_mm"]


def test_regression_metrics_match_scipy():
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 5, 50)
    p = y + rng.normal(0, 1, 50)
    out = M.compute(["pearson", "spearman"], p, y)
    assert out["pearson"] == pytest.approx(pearsonr(p, y)[0])
    assert out["spearman"] == pytest.approx(spearmanr(p, y)[0])
    # monotone but not linear: Spearman 1, Pearson below 1
    x = np.arange(1, 11, dtype=float)
    out = M.compute(["pearson", "spearman"], x ** 3, x)
    assert out["spearman"] == pytest.approx(1.0) and out["pearson"] < 0.99


def test_task_metric_table():
    assert TASKS["cola"].main_metric == "mcc"
    assert set(TASKS["mrpc"].metrics) == {"f1", "accuracy"} == set(TASKS["qqp"].metrics)
    assert set(TASKS["stsb"].metrics) == {"pearson", "spearman"} and TASKS["stsb"].num_labels == 1
    for t in ("sst2", "rte", "qnli", "wnli"):
        assert TASKS[t].metrics == ("accuracy",)
    assert TASKS["mnli"].metrics == ("accuracy", "accuracy_mm") and TASKS["mnli"].num_labels == 3


def test_majority_baseline():
    cola = get_task("cola")
    train = [1, 1, 1, 0]
    dev = [1, 0, 1, 1]
    b = M.majority_baseline(cola, train, "dev", dev)
    assert b == {"mcc": 0.0, "accuracy": 0.75}
    mrpc = get_task("mrpc")
    b = M.majority_baseline(mrpc, train, "dev", dev)
    assert b["f1"] == pytest.approx(f1_score(dev, [1] * 4)) and b["accuracy"] == 0.75
    # a tie goes to the smallest class id; minority-positive F1 is 0
    assert M.majority_prediction(mrpc, [0, 1]) == 0
    assert M.majority_baseline(mrpc, [0, 0, 1], "dev", dev)["f1"] == 0.0


def test_stsb_baseline_predicts_train_mean_and_scores_zero_correlation():
    stsb = get_task("stsb")
    assert M.majority_prediction(stsb, [1.0, 2.0, 6.0]) == pytest.approx(3.0)
    b = M.majority_baseline(stsb, [1.0, 2.0, 6.0], "dev", [0.5, 4.0, 2.0])
    assert b == {"spearman": 0.0, "pearson": 0.0}
