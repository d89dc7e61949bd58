"""The disk a run's saves need, checked before the first step (finetune/disk.py)."""

import dataclasses
import json
from pathlib import Path

import pytest

from finetune.config import get_config
from finetune.disk import OutOfDisk, check_disk, planned_steps, save_bytes, saved_tokenizer_bytes
from finetune.lab.spark import QWEN_7B
from finetune.qwen_tokenizer import build_qwen25_tokenizer
from finetune.train import build_trainer, main, train

REHEARSALS = [Path("results/rehearsal"), Path("results/rehearsal/h100"), Path("results/rehearsal/h100_lora")]


@pytest.fixture(scope="module")
def qwen_tokenizer_bytes(tmp_path_factory) -> int:
    return saved_tokenizer_bytes(build_qwen25_tokenizer(tmp_path_factory.mktemp("tokenizers")))


@pytest.mark.parametrize("folder", REHEARSALS, ids=["h200", "h100", "h100-lora"])
def test_a_checkpoint_and_the_final_model_weigh_what_the_7b_rehearsal_wrote(folder, qwen_tokenizer_bytes):
    """The committed rehearsals measured their checkpoints folder after 20 steps: one resumable checkpoint and the
    final model, with the method and moments their plan chose, each beside the tokenizer's files. The count of the 7B
    shape's bytes matches it within 1%; counting the gradients too, or the moments at 16 bits where they were 8,
    misses a full run by a quarter or more, and leaving out the tokenizer misses LoRA's by a tenth."""
    summary = json.loads((folder / "train_summary.json").read_text())
    measured = json.loads((folder / "rehearsal.json").read_text())["checkpoints_gb"] * 1e9
    config = get_config("qwen2.5-7b", method=summary["config"]["method"],
                        optimizer=summary["plan"]["optimizer"]["value"])
    checkpoint, final = save_bytes(config, QWEN_7B, qwen_tokenizer_bytes)
    assert checkpoint + final == pytest.approx(measured, rel=0.01)
    if config.method == "lora":
        assert sum(save_bytes(config, QWEN_7B)) < 0.95 * measured


def test_the_disk_that_filled_during_the_h200_rehearsal_is_refused_before_its_first_step():
    """A 64 GiB disk less the 15 GB stand-in beside the run: the rehearsal's 20 steps with bf16 moments write a 45.7 GB
    checkpoint and a 15.2 GB final model, more than fits (the save of the final model failed there); 8-bit moments
    fit. Nothing but moving the run helps, so no fewer checkpoints are offered."""
    free = 64 * 2**30 - 15.25e9
    config = get_config("qwen2.5-7b", optimizer="adamw_bf16_sr_fused", max_steps=20)
    with pytest.raises(OutOfDisk, match=r"1 checkpoint\(s\) of 45.7 GB.*15.2 GB final model: 60.9 GB more, 53.5 GB "
                                        r"free.*--checkpoints_dir <a folder on a larger disk>\.$"):
        check_disk(config, QWEN_7B, 20, free)
    assert "45.9 GB more" in check_disk(dataclasses.replace(config, optimizer="adamw8bit_bf16_sr"), QWEN_7B, 20, free)


def test_a_long_run_needs_one_checkpoint_more_than_it_keeps_and_a_resumed_one_counts_what_it_wrote():
    """The Trainer writes a checkpoint before it deletes the oldest: with two kept, three exist for a while. Where
    keeping one would fit, the message says so and how much it needs; a resumed run's checkpoints are already there."""
    config = get_config("qwen2.5-7b", optimizer="adamw_bf16_sr_fused")
    checkpoint, _ = save_bytes(config, QWEN_7B)
    assert "19 checkpoint(s)" in check_disk(config, QWEN_7B, 3750, 3 * checkpoint + 1)
    with pytest.raises(OutOfDisk, match=r"up to 3 at once \(save_total_limit=2\).*--save_total_limit 1 \(91.4 GB\)"):
        check_disk(config, QWEN_7B, 3750, 3 * checkpoint - 1)
    assert check_disk(config, QWEN_7B, 3750, checkpoint + 1, written=2 * checkpoint)
    unlimited = dataclasses.replace(config, save_total_limit=None)
    with pytest.raises(OutOfDisk, match="19 at once"):
        check_disk(unlimited, QWEN_7B, 3750, 18 * checkpoint)


def test_the_steps_counted_before_training_are_the_steps_the_trainer_runs(tiny_config):
    """By epochs (the profile's way) the count comes from the packed rows, the micro-batch and the accumulation."""
    config = dataclasses.replace(tiny_config, gradient_accumulation_steps=3)
    steps = planned_steps(build_trainer(config))
    summary = json.loads((train(config) / "train_summary.json").read_text())
    assert steps == summary["optimizer_steps"]


def test_a_run_whose_saves_do_not_fit_stops_with_the_message_before_training(tiny_config, monkeypatch, capsys):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**6, 10**6 - 10**3, 10**3))
    args = ["--profile", "tiny", "--data_dir", tiny_config.data_dir, "--holdout_train_size", "300",
            "--vocab_size", "512", "--hidden_size", "64", "--num_heads", "4", "--intermediate_size", "128",
            "--max_length", "128", "--checkpoints_dir", tiny_config.checkpoints_dir]
    with pytest.raises(SystemExit, match=r"^error: The run's saves would not fit under .*0.0 GB free"):
        main(args)
    assert not list(Path(tiny_config.checkpoints_dir).rglob("checkpoint-*"))
