"""Attention for packed rows that never looks across article boundaries.

Padding-free packing puts several articles in one row and marks where each starts (TRL's collator passes
`cu_seq_lens_q`). FlashAttention-2 honours those boundaries; plain sdpa/eager/flex do not in every transformers 5.x
path (e.g. once a KV cache object exists the packed-sequence mask is skipped), so articles would attend to each other.
Without flash-attn we register "varlen": PyTorch's varlen kernel on CUDA, an exact padded equivalent elsewhere.
"""

import importlib.util
import inspect
import logging
import warnings
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

log = logging.getLogger(__name__)

VARLEN = "varlen"
LEAKY_WHEN_PACKED = {"sdpa", "eager", "flex_attention"}


def choose_attn_implementation(requested: str, packing: bool, share_opening: bool = False) -> str:
    """The attention implementation to load the model with; refuses choices that would mix packed articles. Rows
    whose articles share one opening (`finetune.opening`) need the varlen one, which gathers each article's keys
    (on CUDA through PyTorch's FlashAttention-2 varlen kernel)."""
    if share_opening and requested not in ("auto", VARLEN):
        raise ValueError(f"attn_implementation={requested!r} cannot share the opening across a micro-batch's "
                         f"articles: use 'auto' or '{VARLEN}', or set share_opening=False.")
    if requested == "auto":
        if share_opening:
            chosen = VARLEN
        elif torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
            chosen = "flash_attention_2"
        else:
            chosen = VARLEN
    elif packing and requested in LEAKY_WHEN_PACKED:
        raise ValueError(
            f"attn_implementation={requested!r} with packing lets packed articles attend to each other. "
            f"Use 'auto', 'flash_attention_2' or '{VARLEN}', or set packing=False."
        )
    else:
        chosen = requested
    if chosen == VARLEN:
        register_varlen_attention()
    log.info("attention implementation: %s (packing=%s)", chosen, packing)
    return chosen


def choose_inference_attn_implementation(requested: str) -> str:
    """The attention evaluation loads the model with: "auto" takes the varlen implementation, whose padded batches do
    not copy the keys per query head (`_masked_grouped_attention`) and which takes label scoring's 4D masks
    (FlashAttention-2 does not); any other name as asked."""
    chosen = VARLEN if requested == "auto" else requested
    if chosen == VARLEN:
        register_varlen_attention()
    return chosen


def register_varlen_attention() -> None:
    """Make "varlen" a name transformers accepts for `attn_implementation` (idempotent)."""
    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, sdpa_mask)


def unmasked_packed_rows(model) -> None:
    """Packed rows that carry their boundaries (`cu_seq_lens_q`, from TRL's padding-free collator) go through the
    model with no mask, which is all the varlen and FlashAttention-2 kernels need. Left to itself, transformers
    checks the position ids for packed sequences before it builds a mask, and reads the answer back from the GPU:
    a host sync at the start of every micro-batch's forward (`masking_utils.py` in the training benchmark's
    host_syncs_by_site). A mask per layer type given as None is taken as it is, as decoding's prefill does."""
    def no_mask(decoder, args, kwargs):
        if kwargs.get("cu_seq_lens_q") is not None and kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = dict.fromkeys(decoder.config.layer_types)
        return args, kwargs

    model.get_decoder().register_forward_pre_hook(no_mask, with_kwargs=True)


@contextmanager
def attention_implementation(model, name: str):
    """The model with attention `name` for the duration, its own afterwards."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


# sdpa tries cuDNN's attention first on Hopper, and cuDNN builds an execution graph for every new shape: at each
# decoding step the keys are one longer, and label scoring's branches change width with every batch. In the 7B's
# decoding profile (results/benchmarks/h200_7b_eval_recipe_generation.json) its calls took 1.35 ms of host time each,
# the GPU idle for most of it. Under a mask the memory-efficient kernel does the same with one launch.
NOT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def without_cudnn_attention():
    """sdpa's kernels but cuDNN's for the duration. Evaluation's passes run inside it, so that their masked calls,
    one a layer at every decoding step, do not each switch cuDNN off and on again (`masked_sdpa`)."""
    return sdpa_kernel(NOT_CUDNN)


def masked_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, dropout: float = 0.0,
                scaling: float | None = None) -> torch.Tensor:
    """sdpa under `mask`, by any kernel but cuDNN's; the switch is made here only where no caller made it already:
    entering and leaving `sdpa_kernel` costs Python time in every layer, and decoding's steps wait on the host (the GPU
    busy 79% of a decoding profile, h100_7b_eval_recipe_generation.json)."""
    with without_cudnn_attention() if torch.backends.cuda.cudnn_sdp_enabled() else nullcontext():
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             cu_seq_lens_q: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                             opening_key_index: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Per-article causal attention for a packed row; sdpa under its mask for padded batches, the keys not copied per
    query head (`_masked_grouped_attention`). A row whose articles share one opening (`finetune.opening`) gives each
    article's keys as `opening_key_index` into the row, with their boundaries (`cu_seq_lens_k`, `max_length_k`)."""
    if cu_seq_lens_q is None and attention_mask is None and position_ids is not None and query.shape[0] == 1:
        cu_seq_lens_q = _boundaries_from_positions(position_ids[0])
    if cu_seq_lens_q is None:
        if attention_mask is not None and attention_mask.shape[1] == 1 and key.shape[1] != query.shape[1]:
            return _masked_grouped_attention(query, key, value, attention_mask, dropout, scaling), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if dropout:
        raise NotImplementedError("varlen attention has no dropout; Qwen2 trains with attention_dropout=0")
    # (1, heads, tokens, dim) -> (tokens, heads, dim), the varlen layout.
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    cu = cu_seq_lens_q.to(device=q.device, dtype=torch.int32)
    # TRL's collator passes the longest article's length as a Python int: reading it from `cu` instead would stop
    # the host until the GPU catches up, in every layer, and break a compiled layer's graph.
    max_q = kwargs.get("max_length_q") or int(cu.diff().max())
    cu_k, max_k = cu, max_q
    if opening_key_index is not None:
        k, v = _gather_rows(k, opening_key_index), _gather_rows(v, opening_key_index)
        cu_k, max_k = kwargs["cu_seq_lens_k"].to(device=q.device, dtype=torch.int32), kwargs["max_length_k"]
    attend = _cuda_varlen_attention if q.is_cuda and CUDA_VARLEN is not None else _padded_causal_attention
    return attend(q, k, v, cu, cu_k, max_q, max_k, scaling).unsqueeze(0), None


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` of `x`, the shared opening's many times over, their gradients summed in a fixed order on either
    device. On the CPU indexing's backward adds the repeated rows in whatever order the threads reach them (two
    identical runs of the tiny recipe on 2 threads parted in the 7th digit of the loss, the demo's accuracy by a few
    answers); index_select's backward (index_add) does not. On CUDA indexing's backward sorts the indices, where
    index_add would add with atomics."""
    return x.index_select(0, index) if x.device.type == "cpu" else x[index]


def _masked_grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                              dropout: float, scaling: float | None) -> torch.Tensor:
    """sdpa under a padding mask (left-padded evaluation and generation batches, unpacked training) with fewer key
    heads than query heads, without copying the keys. transformers repeats every key and value to each query head
    there (sdpa's `enable_gqa` falls back to its math kernel under a mask): 7 x the 7B's keys written and read again in
    every layer, at every decoding step. Instead the query heads that share a key head (repeat_kv's pairing: key head j
    serves query heads j * group to (j + 1) * group - 1) are laid along the queries and the mask's rows repeated
    for them. query: (batch, heads, queries, dim); key, value: (batch, kv heads, keys, dim); mask: (batch, 1,
    queries, keys). Returns (batch, queries, heads, dim), as transformers' attention functions do."""
    batch, heads, queries, dim = query.shape
    group = heads // key.shape[1]
    out = masked_sdpa(query.reshape(batch, key.shape[1], group * queries, dim), key, value,
                      mask.repeat(1, 1, group, 1), dropout, scaling)
    # reshape, not view: CUDA's memory-efficient kernel returns its output laid out as (batch, queries, heads, dim).
    return out.reshape(batch, heads, queries, dim).transpose(1, 2).contiguous()


def _cuda_varlen_kernel() -> tuple[object, dict, bool] | None:
    """PyTorch's FlashAttention varlen kernel, its causal option and whether it takes `enable_gqa`, read once here
    (not inside the traced forward). Its keywords differ between releases (torch 2.11 takes no `enable_gqa`; early
    ones had `is_causal` instead of `window_size`). None where there is no causal kernel (torch before 2.10;
    requirements.txt allows older): packed rows then take the exact padded path, slower, with a warning."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        if torch.cuda.is_available():
            warnings.warn(f"torch {torch.__version__} has no torch.nn.attention.varlen: packed rows use the exact "
                          "padded attention instead (slower). Install flash-attn or a newer torch for the varlen "
                          "kernel.", stacklevel=2)
        return None
    accepts = inspect.signature(varlen_attn).parameters
    if "window_size" in accepts:
        return varlen_attn, {"window_size": (-1, 0)}, "enable_gqa" in accepts
    if "is_causal" in accepts:
        return varlen_attn, {"is_causal": True}, "enable_gqa" in accepts
    return None  # a release with neither cannot be made causal: stay exact with the padded path


CUDA_VARLEN = _cuda_varlen_kernel()


def _cuda_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                           max_q: int, max_k: int, scaling: float | None) -> torch.Tensor:
    """The kernel, causal; where a sequence has more keys than queries, its queries are its last tokens
    (FlashAttention aligns the causal mask bottom-right).

    Keys and values keep their own, fewer heads (GQA): FlashAttention-2's varlen kernel, forward and backward, lets
    each serve its group of query heads. Releases before `enable_gqa` (torch 2.10, 2.11) pass them to the kernel
    unchecked; later ones want the flag. Repeating them to every query head instead copied 7 x the 7B's keys and
    values in every layer, a share of label scoring's GPU time worth saving (measured in
    results/benchmarks/h200_7b_eval_liger_512.json)."""
    varlen_attn, causal, takes_gqa = CUDA_VARLEN
    dtype = q.dtype
    if dtype not in (torch.float16, torch.bfloat16):  # fp32 master weights under autocast; the kernel is 16-bit only
        half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
        q, k, v = q.to(half), k.to(half), v.to(half)
    options = dict(causal)
    if takes_gqa and k.shape[1] != q.shape[1]:
        options["enable_gqa"] = True
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, **options).to(dtype)


def _boundaries_from_positions(position_ids: torch.Tensor) -> torch.Tensor | None:
    starts = (position_ids == 0).nonzero().flatten()
    if len(starts) < 2:
        return None
    return torch.cat([starts, starts.new_tensor([len(position_ids)])])


def _padded_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                             max_q: int, max_k: int, scaling: float | None) -> torch.Tensor:
    """Exact varlen attention from sdpa: scatter each sequence into its own right-padded row, attend causally, the
    queries being each sequence's last keys (as in the kernel).

    Right padding needs no mask when queries and keys are the same tokens (training passes one `cu` for both): under
    a causal mask a real token only sees earlier positions, all real. Otherwise query i of a sequence sees key j where
    j <= i + (its keys - its queries), which never reaches a padding key either. Every size comes from shapes and the
    maxima, none from reading tensors back, so a compiled layer keeps one graph.
    """
    def to_rows(x: torch.Tensor, cu: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lengths, tokens = cu.diff().long(), x.shape[0]
        row = torch.repeat_interleave(torch.arange(len(lengths), device=x.device), lengths, output_size=tokens)
        col = torch.arange(tokens, device=x.device) - cu[:-1].long().repeat_interleave(lengths, output_size=tokens)
        rows = x.new_zeros(len(lengths), width, *x.shape[1:])
        rows[row, col] = x
        return rows.transpose(1, 2), row, col  # (sequences, heads, length, dim)

    (q_rows, row, col), (k_rows, _, _), (v_rows, _, _) = (to_rows(q, cu_q, max_q), to_rows(k, cu_k, max_k),
                                                          to_rows(v, cu_k, max_k))
    mask = None
    if cu_k is not cu_q:
        offset = (cu_k.diff() - cu_q.diff()).long().to(q.device)
        reach = torch.arange(max_k, device=q.device) - torch.arange(max_q, device=q.device)[:, None]
        mask = (reach <= offset[:, None, None])[:, None]
    out = F.scaled_dot_product_attention(q_rows, k_rows, v_rows, attn_mask=mask, is_causal=mask is None, scale=scaling,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)[row, col]
