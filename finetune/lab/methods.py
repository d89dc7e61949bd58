"""Full fine-tuning, LoRA and QLoRA from one base, on the same data and evaluation: one results JSON per method.

    python -m finetune.lab.methods --profile tiny --methods full,lora      # results/methods/, from a pretrained base
    python -m finetune.lab.methods --profile qwen2.5-7b --methods full,lora,qlora
    notebooks/04_method_comparison.ipynb reads the records; finetune/lab/report.py puts them in docs/methods.md

The tiny profile's scratch model is pretrained first (finetune/pretrain.py): LoRA needs a base that knows something.
Each record is an evaluation record (finetune/results.py) with a `training` entry: time, tokens/s, peak memory and
the bytes of the saved final/ folder (a whole model, or an adapter).
"""

import dataclasses
import json
from pathlib import Path

from finetune.adapters import METHODS
from finetune.config import RunConfig, command_from_args, command_parser
from finetune.data import load_splits
from finetune.disk import folder_bytes
from finetune.evaluate import evaluate
from finetune.pretrain import pretrained_base
from finetune.results import commit_label, hardware_label, write_record
from finetune.train import train


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


def method_rows(results_dir: str | Path) -> list[dict]:
    """One row per method compared (results/methods/<method>_results.json): accuracy and macro-F1 of the primary
    evaluation mode, and what training cost."""
    rows = []
    for path in sorted((Path(results_dir) / "methods").glob("*_results.json")):
        record = json.loads(path.read_text())
        metrics, training = record["evaluations"][record["primary_mode"]]["metrics"], record["training"]
        rows.append({"method": training["method"], "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                     "train_seconds": training["train_seconds"], "tokens_per_second": training["tokens_per_second"],
                     "peak_memory_gib": training["peak_memory_gib"], "output_mb": training["output_bytes"] / 1e6,
                     "eval_articles": record["data"]["eval_size"], "hardware": hardware_label(record["environment"]),
                     "commit": commit_label(record["environment"]), "file": f"methods/{path.name}"})
    return rows


def benchmark_method_rows(results_dir: str | Path) -> list[dict]:
    """The training benchmarks that measured LoRA or QLoRA (`make gpu-methods`): each method's variant beside the
    full fine-tuning row of the same run that it changes (`_full_twin`), and that row."""
    rows = []
    for path in sorted((Path(results_dir) / "benchmarks").glob("*.json")):
        record = json.loads(path.read_text())
        variants = record.get("variants", {}) if record.get("benchmark") == "train" else {}
        adapters = {name: v for name, v in variants.items() if "method" in v["overrides"]}
        twins = {name: _full_twin(variants, v) for name, v in adapters.items()}
        for name, v in variants.items():
            if name not in adapters and name not in twins.values():
                continue
            twin = variants.get(twins.get(name, name), {})
            rows.append({"method": v["overrides"].get("method", "full"), "variant": name,
                         "tokens_per_second": v.get("tokens_per_second"),
                         "speed_vs_full": (v["tokens_per_second"] / twin["tokens_per_second"]
                                           if "tokens_per_second" in v and "tokens_per_second" in twin else None),
                         "mfu": v.get("mfu"), "peak_allocated_gib": v.get("peak_allocated_gib"),
                         "adapter_parameters": v.get("adapter_parameters"), "error": v.get("error"),
                         "hardware": hardware_label(record["environment"]),
                         "commit": commit_label(record["environment"]), "file": f"benchmarks/{path.name}"})
    return rows


def _full_twin(variants: dict, adapter: dict) -> str | None:
    """The full fine-tuning row (not stock TRL) an adapter row changes: the same overrides but for the method, the
    adapter's own settings and the optimizer (each method's own choice); the first such row, else None."""
    def strip(overrides: dict) -> dict:
        return {k: v for k, v in overrides.items() if k not in ("method", "optimizer") and not k.startswith("lora_")}

    return next((name for name, v in variants.items() if "method" not in v["overrides"] and not v.get("stock_trl")
                 and strip(v["overrides"]) == strip(adapter["overrides"])), None)


def methods_section(results_dir: str | Path) -> str:
    """The methods tables (docs/methods.md): the tiny profile's comparison and the 7B shape's speed and memory per method."""
    def cell(value, fmt: str) -> str:
        return "n/a" if value is None else fmt.format(value)

    lines = ["| method | accuracy | macro-F1 | eval articles | train time (s) | real tokens/s | peak memory (GiB) "
             "| output size (MB) | hardware | commit | file |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in method_rows(results_dir):
        lines.append(f"| {r['method']} | {r['accuracy']:.2%} | {r['macro_f1']:.2%} | {r['eval_articles']} "
                     f"| {r['train_seconds']:.0f} | {r['tokens_per_second']:,.0f} "
                     f"| {cell(r['peak_memory_gib'], '{:.1f}')} "
                     f"| {r['output_mb']:.2f} | {r['hardware']} | {r['commit']} | `{r['file']}` |")
    if len(lines) == 2:
        lines = ["(not compared yet: `make tiny-methods`)"]
    lines += ["", "| method | variant | real tokens/s | vs the full fine-tuning it changes (same run) | MFU | peak alloc (GiB) "
              "| adapter parameters | hardware | commit | file |", "|---|---|---|---|---|---|---|---|---|---|"]
    bench = benchmark_method_rows(results_dir)
    for r in bench:
        if r["error"]:
            lines.append(f"| {r['method']} | {r['variant']} | failed: {r['error']} | | | | | {r['hardware']} "
                         f"| {r['commit']} | `{r['file']}` |")
            continue
        lines.append(f"| {r['method']} | {r['variant']} | {r['tokens_per_second']:,.0f} "
                     f"| {cell(r['speed_vs_full'], '{:.2f}x')} | {cell(r['mfu'], '{:.1%}')} "
                     f"| {cell(r['peak_allocated_gib'], '{:.1f}')} | {cell(r['adapter_parameters'], '{:,}')} "
                     f"| {r['hardware']} | {r['commit']} | `{r['file']}` |")
    if not bench:
        lines[-2:] = ["(7B shape not measured yet: `make PY=python3 gpu-methods` on a GPU)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = command_parser()
    parser.add_argument("--methods", default="full,lora", help="comma-separated, from " + ", ".join(METHODS))
    parser.add_argument("--modes", default="label_scoring,generation")
    config, known = command_from_args(parser, argv, description=__doc__)
    for path in compare_methods(config, known.methods.split(","), tuple(known.modes.split(","))):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
