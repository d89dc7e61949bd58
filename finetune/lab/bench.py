"""GPU benchmarks of the real code path: the notebooks' trainer and evaluation, timed, with ablations side by side.

    python -m finetune.lab.bench train --profile qwen2.5-7b-shape --name h100_7b_train
    python -m finetune.lab.bench eval  --profile qwen2.5-7b-shape --name h100_7b_eval
    python -m finetune.lab.bench train --profile tiny --max_train_samples 200 --name cpu_smoke   # the CPU test's run
    accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes N -m finetune.lab.bench train \
        --profile qwen2.5-7b-shape --name h200_7b_fsdp_N                                     # FSDP_VARIANTS on N GPUs

Training figures are real (non-pad) tokens/s per GPU after warm-up steps, MFU, step time, peak memory (the most loaded
GPU's) and the projected time for one epoch of the full 120,000-article training set on all the run's GPUs; each
ablation is also given as a ratio to the first variant. Launched on several processes, only rank 0 writes.
"""

import argparse
import dataclasses
import gc
import json
import os
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from accelerate import PartialState
from transformers.trainer_utils import SaveStrategy

from finetune.config import RunConfig, config_from_args
from finetune.data import load_splits
from finetune.model import load_for_inference, load_tokenizer
from finetune.predict import encode_prompts, generate_labels, score_labels
from finetune.results import environment
from finetune.metrics import throughput
from finetune.throughput import (StepClock, StepProfiler, adapter_parameters, max_over_ranks, mean_article_tokens,
                                 peak_flops, peak_memory_gib, profile_table, reset_peak_memory,
                                 training_flops_per_token)
from finetune.train import build_trainer, launched_with_fsdp

FULL_TRAIN_ARTICLES = 120_000
# Each variant changes the reference configuration in one respect. Liger patches the Qwen2 classes for the whole
# process, so its variants come last: every variant before them runs without its kernels.
TRAIN_VARIANTS = {
    "reference (packed, varlen, full GC, bf16 SR AdamW)": {},
    "no packing (padded batches, sdpa)": {"packing": False},
    "plain bf16 AdamW (the published recipe)": {"optimizer": "adamw"},
    "batch 16 x accumulation 2": {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 2},
    "no gradient checkpointing, batch 4 x 8": {"gradient_checkpointing": False, "per_device_train_batch_size": 4,
                                               "gradient_accumulation_steps": 8},
    # LoRA and QLoRA (rank 16 on every linear projection): MFU counts the frozen weights' forward and input-gradient
    # backward and the adapters' full training (finetune/throughput.py::training_flops_per_token).
    "LoRA r16, all linear projections (peft)": {"method": "lora"},
    "QLoRA r16, 4-bit NF4 frozen weights (bitsandbytes)": {"method": "qlora"},
    "Liger fused kernels": {"use_liger_kernel": True},
    "Liger + no gradient checkpointing, batch 4 x 8": {"use_liger_kernel": True, "gradient_checkpointing": False,
                                                       "per_device_train_batch_size": 4,
                                                       "gradient_accumulation_steps": 8},
    "Liger, batch 16 x 2": {"use_liger_kernel": True, "per_device_train_batch_size": 16,
                            "gradient_accumulation_steps": 2},
    "Liger, checkpointing 16 of 28 layers": {"use_liger_kernel": True, "checkpointed_layers": 16},
    "Liger, checkpointing 4 of 28 layers, batch 4 x 8": {"use_liger_kernel": True, "checkpointed_layers": 4,
                                                         "per_device_train_batch_size": 4,
                                                         "gradient_accumulation_steps": 8},
    "Liger, checkpointing 16 of 28 layers, plain bf16 AdamW": {"use_liger_kernel": True, "checkpointed_layers": 16,
                                                               "optimizer": "adamw"},
}
# Under FSDP2 (`accelerate launch`, configs/accelerate/fsdp2.yaml) the same per-GPU recipe: who checkpoints the
# activations (FSDP per decoder layer, or the Trainer; never both), and how the weights are updated. With FSDP2,
# adamw_fp32_master is its mixed precision (fp32 shards, bf16 compute); the others keep bf16 shards
# (finetune/train.py::sft_config). Without checkpointing comes last: it may not fit on fewer GPUs.
FSDP_VARIANTS = {
    "FSDP2 reference (FSDP activation checkpointing, bf16 SR AdamW)": {
        "gradient_checkpointing": False, "fsdp_activation_checkpointing": True},
    "FSDP2, the Trainer's gradient checkpointing instead of FSDP's": {
        "gradient_checkpointing": True, "fsdp_activation_checkpointing": False},
    "FSDP2, fp32 master weights (FSDP2 mixed precision)": {
        "gradient_checkpointing": False, "fsdp_activation_checkpointing": True, "optimizer": "adamw_fp32_master"},
    "FSDP2, plain bf16 AdamW": {
        "gradient_checkpointing": False, "fsdp_activation_checkpointing": True, "optimizer": "adamw"},
    "FSDP2, no activation checkpointing": {"gradient_checkpointing": False, "fsdp_activation_checkpointing": False},
}


def bench_train_variant(config: RunConfig, warmup_steps: int, measured_steps: int, profile: bool = False,
                        fsdp_activation_checkpointing: bool | None = None) -> dict:
    """Train `warmup_steps + measured_steps` optimizer steps through `build_trainer`; time the measured ones. With
    `profile`, one more step runs under the torch profiler (after the timed ones, so its overhead is not timed).
    Under FSDP, `fsdp_activation_checkpointing` replaces the accelerate config's for this trainer."""
    config = dataclasses.replace(config, max_steps=warmup_steps + measured_steps + profile, logging_steps=1,
                                 run_name=f"{config.run_name}-bench")
    clock = StepClock()
    profiler = StepProfiler(warmup_steps + measured_steps + 1)
    if fsdp_activation_checkpointing is not None:  # each trainer's FSDP plugin reads the launch config from here
        os.environ["FSDP_ACTIVATION_CHECKPOINTING"] = str(fsdp_activation_checkpointing).lower()
    try:
        trainer = build_trainer(config, callbacks=[clock, profiler] if profile else [clock])
        trainer.args.include_num_input_tokens_seen = "non_padding"
        trainer.args.save_strategy = SaveStrategy.NO  # else the Trainer saves a checkpoint after the last step
        # Training's peak, weights included: QLoRA quantizes a scratch model from a bf16 copy, freed before this.
        reset_peak_memory()
        trainer.train()
    except Exception as e:  # an ablation that fails (out of memory, a kernel missing) is a result, not a crash...
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # ...except on several ranks: the others would hang waiting
            raise
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    seconds, tokens = clock.window(warmup_steps, measured_steps)
    world_size = trainer.args.world_size
    tokens_per_second = tokens / seconds / world_size  # per GPU: the Trainer's count sums every rank's tokens
    optimizer_seconds = clock.optimizer_seconds[warmup_steps:warmup_steps + measured_steps]
    mean_len = mean_article_tokens(trainer.train_dataset)
    adapter_params = adapter_parameters(trainer.model)
    flops = training_flops_per_token(trainer.model.config, mean_len, adapter_params)
    peak = peak_flops()
    result = {
        "tokens_per_second": tokens_per_second,
        "step_seconds": seconds / measured_steps,
        "optimizer_step_seconds": sum(optimizer_seconds) / len(optimizer_seconds),
        "tokens_per_step": tokens / measured_steps,  # all GPUs
        "mfu": tokens_per_second * flops / peak if peak else None,
        "peak_allocated_gib": max_over_ranks(trainer.accelerator, peak_memory_gib()),
        "peak_reserved_gib": max_over_ranks(trainer.accelerator, peak_memory_gib(reserved=True)),
        "mean_article_tokens": mean_len,
        "adapter_parameters": adapter_params,  # None: every weight trains
        "projected_epoch_minutes_full_train": FULL_TRAIN_ARTICLES * mean_len / (tokens_per_second * world_size) / 60,
        "final_loss": next(h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h),
    }
    if profile:
        result.update(step_profile=profiler.table, nccl_kernel_share=profiler.nccl_share)
    trainer.accelerator.free_memory()  # the accelerator holds the model and optimizer too
    del trainer
    gc.collect()
    return result


def bench_train(config: RunConfig, variants: dict[str, dict], warmup_steps: int, measured_steps: int,
                profile: bool = False, save=lambda results: None) -> dict:
    """Every variant in turn; `save` gets the results so far after each one, so a run cut short keeps what it had."""
    results = {}
    for name, overrides in variants.items():
        print(f"== {name}", flush=True)
        run = {k: v for k, v in overrides.items() if k != "fsdp_activation_checkpointing"}
        results[name] = {"overrides": overrides,
                         **bench_train_variant(dataclasses.replace(config, **run), warmup_steps, measured_steps,
                                                 profile, overrides.get("fsdp_activation_checkpointing"))}
        if PartialState().is_main_process:
            print(json.dumps(results[name]), flush=True)
        base = results[next(iter(results))].get("tokens_per_second")
        if base and "tokens_per_second" in results[name]:
            results[name]["speed_vs_reference"] = results[name]["tokens_per_second"] / base
        save(results)
    return results


def bench_eval(config: RunConfig, modes: list[str]) -> dict:
    """Label scoring and generation over every test-split article (both sides of a holdout carve: speed does not
    depend on what the model learned), through the functions the notebooks use."""
    splits = load_splits(config)
    texts = list(splits.eval["text"]) + (list(splits.train["text"]) if splits.protocol == "holdout" else [])
    tokenizer = load_tokenizer(config, train_texts=list(splits.train["text"]))
    model = load_for_inference(config, tokenizer)
    start = time.perf_counter()
    encode_prompts(tokenizer, texts, config.max_length)
    tokenization_seconds = time.perf_counter() - start  # host-side share of each mode's time below
    results = {}
    for mode, predict in (("label_scoring", score_labels), ("generation", generate_labels)):
        if mode not in modes:
            continue
        reset_peak_memory()
        start = time.perf_counter()
        predictions = predict(model, tokenizer, texts, batch_size=config.eval_batch_size, max_length=config.max_length)
        seconds = time.perf_counter() - start
        results[mode] = {**throughput(predictions, config.eval_batch_size, seconds),
                         "truncated_articles": predictions.truncated, "peak_allocated_gib": peak_memory_gib()}
        print(mode, json.dumps(results[mode]), flush=True)
    # Where label scoring spends its time: a profiler trace over two batches, top kernels and ops by device time.
    with torch.profiler.profile() as profiler:
        score_labels(model, tokenizer, texts[: 2 * config.eval_batch_size], config.eval_batch_size, config.max_length,
                     progress=False)
    return {"data": splits.describe(), "tokenization_seconds": tokenization_seconds, "modes": results,
            "label_scoring_profile": profile_table(profiler)}


def plot_train(results: dict, path: Path) -> None:
    names = [n for n, r in results.items() if "tokens_per_second" in r]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(names) + 1.5))
    ax.barh(names, [results[n]["tokens_per_second"] for n in names])
    for i, n in enumerate(names):
        mfu = results[n]["mfu"]
        ax.text(results[n]["tokens_per_second"], i, f" {results[n]['tokens_per_second']:.0f}"
                + (f" ({mfu:.0%} MFU)" if mfu else ""), va="center")
    ax.invert_yaxis()
    ax.set_xlabel("real tokens/s")
    ax.set_title("Training throughput by variant")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # "--profile" is the config's
    parser.add_argument("what", choices=["train", "eval"])
    parser.add_argument("--name", required=True, help="writes results/benchmarks/<name>.json and .png")
    parser.add_argument("--variants", default="all", help="'all', or comma-separated indices into TRAIN_VARIANTS "
                        "(FSDP_VARIANTS when launched with the FSDP config)")
    parser.add_argument("--modes", default="label_scoring,generation", help="eval: which modes to time")
    parser.add_argument("--warmup_steps", type=int, default=2)
    parser.add_argument("--measured_steps", type=int, default=5)
    parser.add_argument("--profile_step", action="store_true",
                        help="train: a torch profiler table of one extra step per variant")
    known, rest = parser.parse_known_args(argv)
    config = config_from_args(rest, description=__doc__)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch (torchrun) for every rank
    if known.what == "eval" and world_size > 1:
        raise SystemExit("finetune.lab.bench eval runs on one GPU: start it with python -m, not accelerate launch")
    out = Path(config.results_dir) / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": known.what, "world_size": world_size, "config": config.to_dict(),
              "environment": environment()}
    path = out / f"{known.name}.json"

    def save(variants: dict) -> None:
        if PartialState().is_main_process:
            path.write_text(json.dumps({**record, "variants": variants}, indent=2) + "\n")
            plot_train(variants, out / f"{known.name}.png")

    if known.what == "train":
        catalogue = FSDP_VARIANTS if launched_with_fsdp() else TRAIN_VARIANTS
        names = list(catalogue)
        if known.variants != "all":
            names = [names[int(i)] for i in known.variants.split(",")]
        record.update(warmup_steps=known.warmup_steps, measured_steps=known.measured_steps)
        bench_train(config, {n: catalogue[n] for n in names}, known.warmup_steps, known.measured_steps,
                    known.profile_step, save)
    else:
        record.update(bench_eval(config, known.modes.split(",")))
        path.write_text(json.dumps(record, indent=2) + "\n")
    if PartialState().is_main_process:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
