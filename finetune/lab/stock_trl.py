"""Stock TRL: the published recipe as TRL's documentation builds it, with none of this suite's training choices. The
benchmark's first rows, so every variant is also a ratio to what a user gets from TRL alone, measured in the same run:
as documented (`STOCK_TRL`), and tuned with the speed options TRL's docs offer (`STOCK_TRL_TUNED`): Liger's kernels
(`use_liger_kernel`), FlashAttention-2 for padding-free packing where it is installed, and gradient checkpointing off
where the memory holds it. The tuned anchor of a run is the faster of its tuned rows.

What is the suite's here is only what TRL's docs leave to the user: the data (the same AG News prompt/completion
rows), the tokenizer, and the model (the config's shape: random weights where there are no Qwen weights, loaded as
a user would, bf16 weights).
"""

import dataclasses
import importlib.util

import torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from finetune.config import RunConfig
from finetune.data import load_splits, to_prompt_completion
from finetune.model import load_model, load_tokenizer

STOCK_TRL = "stock TRL SFTTrainer (packing, sdpa, bf16, full GC, AdamW)"
FLASH_ATTENTION = importlib.util.find_spec("flash_attn") is not None
_ATTENTION = "FlashAttention-2" if FLASH_ATTENTION else "sdpa (FlashAttention-2 not installed)"
# Row name -> the documented options it turns on. "Where the memory holds it": the row without checkpointing runs
# first, in smaller micro-batches of the same rows a step where the compared ones do not fit (bench.bench_train); where
# none fits it records the out-of-memory error, and the other row is the anchor.
STOCK_TRL_TUNED = {
    f"stock TRL tuned: Liger, {_ATTENTION}, no gradient checkpointing": dict(liger=True, gradient_checkpointing=False),
    f"stock TRL tuned: Liger, {_ATTENTION}, full GC": dict(liger=True, gradient_checkpointing=True),
}


def stock_trl_trainer(config: RunConfig, callbacks: list[TrainerCallback] | None = None, liger: bool = False,
                      gradient_checkpointing: bool = True) -> SFTTrainer:
    """`trl.SFTTrainer` with an `SFTConfig` of the recipe's hyperparameters and TRL's defaults for everything else
    (its optimizer, loss, collator); the batch shape, learning rate, step count, loader workers and their batches'
    copies to the GPU are the run's, so that it trains on the same tokens per step, fed alike, as the suite's rows.
    `liger` and `gradient_checkpointing` are the tuned rows' documented switches; the tuned rows also load
    FlashAttention-2 where it is installed."""
    splits = load_splits(config)
    tokenizer = load_tokenizer(config, train_texts=list(splits.train["text"]))
    attention = "flash_attention_2" if liger and FLASH_ATTENTION else "sdpa"
    # bf16 weights as from_pretrained(dtype="auto") gives for Qwen2.5 (weights_dtype reads the optimizer: plain AdamW).
    model = load_model(dataclasses.replace(config, optimizer="adamw"), tokenizer, attn_implementation=attention)
    args = SFTConfig(
        output_dir=str(config.output_dir),
        packing=True,
        bf16=config.bf16,
        gradient_checkpointing=gradient_checkpointing,
        use_liger_kernel=liger,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_length=config.max_length,
        learning_rate=config.learning_rate,
        max_steps=config.max_steps,
        logging_steps=config.logging_steps,
        dataloader_num_workers=config.dataloader_num_workers,
        accelerator_config={"non_blocking": torch.cuda.is_available()},
        seed=config.seed,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),  # the CPU smoke test; a GPU user never sets it
    )
    return SFTTrainer(model=model, args=args, processing_class=tokenizer, callbacks=callbacks,
                      train_dataset=to_prompt_completion(splits.train, tokenizer, config.max_length))
