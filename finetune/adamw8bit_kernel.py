"""torchao's 8-bit AdamW step (bf16 weights, stochastic rounding) as one Triton kernel: one pass over memory, and
one launch for many weights.

The compiled `single_param_adam` took a large share of a 7B step on the H200 (`optimizer_step_seconds` in
results/benchmarks/h200_7b_train_16x2.json). Inductor makes two kernels a weight, the blocks' absmax and then the
update, and the update is bound by issuing instructions, not by memory: torchao's quantizer is a binary search, eight
dependent steps (seven gathers from the 256-value map) per moment and two more gathers to round. This kernel reads
weight, gradient and both codes once and writes weight and codes once, and keeps the work a value small, since that,
not the ~10 bytes a value, is what bounds it: a code is one lookup by the value's top bits and one comparison
(`code_table`), the 256-value tables are read through shared memory, a division by a block's scale or a bias
correction is a multiply and two FMAs from its reciprocal, and the rounding's random bits come from a short integer
hash. Each choice keeps torchao's arithmetic: the same codes and scales, bit for bit (tests/test_optimizers.py). The
kernel's time before and after is in results/benchmarks/h200_adamw8bit_kernel.log.

The same kernel takes bf16 moments (torchao's `_AdamW`, the `adamw_bf16_sr_fused` option), read and written as they
are: no tables, no block scales, 14 bytes a value against 10, and far fewer instructions. Where the memory holds the
larger moments without recomputing a layer more, that is the faster trade (finetune/plan.py chooses it).
"""

import functools

import torch
import triton
import triton.language as tl
from torchao.optim.quant_utils import quantize_8bit_with_qmap
from torchao.optim.subclass_8bit import OptimState8bit, get_qmap_signed, get_qmap_unsigned

from finetune.speedups import queued_copy

BLOCKS_PER_PROGRAM = 4  # quantization blocks of 256 a program updates at once: 1,024 values
# 2 warps a program: 16 values a thread. Fewer instructions a value (103 against 116 for sm_90, static count) at 151
# registers: 46.6 ms over the 7B shape's weights against 49.1 at Triton's default of 4 warps, same run on an H100
# (results/benchmarks/h100_adamw8bit_kernel_7b_warps*.json: more warps, or fewer, were slower).
NUM_WARPS = 2
BF16_BLOCK = 256  # bf16 moments' unit of work: the 8-bit states' block, so programs are shaped alike


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 keys that sort as the floats do: a float32 interval is then an integer interval to bisect."""
    bits = x.view(torch.int32).long()
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def _from_ordered(keys: torch.Tensor) -> torch.Tensor:
    return torch.where(keys < 0, -keys - 2**31, keys).int().view(torch.float32)


@functools.cache
def _qmap(signed: bool, device: torch.device) -> torch.Tensor:
    """torchao's map (every OptimState8bit holds a copy of it)."""
    return torch.tensor(get_qmap_signed() if signed else get_qmap_unsigned(), dtype=torch.float32, device=device)


@functools.cache
def rounding_thresholds(signed: bool, device: torch.device) -> torch.Tensor:
    """Entry c: the smallest float32 that torchao's `quantize_8bit_with_qmap` sends to code c or above; -inf for
    c = 0 and inf at 256, so that code = #(entries 1..255 at or below x) for every x.

    torchao rounds between neighbours with its own float32 arithmetic, `x - q[c] >= (q[c+1] - q[c]) * 0.5`, so a
    boundary is within an ulp of the midpoint but not exactly there; bisecting over every float32 between each pair of
    neighbours, with torchao's function as the judge, finds it exactly (its codes rise monotonically with x)."""
    qmap = _qmap(signed, torch.device("cpu"))
    targets = torch.arange(1, 256)
    below, at_or_above = _ordered(qmap[:-1]), _ordered(qmap[1:])  # code(below) < target <= code(at_or_above)
    while (at_or_above - below > 1).any():
        middle = (below + at_or_above) // 2
        up = quantize_8bit_with_qmap(_from_ordered(middle), qmap) >= targets
        below, at_or_above = torch.where(up, below, middle), torch.where(up, middle, at_or_above)
    infinity = torch.tensor([torch.inf])
    return torch.cat([-infinity, _from_ordered(at_or_above), infinity]).to(device)


BUCKET_BITS = tl.constexpr(16)  # a bucket of the code table: the floats that share their top 16 bits


@functools.cache
def code_table(signed: bool, device: torch.device) -> torch.Tensor:
    """Per bucket, indexed by a float32's top 16 bits (sign, exponent, top 7 mantissa bits): torchao's lowest code in
    it, as uint8. A bucket is at most 2^-7 of its value wide, narrower than the map's spacing anywhere, so it holds at
    most two codes and one comparison with `rounding_thresholds` picks between them (checked here, at both ends of every
    bucket in [-1, 1]). Every 16-bit pattern has its entry, so the kernel reads one with a shift and nothing else: no
    absolute value, clamp or sign test. Values out of [-1, 1] (only a NaN or an infinity gets there) take the code of
    the nearer end; 64 KB a map, of which a step reads the few lines its values fall in."""
    qmap = _qmap(signed, torch.device("cpu"))
    first = torch.arange(1 << 16, dtype=torch.int64) << BUCKET_BITS.value  # each bucket's first and last bit pattern
    code_first, code_last = (quantize_8bit_with_qmap(_clamped_float(bits), qmap).int()
                             for bits in (first, first + (1 << BUCKET_BITS.value) - 1))
    if (code_last - code_first).abs().max() > 1:
        raise AssertionError("a bucket of the code table spans more than two codes")
    return torch.minimum(code_first, code_last).to(torch.uint8).to(device)


def _clamped_float(bits: torch.Tensor) -> torch.Tensor:
    """The float32 of each 32-bit pattern (int64), its magnitude clamped to 1: infinities and NaNs lie beyond."""
    magnitude = torch.clamp(bits & 0x7FFFFFFF, max=0x3F800000).int().view(torch.float32)
    return torch.where(bits >= 1 << 31, -magnitude, magnitude)


@triton.jit
def _quantize(x, table_ptr, thresholds_ptr):
    """torchao's code for x in [-1, 1], exactly: the lowest code of x's bucket (`code_table`), and one more where x
    is at or above the next code's threshold."""
    lowest = tl.load(table_ptr + (x.to(tl.uint32, bitcast=True) >> BUCKET_BITS)).to(tl.int32)
    return lowest + (x >= _lookup(thresholds_ptr + 1, lowest)).to(tl.int32)  # entry c + 1: code c + 1's threshold


@triton.jit
def _lookup(table_ptr, index):
    """table[index] for a table of 256 float32, through shared memory (`tl.gather` of the whole table): a gather
    from global memory costs a cache transaction for each distinct line a warp touches."""
    table = tl.load(table_ptr + tl.arange(0, 256))
    return tl.reshape(tl.gather(table, tl.reshape(index, (index.numel,)), 0), index.shape)


@triton.jit
def _dequantize(codes_ptr, scale_ptr, qmap_ptr, offsets, blocks, in_bounds):
    codes = tl.load(codes_ptr + offsets, mask=in_bounds[:, None], other=0).to(tl.int32)
    scale = tl.load(scale_ptr + blocks, mask=in_bounds, other=0.0)
    return _lookup(qmap_ptr, codes) * scale[:, None]


@triton.jit
def _divide(x, y, reciprocal):
    """x / y correctly rounded, as torch divides, from `reciprocal` = 1 / y correctly rounded: a multiply and two
    FMAs (Markstein's refinement: the residual x - y * q is exact, and one correction rounds the quotient right),
    where `tl.math.div_rn` spends a reciprocal, a range check and a branch on every value."""
    quotient = x * reciprocal
    return tl.fma(tl.fma(-y, quotient, x), reciprocal, quotient)


@triton.jit
def _requantize(values, codes_ptr, scale_ptr, table_ptr, thresholds_ptr, offsets, blocks, in_bounds):
    """OptimState8bit.copy_(values): each block's absmax (clipped at 1e-12) is its scale, values / scale its codes."""
    scale = tl.maximum(tl.max(tl.abs(values), axis=1), 1e-12)
    scaled = _divide(values, scale[:, None], tl.math.div_rn(1.0, scale)[:, None])  # one division a block
    codes = _quantize(scaled, table_ptr, thresholds_ptr)
    tl.store(codes_ptr + offsets, codes.to(tl.uint8), mask=in_bounds[:, None])
    tl.store(scale_ptr + blocks, scale, mask=in_bounds)


@triton.jit
def _random16(seed, offsets):
    """16 random bits a value: the top half of Wellons' lowbias32 hash of (offset xor seed). A bijection of 32 bits
    with full avalanche, a dozen instructions where Philox (`tl.randint`) takes ten rounds of multiplies: the rounding
    needs bits that are uniform and unrelated from value to value and step to step, not a cryptographic stream."""
    x = offsets.to(tl.uint32) ^ seed.to(tl.uint32)
    x ^= x >> 16
    x *= 0x21F0AAAD
    x ^= x >> 15
    x *= 0xD35A2D97
    x ^= x >> 15
    return (x >> 16).to(tl.int32)


@triton.jit
def _to_bf16_stochastically(x, seed, offsets):
    """torchao's `_fp32_to_bf16_sr`: truncate toward zero; step away from zero with probability (low 16 bits) / 2^16."""
    bits = x.to(tl.int32, bitcast=True)
    truncated = bits & -65536  # 0xFFFF0000
    bits = tl.where(_random16(seed, offsets) < (bits & 0xFFFF), truncated + 0x10000, truncated)
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _pointer(address_ptr, dtype: tl.constexpr, ALIGNED: tl.constexpr):
    """The pointer stored at `address_ptr`. Triton cannot know the alignment of an address it reads from memory, as it
    does a tensor argument's, and without it loads and stores one value an instruction: a third more instructions in
    all than the kernel that took each weight as arguments, by a static count for sm_90
    (results/benchmarks/adamw8bit_sass.json). ALIGNED says the host checked every address in the table is 16-byte
    aligned (every tensor allocation is), so a thread loads its 8 contiguous values with one instruction."""
    pointer = tl.load(address_ptr).to(tl.pointer_type(dtype))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


# The columns of a row of the weights' table (`adamw8bit_step` writes them in this order): where the weight's
# tensors are (a moment's values: its 8-bit codes or its bf16 values; its block scales, 8-bit moments only), its
# rounding seed, its number of blocks and its first program.
PARAM, GRAD, M_VALUES, M_SCALE, V_VALUES, V_SCALE, SEED, N_BLOCKS, FIRST_PROGRAM, COLUMNS = map(tl.constexpr, range(10))


@triton.jit
def _adamw8bit_kernel(table_ptr, corrections_ptr, weight_of_program_ptr, grad_scale_ptr, m_qmap_ptr, m_table_ptr,
                      m_thresholds_ptr, v_qmap_ptr, v_table_ptr, v_thresholds_ptr, lr, lr_times_weight_decay,
                      one_minus_beta1, one_minus_beta2, eps, DECAY: tl.constexpr, ALIGNED: tl.constexpr,
                      MOMENTS_8BIT: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCKS: tl.constexpr):
    """`single_param_adam` for BLOCKS blocks of one of the weights in the table, its operations in torchao's order
    (scalars arrive as float32 torch made). MOMENTS_8BIT: the moments are codes and block scales (`OptimState8bit`),
    else bf16 tensors; a block is then only the program's unit of work."""
    program = tl.program_id(0)
    index = tl.load(weight_of_program_ptr + program).to(tl.int64)  # the weight's row in the tables
    row = table_ptr + index * COLUMNS
    param_ptr = _pointer(row + PARAM, tl.bfloat16, ALIGNED)
    grad_ptr = _pointer(row + GRAD, tl.bfloat16, ALIGNED)
    corrections = corrections_ptr + index * 4  # the weight's step's bias corrections and their reciprocals
    bias_correction1, reciprocal_bias_correction1 = tl.load(corrections), tl.load(corrections + 1)
    sqrt_bias_correction2, reciprocal_sqrt_bias_correction2 = tl.load(corrections + 2), tl.load(corrections + 3)

    blocks = (program - tl.load(row + FIRST_PROGRAM)) * BLOCKS + tl.arange(0, BLOCKS)
    offsets = blocks[:, None] * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]
    in_bounds = blocks < tl.load(row + N_BLOCKS)  # per block; [:, None] broadcasts it along the block's values
    weight = tl.load(param_ptr + offsets, mask=in_bounds[:, None], other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=in_bounds[:, None], other=0.0).to(tl.float32)
    grad_scale = tl.load(grad_scale_ptr).to(tl.float32)
    if grad_scale != 1.0:  # clipping scaled the step (a scale of 1 would leave every gradient as it is)
        grad = (grad * grad_scale).to(tl.bfloat16).to(tl.float32)  # as mul_ rounds
    if MOMENTS_8BIT:
        m_codes_ptr = _pointer(row + M_VALUES, tl.uint8, ALIGNED)
        m_scale_ptr = _pointer(row + M_SCALE, tl.float32, False)  # read one value a block: no vector to gain
        v_codes_ptr = _pointer(row + V_VALUES, tl.uint8, ALIGNED)
        v_scale_ptr = _pointer(row + V_SCALE, tl.float32, False)
        exp_avg = _dequantize(m_codes_ptr, m_scale_ptr, m_qmap_ptr, offsets, blocks, in_bounds)
        exp_avg_sq = _dequantize(v_codes_ptr, v_scale_ptr, v_qmap_ptr, offsets, blocks, in_bounds)
    else:
        m_ptr = _pointer(row + M_VALUES, tl.bfloat16, ALIGNED)
        v_ptr = _pointer(row + V_VALUES, tl.bfloat16, ALIGNED)
        exp_avg = tl.load(m_ptr + offsets, mask=in_bounds[:, None], other=0.0).to(tl.float32)
        exp_avg_sq = tl.load(v_ptr + offsets, mask=in_bounds[:, None], other=0.0).to(tl.float32)

    if DECAY:  # no weight decay (the recipe's) leaves the weight exactly as it is
        weight = weight - lr_times_weight_decay * weight
    # torch.lerp with a weight under 0.5 is start + weight * (end - start), rounded once (an FMA) on CPU and GPU
    exp_avg = tl.fma(one_minus_beta1, grad - exp_avg, exp_avg)
    exp_avg_sq = tl.fma(one_minus_beta2, grad * grad - exp_avg_sq, exp_avg_sq)
    if MOMENTS_8BIT:
        _requantize(exp_avg, m_codes_ptr, m_scale_ptr, m_table_ptr, m_thresholds_ptr, offsets, blocks, in_bounds)
        _requantize(exp_avg_sq, v_codes_ptr, v_scale_ptr, v_table_ptr, v_thresholds_ptr, offsets, blocks, in_bounds)
    else:  # `exp_avg.copy_(exp_avg_f32)`: rounded to nearest, as the conversion rounds
        tl.store(m_ptr + offsets, exp_avg.to(tl.bfloat16), mask=in_bounds[:, None])
        tl.store(v_ptr + offsets, exp_avg_sq.to(tl.bfloat16), mask=in_bounds[:, None])

    # division and square root rounded as torch rounds them (Triton's `/` and tl.sqrt are approximations on GPUs)
    denom = _divide(tl.math.sqrt_rn(exp_avg_sq), sqrt_bias_correction2, reciprocal_sqrt_bias_correction2) + eps
    step = lr * _divide(exp_avg, bias_correction1, reciprocal_bias_correction1)
    weight = _to_bf16_stochastically(weight - tl.math.div_rn(step, denom), tl.load(row + SEED), offsets)
    tl.store(param_ptr + offsets, weight, mask=in_bounds[:, None])


@functools.cache
def _ones(device: torch.device) -> torch.Tensor:
    return torch.ones((), dtype=torch.bfloat16, device=device)


@functools.lru_cache(maxsize=64)
def _bias_corrections(beta1: float, beta2: float, step: float) -> tuple[float, ...]:
    """The bias corrections as `single_param_adam` computes them (in float32 torch), each with its reciprocal (for
    `_divide`)."""
    step_ = torch.tensor(step)
    bias_correction1, sqrt_bias_correction2 = 1 - beta1**step_, (1 - beta2**step_).sqrt()
    return (bias_correction1.item(), (1 / bias_correction1).item(), sqrt_bias_correction2.item(),
            (1 / sqrt_bias_correction2).item())


@functools.lru_cache(maxsize=8)
def _programs(n_blocks: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """For one launch over weights of `n_blocks` blocks each: every program's weight, and each weight's first program
    (a program takes BLOCKS_PER_PROGRAM blocks of one weight)."""
    programs = torch.tensor([triton.cdiv(n, BLOCKS_PER_PROGRAM) for n in n_blocks])
    first_program = (torch.cumsum(programs, 0) - programs).tolist()
    return torch.repeat_interleave(torch.arange(len(n_blocks), dtype=torch.int32), programs).to(device), first_program


def adamw8bit_step(params: list[torch.Tensor], grads: list[torch.Tensor],
                   exp_avgs: list[OptimState8bit] | list[torch.Tensor],
                   exp_avg_sqs: list[OptimState8bit] | list[torch.Tensor], *, steps: list[float], seeds: list[int],
                   lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
                   grad_scale: torch.Tensor | None = None) -> None:
    """`single_param_adam(param, grad, step, exp_avg, exp_avg_sq, None, lr, beta1, beta2, weight_decay, eps,
    IS_ADAMW=True, BF16_STOCHASTIC_ROUND=True)` in place for each contiguous bf16 weight of `params`, all in one
    kernel launch: a table on the device says where each weight's tensors are. One launch a weight cost LoRA's 392
    adapter weights more host time than their GPU work (results/benchmarks/h200_7b_train_recipe_kernel.json).
    The moments are all 8-bit states, or all bf16 tensors of a multiple of BF16_BLOCK values.

    steps and lr are host numbers (torchao keeps both as CPU tensors), so nothing waits on the GPU; each weight's
    rounding draws its random bits from its seed (31 bits; finetune.optim.rounding_seed), not from torch's generator.
    `grad_scale` (a one-value device tensor, gradient clipping's coefficient) multiplies the gradients as they are
    read, rounded to bf16 as `grad.mul_` would round them."""
    device = params[0].device
    if any(p.device != device for p in params):
        raise ValueError("adamw8bit_step updates the weights of one device in a launch: call it once per device")
    eight_bit = isinstance(exp_avgs[0], OptimState8bit)
    block_size = exp_avgs[0].block_size if eight_bit else BF16_BLOCK
    if not eight_bit and any(p.numel() % BF16_BLOCK for p in params):
        raise ValueError(f"bf16 moments take the fused update in blocks of {BF16_BLOCK} values: a weight is not one")
    grads = [g.contiguous() for g in grads]  # held until the launch is queued; the allocator orders any reuse after it
    weight_of_program, first_program = _programs(tuple(p.numel() // block_size for p in params), device)
    table = [[p.data_ptr(), g.data_ptr(), *_where(m), *_where(v), seed, p.numel() // block_size, first]
             for p, g, m, v, seed, first in zip(params, grads, exp_avgs, exp_avg_sqs, seeds, first_program)]
    corrections = [_bias_corrections(beta1, beta2, step) for step in steps]
    aligned = all(row[column.value] % 16 == 0 for row in table for column in (PARAM, GRAD, M_VALUES, V_VALUES))
    lr_times_weight_decay = (torch.tensor(lr) * weight_decay).item()  # in float32, as torchao computes it
    _adamw8bit_kernel[(weight_of_program.numel(),)](
        queued_copy(torch.tensor(table, dtype=torch.int64), device),
        queued_copy(torch.tensor(corrections, dtype=torch.float32), device), weight_of_program,
        _ones(device) if grad_scale is None else grad_scale, _qmap(True, device), code_table(True, device),
        rounding_thresholds(True, device), _qmap(False, device), code_table(False, device),
        rounding_thresholds(False, device), lr, lr_times_weight_decay, 1 - beta1, 1 - beta2, eps,
        DECAY=weight_decay != 0, ALIGNED=aligned, MOMENTS_8BIT=eight_bit, BLOCK_SIZE=block_size,
        BLOCKS=BLOCKS_PER_PROGRAM, num_warps=NUM_WARPS)


def _where(moment: OptimState8bit | torch.Tensor) -> tuple[int, int]:
    """The addresses of a moment's values and of its block scales (none for bf16 moments)."""
    if isinstance(moment, OptimState8bit):
        return moment.codes.data_ptr(), moment.scale.data_ptr()
    return moment.data_ptr(), 0


@triton.jit
def _quantize_kernel(x_ptr, codes_ptr, table_ptr, thresholds_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n)
    tl.store(codes_ptr + offsets, _quantize(x, table_ptr, thresholds_ptr).to(tl.uint8), mask=offsets < n)


def quantize(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """`quantize_8bit_with_qmap(x, map)` for torchao's signed or unsigned map, by the kernel's quantizer (for tests)."""
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    block = 8192
    _quantize_kernel[(triton.cdiv(x.numel(), block),)](x.contiguous(), codes, code_table(signed, x.device),
                                                        rounding_thresholds(signed, x.device), x.numel(),
                                                        BLOCK=block)
    return codes
