"""torchao's 8-bit AdamW step (bf16 weights, stochastic rounding) as one Triton kernel: one pass over memory a weight.

The compiled `single_param_adam` took a large share of a 7B step on the H200 (`optimizer_step_seconds` in
results/benchmarks/h200_7b_train_16x2.json). Inductor makes two kernels a weight, the blocks' absmax and then the
update, and the update is bound by issuing instructions, not by memory: torchao's quantizer is a binary search, eight
dependent steps (seven gathers from the 256-value map) per moment and two more gathers to round. Here the code comes
from the map's structure (decades of evenly spaced values) and two independent comparisons, and the kernel reads
weight, gradient and both codes once and writes weight and codes once: the ~10 bytes a value that bound the step
by memory bandwidth.
"""

import functools

import torch
import triton
import triton.language as tl
from torchao.optim.quant_utils import quantize_8bit_with_qmap
from torchao.optim.subclass_8bit import OptimState8bit, get_qmap_signed, get_qmap_unsigned

BLOCKS_PER_PROGRAM = 4  # quantization blocks of 256 per Triton program: 1,024 values


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 keys that sort as the floats do: a float32 interval is then an integer interval to bisect."""
    bits = x.view(torch.int32).long()
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def _from_ordered(keys: torch.Tensor) -> torch.Tensor:
    return torch.where(keys < 0, -keys - 2**31, keys).int().view(torch.float32)


@functools.cache
def rounding_thresholds(signed: bool, device: torch.device) -> torch.Tensor:
    """Entry c: the smallest float32 that torchao's `quantize_8bit_with_qmap` sends to code c or above; -inf for
    c = 0 and inf at 256, so that code = #(entries 1..255 at or below x) for every x.

    torchao rounds between neighbours with its own float32 arithmetic, `x - q[c] >= (q[c+1] - q[c]) * 0.5`, so a
    boundary is within an ulp of the midpoint but not exactly there; bisecting over every float32 between each pair of
    neighbours, with torchao's function as the judge, finds it exactly (its codes rise monotonically with x)."""
    qmap = torch.tensor(get_qmap_signed() if signed else get_qmap_unsigned(), dtype=torch.float32)
    targets = torch.arange(1, 256)
    below, at_or_above = _ordered(qmap[:-1]), _ordered(qmap[1:])  # code(below) < target <= code(at_or_above)
    while (at_or_above - below > 1).any():
        middle = (below + at_or_above) // 2
        up = quantize_8bit_with_qmap(_from_ordered(middle), qmap) >= targets
        below, at_or_above = torch.where(up, below, middle), torch.where(up, middle, at_or_above)
    infinity = torch.tensor([torch.inf])
    return torch.cat([-infinity, _from_ordered(at_or_above), infinity]).to(device)


@triton.jit
def _quantize(x, thresholds_ptr, SIGNED: tl.constexpr):
    """torchao's code for x in [-1, 1], exactly. Its map is 0, 1 and seven decades [10^(d-7), 10^(d-6)), d = 0..6, of
    2^d evenly spaced values (signed map, mirrored below 0) or 2^(d+1) (unsigned). Scaled up into the top decade
    [0.1, 1), x's nearest entry is floor((|x| + 0.8) * n / 0.9) entries above 0 (one fewer on the unsigned map), n
    being the top decade's count halved for each decade scaled (below the smallest entry that is 0; at 1, 1). Float32
    error, and the decades' edges where the spacing changes, leave that at most one code off: comparing x with the
    thresholds on either side (`rounding_thresholds`) settles it."""
    scaled = tl.abs(x)
    n = tl.full(x.shape, 64.0 if SIGNED else 128.0, tl.float32)  # values in the top decade
    for _ in tl.static_range(6):
        below = scaled < 0.1
        scaled = tl.where(below, scaled * 10.0, scaled)
        n = tl.where(below, n * 0.5, n)
    steps = tl.floor((scaled + 0.8) * n * (1 / 0.9)).to(tl.int32)
    if SIGNED:
        estimate = tl.where(x < 0, 127 - steps, 127 + steps)  # code 127 is 0
    else:
        estimate = steps - 1  # the formula counts the top decade from 128; unsigned codes count it from 127
    estimate = tl.minimum(tl.maximum(estimate, 0), 255)
    lower = tl.load(thresholds_ptr + estimate)
    upper = tl.load(thresholds_ptr + estimate + 1)
    return estimate - (x < lower).to(tl.int32) + (x >= upper).to(tl.int32)


@triton.jit
def _dequantize(codes_ptr, scale_ptr, qmap_ptr, offsets, blocks, in_bounds):
    codes = tl.load(codes_ptr + offsets, mask=in_bounds[:, None], other=0).to(tl.int32)
    scale = tl.load(scale_ptr + blocks, mask=in_bounds, other=0.0)
    return tl.load(qmap_ptr + codes) * scale[:, None]


@triton.jit
def _requantize(values, codes_ptr, scale_ptr, thresholds_ptr, offsets, blocks, in_bounds, SIGNED: tl.constexpr):
    """OptimState8bit.copy_(values): each block's absmax (clipped at 1e-12) is its scale, values / scale its codes."""
    scale = tl.maximum(tl.max(tl.abs(values), axis=1), 1e-12)
    codes = _quantize(tl.math.div_rn(values, scale[:, None]), thresholds_ptr, SIGNED)
    tl.store(codes_ptr + offsets, codes.to(tl.uint8), mask=in_bounds[:, None])
    tl.store(scale_ptr + blocks, scale, mask=in_bounds)


@triton.jit
def _to_bf16_stochastically(x, seed, offsets):
    """torchao's `_fp32_to_bf16_sr`: truncate toward zero; step away from zero with probability (low 16 bits) / 2^16."""
    bits = x.to(tl.int32, bitcast=True)
    random16 = (tl.randint(seed, offsets) & 0xFFFF).to(tl.int32)
    truncated = bits & -65536  # 0xFFFF0000
    bits = tl.where(random16 < (bits & 0xFFFF), truncated + 0x10000, truncated)
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit(do_not_specialize=["seed"])  # a new seed every call: specialising on its value would recompile
def _adamw8bit_kernel(param_ptr, grad_ptr, m_codes_ptr, m_scale_ptr, m_qmap_ptr, m_thresholds_ptr, v_codes_ptr,
                      v_scale_ptr, v_qmap_ptr, v_thresholds_ptr, seed, n_blocks, lr, lr_times_weight_decay,
                      one_minus_beta1, one_minus_beta2, eps, bias_correction1, sqrt_bias_correction2,
                      BLOCK_SIZE: tl.constexpr, BLOCKS: tl.constexpr):
    """`single_param_adam` for one weight, its operations in torchao's order (scalars arrive as float32 torch made)."""
    blocks = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    offsets = blocks.to(tl.int64)[:, None] * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]
    in_bounds = blocks < n_blocks  # per block; [:, None] broadcasts it along the block's values
    weight = tl.load(param_ptr + offsets, mask=in_bounds[:, None], other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=in_bounds[:, None], other=0.0).to(tl.float32)
    exp_avg = _dequantize(m_codes_ptr, m_scale_ptr, m_qmap_ptr, offsets, blocks, in_bounds)
    exp_avg_sq = _dequantize(v_codes_ptr, v_scale_ptr, v_qmap_ptr, offsets, blocks, in_bounds)

    weight = weight - lr_times_weight_decay * weight
    # torch.lerp with a weight under 0.5 is start + weight * (end - start), rounded once (an FMA) on CPU and GPU
    exp_avg = tl.fma(one_minus_beta1, grad - exp_avg, exp_avg)
    exp_avg_sq = tl.fma(one_minus_beta2, grad * grad - exp_avg_sq, exp_avg_sq)
    _requantize(exp_avg, m_codes_ptr, m_scale_ptr, m_thresholds_ptr, offsets, blocks, in_bounds, True)
    _requantize(exp_avg_sq, v_codes_ptr, v_scale_ptr, v_thresholds_ptr, offsets, blocks, in_bounds, False)

    # division and square root rounded as torch rounds them (Triton's `/` and tl.sqrt are approximations on GPUs)
    denom = tl.math.div_rn(tl.math.sqrt_rn(exp_avg_sq), sqrt_bias_correction2) + eps
    weight = weight - tl.math.div_rn(lr * tl.math.div_rn(exp_avg, bias_correction1), denom)
    weight = _to_bf16_stochastically(weight, seed, offsets)
    tl.store(param_ptr + offsets, weight, mask=in_bounds[:, None])


@functools.lru_cache(maxsize=16)
def _float32_scalars(lr: float, weight_decay: float, beta1: float, beta2: float, step: float) -> tuple[float, ...]:
    """lr * weight_decay and the bias corrections, computed as `single_param_adam` computes them: in float32 torch."""
    lr_, step_ = torch.tensor(lr), torch.tensor(step)
    return (lr_ * weight_decay).item(), (1 - beta1**step_).item(), (1 - beta2**step_).sqrt().item()


def adamw8bit_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: OptimState8bit, exp_avg_sq: OptimState8bit, *,
                   step: float, lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
                   seed: int) -> None:
    """`single_param_adam(param, grad, step, exp_avg, exp_avg_sq, None, lr, beta1, beta2, weight_decay, eps,
    IS_ADAMW=True, BF16_STOCHASTIC_ROUND=True)` in place, for a contiguous bf16 `param`. step and lr are host numbers
    (torchao keeps both as CPU tensors), so nothing waits on the GPU; the rounding's random bits come from `seed`
    (31 bits; finetune.optim.rounding_seed), not from torch's generator."""
    lr_times_weight_decay, bias_correction1, sqrt_bias_correction2 = _float32_scalars(lr, weight_decay, beta1, beta2,
                                                                                      step)
    n_blocks = exp_avg.scale.numel()
    _adamw8bit_kernel[(triton.cdiv(n_blocks, BLOCKS_PER_PROGRAM),)](
        param, grad.contiguous(), exp_avg.codes, exp_avg.scale, exp_avg.qmap,
        rounding_thresholds(True, param.device), exp_avg_sq.codes, exp_avg_sq.scale, exp_avg_sq.qmap,
        rounding_thresholds(False, param.device), seed, n_blocks, lr, lr_times_weight_decay, 1 - beta1, 1 - beta2, eps,
        bias_correction1, sqrt_bias_correction2, BLOCK_SIZE=exp_avg.block_size, BLOCKS=BLOCKS_PER_PROGRAM)


@triton.jit
def _quantize_kernel(x_ptr, codes_ptr, thresholds_ptr, n, SIGNED: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n)
    tl.store(codes_ptr + offsets, _quantize(x, thresholds_ptr, SIGNED).to(tl.uint8), mask=offsets < n)


def quantize(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """`quantize_8bit_with_qmap(x, map)` for torchao's signed or unsigned map, by the kernel's quantizer (for tests)."""
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    block = 8192
    _quantize_kernel[(triton.cdiv(x.numel(), block),)](x.contiguous(), codes, rounding_thresholds(signed, x.device),
                                                        x.numel(), SIGNED=signed, BLOCK=block)
    return codes
