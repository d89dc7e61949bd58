"""Full fine-tuning with TRL's SFTTrainer: config in, trainer built in a few named steps, train, save.

    python -m finetune.train --profile tiny
    python -m finetune.train --profile qwen2.5-7b --data_dir /data/ag_news
"""

import json
import logging
import time
from pathlib import Path

import torch
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer

from finetune.attention import choose_attn_implementation
from finetune.config import RunConfig, config_from_args
from finetune.data import load_splits, to_prompt_completion
from finetune.model import load_model, load_tokenizer

log = logging.getLogger(__name__)


def sft_config(config: RunConfig) -> SFTConfig:
    """The run config in TRL's terms; every training hyperparameter passes through here unchanged."""
    return SFTConfig(
        output_dir=str(config.output_dir),
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_train_epochs,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_length=config.max_length,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        weight_decay=config.weight_decay,
        gradient_checkpointing=config.gradient_checkpointing,
        bf16=config.bf16,
        # Packing is padding-free best-fit: whole articles share a row, the attention keeps them apart.
        packing=config.packing,
        packing_strategy="bfd",
        completion_only_loss=True,
        optim=config.optim,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        dataloader_num_workers=config.dataloader_num_workers,
        report_to=["tensorboard"],
        use_cpu=not torch.cuda.is_available(),
    )


def build_trainer(config: RunConfig) -> SFTTrainer:
    """Data, tokenizer, model and trainer, in that order, from one config."""
    splits = load_splits(config)
    tokenizer = load_tokenizer(config, train_texts=list(splits.train["text"]))
    attn_implementation = choose_attn_implementation(config.attn_implementation, config.packing)
    model = load_model(config, tokenizer, attn_implementation)
    trainer = SFTTrainer(model=model, args=sft_config(config), train_dataset=to_prompt_completion(splits.train),
                         processing_class=tokenizer)
    trainer.splits = splits  # what the run trained on, for its summary
    return trainer


def train(config: RunConfig) -> Path:
    """Train (resuming from the run's last checkpoint if one exists), save the final model, return its folder."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # only fp32 leftovers use it; bf16 matmuls are unaffected
        torch.backends.cudnn.benchmark = True
    trainer = build_trainer(config)
    last = get_last_checkpoint(config.output_dir) if config.output_dir.is_dir() else None
    if last:
        log.info("resuming from %s", last)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=last)
    trainer.save_model(config.final_dir)
    summary = {"config": config.to_dict(), "data": trainer.splits.describe(), "resumed_from": last,
               "train_seconds": time.perf_counter() - start, "metrics": result.metrics,
               "log_history": trainer.state.log_history}
    (config.final_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return config.final_dir


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = config_from_args(argv, description=__doc__)
    print(f"final model: {train(config)}")


if __name__ == "__main__":
    main()
