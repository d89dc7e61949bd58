"""The grouped varlen kernel (`finetune.grouped_varlen_kernel`) against the exact varlen attention the packed rows
take off CUDA (`finetune.attention._padded_causal_attention`), on Triton's interpreter here and on the GPU."""

import pytest
import torch

from finetune.attention import _padded_causal_attention
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


def test_the_grouped_kernel_compiles_offline_for_hopper_and_the_dgx_spark():
    """From the arguments a 7B trunk pass gives it (28 query heads, 4 key heads, 128 wide): tensor-core matmuls,
    within a block's shared memory, for sm_90 and sm_121."""
    assert_compiles_offline_for_hopper_and_the_dgx_spark(
        "finetune.grouped_varlen_kernel", "_grouped_varlen_attention",
        "k.grouped_varlen_attention(z(120, 28, 128), z(200, 4, 128), z(200, 4, 128), "
        "torch.tensor([0, 60, 120], dtype=torch.int32), torch.tensor([0, 100, 200], dtype=torch.int32), 60, "
        "128 ** -0.5)")


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
    assert len(rows) == 2 * (1 + len(bench.KEYS_A_STEP) * len(bench.WARPS) * len(bench.STAGES))
    assert {row["shape"] for row in rows} == {"trunks", "taken branches"}
    assert all(row["ms"] > 0 and row["max_abs_diff_vs_flash"] < 0.02 for row in rows)
