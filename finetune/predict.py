"""Predict AG News labels with a causal LM, two ways.

Label scoring (default) ranks the four possible answers by their log-probability after the prompt: no parse failure
is possible. Generation decodes greedily and parses the JSON, as the reference did, and counts what fails to parse.
"""

import copy
import json
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from data_prep.config import LABELS, build_messages, build_prompt_messages


@dataclass
class Predictions:
    """Per-article outputs of one evaluation pass, in input order."""

    labels: np.ndarray  # predicted class index, -1 where generation gave no usable answer
    batch_seconds: np.ndarray  # per article: wall time of the batch it was in (what a caller waits for)
    truncated: int  # articles whose text was cut to fit max_length
    label_logprobs: np.ndarray | None = None  # (articles, 4) full answer log-probabilities, label scoring only
    failures: dict[str, list[int]] = field(default_factory=dict)  # failure kind -> article indices, generation only
    answers: list[str] = field(default_factory=list)  # raw generated text, generation only


def encode_prompts(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_prompt_tokens: int) -> tuple[list[list[int]], int]:
    """Chat-template token ids per article, ending with the assistant header. An article too long for
    `max_prompt_tokens` loses the end of its text, never the instruction or the answer slot."""
    rendered = tokenizer.apply_chat_template([build_prompt_messages(t) for t in texts], add_generation_prompt=True,
                                             tokenize=False)
    # One batched call: the fast tokenizer spreads it over threads (per-article calls cost seconds on 7,600 articles).
    encoded = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    truncated = 0
    for i, ids in enumerate(encoded):
        if len(ids) > max_prompt_tokens:
            encoded[i] = _shortened_prompt(tokenizer, texts[i], len(ids) - max_prompt_tokens, max_prompt_tokens)
            truncated += 1
    return encoded, truncated


def _shortened_prompt(tokenizer: PreTrainedTokenizerBase, text: str, excess: int, limit: int) -> list[int]:
    """The prompt with the article's tail cut until the whole prompt fits `limit` (a decode and re-encode can
    shift a token at the cut, hence the loop)."""
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = len(text_ids) - excess
    while True:
        ids = _render(tokenizer, build_prompt_messages(tokenizer.decode(text_ids[:max(keep, 0)])), generation_prompt=True)
        if len(ids) <= limit or keep <= 0:
            return ids
        keep -= len(ids) - limit


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                              return_dict=False))


def answer_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Each label's answer tokens as training sees them: everything after the prompt through the end-of-turn token."""
    prompt = _render(tokenizer, build_prompt_messages("x"), generation_prompt=True)
    answers = []
    for label in LABELS:
        full = _render(tokenizer, build_messages("x", label), generation_prompt=False)
        if full[: len(prompt)] != prompt:
            raise ValueError("the chat template does not render the prompt as a prefix of the full conversation")
        answer = full[len(prompt):]
        answers.append(answer[: answer.index(tokenizer.convert_tokens_to_ids("<|im_end|>")) + 1])
    return answers


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def _batches(prompts: list[list[int]], batch_size: int):
    """Index batches of similar length, longest first, so padding stays small and memory peaks early."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


@torch.inference_mode()
def score_labels(model, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 512,
                 progress: bool = True) -> Predictions:
    """Full log-probability of each label's answer, with no token computed twice: the system turn and instruction
    that open every prompt run once for all articles; each article and the answers' shared prefix
    (`{"category":"`) run once on top of that; the four diverging suffixes then run together on the article's cache."""
    answers = answer_token_ids(tokenizer)
    shared = 0
    while all(len(a) > shared + 1 and a[shared] == answers[0][shared] for a in answers):
        shared += 1
    prefix = answers[0][:shared]
    suffixes = [a[shared:] for a in answers]
    prompts, truncated = encode_prompts(tokenizer, texts, max_length - max(map(len, answers)))
    device = model.device
    n_labels, width = len(suffixes), max(map(len, suffixes))
    suffix_ids = torch.full((n_labels, width), tokenizer.pad_token_id, dtype=torch.long, device=device)
    suffix_mask = torch.zeros((n_labels, width), dtype=torch.long, device=device)
    for c, s in enumerate(suffixes):
        suffix_ids[c, : len(s)] = torch.tensor(s)
        suffix_mask[c, : len(s)] = 1

    # The common opening, cut one token short of the shortest prompt so that every article keeps a token to run.
    common = min(_common_prefix_length(prompts), min(map(len, prompts)) - 1)
    header = model(input_ids=torch.tensor([prompts[0][:common]], device=device), use_cache=True).past_key_values \
        if common else None

    logprobs = np.zeros((len(texts), n_labels))
    seconds = np.zeros(len(texts))
    for batch in tqdm(list(_batches(prompts, batch_size)), desc="label scoring", disable=not progress):
        start = time.perf_counter()
        # Left padding sits between the shared opening and each article; the mask hides it, positions skip it.
        ids, rest_mask = _left_pad([prompts[i][common:] + prefix for i in batch], tokenizer.pad_token_id, device)
        mask = torch.cat([rest_mask.new_ones(len(batch), common), rest_mask], 1)
        positions = common + (rest_mask.cumsum(-1) - 1).clamp(min=0)
        cache = None
        if header is not None:
            cache = copy.deepcopy(header)
            cache.batch_repeat_interleave(len(batch))
        # Logits for the last len(prefix)+1 positions: they predict the prefix tokens and each suffix's first token.
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=shared + 1)
        head = out.logits.float().log_softmax(-1)  # (B, shared+1, V)
        prefix_lp = head[:, :-1].gather(-1, torch.tensor(prefix, device=device).expand(len(batch), -1)[..., None])
        first_lp = head[:, -1, suffix_ids[:, 0]]  # (B, labels)

        cache = out.past_key_values
        cache.batch_repeat_interleave(n_labels)
        s_ids, s_mask = suffix_ids.repeat(len(batch), 1), suffix_mask.repeat(len(batch), 1)
        s_pos = positions[:, -1:].repeat_interleave(n_labels, 0) + 1 + torch.arange(width, device=device)
        tail = model(input_ids=s_ids, attention_mask=torch.cat([mask.repeat_interleave(n_labels, 0), s_mask], 1),
                     position_ids=s_pos, past_key_values=cache, use_cache=True).logits.float().log_softmax(-1)
        rest_lp = tail[:, :-1].gather(-1, s_ids[:, 1:, None])[..., 0] * s_mask[:, 1:]  # (rows, width-1)
        total = prefix_lp.sum((1, 2))[:, None] + first_lp + rest_lp.sum(-1).view(len(batch), n_labels)
        logprobs[batch] = total.cpu().numpy()
        seconds[batch] = time.perf_counter() - start
    return Predictions(labels=logprobs.argmax(1), batch_seconds=seconds, truncated=truncated, label_logprobs=logprobs)


def _common_prefix_length(rows: list[list[int]]) -> int:
    """Length of the longest token prefix all rows share (that of the lexicographic extremes)."""
    first, last = min(rows), max(rows)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return n


def parse_answer(text: str) -> tuple[int, str | None]:
    """Class index of a generated answer, or -1 and why it failed: empty, not_json, no_category, unknown_label."""
    text = text.strip()
    if not text:
        return -1, "empty"
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        return -1, "not_json"
    if not isinstance(answer, dict) or "category" not in answer:
        return -1, "no_category"
    if answer["category"] not in LABELS:
        return -1, "unknown_label"
    return LABELS.index(answer["category"]), None


@torch.inference_mode()
def generate_labels(model, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 512,
                    max_new_tokens: int = 8, progress: bool = True) -> Predictions:
    """Greedy answers parsed as JSON; every failure is kept with its kind and raw text."""
    prompts, truncated = encode_prompts(tokenizer, texts, max_length - max_new_tokens)
    labels = np.full(len(texts), -1)
    seconds = np.zeros(len(texts))
    answers = [""] * len(texts)
    failures: dict[str, list[int]] = {}
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    for batch in tqdm(list(_batches(prompts, batch_size)), desc="generation", disable=not progress):
        start = time.perf_counter()
        ids, mask = _left_pad([prompts[i] for i in batch], tokenizer.pad_token_id, model.device)
        # use_cache explicitly: a model trained here carries use_cache=False (training never reuses keys/values),
        # and without a cache every decoding step would re-run the whole prompt.
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, use_cache=True)
        texts_out = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        seconds[batch] = time.perf_counter() - start
        for i, answer in zip(batch, texts_out):
            answers[i] = answer
            labels[i], failure = parse_answer(answer)
            if failure:
                failures.setdefault(failure, []).append(i)
    return Predictions(labels=labels, batch_seconds=seconds, truncated=truncated, failures=failures, answers=answers)
