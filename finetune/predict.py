"""Predict AG News labels with a causal LM, two ways.

Label scoring (default) ranks the four possible answers by their log-probability after the prompt: no parse failure
is possible. Generation decodes greedily and reads the answer back (strictly, or leniently: see `finetune.answers`),
counting what fails to parse.
"""

import copy
import dataclasses
import time
from collections.abc import Callable
from contextlib import closing, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from finetune.answers import parse_strict
from finetune.attention import without_cudnn_attention
from finetune.decode import GreedyDecoder, left_pad
from finetune.metrics import Predictions
from finetune.packed import opening_keys, pack_batch, packed_attention, packed_logits
from finetune.prompts import answer_token_ids, default_max_new_tokens, encode_prompts, prompt_budget


def _batches(prompts: list[list[int]], batch_size: int):
    """Index batches of similar length, longest first, so padding stays small and memory peaks early: as few as
    `batch_size` allows, their sizes one article apart at most, never a short remainder (decoding fills each batch up to
    the largest, `GreedyDecoder`)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    count = -(-len(order) // batch_size)
    start = 0
    for k in range(count):
        end = start + len(order) // count + (k < len(order) % count)
        yield order[start:end]
        start = end


def warmup_texts(texts: list[str], lengths: list[int], batch_size: int) -> list[str]:
    """The two longest batches and the shortest one: the shapes that compile kernels and grow the allocator."""
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    return [texts[i] for i in order[: 2 * batch_size] + order[-batch_size:]]


def _opening_cache(model, prompts: list[list[int]]) -> tuple[int, object | None]:
    """Length and key/value cache of the opening: the tokens all prompts share (system turn and instruction), run
    once. It stops one token short of the shortest prompt so that every article keeps a token to run."""
    opening_length = min(_common_prefix_length(prompts), min(map(len, prompts)) - 1)
    if not opening_length:
        return 0, None
    opening_ids = torch.tensor([prompts[0][:opening_length]], device=model.device)
    return opening_length, model(input_ids=opening_ids, use_cache=True).past_key_values


def _batch_cache(opening_cache, rows: int):
    """The opening's cache for `rows` articles, as broadcast views of its tensors: no copy. The model extends the
    cache it is given by concatenation, which writes new tensors and leaves the opening's untouched."""
    if opening_cache is None:
        return None
    cache = copy.copy(opening_cache)
    cache.layers = [copy.copy(layer) for layer in opening_cache.layers]
    for layer in cache.layers:
        layer.keys, layer.values = (x.expand(rows, -1, -1, -1) for x in (layer.keys, layer.values))
    return cache


@dataclass
class AnswerTree:
    """The four answers as one token tree: their stem, the tokens all four start with (`{"category":"`), then each
    label's own branch.

    A scoring row ends with the stem and the branches side by side (each branch minus its last token, which is only
    ever predicted; every branch keeps at least one token, since all answers end with the same end-of-turn token).
    `terms` lists every log-probability an answer needs as (row-tail position, token) and `owner` says which answers
    it counts for, so an answer's log-probability is one gather and one matrix product.
    """

    tokens: list[int]  # stem + branch tokens, in row order
    branch: list[int]  # per branch token: its label index
    depth: list[int]  # per branch token: its offset after the stem (the same position for parallel branches)
    terms: list[tuple[int, int]]  # (position counted from the last prompt token, token it must predict)
    owner: torch.Tensor  # (terms, labels): 1 where the term belongs to the label's answer

    def sees(self) -> np.ndarray:
        """(branch tokens, branch tokens) bool: which branch tokens each one attends to, its own branch's up to it."""
        branch, depth = np.asarray(self.branch), np.asarray(self.depth)
        return (branch[:, None] == branch[None, :]) & (depth[None, :] <= depth[:, None])

    @classmethod
    def from_answers(cls, answers: list[list[int]]) -> "AnswerTree":
        n_stem = 0
        while all(len(a) > n_stem + 1 and a[n_stem] == answers[0][n_stem] for a in answers):
            n_stem += 1
        branch, depth, tokens = [], [], list(answers[0][:n_stem])
        terms = [(k, answers[0][k]) for k in range(n_stem)]  # the last prompt token and the stem predict the stem
        owner = [[1.0] * len(answers) for _ in range(n_stem)]
        for label, answer in enumerate(answers):  # the stem's last token predicts each branch's first token
            terms.append((n_stem, answer[n_stem]))
            owner.append([float(c == label) for c in range(len(answers))])
        for label, answer in enumerate(answers):
            for d, token in enumerate(answer[n_stem:-1]):
                tokens.append(token)
                branch.append(label)
                depth.append(d)
                terms.append((len(tokens), answer[n_stem + d + 1]))
                owner.append([float(c == label) for c in range(len(answers))])
        return cls(tokens, branch, depth, terms, torch.tensor(owner))


def _scoring_mask(valid: torch.Tensor, branches: torch.Tensor, opening_length: int) -> torch.Tensor:
    """(batch, 1, row, opening + row) boolean attention: every query sees the opening; within the row, causal
    over real tokens, except among the branch tokens at the row's end, where `branches` (branch x branch) rules: a
    branch token sees its own branch only. Each query also sees itself, so a padding query's softmax is never empty
    (an empty one would put NaN into the keys and values it produces)."""
    width, n_branch = valid.shape[1], len(branches)
    row = torch.ones(width, width, dtype=torch.bool, device=valid.device).tril() & valid[:, None, :]
    row[:, -n_branch:, -n_branch:] = branches
    row |= torch.eye(width, dtype=torch.bool, device=valid.device)
    return torch.cat([valid.new_ones(len(valid), width, opening_length), row], -1)[:, None]


SCORING_METHODS = ("auto", "packed", "tree")


@dataclass
class AnswerTreeTerms:
    """The answer tree's terms on the device: where in each article's tail logits to read (`positions`), which token
    each position must predict (`tokens`), and which answers each term counts for (`owner`)."""

    positions: torch.Tensor
    tokens: torch.Tensor
    owner: torch.Tensor

    @classmethod
    def of(cls, tree: AnswerTree, device) -> "AnswerTreeTerms":
        return cls(torch.tensor([p for p, _ in tree.terms], device=device),
                   torch.tensor([t for _, t in tree.terms], device=device), tree.owner.to(device))


def _tree_passes(model, tokenizer, prompts: list[list[int]], tree: AnswerTree, batch_size: int, method: str,
                 desc: str, progress: bool, leave: bool = True):
    """Per batch: its article indices and the tail logits (articles, tail, vocab) of one forward over each prompt
    followed by the answer tree. The opening runs once for all batches."""
    if method not in SCORING_METHODS:
        raise ValueError(f"method={method!r}: choose one of {SCORING_METHODS}")
    if method == "auto":
        method = "packed" if model.device.type == "cuda" else "tree"
    with without_cudnn_attention():  # switched once for the pass, not in each masked call (`masked_sdpa`)
        opening_length, opening_cache = _opening_cache(model, prompts)
        if method == "packed":
            opening_kv, layout = opening_keys(opening_cache), packed_attention(model)
            tail_logits = lambda rows: packed_logits(model, pack_batch(rows, tree, opening_length, model.device),
                                                     opening_kv)
        else:
            layout = nullcontext()
            tail_logits = lambda rows: _tree_logits(model, rows, tree, opening_length, opening_cache,
                                                    tokenizer.pad_token_id)
        with layout:
            for batch in tqdm(list(_batches(prompts, batch_size)), desc=desc, disable=not progress, leave=leave):
                yield batch, tail_logits([prompts[i][opening_length:] for i in batch])


@torch.inference_mode()
def score_labels(model, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 512,
                 progress: bool = True, method: str = "auto") -> Predictions:
    """Full log-probability of each label's answer, one forward pass per batch, no token computed twice.

    The opening (system turn and instruction, the same in every prompt) runs once for all articles (a shared KV
    cache). Each article is then followed by the answer tree (see `AnswerTree`): the four answers add a dozen-odd
    tokens rather than four copies of the article or a second pass on a copied cache. `method` lays a batch out as
    "packed": one row without padding, attention through the varlen kernel (`finetune.packed`); or
    "tree": left-padded rows and a 4D mask. "auto" packs on CUDA, where the kernel is, and uses the tree elsewhere.
    """
    answers = answer_token_ids(tokenizer)
    tree = AnswerTree.from_answers(answers)
    terms = AnswerTreeTerms.of(tree, model.device)
    prompts, truncated = encode_prompts(tokenizer, texts, prompt_budget(tokenizer, max_length))
    logprobs = np.zeros((len(texts), len(answers)))
    seconds = np.zeros(len(texts))
    start, pending = time.perf_counter(), None

    def read_back(batch: list[int], scores: torch.Tensor) -> None:
        nonlocal start
        logprobs[batch] = scores.cpu().numpy()  # waits for that batch's forward, not for the one queued after it
        seconds[batch] = time.perf_counter() - start
        start = time.perf_counter()

    for batch, logits in _tree_passes(model, tokenizer, prompts, tree, batch_size, method, "label scoring", progress):
        # float32 log-probabilities by one fused log_softmax over a float32 copy of the logits (torch fuses the
        # conversion only for float16), where logsumexp made separate max, subtract, exp and sum passes over it: those
        # alone took 2% of a 7B batch's GPU time (h200_7b_eval_rehearsal.json's profile)
        scores = torch.log_softmax(logits, -1, dtype=torch.float32)[:, terms.positions, terms.tokens] @ terms.owner
        del logits  # before the next batch's forward allocates
        # The previous batch is read back only now, with this one's forward queued behind it: the GPU goes on while
        # the host waits, reads and packs the next batch, instead of idling through that at every batch.
        if pending is not None:
            read_back(*pending)
        pending = batch, scores
    if pending is not None:
        read_back(*pending)
    return Predictions(labels=logprobs.argmax(1), batch_seconds=seconds, truncated=truncated, label_logprobs=logprobs)


def _tree_logits(model, rows: list[list[int]], tree: AnswerTree, opening_length: int, opening_cache,
                 pad_id: int) -> torch.Tensor:
    """Tail logits of left-padded rows, each an article then the answer tree, under the tree's 4D mask."""
    device, n_branch = model.device, len(tree.branch)
    depth, branches = torch.tensor(tree.depth, device=device), torch.from_numpy(tree.sees()).to(device)
    # Left padding sits between the opening and each article; the mask hides it, positions skip it.
    ids, valid = left_pad([row + tree.tokens for row in rows], pad_id, device)
    positions = opening_length + (valid.cumsum(-1) - 1).clamp(min=0)
    positions[:, -n_branch:] = positions[:, -n_branch - 1:-n_branch] + 1 + depth  # branches run side by side
    mask = _scoring_mask(valid.bool(), branches, opening_length)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions,
                 past_key_values=_batch_cache(opening_cache, len(rows)), use_cache=opening_cache is not None,
                 logits_to_keep=len(tree.tokens) + 1).logits


def _common_prefix_length(rows: list[list[int]]) -> int:
    """Length of the longest token prefix all rows share (that of the lexicographic extremes)."""
    first, last = min(rows), max(rows)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return n


@torch.inference_mode()
def generate_labels(model, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 512,
                    max_new_tokens: int | None = None, progress: bool = True, tree_check: bool = True) -> Predictions:
    """Greedy answers read strictly (`parsed` reads them another way); every raw answer is kept, every failure with
    its kind. `max_new_tokens` defaults to `default_max_new_tokens`.

    With `tree_check`, one forward per batch over each prompt and the answer tree (label scoring's) first: an article
    whose every greedy choice along one trained answer is that answer's next token would decode to exactly that
    answer, its end-of-turn included, so it is answered without decoding. The rest (off the trained format: a fence,
    a space, an unknown label) decode token by token as without it: the answers are greedy decoding's either way, and
    a model answering as trained costs one scoring pass instead of eight decoding steps. Once a batch has fewer than
    half its articles on a trained answer, the check stops and the rest decode (`_tree_check`): a model that answers
    otherwise pays for one checked batch, not a second pass over everything.

    Prompts are cut as in label scoring (and training), to leave room for the longest trained answer: the headroom
    past it must not change what the model reads, and may run past `max_length` (positions allow it)."""
    max_new_tokens = max_new_tokens or default_max_new_tokens(tokenizer)
    answer_ids = answer_token_ids(tokenizer)
    prompts, truncated = encode_prompts(tokenizer, texts, prompt_budget(tokenizer, max_length))
    answers, seconds = [None] * len(texts), np.zeros(len(texts))
    if tree_check and max_new_tokens >= max(map(len, answer_ids)):
        answers, seconds = _tree_check(model, tokenizer, prompts, answer_ids, batch_size, progress)
    undecided, graphed = [i for i, answer in enumerate(answers) if answer is None], None
    if undecided:
        decoded, decode_seconds, graphed = _decode(model, tokenizer, [prompts[i] for i in undecided], batch_size,
                                                   max_new_tokens, progress)
        for i, answer, s in zip(undecided, decoded, decode_seconds):
            answers[i], seconds[i] = answer, seconds[i] + s
    return parsed(Predictions(labels=np.full(len(texts), -1), batch_seconds=seconds, truncated=truncated,
                              answers=answers, decoded=len(undecided), decoding_cuda_graph=graphed), parse_strict)


def _tree_check(model, tokenizer, prompts: list[list[int]], answer_ids: list[list[int]], batch_size: int,
                progress: bool) -> tuple[list[str | None], np.ndarray]:
    """Each article's trained answer where its greedy choices follow one (None elsewhere), and its batch's wall time.

    The first batch is read at once, so that a model which mostly answers otherwise stops the check there. Each later
    one is read only once the next is queued behind it, as in label scoring: the GPU goes on while the host reads and
    packs. A batch that stops the check then leaves the one queued after it to decoding, which answers the same."""
    tree = AnswerTree.from_answers(answer_ids)
    terms = AnswerTreeTerms.of(tree, model.device)
    trained = tokenizer.batch_decode(answer_ids, skip_special_tokens=True)
    answers, seconds = [None] * len(prompts), np.zeros(len(prompts))
    start = time.perf_counter()

    def read(batch: list[int], followed: torch.Tensor) -> bool:
        """The batch's answers from its check; whether the check goes on."""
        nonlocal start
        followed = followed.cpu().numpy()  # (articles, labels): at most one per article
        for i, row in zip(batch, followed):
            if row.any():
                answers[i] = trained[row.argmax()]
        seconds[batch] = time.perf_counter() - start
        start = time.perf_counter()
        return 2 * followed.any(1).sum() >= len(batch)  # else a model that mostly answers otherwise

    waiting, first = None, True
    # closing(): a pass stopped early must restore the model's attention before decoding starts.
    # leave=False: a check stopped early (a model off the trained format) clears its bar, not leaving it short
    with closing(_tree_passes(model, tokenizer, prompts, tree, batch_size, "auto", "answer tree", progress,
                              leave=False)) as passes:
        for batch, logits in passes:
            missed = (logits[:, terms.positions].argmax(-1) != terms.tokens).float()  # (articles, terms)
            del logits  # before the next batch's forward allocates
            check = batch, missed @ terms.owner == 0
            if first:
                first, going_on = False, read(*check)
            else:  # the batch before is read now, this one's forward queued behind it
                going_on, waiting = waiting is None or read(*waiting), check
            if not going_on:
                waiting = None  # a batch queued after the one that stopped the check decodes with the rest
                break
    if waiting is not None:
        read(*waiting)
    return answers, seconds


def _decode(model, tokenizer, prompts: list[list[int]], batch_size: int, max_new_tokens: int,
            progress: bool) -> tuple[list[str], np.ndarray, bool]:
    """Greedy decoding of each prompt (`GreedyDecoder`), the wall time of each one's batch, and whether the steps
    replayed a captured CUDA graph. As in label scoring, the opening runs once."""
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    answers, seconds = [""] * len(prompts), np.zeros(len(prompts))
    batches = list(_batches(prompts, batch_size))
    with without_cudnn_attention():  # switched once for the pass, not in each masked call (`masked_sdpa`)
        opening_length, opening_cache = _opening_cache(model, prompts)
        decoder = GreedyDecoder(model, opening_cache, opening_length, rows=max(map(len, batches)),
                                max_tail=max(map(len, prompts)) - opening_length, max_new_tokens=max_new_tokens,
                                eos=eos, pad_id=tokenizer.pad_token_id)
        for batch in tqdm(batches, desc="generation", disable=not progress):
            start = time.perf_counter()
            new_tokens = decoder.decode([prompts[i][opening_length:] for i in batch])
            for i, answer in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                answers[i] = answer
            seconds[batch] = time.perf_counter() - start
    return answers, seconds, decoder.graph is not None


def parsed(predictions: Predictions, parse: Callable[[str], tuple[int, str | None]]) -> Predictions:
    """The same generated answers read by `parse` (e.g. `finetune.answers.parse_lenient`): new labels and failures."""
    labels = np.full(len(predictions.answers), -1)
    failures: dict[str, list[int]] = {}
    for i, answer in enumerate(predictions.answers):
        labels[i], failure = parse(answer)
        if failure:
            failures.setdefault(failure, []).append(i)
    return dataclasses.replace(predictions, labels=labels, failures=failures)
