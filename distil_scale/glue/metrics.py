"""GLUE metrics as GLUE defines them, and the majority-class baseline beside every score.

CoLA: Matthews correlation. MRPC, QQP: F1 of the positive class and accuracy. STS-B: Pearson and
Spearman on the regression output. The rest: accuracy (MNLI matched, and mismatched as
``accuracy_mm``). Values are fractions (0.873), not percentages.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np

from .tasks import Task


def _corr(fn, preds: np.ndarray, labels: np.ndarray) -> float:
    # A constant prediction (the majority baseline on STS-B) has no correlation: report 0, as
    # scikit-learn's matthews_corrcoef does for a constant classifier, instead of NaN.
    if len(preds) < 2 or np.all(preds == preds[0]) or np.all(labels == labels[0]):
        return 0.0
    value = float(fn(preds, labels)[0])
    return 0.0 if math.isnan(value) else value


def compute(metric_names: Sequence[str], preds: Sequence, labels: Sequence) -> dict[str, float]:
    """``preds`` are class ids (classification) or floats (regression)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    p, y = np.asarray(preds), np.asarray(labels)
    out = {}
    for name in metric_names:
        if name in ("accuracy", "accuracy_mm"):
            out[name] = float(accuracy_score(y, p))
        elif name == "f1":
            out[name] = float(f1_score(y, p, pos_label=1, zero_division=0.0))
        elif name == "mcc":
            out[name] = float(matthews_corrcoef(y, p))
        elif name == "pearson":
            out[name] = _corr(pearsonr, p.astype(float), y.astype(float))
        elif name == "spearman":
            out[name] = _corr(spearmanr, p.astype(float), y.astype(float))
        else:
            raise KeyError(f"unknown metric {name}")
    return out


def split_metric_names(task: Task, split: str) -> list[str]:
    """Metric names measured on one report split (MNLI's mismatched dev gives accuracy_mm)."""
    if split == "dev_mm":
        return ["accuracy_mm"]
    return [m for m in task.metrics if m != "accuracy_mm"]


def majority_prediction(task: Task, train_labels: Sequence):
    """The most frequent training class (smallest id on a tie); the train mean for regression."""
    if task.is_regression:
        return float(np.mean(np.asarray(train_labels, dtype=float)))
    counts = Counter(int(v) for v in train_labels)
    return max(sorted(counts), key=lambda k: counts[k])


def majority_baseline(task: Task, train_labels: Sequence, split: str,
                      eval_labels: Sequence) -> dict[str, float]:
    pred = majority_prediction(task, train_labels)
    return compute(split_metric_names(task, split), [pred] * len(eval_labels), eval_labels)
