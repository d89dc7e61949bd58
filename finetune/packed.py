"""Label scoring over packed rows (`finetune.predict.score_labels`, method "packed"): a batch's articles, each followed
by its answer tree, laid out in one row with no padding at all.

Each article's tokens see the opening's keys (the prompt tokens every article shares, computed once for the whole
evaluation) and their own, causally; each answer branch sees that and its own earlier tokens. The row holds every
article's trunk (the article followed by the answers' stem, `AnswerTree`) first, then every article's branches. The
trunks attend through the varlen kernel, one causal sequence an article, over the opening's keys and their own. The
branches, a few tokens an article, attend over the same keys and their own branch's tokens: on CUDA in a Triton kernel
of their own (`finetune.branch_attention_kernel`), elsewhere in one dense call under the tree's mask. As varlen
sequences of their own (one a label, 1-3 queries each) they had cost the kernel a 128-query tile per head each, four
of every five tiles of a batch (the attention profile of results/benchmarks/h200_7b_eval_rehearsal.json). On CUDA
both kernels read each sequence's keys where they lie; elsewhere they are gathered from [opening; row] by index.

Generation's check (`finetune.generation`) packs the trunks alone and keeps their keys; the one branch each article's
greedy choices took then runs (`pack_taken`), each branch a varlen sequence over its opening, its trunk and itself:
two or four tokens an article where the whole tree runs ten. They run after a later batch's trunks, in its forward
(`with_riders`), or in a row of their own.

Decoding's prefill (`finetune.decode.GreedyDecoder`) packs its batch's prompts the same way, without the tree, and
writes each token's key and value into the decoder's static cache as it goes (`PackedPrefill`): left-padded, a batch
of 512 ran the longest prompt's length in every row (results/benchmarks/h200_7b_eval_taught.json).
"""

from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from finetune.attention import (CUDA_VARLEN, _cuda_varlen_attention, _padded_causal_attention,
                                attention_implementation, masked_sdpa, without_cudnn_attention)
from finetune.opening import exclusive_cumsum, opening_sequences
from finetune.speedups import queued_copy

PACKED = "packed_answers"
PREFILL = "packed_prefill"
# The eval benchmark turns each kernel off to time what it saves against what it replaced, in the same run
# (`attention_kernels`): the branches' kernel against one dense masked call, the grouped varlen kernel against
# FlashAttention's varlen kernel, and the grouped kernel reading its keys in place against it over keys gathered first.
BRANCH_KERNEL = True
GROUPED_VARLEN = True
KEYS_IN_PLACE = True


@dataclass
class PackedBatch:
    """One packed row and what the attention needs to keep its articles and answers apart. Key indices count rows of
    [opening keys; the row's keys]."""

    ids: torch.Tensor  # (1, tokens): every article's trunk (its tokens after the opening, then the stem), then
    # every article's branch tokens
    positions: torch.Tensor  # (1, tokens): as if each article followed the opening alone; branches side by side
    trunk_tokens: int  # the row's trunk tokens, which come first
    cu_q: torch.Tensor  # (articles + 1,) int32: where each trunk's queries start in the row
    cu_k: torch.Tensor  # (articles + 1,) int32: where each trunk's keys start in `key_index`
    max_q: int
    max_k: int
    key_index: torch.Tensor  # (keys,): each trunk's keys: the opening, then the trunk
    branch_key_index: torch.Tensor  # (articles, width): an article's branches' keys: opening, trunk, branches
    branch_mask: torch.Tensor  # (articles, branch tokens, width) bool: which of those keys each branch token sees
    branch_sees: torch.Tensor  # (branch tokens, branch tokens) bool: which of its article's branch tokens each sees
    tail_index: torch.Tensor  # (articles * tail,): the row positions whose logits scoring reads
    tail: int  # per article: the last prompt token and every tree token in the row
    opening_length: int
    trunk_lengths: np.ndarray  # (articles,), on the host: `pack_taken` lays its branches out from them
    kept_keys: list | None = None  # packed without branches: per layer, the row's keys and values, as computed
    riders: "PackedBranches | None" = None  # an earlier batch's taken branches, after the trunks (`with_riders`)


def pack_batch(articles: list[list[int]], tree, opening_length: int, device, with_branches: bool = True) -> PackedBatch:
    """The packed row for `articles` (prompt tokens after the opening, at least one each) and the answer
    `tree` (`finetune.predict.AnswerTree`): index arithmetic in numpy, one copy to the device. Without branches the
    row ends with the trunks, and the forward keeps their keys for the branches `pack_taken` runs after it."""
    n_stem = len(tree.tokens) - len(tree.branch)
    n_branch = len(tree.branch) if with_branches else 0
    depth, sees = np.asarray(tree.depth)[:n_branch], tree.sees()[:n_branch, :n_branch]
    length = np.array([len(a) for a in articles])
    trunk = length + n_stem
    trunk_start = exclusive_cumsum(trunk)
    branch_start = trunk.sum() + np.arange(len(articles)) * n_branch
    positions = opening_length + np.concatenate([np.arange(trunk.sum()) - np.repeat(trunk_start, trunk),
                                                 (trunk[:, None] + depth).ravel()])

    cu_q, cu_k, key_index = opening_sequences(trunk, opening_length)

    # The branches' keys, one row an article: the opening, the trunk (padded to the longest: padding points at key
    # 0 and is masked), the article's branch tokens. A branch token sees the opening, its trunk and the earlier
    # tokens of its own branch.
    width = trunk.max()
    trunk_keys = opening_length + trunk_start[:, None] + np.arange(width)
    valid = np.arange(width) < trunk[:, None]
    branch_key_index = np.concatenate([np.broadcast_to(np.arange(opening_length), (len(articles), opening_length)),
                                       np.where(valid, trunk_keys, 0),
                                       opening_length + branch_start[:, None] + np.arange(n_branch)], axis=1)
    branch_mask = np.concatenate([np.ones((len(articles), n_branch, opening_length), bool),
                                  np.broadcast_to(valid[:, None, :], (len(articles), n_branch, width)),
                                  np.broadcast_to(sees, (len(articles), n_branch, n_branch))], axis=2)

    # Per article: the last prompt token and the stem (in its trunk), then its branch tokens.
    tail_index = np.column_stack([trunk_start[:, None] + length[:, None] - 1 + np.arange(n_stem + 1),
                                  branch_start[:, None] + np.arange(n_branch)]).ravel()

    stem, branches = tree.tokens[:n_stem], tree.tokens[n_stem:n_stem + n_branch]
    ids = [token for article in articles for token in article + stem] + branches * len(articles)
    return PackedBatch(ids=_on(device, np.array([ids])), positions=_on(device, positions[None]),
                       trunk_tokens=int(trunk.sum()), cu_q=_on(device, cu_q, torch.int32),
                       cu_k=_on(device, cu_k, torch.int32), max_q=int(width), max_k=int(opening_length + width),
                       key_index=_on(device, key_index), branch_key_index=_on(device, branch_key_index),
                       branch_mask=_on(device, branch_mask, torch.bool),
                       branch_sees=_on(device, sees, torch.bool), tail_index=_on(device, tail_index),
                       tail=n_stem + n_branch + 1, opening_length=opening_length, trunk_lengths=trunk,
                       kept_keys=None if with_branches else [])


@dataclass
class PackedBranches:
    """Branch tokens run after a pass packed without branches (`pack_taken`), in one row: each article's tokens one
    varlen sequence, whose keys are its opening, its trunk (from the keys that pass kept) and then its own. Key
    indices count rows of [opening keys; the kept row's keys; this row's keys]."""

    ids: torch.Tensor  # (1, tokens)
    positions: torch.Tensor  # (1, tokens): each token's after its article's trunk
    cu_q: torch.Tensor  # (articles + 1,) int32
    cu_k: torch.Tensor  # (articles + 1,) int32
    max_q: int
    max_k: int
    key_index: torch.Tensor  # (keys,)
    kept_keys: list  # per layer, the trunks' keys and values their pass kept (not its riders')
    kept_starts: torch.Tensor  # (articles,) int32: where each one's trunk starts in the kept row
    kept_lengths: torch.Tensor  # (articles,) int32: its trunk's tokens
    opening_kv: list | None  # per layer, the opening's keys and values the trunks' pass saw


def pack_taken(trunks: PackedBatch, which: np.ndarray, branches: list[list[int]], device,
               opening_kv: list | None = None) -> PackedBranches:
    """The tokens `branches[i]` (at least one each) after the trunk of article `which[i]` of `trunks`, a batch
    packed without branches whose forward has run after the opening `opening_kv`."""
    opening, lengths = trunks.opening_length, np.array([len(b) for b in branches])
    trunk, trunk_start = trunks.trunk_lengths[which], exclusive_cumsum(trunks.trunk_lengths)[which]  # in the kept row
    cu_q = np.concatenate([[0], np.cumsum(lengths)])
    # per article three spans of keys: the opening, its trunk in the kept row, its own tokens after the kept ones
    starts = np.column_stack([np.zeros_like(trunk), opening + trunk_start,
                              opening + trunks.trunk_tokens + cu_q[:-1]]).ravel()
    spans = np.column_stack([np.full_like(trunk, opening), trunk, lengths]).ravel()
    key_index = np.arange(spans.sum()) + np.repeat(starts - exclusive_cumsum(spans), spans)
    within = np.arange(lengths.sum()) - np.repeat(cu_q[:-1], lengths)
    keys = opening + trunk + lengths
    return PackedBranches(ids=_on(device, np.array([[t for b in branches for t in b]])),
                          positions=_on(device, (opening + np.repeat(trunk, lengths) + within)[None]),
                          cu_q=_on(device, cu_q, torch.int32), cu_k=_on(device, np.concatenate([[0], np.cumsum(keys)]),
                                                                        torch.int32),
                          max_q=int(lengths.max()), max_k=int(keys.max()), key_index=_on(device, key_index),
                          kept_keys=[(k[:trunks.trunk_tokens], v[:trunks.trunk_tokens]) for k, v in trunks.kept_keys],
                          kept_starts=_on(device, trunk_start, torch.int32),
                          kept_lengths=_on(device, trunk, torch.int32), opening_kv=opening_kv)


def with_riders(batch: PackedBatch, riders: PackedBranches) -> PackedBatch:
    """`batch`, packed without branches, with an earlier batch's taken branches (`pack_taken`) after its trunks in
    the same row: they run in its forward instead of one of their own, every layer over a few tokens an article."""
    if len(batch.ids[0]) != batch.trunk_tokens:
        raise ValueError("riders follow the trunks of a batch packed without branches")
    return replace(batch, ids=torch.cat([batch.ids, riders.ids], 1),
                   positions=torch.cat([batch.positions, riders.positions], 1), riders=riders)


@dataclass
class PackedPrefill:
    """A decoding batch's prompts (after the opening) in one packed row, and where each token's key and value go in
    the decoder's static cache: its article's row, at a slot that right-aligns every prompt to end at `end`, so that
    each row's new tokens then take the same slots. Key indices count rows of [opening keys; the row's keys]."""

    ids: torch.Tensor  # (1, tokens)
    positions: torch.Tensor  # (1, tokens): as if each article followed the opening alone
    cu_q: torch.Tensor  # (articles + 1,) int32
    cu_k: torch.Tensor  # (articles + 1,) int32
    max_q: int
    max_k: int
    key_index: torch.Tensor  # (keys,): each article's keys: the opening, then its own
    last_index: torch.Tensor  # (articles,): each prompt's last token, whose logits give the first new token
    cache: object  # the decoder's StaticCache
    cache_rows: torch.Tensor  # (tokens,)
    cache_slots: torch.Tensor  # (tokens,)
    end: int  # the cache slot after every prompt


def pack_prefill(articles: list[list[int]], opening_length: int, cache, device) -> PackedPrefill:
    """The packed prefill of `articles` (prompt tokens after the opening, at least one each) into `cache`."""
    length = np.array([len(a) for a in articles])
    cu_q, cu_k, key_index = opening_sequences(length, opening_length)
    end = opening_length + int(length.max())
    rows = np.repeat(np.arange(len(articles)), length)
    within = np.arange(length.sum()) - np.repeat(cu_q[:-1], length)  # each token's place in its article
    slots = end - np.repeat(length, length) + within
    return PackedPrefill(ids=_on(device, np.array([[t for a in articles for t in a]])),
                         positions=_on(device, opening_length + within[None]), cu_q=_on(device, cu_q, torch.int32),
                         cu_k=_on(device, cu_k, torch.int32), max_q=int(length.max()), max_k=end,
                         key_index=_on(device, key_index), last_index=_on(device, cu_q[1:] - 1), cache=cache,
                         cache_rows=_on(device, rows), cache_slots=_on(device, slots), end=end)


def _on(device, x: np.ndarray, dtype=torch.long) -> torch.Tensor:
    """Index arithmetic made in numpy, on `device` in one queued copy (`queued_copy`), so that packing the next batch
    never waits for this batch's forward (tests/test_predict.py). Against the synchronous copies before it, label
    scoring's speed did not change on an H100 (results/benchmarks/h100_7b_eval_queued_copies_*.json)."""
    return queued_copy(torch.from_numpy(np.ascontiguousarray(x)).to(dtype), device)


def opening_keys(opening_cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per layer, the opening's keys and values as (tokens, kv heads, dim), the varlen layout."""
    if opening_cache is None:
        return None
    return [(layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)) for layer in opening_cache.layers]


# Both packed attentions run uncompiled inside a compiled layer: they read the layer's index (the opening's keys, the
# cache's layer), so each layer would compile one of its own, past torch's limit of 8 a function.
@torch.compiler.disable
def packed_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None,
                             packed: PackedBatch | None = None, opening_kv: list | None = None,
                             taken: PackedBranches | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention of one packed row (see `PackedBatch`): on CUDA the trunks through the varlen kernel and the branches
    through `branch_attention`; elsewhere, and for a float32 model, through their exact equivalents
    (`_padded_causal_attention`, `_branch_attention`; the CPU tests check the layout through them). A row of `taken`
    branches (`PackedBranches`) attends as trunks do, over the keys its trunks' pass kept and its own; so do a
    batch's `riders`, after its trunks."""
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (tokens, heads, dim)
    if taken is not None:
        return _attend_taken(q, k, v, taken, module.layer_idx, scaling).unsqueeze(0), None
    if packed is None:
        raise ValueError(f"attn_implementation {PACKED!r} scores packed rows only: call finetune.predict.score_labels")
    opening = opening_kv[module.layer_idx] if opening_kv is not None else None
    if packed.kept_keys is not None:
        packed.kept_keys.append((k, v))
    n = packed.trunk_tokens
    if n == len(q):  # trunks alone: their attention is the layer's
        return _attend_sequences(q, k, v, packed, scaling, opening).unsqueeze(0), None
    # One output, each part written into its rows: concatenating the parts copied the whole row again, in every layer.
    out = q.new_empty(q.shape)
    _attend_sequences(q[:n], k, v, packed, scaling, opening, out=out[:n])
    if packed.riders is not None:
        _attend_taken(q[n:], k[n:], v[n:], packed.riders, module.layer_idx, scaling, out=out[n:])
    elif _on_kernels(q) and BRANCH_KERNEL:
        from finetune.branch_attention_kernel import branch_attention  # triton: imported where it runs
        branch_attention(q[n:], k, v, k[n:], v[n:], packed.cu_q, packed.branch_sees, scaling or q.shape[-1] ** -0.5,
                         opening, out=out[n:])
    else:
        sources = [x for x in (opening, (k, v)) if x is not None]
        keys, values = (_gathered(sources, i, packed.branch_key_index) for i in (0, 1))
        out[n:] = _branch_attention(q[n:], keys, values, packed.branch_mask, scaling)
    return out.unsqueeze(0), None


@torch.compiler.disable
def prefill_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, scaling: float | None = None,
                              prefill: PackedPrefill | None = None, opening_kv: list | None = None,
                              **kwargs) -> tuple[torch.Tensor, None]:
    """Attention of a packed prefill (see `PackedPrefill`): each token's key and value into the decoder's cache, then
    each article causally over the opening and itself, as the trunks of label scoring."""
    if prefill is None:
        raise ValueError(f"attn_implementation {PREFILL!r} runs packed prefills only: call GreedyDecoder.decode")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (tokens, heads, dim)
    layer = prefill.cache.layers[module.layer_idx]
    layer.keys[prefill.cache_rows, :, prefill.cache_slots] = k
    layer.values[prefill.cache_rows, :, prefill.cache_slots] = v
    opening = opening_kv[module.layer_idx] if opening_kv is not None else None
    return _attend_sequences(q, k, v, prefill, scaling, opening).unsqueeze(0), None


def _attend_taken(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, taken: PackedBranches, layer: int,
                  scaling: float | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Taken branches' queries (`q`, their keys `k`, `v`) over their opening, their trunks' kept keys and their own."""
    opening = taken.opening_kv[layer] if taken.opening_kv is not None else None
    kept = (*taken.kept_keys[layer], taken.kept_starts, taken.kept_lengths)
    return _attend_sequences(q, k, v, taken, scaling, opening, kept, out)


def _on_kernels(q: torch.Tensor) -> bool:
    """Whether attention runs on the CUDA kernels: in 16 bits on CUDA. A float32 model (loaded so for exact
    comparisons) takes the exact paths, as everything off CUDA does: the varlen kernel would round it to bf16."""
    return q.is_cuda and CUDA_VARLEN is not None and q.dtype in (torch.float16, torch.bfloat16)


def _attend_sequences(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, scaling: float | None,
                      opening: tuple | None = None, kept: tuple | None = None, out: torch.Tensor | None = None):
    """The packed sequences of `layout` (its cu_q, cu_k, max_q, max_k, key_index): each one's own keys are `k`'s at
    its queries' rows, after the `opening`'s (keys, values) and an earlier forward's `kept` (keys, values, starts,
    lengths) where given. On CUDA (`_on_kernels`) the grouped varlen kernel reads them where they lie; else they are
    gathered into one tensor in key_index order (which counts rows of [opening; kept; k]) for FlashAttention's kernel
    (where `attention_kernels` asks for it) or its exact padded equivalent. Written into `out` where given."""
    scale = scaling or q.shape[-1] ** -0.5
    grouped = _on_kernels(q) and GROUPED_VARLEN
    if grouped:
        from finetune.grouped_varlen_kernel import grouped_varlen_attention  # triton: imported where it runs
        if KEYS_IN_PLACE:
            return grouped_varlen_attention(q, k, v, layout.cu_q, layout.cu_q, layout.max_q, scale, opening, kept, out)
    sources = [x[:2] for x in (opening, kept) if x is not None] + [(k, v)]
    keys, values = (_gathered(sources, i, layout.key_index) for i in (0, 1))
    if grouped:  # over keys gathered first: the benchmark's comparison
        return grouped_varlen_attention(q, keys, values, layout.cu_q, layout.cu_k, layout.max_q, scale, out=out)
    attend = _cuda_varlen_attention if _on_kernels(q) else _padded_causal_attention
    attended = attend(q, keys, values, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k, scaling)
    return attended if out is None else out.copy_(attended)


def _gathered(sources: list[tuple[torch.Tensor, torch.Tensor]], which: int, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` of the keys (`which` 0) or the values (1) of `sources`, one after another."""
    return torch.cat([source[which] for source in sources])[index]


def _branch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scaling: float | None) -> torch.Tensor:
    """Every article's branch tokens attending to their keys (`PackedBatch.branch_key_index`) under `mask`, in one
    sdpa call. q: (articles * branch tokens, heads, dim); k, v: (articles, width, kv heads, dim). The query heads
    that share a key head are laid along the queries (as transformers' repeat_kv pairs them: key head j serves query
    heads j * group to (j + 1) * group - 1), so the keys are neither copied per head nor need sdpa's GQA option."""
    articles, width, kv_heads, dim = k.shape
    heads, n_branch = q.shape[1], mask.shape[1]
    group = heads // kv_heads
    q = q.reshape(articles, n_branch, kv_heads, group, dim).permute(0, 2, 3, 1, 4).reshape(articles, kv_heads, -1, dim)
    out = masked_sdpa(q, k.transpose(1, 2), v.transpose(1, 2), mask.repeat(1, group, 1)[:, None], scaling=scaling)
    return out.view(articles, kv_heads, group, n_branch, dim).permute(0, 3, 1, 2, 4).reshape(-1, heads, dim)


@contextmanager
def attention_kernels(branch_kernel: bool | None = None, grouped_varlen: bool | None = None,
                      keys_in_place: bool | None = None):
    """The kernels packed rows attend through on CUDA, for the duration: the branches' own kernel or one dense masked
    call (`_branch_attention`), the grouped varlen kernel (`finetune.grouped_varlen_kernel`) or FlashAttention's, the
    grouped kernel reading each sequence's keys where they lie or over keys gathered into one tensor first. A switch
    not given stays as it is, so that blocks nest."""
    global BRANCH_KERNEL, GROUPED_VARLEN, KEYS_IN_PLACE
    before = BRANCH_KERNEL, GROUPED_VARLEN, KEYS_IN_PLACE
    BRANCH_KERNEL, GROUPED_VARLEN, KEYS_IN_PLACE = (old if new is None else new for old, new in
                                                    zip(before, (branch_kernel, grouped_varlen, keys_in_place)))
    try:
        yield
    finally:
        BRANCH_KERNEL, GROUPED_VARLEN, KEYS_IN_PLACE = before


@contextmanager
def packed_attention(model, name: str = PACKED):
    """The model with packed attention (`packed_attention_forward`, or `prefill_attention_forward` by its name) for
    the duration (its own one afterwards)."""
    AttentionInterface.register(name, {PACKED: packed_attention_forward, PREFILL: prefill_attention_forward}[name])
    AttentionMaskInterface.register(name, sdpa_mask)  # never called: packed calls pass their (empty) masks
    with attention_implementation(model, name):
        yield


def packed_logits(model, batch: PackedBatch, opening_kv: list | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(articles, tail, vocab) logits at the positions scoring reads, from one forward over the packed row; and the
    (tokens, vocab) logits of every token of its riders (None without)."""
    no_masks = dict.fromkeys(model.config.layer_types)  # the attention keeps the sequences apart; skip mask building
    read = batch.tail_index
    if batch.riders is not None:
        read = torch.cat([read, torch.arange(batch.trunk_tokens, len(batch.ids[0]), device=read.device)])
    logits = model(input_ids=batch.ids, position_ids=batch.positions, attention_mask=no_masks, use_cache=False,
                   logits_to_keep=read, read_positions=read, packed=batch, opening_kv=opening_kv).logits[0]
    tails = len(batch.tail_index)
    return logits[:tails].unflatten(0, (-1, batch.tail)), logits[tails:] if batch.riders is not None else None


def taken_logits(model, taken: PackedBranches) -> torch.Tensor:
    """(tokens, vocab) logits of every token of a row of taken branches in a forward of its own. The row runs under
    the packed attention whenever it comes, its trunks' pass over or not."""
    with without_cudnn_attention(), packed_attention(model):
        return model(input_ids=taken.ids, position_ids=taken.positions, use_cache=False, taken=taken,
                     attention_mask=dict.fromkeys(model.config.layer_types)).logits[0]
