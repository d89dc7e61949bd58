"""The recipe's "auto" settings chosen from the hardware at start, each with the reason it was chosen.

`qwen2.5-7b` asks for the fastest settings whose learning was checked, where the machine runs them: compiled decoder
layers, the fused Triton AdamW update (bf16 moments where the memory holds them, else 8-bit ones), FP8 matmuls once
their learning is checked at the 7B shape,
the step's rows in the micro-batches that, with the layers the memory then makes recompute, cost least, and for
evaluation Liger's kernels and a batch sized from the memory.
Every choice is a plain value in the returned config (what runs) and a reason (what is logged once and written into the
training summary and results JSON). A setting given explicitly is kept as given; what it needs is checked where it is
used (a missing package or an unsupported GPU is named there, never silently dropped).

GPUs whose memory the CPU shares (GB10 in the DGX Spark, Jetson) report `is_integrated`: what the host side needs
(the OS, Python, the data, and the host copy a checkpoint write makes) comes out of the same memory, so the plan keeps
it aside.
"""

import dataclasses
import importlib.util
import logging
from dataclasses import dataclass

import torch

from finetune.config import REFERENCE_SPEED, RunConfig
from finetune.sources import ModelShape
from finetune.speedups import (GIB, OPTIMIZERS, WORKSPACE_GIB, accumulate_in_matmul_unsupported, activations_fit,
                               layer_activation_bytes, layers_to_checkpoint, weights_dtype)

log = logging.getLogger(__name__)

# The FP8 recipe the speed-up would use: the one that held bf16's loss on the 1024-wide model (results/gpu/fp8/).
FP8_RECIPE = "tensorwise_pow2_scales"
# Whether that recipe reached bf16's loss at the 7B shape (results/gpu/fp8/fp8_7b.json, `make gpu-fp8-7b`;
# tests/test_plan.py keeps this equal to the committed result). Until it does, "auto" leaves FP8 off.
FP8_CHECKED_AT_7B = False
FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper and later have FP8 tensor cores
# Memory shared by CPU and GPU: the OS, Python, tokenizer, data and loader workers, beside the model's host copy.
HOST_RESERVE_GIB = 8.0
# A pass over one micro-batch more costs about what recomputing this many decoder layers does: on the 7B shape on one
# H100, 32 rows a step, weight gradients summed in the matmul, about 10 ms a recomputed layer and 11 ms a micro-batch
# (16 x 2 recomputing 7 and 13 layers against 8 x 4 recomputing none; results/benchmarks/h100_7b_train_layouts_summed*
# .json, kept in step by tests/test_plan.py). With autograd's sums a micro-batch cost 2.6 layers
# (h100_7b_train_recipe_layouts*.json): each one's sum into .grad was a pass of its own.
MICRO_BATCH_COST_IN_LAYERS = 1.1
EVAL_MAX_BATCH = 512  # label scoring gained nothing past it on an H200; generation's padding grows with it
CPU_EVAL_BATCH = 64


@dataclass(frozen=True)
class GPU:
    """What the plan needs to know about the card: its FP8 support, its memory, whether the host shares it."""

    name: str
    capability: tuple[int, int]
    total_gib: float
    free_gib: float  # free to this process: free on the device plus what its allocator holds
    integrated: bool

    @classmethod
    def current(cls) -> "GPU | None":
        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(0)
        free, _ = torch.cuda.mem_get_info()
        return cls(props.name, (props.major, props.minor), props.total_memory / GIB,
                   (free + torch.cuda.memory_reserved()) / GIB, bool(getattr(props, "is_integrated", False)))


Plan = dict[str, dict]  # setting -> {"value": ..., "reason": ...}


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def plan_training(config: RunConfig, gpu: GPU | None, shape: ModelShape, has=installed,
                  fsdp: bool = False, row_tokens: float | None = None) -> tuple[RunConfig, Plan]:
    """`config` with every "auto" speed setting of training replaced by its choice, and the choices with reasons.
    Under FSDP2 (`fsdp`) "auto" keeps the reference's settings: the single-GPU speed-ups are not checked on shards.
    `row_tokens`: the tokens a packed row runs, whose activations the memory plan counts (fewer than `max_length`
    where the articles share their opening, `finetune.opening.row_tokens_run`); none = `max_length`."""
    plan: Plan = {}
    row_tokens = row_tokens or config.max_length

    def choose(name: str, value, reason: str) -> None:
        plan[name] = {"value": value, "reason": reason}

    if fsdp:
        return _fsdp_plan(config, choose), plan
    if config.compile_layers == "auto":
        if gpu is None:
            choose("compile_layers", False, "off: no CUDA GPU (inductor's fused kernels are GPU code here)")
        elif not has("triton"):
            choose("compile_layers", False, "off: Triton is not installed (torch.compile's GPU backend needs it)")
        else:
            choose("compile_layers", True, "on: one compiled graph serves every decoder layer (CUDA + Triton)")
    compiled = plan.get("compile_layers", {}).get("value", config.compile_layers)

    if config.fp8 == "auto":
        choose("fp8", *_fp8(config, gpu, has))
    if config.optimizer == "auto":
        choose("optimizer", *_optimizer(config, gpu, shape, has, row_tokens))
    if config.use_liger_kernel == "auto":
        if compiled:
            choose("use_liger_kernel", False, "off: the compiled layers fuse the same norms, RoPE and SwiGLU, and the "
                   "suite's loss computes the LM head for the answer tokens only")
        elif gpu is not None and has("liger_kernel"):
            choose("use_liger_kernel", True, "on: Liger's fused norms, RoPE, SwiGLU and loss (eager layers)")
        else:
            choose("use_liger_kernel", False, _liger_off_reason(gpu))
    resolved = dataclasses.replace(config, **{name: choice["value"] for name, choice in plan.items()})

    if config.merge_micro_batches in ("auto", True):
        rows, micro_batches, reason = _micro_batches(resolved, gpu, shape, row_tokens)
        changed = (rows, micro_batches) != (config.per_device_train_batch_size, config.gradient_accumulation_steps)
        choose("merge_micro_batches", changed, reason)
        resolved = dataclasses.replace(resolved, merge_micro_batches=changed, per_device_train_batch_size=rows,
                                       gradient_accumulation_steps=micro_batches)
    if config.checkpointed_layers == "auto" and config.gradient_checkpointing:
        value, reason, _ = _checkpointed_layers(resolved, gpu, shape, row_tokens)
        choose("checkpointed_layers", value, reason)
        resolved = dataclasses.replace(resolved, checkpointed_layers=value)
    if config.accumulate_in_matmul == "auto":
        value, reason = _accumulate_in_matmul(resolved, gpu)
        choose("accumulate_in_matmul", value, reason)
        resolved = dataclasses.replace(resolved, accumulate_in_matmul=value)
    return resolved, plan


def _accumulate_in_matmul(config: RunConfig, gpu: GPU | None) -> tuple[bool, str]:
    """On where autograd would add micro-batches' weight gradients in a pass of their own
    (finetune/grad_accumulation.py): on an H100 the recipe's 8 x 4 step ran 2.0-2.5% faster than with autograd's sums
    in each of three runs (results/benchmarks/h100_7b_train_layouts_summed_{b,c,d}.json)."""
    steps = config.gradient_accumulation_steps
    if steps == 1:
        return False, "off: one micro-batch a step, nothing to add"
    if gpu is None:
        return False, "off: timed on GPUs only"
    if why := accumulate_in_matmul_unsupported(config):
        return False, f"off: {why}"
    return True, (f"on: {steps} micro-batches a step, each one's weight gradients added inside the decoder layers' "
                  f"weight-gradient matmuls rather than in a pass of their own")


def _fsdp_plan(config: RunConfig, choose) -> RunConfig:
    reference = {name: REFERENCE_SPEED[name] for name in ("compile_layers", "fp8", "optimizer", "use_liger_kernel",
                                                          "checkpointed_layers", "merge_micro_batches",
                                                          "accumulate_in_matmul")}
    if not config.bf16:  # the reference's optimizer rounds into bf16 weights
        reference["optimizer"] = "adamw"
    for name, value in reference.items():
        if getattr(config, name) == "auto":
            choose(name, value, "the reference's setting: under FSDP2 the single-GPU speed-ups are not checked yet")
    if config.merge_micro_batches is True:  # the merge is the single-GPU memory plan's, which FSDP2 does not run
        choose("merge_micro_batches", False, "off: under FSDP2 the micro-batches run as given")
        config = dataclasses.replace(config, merge_micro_batches=False)
    return dataclasses.replace(config, **{name: value for name, value in reference.items()
                                          if getattr(config, name) == "auto"})


def fp8_unsupported(gpu: GPU | None, has=installed) -> str | None:
    """Why FP8 matmuls cannot run here (no CUDA GPU, no FP8 tensor cores, no torchao), or None where they can."""
    if gpu is None:
        return "no CUDA GPU"
    if gpu.capability < FP8_MIN_CAPABILITY:
        return f"compute capability {gpu.capability[0]}.{gpu.capability[1]} has no FP8 tensor cores (8.9+)"
    if not has("torchao"):
        return "torchao is not installed (pip install torchao)"
    return None


def _fp8(config: RunConfig, gpu: GPU | None, has) -> tuple[str | None, str]:
    if config.method != "full":
        return None, f"off: FP8 is for full fine-tuning (method={config.method!r} keeps its frozen weights as loaded)"
    unsupported = fp8_unsupported(gpu, has)
    if unsupported:
        return None, f"off: {unsupported}"
    if not FP8_CHECKED_AT_7B:
        return None, (f"off: {FP8_RECIPE} held bf16's loss on a 1024-wide model but not within 2% at the 7B shape "
                      f"(results/gpu/fp8/fp8_7b.json); --fp8 {FP8_RECIPE} turns it on")
    return FP8_RECIPE, f"on: {FP8_RECIPE} held bf16's loss at the 7B shape (results/gpu/fp8/fp8_7b.json)"


def _optimizer(config: RunConfig, gpu: GPU | None, shape: ModelShape, has, row_tokens: float) -> tuple[str, str]:
    """The fused update (LoRA's ~400 small adapter weights too: one launch rather than one compiled call each under a
    reseeded generator, which made the unfused update wait on the host, h200_7b_train_recipe_methods.json), with
    bf16 moments where the memory holds them at the same layout as 8-bit ones, else 8-bit moments. bf16 moments move
    4 bytes a value more, but the update quantizes nothing: no map lookups, block maxima or divisions by a scale
    (instructions a value counted in results/benchmarks/adamw8bit_sass_bf16_moments.json); 8-bit ones pay where the
    memory they free keeps layers or merges micro-batches."""
    if not config.bf16:
        return "adamw", "adamw: fp32 weights update exactly (bf16=False)"
    if gpu is None or not (has("triton") and has("torchao")):
        return "adamw_bf16_sr", "adamw_bf16_sr: the fused update needs a CUDA GPU and Triton"
    fused = "the fused Triton update, one launch for all weights, stochastic rounding into bf16"
    eight_bit = _layout(dataclasses.replace(config, optimizer="adamw8bit_bf16_sr"), gpu, shape, row_tokens)
    sixteen_bit = _layout(dataclasses.replace(config, optimizer="adamw_bf16_sr_fused"), gpu, shape, row_tokens)
    if sixteen_bit == eight_bit and sixteen_bit[3]:  # the same layout, and it fits (8-bit moments need less)
        return "adamw_bf16_sr_fused", (f"adamw_bf16_sr_fused: bf16 moments with {fused}; they fit as 8-bit ones "
                                       f"would ({_describe(eight_bit, shape)}), and need no quantization")
    return "adamw8bit_bf16_sr", (f"adamw8bit_bf16_sr: 8-bit moments (6 bytes a parameter instead of 8) with {fused}; "
                                 f"{_describe(eight_bit, shape)}, where bf16 moments would need "
                                 f"{_describe(sixteen_bit, shape)}")


def _layout(config: RunConfig, gpu: GPU, shape: ModelShape, row_tokens: float) -> tuple[int, int, int, bool]:
    """What the memory plan makes of `config`: the layers to recompute, the rows, the micro-batches, and whether
    that fits. Settings the user gave (layers to recompute, no checkpointing, no merging) stay as given."""
    rows, micro_batches = config.per_device_train_batch_size, config.gradient_accumulation_steps
    if config.merge_micro_batches in ("auto", True):
        rows, micro_batches, _ = _micro_batches(config, gpu, shape, row_tokens)
    config = dataclasses.replace(config, per_device_train_batch_size=rows)
    if config.gradient_checkpointing and config.checkpointed_layers == "auto":
        layers, _, fits = _checkpointed_layers(config, gpu, shape, row_tokens)
        return layers, rows, micro_batches, fits
    layers = 0 if not config.gradient_checkpointing else config.checkpointed_layers
    layers = shape.layers if layers is None else layers
    budget, _, fixed, kept, checkpointed = _memory(config, gpu, shape, row_tokens)
    return layers, rows, micro_batches, activations_fit(budget, fixed, kept, checkpointed, shape.layers, layers)


def _describe(layout: tuple[int, int, int, bool], shape: ModelShape) -> str:
    layers, rows, micro_batches, fits = layout
    return f"{layers} of {shape.layers} layers recomputed at {rows} x {micro_batches} rows{'' if fits else ', short'}"


def _liger_off_reason(gpu: GPU | None) -> str:
    if gpu is None:
        return "off: no CUDA GPU (Liger's kernels are Triton GPU code)"
    return "off: liger-kernel is not installed (pip install -e '.[gpu]')"


def _checkpointed_layers(config: RunConfig, gpu: GPU | None, shape: ModelShape,
                         row_tokens: float) -> tuple[int | None, str, bool]:
    """The fewest layers to recompute such that weights, gradients, optimizer states and activations fit, and whether
    they fit at all (every layer recomputed where they do not)."""
    if gpu is None:
        return None, "every layer: no GPU memory to plan", True
    budget, assumed, fixed, kept, checkpointed = _memory(config, gpu, shape, row_tokens)
    n = layers_to_checkpoint(budget, fixed, kept, checkpointed, shape.layers)
    fits = activations_fit(budget, fixed, kept, checkpointed, shape.layers, n)
    short = "" if fits else "; even so it does not fit: fewer rows a micro-batch need less"
    return n, (f"{n} of {shape.layers} layers recompute: budget {budget / GIB:.1f} GiB ({assumed}), weights, "
               f"gradients and optimizer states {fixed / GIB:.1f} GiB, {kept / GIB:.2f} GiB a kept layer at "
               f"{config.per_device_train_batch_size} x {row_tokens:.0f} tokens{short}"), fits


def _memory(config: RunConfig, gpu: GPU, shape: ModelShape, row_tokens: float) -> tuple[float, str, float, int, int]:
    """The budget (and what it assumed), the weights, gradients and optimizer states, and a kept and a recomputed
    layer's activations at `config`'s rows a micro-batch, in bytes."""
    kept, checkpointed = layer_activation_bytes(shape.hidden, shape.intermediate,
                                                round(config.per_device_train_batch_size * row_tokens),
                                                activation_bytes(config))
    budget, assumed = memory_budget(gpu, config.max_memory_gib, weights_bytes=weight_bytes(config) * shape.parameters)
    return budget, assumed, training_state_bytes(config, shape), kept, checkpointed


def _micro_batches(config: RunConfig, gpu: GPU | None, shape: ModelShape, row_tokens: float) -> tuple[int, int, str]:
    """The step's rows in the micro-batches that cost least. The loss is normalized over the whole step, so the update
    is the same; each pass over a micro-batch has its fixed costs (the embedding's and LM head's gradients, the loss,
    the launches), about what recomputing MICRO_BATCH_COST_IN_LAYERS layers costs. So: fewer, larger micro-batches
    while every layer's activations still fit, and under 'auto' checkpointing more, smaller ones where that saves
    more recompute than the passes it adds. A number of layers given keeps the micro-batches as given."""
    given_rows, micro_batches = config.per_device_train_batch_size, config.gradient_accumulation_steps
    given = f"{given_rows} x {micro_batches} rows"
    if gpu is None:
        return given_rows, micro_batches, f"{given} kept: no GPU memory to plan"
    auto = config.gradient_checkpointing and config.checkpointed_layers == "auto"
    if config.gradient_checkpointing and not auto and config.checkpointed_layers != 0:
        return given_rows, micro_batches, f"{given} kept: layers are recomputed at this micro-batch already"
    planned = dataclasses.replace(config, gradient_checkpointing=True, checkpointed_layers="auto")
    step_rows, recomputed, short = given_rows * micro_batches, {}, set()

    def weigh(rows: int) -> int:
        recomputed[rows], _, fits = _checkpointed_layers(dataclasses.replace(planned, per_device_train_batch_size=rows),
                                                         gpu, shape, row_tokens)
        if not fits:
            short.add(rows)
        return recomputed[rows]

    rows = given_rows
    while weigh(rows) == 0 and step_rows % (2 * rows) == 0:  # twice the rows while every layer's activations fit
        rows *= 2
    rows = given_rows
    while auto and recomputed[rows] and rows % 2 == 0:  # half the rows while layers recompute
        rows //= 2
        weigh(rows)
    budget, assumed = memory_budget(gpu, config.max_memory_gib, weights_bytes=weight_bytes(config) * shape.parameters)
    weighed = ", ".join(f"{r} x {step_rows // r} recomputing {layers}" for r, layers in sorted(recomputed.items()))
    weighed = f"{weighed} layers in {budget / GIB:.1f} GiB ({assumed})"
    if auto:
        rows = min(recomputed,  # a micro-batch that fits first, then the least work
                   key=lambda r: (r in short, recomputed[r] + MICRO_BATCH_COST_IN_LAYERS * step_rows / r, -r))
        why = (f"the least recompute and passes of {weighed}, a micro-batch costing about what "
               f"{MICRO_BATCH_COST_IN_LAYERS} recomputed layers do"
               + (f" ({', '.join(map(str, sorted(short)))} rows do not fit)" if short else ""))
    else:  # the layers are given: fewer micro-batches only, where none would recompute
        rows = max(r for r, layers in recomputed.items() if r == given_rows or layers == 0)
        why = f"the fewest micro-batches with no layer recomputed, of {weighed}"
    if rows == given_rows:
        return rows, micro_batches, f"{given} kept: {why}"
    return rows, step_rows // rows, f"{given} run as {rows} x {step_rows // rows}: {why}"


def memory_budget(gpu: GPU, max_memory_gib: float | None, weights_bytes: float) -> tuple[float, str]:
    """Bytes the run may plan for on `gpu`, and what that assumed. Shared memory keeps aside the host's needs: the
    reserve, and one host copy of the weights (what writing a checkpoint or the final model passes through)."""
    available = gpu.free_gib * GIB - WORKSPACE_GIB * GIB
    assumed = f"{gpu.free_gib:.1f} GiB free less {WORKSPACE_GIB} GiB of workspace"
    if gpu.integrated:
        host = HOST_RESERVE_GIB * GIB + weights_bytes
        available -= host
        assumed += (f", less {host / GIB:.1f} GiB the CPU shares ({HOST_RESERVE_GIB:.0f} GiB for the OS, data and "
                    f"Python, {weights_bytes / GIB:.1f} GiB for a checkpoint's host copy of the weights)")
    if max_memory_gib is not None and max_memory_gib * GIB - WORKSPACE_GIB * GIB < available:
        available = max_memory_gib * GIB - WORKSPACE_GIB * GIB
        assumed = f"max_memory_gib={max_memory_gib:g} less {WORKSPACE_GIB} GiB of workspace"
    return available, assumed


def training_state_bytes(config: RunConfig, shape: ModelShape) -> float:
    """Weights, gradients and optimizer states. Full fine-tuning: all of them for every weight. LoRA and QLoRA: the
    frozen weights as loaded (`weights_dtype`, or QLoRA's 4-bit projections), plus all three for the adapters."""
    per_parameter = trained_parameter_bytes(config)
    if config.method == "full":
        return shape.parameters * per_parameter
    frozen = weight_bytes(config) * shape.parameters
    if config.method == "qlora":  # 4-bit projections with a 2-byte scale per 64 weights, the rest as loaded
        frozen -= shape.linear_parameters * (weight_bytes(config) - 0.5 - 2 / 64)
    return frozen + shape.adapter_parameters(config.lora_rank) * per_parameter


def trained_parameter_bytes(config: RunConfig) -> float:
    """A trained weight, its gradient and both AdamW moments."""
    if config.optimizer == "adamw":  # plain AdamW keeps its gradients and moments in the weights' dtype
        return 4 * weight_bytes(config)
    return OPTIMIZERS.get(config.optimizer, OPTIMIZERS["adamw_bf16_sr"]).bytes_per_parameter


def weight_bytes(config: RunConfig) -> int:
    """Bytes a weight takes as loaded: 2 in bf16, 4 in fp32 (bf16=False, or fp32 master weights)."""
    return weights_dtype(config).itemsize


def activation_bytes(config: RunConfig) -> int:
    """Bytes an activation takes: 2 in bf16 runs (fp32 master weights compute under bf16 autocast), else 4."""
    return 2 if config.bf16 else 4


def plan_evaluation(config: RunConfig, gpu: GPU | None, shape: ModelShape,
                    has=installed) -> tuple[RunConfig, Plan]:
    """`config` with evaluation's "auto" settings chosen: Liger's kernels, compiled layers, the batch size."""
    plan: Plan = {}

    def choose(name: str, value, reason: str) -> None:
        plan[name] = {"value": value, "reason": reason}

    if config.use_liger_kernel == "auto":
        if gpu is not None and has("liger_kernel"):
            choose("use_liger_kernel", True, "on: Liger's fused RMSNorm, RoPE and SwiGLU")
        else:
            choose("use_liger_kernel", False, _liger_off_reason(gpu))
    liger = plan.get("use_liger_kernel", {}).get("value", config.use_liger_kernel)
    if config.compile_layers == "auto":
        if liger:
            choose("compile_layers", False, "off: Liger's kernels fuse the same ops, and were faster at evaluation")
        elif gpu is None or not has("triton"):
            choose("compile_layers", False, "off: no CUDA GPU with Triton")
        else:
            choose("compile_layers", True, "on: compiled layers in place of Liger's kernels (compiled during warm-up)")
    if config.eval_batch_size == "auto":
        choose("eval_batch_size", *_eval_batch_size(config, gpu, shape))
    return dataclasses.replace(config, **{name: choice["value"] for name, choice in plan.items()}), plan


def _eval_batch_size(config: RunConfig, gpu: GPU | None, shape: ModelShape) -> tuple[int, str]:
    """The largest power of two up to EVAL_MAX_BATCH whose articles fit: per article, the logits of label scoring's
    answer tree (16 positions: in bf16, a float32 copy, and its float32 log-softmax), one layer's activations over
    `max_length` tokens, and generation's key/value cache over the prompt and its answer."""
    if gpu is None:
        return CPU_EVAL_BATCH, f"{CPU_EVAL_BATCH}: no GPU memory to plan"
    weights = weight_bytes(config) * shape.parameters
    budget, assumed = memory_budget(gpu, config.max_memory_gib, weights_bytes=weights)
    tokens = config.max_length + 16
    per_article = (16 * shape.vocab * (2 + 4 + 4) + tokens * (2 * shape.intermediate + 4 * shape.hidden) * 2
                   + tokens * shape.layers * 2 * shape.kv_width * 2)
    fits = max(1, int((budget - weights) // per_article))
    batch = min(EVAL_MAX_BATCH, 1 << (fits.bit_length() - 1))
    return batch, (f"{batch}: {fits} articles of {per_article / 2**20:.0f} MiB fit beside {weights / GIB:.1f} GiB of "
                   f"weights in {budget / GIB:.1f} GiB ({assumed}); at most {EVAL_MAX_BATCH}")


def smaller_micro_batches(rows: int, micro_batches: int) -> tuple[int, int] | None:
    """The same rows a step in micro-batches of fewer rows, what a step that ran out of memory tries next: `rows`
    divided by its smallest factor (16 x 2 -> 8 x 4, 3 x 4 -> 1 x 12); None at one row a micro-batch."""
    factor = next((d for d in range(2, rows + 1) if rows % d == 0), None)
    return (rows // factor, micro_batches * factor) if factor else None


class OutOfMemory(RuntimeError):
    """The GPU ran out of memory: the message says what was kept and which settings need less."""


def gpu_memory_note() -> str:
    """The GPU's memory at the moment (after an out-of-memory error): this process's peak and what others hold."""
    if not torch.cuda.is_available():
        return ""
    free, total = torch.cuda.mem_get_info()
    others = total - free - torch.cuda.memory_reserved()
    return (f" (this process peaked at {torch.cuda.max_memory_allocated() / GIB:.1f} GiB of the GPU's "
            f"{total / GIB:.1f} GiB; other processes hold {max(others, 0) / GIB:.1f} GiB)")


def log_plan(plan: Plan, what: str) -> None:
    for name, choice in plan.items():
        log.info("%s: %s = %s (%s)", what, name, choice["value"], choice["reason"])
