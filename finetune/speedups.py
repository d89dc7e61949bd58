"""Training speed-ups applied to the model before training: compiled decoder layers, FP8 matmuls, and the memory
estimates (the optimizers' states, the layers' activations) that decide how many layers recompute their activations
(`finetune/plan.py` chooses); host tables copied to the GPU, and results back, without waiting for the GPU's other
work (`queued_copy`, `HostCopy`); and the decoder layers found, or run as transformers writes them
(`as_transformers_writes`)."""

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from finetune.config import RunConfig, launched_processes

GIB = 2**30


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks, in order (the modules transformers checkpoints one by one)."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@contextmanager
def as_transformers_writes(layers: list[nn.Module]):
    """`layers` run as transformers writes them for the duration, the forwards the suite gave them set aside
    (`finetune.last_layer`, `finetune.residual_adds`): the eval benchmark's measure of what those save, in the same
    run."""
    forwards = [layer.__dict__.pop("forward", None) for layer in layers]
    try:
        yield
    finally:
        for layer, forward in zip(layers, forwards):
            if forward is not None:
                layer.forward = forward


def recomputed_layers(model: nn.Module) -> int:
    """How many decoder layers recompute their activations in the backward pass (transformers' per-layer switch; FSDP's
    own activation checkpointing wraps layers from outside and is not counted)."""
    return sum(bool(layer.gradient_checkpointing) for layer in decoder_layers(model))


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
    from torchao.float8 import convert_to_float8_training  # slow import, GPU option only

    # A packed micro-batch holds any number of tokens, and that number is the inner dimension of the weight-gradient
    # matmul, which FP8 kernels need in multiples of 16: pad it.
    fp8_config = dataclasses.replace(fp8_linear_config(recipe), pad_inner_dim=True, emulate=emulate)
    for layer in decoder_layers(model):
        convert_to_float8_training(layer, config=fp8_config,
                                   module_filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and _fp8_shaped(m))


def tensorwise_pow2_scales():
    """torchao's tensorwise recipe (one scale a tensor, e4m3 inputs and weights, e5m2 output gradients, fast
    accumulation in the forward matmul) with its scales rounded down to a power of 2, as its rowwise recipes round
    theirs: of the recipes compared on the 1024-wide model (results/gpu/fp8/, finetune/lab/fp8_recipes.py), those
    that round their scales so were the ones that held bf16's loss, and this one keeps tensorwise's speed."""
    from torchao.float8 import Float8LinearConfig

    return Float8LinearConfig(round_scales_to_power_of_2=True)


# --fp8 name -> torchao's Float8LinearConfig for it, built on use (torchao is slow to import). The recipe's own here;
# finetune/lab/fp8_recipes.py adds the ones it was compared with for the lab's benchmarks.
FP8_RECIPES = {"tensorwise_pow2_scales": tensorwise_pow2_scales}


def fp8_linear_config(recipe: str):
    """torchao's `Float8LinearConfig` for one of FP8_RECIPES."""
    if recipe not in FP8_RECIPES:
        raise ValueError(f"unknown fp8 recipe {recipe!r}; choose from {tuple(FP8_RECIPES)} or none")
    return FP8_RECIPES[recipe]()


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
    # The one-launch Triton update on CUDA (finetune/adamw8bit_kernel.py) for the weights it takes; off, torchao's
    # compiled update for every weight, as the bf16 reference runs it.
    fused: bool = False

    @property
    def rounds_stochastically(self) -> bool:
        return self.state_bits is not None


# bf16 weights, grads and two bf16 moments (plain AdamW on fp32 weights, bf16=False: all four fp32, as
# plan.training_state_bytes counts them); 8-bit moments take 1 byte each plus an fp32 scale per block of 256; fp32
# master weights keep all four in fp32.
OPTIMIZERS = {"adamw": Optimizer(8), "adamw_bf16_sr": Optimizer(8, state_bits=16),
              "adamw_bf16_sr_fused": Optimizer(8, state_bits=16, fused=True),
              "adamw8bit_bf16_sr": Optimizer(2 + 2 + 2 * (1 + 4 / 256), state_bits=8, fused=True),
              "adamw_fp32_master": Optimizer(16)}


def queued_copy(host: torch.Tensor, device) -> torch.Tensor:
    """`host` on `device`, the copy queued behind the GPU's work rather than waiting for it: torch copies pageable
    memory to the GPU synchronously (it waits for everything queued before it), so a host that prepares the next
    launch while the GPU runs would stop there. A copy from pinned memory is queued; torch's pinned-memory cache keeps
    the buffer until the copy has run. Elsewhere than on CUDA, `host` as it is."""
    return host.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else host


class HostCopy:
    """A result's copy on the host, queued when made, right behind the work that computes it. `.cpu()` queues its copy
    when called, behind everything launched since, and waits for all of that: label scoring read each batch back once
    the next batch's forward was queued, so it waited for that forward too, and the GPU idled while the host encoded
    and packed the batch after (results/benchmarks/README.md, 2026-12-07). On CUDA the copy lands in pinned memory
    and `numpy()` waits for the copy alone (an event recorded behind it); elsewhere it is `.cpu()`'s (on the CPU, the
    tensor itself). With it a 7B label-scoring pass on an H100 ran within 0.14 s of its GPU-bound time, against
    0.53-0.71 s before (h100_7b_eval_taught_200_copied*.json)."""

    def __init__(self, tensor: torch.Tensor):
        if not tensor.is_cuda:
            self._host, self._copied = tensor.cpu(), None
            return
        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()

    def numpy(self) -> np.ndarray:
        if self._copied is not None:
            self._copied.synchronize()
        return self._host.numpy()


def weights_dtype(config: RunConfig) -> torch.dtype:
    """bf16 weights for bf16 runs, except with fp32 master weights (bf16 is then the autocast compute dtype)."""
    return torch.bfloat16 if config.bf16 and config.optimizer != "adamw_fp32_master" else torch.float32


# Loss workspace, CUDA context and allocator slack that the model below does not count: sized so that runs without
# Liger's fused loss, whose logits take more room, peak within their cap (a smaller workspace overran a 70 GiB cap in
# results/benchmarks/h200_7b_train_speed.json).
WORKSPACE_GIB = 5.5


def layer_activation_bytes(hidden: int, intermediate: int, tokens: int, value_bytes: int = 2) -> tuple[int, int]:
    """Bytes of activations (bf16, or fp32 with `value_bytes` 4) one decoder layer keeps for the backward pass over
    `tokens` tokens: (kept, when checkpointed). A kept layer holds about 8 hidden-wide tensors a token (its input,
    two norms' inputs and outputs, q/k/v, the attention output, the residual) and 3 intermediate-wide ones (the
    SwiGLU's gate, up and their product); a checkpointed one holds only its input and recomputes the rest. On the 7B
    shape this is more than the H100 runs measured a kept layer (results/benchmarks/h100_7b_train*.json), so the
    estimate errs on the safe side. Compiled and FP8 layers keep fewer or smaller activations, so for them it errs
    further on the safe side."""
    return value_bytes * tokens * (8 * hidden + 3 * intermediate), value_bytes * tokens * hidden


def activations_fit(budget_bytes: float, fixed_bytes: float, kept_layer_bytes: float,
                    checkpointed_layer_bytes: float, num_layers: int, checkpointed: int) -> bool:
    """Whether the fixed memory, every layer's activations with `checkpointed` of the layers recomputed, and one
    layer's recompute working set fit in `budget_bytes`."""
    activations = (num_layers - checkpointed) * kept_layer_bytes + checkpointed * checkpointed_layer_bytes
    recompute = kept_layer_bytes if checkpointed else 0
    return fixed_bytes + activations + recompute <= budget_bytes


def layers_to_checkpoint(budget_bytes: float, fixed_bytes: float, kept_layer_bytes: float,
                         checkpointed_layer_bytes: float, num_layers: int) -> int:
    """The fewest layers to checkpoint (the fastest setting) whose activations fit (`activations_fit`); every layer
    when even that does not fit."""
    sizes = (budget_bytes, fixed_bytes, kept_layer_bytes, checkpointed_layer_bytes, num_layers)
    return next((n for n in range(num_layers + 1) if activations_fit(*sizes, n)), num_layers)


def accumulate_in_matmul_unsupported(config: RunConfig) -> str | None:
    """Why the weight gradients cannot be summed in the matmuls (finetune/grad_accumulation.py), or None where they can:
    an explicit true is refused with it, "auto" turns off with it (plan.py)."""
    if config.method != "full":
        return f"{config.method}'s frozen weights have no gradient to add"
    if config.fp8 not in (None, "auto"):  # "auto" stays off until the FP8 recipe is checked (plan.py)
        return "FP8's linear layers (torchao) compute their own weight gradients"
    if launched_processes() > 1:
        return "several processes (DDP, FSDP) reduce the gradients autograd adds"
    if config.bf16 and config.optimizer == "adamw_fp32_master":
        return "fp32 master weights take bf16 gradients from autocast's matmuls, which the fused sum would mix"
    return None


def check_speedups(config: RunConfig) -> None:
    """Fail before any model is built on settings that cannot run ("auto" is the plan's to choose)."""
    if config.fp8 not in (None, "auto", *FP8_RECIPES):
        raise ValueError(f"unknown fp8 recipe {config.fp8!r}; choose from {tuple(FP8_RECIPES)}, auto or none")
    if config.fp8 not in (None, "auto") and config.method != "full":
        why = {"qlora": "its frozen weights are bitsandbytes' 4-bit layers, which torchao's conversion leaves as they "
                        "are: nothing would run in FP8",
               "lora": "torchao's FP8 linears compute a gradient for every weight they hold (their backward returns "
                       "one whatever requires_grad says), so the frozen weights would cost their weight gradients "
                       "too"}.get(config.method, "FP8 is checked for full fine-tuning only")
        raise ValueError(f"fp8={config.fp8!r} with method={config.method!r}: {why}. Use --fp8 none with "
                         f"--method {config.method}, or --method full to train in FP8.")
    if config.accumulate_in_matmul not in (True, False, "auto"):
        raise ValueError(f"accumulate_in_matmul={config.accumulate_in_matmul!r}: give true, false or 'auto'")
    why = accumulate_in_matmul_unsupported(config)
    if config.accumulate_in_matmul is True and why:
        raise ValueError(f"accumulate_in_matmul=true sums weight gradients for full fine-tuning in one process, "
                         f"without FP8: {why}. Use --accumulate_in_matmul false.")
    n = config.checkpointed_layers
    if not (n is None or n == "auto" or (isinstance(n, int) and n >= 0)):
        raise ValueError(f"checkpointed_layers={n!r}: give a number of layers, 'auto' or none")
    if config.max_memory_gib is not None and config.max_memory_gib <= 0:
        raise ValueError(f"max_memory_gib={config.max_memory_gib}: give a positive number of GiB, or none")
