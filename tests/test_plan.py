"""The recipe's "auto" settings as the hardware decides them (finetune/plan.py): fed the description of a GPU, no
GPU needed, so every machine's choices are checked on the CPU."""

import json
import statistics
from pathlib import Path

import pytest

from finetune.config import get_config
from finetune.lab.spark import GB10, QWEN_7B  # the GB10 and 7B shape the Spark page's projection plans for
from finetune.plan import (FP8_CHECKED_AT_7B, FP8_RECIPE, GPU, HOST_RESERVE_GIB, MICRO_BATCH_COST_IN_LAYERS,
                           plan_evaluation, plan_training)

H100 = GPU("NVIDIA H100 80GB HBM3", (9, 0), total_gib=79.2, free_gib=78.7, integrated=False)
H200 = GPU("NVIDIA H200", (9, 0), total_gib=139.8, free_gib=139.3, integrated=False)
A100 = GPU("NVIDIA A100-SXM4-80GB", (8, 0), total_gib=79.2, free_gib=78.7, integrated=False)
EVERYTHING = {"triton", "torchao", "liger_kernel"}.__contains__
RESULTS = Path(__file__).resolve().parents[1] / "results" / "benchmarks"


def layout_cost(config) -> float:
    """What a planned layout costs a step, in recomputed layers: its recompute and its micro-batches' passes."""
    return config.checkpointed_layers + MICRO_BATCH_COST_IN_LAYERS * config.gradient_accumulation_steps


def test_qwen2_5_7b_shape_counts_its_published_parameters():
    assert QWEN_7B.parameters == pytest.approx(7.62e9, rel=0.01)


@pytest.mark.parametrize("gpu", [GB10, H100], ids=["GB10", "H100"])
def test_a_gpu_with_triton_gets_compiled_layers_and_8_bit_moments(gpu):
    config, plan = plan_training(get_config("qwen2.5-7b"), gpu, QWEN_7B, has=EVERYTHING)
    assert config.compile_layers is True and config.optimizer == "adamw8bit_bf16_sr"
    assert config.use_liger_kernel is False  # the compiled layers fuse what Liger would
    assert {"compile_layers", "optimizer", "fp8", "use_liger_kernel", "checkpointed_layers"} <= set(plan)
    assert all(choice["reason"] for choice in plan.values())


def test_fp8_waits_for_its_7b_check_and_names_why():
    for gpu in (GB10, H100):
        config, plan = plan_training(get_config("qwen2.5-7b"), gpu, QWEN_7B, has=EVERYTHING)
        assert config.fp8 == (FP8_RECIPE if FP8_CHECKED_AT_7B else None)
        if not FP8_CHECKED_AT_7B:
            assert "7B" in plan["fp8"]["reason"] and f"--fp8 {FP8_RECIPE}" in plan["fp8"]["reason"]
    config, plan = plan_training(get_config("qwen2.5-7b"), A100, QWEN_7B, has=EVERYTHING)
    assert config.fp8 is None and "compute capability 8.0 has no FP8" in plan["fp8"]["reason"]


def test_fp8_checked_flag_agrees_with_the_committed_7b_check():
    """The flag that lets "auto" choose FP8 is the committed result of `make gpu-fp8-7b`, not an opinion."""
    path = Path(__file__).resolve().parents[1] / "results" / "gpu" / "fp8" / "fp8_7b.json"
    if not path.exists():
        assert not FP8_CHECKED_AT_7B
        return
    runs = json.loads(path.read_text())["runs"]
    assert FP8_CHECKED_AT_7B == runs[FP8_RECIPE]["within_tolerance"]


def test_the_h100_trades_recompute_for_micro_batches_and_the_gb10_budgets_for_its_host():
    """7.6B weights with 8-bit moments take 43 GiB: an 80 GB H100 would recompute a few layers at 16 x 512 tokens, so
    it runs the step's 32 rows as 8 x 4 with none recomputed; the GB10's plan first sets aside what the CPU needs of
    the shared memory, and says so."""
    h100, h100_plan = plan_training(get_config("qwen2.5-7b"), H100, QWEN_7B, has=EVERYTHING)
    gb10, gb10_plan = plan_training(get_config("qwen2.5-7b"), GB10, QWEN_7B, has=EVERYTHING)
    assert (h100.checkpointed_layers, h100.per_device_train_batch_size, h100.gradient_accumulation_steps) == (0, 8, 4)
    assert "16 x 2 recomputing 6" in h100_plan["merge_micro_batches"]["reason"]
    assert "shares" in gb10_plan["checkpointed_layers"]["reason"]
    assert f"{HOST_RESERVE_GIB:.0f} GiB" in gb10_plan["checkpointed_layers"]["reason"]
    # With less free (a browser, a second notebook), the host's share is what costs recompute or micro-batches.
    busy = GPU(GB10.name, GB10.capability, GB10.total_gib, free_gib=100.0, integrated=True)
    discrete = GPU(GB10.name, GB10.capability, GB10.total_gib, free_gib=100.0, integrated=False)
    assert layout_cost(plan_training(get_config("qwen2.5-7b"), discrete, QWEN_7B, has=EVERYTHING)[0]) \
        < layout_cost(plan_training(get_config("qwen2.5-7b"), busy, QWEN_7B, has=EVERYTHING)[0])


def test_bf16_moments_where_they_keep_the_8_bit_layout_else_8_bit_ones():
    """The fused update either way: bf16 moments where the memory holds them at the layout 8-bit ones get (the H200:
    every layer kept, 32 x 1 rows), 8-bit ones where the 14 GiB they free keep layers (the H100, the GB10, the H200
    within 70 GiB: every layer kept at 8 x 4, or at 16 x 2 on the GB10); the reason names both layouts."""
    h200, plan = plan_training(get_config("qwen2.5-7b"), H200, QWEN_7B, has=EVERYTHING)
    assert h200.optimizer == "adamw_bf16_sr_fused"
    assert "0 of 28 layers recomputed at 32 x 1 rows" in plan["optimizer"]["reason"]
    assert (h200.checkpointed_layers, h200.per_device_train_batch_size) == (0, 32)
    for gpu, max_memory_gib in [(H100, None), (GB10, None), (H200, 70)]:
        config, plan = plan_training(get_config("qwen2.5-7b", max_memory_gib=max_memory_gib), gpu, QWEN_7B,
                                     has=EVERYTHING)
        reason = plan["optimizer"]["reason"]
        assert config.optimizer == "adamw8bit_bf16_sr", reason
        layout = f"{config.per_device_train_batch_size} x {config.gradient_accumulation_steps} rows"
        assert config.checkpointed_layers == 0 and f"; 0 of 28 layers recomputed at {layout}, where bf16" in reason
        bf16 = plan_training(get_config("qwen2.5-7b", max_memory_gib=max_memory_gib, optimizer="adamw_bf16_sr_fused"),
                             gpu, QWEN_7B, has=EVERYTHING)[0]
        assert layout_cost(bf16) > layout_cost(config)
        assert (f"bf16 moments would need {bf16.checkpointed_layers} of 28 layers recomputed at "
                f"{bf16.per_device_train_batch_size} x {bf16.gradient_accumulation_steps} rows") in reason


def test_fp32_weights_are_planned_at_four_bytes_a_value():
    """bf16=False loads fp32 weights, and plain AdamW (the plan's choice then) keeps fp32 gradients and moments:
    16 bytes a parameter, not bf16's 8, and activations twice the size: more layers recompute than at bf16."""
    fp32, plan = plan_training(get_config("qwen2.5-7b", bf16=False), H200, QWEN_7B, has=EVERYTHING)
    bf16, _ = plan_training(get_config("qwen2.5-7b", optimizer="adamw"), H200, QWEN_7B, has=EVERYTHING)
    assert fp32.optimizer == "adamw"
    assert f"optimizer states {QWEN_7B.parameters * 16 / 2**30:.1f} GiB" in plan["checkpointed_layers"]["reason"]
    assert layout_cost(fp32) > layout_cost(bf16)


def test_a_step_runs_in_the_micro_batches_that_cost_least():
    """The H200 holds every layer's activations for the step's 32 rows at once: one micro-batch. At 16 rows the H100
    would recompute layers, which cost more than the two passes 8 x 4 adds; the product, the rows an update sees,
    never changes. A number of layers given keeps the micro-batches as given, and merges only with none recomputed."""
    h200, plan = plan_training(get_config("qwen2.5-7b"), H200, QWEN_7B, has=EVERYTHING)
    assert (h200.per_device_train_batch_size, h200.gradient_accumulation_steps, h200.checkpointed_layers) == (32, 1, 0)
    assert h200.merge_micro_batches is True and "run as 32 x 1" in plan["merge_micro_batches"]["reason"]
    h100, plan = plan_training(get_config("qwen2.5-7b"), H100, QWEN_7B, has=EVERYTHING)
    assert (h100.per_device_train_batch_size, h100.gradient_accumulation_steps) == (8, 4)
    assert h100.merge_micro_batches is True and "run as 8 x 4" in plan["merge_micro_batches"]["reason"]
    # Memory for 16 rows without recompute but not for 32: kept as given, with the budget in the reason.
    roomy, plan = plan_training(get_config("qwen2.5-7b", max_memory_gib=100), H200, QWEN_7B, has=EVERYTHING)
    assert (roomy.per_device_train_batch_size, roomy.checkpointed_layers) == (16, 0)
    assert roomy.merge_micro_batches is False and "max_memory_gib=100" in plan["merge_micro_batches"]["reason"]
    for merge in (False, "auto"):
        kept = plan_training(get_config("qwen2.5-7b", merge_micro_batches=merge, checkpointed_layers=4), H100, QWEN_7B,
                             has=EVERYTHING)[0]
        assert (kept.per_device_train_batch_size, kept.checkpointed_layers) == (16, 4)
    kept = plan_training(get_config("qwen2.5-7b", merge_micro_batches=False), H200, QWEN_7B, has=EVERYTHING)
    assert kept[0].per_device_train_batch_size == 16 and "merge_micro_batches" not in kept[1]
    merged = plan_training(get_config("qwen2.5-7b", checkpointed_layers=0), H200, QWEN_7B, has=EVERYTHING)[0]
    assert (merged.per_device_train_batch_size, merged.gradient_accumulation_steps) == (32, 1)
    # One micro-batch a step already, and room for it: kept.
    one, plan = plan_training(get_config("qwen2.5-7b", per_device_train_batch_size=32, gradient_accumulation_steps=1),
                              H200, QWEN_7B, has=EVERYTHING)
    assert one.per_device_train_batch_size == 32 and "32 x 1 rows kept" in plan["merge_micro_batches"]["reason"]


def test_weight_gradients_are_summed_in_the_matmul_where_a_step_has_several_micro_batches(monkeypatch):
    """The H100 (8 x 4) and the GB10 (16 x 2) sum in the matmul; the H200's single micro-batch has nothing to sum, nor
    do LoRA's frozen weights; FP8's linear layers, several processes and FSDP2 keep autograd's sum."""
    h100, plan = plan_training(get_config("qwen2.5-7b"), H100, QWEN_7B, has=EVERYTHING)
    assert h100.accumulate_in_matmul is True and "4 micro-batches" in plan["accumulate_in_matmul"]["reason"]
    assert plan_training(get_config("qwen2.5-7b"), GB10, QWEN_7B, has=EVERYTHING)[0].accumulate_in_matmul is True
    h200, plan = plan_training(get_config("qwen2.5-7b"), H200, QWEN_7B, has=EVERYTHING)
    assert h200.accumulate_in_matmul is False and "one micro-batch" in plan["accumulate_in_matmul"]["reason"]
    for change, why in ((dict(method="lora"), "frozen"), (dict(fp8=FP8_RECIPE), "FP8")):
        config, plan = plan_training(get_config("qwen2.5-7b", **change), H100, QWEN_7B, has=EVERYTHING)
        assert config.accumulate_in_matmul is False and why in plan["accumulate_in_matmul"]["reason"]
    assert plan_training(get_config("qwen2.5-7b"), H100, QWEN_7B, has=EVERYTHING, fsdp=True)[0] \
        .accumulate_in_matmul is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    config, plan = plan_training(get_config("qwen2.5-7b"), H100, QWEN_7B, has=EVERYTHING)
    assert config.accumulate_in_matmul is False and "processes" in plan["accumulate_in_matmul"]["reason"]


def test_a_micro_batchs_cost_in_recomputed_layers_is_the_committed_measurement():
    """MICRO_BATCH_COST_IN_LAYERS is read from the H100 runs that timed 16 x 2 recomputing two numbers of layers
    beside 8 x 4 recomputing none (the same 32 rows a step), weight gradients summed in the matmul as the plan does
    there: a layer's cost is the slope between the first two, a micro-batch's what 8 x 4 takes beyond 16 x 2 with
    none recomputed, extrapolated along that slope."""
    ratios = []
    for path in sorted(RESULTS.glob("h100_7b_train_layouts_summed*.json")):
        rows = json.loads(path.read_text())["variants"].values()
        compute = {(row["checkpointed_layers"], *row["micro_batches"]):
                   row["step_seconds"] - row["optimizer_step_seconds"]
                   for row in rows if row["overrides"].get("optimizer") == "auto" and row.get("step_seconds")
                   and row["overrides"].get("accumulate_in_matmul") == "auto"}
        (few, many), split = sorted(k for k in compute if k[1:] == (16, 2)), compute[(0, 8, 4)]
        layer = (compute[many] - compute[few]) / (many[0] - few[0])
        ratios.append((split - (compute[few] - few[0] * layer)) / 2 / layer)
    if not ratios:
        pytest.skip("no h100_7b_train_recipe_layouts*.json here")
    assert MICRO_BATCH_COST_IN_LAYERS == pytest.approx(statistics.median(ratios), abs=0.1)


def test_missing_packages_and_no_gpu_are_named_not_silently_dropped():
    config, plan = plan_training(get_config("qwen2.5-7b"), H100, QWEN_7B, has=lambda name: False)
    assert config.compile_layers is False and "Triton is not installed" in plan["compile_layers"]["reason"]
    assert config.optimizer == "adamw_bf16_sr" and "Triton" in plan["optimizer"]["reason"]
    assert config.use_liger_kernel is False and "liger-kernel is not installed" in plan["use_liger_kernel"]["reason"]
    config, plan = plan_training(get_config("qwen2.5-7b"), None, QWEN_7B, has=EVERYTHING)
    assert config.compile_layers is False and config.checkpointed_layers is None
    assert "no CUDA GPU" in plan["compile_layers"]["reason"]


def test_explicit_settings_are_kept_and_the_reference_plans_nothing():
    config, plan = plan_training(get_config("qwen2.5-7b-reference"), H100, QWEN_7B, has=EVERYTHING)
    assert plan == {} and config == get_config("qwen2.5-7b-reference")
    config, plan = plan_training(get_config("qwen2.5-7b", compile_layers=False), H100, QWEN_7B, has=EVERYTHING)
    assert "compile_layers" not in plan and config.compile_layers is False


def test_lora_takes_the_same_speed_ups_but_not_fp8():
    config, plan = plan_training(get_config("qwen2.5-7b", method="lora"), H100, QWEN_7B, has=EVERYTHING)
    assert config.compile_layers is True and config.fp8 is None and "full fine-tuning" in plan["fp8"]["reason"]
    assert config.checkpointed_layers == 0  # 15 GB of frozen weights leave room for every layer's activations
    assert config.optimizer == "adamw_bf16_sr_fused"  # the fused update, one launch; the adapters' moments are small
    h200 = plan_training(get_config("qwen2.5-7b", method="lora"), H200, QWEN_7B, has=EVERYTHING)[0]
    assert (h200.per_device_train_batch_size, h200.gradient_accumulation_steps) == (32, 1)


def test_fsdp_keeps_the_reference_settings_with_a_reason():
    config, plan = plan_training(get_config("qwen2.5-7b"), H100, QWEN_7B, has=EVERYTHING, fsdp=True)
    assert (config.compile_layers, config.fp8, config.optimizer) == (False, None, "adamw_bf16_sr")
    assert all("FSDP2" in choice["reason"] for choice in plan.values())


def test_evaluation_uses_liger_and_the_largest_batch_that_fits():
    for gpu in (GB10, H100):
        config, plan = plan_evaluation(get_config("qwen2.5-7b"), gpu, QWEN_7B, has=EVERYTHING)
        assert config.use_liger_kernel is True and config.compile_layers is False
        assert config.eval_batch_size == 512, plan["eval_batch_size"]["reason"]
    small = GPU("NVIDIA L4", (8, 9), total_gib=22.0, free_gib=21.5, integrated=False)
    config, plan = plan_evaluation(get_config("qwen2.5-7b"), small, QWEN_7B, has=EVERYTHING)
    fits = int(plan["eval_batch_size"]["reason"].split(": ")[1].split(" articles")[0])  # "16: 17 articles of ..."
    batch = config.eval_batch_size
    assert batch & (batch - 1) == 0 and batch <= fits < 2 * batch < 512, plan["eval_batch_size"]["reason"]
    config, plan = plan_evaluation(get_config("qwen2.5-7b"), None, QWEN_7B, has=EVERYTHING)
    assert config.use_liger_kernel is False and config.eval_batch_size == 64


def test_fp32_master_weights_are_not_summed_in_the_matmul_and_fsdp_without_bf16_updates_in_fp32():
    """Summing bf16 gradients into fp32 masters' buffers failed at the first backward (Float and BFloat16); FSDP's
    reference optimizer rounds into bf16 weights, which a run with bf16=False does not have."""
    from finetune.speedups import accumulate_in_matmul_unsupported

    master = get_config("qwen2.5-7b", optimizer="adamw_fp32_master")
    assert "fp32 master weights" in accumulate_in_matmul_unsupported(master)
    config, plan = plan_training(master, H200, QWEN_7B, has=EVERYTHING)
    assert config.accumulate_in_matmul is False and "fp32 master" in plan["accumulate_in_matmul"]["reason"]
    config, _ = plan_training(get_config("qwen2.5-7b", bf16=False), H100, QWEN_7B, has=EVERYTHING, fsdp=True)
    assert config.optimizer == "adamw"
    config, plan = plan_training(get_config("qwen2.5-7b", merge_micro_batches=True), H100, QWEN_7B, has=EVERYTHING,
                                 fsdp=True)  # recorded as what ran: FSDP2 runs the micro-batches as given
    assert config.merge_micro_batches is False and "FSDP2" in plan["merge_micro_batches"]["reason"]


def test_a_budget_too_small_for_every_layout_is_planned_in_one_that_fits():
    """Within 50 GiB on an H100 16 x 2 rows do not fit even with every layer recomputed; 8 x 4 with 8-bit moments do.
    bf16 moments once won there, their layout 'the same' as 8-bit ones' (both every layer, both short of memory)."""
    config, plan = plan_training(get_config("qwen2.5-7b", max_memory_gib=50), H100, QWEN_7B, has=EVERYTHING)
    assert config.optimizer == "adamw8bit_bf16_sr"
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (8, 4)
    assert "16 rows do not fit" in plan["merge_micro_batches"]["reason"]
    assert "does not fit" not in plan["checkpointed_layers"]["reason"]


def test_the_optimizer_is_chosen_at_the_layout_the_user_gave():
    """82 GiB free: bf16 moments fit where the plan lays the step out itself (8 x 4, no layer recomputed), but not at
    16 x 2 rows with the 4 layers recomputed that the user asked for; 8-bit moments do."""
    card = GPU("NVIDIA H100 NVL", (9, 0), total_gib=88.0, free_gib=82.0, integrated=False)
    planned = plan_training(get_config("qwen2.5-7b"), card, QWEN_7B, has=EVERYTHING)[0]
    assert planned.optimizer == "adamw_bf16_sr_fused"
    given, plan = plan_training(get_config("qwen2.5-7b", checkpointed_layers=4), card, QWEN_7B, has=EVERYTHING)
    assert given.optimizer == "adamw8bit_bf16_sr" and given.checkpointed_layers == 4
    assert (given.per_device_train_batch_size, given.gradient_accumulation_steps) == (16, 2)
    assert "bf16 moments would need 4 of 28 layers recomputed at 16 x 2 rows, short" in plan["optimizer"]["reason"]
