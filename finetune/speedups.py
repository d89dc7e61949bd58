"""Training speed-ups applied to the model before training: compiled decoder layers, FP8 matmuls, and the memory
estimates (the optimizers' states, the layers' activations) that decide how many layers recompute their activations
(`finetune/plan.py` chooses)."""

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from finetune.config import RunConfig

# torchao's recipes and variants of its tensorwise one (e4m3 inputs and weights, e5m2 output gradients, one scale a
# tensor, fast accumulation in the forward matmul), each name saying what differs. Against bf16 on the 1024-wide model
# (results/gpu/fp8/) every recipe that rounds its scales down to a power of 2 held the 2% tolerance and none of the
# others did, whichever matmul or dtype they changed: "tensorwise_pow2_scales" keeps tensorwise's speed and is the one
# to use; the rest stay to re-run that comparison.
FP8_RECIPES = ("rowwise", "tensorwise", "tensorwise_e4m3_grads", "tensorwise_exact_accum", "tensorwise_bf16_wgrad",
               "rowwise_with_gw_hp", "tensorwise_bf16_backward", "rowwise_forward_tensorwise_backward",
               "tensorwise_forward_rowwise_grads", "tensorwise_pow2_scales")
GIB = 2**30


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks, in order (the modules transformers checkpoints one by one)."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_decoder_layers(model: nn.Module, backend: str = "inductor") -> None:
    """Regional compilation: `torch.compile` each decoder layer in place, the way accelerate's
    `compile_regions_fsdp2` does, so module names, isinstance checks and gradient checkpointing (which wraps the
    layer's call from outside) are untouched. The layers share one code object, so one compiled graph serves all of
    them. Packed rows change length every micro-batch: `dynamic=True` compiles for symbolic lengths from the start
    instead of once static and then again dynamic. Tests pass a lighter `backend`."""
    for layer in decoder_layers(model):
        layer.compile(backend=backend, dynamic=True)


def convert_to_fp8(model: nn.Module, recipe: str, emulate: bool = False) -> None:
    """torchao's float8 training for the decoder layers' linear layers (attention projections and MLP): inputs,
    weights and output gradients cast to FP8 with `recipe`'s scaling, master weights and everything else unchanged.
    The LM head and embeddings stay bf16. MFU keeps counting against the bf16 dense peak, so rows stay comparable.
    `emulate` computes the same casts with high-precision matmuls, on any device (tests)."""
    if not emulate and (not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9)):
        raise ValueError("fp8 needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+: L40S, H100, H200); "
                         "run with --fp8 none")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # slow import, GPU option only

    # A packed micro-batch holds any number of tokens, and that number is the inner dimension of the weight-gradient
    # matmul, which FP8 kernels need in multiples of 16: pad it.
    fp8_config = dataclasses.replace(fp8_linear_config(recipe), pad_inner_dim=True, emulate=emulate)
    for layer in decoder_layers(model):
        convert_to_float8_training(layer, config=fp8_config,
                                   module_filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and _fp8_shaped(m))


def fp8_linear_config(recipe: str):
    """torchao's `Float8LinearConfig` for one of FP8_RECIPES."""
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
    if recipe == "tensorwise_pow2_scales":  # scales rounded down to a power of 2, as the rowwise recipes do
        return Float8LinearConfig(round_scales_to_power_of_2=True)
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
    if recipe == "tensorwise_forward_rowwise_grads":  # rowwise_with_gw_hp's backward behind a tensorwise forward
        return Float8LinearConfig(
            cast_config_grad_output=CastConfig(scaling_granularity=rows, target_dtype=e4m3),
            cast_config_input_for_grad_weight=CastConfig(ScalingType.DISABLED, target_dtype=e4m3),
            cast_config_grad_output_for_grad_weight=CastConfig(ScalingType.DISABLED, target_dtype=e4m3),
            round_scales_to_power_of_2=True)
    raise ValueError(f"unknown fp8 recipe {recipe!r}; choose from {FP8_RECIPES} or none")


def _fp8_shaped(linear: nn.Linear) -> bool:
    """FP8 matmuls need both dimensions divisible by 16."""
    out_features, in_features = linear.weight.shape
    return out_features % 16 == 0 and in_features % 16 == 0


@dataclass(frozen=True)
class Optimizer:
    """One `--optimizer` option, in one table (OPTIMIZERS) so that the options the trainer builds and the ones the
    plan sizes the memory for cannot drift apart."""

    bytes_per_parameter: float  # weights + gradients + both AdamW moments
    # Bits of each moment of the stochastic-rounding update (finetune/optim.py); None: torch's AdamW, which keeps its
    # moments in the weights' dtype and rounds to nearest.
    state_bits: int | None = None

    @property
    def rounds_stochastically(self) -> bool:
        return self.state_bits is not None


# bf16 weights, grads and two bf16 moments; 8-bit moments take 1 byte each plus an fp32 scale per block of 256; fp32
# master weights keep all four in fp32.
OPTIMIZERS = {"adamw": Optimizer(8), "adamw_bf16_sr": Optimizer(8, state_bits=16),
              "adamw8bit_bf16_sr": Optimizer(2 + 2 + 2 * (1 + 4 / 256), state_bits=8),
              "adamw_fp32_master": Optimizer(16)}
# Loss workspace, CUDA context and allocator slack that the model below does not count: sized so that runs without
# Liger's fused loss, whose logits take more room, peak within their cap (a smaller workspace overran a 70 GiB cap in
# results/benchmarks/h200_7b_train_speed.json).
WORKSPACE_GIB = 5.5


def layer_activation_bytes(hidden: int, intermediate: int, tokens: int) -> tuple[int, int]:
    """Bytes of bf16 activations one decoder layer keeps for the backward pass over `tokens` tokens: (kept, when
    checkpointed). A kept layer holds about 8 hidden-wide tensors a token (its input, two norms' inputs and
    outputs, q/k/v, the attention output, the residual) and 3 intermediate-wide ones (the SwiGLU's gate, up and
    their product); a checkpointed one holds only its input and recomputes the rest. On the 7B shape this is more
    than the H100 runs measured a kept layer (results/benchmarks/h100_7b_train*.json), so the estimate errs on the
    safe side. Compiled and FP8 layers keep fewer or smaller activations, so for them it errs further on the safe
    side."""
    return 2 * tokens * (8 * hidden + 3 * intermediate), 2 * tokens * hidden


def layers_to_checkpoint(budget_bytes: float, fixed_bytes: float, kept_layer_bytes: float,
                         checkpointed_layer_bytes: float, num_layers: int) -> int:
    """The fewest layers to checkpoint (the fastest setting) such that the fixed memory, every layer's activations
    and one layer's recompute working set fit in `budget_bytes`; every layer when even that does not fit."""
    for checkpointed in range(num_layers + 1):
        activations = (num_layers - checkpointed) * kept_layer_bytes + checkpointed * checkpointed_layer_bytes
        recompute = kept_layer_bytes if checkpointed else 0
        if fixed_bytes + activations + recompute <= budget_bytes:
            return checkpointed
    return num_layers


def check_speedups(config: RunConfig) -> None:
    """Fail before any model is built on settings that cannot run ("auto" is the plan's to choose)."""
    if config.fp8 not in (None, "auto", *FP8_RECIPES):
        raise ValueError(f"unknown fp8 recipe {config.fp8!r}; choose from {FP8_RECIPES}, auto or none")
    if config.fp8 not in (None, "auto") and config.method != "full":
        why = {"qlora": "its frozen weights are bitsandbytes' 4-bit layers, which torchao's conversion leaves as they "
                        "are: nothing would run in FP8",
               "lora": "torchao's FP8 linears compute a gradient for every weight they hold (their backward returns "
                       "one whatever requires_grad says), so the frozen weights would cost their weight gradients "
                       "too"}.get(config.method, "FP8 is checked for full fine-tuning only")
        raise ValueError(f"fp8={config.fp8!r} with method={config.method!r}: {why}. Use --fp8 none with "
                         f"--method {config.method}, or --method full to train in FP8.")
    n = config.checkpointed_layers
    if not (n is None or n == "auto" or (isinstance(n, int) and n >= 0)):
        raise ValueError(f"checkpointed_layers={n!r}: give a number of layers, 'auto' or none")
    if config.max_memory_gib is not None and config.max_memory_gib <= 0:
        raise ValueError(f"max_memory_gib={config.max_memory_gib}: give a positive number of GiB, or none")
