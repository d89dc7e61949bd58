"""The answer branches' Triton kernel (`finetune.branch_attention_kernel`) against the dense masked attention it
replaces on CUDA (`finetune.packed._branch_attention`), on Triton's interpreter here and on the GPU."""

import pytest
import torch

from finetune.packed import _branch_attention, pack_batch
from finetune.predict import AnswerTree
from tests.conftest import assert_compiles_offline_for_hopper_and_the_dgx_spark

# Qwen2.5's four answers' shape: a shared stem, then branches of two, two, two and four tokens.
ANSWERS = [[1, 2, 3, 10, 11, 99], [1, 2, 3, 12, 11, 99], [1, 2, 3, 13, 11, 99], [1, 2, 3, 14, 15, 16, 11, 99]]


def kernel_and_reference(articles: list[list[int]], heads: int, kv_heads: int, dim: int, dtype, device,
                         opening: int = 5):
    """The branches' attention of a packed row of `articles` over random queries, keys and values: the kernel's,
    and the dense call's in float32 from the same (rounded) inputs."""
    from finetune.branch_attention_kernel import branch_attention

    tree = AnswerTree.from_answers(ANSWERS)
    batch = pack_batch(articles, tree, opening, device)
    tokens, branch_tokens = batch.ids.shape[1], len(articles) * len(tree.branch)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, h, dim, generator=generator).to(dtype).to(device)
               for n, h in ((tokens, heads), (opening + tokens, kv_heads), (opening + tokens, kv_heads)))
    got = branch_attention(q[batch.trunk_tokens:], k[batch.key_index], v[batch.key_index], k[-branch_tokens:],
                           v[-branch_tokens:], batch.cu_k, batch.branch_sees, dim ** -0.5)
    want = _branch_attention(q[batch.trunk_tokens:].float(), k.float()[batch.branch_key_index],
                             v.float()[batch.branch_key_index], batch.branch_mask, dim ** -0.5)
    return got.float(), want


@pytest.mark.parametrize("dtype, dim, tolerance", [(torch.float32, 32, 1e-5), (torch.float16, 32, 2e-3),
                                                   (torch.float32, 24, 1e-5)])
def test_the_branch_kernel_attends_as_the_dense_call_on_the_interpreter(dtype, dim, tolerance):
    """Three articles, one of whose keys run over several blocks into a partial one, two key heads of three query
    heads each (the interpreter has no bf16 matmul: float16 stands for it), heads as wide as a power of two or not."""
    got, want = kernel_and_reference([[5] * 4, [6] * 70, [7] * 2], heads=6, kv_heads=2, dim=dim, dtype=dtype,
                                     device="cpu")
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)



def check_keys_read_in_place(lengths: list[int], opening_length: int, heads: int, kv_heads: int, dim: int, dtype,
                             device) -> None:
    """Label scoring's layout: each article's trunk keys read at its trunk's rows of the packed row, after the
    opening's, with their heads first in memory (as transformers' rotary embedding leaves keys), give bit for bit what
    the kernel gives over the same keys gathered into one tensor (the layout before: the same blocks of keys, the
    same sums)."""
    from finetune.branch_attention_kernel import branch_attention

    tree = AnswerTree.from_answers(ANSWERS)
    batch = pack_batch([[5] * n for n in lengths], tree, opening_length, device)
    rows, branch_tokens = batch.ids.shape[1], len(lengths) * len(tree.branch)
    generator = torch.Generator().manual_seed(0)
    heads_first = lambda n, h: torch.randn(h, n, dim, generator=generator).to(dtype).to(device).transpose(0, 1)
    q, k, v = heads_first(rows, heads), heads_first(opening_length + rows, kv_heads), heads_first(opening_length + rows,
                                                                                                   kv_heads)
    opening, own = (k[:opening_length], v[:opening_length]), (k[opening_length:], v[opening_length:])
    branch = q[batch.trunk_tokens:], k[-branch_tokens:], v[-branch_tokens:]
    in_place = branch_attention(branch[0], *own, *branch[1:], batch.cu_q, batch.branch_sees, dim ** -0.5, opening)
    gathered = branch_attention(branch[0], k[batch.key_index], v[batch.key_index], *branch[1:], batch.cu_k,
                                batch.branch_sees, dim ** -0.5)
    assert torch.equal(in_place, gathered)


def test_keys_read_where_they_lie_give_the_gathered_keys_result_to_the_bit_on_the_interpreter():
    """Three articles, one over several blocks of keys, after a 13-token opening; float16 (no bf16 matmul here)."""
    check_keys_read_in_place([4, 70, 2], 13, heads=6, kv_heads=2, dim=32, dtype=torch.float16, device="cpu")


@pytest.mark.gpu
def test_keys_read_where_they_lie_give_the_gathered_keys_result_to_the_bit_at_the_7b_shape():
    """The compiled kernel, bf16, 28 query heads sharing 4 key heads, 128 wide, 64 articles of 1 to 300 tokens after a
    41-token opening."""
    lengths = torch.randint(1, 300, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    check_keys_read_in_place(lengths, 41, heads=28, kv_heads=4, dim=128, dtype=torch.bfloat16, device="cuda")


def test_the_branch_kernel_compiles_offline_for_hopper_and_the_dgx_spark():
    """From the arguments the 7B's label scoring passes (28 query heads, 4 key heads, 128 wide, the trunks' keys read
    where the model leaves them, after a 41-token opening): tensor-core matmuls, within a block's shared memory, the
    keys copied 16 bytes at a time, asynchronously, for sm_90 and sm_121."""
    row, opening = "z(4, 110, 128).transpose(0, 1)", "z(4, 41, 128).transpose(0, 1)"
    assert_compiles_offline_for_hopper_and_the_dgx_spark(
        "finetune.branch_attention_kernel", "_branch_attention",
        f"k.branch_attention(z(20, 28, 128), {row}, {row}, z(20, 4, 128), z(20, 4, 128), "
        f"torch.tensor([0, 40, 90], dtype=torch.int32), torch.ones(10, 10, dtype=torch.bool), 128 ** -0.5, "
        f"({opening}, {opening}))", pipelined_loads=True)


@pytest.mark.gpu
def test_the_branch_kernel_attends_as_the_dense_call_at_the_7b_shape():
    """bf16, 28 query heads sharing 4 key heads, 128 wide, 64 articles of 1 to 300 tokens."""
    lengths = torch.randint(1, 300, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    got, want = kernel_and_reference([[5] * n for n in lengths], heads=28, kv_heads=4, dim=128,
                                     dtype=torch.bfloat16, device="cuda")
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)


@pytest.mark.gpu
def test_the_branch_kernel_benchmark_times_every_setting_against_the_dense_call(tmp_path):
    """`finetune.lab.bench_branch_kernel`: a row for the dense call and one for each setting, each kernel row's output
    the dense call's up to bf16 rounding."""
    import json

    from finetune.lab import bench_branch_kernel

    bench_branch_kernel.main(["--articles", "16", "--measured", "3", "--name", "smoke", "--results_dir",
                              str(tmp_path), "--cache_dir", str(tmp_path / "tokenizers")])
    rows = json.loads((tmp_path / "smoke.json").read_text())["rows"]
    assert len(rows) == 1 + len(bench_branch_kernel.KEYS_A_STEP) * len(bench_branch_kernel.WARPS)
    assert all(row["ms"] > 0 and row["max_abs_diff_vs_dense"] < 0.02 for row in rows)
