"""Resuming a run: its newest complete checkpoint, and whether the run config it was trained with lets it resume.

Each checkpoint carries the run config (run_config.json). A run started again resumes from its last checkpoint only if
its config matches, apart from RESUME_FREE_FIELDS; `allow_config_change` resumes anyway. A finished run is left alone.
"""

import dataclasses
import json
import logging
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from finetune.config import RunConfig, launched_processes

log = logging.getLogger(__name__)

# What a complete checkpoint holds, by who wrote it (transformers' Trainer._save_checkpoint): one process writes
# model*.safetensors (LoRA and QLoRA: adapter_model.safetensors) and optimizer.pt; under FSDP accelerate's
# save_fsdp_model/save_fsdp_optimizer write pytorch_model_fsdp.bin and optimizer.bin (FULL_STATE_DICT) or the DCP
# folders pytorch_model_fsdp_0/ and optimizer_0/ (SHARDED_STATE_DICT), complete once their .metadata exists. The main
# process writes scheduler.pt in every case, and each process its RNG state (`rng_state_files`).
CHECKPOINT_PARTS = {
    "trainer_state.json": ("trainer_state.json",),
    "model weights": ("model*.safetensors", "adapter_model.safetensors", "pytorch_model_fsdp.bin",
                      "pytorch_model_fsdp_0/.metadata"),
    "optimizer state": ("optimizer.pt", "optimizer.bin", "optimizer_0/.metadata"),
    # Trainer._load_optimizer_and_scheduler loads the optimizer only where scheduler.pt exists too: without it the
    # run would go on with fresh Adam moments and a schedule started over, silently.
    "scheduler state": ("scheduler.pt",),
    # SaveRunConfig writes it last, after the Trainer has deleted the checkpoints beyond save_total_limit: a run cut off
    # in between leaves a checkpoint whose config cannot be checked, nor its optimizer kept (kept_optimizer).
    "run config": ("run_config.json",),
}


def rng_state_files(world_size: int) -> list[str]:
    """The RNG states Trainer._load_rng_state reads: rng_state.pth from one process, rng_state_<rank>.pth from each of
    several (without its file a rank resumes with the seed's fresh RNG, and dropout and data order drift)."""
    return ["rng_state.pth"] if world_size <= 1 else [f"rng_state_{rank}.pth" for rank in range(world_size)]


def last_checkpoint(output_dir: Path, world_size: int | None = None) -> str | None:
    """The newest checkpoint to resume from; a partial one (interrupted while saving) is an error, not a guess. The
    Trainer itself would resume from a checkpoint without optimizer, scheduler or RNG state, silently. `world_size`:
    the processes that will resume it, by default those `accelerate launch` (or torchrun) started."""
    world_size = launched_processes() if world_size is None else world_size
    last = get_last_checkpoint(output_dir) if output_dir.is_dir() else None
    if last:
        missing = [f"{part} ({' or '.join(patterns)})" for part, patterns in CHECKPOINT_PARTS.items()
                   if not any(any(Path(last).glob(pattern)) for pattern in patterns)]
        rng_missing = [name for name in rng_state_files(world_size) if not (Path(last) / name).is_file()]
        missing += [f"RNG state ({' and '.join(rng_missing)})"] if rng_missing else []
        if missing:
            other_count = " (or saved by another number of processes: resume with as many)" if rng_missing else ""
            raise RuntimeError(f"checkpoint {last} is incomplete (missing {', '.join(missing)}), probably cut off "
                               f"while saving{other_count}. Delete that folder to resume from the one before it.")
    return last


RUN_CONFIG = "run_config.json"  # the run config, stored in every checkpoint folder
PLANNED_OPTIMIZER = "planned_optimizer"  # beside its fields there: the optimizer an "auto" one resolved to
# Fields that may differ when a run resumes, as none changes the training: where things go, how often to log and save,
# loader workers, evaluation settings, activation recompute (the same activations, recomputed or kept), and where the
# weight gradients are summed (the same sums), whether the opening is shared and where the last layer's MLP runs (the
# same loss and gradients).
RESUME_FREE_FIELDS = frozenset({"run_name", "checkpoints_dir", "results_dir", "logging_steps", "save_steps",
                                "save_total_limit", "dataloader_num_workers", "eval_batch_size", "max_eval_samples",
                                "max_new_tokens", "gradient_checkpointing", "checkpointed_layers",
                                "max_memory_gib", "compile_layers", "accumulate_in_matmul",
                                "share_opening", "last_layer_where_read", "allow_config_change"})


class SaveRunConfig(TrainerCallback):
    """Writes the run config as given into each checkpoint as it is saved, for the resume check, and beside it the
    optimizer the run planned, whose format the saved moments are in (kept_optimizer)."""

    def __init__(self, config: RunConfig, planned_optimizer: str):
        self.config, self.planned_optimizer = config, planned_optimizer

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            stored = {**self.config.to_dict(), PLANNED_OPTIMIZER: self.planned_optimizer}
            (folder / RUN_CONFIG).write_text(json.dumps(stored, indent=2) + "\n")


def kept_optimizer(config: RunConfig, checkpoint: str | None) -> RunConfig:
    """`config` resuming `checkpoint` with the optimizer that saved its moments. Under "auto" the plan picks bf16 or
    8-bit moments from the memory, and `max_memory_gib` may change on a resume (the out-of-memory advice suggests it):
    the other optimizer would be handed moments in a format it does not keep."""
    if config.optimizer != "auto" or checkpoint is None:
        return config
    planned = json.loads((Path(checkpoint) / RUN_CONFIG).read_text()).get(PLANNED_OPTIMIZER)
    return config if planned is None else dataclasses.replace(config, optimizer=planned)  # None: an older version


def config_changes(stored: dict, config: RunConfig) -> dict[str, tuple]:
    """{field: (stored value, new value)} for every field outside RESUME_FREE_FIELDS that differs (fields one of the
    two configs lacks, from an older or newer version of this code, are not compared)."""
    new = json.loads(json.dumps(config.to_dict()))  # as the stored one was read back
    return {name: (stored[name], value) for name, value in new.items()
            if name in stored and name not in RESUME_FREE_FIELDS and stored[name] != value}


def check_resume(config: RunConfig, checkpoint: str) -> dict[str, tuple]:
    """The training-relevant changes since `checkpoint`; an error naming them unless `config.allow_config_change`."""
    changes = config_changes(json.loads((Path(checkpoint) / RUN_CONFIG).read_text()), config)
    if changes:
        listed = ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changes.items())
        if not config.allow_config_change:
            raise ValueError(f"{checkpoint} was trained with another run config ({listed}): resuming would mix two "
                             "trainings. Set allow_config_change=True (--allow_config_change true) to resume anyway, "
                             "or choose another run_name to start afresh. Fields that may differ: "
                             f"{', '.join(sorted(RESUME_FREE_FIELDS))}.")
        log.warning("resuming %s with a changed run config (allow_config_change): %s", checkpoint, listed)
    return changes


def checkpoint_step(checkpoint: str) -> int:
    """The optimizer step a checkpoint folder (`checkpoint-<step>`) was written at."""
    return int(Path(checkpoint).name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-"))


def run_finished(config: RunConfig, checkpoint: str) -> bool:
    """Whether `checkpoint` is the run's last step and the final model and summary were written after it."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return 0 < state.get("max_steps", 0) <= state.get("global_step", 0) and (
        config.final_dir / "train_summary.json").exists()


def whole_run_train_loss(train_loss: float, log_history: list[dict], resumed_from: str | None,
                         global_step: int) -> float:
    """The mean training loss over every step of the run, resumed or not. The Trainer's `train_loss` sums the losses
    of the steps since the resume but divides by all of them (transformers' Trainer: `_total_loss_scalar /
    global_step`); the steps before the resume are read from the losses logged then (each the mean since the log
    before), weighted by the steps each covers. Steps after the last log before the checkpoint were never logged:
    they are left out of the mean rather than guessed."""
    if resumed_from is None:
        return train_loss
    resumed_step = checkpoint_step(resumed_from)  # rotated away by now: its name tells the step
    before, covered, previous = 0.0, 0, 0
    for entry in log_history:
        if "loss" in entry and entry["step"] <= resumed_step:
            before += entry["loss"] * (entry["step"] - previous)
            covered, previous = covered + entry["step"] - previous, entry["step"]
    return (before + train_loss * global_step) / (covered + global_step - resumed_step)


def run_metrics(metrics: dict, log_history: list[dict], resumed_from: str | None, global_step: int) -> dict:
    """The Trainer's closing metrics, true of a resumed run too: `train_loss` over the whole run
    (whole_run_train_loss), and the per-second rates over the steps this session ran. The Trainer divides the whole
    run's samples and steps by this session's runtime, which after a resume at step 5 of 15 reads 1.5x too fast."""
    if resumed_from is None:
        return metrics
    share = (global_step - checkpoint_step(resumed_from)) / max(global_step, 1)
    rates = {k: metrics[k] * share for k in ("train_samples_per_second", "train_steps_per_second") if k in metrics}
    return {**metrics, **rates,
            "train_loss": whole_run_train_loss(metrics["train_loss"], log_history, resumed_from, global_step)}
