"""The packed sequences' attention of one evaluation batch at the 7B's heads, timed alone on one GPU: the grouped
varlen kernel (`finetune.grouped_varlen_kernel`) at each setting of keys a step, warps and pipeline stages, beside
FlashAttention-2's varlen kernel (`finetune.attention._cuda_varlen_attention`), over the same sequences.

Two shapes of a batch of `--articles`: the trunks (each article's tokens after the opening, drawn uniformly from
`--tokens`, the answers' stem after them, attending to the opening of `--opening` tokens and to themselves), and
the taken branches of generation's check (two or four queries each, after such a trunk). Each row also says how far
its output lies from FlashAttention's.

    python -m finetune.lab.bench_grouped_varlen --name h100_grouped_varlen
"""

import itertools
import json
import statistics

import torch

from finetune.attention import _cuda_varlen_attention
from finetune.lab.bench_adamw8bit import time_steps
from finetune.lab.bench_branch_kernel import batch_arguments, write_rows
from finetune.lab.spark import QWEN_7B

KEYS_A_STEP = (32, 64, 128)
WARPS = (4, 8)
STAGES = (1, 2, 3)
STEM = 3  # `{"category":"` in Qwen2.5's tokens
BRANCHES = (2, 2, 2, 4)  # the tokens each of its four answers' branches runs after the stem


def bench_grouped_varlen(articles: int, tokens: tuple[int, int], opening: int, warmup: int,
                         measured: int) -> list[dict]:
    from finetune.grouped_varlen_kernel import grouped_varlen_attention  # triton: imported where it runs

    generator = torch.Generator().manual_seed(0)
    trunks = torch.randint(tokens[0], tokens[1] + 1, (articles,), generator=generator) + STEM
    branches = torch.tensor(BRANCHES)[torch.randint(0, len(BRANCHES), (articles,), generator=generator)]
    dim, heads, kv_heads = QWEN_7B.hidden // QWEN_7B.heads, QWEN_7B.heads, QWEN_7B.kv_heads
    results = []
    for shape, queries, keys in (("trunks", trunks, opening + trunks), ("taken branches", branches,
                                                                        opening + trunks + branches)):
        cu_q, cu_k = (torch.cat([n.new_zeros(1), n.cumsum(0)]).int().cuda() for n in (queries, keys))
        q, k, v = (torch.randn(int(n.sum()), h, dim, generator=generator).bfloat16().cuda()
                   for n, h in ((queries, heads), (keys, kv_heads), (keys, kv_heads)))
        max_q, max_k, scale = int(queries.max()), int(keys.max()), dim ** -0.5
        runs = {"FlashAttention-2 varlen": lambda: _cuda_varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale)}
        for n, w, s in itertools.product(KEYS_A_STEP, WARPS, STAGES):
            runs[f"grouped kernel, {n} keys a step, {w} warps, {s} stages"] = (
                lambda n=n, w=w, s=s: grouped_varlen_attention(q, k, v, cu_q, cu_k, max_q, scale, keys_a_step=n,
                                                               warps=w, stages=s))
        reference = runs["FlashAttention-2 varlen"]().float()
        for name, run in runs.items():
            ms = statistics.median(time_steps(lambda t: run(), warmup, measured))
            results.append({"shape": shape, "run": name, "ms": ms,
                            "max_abs_diff_vs_flash": (run().float() - reference).abs().max().item(),
                            "queries": int(queries.sum()), "keys": int(keys.sum())})
            print(json.dumps(results[-1]), flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    args = batch_arguments(__doc__, "grouped_varlen", opening=41).parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_grouped_varlen times a Triton kernel and FlashAttention's: it needs a CUDA GPU")
    write_rows(args, "grouped_varlen", bench_grouped_varlen(args.articles, tuple(args.tokens), args.opening,
                                                            args.warmup, args.measured))


if __name__ == "__main__":
    main()
