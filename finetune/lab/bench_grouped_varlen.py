"""The packed sequences' attention of one evaluation batch at the 7B's heads, timed alone on one GPU: the grouped
varlen kernel (`finetune.grouped_varlen_kernel`) at each setting of keys a step, warps and pipeline stages, reading
each sequence's keys where they lie as the packed passes call it, beside FlashAttention-2's varlen kernel
(`finetune.attention._cuda_varlen_attention`) and the grouped kernel at its defaults over the same keys gathered into
one tensor first, the concatenation and the gather timed with them (how the passes ran until the kernel read the keys
in place, and how they still run FlashAttention's).

Two shapes of a batch of `--articles`, laid out as the passes lay them out (`pack_batch`, `pack_taken`): the trunks
(each article's tokens after the opening, drawn uniformly from `--tokens`, the answers' stem after them, attending to
the opening of `--opening` tokens and to themselves), and the taken branches of generation's check (two or four
queries each, over the opening, their trunk's keys of that forward and their own). Each row also says how far its
output lies from FlashAttention's.

    python -m finetune.lab.bench_grouped_varlen --name h100_grouped_varlen
"""

import itertools
import json
import statistics

import numpy as np
import torch

from finetune.attention import _cuda_varlen_attention
from finetune.lab.bench_adamw8bit import time_steps
from finetune.lab.bench_branch_kernel import batch_arguments, write_rows
from finetune.lab.spark import QWEN_7B
from finetune.packed import _gathered, pack_batch, pack_taken
from finetune.predict import AnswerTree

KEYS_A_STEP = (32, 64, 128)
WARPS = (4, 8)
STAGES = (1, 2, 3)
STEM = 3  # `{"category":"` in Qwen2.5's tokens
BRANCHES = (2, 2, 2, 4)  # the tokens each of its four answers' branches runs after the stem
GATHERED = "keys gathered first"


def bench_grouped_varlen(articles: int, tokens: tuple[int, int], opening: int, warmup: int,
                         measured: int) -> list[dict]:
    from finetune.grouped_varlen_kernel import grouped_varlen_attention  # triton: imported where it runs

    generator = torch.Generator().manual_seed(0)
    # answers of Qwen2.5's shape: a shared stem, then a branch of BRANCHES[label] tokens, then the end of the turn
    answers = [[1] * STEM + [10 + label] + [20] * (n - 1) + [99] for label, n in enumerate(BRANCHES)]
    lengths = torch.randint(tokens[0], tokens[1] + 1, (articles,), generator=generator).tolist()
    trunks = pack_batch([[0] * n for n in lengths], AnswerTree.from_answers(answers), opening, "cuda",
                        with_branches=False)
    labels = torch.randint(0, len(answers), (articles,), generator=generator).tolist()
    taken = pack_taken(trunks, np.arange(articles), [answers[label][STEM:-1] for label in labels], "cuda")
    dim, heads, kv_heads = QWEN_7B.hidden // QWEN_7B.heads, QWEN_7B.heads, QWEN_7B.kv_heads
    randn = lambda n, h: torch.randn(n, h, dim, generator=generator).bfloat16().cuda()  # as Liger's rotary leaves them
    opening_kv = randn(opening, kv_heads), randn(opening, kv_heads)
    trunk_kv = randn(trunks.ids.shape[1], kv_heads), randn(trunks.ids.shape[1], kv_heads)
    taken_kv = randn(taken.ids.shape[1], kv_heads), randn(taken.ids.shape[1], kv_heads)
    shapes = {"trunks": (trunks, trunk_kv, None), "taken branches": (taken, taken_kv,
                                                                       (*trunk_kv, taken.kept_starts,
                                                                        taken.kept_lengths))}
    scale, results = dim ** -0.5, []
    for shape, (layout, (k, v), kept) in shapes.items():
        q = randn(len(layout.ids[0]), heads)
        sources = [opening_kv, *([kept[:2]] if kept else []), (k, v)]
        gathered = lambda: [_gathered(sources, i, layout.key_index) for i in (0, 1)]  # as the packed passes gather

        runs = {f"FlashAttention-2 varlen, {GATHERED}": lambda: _cuda_varlen_attention(
                    q, *gathered(), layout.cu_q, layout.cu_k, layout.max_q, layout.max_k, scale),
                f"grouped kernel, {GATHERED}": lambda: grouped_varlen_attention(
                    q, *gathered(), layout.cu_q, layout.cu_k, layout.max_q, scale)}
        for n, w, s in itertools.product(KEYS_A_STEP, WARPS, STAGES):
            runs[f"grouped kernel, {n} keys a step, {w} warps, {s} stages"] = (
                lambda n=n, w=w, s=s: grouped_varlen_attention(q, k, v, layout.cu_q, layout.cu_q, layout.max_q, scale,
                                                               opening_kv, kept, keys_a_step=n, warps=w, stages=s))
        reference = runs[f"FlashAttention-2 varlen, {GATHERED}"]().float()
        for name, run in runs.items():
            ms = statistics.median(time_steps(lambda t: run(), warmup, measured))
            results.append({"shape": shape, "run": name, "ms": ms,
                            "max_abs_diff_vs_flash": (run().float() - reference).abs().max().item(),
                            "queries": len(q), "keys": int(layout.cu_k[-1])})
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
