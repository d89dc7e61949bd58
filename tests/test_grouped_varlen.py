"""The grouped varlen kernel (`finetune.grouped_varlen_kernel`) against the exact varlen attention the packed rows
take off CUDA (`finetune.attention._padded_causal_attention`), on Triton's interpreter here and on the GPU."""

import numpy as np
import pytest
import torch

from finetune.attention import _padded_causal_attention
from finetune.predict import AnswerTree
from tests.conftest import assert_compiles_offline_for_hopper_and_the_dgx_spark


def kernel_and_reference(queries: list[int], keys: list[int], heads: int, kv_heads: int, dim: int, dtype, device):
    """Sequences of `queries[i]` queries over `keys[i]` keys each (the queries their last tokens): the kernel's
    attention of random inputs, and the exact one in float32 from the same (rounded) inputs."""
    from finetune.grouped_varlen_kernel import grouped_varlen_attention

    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32, device=device)
                  for n in (queries, keys))
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, h, dim, generator=generator).to(dtype).to(device)
               for n, h in ((sum(queries), heads), (sum(keys), kv_heads), (sum(keys), kv_heads)))
    got = grouped_varlen_attention(q, k, v, cu_q, cu_k, max(queries), dim ** -0.5)
    want = _padded_causal_attention(q.float(), k.float(), v.float(), cu_q, cu_k, max(queries), max(keys), dim ** -0.5)
    return got.float(), want


@pytest.mark.parametrize("dtype, dim, tolerance", [(torch.float32, 32, 1e-5), (torch.float16, 32, 2e-3),
                                                   (torch.float32, 24, 1e-5)])
def test_the_grouped_kernel_attends_as_the_exact_varlen_attention_on_the_interpreter(dtype, dim, tolerance):
    """Four sequences: a trunk whose queries are all its keys and span several tiles (3 query heads a key head, so a
    tile of 128 rows holds 42 tokens) and several blocks of keys; one with a single query after 40 keys (a taken
    branch's); one with more keys than queries over tiles; a one-token one. float16 stands for bf16 (the interpreter
    has no bf16 matmul); heads as wide as a power of two or not."""
    got, want = kernel_and_reference([100, 1, 50, 1], [100, 41, 130, 1], heads=6, kv_heads=2, dim=dim, dtype=dtype,
                                     device="cpu")
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)



def check_keys_read_in_place(lengths: list[int], opening_length: int, heads: int, kv_heads: int, dim: int, dtype,
                             device) -> None:
    """Generation's check as the packed passes lay it out (`pack_batch`, `pack_taken`), keys and values with their
    heads first in memory (as transformers' rotary embedding leaves keys; Liger's leaves tokens first, as a gather
    does): trunks over the opening and their own keys at their queries' rows, then taken branches over the opening,
    their trunks' rows of that earlier forward and their own. Read where they lie, the kernel gives bit for bit what
    it gives over the same keys gathered into one tensor (the layout before; the same blocks of keys, so the same
    sums); a wrong row anywhere would show."""
    from finetune.grouped_varlen_kernel import grouped_varlen_attention
    from finetune.packed import pack_batch, pack_taken
    from tests.test_branch_attention import ANSWERS

    generator, scale = torch.Generator().manual_seed(0), dim ** -0.5
    heads_first = lambda n, h: torch.randn(h, n, dim, generator=generator).to(dtype).to(device).transpose(0, 1)
    tree = AnswerTree.from_answers(ANSWERS)
    trunks = pack_batch([[5] * n for n in lengths], tree, opening_length, device, with_branches=False)
    opening = heads_first(opening_length, kv_heads), heads_first(opening_length, kv_heads)
    rows = trunks.ids.shape[1]
    q, k, v = heads_first(rows, heads), heads_first(rows, kv_heads), heads_first(rows, kv_heads)
    in_place = grouped_varlen_attention(q, k, v, trunks.cu_q, trunks.cu_q, trunks.max_q, scale, opening)
    gathered = [torch.cat([x, y])[trunks.key_index] for x, y in zip(opening, (k, v))]
    assert torch.equal(in_place, grouped_varlen_attention(q, *gathered, trunks.cu_q, trunks.cu_k, trunks.max_q, scale))

    trunks.kept_keys = [(k, v)]
    which = np.arange(len(lengths))[::2]
    branches = [[11], [11, 99], [15, 16, 11], [15, 16, 11, 99]]  # one to four queries
    taken = pack_taken(trunks, which, [branches[i % 4] for i in range(len(which))], device)
    n = taken.ids.shape[1]
    q, k_own, v_own = heads_first(n, heads), heads_first(n, kv_heads), heads_first(n, kv_heads)
    in_place = grouped_varlen_attention(q, k_own, v_own, taken.cu_q, taken.cu_q, taken.max_q, scale, opening,
                                        (k, v, taken.kept_starts, taken.kept_lengths))
    gathered = [torch.cat([x, y, z])[taken.key_index] for x, y, z in zip(opening, (k, v), (k_own, v_own))]
    assert torch.equal(in_place, grouped_varlen_attention(q, *gathered, taken.cu_q, taken.cu_k, taken.max_q, scale))


def test_keys_read_where_they_lie_give_the_gathered_keys_result_to_the_bit_on_the_interpreter():
    """Four trunks (one over several tiles and blocks of keys, a one-token one) after a 13-token opening, and the
    taken branches of two of them; float16 (the interpreter has no bf16 matmul)."""
    check_keys_read_in_place([100, 1, 50, 7], 13, heads=6, kv_heads=2, dim=32, dtype=torch.float16, device="cpu")


def test_a_short_sequences_tile_holds_only_its_rows(monkeypatch):
    """Taken branches (at most four queries, seven query heads a key head) run in tiles of 32 rows, trunks in 128:
    each launch's grid (sequences, key heads, tiles) and tile rows."""
    from finetune import grouped_varlen_kernel as kernel

    launches = []

    class Capture:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, kwargs["BLOCK_M"]))

    monkeypatch.setattr(kernel, "_grouped_varlen_attention", Capture())
    for max_q in (4, 60):
        kernel.grouped_varlen_attention(torch.zeros(3 * max_q, 28, 128), torch.zeros(300, 4, 128),
                                        torch.zeros(300, 4, 128), torch.tensor([0, max_q, 2 * max_q, 3 * max_q]),
                                        torch.tensor([0, 100, 200, 300]), max_q, 1.0)
    assert launches == [((3, 4, 1), 32), ((3, 4, 4), 128)]  # 4 tokens x 7 heads; 18 tokens a tile, 60 in 4 tiles


@pytest.mark.parametrize("kept", [False, True])
def test_the_grouped_kernel_compiles_offline_for_hopper_and_the_dgx_spark(kept):
    """From the arguments a 7B trunk pass gives it (28 query heads, 4 key heads, 128 wide, the keys read where the
    model leaves them, after a 41-token opening), or a row of taken branches after such trunks: tensor-core matmuls,
    within a block's shared memory, its keys copied 16 bytes at a time, asynchronously (read from one tensor or
    another, they lose both unless the kernel is told their rows are aligned), for sm_90 and sm_121."""
    heads_first = "z(4, {}, 128).transpose(0, 1)"
    opening = f"({heads_first.format(41)}, {heads_first.format(41)})"
    cu = "torch.tensor([0, {0}, {1}], dtype=torch.int32)"
    kept_keys = heads_first.format(120)
    call = (f"k.grouped_varlen_attention(z(8, 28, 128), {heads_first.format(8)}, {heads_first.format(8)}, "
            f"{cu.format(4, 8)}, {cu.format(4, 8)}, 4, 128 ** -0.5, {opening}, ({kept_keys}, {kept_keys}, "
            "torch.tensor([0, 60], dtype=torch.int32), torch.tensor([60, 60], dtype=torch.int32)))" if kept else
            f"k.grouped_varlen_attention(z(120, 28, 128), {heads_first.format(120)}, {heads_first.format(120)}, "
            f"{cu.format(60, 120)}, {cu.format(60, 120)}, 60, 128 ** -0.5, {opening})")
    assert_compiles_offline_for_hopper_and_the_dgx_spark("finetune.grouped_varlen_kernel",
                                                         "_grouped_varlen_attention", call, pipelined_loads=True)


@pytest.mark.gpu
def test_keys_read_where_they_lie_give_the_gathered_keys_result_to_the_bit_at_the_7b_shape():
    """The compiled kernel, bf16, 28 query heads sharing 4 key heads, 128 wide: 64 trunks of 1 to 300 tokens after a
    41-token opening, and the taken branches of half of them (whose kernel is compiled apart, with its kept keys)."""
    lengths = torch.randint(1, 300, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    check_keys_read_in_place(lengths, 41, heads=28, kv_heads=4, dim=128, dtype=torch.bfloat16, device="cuda")


@pytest.mark.gpu
def test_the_grouped_kernel_attends_as_flash_attention_at_the_7b_shape():
    """bf16, 28 query heads sharing 4 key heads, 128 wide: 64 trunks of 1 to 300 tokens after a 41-token opening, and
    64 taken branches of 1 to 4 tokens after such trunks, against FlashAttention-2's varlen kernel."""
    from finetune.attention import _cuda_varlen_attention
    from finetune.grouped_varlen_kernel import grouped_varlen_attention

    generator = torch.Generator().manual_seed(1)
    trunks = torch.randint(1, 300, (64,), generator=generator)
    for queries, keys in ((trunks, trunks + 41), (torch.randint(1, 5, (64,), generator=generator), trunks + 45)):
        cu_q, cu_k = (torch.cat([torch.zeros(1, dtype=torch.int32), n.cumsum(0).int()]).cuda() for n in (queries, keys))
        q, k, v = (torch.randn(int(n.sum()), h, 128, generator=generator).bfloat16().cuda()
                   for n, h in ((queries, 28), (keys, 4), (keys, 4)))
        got = grouped_varlen_attention(q, k, v, cu_q, cu_k, int(queries.max()), 128 ** -0.5)
        want = _cuda_varlen_attention(q, k, v, cu_q, cu_k, int(queries.max()), int(keys.max()), 128 ** -0.5)
        torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02)


@pytest.mark.gpu
def test_the_grouped_kernel_benchmark_times_every_setting_against_flash_attention(tmp_path):
    """`finetune.lab.bench_grouped_varlen`: for the trunks and the taken branches, a row for FlashAttention's kernel
    and one for each setting, each kernel row's output FlashAttention's up to bf16 rounding."""
    import json

    from finetune.lab import bench_grouped_varlen

    bench_grouped_varlen.main(["--articles", "16", "--measured", "3", "--name", "smoke", "--results_dir",
                               str(tmp_path)])
    rows = json.loads((tmp_path / "smoke.json").read_text())["rows"]
    bench = bench_grouped_varlen
    assert len(rows) == 2 * (2 + len(bench.KEYS_A_STEP) * len(bench.WARPS) * len(bench.STAGES))
    assert {row["shape"] for row in rows} == {"trunks", "taken branches"}
    assert all(row["ms"] > 0 and row["max_abs_diff_vs_flash"] < 0.02 for row in rows)
