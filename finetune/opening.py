"""The opening every prompt shares (system turn and instruction, 41 of ~103 Qwen2.5 tokens an AG News article), run
once per micro-batch in training, as evaluation runs it once for all articles (`finetune.predict.shared_opening`).

A packed micro-batch becomes [opening; each article's tokens after the opening]: every article attends to the
opening's keys and its own, causally, at the positions it had with its own copy of the opening. The opening's hidden
states depend on nothing after them, so the loss and its gradients are those of the unshared batch (the opening's
gradients arrive summed over the articles instead of one copy each; tests/test_opening.py compares both), for the
FLOPs of ~40% fewer tokens. The attention gathers each article's keys as [opening; own] (`opening_sequences`).
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from data_prep.task import LABELS, build_messages
from finetune.throughput import article_lengths_by_row

# The batch key that tells the trainer how many tokens the shared opening did not run (finetune.train counts them
# among the articles' tokens, so that tokens/s means the same articles' tokens for every configuration).
TOKENS_SAVED = "opening_tokens_saved"


def shared_prefix_length(rows: list[list[int]]) -> int:
    """The tokens all rows start with, one short of the shortest row, so that every row keeps a token to run: the
    longest common prefix, that of the lexicographic extremes."""
    return min(matching_length(min(rows), max(rows)), min(map(len, rows)) - 1)


def matching_length(a: list[int], b: list[int]) -> int:
    """How many tokens `a` and `b` start with alike."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def opening_sequences(length: np.ndarray, opening_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cu_q, cu_k and key_index of sequences of `length` tokens packed in one row, each one's keys the opening's,
    then its own (its queries are its last keys: the kernel aligns them bottom-right). Key indices count rows of
    [opening keys; the row's keys]."""
    starts = np.column_stack([np.zeros_like(length), opening_length + exclusive_cumsum(length)]).ravel()
    spans = np.column_stack([np.full_like(length, opening_length), length]).ravel()
    key_index = np.arange(spans.sum()) + np.repeat(starts - exclusive_cumsum(spans), spans)
    return (np.concatenate([[0], np.cumsum(length)]), np.concatenate([[0], np.cumsum(opening_length + length)]),
            key_index)


def exclusive_cumsum(x: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(x)[:-1]])


def planned_row_tokens(config, tokenizer, texts: list[str]) -> float | None:
    """The tokens a packed row runs, for the memory plan of `config` (a RunConfig): `row_tokens_run` where training
    shares the opening, else None (the plan then counts `max_length`)."""
    return row_tokens_run(tokenizer, texts, config.max_length) if config.shares_opening else None


def row_tokens_run(tokenizer, texts: list[str], max_length: int, sample: int = 256) -> float:
    """The tokens a packed row of `max_length` runs once its articles share their opening, for the memory plan
    (`finetune.plan.plan_training`, before TRL prepares the data): `max_length` less the openings' share of the chat
    examples of the first `sample` texts (each given the first label's answer: their lengths differ by a token). The
    one copy a micro-batch keeps is left out: 41 tokens beside the 7B recipe's thousands."""
    examples = [tokenizer.apply_chat_template(build_messages(text, LABELS[0]), tokenize=True, return_dict=False)
                for text in texts[:sample]]
    return tokens_run_per_row(max_length, shared_prefix_length(examples), sum(map(len, examples)) / len(examples))


def tokens_run_per_row(max_length: int, opening_length: int, mean_article_tokens: float) -> float:
    """The tokens a packed row of `max_length` runs once its articles' openings are dropped."""
    return max_length * (1 - opening_length / mean_article_tokens)


def training_opening(train_dataset) -> list[int]:
    """The tokens every article of TRL's prepared dataset starts with (`shared_prefix_length`)."""
    starts = []
    for ids, lengths in zip(train_dataset["input_ids"], article_lengths_by_row(train_dataset)):
        starts += [ids[o:o + n] for o, n in zip(exclusive_cumsum(lengths), lengths)]
    return starts[0][:shared_prefix_length(starts)]


@dataclass
class SharedOpeningCollator:
    """TRL's padding-free collator, then each micro-batch's articles laid out after one copy of `opening`.

    TRL builds its padding-free collator itself and takes no other, so `finetune.train` puts this one in its place
    on the trainer. The collator runs in the data-loader workers: the layout costs the training loop nothing."""

    collate: Callable[[list[dict]], dict]
    opening: list[int]

    def __call__(self, examples: list[dict]) -> dict:
        return share_opening(self.collate(examples), self.opening)


def share_opening(batch: dict, opening: list[int]) -> dict:
    """A padding-free batch (`cu_seq_lens_q` marks its articles, one row) with every article's copy of `opening`
    dropped and one copy put first; `cu_seq_lens_k`, `max_length_k` and `opening_key_index` tell the attention
    (`finetune.attention.varlen_attention_forward`) which keys each article's queries see."""
    n = len(opening)
    ids, labels, positions = (batch[key][0].numpy() for key in ("input_ids", "labels", "position_ids"))
    cu = batch["cu_seq_lens_q"].numpy().astype(np.int64)
    starts, lengths = cu[:-1], np.diff(cu)
    opening_at = (starts[:, None] + np.arange(n)).ravel()
    if (lengths <= n).any() or (ids[opening_at].reshape(-1, n) != opening).any() or (labels[opening_at] != -100).any():
        raise ValueError(f"an article of this batch does not start with the shared opening ({n} tokens, the "
                         "system turn and instruction), has loss inside it or nothing after it; --share_opening false "
                         "trains without sharing it")
    kept = np.ones(len(ids), bool)
    kept[opening_at] = False
    tails = lengths - n
    cu_q, cu_k, key_index = opening_sequences(tails, n)
    return {
        "input_ids": torch.from_numpy(np.concatenate([opening, ids[kept]]))[None],
        "labels": torch.from_numpy(np.concatenate([np.full(n, -100), labels[kept]]))[None],
        "position_ids": torch.from_numpy(np.concatenate([np.arange(n), positions[kept]]))[None],
        # the opening is the first sequence, its own keys its first n
        "cu_seq_lens_q": torch.from_numpy(np.concatenate([[0], n + cu_q])).to(torch.int32),
        "cu_seq_lens_k": torch.from_numpy(np.concatenate([[0], n + cu_k])).to(torch.int32),
        "max_length_q": int(max(n, tails.max())),
        "max_length_k": int(n + tails.max()),
        "opening_key_index": torch.from_numpy(np.concatenate([np.arange(n), key_index])),
        TOKENS_SAVED: (len(tails) - 1) * n,
    }
