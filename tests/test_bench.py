"""The benchmark and optimizer-measurement entry points run on the tiny profile, so the GPU scripts cannot rot."""

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerState

from finetune.lab import bench, bench_optimizers
from finetune.lab.report import eval_benchmark_table, targets_table, training_benchmark_table
from finetune.throughput import StepClock, nccl_kernel_share
from tests.conftest import write_synthetic_csv


def test_training_benchmark_times_the_real_trainer_and_reports(tiny_config, tmp_path):
    args = ["train", "--name", "smoke", "--variants", "0,1", "--warmup_steps", "1", "--measured_steps", "2", "--profile_step",
            "--profile", "tiny", "--data_dir", tiny_config.data_dir, "--holdout_train_size", "300",
            "--vocab_size", "512", "--hidden_size", "64", "--num_heads", "4", "--max_length", "128",
            "--checkpoints_dir", tiny_config.checkpoints_dir, "--results_dir", str(tmp_path)]
    bench.main(args)
    record = json.loads((tmp_path / "benchmarks" / "smoke.json").read_text())
    reference, unpacked = record["variants"].values()
    assert record["world_size"] == 1 and reference["tokens_per_second"] > 0
    assert reference["tokens_per_second"] == pytest.approx(reference["tokens_per_step"] / reference["step_seconds"])
    assert unpacked["overrides"] == {"packing": False} and unpacked["tokens_per_step"] > 0
    assert unpacked["speed_vs_reference"] == pytest.approx(unpacked["tokens_per_second"] / reference["tokens_per_second"])
    assert 0 < reference["optimizer_step_seconds"] < reference["step_seconds"]
    assert any("aten::mm" in line for line in reference["step_profile"])
    assert reference["projected_epoch_minutes_full_train"] > 0 and record["environment"]["packages"]["torch"]
    assert (tmp_path / "benchmarks" / "smoke.png").exists()
    threads = record["environment"]["hardware"]["torch_threads"]
    assert f"| `smoke.json` | CPU ({threads} threads) | reference" in training_benchmark_table(tmp_path)


def test_step_clock_times_the_steps_after_the_warm_up_ones_and_from_the_start_without_any():
    clock, state = StepClock(), TrainerState()
    clock.on_train_begin(None, state, None)
    for tokens in (100, 300, 600):  # the Trainer's running count after each optimizer step
        state.num_input_tokens_seen = tokens
        clock.on_step_end(None, state, None)
    assert clock.window(warmup_steps=1, measured_steps=2)[1] == 500
    seconds, tokens = clock.window(warmup_steps=0, measured_steps=3)
    assert tokens == 600 and seconds > 0


def test_nccl_share_is_the_gpu_timeline_with_a_collective_in_flight():
    """Overlapping collectives count once, their "nccl:" annotations not at all, compute not at all."""
    def event(name: str, start: int, end: int) -> SimpleNamespace:
        return SimpleNamespace(name=name, device_type=torch.profiler.DeviceType.CUDA,
                               time_range=SimpleNamespace(start=start, end=end))

    step = [event("nvjet_gemm", 0, 100), event("ncclDevKernel_AllGather_RING_LL", 10, 30),
            event("nccl:_all_gather_base", 10, 30), event("ncclDevKernel_ReduceScatter_Sum_bf16", 20, 40),
            event("ncclDevKernel_AllGather_RING_LL", 60, 70)]
    assert nccl_kernel_share(SimpleNamespace(events=lambda: step)) == pytest.approx(0.4)
    assert nccl_kernel_share(SimpleNamespace(events=lambda: [])) is None  # CPU: no GPU timeline


def test_eval_benchmark_times_every_mode_beside_its_plain_anchor(tiny_config, tmp_path):
    write_synthetic_csv(tmp_path / "test.csv", per_class=25)  # 100 articles: every mode runs three times
    args = ["eval", "--name", "smoke_eval", "--profile", "tiny", "--data_dir", str(tmp_path),
            "--holdout_train_size", "60", "--vocab_size", "512", "--hidden_size", "64", "--num_heads", "4",
            "--max_length", "128", "--eval_batch_size", "32", "--repeats", "2", "--max_new_tokens", "4",
            "--checkpoints_dir", tiny_config.checkpoints_dir, "--results_dir", str(tmp_path)]
    bench.main(args)
    record = json.loads((tmp_path / "benchmarks" / "smoke_eval.json").read_text())
    modes = record["modes"]
    assert list(modes) == ["plain_label_scoring", "plain_generate", "label_scoring_tree", "label_scoring", "generation"]
    assert modes["label_scoring"]["articles"] == 100 and modes["plain_generate"]["articles"] == 25  # every 4th
    packed, anchor = modes["label_scoring"], modes["plain_label_scoring"]
    assert packed["repeats"] == 2 and len(packed["seconds_per_run"]) == 2
    assert packed["articles_per_second_min"] <= packed["articles_per_second"] <= packed["articles_per_second_max"]
    assert packed["vs_anchor"] == pytest.approx(packed["articles_per_second"] / anchor["articles_per_second"])
    assert modes["generation"]["vs_anchor"] == pytest.approx(
        modes["generation"]["articles_per_second"] / modes["plain_generate"]["articles_per_second"])
    assert packed["agreement_with_tree"]["same_labels"] == 1.0  # the two layouts compute the same log-probabilities
    assert packed["agreement_with_tree"]["max_abs_logprob_difference"] < 1e-4
    assert set(record["profiles"]) == {"plain_label_scoring", "label_scoring_tree", "label_scoring"}
    assert record["liger_kernels"] is None
    assert " threads) | label_scoring | 100 |" in eval_benchmark_table(tmp_path)
    assert "no GPU benchmark" in targets_table(tmp_path)  # CPU runs are never counted against targets


def test_optimizer_measurement_shows_bf16_adamw_losing_updates_that_stochastic_rounding_keeps(tiny_config, tmp_path):
    """At the reference lr (2e-5, no warm-up) exact fp32 moves every weight at the first step; plain bf16 AdamW rounds
    most of those moves away, and stochastic rounding moves the weights at least as far as fp32 does (plus noise)."""
    args = ["--profile", "tiny", "--data_dir", tiny_config.data_dir, "--holdout_train_size", "300",
            "--vocab_size", "512", "--hidden_size", "64", "--num_heads", "4", "--max_length", "128", "--bf16", "true",
            "--learning_rate", "2e-5", "--warmup_steps", "0", "--max_steps", "3", "--logging_steps", "1",
            "--checkpoints_dir", tiny_config.checkpoints_dir, "--results_dir", str(tmp_path)]
    bench_optimizers.main(args)
    options = json.loads((tmp_path / "optimizers" / "optimizers.json").read_text())["options"]
    assert set(options) == {"adamw_fp32_master", "adamw", "adamw_bf16_sr"}
    assert options["adamw_fp32_master"]["first_step_fraction_of_weights_changed"] == 1.0
    assert options["adamw"]["first_step_fraction_of_weights_changed"] < 0.5
    assert options["adamw"]["update_norm_ratio_to_fp32"] < 0.7 < 0.9 < options["adamw_bf16_sr"]["update_norm_ratio_to_fp32"]


def test_scaling_table_divides_per_gpu_speed_by_the_same_sets_one_gpu_reference(tmp_path):
    from finetune.lab.report import scaling_table

    (tmp_path / "benchmarks").mkdir()
    for n, rate in ((1, 8000.0), (2, 7000.0), (4, 6000.0)):
        variants = {"reference": {"tokens_per_second": rate, "mfu": 0.3, "peak_allocated_gib": 40.0}}
        if n > 1:
            variants["resharded"] = {"tokens_per_second": rate - 1000, "mfu": 0.25, "peak_allocated_gib": 30.0}
        record = {"benchmark": "train", "world_size": n, "environment": {"git_commit": "abcdef12"}, "variants": variants}
        (tmp_path / "benchmarks" / f"h200_fsdp_{n}gpu.json").write_text(json.dumps(record))
    table = scaling_table(tmp_path)
    assert "| `h200_fsdp_2gpu.json` | `abcdef1` | 2 | reference | 7,000 | 0.88 |" in table
    assert "| `h200_fsdp_4gpu.json` | `abcdef1` | 4 | resharded | 5,000 | 0.62 |" in table
    (tmp_path / "benchmarks" / "h200_fsdp_1gpu.json").unlink()  # no 1-GPU run of the set: no ratio to give
    assert "no multi-GPU benchmark" in scaling_table(tmp_path)
