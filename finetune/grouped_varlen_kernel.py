"""Causal varlen attention for evaluation's packed rows (`finetune.packed`), one Triton program a sequence, key head
and tile of queries, the query heads that share a key head laid along the tile's rows.

FlashAttention-2's varlen kernel, which the packed rows called before, runs a program a sequence, query head and 128
queries. Evaluation's sequences are short: a trunk is about 60 queries, a taken branch two to four (with about a
hundred keys each), so most of a program's 128 rows are empty and each of a key head's seven query heads reads its
keys again. In generation's first profile that kernel took 6% of the GPU's time, about as much for the taken branches'
few queries as for the trunks (results/benchmarks/h100_7b_eval_taught_200_warm.json). Here a tile's rows are its
queries' tokens times the group's query heads (18 tokens x 7 heads for the 7B, or as few rows as a sequence needs),
each read once and scored against its key head's keys in one pass. The default (`finetune.packed.GROUPED_VARLEN`)
since two runs on an H100 made generation 3-4% faster with it than with FlashAttention's, in the same run (the eval
benchmark's "_flash_attention" modes time the other kernel; docs/performance.md, "The packed sequences' grouped
kernel"). Each sequence's keys are read where they lie (the opening's, an earlier forward's, the row's:
`_key_pointers`), not first gathered into one tensor.
"""

import torch
import triton
import triton.language as tl

from finetune.branch_attention_kernel import _key_pointers, _softmax_step, aligned_rows

# The fastest setting for the trunks of `python -m finetune.lab.bench_grouped_varlen` on one H100
# (results/benchmarks/h100_grouped_varlen_grouped.json): 0.43 ms a 512-article batch's trunks against
# FlashAttention-2's 0.66; the taken branches' 0.12 against 0.62 (their fastest setting: 0.10).
KEYS_A_STEP, WARPS, STAGES = 32, 4, 3
MOST_ROWS = 128  # a tile's rows at most: query tokens x query heads a key head serves


@triton.jit
def _grouped_varlen_attention(q, keys, values, opening_k, opening_v, kept_k, kept_v, out, cu_q, cu_k, n_opening,
                              kept_starts, kept_lengths, scale, q_token, q_head, k_token, k_head, v_token, v_head,
                              ok_token, ok_head, ov_token, ov_head, pk_token, pk_head, pv_token, pv_head,
                              o_token, o_head, GROUP: tl.constexpr, DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KEPT: tl.constexpr,
                              ALIGNED: tl.constexpr):
    sequence, kv_head, tile = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    q_start, k_start = tl.load(cu_q + sequence), tl.load(cu_k + sequence)
    if HAS_KEPT:
        kept_start, n_kept = tl.load(kept_starts + sequence), tl.load(kept_lengths + sequence)
    else:
        kept_start, n_kept = 0, 0
    n_q = tl.load(cu_q + sequence + 1) - q_start
    n_k = n_opening + n_kept + tl.load(cu_k + sequence + 1) - k_start
    tokens = BLOCK_M // GROUP  # query tokens a tile
    first = tile * tokens
    rows = tl.arange(0, BLOCK_M)  # query token first + rows // GROUP, head kv_head * GROUP + rows % GROUP
    i, head = first + rows // GROUP, kv_head * GROUP + rows % GROUP
    real = (rows < tokens * GROUP) & (i < n_q)
    dims = tl.arange(0, BLOCK_D)  # a head's width, padded to a power of two
    wide = dims[None, :] < DIM
    query = tl.load(q + (q_start + i)[:, None].to(tl.int64) * q_token + head[:, None] * q_head + dims[None, :],
                    mask=real[:, None] & wide, other=0.0)
    scale = scale * 1.4426950408889634  # exp2 below: log2(e)
    peak = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    # The queries are the sequence's last tokens (bottom-right causal, as FlashAttention aligns it): query i sees keys
    # 0 .. reach[i]. The tile's last query bounds the keys read; a tile past the sequence's queries reads none.
    reach = n_k - n_q + i
    end = tl.where(first < n_q, n_k - n_q + tl.minimum(first + tokens, n_q), 0)
    for block in range(0, end, BLOCK_N):
        at = block + tl.arange(0, BLOCK_N)
        inside = at < end
        k = tl.load(_key_pointers(at, kv_head, keys, k_token, k_head, k_start, opening_k, ok_token, ok_head, n_opening,
                                  kept_k, pk_token, pk_head, kept_start, n_kept, HAS_KEPT, ALIGNED)[:, None]
                    + dims[None, :], mask=inside[:, None] & wide, other=0.0)
        v = tl.load(_key_pointers(at, kv_head, values, v_token, v_head, k_start, opening_v, ov_token, ov_head,
                                  n_opening, kept_v, pv_token, pv_head, kept_start, n_kept, HAS_KEPT, ALIGNED)[:, None]
                    + dims[None, :], mask=inside[:, None] & wide, other=0.0)
        seen = inside[None, :] & (at[None, :] <= reach[:, None])
        s = tl.where(seen, tl.dot(query, tl.trans(k)) * scale, float("-inf"))
        peak, total, acc = _softmax_step(s, v, peak, total, acc)

    tl.store(out + (q_start + i)[:, None].to(tl.int64) * o_token + head[:, None] * o_head + dims[None, :],
             (acc / tl.where(total > 0, total, 1.0)[:, None]).to(out.dtype.element_ty), mask=real[:, None] & wide)


def grouped_varlen_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cu_q: torch.Tensor,
                             cu_k: torch.Tensor, max_q: int, scale: float,
                             opening: tuple[torch.Tensor, torch.Tensor] | None = None,
                             kept: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                             out: torch.Tensor | None = None, keys_a_step: int = KEYS_A_STEP, warps: int = WARPS,
                             stages: int = STAGES) -> torch.Tensor:
    """Causal attention of packed sequences, as `finetune.attention._cuda_varlen_attention` computes it over each
    sequence's keys, which are read where they lie: `opening`'s (keys, values), (opening, kv heads, dim), where
    given; then, where `kept` (keys, values, starts, lengths) is given, `lengths[i]` rows of its keys from
    `starts[i]` (an earlier forward's); then keys, values: (keys, kv heads, dim), sequence i's at cu_k[i]:cu_k[i + 1].
    q: (queries, heads, dim), sequence i's at cu_q[i]:cu_q[i + 1], its queries being its last keys' tokens; every
    tensor's last dimension contiguous, every sequence with a query. Query head h shares key head h // (heads / kv
    heads), as transformers' repeat_kv pairs them. Returns (queries, heads, dim): `out` where given (a caller's rows of
    a larger output, so that nothing concatenates them after)."""
    (tokens, heads, dim), kv_heads = q.shape, keys.shape[1]
    group = heads // kv_heads
    block = lambda n: max(16, triton.next_power_of_2(n))  # tl.arange wants powers of two, tl.dot 16 or more
    rows = min(block(max_q * group), max(MOST_ROWS, block(group)))  # a short sequence's tile holds just its rows
    opening_k, opening_v = opening if opening is not None else (keys, values)
    kept_k, kept_v, kept_starts, kept_lengths = kept if kept is not None else (keys, values, cu_k, cu_k)
    out = torch.empty(tokens, heads, dim, dtype=q.dtype, device=q.device) if out is None else out
    strides = [stride for x in (q, keys, values, opening_k, opening_v, kept_k, kept_v, out)
               for stride in x.stride()[:2]]
    _grouped_varlen_attention[(len(cu_q) - 1, kv_heads, triton.cdiv(max_q, rows // group))](
        q, keys, values, opening_k, opening_v, kept_k, kept_v, out, cu_q, cu_k,
        len(opening_k) if opening is not None else 0, kept_starts, kept_lengths, scale, *strides, GROUP=group,
        DIM=dim, BLOCK_D=block(dim), BLOCK_M=rows, BLOCK_N=keys_a_step, HAS_KEPT=kept is not None,
        ALIGNED=aligned_rows(keys, values, opening_k, opening_v, kept_k, kept_v), num_warps=warps, num_stages=stages)
    return out
