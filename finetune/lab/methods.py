"""Full fine-tuning, LoRA and QLoRA from one base, on the same data and evaluation: one results JSON per method.

    python -m finetune.lab.methods --profile tiny --methods full,lora      # results/methods/, from a pretrained base
    python -m finetune.lab.methods --profile qwen2.5-7b --methods full,lora,qlora

The tiny profile's scratch model is pretrained first (finetune/pretrain.py): LoRA needs a base that knows something.
Each record is an evaluation record (finetune/results.py) with a `training` entry: time, tokens/s, peak memory and
the bytes of the saved final/ folder (a whole model, or an adapter).
"""

import argparse
import dataclasses
import json
from pathlib import Path

from finetune.adapters import METHODS
from finetune.config import RunConfig, config_from_args
from finetune.data import load_splits
from finetune.evaluate import evaluate
from finetune.pretrain import pretrained_base
from finetune.results import write_record
from finetune.train import train


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def training_facts(final: Path) -> dict:
    """What training a method cost, from its train_summary.json: seconds, real tokens/s, peak memory, output size."""
    summary = json.loads((final / "train_summary.json").read_text())
    tokens = next(h["num_tokens"] for h in reversed(summary["log_history"]) if "num_tokens" in h)
    return {"method": summary["config"]["method"], "train_seconds": summary["train_seconds"],
            "tokens_per_second": tokens / summary["train_seconds"], "peak_memory_gib": summary["peak_memory_gib"],
            "optimizer_steps": summary["optimizer_steps"], "output_bytes": folder_bytes(final)}


def compare_methods(config: RunConfig, methods: list[str], modes: tuple[str, ...]) -> list[Path]:
    """Train and evaluate each method from the same base; write results/methods/<method>_results.json."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}; choose from {METHODS}")
    base = str(pretrained_base(config)) if config.model == "scratch" else config.model
    results_dir = Path(config.results_dir) / "methods"
    splits = load_splits(config)
    written = []
    for method in methods:
        run = dataclasses.replace(config, method=method, model=base, run_name=f"{config.run_name}-{method}",
                                  results_dir=str(results_dir))
        final = train(run)
        record = evaluate(run, method, final, modes=modes, splits=splits)
        record["training"] = training_facts(final)
        written.append(write_record(record, results_dir / f"{method}_results.json"))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--methods", default="full,lora", help="comma-separated, from " + ", ".join(METHODS))
    parser.add_argument("--modes", default="label_scoring,generation")
    known, rest = parser.parse_known_args(argv)
    config = config_from_args(rest, description=__doc__)
    for path in compare_methods(config, known.methods.split(","), tuple(known.modes.split(","))):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
