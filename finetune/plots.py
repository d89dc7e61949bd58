"""The figures the notebooks show and results/ keeps: data overview, confusion matrices, per-class and run comparisons."""

import matplotlib

if not matplotlib.get_backend().lower().startswith(("module://matplotlib_inline", "inline")):
    matplotlib.use("Agg")  # headless runs (papermill, CI) have no display; notebooks keep their inline backend
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from data_prep.task import LABELS


def plot_class_distribution(splits: dict[str, pd.DataFrame]) -> plt.Figure:
    """Articles per class in each split."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(splits)
    for i, (name, df) in enumerate(splits.items()):
        counts = df["label"].value_counts().reindex(range(len(LABELS)), fill_value=0)
        ax.bar(np.arange(len(LABELS)) + i * width, counts.values, width, label=f"{name} ({len(df)})")
    ax.set_xticks(np.arange(len(LABELS)) + width * (len(splits) - 1) / 2, LABELS)
    ax.set_ylabel("articles")
    ax.set_title("AG News class distribution")
    ax.legend()
    return fig


def plot_text_lengths(df: pd.DataFrame, token_counts: np.ndarray | None = None) -> plt.Figure:
    """Article length per class, in words and (if given) in prompt tokens."""
    panels = [("words", df["text"].str.split().str.len().to_numpy())]
    if token_counts is not None:
        panels.append(("prompt tokens", np.asarray(token_counts)))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.5), squeeze=False)
    for ax, (unit, values) in zip(axes[0], panels):
        for k, label in enumerate(LABELS):
            ax.hist(values[df["label"].to_numpy() == k], bins=40, alpha=0.5, label=label)
        ax.set_xlabel(unit)
        ax.set_ylabel("articles")
        ax.set_title(f"Article length ({unit}); median {np.median(values):.0f}")
    axes[0][0].legend()
    fig.tight_layout()
    return fig


def plot_confusion_matrix(record: dict, mode: str | None = None) -> plt.Figure:
    """Counts and row-normalized confusion matrices of one evaluation side by side."""
    mode = mode or record["primary_mode"]
    metrics = record["evaluations"][mode]["metrics"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, fmt in zip(axes, ("confusion_matrix", "confusion_matrix_normalized"), ("d", ".2f")):
        matrix = np.array(metrics[key])
        ax.imshow(matrix, cmap="Blues", vmin=0)
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, format(value, fmt), ha="center", va="center",
                    color="white" if value > matrix.max() / 2 else "black")
        ax.set_xticks(range(len(LABELS)), LABELS)
        ax.set_yticks(range(len(LABELS)), LABELS)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title("counts" if fmt == "d" else "row-normalized (recall)")
    fig.suptitle(f"{record['name']} ({mode}): accuracy {metrics['accuracy']:.2%}, macro-F1 {metrics['macro_f1']:.2%}")
    fig.tight_layout()
    return fig


def plot_per_class_f1(records: list[dict]) -> plt.Figure:
    """Per-class F1 of several runs (e.g. base vs fine-tuned) as grouped bars."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(records)
    for i, record in enumerate(records):
        per_class = record["evaluations"][record["primary_mode"]]["metrics"]["per_class"]
        ax.bar(np.arange(len(LABELS)) + i * width, [per_class[label]["f1"] for label in LABELS], width,
               label=record["name"])
    ax.set_xticks(np.arange(len(LABELS)) + width * (len(records) - 1) / 2, LABELS)
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.set_title("Per-class F1")
    ax.legend()
    return fig


def plot_run_comparison(records: list[dict]) -> plt.Figure:
    """Accuracy and macro-F1 of every run and evaluation mode."""
    rows = [(f"{r['name']}\n{mode}", ev["metrics"]["accuracy"], ev["metrics"]["macro_f1"])
            for r in records for mode, ev in r["evaluations"].items()]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r[1] for r in rows], 0.4, label="accuracy")
    ax.bar(x + 0.2, [r[2] for r in rows], 0.4, label="macro-F1")
    ax.set_xticks(x, [r[0] for r in rows], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("All runs")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_calibration(records: list[dict]) -> plt.Figure:
    """Reliability diagram of label scoring: accuracy against confidence, per run (the diagonal is perfect)."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    for record in records:
        c = record["evaluations"]["label_scoring"]["calibration"]
        shown = [i for i, n in enumerate(c["count"]) if n]
        ax.plot([c["confidence"][i] for i in shown], [c["accuracy"][i] for i in shown], marker="o",
                label=f"{record['name']} (ECE {c['ece']:.3f})")
    ax.set_xlabel("confidence (probability of the chosen label)")
    ax.set_ylabel("accuracy")
    ax.set_title("Label-scoring calibration")
    ax.legend(fontsize=8)
    return fig
