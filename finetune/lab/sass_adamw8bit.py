"""How many machine instructions the fused 8-bit AdamW kernel issues a value, counted without a GPU: each version of
finetune/adamw8bit_kernel.py is compiled offline for a GPU architecture with the arguments its own `adamw8bit_step`
passes (captured from a call on CPU tensors, so Triton specializes it as a real launch would), and its SASS, from the
`cuobjdump` that Triton ships, is counted along the main path.

    python -m finetune.lab.sass_adamw8bit                          # the working tree's kernel, 8-bit and bf16 moments
    python -m finetune.lab.sass_adamw8bit --compare ad67def 66a08cf  # beside the kernel at other commits

The kernel is bound by issuing instructions, not by memory (results/benchmarks/h200_adamw8bit_kernel.json: ~1,740 GB/s
of the H200's 4,800), so fewer instructions a value is a faster step, though not in proportion: this is a static count
to compare versions by, not a timing. The main path is every instruction up to the last EXIT less the slow paths of
division and square root (the stubs a forward branch skips to call them); a thread's count is divided by the values it
updates.
"""

import argparse
import collections
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
import triton

from finetune.lab.bench_adamw8bit import kernel_step, load_kernel_module, zero_states
from finetune.results import environment

ARCHITECTURES = {"sm_90": 90, "sm_121": 121}  # H100/H200, and GB10 (DGX Spark)


def first_launch(module, kernel_name: str, call) -> tuple[tuple, dict]:
    """The arguments of the first `kernel_name[grid](...)` launch that `call()` makes, the kernel replaced in `module`
    for the duration by a stand-in that records them: on CPU tensors, nothing runs."""
    launches = []

    class Capture:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((args, kwargs))

    real = getattr(module, kernel_name)
    setattr(module, kernel_name, Capture())
    try:
        call()
    finally:
        setattr(module, kernel_name, real)
    return launches[0]


def captured_launch(module, state_bits: int = 8) -> tuple[int, tuple, dict]:
    """The values a program updates and the arguments of the first `_adamw8bit_kernel[grid](...)` call of a step over
    two weights of 8 blocks, with moments of `state_bits`."""
    params = [torch.zeros(8, 256, dtype=torch.bfloat16) for _ in range(2)]
    args, kwargs = first_launch(module, "_adamw8bit_kernel",
                                lambda: kernel_step(module, params, params, zero_states(params, state_bits), 1))
    return kwargs["BLOCK_SIZE"] * kwargs["BLOCKS"], args, kwargs


def compile_offline(kernel, args: tuple, kwargs: dict, arch: int):
    """`kernel[grid](*args, **kwargs)` compiled as Triton would compile it for a GPU of compute capability `arch`."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    bound, specialization, options = create_function_from_signature(kernel.signature, kernel.params,
                                                                    backend)(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def disassembly(cubin: bytes) -> str:
    """A cubin's SASS and register count, from the `cuobjdump` Triton ships (Triton 3.6's reads sm_90 but not
    sm_121)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([str(tool), "-sass", "-res-usage", file.name], capture_output=True, text=True,
                              check=True).stdout


def sass_lines(disassembled: str) -> list[str]:
    """The instructions of a disassembly, one string each ("@!P4 BRA 0x1d30"), in address order."""
    lines = [line.split("*/", 1)[1].split(";")[0].strip() for line in disassembled.splitlines()
             if line.strip().startswith("/*") and "*/" in line]
    return [line for line in lines if line]


def main_path(instructions: list[str]) -> list[str]:
    """Everything up to the last EXIT, less each region a predicated forward branch jumps over to reach a CALL (the
    slow paths of IEEE division and square root, taken only for denormals, infinities and the like)."""
    addresses = [16 * i for i in range(len(instructions))]  # SASS for sm_90 and later: 16 bytes an instruction
    end = max(i for i, op in enumerate(instructions) if op.split()[-1] == "EXIT")
    skipped = set()
    for i, op in enumerate(instructions[:end]):
        if op.startswith("@") and " BRA " in f" {op} ":
            target = int(op.split()[-1], 16)
            region = [j for j in range(i + 1, end) if addresses[j] < target]
            if any("CALL" in instructions[j] for j in region):
                skipped.update(region)
    return [op for i, op in enumerate(instructions[:end + 1]) if i not in skipped]


def opcode(instruction: str) -> str:
    words = instruction.split()
    return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]


def count(module, arch: int, state_bits: int = 8) -> dict:
    values_per_program, args, kwargs = captured_launch(module, state_bits)
    compiled = compile_offline(module._adamw8bit_kernel, args, kwargs, arch)
    disassembled = disassembly(compiled.asm["cubin"])
    path = main_path(sass_lines(disassembled))
    per_thread = values_per_program / (32 * compiled.metadata.num_warps)
    opcodes = collections.Counter(map(opcode, path))
    return {"instructions_per_value": len(path) / per_thread, "values_per_thread": per_thread,
            "registers": int(disassembled.split("REG:")[1].split()[0]),
            "by_opcode_per_value": {op: n / per_thread for op, n in opcodes.most_common()}}


def _counts(path, architectures: list[str], state_bits: int = 8) -> dict:
    module = load_kernel_module(str(path))
    return {arch: count(module, ARCHITECTURES[arch], state_bits) for arch in architectures}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", nargs="*", default=[], help="git revisions whose kernel to count beside it")
    parser.add_argument("--arch", nargs="*", choices=ARCHITECTURES, default=list(ARCHITECTURES))
    parser.add_argument("--name", default="adamw8bit_sass", help="results/benchmarks/<name>.json")
    parser.add_argument("--results_dir", default="results/benchmarks")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("TRITON_INTERPRET=1 runs kernels on the CPU instead of compiling them: unset it")

    kernel = Path(__file__).parents[1] / "adamw8bit_kernel.py"
    rows = {"working tree": _counts(kernel, args.arch), "working tree, bf16 moments": _counts(kernel, args.arch, 16)}
    for revision in args.compare:
        source = subprocess.run(["git", "show", f"{revision}:finetune/adamw8bit_kernel.py"], capture_output=True,
                                text=True, check=True).stdout
        with tempfile.NamedTemporaryFile("w", suffix=".py") as file:
            file.write(source)
            file.flush()
            rows[revision] = _counts(file.name, args.arch)
    for name, by_arch in rows.items():
        for arch, row in by_arch.items():
            print(f"{name:<27} {arch:<7} {row['instructions_per_value']:6.1f} instructions a value, "
                  f"{row['registers']} registers", flush=True)
    out = Path(args.results_dir) / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "adamw8bit_sass", "count": "static, main path",
                               "triton": triton.__version__, "rows": rows, "environment": environment()},
                              indent=2) + "\n")


if __name__ == "__main__":
    main()
