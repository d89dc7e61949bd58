"""Tokenizer round trip, the scratch model, and packed attention that never crosses article boundaries."""

import dataclasses

import pytest
import torch

from data_prep.task import LABELS, build_messages, build_prompt_messages, format_answer
from finetune.attention import VARLEN, choose_attn_implementation
from finetune.model import load_model, train_bpe_tokenizer
from finetune.prompts import answer_token_ids

TEXTS = ["Stocks rally as profits beat forecasts.", "The striker scored twice in the final.",
         "Rebels and troops agree to a ceasefire.", "NASA tests a new chip for its probes."]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(TEXTS * 20, vocab_size=400, cache_dir=tmp_path_factory.mktemp("tok"))


def test_bpe_tokenizer_carries_chatml_and_round_trips_the_answer(tokenizer):
    rendered = tokenizer.apply_chat_template(build_messages(TEXTS[0], "Business"), tokenize=False)
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith(
        '<|im_start|>assistant\n{"category":"Business"}<|im_end|>\n')
    ids = tokenizer.apply_chat_template(build_messages(TEXTS[0], "Business"), tokenize=True, return_dict=False)
    assert tokenizer.decode(ids) == rendered
    for label, answer in zip(LABELS, answer_token_ids(tokenizer)):
        assert tokenizer.decode(answer) == format_answer(label) + "<|im_end|>"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_bpe_tokenizer_is_cached(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok2")
    first = train_bpe_tokenizer(TEXTS * 20, 400, folder)
    (cached,) = folder.iterdir()
    mtime = (cached / "tokenizer.json").stat().st_mtime_ns
    second = train_bpe_tokenizer(TEXTS * 20, 400, folder)
    assert (cached / "tokenizer.json").stat().st_mtime_ns == mtime and second.get_vocab() == first.get_vocab()


def test_packing_with_plain_sdpa_is_refused(monkeypatch):
    """"auto" takes FlashAttention-2 only where it can run (a GPU and the flash_attn package), else the varlen path."""
    import importlib.util

    with pytest.raises(ValueError, match="attend to each other"):
        choose_attn_implementation("sdpa", packing=True)
    assert choose_attn_implementation("sdpa", packing=False) == "sdpa"
    installed = importlib.util.find_spec
    for cuda, flash_attn, chosen in ((False, True, VARLEN), (True, False, VARLEN), (True, True, "flash_attention_2")):

        def find_spec(name, *args):  # flash_attn there or not, as the case says; every other package as installed
            return (object() if flash_attn else None) if name == "flash_attn" else installed(name, *args)

        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(importlib.util, "find_spec", find_spec)
        assert choose_attn_implementation("auto", packing=True) == chosen, (cuda, flash_attn)


def _packed_row(tokenizer):
    rows = [tokenizer.apply_chat_template(build_messages(t, "World"), tokenize=True, return_dict=False) for t in TEXTS]
    ids = torch.tensor([sum(rows, [])])
    positions = torch.cat([torch.arange(len(r)) for r in rows])[None]
    cu = torch.tensor([0] + [len(r) for r in rows]).cumsum(0).to(torch.int32)
    return rows, ids, positions, cu


def test_packed_rows_do_not_attend_across_articles(tiny_config, tokenizer):
    choose_attn_implementation("auto", packing=True)
    model = load_model(tiny_config, tokenizer, VARLEN).eval()
    rows, ids, positions, cu = _packed_row(tokenizer)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                       max_length_q=int(cu.diff().max()), max_length_k=int(cu.diff().max())).logits[0]
        from_positions_only = model(input_ids=ids, position_ids=positions).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([r])).logits[0] for r in rows])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_positions_only, alone, atol=1e-5, rtol=1e-5)
    # The same row with no boundary information is one long article: later articles see earlier ones.
    with torch.no_grad():
        leaky = model(input_ids=ids).logits[0]
    assert not torch.allclose(leaky[len(rows[0]):], alone[len(rows[0]):], atol=1e-3)


def test_packed_rows_with_boundaries_skip_transformers_packed_sequence_check(tiny_config, tokenizer, monkeypatch):
    """The check reads a value back from the GPU in every forward; rows that carry their boundaries need no mask and
    take the same logits without it. Rows without boundaries still get the check (it finds them from positions)."""
    from transformers import masking_utils

    from finetune.attention import unmasked_packed_rows

    choose_attn_implementation("auto", packing=True)
    model = load_model(tiny_config, tokenizer, VARLEN).eval()
    rows, ids, positions, cu = _packed_row(tokenizer)
    boundaries = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=int(cu.diff().max()),
                      max_length_k=int(cu.diff().max()))
    with torch.no_grad():
        checked = model(input_ids=ids, position_ids=positions, **boundaries).logits
    unmasked_packed_rows(model)
    calls = []
    check = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda *a: calls.append(1) or check(*a))
    with torch.no_grad():
        unchecked = model(input_ids=ids, position_ids=positions, **boundaries).logits
        assert calls == []
        model(input_ids=ids, position_ids=positions)
        assert calls == [1]
    torch.testing.assert_close(unchecked, checked, atol=0, rtol=0)


def test_padded_batches_attend_as_transformers_does_without_copying_keys_per_query_head(tiny_config, tokenizer,
                                                                                         monkeypatch):
    """Left-padded prompts, then greedy decoding from them (each step's one query under the padding mask): the varlen
    implementation gives eager attention's logits and tokens, and never calls transformers' `repeat_kv` (the copy of
    every key per query head it avoids). The model has fewer key heads than query heads."""
    import transformers.integrations.sdpa_attention as sdpa_attention

    from finetune.predict import left_pad
    from finetune.lab.bench_eval import greedy_decoding

    choose_attn_implementation("auto", packing=False)
    model = load_model(dataclasses.replace(tiny_config, num_kv_heads=2), tokenizer, VARLEN).eval()
    assert model.config.num_attention_heads == 2 * model.config.num_key_value_heads
    prompts = [tokenizer.apply_chat_template(build_prompt_messages(t), tokenize=True, add_generation_prompt=True,
                                             return_dict=False) for t in TEXTS]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, "cpu")
    decoding = greedy_decoding(6, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    decoding.eos_token_id = None  # decode all six steps, whatever the untrained model picks

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            return logits[mask.bool()], model.generate(input_ids=ids, attention_mask=mask, generation_config=decoding)

    def no_copies(*args):
        raise AssertionError("repeat_kv called: keys copied per query head")

    with monkeypatch.context() as patched:
        patched.setattr(sdpa_attention, "repeat_kv", no_copies)
        logits, tokens = run()
    model.set_attn_implementation("eager")
    expected_logits, expected_tokens = run()
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens, expected_tokens) and tokens.shape[1] == ids.shape[1] + 6


def test_scratch_model_is_seeded_and_sized_from_the_tokenizer(tiny_config, tokenizer):
    """The embedding has the config's rows where the tokenizer has fewer tokens (a BPE trained on little text), and
    the tokenizer's length where the config asks for fewer, so that every token id has a row."""
    first, second = load_model(tiny_config, tokenizer), load_model(tiny_config, tokenizer)
    assert len(tokenizer) < tiny_config.vocab_size == 512
    assert first.config.vocab_size == 512 and first.config.model_type == "qwen2"
    small = load_model(dataclasses.replace(tiny_config, vocab_size=64), tokenizer)
    assert small.config.vocab_size == small.get_input_embeddings().num_embeddings == len(tokenizer) > 64
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)
    prompt = tokenizer.apply_chat_template(build_prompt_messages(TEXTS[0]), add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    assert first(input_ids=torch.tensor([prompt])).logits.shape == (1, len(prompt), first.config.vocab_size)


@pytest.mark.gpu
def test_packed_rows_do_not_attend_across_articles_on_gpu_bf16(tiny_config, tokenizer):
    """The CUDA path (torch varlen kernel, bf16). bf16 keeps ~3 significant digits, so the packed and one-by-one
    log-probabilities may differ by rounding (different kernels), bounded here at 0.05 per token and 0.005 on
    average; a row that mixes articles differs ten times more, which the last assertion shows."""
    config = dataclasses.replace(tiny_config, hidden_size=256, num_heads=4, intermediate_size=512, bf16=True,
                                 optimizer="adamw")  # FlashAttention needs head_dim % 8 == 0
    attn = choose_attn_implementation("auto", packing=True)
    model = load_model(config, tokenizer, attn).cuda().eval()
    rows, ids, positions, cu = _packed_row(tokenizer)
    with torch.no_grad():
        packed = model(input_ids=ids.cuda(), position_ids=positions.cuda(), cu_seq_lens_q=cu.cuda(),
                       cu_seq_lens_k=cu.cuda(), max_length_q=int(cu.diff().max()),
                       max_length_k=int(cu.diff().max())).logits[0].float().log_softmax(-1)
        alone = torch.cat([model(input_ids=torch.tensor([r]).cuda()).logits[0] for r in rows]).float().log_softmax(-1)
        leaky = model(input_ids=ids.cuda()).logits[0].float().log_softmax(-1)
    difference = (packed - alone).abs()
    print(f"attention={attn} max|dlogp|={difference.max():.4f} mean={difference.mean():.5f} "
          f"leaky max={(leaky - alone).abs().max():.4f}")
    assert difference.max() < 0.05 and difference.mean() < 0.005
    assert (leaky - alone)[len(rows[0]):].abs().max() > max(10 * difference.max(), 1e-3)


def test_torch_without_the_varlen_kernel_falls_back_to_exact_padded_attention(monkeypatch):
    """torch.nn.attention.varlen arrived in torch 2.10; requirements.txt allows older releases."""
    import sys

    from finetune.attention import _cuda_varlen_kernel, _padded_causal_attention

    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", None)  # makes the import fail
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.warns(UserWarning, match="no torch.nn.attention.varlen: packed rows use the exact padded attention"):
        assert _cuda_varlen_kernel() is None
    torch.manual_seed(0)
    lengths = [5, 3, 7]
    q, k, v = torch.randn(15, 4, 8), torch.randn(15, 2, 8), torch.randn(15, 2, 8)  # (tokens, heads, dim), GQA
    cu = torch.tensor([0, 5, 8, 15], dtype=torch.int32)
    out = _padded_causal_attention(q, k, v, cu, cu, max(lengths), max(lengths), None)
    alone = [torch.nn.functional.scaled_dot_product_attention(
        *(x[a:b].transpose(0, 1) for x in (q, k, v)), is_causal=True, enable_gqa=True).transpose(0, 1)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    torch.testing.assert_close(out, torch.cat(alone))


def _causal_alone(q, k, v, cu_q, cu_k):
    """Each sequence on its own: its queries are its last keys (bottom-right causal), the slow obvious way."""
    out = []
    for (qa, qb), (ka, kb) in zip(zip(cu_q[:-1].tolist(), cu_q[1:].tolist()), zip(cu_k[:-1].tolist(), cu_k[1:].tolist())):
        lq, lk = qb - qa, kb - ka
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        out.append(torch.nn.functional.scaled_dot_product_attention(
            *(x.transpose(0, 1) for x in (q[qa:qb], k[ka:kb], v[ka:kb])), attn_mask=mask, enable_gqa=True
        ).transpose(0, 1))
    return torch.cat(out)


def test_padded_attention_with_more_keys_than_queries_matches_each_sequence_alone():
    """Packed label scoring's sequences see the shared opening's keys as well as their own tokens."""
    from finetune.attention import _padded_causal_attention

    torch.manual_seed(0)
    cu_q, cu_k = torch.tensor([0, 5, 7, 10], dtype=torch.int32), torch.tensor([0, 9, 17, 20], dtype=torch.int32)
    q, k, v = torch.randn(10, 4, 8), torch.randn(20, 2, 8), torch.randn(20, 2, 8)
    out = _padded_causal_attention(q, k, v, cu_q, cu_k, 5, 9, None)
    torch.testing.assert_close(out, _causal_alone(q, k, v, cu_q, cu_k))


@pytest.mark.gpu
def test_cuda_varlen_kernel_aligns_queries_to_the_last_keys():
    """Packed label scoring relies on the kernel's bottom-right causal alignment when a sequence has more keys than
    queries (FlashAttention's convention); bf16, head_dim 128, GQA as in the 7B."""
    from finetune.attention import _cuda_varlen_attention

    torch.manual_seed(0)
    cu_q, cu_k = torch.tensor([0, 50, 52, 56], dtype=torch.int32), torch.tensor([0, 91, 134, 180], dtype=torch.int32)
    q = torch.randn(56, 28, 128, dtype=torch.bfloat16)
    k, v = torch.randn(180, 4, 128, dtype=torch.bfloat16), torch.randn(180, 4, 128, dtype=torch.bfloat16)
    out = _cuda_varlen_attention(*(x.cuda() for x in (q, k, v, cu_q, cu_k)), 50, 91, None)
    expected = _causal_alone(*(x.cuda().float() for x in (q, k, v)), cu_q, cu_k)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_cuda_varlen_kernel_gradients_with_fewer_key_value_heads():
    """Training backpropagates through the kernel with the 7B's 4 key/value heads for 28 query heads, which it takes
    as they are (no copy per query head): the gradients of queries, keys and values match each article alone."""
    from finetune.attention import _cuda_varlen_attention

    torch.manual_seed(0)
    cu = torch.tensor([0, 37, 100, 164], dtype=torch.int32)
    q = torch.randn(164, 28, 128, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    k, v = (torch.randn(164, 4, 128, dtype=torch.bfloat16, device="cuda", requires_grad=True) for _ in range(2))
    grad_out = torch.randn(164, 28, 128, device="cuda")
    _cuda_varlen_attention(q, k, v, cu.cuda(), cu.cuda(), 64, 64, None).float().backward(grad_out)
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    _causal_alone(*leaves, cu, cu).backward(grad_out)
    for fast, exact in zip((q, k, v), leaves):
        torch.testing.assert_close(fast.grad.float(), exact.grad, atol=5e-2, rtol=5e-2)


def test_masked_grouped_attention_takes_the_output_layout_cuda_kernels_return(monkeypatch):
    """On CUDA, sdpa's memory-efficient kernel (the one a bf16 masked call takes) returns its output laid out as
    (batch, queries, heads, dim), a transposed view: the heads laid along the queries must still come back in their
    places, and no view may assume a contiguous output."""
    from finetune.attention import _masked_grouped_attention

    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: sdpa(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2))
    torch.manual_seed(0)
    for queries in (1, 37):  # a decoding step, and a left-padded prefill
        q, k, v = torch.randn(3, 28, queries, 16), torch.randn(3, 4, 60, 16), torch.randn(3, 4, 60, 16)
        mask = torch.rand(3, 1, queries, 60) > 0.3
        mask[..., -1] = True
        expected = sdpa(q, k.repeat_interleave(7, 1), v.repeat_interleave(7, 1), attn_mask=mask).transpose(1, 2)
        torch.testing.assert_close(_masked_grouped_attention(q, k, v, mask, 0.0, None), expected)


def test_masked_attention_runs_with_cudnn_switched_off(monkeypatch):
    """cuDNN's attention, sdpa's first choice on Hopper, builds a graph for every new shape, and decoding's keys grow
    by one at every step: the masked calls of decoding and of label scoring's answer branches leave it out, and
    leave sdpa's choices as they were afterwards."""
    from finetune.attention import _masked_grouped_attention
    from finetune.packed import _branch_attention

    sdpa, cudnn_on = torch.nn.functional.scaled_dot_product_attention, []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: cudnn_on.append(torch.backends.cuda.cudnn_sdp_enabled())
                        or sdpa(*args, **kwargs))
    assert torch.backends.cuda.cudnn_sdp_enabled()
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    _masked_grouped_attention(q, k, v, torch.ones(2, 1, 3, 5, dtype=torch.bool), 0.0, None)
    _branch_attention(torch.randn(2 * 3, 4, 8), torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8),
                      torch.ones(2, 3, 5, dtype=torch.bool), None)
    assert cudnn_on == [False, False] and torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.gpu
def test_masked_grouped_attention_matches_repeated_keys_on_gpu():
    """Decoding's attention on CUDA in bf16 at the 7B's heads (28 query heads, 4 key heads, dim 128): the kernel that
    takes the query heads laid along the queries under a padding mask (not cuDNN's) gives what keys repeated per
    query head (transformers' repeat_kv pairing) give in fp32."""
    from finetune.attention import _masked_grouped_attention

    torch.manual_seed(0)
    for queries in (1, 37):  # a decoding step, and a left-padded prefill
        # laid out as the model's projection gives it: (batch, queries, heads, dim), heads moved second by a view
        q = torch.randn(8, queries, 28, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        k, v = (torch.randn(8, 4, 60, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        mask = torch.rand(8, 1, queries, 60, device="cuda") > 0.3
        mask[..., -1] = True  # every query sees at least itself
        with torch.profiler.profile() as profiler:
            out = _masked_grouped_attention(q, k, v, mask, 0.0, None)
            torch.cuda.synchronize()
        kernels = [event.name for event in profiler.events() if event.device_type == torch.autograd.DeviceType.CUDA]
        assert kernels and not [name for name in kernels if "cudnn" in name.lower()], kernels
        expected = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float().repeat_interleave(7, 1), v.float().repeat_interleave(7, 1), attn_mask=mask)
        torch.testing.assert_close(out.float(), expected.transpose(1, 2), atol=2e-2, rtol=2e-2)
