"""Each linear projection's matmuls at a model shape, timed alone on one GPU under each of torch's cuBLAS paths.

Profiles of label scoring on the 7B shape showed one projection's GEMM at about a third of the MLP's rate
(`matmul_rates` in the eval benchmark files): the attention output projection, no bias, the same shape as the query
projection, which has a bias and ran at the MLP's rate. torch sends a matmul without bias to cuBLAS (`cublas`) and one
with a bias to cuBLASLt; `torch.backends.cuda.preferred_blas_library("cublaslt")` sends both to cuBLASLt. This times
every projection's forward (as `F.linear` calls it), input gradient and weight gradient (as autograd calls them) under
both, at the token counts of a training step and of an evaluation batch, so a slow kernel choice shows as one row.

    python -m finetune.lab.bench_gemm --shape 7b --tokens 16384 36864
"""

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from finetune.lab.bench_adamw8bit import SHAPES, time_steps
from finetune.results import environment

BACKENDS = ("cublas", "cublaslt")


def projections(shape) -> dict[str, tuple[int, int, bool]]:
    """Qwen2's linear projections in a decoder layer: (in features, out features, has a bias)."""
    hidden, intermediate, kv = shape.hidden, shape.intermediate, shape.kv_width
    return {"q_proj": (hidden, hidden, True), "k_proj": (hidden, kv, True), "v_proj": (hidden, kv, True),
            "o_proj": (hidden, hidden, False), "gate_proj": (hidden, intermediate, False),
            "up_proj": (hidden, intermediate, False), "down_proj": (intermediate, hidden, False)}


def matmuls(tokens: int, in_features: int, out_features: int, bias: bool, device) -> dict:
    """The three matmuls of one projection over `tokens` rows, each a thunk: the forward as the model calls it (a
    (1, tokens, in) input, as decoder layers pass), the input gradient dY W and the weight gradient dY^T x."""
    generator = torch.Generator(device).manual_seed(0)
    randn = lambda *size: torch.randn(*size, device=device, generator=generator, dtype=torch.bfloat16)
    x, weight, grad_out = randn(1, tokens, in_features), randn(out_features, in_features), randn(tokens, out_features)
    b = randn(out_features) if bias else None
    return {"forward": lambda: F.linear(x, weight, b), "input gradient": lambda: grad_out @ weight,
            "weight gradient": lambda: grad_out.t() @ x[0]}


def bench_gemm(shape, tokens: list[int], warmup: int, measured: int) -> list[dict]:
    rows = []
    default = torch.backends.cuda.preferred_blas_library()
    try:
        for n in tokens:
            for name, (in_features, out_features, bias) in projections(shape).items():
                for pass_name, run in matmuls(n, in_features, out_features, bias, "cuda").items():
                    flops = 2 * n * in_features * out_features
                    for backend in BACKENDS:
                        torch.backends.cuda.preferred_blas_library(backend)
                        ms = statistics.median(time_steps(lambda t: run(), warmup, measured))  # CUDA events
                        rows.append({"tokens": n, "projection": name, "pass": pass_name, "bias": bias and
                                     pass_name == "forward", "backend": backend, "ms": ms,
                                     "tflops": flops / ms / 1e9})
                        print(json.dumps(rows[-1]), flush=True)
    finally:
        torch.backends.cuda.preferred_blas_library(default)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="7b")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 36864],
                        help="rows of each matmul: a training step's tokens, an evaluation batch's")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--measured", type=int, default=20)
    parser.add_argument("--name", default="h200_gemm_shapes", help="results/benchmarks/<name>.json")
    parser.add_argument("--results_dir", default="results/benchmarks")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_gemm times cuBLAS: it needs a CUDA GPU")
    rows = bench_gemm(SHAPES[args.shape], args.tokens, args.warmup, args.measured)
    path = Path(args.results_dir) / f"{args.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "gemm_shapes", "shape": args.shape, "rows": rows,
                                "environment": environment()}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
