"""Fine-tuning (full, LoRA or QLoRA) with TRL's SFTTrainer: config in, trainer built in named steps, train, save.

    python -m finetune.train --data_dir /data/ag_news                        # the qwen2.5-7b recipe
    python -m finetune.train --profile tiny                                  # 2.4M parameters, CPU, minutes
    python -m finetune.train --method lora                                   # final/ holds the adapter: finetune.merge
    python -m finetune.train --profile qwen2.5-7b-reference                  # no speed-ups: the yardstick
    accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 4 -m finetune.train
        --gradient_checkpointing false                                       # FSDP2: FSDP checkpoints activations
"""

import json
import logging
import os
import time
from pathlib import Path

import torch
import trl
import trl.trainer.utils
from accelerate import PartialState
from torch.distributed.fsdp import FSDPModule
from transformers import TrainerCallback
from trl import SFTConfig

from data_prep.read import DataError
from data_prep.splits import Splits
from finetune.adapters import adapter_alone_in_saves, adapters_in_weights_dtype, check_method, lora_config
from finetune.attention import choose_attn_implementation, unmasked_packed_rows
from finetune.config import RunConfig, config_from_args
from finetune.data import load_splits, to_prompt_completion
from finetune.disk import OutOfDisk, check_disk, free_bytes, planned_steps, saved_tokenizer_bytes, written_bytes
from finetune.grad_accumulation import GradIntoBuffers, accumulate_in_matmul
from finetune.last_layer import ReadPositionsCollator, mlp_only_where_read
from finetune.model import check_tokenizer_fits, load_model, load_tokenizer
from finetune.opening import TOKENS_SAVED, SharedOpeningCollator, planned_row_tokens, training_opening
from finetune.plan import GPU, OutOfMemory, gpu_memory_note, log_plan, plan_training, smaller_micro_batches
from finetune.resume import (SaveRunConfig, check_resume, checkpoint_step, kept_optimizer, last_checkpoint,
                             run_finished, run_metrics)
from finetune.sources import ModelShape, SourceNotFound
from finetune.speedups import (OPTIMIZERS, check_speedups, compile_decoder_layers, convert_to_fp8, decoder_layers,
                               recomputed_layers, weights_dtype)
from finetune.throughput import (ThroughputCallback, adapter_parameters, article_tokens, peak_memory_gib,
                                 reset_peak_memory)

log = logging.getLogger(__name__)


def launched_with_fsdp() -> bool:
    """Started by `accelerate launch` with an FSDP config (configs/accelerate/fsdp2.yaml): accelerate's own test."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def sft_config(config: RunConfig) -> SFTConfig:
    """The run config in TRL's terms; every training hyperparameter passes through here unchanged."""
    # FSDP2's mixed precision shards fp32 weights and computes in bf16 (accelerate upcasts bf16 weights to fp32 as it
    # shards them): that is adamw_fp32_master. The optimizers that keep bf16 weights run with it off, so their shards
    # stay bf16, the compute is bf16 anyway, and stochastic rounding has bf16 weights to round into.
    mixed_bf16 = config.bf16 and not (launched_with_fsdp() and weights_dtype(config) == torch.bfloat16)
    args = SFTConfig(
        output_dir=str(config.output_dir),
        learning_rate=config.learning_rate if config.method == "full" else config.lora_learning_rate,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_length=config.max_length,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        weight_decay=config.weight_decay,
        gradient_checkpointing=config.gradient_checkpointing,
        use_liger_kernel=config.use_liger_kernel,
        bf16=mixed_bf16,
        # Packing is padding-free best-fit: whole articles share a row, the attention keeps them apart.
        packing=config.packing,
        packing_strategy="bfd",
        completion_only_loss=True,
        optim="adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch",
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        # On, the Trainer reads every micro-batch's loss back to leave NaN and inf out of the logged average: a host
        # sync after each backward, just before the optimizer's host work, which the GPU then waits for. Off, a NaN
        # shows in the logged loss, where a diverging run should show it.
        logging_nan_inf_filter=False,
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        dataloader_num_workers=config.dataloader_num_workers,
        # Each step's batches are fetched before its first forward; a blocking copy of them to the GPU waited for the
        # previous step's update to finish, and the GPU then waited for the host. From pinned memory, they queue.
        accelerator_config={"non_blocking": torch.cuda.is_available()},
        report_to=["tensorboard"],
        use_cpu=not torch.cuda.is_available(),
    )
    args.mixed_precision = "bf16" if mixed_bf16 else "no"  # the run config decides, not accelerate's --mixed_precision
    return args


def optimizer_cls_and_kwargs(config: RunConfig, args: SFTConfig) -> tuple[type, dict] | None:
    """The optimizer for `config.optimizer`; None lets the Trainer build its plain AdamW from `args`."""
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {config.optimizer!r}; choose from {tuple(OPTIMIZERS)}")
    optimizer = OPTIMIZERS[config.optimizer]
    if not optimizer.rounds_stochastically:
        return None
    if not config.bf16:
        raise ValueError(f"optimizer={config.optimizer!r} rounds into bf16 weights: it needs bf16=True")
    from finetune.optim import AdamWBf16SR  # imported here: torchao is slow to import and only this option needs it

    return AdamWBf16SR, {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2),
                         "eps": args.adam_epsilon, "weight_decay": args.weight_decay,
                         "state_bits": optimizer.state_bits, "rounding_seed": config.seed, "fused": optimizer.fused}


class FusedHeadSFTTrainer(trl.SFTTrainer):
    """TRL's SFTTrainer with its fused LM head, which scores only the positions that carry loss, on every device, and
    which under FSDP2 gathers the weights once per optimizer step rather than once per micro-batch.

    TRL does that where Triton is available and scores every position elsewhere (fixed tile shapes for accelerators
    without it). On the CPU nothing is compiled, and with the loss on ~7 answer tokens of ~120 the full head is two
    thirds of each step. TRL reads the choice from a module-level function at each forward, so it is swapped for this
    trainer's loss computation only (the backward does not read it); tests/test_train.py checks loss and gradients.
    """

    opening_tokens_saved: int | None = None  # this process's, where the opening is shared (finetune.opening)

    def compute_loss(self, model, inputs, *args, **kwargs):
        if TOKENS_SAVED in inputs:
            self.opening_tokens_saved += inputs.pop(TOKENS_SAVED)
        use_triton = trl.trainer.utils._use_triton
        trl.trainer.utils._use_triton = lambda device: True
        try:
            return super().compute_loss(model, inputs, *args, **kwargs)
        finally:
            trl.trainer.utils._use_triton = use_triton

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's `num_tokens` counts the tokens the model ran; with the opening shared, the articles' tokens are
        that and the openings not run again (all processes', one reduction a log), so that tokens/s and the
        benchmarks' ratios count the same articles' tokens for every configuration."""
        if self.opening_tokens_saved is not None and self._metrics["train"].get("num_tokens"):
            saved = torch.tensor(self.opening_tokens_saved, device=self.args.device)
            total = self._total_train_tokens + int(self.accelerator.reduce(saved, "sum"))
            self._metrics["train"]["num_tokens"] = [total]
        super().log(logs, start_time)

    def training_step(self, model, *args, **kwargs):
        """Under FSDP2 with `reshard_after_forward: false` (configs/accelerate/fsdp2.yaml), the gathered weights also
        stay after every backward but the step's last: the weights do not change between micro-batches, so gathering
        them again (2 x the model's bytes per micro-batch) is pure communication. Gradients are not reduced between
        micro-batches either (accelerate's `no_sync`), so a step costs one all-gather and one reduce-scatter."""
        if isinstance(model, FSDPModule) and not self.accelerator.state.fsdp_plugin.reshard_after_forward:
            model.set_reshard_after_backward(self.accelerator.sync_gradients)
        return super().training_step(model, *args, **kwargs)

    def _clip_grad_norm(self, model):
        """AdamWBf16SR clips inside its step (`clip_grad_norm_`: the norm now, the scaling in the fused update), one
        pass over the gradients fewer; sharded gradients (FSDP) take accelerate's clipping."""
        optimizer = self.optimizer.optimizer  # accelerate's wrapper holds it
        if hasattr(optimizer, "clip_grad_norm_") and not self.is_fsdp_enabled:
            return optimizer.clip_grad_norm_(self.args.max_grad_norm)
        return super()._clip_grad_norm(model)


class SelectiveCheckpointing(TrainerCallback):
    """Activation checkpointing on the first `n` decoder layers only: the others keep their activations and skip the
    recompute. The Trainer turns checkpointing on for every layer as training starts, so this runs right after."""

    def __init__(self, n: int):
        self.n = n

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for i, layer in enumerate(decoder_layers(model)):
            layer.gradient_checkpointing = i < self.n


def build_trainer(config: RunConfig, callbacks: list[TrainerCallback] | None = None,
                  splits: Splits | None = None) -> FusedHeadSFTTrainer:
    """Data, tokenizer, the plan of the "auto" settings, training arguments, model and trainer, in that order, from
    one config. `splits` replaces the config's data (e.g. a carve of the training articles for choosing settings)."""
    check_method(config)  # QLoRA without a GPU or bitsandbytes fails here, before the data loads
    check_speedups(config)
    shape = ModelShape.of(config)  # checks the model source before the data loads
    splits = splits or load_splits(config)
    texts = list(splits.train["text"])
    with PartialState().main_process_first():  # one rank builds and caches a tokenizer, then the others load it
        tokenizer = load_tokenizer(config, train_texts=texts)
    config, plan = plan_training(config, GPU.current(), shape, fsdp=launched_with_fsdp(),
                                 row_tokens=planned_row_tokens(config, tokenizer, texts))
    if PartialState().num_processes > 1:  # every rank runs rank 0's plan: each planned from its own free memory, and
        shared = [config, plan]  # ranks at other micro-batches or optimizers would not reduce the same gradients
        torch.distributed.broadcast_object_list(shared, src=0)
        config, plan = shared
    check_speedups(config)  # again, on what "auto" became (FP8 chosen beside a sum in the matmul asked for)
    log_plan(plan, "training")
    args = sft_config(config)
    attn_implementation = choose_attn_implementation(config.attn_implementation, config.packing, config.shares_opening)
    model = load_model(config, tokenizer, attn_implementation)
    check_tokenizer_fits(tokenizer, model)
    if config.packing:
        unmasked_packed_rows(model)
    if config.fp8:
        convert_to_fp8(model, config.fp8)
    summed_in_matmul = accumulate_in_matmul(model) if config.accumulate_in_matmul else []
    reads_rows = config.packing and config.last_layer_where_read  # a packed row's positions: padding-free only
    if reads_rows:
        mlp_only_where_read(model)
    if config.compile_layers:
        compile_decoder_layers(model)
    # LoRA and QLoRA: TRL wraps the model with the adapter and trains only that (None: full fine-tuning).
    trainer = FusedHeadSFTTrainer(model=model, args=args,
                                  train_dataset=to_prompt_completion(splits.train, tokenizer, config.max_length),
                                  processing_class=tokenizer, callbacks=callbacks,
                                  peft_config=lora_config(config, model),
                                  optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(config, args))
    if config.method != "full":
        adapters_in_weights_dtype(trainer.model, weights_dtype(config))
        if config.lora_embedding:
            adapter_alone_in_saves(trainer.model)
    opening = training_opening(trainer.train_dataset) if config.shares_opening else []
    if opening:
        trainer.data_collator = SharedOpeningCollator(trainer.data_collator, opening)
        trainer.opening_tokens_saved = 0
    if reads_rows:
        trainer.data_collator = ReadPositionsCollator(trainer.data_collator)
    trainer.article_tokens = article_tokens(trainer.train_dataset, len(opening), args.per_device_train_batch_size,
                                            reads_rows)
    # First in line, so the TensorBoard and progress callbacks see the numbers it adds to each log.
    throughput = ThroughputCallback(model.config, trainer.article_tokens, adapter_parameters(trainer.model))
    trainer.callback_handler.callbacks.insert(0, throughput)
    if config.gradient_checkpointing and config.checkpointed_layers is not None:
        trainer.add_callback(SelectiveCheckpointing(config.checkpointed_layers))
    if summed_in_matmul:
        trainer.add_callback(GradIntoBuffers(summed_in_matmul))
    trainer.splits = splits  # what the run trained on, for its summary
    trainer.plan, trainer.run_config = plan, config  # the "auto" settings as chosen (with their reasons), and all
    _drop_notebook_loss_table(trainer)
    return trainer


def _drop_notebook_loss_table(trainer: FusedHeadSFTTrainer) -> None:
    """In a notebook the Trainer's progress bar also prints a table of every logged loss, dozens of rows."""
    from transformers.utils import is_in_notebook

    if is_in_notebook():
        from transformers.utils.notebook import NotebookProgressCallback

        from finetune.notebook_progress import ProgressBarOnly

        trainer.remove_callback(NotebookProgressCallback)
        trainer.add_callback(ProgressBarOnly)


def train(config: RunConfig, callbacks: list[TrainerCallback] | None = None, splits: Splits | None = None) -> Path:
    """Train (resuming from the run's last checkpoint if one exists), save the final model, return its folder.

    A finished run is left as it is: its final model and summary (with the real training time) stay, also when a
    changed run config (allow_config_change) adds no step to it."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # only fp32 leftovers use it; bf16 matmuls are unaffected
        torch.backends.cudnn.benchmark = True
    last = last_checkpoint(config.output_dir)
    if last and not check_resume(config, last) and run_finished(config, last):
        log.warning("%s is finished (%s is its last step); its final model and train_summary.json stay as they are. "
                    "Delete %s or choose another run_name to train again.", config.run_name, Path(last).name,
                    config.output_dir)
        return config.final_dir
    start = time.perf_counter()
    save_clock = SaveClock()
    kept = kept_optimizer(config, last)
    trainer = build_trainer(kept, [*(callbacks or []), save_clock], splits)
    if kept.optimizer != config.optimizer:  # the summary's plan says what ran, and why
        trainer.plan["optimizer"] = {"value": kept.optimizer, "reason": f"{kept.optimizer}: kept, as the moments in "
                                     f"{Path(last).name} are in its format"}
        log.info("optimizer: %s", trainer.plan["optimizer"]["reason"])
    trainer.add_callback(SaveRunConfig(config, trainer.run_config.optimizer))
    setup_seconds = time.perf_counter() - start
    log.info("disk: %s", check_disk(trainer.run_config, ModelShape.of(config), planned_steps(trainer),
                                    free_bytes(config.output_dir), written_bytes(config.output_dir),
                                    saved_tokenizer_bytes(trainer.processing_class)))
    if last:
        log.info("resuming from %s", last)
    reset_peak_memory()
    start = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=last)
    except torch.OutOfMemoryError as error:
        raise OutOfMemory(out_of_memory_advice(config, trainer)) from error
    if last and trainer.state.global_step == checkpoint_step(last) and run_finished(config, last):
        log.warning("%s is finished and the changed run config adds no step to it; its final model and "
                    "train_summary.json stay as they are.", config.run_name)
        return config.final_dir
    train_seconds, peak_gib = time.perf_counter() - start, peak_memory_gib()
    save_start = time.perf_counter()
    save_final_model(trainer, config.final_dir)
    final_save_seconds = time.perf_counter() - save_start
    # Every rank gets here; only the main one, which saved the model, writes (another rank would write into final/
    # before or while rank 0 creates it). The barrier then returns every rank with final/ complete.
    if trainer.is_world_process_zero():
        state = trainer.state
        summary = {"config": config.to_dict(), "plan": trainer.plan, "data": trainer.splits.describe(),
                   "resumed_from": last,
                   "world_size": trainer.args.world_size, "train_seconds": train_seconds,
                   "setup_seconds": setup_seconds, "final_save_seconds": final_save_seconds,
                   "checkpoint_save_seconds": save_clock.seconds, "peak_memory_gib": peak_gib,
                   # What one update sees: packing fits several articles in a row, so it changes this, not only speed.
                   "optimizer_steps": state.global_step,
                   # After a resume train_seconds, checkpoint_save_seconds and peak_memory_gib are this session's.
                   "optimizer_steps_this_session": state.global_step - (checkpoint_step(last) if last else 0),
                   "articles_per_optimizer_step": len(trainer.splits.train) * state.epoch / max(state.global_step, 1),
                   "metrics": run_metrics(result.metrics, state.log_history, last, state.global_step),
                   "log_history": state.log_history,
                   "tensorboard": tensorboard_scalars(config.output_dir)}
        (config.final_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    trainer.accelerator.wait_for_everyone()
    return config.final_dir


def out_of_memory_advice(config: RunConfig, trainer: FusedHeadSFTTrainer) -> str:
    """What a training step that ran out of GPU memory leaves, and the settings that need less: recomputing more
    layers or a smaller memory budget may change when a run resumes; fewer rows a micro-batch (the same update over
    more micro-batches) changes the run config, so resuming with it must be allowed."""
    checkpoint = last_checkpoint(config.output_dir)
    kept = (f"Training up to {Path(checkpoint).name} is kept: the same command resumes from it" if checkpoint else
            f"No checkpoint was written yet (one every {config.save_steps} steps): a rerun starts afresh")
    planned, layers, recomputed = trainer.run_config, decoder_layers(trainer.model), recomputed_layers(trainer.model)
    rows, accumulation = planned.per_device_train_batch_size, planned.gradient_accumulation_steps
    options = []
    if recomputed < len(layers) and not trainer.is_fsdp_enabled:  # FSDP's own activation checkpointing is not seen
        switch = "" if planned.gradient_checkpointing else "--gradient_checkpointing true "
        # Layers given keep the micro-batches given (plan.py): where the plan had merged them, name the ones that ran.
        merged = (rows, accumulation) != (config.per_device_train_batch_size, config.gradient_accumulation_steps)
        layout = (f" --per_device_train_batch_size {rows} --gradient_accumulation_steps {accumulation} (resuming "
                  "with them needs --allow_config_change true)" if merged else "")
        options.append(f"recompute more of the {len(layers)} decoder layers' activations (now {recomputed}): "
                       f"{switch}--checkpointed_layers {min(len(layers), recomputed + max(1, len(layers) // 4))}"
                       f"{layout}")
    options.append("plan the 'auto' settings within a smaller budget: --max_memory_gib <GiB>")
    smaller = smaller_micro_batches(rows, accumulation)
    if smaller:
        unmerged = " --merge_micro_batches false" if config.merge_micro_batches is not False else ""  # else re-merged
        options.append(f"the same update over more, smaller micro-batches: --per_device_train_batch_size "
                       f"{smaller[0]} --gradient_accumulation_steps {smaller[1]}{unmerged} (resuming with them needs "
                       "--allow_config_change true)")
    return (f"CUDA ran out of memory at optimizer step {trainer.state.global_step + 1}{gpu_memory_note()}. {kept}. "
            f"To need less: {'; or '.join(options)}.")


class SaveClock(TrainerCallback):
    """Seconds each checkpoint took to write (model, optimizer and trainer state): on a 7B model, tens of GB."""

    def __init__(self):
        self.seconds, self._start = [], None

    def on_step_end(self, args, state, control, **kwargs):
        self._start = time.perf_counter() if control.should_save else None

    def on_save(self, args, state, control, **kwargs):
        if self._start is not None:
            self.seconds.append(time.perf_counter() - self._start)


def save_final_model(trainer: FusedHeadSFTTrainer, folder: Path) -> None:
    """The trained model as `from_pretrained` loads it, from every rank (under FSDP the save gathers the shards); for
    LoRA and QLoRA the adapter alone, as peft's `from_pretrained` loads it onto the base model.

    With SHARDED_STATE_DICT, Trainer.save_model writes nothing under FSDP (checkpoints get DCP shards instead), so the
    final save switches to FULL_STATE_DICT first, as accelerate's plugin documents for this case."""
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(folder)


def tensorboard_scalars(output_dir: Path) -> dict[str, dict]:
    """Every scalar TensorBoard holds for the run, as {tag: {"steps": [...], "values": [...]}}, for results files. A
    resumed run writes a new event file and logs again the steps after its checkpoint that the interrupted one had
    logged: the later file's value stands (the files' names begin with their start time)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    by_step = {}
    for events in sorted((output_dir / "runs").rglob("events.out.tfevents.*"), key=lambda path: path.name):
        accumulator = EventAccumulator(str(events)).Reload()
        for tag in accumulator.Tags()["scalars"]:
            by_step.setdefault(tag, {}).update((p.step, p.value) for p in accumulator.Scalars(tag))
    return {tag: {"steps": sorted(points), "values": [points[step] for step in sorted(points)]}
            for tag, points in by_step.items()}


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = config_from_args(argv, description=__doc__)
    try:
        print(f"final model: {train(config)}")
    except (OutOfMemory, OutOfDisk, SourceNotFound, DataError) as error:  # the message says it all
        raise SystemExit(f"error: {error}") from None
    finally:
        # FSDP ranks: the process group's threads stopped here, not by its destructor at interpreter exit, where a gloo
        # rank once aborted ("terminate called without an active exception") after its last save (tests/test_fsdp.py)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
