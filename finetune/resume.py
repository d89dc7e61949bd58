"""Resuming a run: its newest complete checkpoint, and whether the run config it was trained with lets it resume.

Each checkpoint carries the run config (run_config.json). A run started again resumes from its last checkpoint only if
its config matches, apart from RESUME_FREE_FIELDS; `allow_config_change` resumes anyway. A finished run is left alone.
"""

import json
import logging
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from finetune.config import RunConfig

log = logging.getLogger(__name__)

# What a complete checkpoint holds, by who wrote it: one process writes model*.safetensors (LoRA and QLoRA:
# adapter_model.safetensors) and optimizer.pt; under FSDP accelerate's save_fsdp_model/save_fsdp_optimizer write
# pytorch_model_fsdp.bin and optimizer.bin (FULL_STATE_DICT) or the DCP folders pytorch_model_fsdp_0/ and optimizer_0/
# (SHARDED_STATE_DICT), complete once their .metadata exists.
CHECKPOINT_PARTS = {
    "trainer_state.json": ("trainer_state.json",),
    "model weights": ("model*.safetensors", "adapter_model.safetensors", "pytorch_model_fsdp.bin",
                      "pytorch_model_fsdp_0/.metadata"),
    "optimizer state": ("optimizer.pt", "optimizer.bin", "optimizer_0/.metadata"),
}


def last_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint to resume from; a partial one (interrupted while saving) is an error, not a guess. The
    Trainer itself would resume from a checkpoint without optimizer state, silently, with fresh Adam moments."""
    last = get_last_checkpoint(output_dir) if output_dir.is_dir() else None
    if last:
        missing = [f"{part} ({' or '.join(patterns)})" for part, patterns in CHECKPOINT_PARTS.items()
                   if not any(any(Path(last).glob(pattern)) for pattern in patterns)]
        if missing:
            raise RuntimeError(f"checkpoint {last} is incomplete (missing {', '.join(missing)}), probably cut off "
                               "while saving. Delete that folder to resume from the one before it.")
    return last


RUN_CONFIG = "run_config.json"  # the run config, stored in every checkpoint folder
# Fields that may differ when a run resumes, as none changes the training: where things go, how often to log and save,
# loader workers, evaluation settings, and activation recompute (the same activations, recomputed or kept).
RESUME_FREE_FIELDS = frozenset({"run_name", "checkpoints_dir", "results_dir", "logging_steps", "save_steps",
                                "save_total_limit", "dataloader_num_workers", "eval_batch_size", "max_eval_samples",
                                "max_new_tokens", "gradient_checkpointing", "checkpointed_layers",
                                "max_memory_gib", "compile_layers", "allow_config_change"})


class SaveRunConfig(TrainerCallback):
    """Writes the run config into each checkpoint as it is saved, for the resume check."""

    def __init__(self, config: RunConfig):
        self.config = config

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            (folder / RUN_CONFIG).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")


def config_changes(stored: dict, config: RunConfig) -> dict[str, tuple]:
    """{field: (stored value, new value)} for every field outside RESUME_FREE_FIELDS that differs (fields one of the
    two configs lacks, from an older or newer version of this code, are not compared)."""
    new = json.loads(json.dumps(config.to_dict()))  # as the stored one was read back
    return {name: (stored[name], value) for name, value in new.items()
            if name in stored and name not in RESUME_FREE_FIELDS and stored[name] != value}


def check_resume(config: RunConfig, checkpoint: str) -> dict[str, tuple]:
    """The training-relevant changes since `checkpoint`; an error naming them unless `config.allow_config_change`."""
    path = Path(checkpoint) / RUN_CONFIG
    if not path.exists():
        log.warning("%s holds no %s (written by an older version): its run config cannot be checked", checkpoint,
                    RUN_CONFIG)
        return {}
    changes = config_changes(json.loads(path.read_text()), config)
    if changes:
        listed = ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changes.items())
        if not config.allow_config_change:
            raise ValueError(f"{checkpoint} was trained with another run config ({listed}): resuming would mix two "
                             "trainings. Set allow_config_change=True (--allow_config_change true) to resume anyway, "
                             "or choose another run_name to start afresh. Fields that may differ: "
                             f"{', '.join(sorted(RESUME_FREE_FIELDS))}.")
        log.warning("resuming %s with a changed run config (allow_config_change): %s", checkpoint, listed)
    return changes


def run_finished(config: RunConfig, checkpoint: str) -> bool:
    """Whether `checkpoint` is the run's last step and the final model and summary were written after it."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return 0 < state.get("max_steps", 0) <= state.get("global_step", 0) and (
        config.final_dir / "train_summary.json").exists()
