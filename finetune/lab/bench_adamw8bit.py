"""How long the AdamW step takes over every weight of a model shape, on one GPU: the fused kernel
(finetune/adamw8bit_kernel.py) with 8-bit and with bf16 moments, any earlier version of it given as a file, and
torchao's compiled update of either (AdamWBf16SR with the kernel turned off), each timed in the same process on the
same weights and gradients.

    python -m finetune.lab.bench_adamw8bit --shape 7b
    git show 6005047:finetune/adamw8bit_kernel.py > /tmp/kernel_6005047.py
    python -m finetune.lab.bench_adamw8bit --shape 7b --compare /tmp/kernel_6005047.py   # beside an older kernel
    python -m finetune.lab.bench_adamw8bit --shape 7b --lora_rank 16 --compare /tmp/kernel_ad67def.py
    python -m finetune.lab.bench_adamw8bit --shape 7b --programs 8x2 4x4   # blocks x warps a program, beside 4 x 2

The LoRA shape (392 small adapter weights) times the host's share: kernels up to ad67def took one launch a weight,
the current one launches once for all. CUDA events time the GPU's timeline, so a GPU waiting on launches counts.

The 8-bit step reads a bf16 weight, its bf16 gradient and two 8-bit codes, and writes weight and codes back: 10 bytes
a value (the blocks' scales add 1/32 of that); with bf16 moments, 14. Bytes / time says how close each row comes to
the memory's bandwidth.
"""

import argparse
import importlib.util
import inspect
import json
import statistics
from pathlib import Path

import torch

from finetune.lab.spark import QWEN_7B
from finetune.results import environment

# weight read and written, gradient read, both moments read and written, by the bits of a moment
BYTES_PER_VALUE = {8: 2 + 2 + 2 + 2 * (1 + 1), 16: 2 + 2 + 2 + 2 * (2 + 2)}
SHAPES = {"7b": QWEN_7B}


def weight_shapes(shape, lora_rank: int | None = None) -> list[tuple[int, int]]:
    """The 2-D weights of a Qwen2-shape decoder: embedding, LM head (unless tied), and per layer q, k, v, o, gate,
    up, down (the 1-D biases and norms are a rounding error of the bytes). With `lora_rank`: the LoRA adapters of
    every linear projection instead, A (rank x in) and B (out x rank) of each."""
    hidden, intermediate, kv = shape.hidden, shape.intermediate, shape.kv_width
    layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (intermediate, hidden),
             (intermediate, hidden), (hidden, intermediate)]
    if lora_rank:
        return [adapter for out, in_ in layer for adapter in [(lora_rank, in_), (out, lora_rank)]] * shape.layers
    return [(shape.vocab, hidden)] * (1 if shape.tied else 2) + layer * shape.layers


def time_steps(step, warmup: int, measured: int) -> list[float]:
    """Milliseconds of each measured call of `step(t)`, by CUDA events, after `warmup` calls."""
    for t in range(1, warmup + 1):
        step(t)
    times = []
    for t in range(warmup + 1, warmup + measured + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(t)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def load_kernel_module(path: str):
    """A version of adamw8bit_kernel.py from a file (e.g. `git show REV:finetune/adamw8bit_kernel.py`)."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def zero_states(params: list[torch.Tensor], state_bits: int = 8) -> list[tuple]:
    """Fresh first and second moments for each weight, on its device: torchao's signed and unsigned 8-bit states, or
    bf16 tensors."""
    from torchao.optim.subclass_8bit import OptimState8bit

    if state_bits == 16:
        return [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    return [tuple(OptimState8bit.zeros(p.shape, signed, device=p.device) for signed in (True, False)) for p in params]


def kernel_step(module, params, grads, states, t: int) -> None:
    """Step `t` of `module.adamw8bit_step` over every weight: kernels up to ad67def take one weight a call."""
    options = dict(lr=1e-5, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8)
    if "param" in inspect.signature(module.adamw8bit_step).parameters:
        for i, (p, g, (m, v)) in enumerate(zip(params, grads, states)):
            module.adamw8bit_step(p, g, m, v, step=float(t), seed=1000 * t + i, **options)
    else:
        module.adamw8bit_step(params, grads, [m for m, _ in states], [v for _, v in states],
                              steps=[float(t)] * len(params), seeds=[1000 * t + i for i in range(len(params))],
                              **options)


def kernel_row(module, params, grads, warmup: int, measured: int, state_bits: int = 8) -> list[float]:
    states = zero_states(params, state_bits)
    return time_steps(lambda t: kernel_step(module, params, grads, states, t), warmup, measured)


def compiled_row(params, grads, warmup: int, measured: int, state_bits: int) -> list[float]:
    from finetune.optim import AdamWBf16SR

    weights = [torch.nn.Parameter(p) for p in params]
    for w, g in zip(weights, grads):
        w.grad = g
    optimizer = AdamWBf16SR(weights, lr=1e-5, weight_decay=0.0, state_bits=state_bits, fused=False)
    return time_steps(lambda t: optimizer.step(), warmup, measured)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="7b", help="the model shape whose weights are updated")
    parser.add_argument("--lora_rank", type=int, default=None, help="update LoRA adapters of this rank instead")
    parser.add_argument("--compare", nargs="*", default=[], help="files of other versions of adamw8bit_kernel.py")
    parser.add_argument("--programs", nargs="*", default=[], metavar="BLOCKSxWARPS",
                        help="also the kernel with programs of this many blocks of 256 and warps (it has "
                             "BLOCKS_PER_PROGRAM x NUM_WARPS): more values a thread, fewer instructions a value, more "
                             "registers, fewer programs an SM")
    parser.add_argument("--moments", nargs="*", type=int, choices=(8, 16), default=[8, 16],
                        help="the moments' bits: the fused kernel and the compiled update with each (--programs "
                             "and --compare rows are 8-bit)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the clock (compilation, first touch)")
    parser.add_argument("--measured", type=int, default=6, help="timed steps; the median is reported")
    parser.add_argument("--name", default="h200_adamw8bit_kernel", help="results/benchmarks/<name>.json")
    parser.add_argument("--results_dir", default="results/benchmarks")
    args = parser.parse_args(argv)

    shapes = weight_shapes(SHAPES[args.shape], args.lora_rank)
    values = sum(a * b for a, b in shapes)
    generator = torch.Generator("cuda").manual_seed(0)
    params = [(torch.randn(s, device="cuda", generator=generator) * 0.02).to(torch.bfloat16) for s in shapes]
    grads = [(torch.randn(s, device="cuda", generator=generator) * 1e-3).to(torch.bfloat16) for s in shapes]

    from finetune import adamw8bit_kernel
    rows = {}
    for bits in args.moments:
        name = "fused kernel (finetune/adamw8bit_kernel.py)" if bits == 8 else "fused kernel, bf16 moments"
        rows[name] = (bits, lambda bits=bits: kernel_row(adamw8bit_kernel, params, grads, args.warmup, args.measured,
                                                         state_bits=bits))
    for program in args.programs:  # a fresh copy of the module: its launch tables are cached per copy
        module = load_kernel_module(adamw8bit_kernel.__file__)
        module.BLOCKS_PER_PROGRAM, module.NUM_WARPS = map(int, program.split("x"))
        rows[f"fused kernel, {module.BLOCKS_PER_PROGRAM} blocks and {module.NUM_WARPS} warps a program"] = \
            (8, lambda module=module: kernel_row(module, params, grads, args.warmup, args.measured))
    for path in args.compare:
        module = load_kernel_module(path)
        rows[f"fused kernel ({Path(path).name})"] = (8, lambda module=module: kernel_row(module, params, grads,
                                                                                       args.warmup, args.measured))
    for bits in args.moments:
        moments = "" if bits == 8 else ", bf16 moments (the bf16 reference's)"
        rows[f"torchao's compiled update (finetune.optim, no fused kernel){moments}"] = (
            bits, lambda bits=bits: compiled_row(params, grads, args.warmup, args.measured, bits))
    results = {}
    for name, (bits, run) in rows.items():
        times = sorted(run())
        median = statistics.median(times)
        results[name] = {"state_bits": bits, "median_ms": median, "min_ms": times[0], "max_ms": times[-1],
                         "ms": times, "gb_per_second": values * BYTES_PER_VALUE[bits] / median / 1e6}
        print(f"{name:<70} {median:8.2f} ms ({times[0]:.2f}-{times[-1]:.2f}) "
              f"{results[name]['gb_per_second']:7.0f} GB/s", flush=True)
        torch.cuda.empty_cache()
    out = Path(args.results_dir) / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "adamw8bit_step", "shape": args.shape,
                               "lora_rank": args.lora_rank, "weights": len(shapes),
                               "values": values, "bytes_per_value": BYTES_PER_VALUE, "rows": results,
                               "environment": environment()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
