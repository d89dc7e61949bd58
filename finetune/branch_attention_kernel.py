"""The answer branches' attention in packed label scoring (`finetune.packed`), one Triton program an article and key
head, reading each article's keys where they lie: the opening's, then its trunk's in the row.

Each article's branch tokens (ten for Qwen2.5's four answers) attend to the opening, their article's trunk and the
earlier tokens of their own branch. As one masked sdpa call this first gathered every article's [opening; trunk;
branches] keys into a padded (articles, width) block, in every layer, then ran the memory-efficient kernel over it:
about 1.6% of label scoring's GPU time on an H100 (15 ms of sdpa and the gathers in 1.44 s,
results/benchmarks/h100_7b_eval_taught_200_adds_b.json). Here a program takes the query heads that share one key
head laid along its queries (7 x 10 rows for the 7B), runs an online softmax over the trunk's keys, then over its
branch tokens' under the tree's mask, and writes each row where the layer reads it.
"""

import torch
import triton
import triton.language as tl

KEYS_A_STEP, WARPS = 32, 8  # the settings `python -m finetune.lab.bench_branch_kernel` times against the others


@triton.jit
def _softmax_step(s, v, peak, total, acc):
    """One block of keys into the online softmax: scores `s` (log2 scale, -inf where not seen) and their values."""
    new_peak = tl.maximum(peak, tl.max(s, 1))
    p = tl.exp2(s - new_peak[:, None])
    rescale = tl.exp2(peak - new_peak)
    return new_peak, total * rescale + tl.sum(p, 1), acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit
def _key_pointers(at, kv_head, keys, k_token, k_head, start, opening, o_token, o_head, n_opening,
                  kept, p_token, p_head, kept_start, n_kept, HAS_KEPT: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointers to keys `at` (or values) of a sequence whose keys are the opening's `n_opening`, then `n_kept` rows of
    an earlier forward's `kept` from `kept_start`, then rows of `keys` from `start`, each read where it lies. Gathering
    them into one tensor first (and the opening's concatenation before it) took 1.7% of a 7B generation batch's GPU
    time on an H100 (results/benchmarks/h100_7b_eval_taught_200_grouped_default_b.json). A key's place among its
    sequence's is the same either way, so the blocks of the online softmax and every sum in them are too.

    `ALIGNED` (every row 16-byte aligned, `aligned_rows`) says so to the compiler, which cannot see it through the
    choice between tensors: without it each key's row was read two bytes at a time and the loads left unpipelined."""
    pointers = tl.where(at < n_opening, opening + at.to(tl.int64) * o_token + kv_head * o_head,
                        keys + (start + at - n_opening - n_kept).to(tl.int64) * k_token + kv_head * k_head)
    if HAS_KEPT:
        in_kept = (at >= n_opening) & (at < n_opening + n_kept)
        pointers = tl.where(in_kept, kept + (kept_start + at - n_opening).to(tl.int64) * p_token + kv_head * p_head,
                            pointers)
    if ALIGNED:
        pointers = tl.multiple_of(pointers, 16)
    return pointers


def aligned_rows(*tensors: torch.Tensor) -> bool:
    """Whether every (token, head) row of `tensors` starts 16 bytes aligned: their data and their first two strides."""
    return all(x.data_ptr() % 16 == 0 and all(stride * x.element_size() % 16 == 0 for stride in x.stride()[:2])
               for x in tensors)


@triton.jit
def _branch_attention(q, keys, values, opening_k, opening_v, branch_k, branch_v, out, cu_k, n_opening, sees, scale,
                      q_token, q_head, k_token, k_head, v_token, v_head, ok_token, ok_head, ov_token, ov_head,
                      bk_token, bk_head, bv_token, bv_head, o_token, o_head,
                      GROUP: tl.constexpr, N_BRANCH: tl.constexpr, DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr):
    article, kv_head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)  # query head kv_head * GROUP + rows // N_BRANCH, branch token rows % N_BRANCH
    token, head = article * N_BRANCH + rows % N_BRANCH, kv_head * GROUP + rows // N_BRANCH
    real = rows < GROUP * N_BRANCH
    dims = tl.arange(0, BLOCK_D)  # a head's width, padded to a power of two
    wide = dims[None, :] < DIM
    query = tl.load(q + token[:, None] * q_token + head[:, None] * q_head + dims[None, :],
                    mask=real[:, None] & wide, other=0.0)
    scale = scale * 1.4426950408889634  # exp2 below: log2(e)
    peak = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    start = tl.load(cu_k + article)
    end = n_opening + tl.load(cu_k + article + 1) - start
    for first in range(0, end, BLOCK_N):  # the opening, then the trunk
        at = first + tl.arange(0, BLOCK_N)
        inside = at < end
        k = tl.load(_key_pointers(at, kv_head, keys, k_token, k_head, start, opening_k, ok_token, ok_head, n_opening,
                                  keys, 0, 0, 0, 0, False, ALIGNED)[:, None] + dims[None, :],
                    mask=inside[:, None] & wide, other=0.0)
        v = tl.load(_key_pointers(at, kv_head, values, v_token, v_head, start, opening_v, ov_token, ov_head,
                                  n_opening, values, 0, 0, 0, 0, False, ALIGNED)[:, None] + dims[None, :],
                    mask=inside[:, None] & wide, other=0.0)
        s = tl.where(inside[None, :], tl.dot(query, tl.trans(k)) * scale, float("-inf"))
        peak, total, acc = _softmax_step(s, v, peak, total, acc)

    # The article's own branch tokens, each row seeing its branch's tokens up to itself (never none: itself).
    cols = tl.arange(0, BLOCK_B)
    inside = cols < N_BRANCH
    at = article * N_BRANCH + cols
    k = tl.load(branch_k + at[:, None] * bk_token + kv_head * bk_head + dims[None, :],
                mask=inside[:, None] & wide, other=0.0)
    v = tl.load(branch_v + at[:, None] * bv_token + kv_head * bv_head + dims[None, :],
                mask=inside[:, None] & wide, other=0.0)
    seen = tl.load(sees + (rows % N_BRANCH)[:, None] * N_BRANCH + cols[None, :], mask=inside[None, :], other=0) != 0
    s = tl.where(seen, tl.dot(query, tl.trans(k)) * scale, float("-inf"))
    peak, total, acc = _softmax_step(s, v, peak, total, acc)

    tl.store(out + token[:, None] * o_token + head[:, None] * o_head + dims[None, :],
             (acc / total[:, None]).to(out.dtype.element_ty), mask=real[:, None] & wide)


def branch_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, branch_k: torch.Tensor,
                     branch_v: torch.Tensor, cu_k: torch.Tensor, sees: torch.Tensor, scale: float,
                     opening: tuple[torch.Tensor, torch.Tensor] | None = None, out: torch.Tensor | None = None,
                     keys_a_step: int = KEYS_A_STEP, warps: int = WARPS) -> torch.Tensor:
    """Every article's branch tokens attending to their keys. q: (articles * branches, heads, dim), an article's
    branch tokens together; keys, values: (keys, kv heads, dim), article i's (its trunk: the row's keys, read in
    place) at cu_k[i]:cu_k[i + 1], after `opening`'s (keys, values), (opening, kv heads, dim), where given; branch_k,
    branch_v: (articles * branches, kv heads, dim), the branch tokens' own; sees: (branches, branches) bool, the
    tree's mask (`AnswerTree.sees`). Every tensor's last dimension is contiguous. Query head h shares key head h //
    (heads / kv heads), as transformers' repeat_kv pairs them. Returns (articles * branches, heads, dim): `out` where
    given (a caller's rows of a larger output)."""
    n_branch, (tokens, heads, dim), kv_heads = len(sees), q.shape, keys.shape[1]
    group = heads // kv_heads
    opening_k, opening_v = opening if opening is not None else (keys, values)
    out = torch.empty(tokens, heads, dim, dtype=q.dtype, device=q.device) if out is None else out
    strides = [stride for x in (q, keys, values, opening_k, opening_v, branch_k, branch_v, out)
               for stride in x.stride()[:2]]
    block = lambda n: max(16, triton.next_power_of_2(n))  # tl.arange wants powers of two, tl.dot 16 or more
    _branch_attention[(tokens // n_branch, kv_heads)](
        q, keys, values, opening_k, opening_v, branch_k, branch_v, out, cu_k,
        len(opening_k) if opening is not None else 0, sees, scale, *strides, GROUP=group, N_BRANCH=n_branch,
        DIM=dim, BLOCK_D=block(dim), BLOCK_M=block(group * n_branch), BLOCK_B=block(n_branch), BLOCK_N=keys_a_step,
        ALIGNED=aligned_rows(keys, values, opening_k, opening_v), num_warps=warps)
    return out
