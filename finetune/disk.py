"""The disk a run's saves need, checked before its first step: a 7B checkpoint is tens of GB, and a disk that fills
during a save ends the run there (seen on a 64 GiB disk: with a 15 GB model folder beside it, the recipe's 46 GB
checkpoint with bf16 moments was written, the 15 GB final model after it was not)."""

import math
import os
import shutil
import tempfile
from pathlib import Path

from finetune.config import RunConfig
from finetune.plan import trained_parameter_bytes, weight_bytes
from finetune.sources import ModelShape


class OutOfDisk(RuntimeError):
    """The run's checkpoints and final model would not fit on the disk it writes them to."""


def save_bytes(config: RunConfig, shape: ModelShape, tokenizer_bytes: int = 0) -> tuple[float, float]:
    """Bytes of one resumable checkpoint (the trained weights and both AdamW moments: the training state less the
    gradients) and of the final model, each with the `tokenizer_bytes` the Trainer saves beside them. Full
    fine-tuning saves every weight; LoRA and QLoRA the adapters."""
    trained = shape.parameters if config.method == "full" else shape.adapter_parameters(config.lora_rank)
    weights = trained * weight_bytes(config)
    return trained * trained_parameter_bytes(config) - weights + tokenizer_bytes, weights + tokenizer_bytes


def saved_tokenizer_bytes(tokenizer) -> int:
    """What saving `tokenizer` writes: 19 MB for Qwen2.5's, in every checkpoint and the final model; next to a LoRA
    run's adapters that is a tenth of its saves (results/rehearsal/h100_lora/)."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return folder_bytes(folder)


def check_disk(config: RunConfig, shape: ModelShape, optimizer_steps: int, free: float, written: float = 0.0,
               tokenizer_bytes: int = 0) -> str:
    """What the run's saves add to the disk at most, against `free` bytes; raises OutOfDisk where they do not fit.
    The Trainer saves every `save_steps` and at the end, and writes each checkpoint before deleting the oldest past
    `save_total_limit`, so one more than the limit exists for a while; the final model follows the last of them.
    `written`: the bytes of the run's checkpoints already on disk (a resumed run), part of that peak;
    `tokenizer_bytes`: what saving the tokenizer writes (`saved_tokenizer_bytes`)."""
    checkpoint, final = save_bytes(config, shape, tokenizer_bytes)
    writes = math.ceil(optimizer_steps / config.save_steps)

    def need(kept: int) -> float:
        return max(min(writes, kept + 1) * checkpoint, min(writes, kept) * checkpoint + final) - written

    kept = config.save_total_limit or writes  # None or 0: the Trainer keeps every checkpoint
    summary = (f"{writes} checkpoint(s) of {checkpoint / 1e9:.1f} GB over {optimizer_steps} steps, up to "
               f"{min(writes, kept + 1)} at once (save_total_limit={config.save_total_limit}), and a "
               f"{final / 1e9:.1f} GB final model: {max(need(kept), 0) / 1e9:.1f} GB more, "
               f"{free / 1e9:.1f} GB free")
    if need(kept) > free:
        fewer = (f"; or keep one checkpoint, --save_total_limit 1 ({max(need(1), 0) / 1e9:.1f} GB)"
                 if need(1) < need(kept) else "")
        raise OutOfDisk(f"The run's saves would not fit under {config.output_dir}: {summary}. Free space there, or "
                        f"write elsewhere: --checkpoints_dir <a folder on a larger disk>{fewer}.")
    return summary


def free_bytes(path: Path) -> float:
    """Free bytes on the disk that holds `path`, or will once it is made."""
    return shutil.disk_usage(_made(path)).free


def same_disk(a: Path, b: Path) -> bool:
    return os.stat(_made(a)).st_dev == os.stat(_made(b)).st_dev


def written_bytes(output_dir: Path) -> int:
    """The bytes of a run's checkpoints already on disk."""
    return sum(folder_bytes(checkpoint) for checkpoint in output_dir.glob("checkpoint-*"))


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _made(path: Path) -> Path:
    return next(p for p in [Path(path), *Path(path).parents] if p.exists())


def planned_steps(trainer) -> int:
    """The optimizer steps the Trainer will run in all, counted as it counts them (its data loader's batches, which
    split the rows over the ranks, gathered into steps, times the epochs), before it builds the loader itself."""
    args = trainer.args
    if args.max_steps > 0:
        return args.max_steps
    batches = math.ceil(len(trainer.train_dataset) / (args.per_device_train_batch_size * args.world_size))
    return math.ceil(args.num_train_epochs * max(math.ceil(batches / args.gradient_accumulation_steps), 1))
