"""What an evaluation pass reports, in the shape every results JSON stores it: classification metrics from
scikit-learn, failures, throughput and calibration. No torch here: the scikit-learn baselines report through it too."""

from dataclasses import dataclass, field

import numpy as np
from scipy.special import softmax
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from data_prep.task import LABELS

FAILURE_EXAMPLES = 5


@dataclass
class Predictions:
    """Per-article outputs of one evaluation pass, in input order."""

    labels: np.ndarray  # predicted class index, -1 where generation gave no usable answer
    batch_seconds: np.ndarray  # per article: wall time of the batch it was in (what a caller waits for)
    truncated: int  # articles whose text was cut to fit max_length
    label_logprobs: np.ndarray | None = None  # (articles, 4) full answer log-probabilities, label scoring only
    failures: dict[str, list[int]] = field(default_factory=dict)  # failure kind -> article indices, generation only
    answers: list[str] = field(default_factory=list)  # raw generated text, generation only
    decoded: int | None = None  # generation: answers decoded token by token (the rest followed a trained answer)
    decoding_cuda_graph: bool | None = None  # generation: whether decoding replayed a captured step (None: none)


def throughput(predictions: Predictions, batch_size: int, seconds: float) -> dict:
    """Articles per second over the whole pass, and per-article latency (the wall time of its batch)."""
    latency_ms = predictions.batch_seconds * 1000
    articles = len(predictions.labels)
    return {"articles": articles, "seconds": seconds, "articles_per_second": articles / seconds,
            "batch_size": batch_size,
            "latency_ms": {"mean": float(latency_ms.mean()), "p50": float(np.percentile(latency_ms, 50)),
                           "p95": float(np.percentile(latency_ms, 95))}}


def summarize(y_true: np.ndarray, predictions: Predictions, texts: list[str], batch_size: int, seconds: float) -> dict:
    """Metrics, failures (with examples) and throughput of one evaluation pass."""
    failures = {kind: len(idx) for kind, idx in predictions.failures.items()}
    summary = {
        "metrics": classification_metrics(y_true, predictions.labels),
        "failures": {
            "count": sum(failures.values()),
            "by_kind": failures,
            "examples": [{"kind": kind, "answer": predictions.answers[i], "article": texts[i][:200]}
                         for kind, idx in predictions.failures.items() for i in idx[:FAILURE_EXAMPLES]],
        },
        "throughput": throughput(predictions, batch_size, seconds),
        "truncated_articles": predictions.truncated,
    }
    if predictions.label_logprobs is not None:
        probs = softmax(predictions.label_logprobs, axis=-1)
        summary["calibration"] = calibration(probs, y_true)
        summary["label_probabilities"] = probs.round(4).tolist()  # per article, in eval-split order
    if predictions.decoded is not None:
        summary["decoded_answers"] = predictions.decoded
    if predictions.decoding_cuda_graph is not None:
        summary["decoding_cuda_graph"] = predictions.decoding_cuda_graph
    return summary


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
