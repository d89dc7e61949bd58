"""Evaluate a model on the run's eval split, in both modes, and write its results JSON and confusion-matrix PNG.

Generation is recorded twice from one decoding pass: `generation` reads each answer strictly (the exact trained JSON),
`generation_lenient` accepts any JSON object naming a label (see finetune/answers.py). On a GPU each mode first runs
untimed over its longest and shortest batches (compilation, kernel choice, the allocator's growth): `warmup_seconds`
beside `articles_per_second`. Batch size, Liger's kernels and compiled layers default to "auto" (finetune/plan.py).

    python -m finetune.evaluate                                        # Qwen2.5-7B-Instruct before training
    python -m finetune.evaluate --model_path checkpoints/qwen7b-ag-news-full/final
    python -m finetune.evaluate --profile tiny --model_path checkpoints/tiny-ag-news/final
"""

import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from transformers import AutoTokenizer

from data_prep.read import DataError
from data_prep.splits import Splits
from finetune.answers import parse_lenient
from finetune.config import RunConfig, command_from_args, command_parser
from finetune.data import check_held_out, load_splits
from finetune.generation import generate_labels, parsed, score_then_generate
from finetune.metrics import summarize
from finetune.model import check_tokenizer_fits, load_for_inference, load_tokenizer
from finetune.plan import GPU, OutOfMemory, gpu_memory_note, log_plan, plan_evaluation
from finetune.sources import ModelShape, SourceNotFound
from finetune.plots import plot_confusion_matrix
from finetune.predict import score_labels, warmup_texts
from finetune.prompts import default_max_new_tokens
from finetune.results import write_record
from finetune.throughput import peak_memory_gib, reset_peak_memory

MODES = ("label_scoring", "generation")


def evaluate(config: RunConfig, name: str, model_path: str | Path | None = None, modes: tuple[str, ...] = MODES,
             splits: Splits | None = None) -> dict:
    """Evaluate `model_path` (default: the config's model before training) and write `<name>_results.json`."""
    start = time.perf_counter()
    config, plan = plan_evaluation(config, GPU.current(), ModelShape.of(config, model_path))
    log_plan(plan, "evaluation")
    if splits is None:
        splits = load_splits(config)
        if model_path is not None:
            check_held_out(config, splits, model_path)
    if model_path is None:
        tokenizer = load_tokenizer(config, train_texts=list(splits.train["text"]))
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    reset_peak_memory()
    load_start = time.perf_counter()
    model = load_for_inference(config, tokenizer, model_path)
    check_tokenizer_fits(tokenizer, model)
    model_load_seconds = time.perf_counter() - load_start
    texts, y_true = list(splits.eval["text"]), splits.eval["label"].to_numpy()
    batch, max_new_tokens = config.eval_batch_size, config.max_new_tokens or default_max_new_tokens(tokenizer)
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown evaluation mode(s) {sorted(unknown)}; choose from {MODES}")
    # Each pass yields (mode, predictions) as each mode is done. Both modes share one (`score_then_generate`): its
    # forward over the answer tree gives the scores and generation's check, so each mode's seconds run from its start.
    alone = {"label_scoring": lambda t: [("label_scoring", score_labels(model, tokenizer, t, batch,
                                                                        config.max_length))],
             "generation": lambda t: [("generation", generate_labels(model, tokenizer, t, batch, config.max_length,
                                                                     max_new_tokens))]}
    shared = set(modes) == set(MODES)
    passes = {mode: alone[mode] for mode in modes}
    if shared:
        passes = {" and ".join(modes): lambda t: score_then_generate(model, tokenizer, t, batch, config.max_length,
                                                                      max_new_tokens)}
    on_gpu = model.device.type == "cuda"
    # by characters, as the passes batch them (`tree_passes`), not tokens: no encoding of every article first
    warmup = warmup_texts(texts, list(map(len, texts)), batch) if on_gpu else []
    evaluations = {}
    for pass_name, run in passes.items():
        try:
            warmup_seconds = warm_up(lambda t: list(run(t)), warmup, on_gpu)
            t0, done = time.perf_counter(), []
            for mode, predictions in run(texts):
                done.append((mode, predictions, time.perf_counter() - t0))
        except torch.OutOfMemoryError as error:
            raise OutOfMemory(f"CUDA ran out of memory in {pass_name} at {batch} articles a batch{gpu_memory_note()}. "
                              f"Nothing of this evaluation was written; rerun with --eval_batch_size "
                              f"{max(1, batch // 2)}.") from error
        for mode, predictions, seconds in done:
            read = {mode: predictions}
            if mode == "generation":
                read["generation_lenient"] = parsed(predictions, parse_lenient)
            for key, p in read.items():
                evaluations[key] = summarize(y_true, p, texts, batch, seconds)
                evaluations[key]["throughput"]["warmup_seconds"] = warmup_seconds
                if shared:
                    evaluations[key]["throughput"]["pass_shared_by"] = list(modes)
                if mode == "generation":
                    evaluations[key]["max_new_tokens"] = max_new_tokens
    record = {
        "name": name, "kind": "llm", "profile": config.profile, "model": str(model_path or config.model),
        "config": config.to_dict(), "plan": plan, "data": splits.describe(), "primary_mode": modes[0],
        "evaluations": evaluations, "wall_seconds": time.perf_counter() - start,
        "model_load_seconds": model_load_seconds, "peak_memory_gib": peak_memory_gib(),  # GPU, weights included
        "attn_implementation": model.config._attn_implementation,  # "auto" resolved (load_for_inference)
    }
    results_dir = Path(config.results_dir)
    write_record(record, results_dir / f"{name}_results.json")
    figure = plot_confusion_matrix(record)
    figure.savefig(results_dir / f"{name}_confusion_matrix.png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    return record


def warm_up(run, texts: list[str], on_gpu: bool) -> float:
    """Seconds of an untimed pass over `texts` on a GPU (compiled layers compile, cuBLAS and cuDNN pick their
    kernels, the allocator grows): 0 on the CPU, which has none of that to do."""
    if not on_gpu:
        return 0.0
    start = time.perf_counter()
    run(texts)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = command_parser()
    parser.add_argument("--model_path", help="a trained model folder (default: the profile's model, untrained)")
    parser.add_argument("--name", help="results file stem (default: base_model or finetuned_model)")
    config, known = command_from_args(parser, argv, description=__doc__)
    name = known.name or ("finetuned_model" if known.model_path else "base_model")
    try:
        record = evaluate(config, name, known.model_path)
    except (OutOfMemory, SourceNotFound, DataError) as error:  # bad input or memory: the message says it all
        raise SystemExit(f"error: {error}") from None
    for mode, ev in record["evaluations"].items():
        print(f"{name} {mode}: accuracy {ev['metrics']['accuracy']:.2%}, macro-F1 {ev['metrics']['macro_f1']:.2%}")


if __name__ == "__main__":
    main()
