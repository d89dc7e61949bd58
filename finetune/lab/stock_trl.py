"""Stock TRL: the published recipe as TRL's documentation builds it, with none of this suite's training choices. The
benchmark's first row, so every variant is also a ratio to what a user gets from TRL alone, measured in the same run.

What is the suite's here is only what TRL's docs leave to the user: the data (the same AG News prompt/completion
rows), the tokenizer, and the model (the config's shape: random weights where there are no Qwen weights, loaded as
a user would, sdpa attention, bf16 weights).
"""

import dataclasses

import torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from finetune.config import RunConfig
from finetune.data import load_splits, to_prompt_completion
from finetune.model import load_model, load_tokenizer

STOCK_TRL = "stock TRL SFTTrainer (packing, sdpa, bf16, full GC, AdamW)"


def stock_trl_trainer(config: RunConfig, callbacks: list[TrainerCallback] | None = None) -> SFTTrainer:
    """`trl.SFTTrainer` with an `SFTConfig` of the recipe's hyperparameters and TRL's defaults for everything else
    (its optimizer, loss, collator, loader workers); the batch shape, learning rate and step count are the run's,
    so that it trains on the same tokens per step as the suite's reference row."""
    splits = load_splits(config)
    tokenizer = load_tokenizer(config, train_texts=list(splits.train["text"]))
    # bf16 weights as from_pretrained(dtype="auto") gives for Qwen2.5 (weights_dtype reads the optimizer: plain AdamW).
    model = load_model(dataclasses.replace(config, optimizer="adamw"), tokenizer, attn_implementation="sdpa")
    args = SFTConfig(
        output_dir=str(config.output_dir),
        packing=True,
        bf16=config.bf16,
        gradient_checkpointing=True,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_length=config.max_length,
        learning_rate=config.learning_rate,
        max_steps=config.max_steps,
        logging_steps=config.logging_steps,
        seed=config.seed,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),  # the CPU smoke test; a GPU user never sets it
    )
    return SFTTrainer(model=model, args=args, processing_class=tokenizer, callbacks=callbacks,
                      train_dataset=to_prompt_completion(splits.train, tokenizer, config.max_length))
