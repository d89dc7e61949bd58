"""The FP8 recipes the recipe's own (`finetune.speedups.tensorwise_pow2_scales`) was chosen against, added to
`finetune.speedups.FP8_RECIPES` on import so that the lab's benchmarks (bench, bench_fp8) can run them again.

torchao's recipes and variants of its tensorwise one (e4m3 inputs and weights, e5m2 output gradients, one scale a
tensor, fast accumulation in the forward matmul), each name saying what differs. Against bf16 on the 1024-wide model
(results/gpu/fp8/) every recipe that rounds its scales down to a power of 2 held the 2% tolerance and none of the
others did, whichever matmul or dtype they changed.
"""

import functools

import torch

from finetune.speedups import FP8_RECIPES

# The comparison's rows in their committed order, the recipe's own last.
COMPARISON = ("rowwise", "tensorwise", "tensorwise_e4m3_grads", "tensorwise_exact_accum", "tensorwise_bf16_wgrad",
              "rowwise_with_gw_hp", "tensorwise_bf16_backward", "rowwise_forward_tensorwise_backward",
              "tensorwise_forward_rowwise_grads", "tensorwise_pow2_scales")


def compared_recipe(recipe: str):
    """torchao's `Float8LinearConfig` for one of the compared recipes (torchao imported on use: a slow import)."""
    from torchao.float8 import CastConfig, Float8GemmConfig, Float8LinearConfig, ScalingGranularity, ScalingType

    e4m3, e5m2, rows = torch.float8_e4m3fn, torch.float8_e5m2, ScalingGranularity.AXISWISE
    if recipe in ("rowwise", "tensorwise", "rowwise_with_gw_hp"):
        return Float8LinearConfig.from_recipe_name(recipe)
    if recipe == "tensorwise_e4m3_grads":  # one more mantissa bit for output gradients, 2^8 less range
        return Float8LinearConfig(cast_config_grad_output=CastConfig(target_dtype=e4m3))
    if recipe == "tensorwise_exact_accum":  # the forward matmul accumulates in fp32 throughout
        return Float8LinearConfig(gemm_config_output=Float8GemmConfig(use_fast_accum=False))
    if recipe == "tensorwise_bf16_wgrad":  # the weight-gradient matmul in bf16: a third of the FLOPs
        # torchao checks that each operand names one FP8 dtype, even for the matmul that skips the cast
        return Float8LinearConfig(
            cast_config_input_for_grad_weight=CastConfig(ScalingType.DISABLED, target_dtype=e4m3),
            cast_config_grad_output_for_grad_weight=CastConfig(ScalingType.DISABLED, target_dtype=e5m2))
    if recipe == "tensorwise_bf16_backward":  # FP8 in the forward matmul only
        return Float8LinearConfig(
            cast_config_input_for_grad_weight=CastConfig(ScalingType.DISABLED, target_dtype=e4m3),
            cast_config_weight_for_grad_input=CastConfig(ScalingType.DISABLED, target_dtype=e4m3),
            cast_config_grad_output=CastConfig(ScalingType.DISABLED, target_dtype=e5m2))
    if recipe == "rowwise_forward_tensorwise_backward":  # a scale a row for the forward's inputs and weights only
        return Float8LinearConfig(
            cast_config_input=CastConfig(scaling_granularity=rows, target_dtype=e4m3),
            cast_config_weight=CastConfig(scaling_granularity=rows, target_dtype=e4m3),
            cast_config_input_for_grad_weight=CastConfig(target_dtype=e4m3),
            cast_config_weight_for_grad_input=CastConfig(target_dtype=e4m3), round_scales_to_power_of_2=True)
    # tensorwise_forward_rowwise_grads: rowwise_with_gw_hp's backward behind a tensorwise forward
    return Float8LinearConfig(
        cast_config_grad_output=CastConfig(scaling_granularity=rows, target_dtype=e4m3),
        cast_config_input_for_grad_weight=CastConfig(ScalingType.DISABLED, target_dtype=e4m3),
        cast_config_grad_output_for_grad_weight=CastConfig(ScalingType.DISABLED, target_dtype=e4m3),
        round_scales_to_power_of_2=True)


FP8_RECIPES.update({name: functools.partial(compared_recipe, name) for name in COMPARISON if name not in FP8_RECIPES})
