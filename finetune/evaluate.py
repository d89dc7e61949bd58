"""Evaluate a model on the run's eval split, in both modes, and write its results JSON and confusion-matrix PNG.

Generation is recorded twice from one decoding pass: `generation` reads each answer strictly (the exact trained JSON),
`generation_lenient` accepts any JSON object naming a label (see finetune/answers.py).

    python -m finetune.evaluate --profile tiny                         # the base (untrained) model
    python -m finetune.evaluate --profile tiny --model_path checkpoints/tiny-ag-news/final
"""

import argparse
import time
from pathlib import Path

import matplotlib.pyplot as plt
from transformers import AutoTokenizer

from data_prep.splits import Splits
from finetune.answers import parse_lenient
from finetune.config import RunConfig, config_from_args
from finetune.data import load_splits
from finetune.metrics import summarize
from finetune.model import load_for_inference, load_tokenizer
from finetune.plots import plot_confusion_matrix
from finetune.predict import default_max_new_tokens, generate_labels, parsed, score_labels
from finetune.results import write_record
from finetune.throughput import peak_memory_gib, reset_peak_memory

MODES = ("label_scoring", "generation")


def evaluate(config: RunConfig, name: str, model_path: str | Path | None = None, modes: tuple[str, ...] = MODES,
             splits: Splits | None = None) -> dict:
    """Evaluate `model_path` (default: the config's model before training) and write `<name>_results.json`."""
    start = time.perf_counter()
    splits = splits or load_splits(config)
    if model_path is None:
        tokenizer = load_tokenizer(config, train_texts=list(splits.train["text"]))
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    reset_peak_memory()
    load_start = time.perf_counter()
    model = load_for_inference(config, tokenizer, model_path)
    model_load_seconds = time.perf_counter() - load_start
    texts, y_true = list(splits.eval["text"]), splits.eval["label"].to_numpy()
    evaluations = {}
    for mode in modes:
        t0 = time.perf_counter()
        if mode == "label_scoring":
            predictions = score_labels(model, tokenizer, texts, config.eval_batch_size, config.max_length)
            evaluations[mode] = summarize(y_true, predictions, texts, config.eval_batch_size, time.perf_counter() - t0)
        elif mode == "generation":
            max_new_tokens = config.max_new_tokens or default_max_new_tokens(tokenizer)
            strict = generate_labels(model, tokenizer, texts, config.eval_batch_size, config.max_length, max_new_tokens)
            seconds = time.perf_counter() - t0
            for key, predictions in (("generation", strict), ("generation_lenient", parsed(strict, parse_lenient))):
                evaluations[key] = {**summarize(y_true, predictions, texts, config.eval_batch_size, seconds),
                                    "max_new_tokens": max_new_tokens}
        else:
            raise ValueError(f"unknown evaluation mode {mode!r}; choose from {MODES}")
    record = {
        "name": name, "kind": "llm", "profile": config.profile, "model": str(model_path or config.model),
        "config": config.to_dict(), "data": splits.describe(), "primary_mode": modes[0],
        "evaluations": evaluations, "wall_seconds": time.perf_counter() - start,
        "model_load_seconds": model_load_seconds, "peak_memory_gib": peak_memory_gib(),  # GPU, weights included
    }
    results_dir = Path(config.results_dir)
    write_record(record, results_dir / f"{name}_results.json")
    figure = plot_confusion_matrix(record)
    figure.savefig(results_dir / f"{name}_confusion_matrix.png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model_path", help="a trained model folder (default: the profile's model, untrained)")
    parser.add_argument("--name", help="results file stem (default: base_model or finetuned_model)")
    known, rest = parser.parse_known_args(argv)
    config = config_from_args(rest, description=__doc__)
    name = known.name or ("finetuned_model" if known.model_path else "base_model")
    record = evaluate(config, name, known.model_path)
    for mode, ev in record["evaluations"].items():
        print(f"{name} {mode}: accuracy {ev['metrics']['accuracy']:.2%}, macro-F1 {ev['metrics']['macro_f1']:.2%}")


if __name__ == "__main__":
    main()
