"""Label scoring over packed rows (`finetune.predict.score_labels`, method "packed"): a batch's articles, each followed
by its answer tree, laid end to end in one row with no padding at all, attending through the varlen kernel.

Each article's tokens see the opening's keys (the prompt tokens every article shares, computed once for the whole
evaluation, never copied per article) and their own, causally; each answer branch sees that and its own earlier
tokens. In varlen terms an article is five sequences: its trunk and one per label's branch, whose keys are gathered
from [opening; packed row] by index. The trunk is the article followed by the answers' stem (`AnswerTree`), run as one
causal sequence. No 4D mask exists, so the flash kernel runs, and no padding token is computed.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from finetune.attention import CUDA_VARLEN, _cuda_varlen_attention, _padded_causal_attention

PACKED = "packed_answers"


@dataclass
class PackedBatch:
    """One packed row and what the attention needs to keep its sequences apart."""

    ids: torch.Tensor  # (1, tokens): per article, its tokens after the opening, then the answer tree's tokens
    positions: torch.Tensor  # (1, tokens): as if each article followed the opening alone; branches side by side
    cu_q: torch.Tensor  # (sequences + 1,) int32: where each sequence's queries start in the row
    cu_k: torch.Tensor  # (sequences + 1,) int32: where each sequence's keys start in `key_index`
    max_q: int
    max_k: int
    key_index: torch.Tensor  # (keys,): each sequence's keys, as rows of [opening keys; the row's keys]
    tail_index: torch.Tensor  # (articles * tail,): the row positions whose logits scoring reads
    tail: int  # per article: the last prompt token and every tree token


def pack_batch(articles: list[list[int]], tree, opening_length: int, device) -> PackedBatch:
    """The packed row for `articles` (prompt tokens after the opening, at least one each) and the answer
    `tree` (`finetune.predict.AnswerTree`): index arithmetic in numpy, one copy to the device."""
    n_tree, depth = len(tree.tokens), np.asarray(tree.depth)
    n_stem = n_tree - len(depth)
    branch_lengths = np.bincount(tree.branch)  # branches are contiguous in the tree's tokens, label by label
    branch_starts = n_stem + np.concatenate([[0], np.cumsum(branch_lengths)[:-1]])
    length = np.array([len(a) for a in articles])
    row_start = np.concatenate([[0], np.cumsum(length + n_tree)[:-1]])
    trunk = length + n_stem

    within = np.arange((length + n_tree).sum()) - np.repeat(row_start, length + n_tree)
    trunk_of = np.repeat(trunk, length + n_tree)
    in_branch = within >= trunk_of
    branch_depth = depth[np.clip(within - trunk_of, 0, len(depth) - 1)]
    positions = opening_length + np.where(in_branch, trunk_of + branch_depth, within)

    # Per article: the trunk, then each branch; as query counts and as key segments (start, length) in
    # [opening; row], keys = opening + trunk (+ the branch's own tokens).
    q_lengths = np.column_stack([trunk, np.tile(branch_lengths, (len(articles), 1))])
    trunk_keys = opening_length + row_start
    starts = np.column_stack([np.zeros_like(trunk), trunk_keys]
                             + [c for s in branch_starts for c in (np.zeros_like(trunk), trunk_keys,
                                                                   trunk_keys + length + s)])
    lengths = np.column_stack([np.full_like(trunk, opening_length), trunk]
                              + [c for b in branch_lengths for c in (np.full_like(trunk, opening_length), trunk,
                                                                     np.full_like(trunk, b))])
    k_lengths = np.column_stack([opening_length + trunk] + [opening_length + trunk + b for b in branch_lengths])
    starts, lengths = starts.ravel(), lengths.ravel()
    key_index = np.arange(lengths.sum()) + np.repeat(starts - _exclusive_cumsum(lengths), lengths)
    tail = row_start + length - 1  # the last prompt token, then every tree token
    tail_index = (tail[:, None] + np.arange(n_tree + 1)).ravel()

    def tensor(x, dtype=torch.long) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=dtype)

    ids = [token for article in articles for token in article + tree.tokens]
    return PackedBatch(ids=torch.tensor([ids], device=device), positions=tensor(positions[None]),
                       cu_q=tensor(np.concatenate([[0], np.cumsum(q_lengths)]), torch.int32),
                       cu_k=tensor(np.concatenate([[0], np.cumsum(k_lengths)]), torch.int32),
                       max_q=int(q_lengths.max()), max_k=int(k_lengths.max()), key_index=tensor(key_index),
                       tail_index=tensor(tail_index), tail=n_tree + 1)


def _exclusive_cumsum(x: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(x)[:-1]])


def opening_keys(opening_cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per layer, the opening's keys and values as (tokens, kv heads, dim), the varlen layout."""
    if opening_cache is None:
        return None
    return [(layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)) for layer in opening_cache.layers]


def packed_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None,
                             packed: PackedBatch | None = None, opening_kv: list | None = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """Attention of one packed row (see `PackedBatch`): the varlen kernel on CUDA, its exact padded equivalent
    elsewhere (the CPU tests check the layout through it)."""
    if packed is None:
        raise ValueError(f"attn_implementation {PACKED!r} scores packed rows only: call finetune.predict.score_labels")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (tokens, heads, dim)
    if opening_kv is not None:
        opening_k, opening_v = opening_kv[module.layer_idx]
        k, v = torch.cat([opening_k, k]), torch.cat([opening_v, v])
    k, v = k[packed.key_index], v[packed.key_index]
    attend = _cuda_varlen_attention if q.is_cuda and CUDA_VARLEN is not None else _padded_causal_attention
    out = attend(q, k, v, packed.cu_q, packed.cu_k, packed.max_q, packed.max_k, scaling)
    return out.unsqueeze(0), None


@contextmanager
def packed_attention(model):
    """The model with `packed_attention_forward` as its attention for the duration (its own one afterwards)."""
    AttentionInterface.register(PACKED, packed_attention_forward)
    AttentionMaskInterface.register(PACKED, sdpa_mask)  # never called: packed calls pass their (empty) masks
    previous = model.config._attn_implementation
    model.set_attn_implementation(PACKED)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def packed_logits(model, batch: PackedBatch, opening_kv: list | None) -> torch.Tensor:
    """(articles, tail, vocab) float logits at the positions scoring reads, from one forward over the packed row."""
    no_masks = dict.fromkeys(model.config.layer_types)  # the attention keeps the sequences apart; skip mask building
    logits = model(input_ids=batch.ids, position_ids=batch.positions, attention_mask=no_masks, use_cache=False,
                   logits_to_keep=batch.tail_index, packed=batch, opening_kv=opening_kv).logits
    return logits[0].float().unflatten(0, (-1, batch.tail))
