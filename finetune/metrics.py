"""Classification metrics from scikit-learn, in the shape every results JSON stores them."""

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from data_prep.task import LABELS


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and confusion matrices.

    A prediction of -1 (no usable answer) counts as wrong everywhere and appears in no confusion-matrix column.
    """
    classes = list(range(len(LABELS)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    matrix = confusion_matrix(y_true, y_pred, labels=classes)
    # Normalize by support, not by the row sum: articles with no usable answer then lower the recall they cost.
    rows = support[:, None]
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)),
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(LABELS, precision, recall, f1, support)
        },
        "confusion_matrix": matrix.tolist(),
        "confusion_matrix_normalized": np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0).tolist(),
    }


def calibration(probabilities: np.ndarray, y_true: np.ndarray, bins: int = 10) -> dict:
    """Reliability of the label-scoring confidence: per confidence bin, mean confidence, accuracy and count,
    plus the expected calibration error (count-weighted mean gap)."""
    confidence, predicted = probabilities.max(1), probabilities.argmax(1)
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    count = np.bincount(index, minlength=bins)
    mean = lambda values: np.divide(np.bincount(index, values, bins), count, out=np.zeros(bins), where=count > 0)
    accuracy, mean_confidence = mean((predicted == y_true).astype(float)), mean(confidence)
    return {"bins": bins, "confidence": mean_confidence.tolist(), "accuracy": accuracy.tolist(), "count": count.tolist(),
            "ece": float((np.abs(accuracy - mean_confidence) * count).sum() / max(count.sum(), 1))}
