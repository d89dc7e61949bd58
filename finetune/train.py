"""Full fine-tuning with TRL's SFTTrainer: config in, trainer built in a few named steps, train, save.

    python -m finetune.train --profile tiny
    python -m finetune.train --profile qwen2.5-7b --data_dir /data/ag_news
"""

import json
import logging
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.trainer_utils import get_last_checkpoint
import trl.trainer.utils
from trl import SFTConfig, SFTTrainer

from finetune.attention import choose_attn_implementation
from finetune.config import RunConfig, config_from_args
from finetune.data import load_splits, to_prompt_completion
from finetune.model import load_model, load_tokenizer
from finetune.throughput import ThroughputCallback, mean_article_tokens

log = logging.getLogger(__name__)

# TRL's fused LM head scores only the positions that carry loss when Triton is available, and every position
# otherwise (to keep compiled tile shapes fixed on accelerators without it). On the CPU nothing is compiled, and
# with the loss on ~7 answer tokens of ~120 the full head is two thirds of each step; score only those positions.
trl.trainer.utils._use_triton = lambda device: True


def sft_config(config: RunConfig) -> SFTConfig:
    """The run config in TRL's terms; every training hyperparameter passes through here unchanged."""
    return SFTConfig(
        output_dir=str(config.output_dir),
        learning_rate=config.learning_rate,
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
        bf16=config.bf16,
        # Packing is padding-free best-fit: whole articles share a row, the attention keeps them apart.
        packing=config.packing,
        packing_strategy="bfd",
        completion_only_loss=True,
        optim="adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch",
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        dataloader_num_workers=config.dataloader_num_workers,
        report_to=["tensorboard"],
        use_cpu=not torch.cuda.is_available(),
    )


OPTIMIZERS = ("adamw", "adamw_bf16_sr", "adamw_fp32_master")


def optimizer_cls_and_kwargs(config: RunConfig, args: SFTConfig) -> tuple[type, dict] | None:
    """The optimizer for `config.optimizer`; None lets the Trainer build its plain AdamW from `args`."""
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {config.optimizer!r}; choose from {OPTIMIZERS}")
    if config.optimizer != "adamw_bf16_sr":
        return None
    if not config.bf16:
        raise ValueError("optimizer='adamw_bf16_sr' rounds into bf16 weights: it needs bf16=True")
    from finetune.optim import AdamWBf16SR  # imported here: torchao is slow to import and only this option needs it

    return AdamWBf16SR, {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2),
                         "eps": args.adam_epsilon, "weight_decay": args.weight_decay}


class SelectiveCheckpointing(TrainerCallback):
    """Activation checkpointing on the first `n` decoder layers only: the others keep their activations and skip the
    recompute. The Trainer turns checkpointing on for every layer as training starts, so this runs right after."""

    def __init__(self, n: int):
        self.n = n

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i < self.n


def build_trainer(config: RunConfig, callbacks: list[TrainerCallback] | None = None) -> SFTTrainer:
    """Data, tokenizer, model and trainer, in that order, from one config."""
    splits = load_splits(config)
    tokenizer = load_tokenizer(config, train_texts=list(splits.train["text"]))
    attn_implementation = choose_attn_implementation(config.attn_implementation, config.packing)
    model = load_model(config, tokenizer, attn_implementation)
    args = sft_config(config)
    trainer = SFTTrainer(model=model, args=args, train_dataset=to_prompt_completion(splits.train),
                         processing_class=tokenizer, callbacks=callbacks,
                         optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(config, args))
    # First in line, so the TensorBoard and progress callbacks see the numbers it adds to each log.
    throughput = ThroughputCallback(model.config, mean_article_tokens(trainer.train_dataset))
    trainer.callback_handler.callbacks.insert(0, throughput)
    if config.gradient_checkpointing and config.checkpointed_layers is not None:
        trainer.add_callback(SelectiveCheckpointing(config.checkpointed_layers))
    trainer.splits = splits  # what the run trained on, for its summary
    return trainer


def last_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint to resume from; a partial one (interrupted while saving) is an error, not a guess."""
    last = get_last_checkpoint(output_dir) if output_dir.is_dir() else None
    if last:
        missing = [f for f in ("trainer_state.json", "optimizer.pt") if not (Path(last) / f).exists()]
        if not any(Path(last).glob("model*.safetensors")):
            missing.append("model.safetensors")
        if missing:
            raise RuntimeError(f"checkpoint {last} is incomplete (missing {', '.join(missing)}), probably cut off "
                               "while saving. Delete that folder to resume from the one before it.")
    return last


def train(config: RunConfig, callbacks: list[TrainerCallback] | None = None) -> Path:
    """Train (resuming from the run's last checkpoint if one exists), save the final model, return its folder."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # only fp32 leftovers use it; bf16 matmuls are unaffected
        torch.backends.cudnn.benchmark = True
    last = last_checkpoint(config.output_dir)
    trainer = build_trainer(config, callbacks)
    if last:
        log.info("resuming from %s", last)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=last)
    trainer.save_model(config.final_dir)
    summary = {"config": config.to_dict(), "data": trainer.splits.describe(), "resumed_from": last,
               "train_seconds": time.perf_counter() - start, "metrics": result.metrics,
               "log_history": trainer.state.log_history, "tensorboard": tensorboard_scalars(config.output_dir)}
    (config.final_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return config.final_dir


def tensorboard_scalars(output_dir: Path) -> dict[str, dict]:
    """Every scalar TensorBoard holds for the run, as {tag: {"steps": [...], "values": [...]}}, for results files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for events in sorted((output_dir / "runs").rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events)).Reload()
        for tag in accumulator.Tags()["scalars"]:
            points = accumulator.Scalars(tag)
            entry = scalars.setdefault(tag, {"steps": [], "values": []})
            entry["steps"] += [p.step for p in points]
            entry["values"] += [p.value for p in points]
    return scalars


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = config_from_args(argv, description=__doc__)
    print(f"final model: {train(config)}")


if __name__ == "__main__":
    main()
