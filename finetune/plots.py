"""The figures the notebooks show and results/ keeps: data overview, training loss, confusion matrices, per-class and
run comparisons."""

import textwrap

import matplotlib

if not matplotlib.get_backend().lower().startswith(("module://matplotlib_inline", "inline")):
    matplotlib.use("Agg")  # headless runs (papermill, CI) have no display; notebooks keep their inline backend
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from data_prep.task import LABELS


def _figure(figsize: tuple[float, float], ncols: int = 1) -> tuple[plt.Figure, np.ndarray]:
    # Constrained layout makes room for a legend placed outside the axes, where it cannot cover a bar.
    return plt.subplots(1, ncols, figsize=figsize, squeeze=False, layout="constrained")


def plot_class_distribution(splits: dict[str, pd.DataFrame]) -> plt.Figure:
    """Articles per class in each split, each bar labelled with its count."""
    fig, axes = _figure((7.5, 3.5))
    ax = axes[0][0]
    width = 0.8 / len(splits)
    for i, (name, df) in enumerate(splits.items()):
        counts = df["label"].value_counts().reindex(range(len(LABELS)), fill_value=0)
        bars = ax.bar(np.arange(len(LABELS)) + i * width, counts.to_numpy(), width, label=f"{name} ({len(df):,})")
        ax.bar_label(bars, fmt="{:,.0f}", fontsize=8)
    ax.set_xticks(np.arange(len(LABELS)) + width * (len(splits) - 1) / 2, LABELS)
    ax.set_ylabel("articles")
    ax.set_title("AG News class distribution")
    fig.legend(loc="outside right upper")
    return fig


def plot_text_lengths(df: pd.DataFrame, token_counts: np.ndarray | None = None) -> plt.Figure:
    """Article length per class, in words and (if given) in prompt tokens."""
    panels = [("words", df["text"].str.split().str.len().to_numpy())]
    if token_counts is not None:
        panels.append(("prompt tokens", np.asarray(token_counts)))
    fig, axes = _figure((4.6 * len(panels) + 1.4, 3.5), len(panels))
    for ax, (unit, values) in zip(axes[0], panels):
        bins = np.histogram_bin_edges(values, bins=40)  # shared, so the classes' bars line up
        for k, label in enumerate(LABELS):
            ax.hist(values[df["label"].to_numpy() == k], bins=bins, histtype="step", linewidth=1.5, label=label)
        ax.set_xlabel(unit)
        ax.set_ylabel("articles")
        ax.set_title(f"Article length ({unit}); median {np.median(values):.0f}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper")
    return fig


def plot_training_loss(log_history: list[dict]) -> plt.Figure:
    """Training loss at each logged step, on a log scale: the loss falls by orders of magnitude, and a linear axis
    shows the first drop and then a flat line. Long runs also get a moving average, as TensorBoard's smoothing."""
    history = pd.DataFrame([h for h in log_history if "loss" in h])
    fig, axes = _figure((7.5, 3.5))
    ax = axes[0][0]
    if history.empty:  # a run shorter than logging_steps logs only its summary
        ax.set_title("No training loss logged: the run ended before its first logging step (logging_steps)")
        return fig
    ax.plot(history["step"], history["loss"], linewidth=1, alpha=0.6 if len(history) >= 40 else 1, label="logged")
    if len(history) >= 40:
        window = len(history) // 20
        ax.plot(history["step"], history["loss"].rolling(window, min_periods=1).mean(), linewidth=2,
                label=f"mean of {window} logs")
        fig.legend(loc="outside right upper")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (log scale)")
    ax.set_title(f"Training loss on answer tokens; last logged {history['loss'].iloc[-1]:.3g}")
    return fig


def plot_confusion_matrix(record: dict, mode: str | None = None) -> plt.Figure:
    """Counts and row-normalized confusion matrices of one evaluation side by side."""
    mode = mode or record["primary_mode"]
    metrics = record["evaluations"][mode]["metrics"]
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 4.2))
    for ax, key, fmt in zip(axes, ("confusion_matrix", "confusion_matrix_normalized"), (",.0f", ".2f")):
        matrix = np.array(metrics[key])
        ax.imshow(matrix, cmap="Blues", vmin=0)
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, format(value, fmt), ha="center", va="center",
                    color="white" if value > matrix.max() / 2 else "black")
        ax.set_xticks(range(len(LABELS)), LABELS)
        ax.set_yticks(range(len(LABELS)), LABELS)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title("counts" if key == "confusion_matrix" else "row-normalized (recall)")
    fig.suptitle(f"{record['name']} ({mode}): accuracy {metrics['accuracy']:.2%}, macro-F1 {metrics['macro_f1']:.2%}")
    fig.tight_layout()
    return fig


def plot_per_class_f1(records: list[dict]) -> plt.Figure:
    """Per-class F1 of several runs (e.g. base vs fine-tuned) as grouped bars."""
    fig, axes = _figure((8.5, 3.8))
    ax = axes[0][0]
    width = 0.8 / len(records)
    for i, record in enumerate(records):
        per_class = record["evaluations"][record["primary_mode"]]["metrics"]["per_class"]
        ax.bar(np.arange(len(LABELS)) + i * width, [per_class[label]["f1"] for label in LABELS], width,
               label=record["name"])
    ax.set_xticks(np.arange(len(LABELS)) + width * (len(records) - 1) / 2, LABELS)
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.set_title("Per-class F1")
    fig.legend(loc="outside right upper")
    return fig


def same_eval_split(a: dict, b: dict) -> bool:
    """Whether two records' `data` describe the same evaluation articles: same protocol, seed, sizes, class counts and
    notes, from the same files. The files are matched by their hash where both records have one, since the source's
    name is as given (`$AG_NEWS_DIR`, a relative or an absolute path) and differs for the same folder."""
    if "source_sha256" in a and "source_sha256" in b:
        a, b = ({k: v for k, v in data.items() if k != "source"} for data in (a, b))
    return a == b


def plot_run_comparison(records: list[dict], like: dict) -> plt.Figure:
    """Accuracy and macro-F1 of each run and evaluation mode evaluated on the same articles as the record `like`, one
    row each, so the chart keeps its width however many there are. Scores on other articles are not comparable; the
    title says how many runs that leaves out, and names them."""
    shown = [r for r in records if same_eval_split(r["data"], like["data"])]
    left_out = sorted({r["name"] for r in records if r not in shown})
    rows = [(f"{r['name']} · {mode}", ev["metrics"]["accuracy"], ev["metrics"]["macro_f1"])
            for r in shown for mode, ev in r["evaluations"].items()][::-1]  # the first run on top
    fig, axes = _figure((8.0, 0.45 * len(rows) + 1.4))
    ax = axes[0][0]
    y = np.arange(len(rows))
    for offset, column, label in ((0.2, 1, "accuracy"), (-0.2, 2, "macro-F1")):
        bars = ax.barh(y + offset, [r[column] for r in rows], 0.4, label=label)
        ax.bar_label(bars, fmt="{:.1%}", fontsize=7, padding=2)
    ax.set_yticks(y, [r[0] for r in rows], fontsize=8)
    ax.set_xlim(0, 1.12)  # room for the labels of bars at 100%
    ax.set_xlabel("score")
    title = f"Runs evaluated on the same {like['data']['eval_size']:,} articles ({len(shown)} of {len(records)} runs)"
    if left_out:
        note = "left out, not known to be evaluated on these articles: " + ", ".join(left_out)
        title += "\n" + textwrap.fill(note, 90)
    ax.set_title(title, fontsize=10, loc="left")
    fig.legend(loc="outside lower center", ncols=2)
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
