"""The answer branches' attention of one label-scoring batch at the 7B's heads, timed alone on one GPU: the Triton
kernel (`finetune.branch_attention_kernel`) at each setting of keys a step and warps, reading the keys where they lie
as label scoring calls it, beside the dense masked call it replaced on CUDA (`finetune.packed._branch_attention`, its
key gather included), over the same packed batch.

A batch is `--articles` articles whose tokens after the opening are drawn uniformly from `--tokens` (the 7B shape's
evaluation batches averaged about 58 before the answers' stem), followed by Qwen2.5's answer tree, after an opening
of `--opening` tokens. Each row also says how far its output lies from the dense call's.

    python -m finetune.lab.bench_branch_kernel --name h100_branch_kernel
"""

import argparse
import json
import statistics
from pathlib import Path

import torch

from finetune.lab.bench_adamw8bit import time_steps
from finetune.lab.spark import QWEN_7B
from finetune.packed import _branch_attention, pack_batch
from finetune.predict import AnswerTree
from finetune.prompts import answer_token_ids
from finetune.qwen_tokenizer import build_qwen25_tokenizer
from finetune.results import environment

KEYS_A_STEP = (32, 64, 128)
WARPS = (4, 8)


def bench_branch_kernel(articles: int, tokens: tuple[int, int], opening: int, warmup: int, measured: int,
                        cache_dir: str) -> list[dict]:
    from finetune.branch_attention_kernel import branch_attention  # triton: imported where it runs

    tree = AnswerTree.from_answers(answer_token_ids(build_qwen25_tokenizer(cache_dir)))
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(tokens[0], tokens[1] + 1, (articles,), generator=generator).tolist()
    batch = pack_batch([[0] * n for n in lengths], tree, opening, "cuda")
    rows, branch_tokens = batch.ids.shape[1], articles * len(tree.branch)
    dim, heads, kv_heads = QWEN_7B.hidden // QWEN_7B.heads, QWEN_7B.heads, QWEN_7B.kv_heads
    randn = lambda n, h: torch.randn(n, h, dim, device="cuda", dtype=torch.bfloat16)
    q, k, v = randn(rows, heads), randn(opening + rows, kv_heads), randn(opening + rows, kv_heads)
    opening_kv, row_k, row_v = (k[:opening], v[:opening]), k[opening:], v[opening:]
    branch_q, scale = q[batch.trunk_tokens:], dim ** -0.5

    def dense():
        return _branch_attention(branch_q, k[batch.branch_key_index], v[batch.branch_key_index], batch.branch_mask,
                                 scale)

    runs = {"dense masked sdpa, its key gather included": dense}
    for keys_a_step in KEYS_A_STEP:
        for warps in WARPS:
            runs[f"kernel, {keys_a_step} keys a step, {warps} warps"] = (
                lambda n=keys_a_step, w=warps: branch_attention(branch_q, row_k, row_v, k[-branch_tokens:],
                                                                v[-branch_tokens:], batch.cu_q, batch.branch_sees,
                                                                scale, opening_kv, keys_a_step=n, warps=w))
    reference = dense().float()
    results = []
    for name, run in runs.items():
        ms = statistics.median(time_steps(lambda t: run(), warmup, measured))
        results.append({"run": name, "ms": ms, "max_abs_diff_vs_dense": (run().float() - reference).abs().max().item(),
                        "articles": articles, "branch_tokens": branch_tokens, "trunk_tokens": batch.trunk_tokens})
        print(json.dumps(results[-1]), flush=True)
    return results


def batch_arguments(doc: str, name: str, opening: int) -> argparse.ArgumentParser:
    """The command line of a benchmark that times evaluation's attention over one batch at the 7B's heads (this one
    and `finetune.lab.bench_grouped_varlen`)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--articles", type=int, default=512, help="the evaluation batch")
    parser.add_argument("--tokens", type=int, nargs=2, default=[40, 80], help="an article's tokens after the opening")
    parser.add_argument("--opening", type=int, default=opening, help="the prompt tokens every article shares")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--measured", type=int, default=50)
    parser.add_argument("--name", default=name, help="results/benchmarks/<name>.json")
    parser.add_argument("--results_dir", default="results/benchmarks")
    return parser


def write_rows(args: argparse.Namespace, benchmark: str, rows: list[dict]) -> None:
    path = Path(args.results_dir) / f"{args.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": benchmark, "articles": args.articles, "tokens": args.tokens,
                                "opening": args.opening, "rows": rows, "environment": environment()}, indent=2) + "\n")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = batch_arguments(__doc__, "branch_kernel", opening=30)
    parser.add_argument("--cache_dir", default="checkpoints/tokenizers", help="where Qwen2.5's tokenizer is built")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_branch_kernel times a Triton kernel and sdpa: it needs a CUDA GPU")
    write_rows(args, "branch_kernel", bench_branch_kernel(args.articles, tuple(args.tokens), args.opening, args.warmup,
                                                          args.measured, args.cache_dir))


if __name__ == "__main__":
    main()
