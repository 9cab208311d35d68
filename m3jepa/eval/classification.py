"""Classification as image->label retrieval: nearest class latent, accuracy, macro P/R/F1, confusion."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from m3jepa.knn import classify_by_nearest  # the nearest class; m3jepa.load uses it too

log = logging.getLogger(__name__)


@dataclass
class ClassificationResult:
    """Scores in percent (like R@k); `confusion[t, p]` counts queries of class t predicted as p.

    Macro averages run over the classes that occur as a true or a predicted class (scikit-learn's
    default label set); a class never predicted has precision 0, one never true has recall 0, and F1
    is 0 when precision + recall is 0 (scikit-learn's `zero_division=0`).
    """

    classes: list[str]
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    precision: np.ndarray  # (K,) percent
    recall: np.ndarray  # (K,) percent
    f1: np.ndarray  # (K,) percent
    support: np.ndarray  # (K,) int64: queries whose true class is k
    predicted: np.ndarray  # (K,) int64: queries predicted as k
    confusion: np.ndarray  # (K, K) int64, rows = true class, columns = predicted class
    averaged: np.ndarray  # (K,) bool: the classes the macro averages run over

    @property
    def n_queries(self) -> int:
        return int(self.support.sum())

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types: headline scores, then per-class scores and the confusion matrix."""
        per_class = {
            c: {
                "support": int(self.support[k]),
                "predicted": int(self.predicted[k]),
                "precision": float(self.precision[k]),
                "recall": float(self.recall[k]),
                "f1": float(self.f1[k]),
            }
            for k, c in enumerate(self.classes)
        }
        return {
            "accuracy": self.accuracy,
            "macro_precision": self.macro_precision,
            "macro_recall": self.macro_recall,
            "macro_f1": self.macro_f1,
            "n_queries": self.n_queries,
            "classes": list(self.classes),
            "per_class": per_class,
            "confusion": self.confusion.tolist(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClassificationResult:
        """Inverse of to_json (reports are rendered from metrics.json alone)."""
        classes = list(data["classes"])
        per = [data["per_class"][c] for c in classes]
        col = lambda key, dtype: np.array([p[key] for p in per], dtype=dtype)  # noqa: E731
        support, predicted = col("support", np.int64), col("predicted", np.int64)
        return cls(
            classes=classes,
            accuracy=data["accuracy"],
            macro_precision=data["macro_precision"],
            macro_recall=data["macro_recall"],
            macro_f1=data["macro_f1"],
            precision=col("precision", np.float64),
            recall=col("recall", np.float64),
            f1=col("f1", np.float64),
            support=support,
            predicted=predicted,
            confusion=np.asarray(data["confusion"], dtype=np.int64).reshape(len(classes), len(classes)),
            averaged=(support > 0) | (predicted > 0),
        )


def confusion_matrix(pred_class: np.ndarray, true_class: np.ndarray, n_classes: int) -> np.ndarray:
    """(K, K) int64 counts, rows = true class, columns = predicted class."""
    out = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(out, (true_class, pred_class), 1)
    return out


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # 0 where the denominator is 0: no prediction (precision) or no true example (recall)
    return np.divide(num, den, out=np.zeros(len(num), dtype=np.float64), where=den > 0)


def classification_metrics(
    pred_class: np.ndarray, true_class: np.ndarray, classes: Sequence[str]
) -> ClassificationResult:
    """Accuracy, macro precision / recall / F1 (percent), per-class counts and the confusion matrix.

    `pred_class` and `true_class` are (Q,) indices into `classes`.
    """
    pred, true = np.asarray(pred_class), np.asarray(true_class)
    k = len(classes)
    if pred.shape != true.shape or pred.ndim != 1 or len(pred) == 0:
        raise ValueError(
            f"pred_class and true_class must be equal non-empty 1-D arrays: {pred.shape}, {true.shape}"
        )
    for name, arr in (("pred_class", pred), ("true_class", true)):
        if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() >= k:
            raise ValueError(
                f"{name} must hold integer class indices in [0, {k}), "
                f"got {arr.dtype} {arr.min()}..{arr.max()}"
            )
    conf = confusion_matrix(pred, true, k)  # (K, K)
    correct = np.diag(conf).astype(np.float64)  # (K,)
    support, predicted = conf.sum(axis=1), conf.sum(axis=0)  # (K,) each
    precision, recall = _ratio(correct, predicted), _ratio(correct, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    averaged = (support > 0) | (predicted > 0)
    return ClassificationResult(
        classes=list(classes),
        accuracy=100.0 * float(correct.sum()) / len(pred),
        macro_precision=100.0 * float(precision[averaged].mean()),
        macro_recall=100.0 * float(recall[averaged].mean()),
        macro_f1=100.0 * float(f1[averaged].mean()),
        precision=100.0 * precision,
        recall=100.0 * recall,
        f1=100.0 * f1,
        support=support,
        predicted=predicted,
        confusion=conf,
        averaged=averaged,
    )


def classify_groups(
    queries: np.ndarray,
    class_latents: np.ndarray,
    query_groups: Sequence[Any],
    class_groups: Sequence[Any],
) -> ClassificationResult:
    """Classify image queries (Q, d) against one latent per class (K, d), named by their groups.

    This is image->label retrieval scored as classification: the gallery groups are the class names
    (one row each), a query's group is its true class. Classes are ordered as `class_groups`.
    """
    class_names = [str(g) for g in class_groups]
    if len(set(class_names)) != len(class_names):
        raise ValueError("class_groups repeat a class: the gallery must hold one latent per class")
    index = {c: i for i, c in enumerate(class_names)}
    unknown = sorted({str(g) for g in query_groups} - set(index))
    if unknown:
        raise ValueError(
            f"{len(unknown)} query classes have no class latent (e.g. {unknown[0]!r}); "
            "build the gallery from the label store of the same dataset"
        )
    true = np.asarray([index[str(g)] for g in query_groups], dtype=np.int64)  # (Q,)
    pred = classify_by_nearest(queries, class_latents)  # (Q,)
    return classification_metrics(pred, true, class_names)


def markdown_table(result: ClassificationResult, display_names: Mapping[str, str] | None = None) -> str:
    """Markdown: the headline scores, then one row per class with support, predictions and P/R/F1."""
    names = display_names or {}
    lines = [
        f"accuracy {result.accuracy:.2f} · macro precision {result.macro_precision:.2f} · "
        f"macro recall {result.macro_recall:.2f} · macro F1 {result.macro_f1:.2f} · "
        f"{result.n_queries} queries",
        "",
        "| class | support | predicted | precision | recall | F1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k, c in enumerate(result.classes):
        lines.append(
            f"| {names.get(c, c)} | {result.support[k]} | {result.predicted[k]} | "
            f"{result.precision[k]:.2f} | {result.recall[k]:.2f} | {result.f1[k]:.2f} |"
        )
    return "\n".join(lines) + "\n"


def confusion_markdown(result: ClassificationResult, max_classes: int = 20) -> str:
    """The confusion matrix as markdown (rows true, columns predicted); empty beyond `max_classes`."""
    k = len(result.classes)
    if k > max_classes:
        return ""
    lines = ["| true \\ predicted | " + " | ".join(result.classes) + " |", "|---|" + "---:|" * k]
    for t, c in enumerate(result.classes):
        lines.append(f"| {c} | " + " | ".join(str(int(v)) for v in result.confusion[t]) + " |")
    return "\n".join(lines) + "\n"
