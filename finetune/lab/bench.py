"""GPU benchmarks of the real code path: the notebooks' trainer and evaluation, timed, with ablations side by side.

    python -m finetune.lab.bench train --profile qwen2.5-7b-shape --name h100_7b_train
    python -m finetune.lab.bench eval  --profile qwen2.5-7b-shape --name h100_7b_eval   # beside plain-HF anchors
    python -m finetune.lab.bench train --profile tiny --max_train_samples 200 --name cpu_smoke   # the CPU test's run
    accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes N -m finetune.lab.bench train \
        --profile qwen2.5-7b-shape --name h200_7b_fsdp_N                                     # FSDP_VARIANTS on N GPUs

Training figures are real (non-pad) tokens/s per GPU after warm-up steps (the articles' tokens: a shared opening
counts once for each article, as stock TRL runs it), MFU (of what the step runs, against the bf16 dense peak, FP8 rows
too), step time, peak memory (the most loaded GPU's) and the projected time for one epoch of the full 120,000-article
training set on all the run's GPUs. On one GPU the first row is stock TRL (finetune/lab/stock_trl.py); every variant
is given as a ratio to it and to the suite's reference, both measured in the same run. Launched on several
processes, only rank 0 writes.
"""

import dataclasses
import gc
import json
import os
import time
from pathlib import Path
from unittest import mock

import matplotlib.pyplot as plt
import torch
from accelerate import PartialState
from transformers.trainer_utils import SaveStrategy

from finetune.config import REFERENCE_SPEED, RunConfig, command_from_args, command_parser, launched_processes
from finetune.data import load_splits
from finetune.model import load_for_inference, load_tokenizer
from finetune.lab.bench_eval import MODES as EVAL_MODES, compare_modes
from finetune.lab.bench_optimizers import train_for_losses
from finetune.plan import GPU, plan_evaluation, smaller_micro_batches
from finetune.sources import ModelShape
from finetune.prompts import encode_prompts
from finetune.results import environment
from finetune.throughput import (adapter_parameters, article_tokens, lm_head_on_every_token, mean_article_tokens,
                                 peak_flops, peak_memory_gib, reset_peak_memory, training_flops_per_token)
from finetune.lab.profiling import HostSyncCounter, StepClock, StepProfiler, max_over_ranks
from finetune.lab.stock_trl import STOCK_TRL, STOCK_TRL_TUNED, stock_trl_trainer
from finetune.lab.measurements import anchor_mismatch
from finetune.lab.train_variants import FSDP_VARIANTS, RECIPE_SPEED, TRAIN_VARIANTS, chosen_indices, run_order
from finetune.speedups import recomputed_layers
from finetune.train import build_trainer, launched_with_fsdp

FULL_TRAIN_ARTICLES = 120_000


def bench_train_variant(config: RunConfig, warmup_steps: int, measured_steps: int, profile: bool = False,
                        build=build_trainer, trace_path: str | None = None) -> dict:
    """Train `warmup_steps + measured_steps` optimizer steps through `build` (the notebooks' `build_trainer`, or
    stock TRL's); time the measured ones. With `profile`, one more step runs under the torch profiler (after the
    timed ones, so its overhead is not timed), its timeline written to `trace_path` if given."""
    config = dataclasses.replace(config, max_steps=warmup_steps + measured_steps + profile, logging_steps=1,
                                 run_name=f"{config.run_name}-bench")
    clock = StepClock()
    profiler = StepProfiler(warmup_steps + measured_steps + 1, trace_path)
    # The last measured step: a warm-up one may be compiling. Counting costs the host a few microseconds a sync.
    syncs = HostSyncCounter(warmup_steps + measured_steps)
    torch._dynamo.reset()  # a compiled variant compiles afresh, not from (or counted against) an earlier one's cache
    try:
        trainer = build(config, callbacks=[clock, syncs, profiler] if profile else [clock, syncs])
        trainer.args.save_strategy = SaveStrategy.NO  # else the Trainer saves a checkpoint after the last step
        # Training's peak, weights included: QLoRA quantizes a scratch model from a bf16 copy, freed before this.
        reset_peak_memory()
        trainer.train()
    except Exception as e:  # an ablation that fails (out of memory, a kernel missing) is a result, not a crash...
        if launched_processes() > 1:  # ...except on several ranks: the others would hang waiting
            raise
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    seconds, tokens = clock.window(warmup_steps, measured_steps)
    world_size = trainer.args.world_size
    tokens_per_second = tokens / seconds / world_size  # per GPU: the Trainer's count sums every rank's tokens
    optimizer_seconds = clock.optimizer_seconds[warmup_steps:warmup_steps + measured_steps]
    mean_len = mean_article_tokens(trainer.train_dataset)
    adapter_params = adapter_parameters(trainer.model)
    # The suite's trainer records its articles' tokens, a shared opening's share among them; stock TRL's runs them all.
    counts = getattr(trainer, "article_tokens", None) or article_tokens(trainer.train_dataset)
    flops = training_flops_per_token(trainer.model.config, counts, adapter_params, lm_head_on_every_token(trainer))
    peak = peak_flops()
    result = {
        "tokens_per_second": tokens_per_second,
        "step_seconds": seconds / measured_steps,
        "optimizer_step_seconds": sum(optimizer_seconds) / len(optimizer_seconds),
        "tokens_per_step": tokens / measured_steps,  # all GPUs
        "mfu": tokens_per_second * flops / peak if peak else None,
        "mfu_of": "bf16 peak",  # FP8 rows too: their matmuls are counted as bf16 FLOPs, against the bf16 peak
        "peak_allocated_gib": max_over_ranks(trainer.accelerator, peak_memory_gib()),
        "peak_reserved_gib": max_over_ranks(trainer.accelerator, peak_memory_gib(reserved=True)),
        "mean_article_tokens": mean_len,
        **dataclasses.asdict(counts),  # what the FLOPs count above read
        "adapter_parameters": adapter_params,  # None: every weight trains
        "projected_epoch_minutes_full_train": FULL_TRAIN_ARTICLES * mean_len / (tokens_per_second * world_size) / 60,
        "final_loss": next(h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h),
        # What ran, read from the trained model and trainer (an "auto" choice, TRL's default optimizer).
        "host_syncs_per_step": syncs.count,
        "host_syncs_by_site": dict(syncs.sites.most_common()) if syncs.sites is not None else None,
        "checkpointed_layers": recomputed_layers(trainer.model),
        "micro_batches": [trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps],
        "plan": {name: choice["value"] for name, choice in trainer.plan.items()} if hasattr(trainer, "plan") else None,
        "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                          else trainer.optimizer).__name__,
    }
    if profile:
        result.update(step_profile=profiler.table, nccl_kernel_share=profiler.nccl_share,
                      gpu_busy_share=profiler.busy_share, gpu_idle_ms_by_host_range=profiler.idle_by_host_range,
                      gpu_idle_between_kernels=profiler.idle_between_kernels, matmul_rates=profiler.matmul_rates)
    trainer.accelerator.free_memory()  # the accelerator holds the model and optimizer too
    del trainer
    gc.collect()
    return result


def reference_start(config: RunConfig) -> dict:
    """What every row changes first: a profile on the recipe's "auto" speed settings (the 7B shape) starts its rows
    from the reference's, so that a row's overrides say all it changes; other profiles (tiny) and FSDP runs keep theirs."""
    on_recipe = config.compile_layers == RECIPE_SPEED["compile_layers"] and not launched_with_fsdp()
    return REFERENCE_SPEED if on_recipe else {}


def bench_train(config: RunConfig, variants: dict[str, dict], warmup_steps: int, measured_steps: int,
                profile: bool = False, save=lambda results: None, stock_trl_steps: tuple[int, int] | None = None,
                trace_dir: Path | None = None) -> dict:
    """Stock TRL as documented first (with `stock_trl_steps`: its warm-up and measured steps), then every variant in
    turn, the first of them the reference, then stock TRL tuned (Liger patches the process, so it comes last); `save`
    gets the results so far after each one, so a run cut short keeps what it had. Every row trains the rows a step of
    the last variant (the one being compared; the reference's shape when it runs alone), stock TRL's rows starting at
    its micro-batches. With `profile` and
    `trace_dir`, each profiled step's timeline goes there, named by the row's order."""
    results = {}
    start = reference_start(config)
    batch = {k: {**dataclasses.asdict(config), **start, **list(variants.values())[-1]}[k]
             for k in ("per_device_train_batch_size", "gradient_accumulation_steps")}

    def stock(name: str, **switches) -> None:
        """Out of memory, the row runs again in smaller micro-batches of the same rows a step (`smaller_micro_batches`),
        as TRL's docs advise (a smaller per_device_train_batch_size, more gradient_accumulation_steps)."""
        print(f"== {name}", flush=True)
        layout, out_of_memory_at = batch, []
        while True:
            row = bench_train_variant(dataclasses.replace(config, **layout), *stock_trl_steps,
                                      build=lambda c, callbacks: stock_trl_trainer(c, callbacks, **switches))
            smaller = smaller_micro_batches(*layout.values())
            if not row.get("error", "").startswith("OutOfMemoryError") or not smaller:
                break
            out_of_memory_at.append(list(layout.values()))
            layout = dict(zip(layout, smaller))
        results[name] = {"overrides": layout, "stock_trl": switches or True, "batch": list(layout.values()),
                         "warmup_steps": stock_trl_steps[0], "measured_steps": stock_trl_steps[1],
                         **({"out_of_memory_at": out_of_memory_at} if out_of_memory_at else {}), **row}
        save(add_ratios(results, reference=next(iter(variants))))

    if stock_trl_steps:
        stock(STOCK_TRL)
    for row, (name, overrides) in enumerate(variants.items()):
        print(f"== {name}", flush=True)
        trace_path = str(trace_dir / f"row{row}.json.gz") if profile and trace_dir else None
        settings = {**start, **{k: v for k, v in overrides.items() if not k.startswith("fsdp_")}}  # overrides win
        run = dataclasses.replace(config, **settings)
        # `accelerate launch` hands the config to every rank as FSDP_* variables, which each trainer's plugin reads.
        fsdp_settings = {k.upper(): str(v).lower() for k, v in overrides.items() if k.startswith("fsdp_")}
        with mock.patch.dict(os.environ, fsdp_settings):
            results[name] = {"overrides": overrides,
                             "batch": [run.per_device_train_batch_size, run.gradient_accumulation_steps],  # as asked
                             "warmup_steps": warmup_steps, "measured_steps": measured_steps,
                             **bench_train_variant(run, warmup_steps, measured_steps, profile, trace_path=trace_path)}
        if PartialState().is_main_process:
            print(json.dumps(results[name]), flush=True)
        save(add_ratios(results, reference=next(iter(variants))))
    if stock_trl_steps and torch.cuda.is_available():  # Liger's kernels are GPU code
        for name, switches in STOCK_TRL_TUNED.items():
            stock(name, **switches)
    return results


def add_ratios(results: dict, reference: str) -> dict:
    """Each row's tokens/s over the reference's, over stock TRL's as documented, and over the fastest tuned stock TRL
    row of the same run (the anchor at its strongest), where they were measured. A ratio to stock TRL is made only
    where the anchor timed the same steps at the same batch (`targets.anchor_mismatch`); the reference's batch is part
    of what it is."""
    rate = {name: row["tokens_per_second"] for name, row in results.items() if "tokens_per_second" in row}
    tuned = max((name for name in STOCK_TRL_TUNED if name in rate), key=rate.get, default=None)
    anchors = {"speed_vs_reference": reference, "speed_vs_stock_trl": STOCK_TRL, "speed_vs_stock_trl_tuned": tuned}
    for key, anchor in anchors.items():
        for name, row in results.items():
            if anchor in rate and name in rate and (
                    key == "speed_vs_reference" or not anchor_mismatch({}, row, results[anchor])):
                row[key] = rate[name] / rate[anchor]
    return results


def teach(config: RunConfig, steps: int) -> dict:
    """The config's model trained `steps` optimizer steps through `build_trainer` (its recipe and batch, nothing saved):
    its weights (`state`, on the CPU), losses, seconds and peak memory. Weights that separate the labels, where random
    ones barely do, so that rounding (FP8's, bf16's) moves as many labels as it would for a user; without the disk and
    minutes a saved 7B folder takes. Without Liger: its kernels patch every Qwen2 model the process builds after, and
    the plain anchors, timed next, must run as transformers builds them."""
    def weights(trainer) -> dict:
        return {"state": {k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()}}

    taught = train_for_losses(dataclasses.replace(config, max_steps=steps, logging_steps=1, save_steps=10**9,
                                                  use_liger_kernel=False, run_name=f"{config.run_name}-taught"),
                              after=weights)
    return {"steps": steps, **taught}


def bench_eval(config: RunConfig, modes: list[str], repeats: int, generation_batch_size: int | None,
               teach_steps: int = 0, save=lambda compared: None) -> dict:
    """Every mode of `finetune.lab.bench_eval` over every test-split article (both sides of a holdout carve: speed does
    not depend on what the model learned; the held-out ones first, whose accuracy each mode reports), the plain
    anchors first, on one model: the config's, or with `teach_steps` that model trained first (`teach`)."""
    teaching = teach(config, teach_steps) if teach_steps else None
    config, _ = plan_evaluation(config, GPU.current(), ModelShape.of(config))  # any "auto" left: this GPU's choice
    splits = load_splits(config)
    texts = list(splits.eval["text"]) + (list(splits.train["text"]) if splits.protocol == "holdout" else [])
    tokenizer = load_tokenizer(config, train_texts=list(splits.train["text"]))
    # Liger and compiled layers come later, after the plain anchors
    model = load_for_inference(dataclasses.replace(config, use_liger_kernel=False, compile_layers=False), tokenizer)
    if teaching:
        model.load_state_dict(teaching.pop("state"))
    start = time.perf_counter()
    encode_prompts(tokenizer, texts, config.max_length)
    # the plain modes' host-side share of their time below; the suite's encode a batch while the one before runs
    # what the modes run on, in every save: a run cut short still says what its model had learned
    known = {"data": splits.describe(), **({"teaching": teaching} if teaching else {}),
             "tokenization_seconds": time.perf_counter() - start, "repeats": repeats}
    compared = compare_modes(model, tokenizer, texts, modes, batch_size=config.eval_batch_size,
                             generation_batch_size=generation_batch_size or config.eval_batch_size,
                             max_length=config.max_length, repeats=repeats, liger=config.use_liger_kernel,
                             compile_layers=config.compile_layers, held_out_labels=splits.eval["label"].to_numpy(),
                             report=lambda name, value: print(name, json.dumps(value), flush=True),
                             save=lambda so_far: save({**known, **so_far}))
    return {**known, **compared}


def plot_train(results: dict, path: Path) -> None:
    names = [n for n, r in results.items() if "tokens_per_second" in r]
    rates = [results[n]["tokens_per_second"] for n in names]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(names) + 1.5), layout="constrained")
    bars = ax.barh(names, rates)
    labels = []
    for n in names:
        mfu, stock = results[n]["mfu"], results[n].get("speed_vs_stock_trl")
        labels.append(f"{results[n]['tokens_per_second']:.0f}" + (f" ({mfu:.0%} MFU)" if mfu else "")
                      + (f" {stock:.2f}x stock TRL" if stock else ""))
    ax.bar_label(bars, labels=labels, padding=3, fontsize=8)
    ax.set_xlim(0, max(rates, default=1) * 1.6)  # room for the labels inside the frame
    ax.invert_yaxis()
    ax.set_xlabel("real tokens/s")
    ax.set_title("Training throughput by variant")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = command_parser()  # "--profile" is the config's
    parser.add_argument("what", choices=["train", "eval"])
    parser.add_argument("--name", required=True, help="writes results/benchmarks/<name>.json and .png")
    parser.add_argument("--variants", default="all", help="'all', or comma-separated names (VARIANT_SLUGS) or "
                        "indices into TRAIN_VARIANTS (FSDP_VARIANTS when launched with the FSDP config); the "
                        "reference (0) always runs first, Liger rows last")
    parser.add_argument("--modes", default=",".join(EVAL_MODES), help="eval: which modes to time, of " + ",".join(EVAL_MODES))
    parser.add_argument("--repeats", type=int, default=3, help="eval: timed passes per mode, after a warm-up pass")
    parser.add_argument("--generation_batch_size", type=int, default=None,
                        help="eval: the suite's generation batch (default: --eval_batch_size)")
    parser.add_argument("--teach_steps", type=int, default=0, help="eval: first train the model this many optimizer "
                        "steps (the config's recipe and batch, nothing saved) and time the modes on what it learned")
    parser.add_argument("--warmup_steps", type=int, default=2,
                        help="train: untimed optimizer steps a row (here not the learning rate's warm-up)")
    parser.add_argument("--measured_steps", type=int, default=5, help="train: timed optimizer steps a row")
    parser.add_argument("--profile_step", action="store_true",
                        help="train: a torch profiler table of one extra step per variant")
    parser.add_argument("--trace_dir", type=Path, default=None, help="train, with --profile_step: write each "
                        "profiled step's timeline there (row<k>.json.gz, k the row's order in the run)")
    parser.add_argument("--stock_trl_steps", default=None, help="train: 'W,M' warm-up and measured steps of the "
                        "stock TRL rows (default: the variants' own; other steps time other articles, and the rows "
                        "then get no ratio to them); 'none' skips them")
    config, known = command_from_args(parser, argv, description=__doc__)
    world_size = launched_processes()
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
        record["data"] = load_splits(config).describe()  # the articles every row trains on
        catalogue = FSDP_VARIANTS if launched_with_fsdp() else TRAIN_VARIANTS
        names = run_order(catalogue, chosen_indices(catalogue, known.variants))
        stock_trl_steps = (known.warmup_steps, known.measured_steps)
        if known.stock_trl_steps:
            stock_trl_steps = None if known.stock_trl_steps == "none" else tuple(map(int, known.stock_trl_steps.split(",")))
        if launched_with_fsdp():  # stock TRL is the single-GPU recipe: under FSDP the same set's 1-GPU run is the base
            stock_trl_steps = None
        record.update(warmup_steps=known.warmup_steps, measured_steps=known.measured_steps)
        if known.trace_dir:
            known.trace_dir.mkdir(parents=True, exist_ok=True)
        bench_train(config, {n: catalogue[n] for n in names}, known.warmup_steps, known.measured_steps,
                    known.profile_step, save, stock_trl_steps, known.trace_dir)
    else:
        def save_modes(compared: dict) -> None:  # after every mode: a run cut short keeps what it measured
            path.write_text(json.dumps({**record, **compared}, indent=2) + "\n")

        record.update(bench_eval(config, known.modes.split(","), known.repeats, known.generation_batch_size,
                                 known.teach_steps, save_modes))
        path.write_text(json.dumps(record, indent=2) + "\n")
    if PartialState().is_main_process:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
