"""Label scoring: each of the four answers' log-probability after the prompt, so no parse failure is possible.

The answer tree, the shared opening's cache and the batches here serve generation too (`finetune.generation`), whose
check follows the trained answers through the same forward before anything decodes.
"""

import copy
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from finetune.attention import VARLEN, attention_implementation, without_cudnn_attention
from finetune.metrics import Predictions
from finetune.opening import matching_length, shared_prefix_length
from finetune.packed import opening_keys, pack_batch, pack_taken, packed_attention, packed_logits, with_riders
from finetune.prompts import Prompts, answer_token_ids, prompt_budget
from finetune.speedups import HostCopy


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of `rows` right-aligned in one batch, the mask 1 on real tokens."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def length_sorted_batches(prompts: list, batch_size: int):
    """Index batches of similar length, longest first, so padding stays small and memory peaks early: as few as
    `batch_size` allows, their sizes one article apart at most, never a short remainder (decoding steps run every batch
    at the largest one's rows, `GreedyDecoder`). `prompts` are token ids, or texts not yet encoded, which their
    characters order about as their tokens would."""
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


def shared_opening(model, prompts: list[list[int]]) -> tuple[int, object | None]:
    """Length and key/value cache of the opening: the tokens all prompts share (system turn and instruction), run
    once. It stops one token short of the shortest prompt so that every article keeps a token to run.

    It runs uncompiled: a compiled layer filling a cache reads its layer index, so each layer would compile a graph
    of its own, past torch's limit of 8 a function, after which the layers run uncompiled in every later pass too.
    Under the suite's varlen attention it runs sdpa itself, which that attention runs for one sequence: the varlen
    attention would first look for packed articles in its positions, and reading them back stopped the host in every
    layer: 56 of the 92 host syncs of a 7B generation pass on an H100 (its opening run twice, the decoder's too;
    results/gpu/h100_generation_pass_timeline_probe.log)."""
    opening_length = shared_prefix_length(prompts)
    if not opening_length:
        return 0, None
    opening_ids = torch.tensor([prompts[0][:opening_length]], device=model.device)
    one_sequence = attention_implementation(model, "sdpa") if model.config._attn_implementation == VARLEN \
        else nullcontext()
    with torch.compiler.set_stance("force_eager"), one_sequence:
        return opening_length, model(input_ids=opening_ids, use_cache=True).past_key_values


def _batch_cache(opening_cache, rows: int, length: int):
    """The opening's first `length` tokens' cache for `rows` articles, as views of its tensors: no copy. The model
    extends the cache it is given by concatenation, which writes new tensors and leaves the opening's untouched."""
    if opening_cache is None or not length:
        return None
    cache = copy.copy(opening_cache)
    cache.layers = [copy.copy(layer) for layer in opening_cache.layers]
    for layer in cache.layers:
        layer.keys, layer.values = (x[:, :, :length].expand(rows, -1, -1, -1) for x in (layer.keys, layer.values))
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


def answer_logprobs(logits: torch.Tensor, terms: AnswerTreeTerms) -> torch.Tensor:
    """(articles, answers) float32: each answer's terms' log-probabilities, summed. On CUDA each read row's
    normalizer comes from one read of its bf16 logits (`row_logsumexp`): a float32 `log_softmax` of every row was 2.4%
    of a 7B batch's GPU time, and torch's `logsumexp` makes a pass for each of its steps."""
    if logits.is_cuda:
        from finetune.logsumexp_kernel import row_logsumexp  # triton: imported where it runs
        normalizers = row_logsumexp(logits)
    else:
        normalizers = torch.logsumexp(logits.float(), -1)
    return (logits[:, terms.positions, terms.tokens].float() - normalizers[:, terms.positions]) @ terms.owner


def tree_passes(model, prompts: Prompts, tree: AnswerTree, batch_size: int, method: str, desc: str, progress: bool,
                leave: bool = True):
    """Per batch: its article indices and the tail logits (articles, tail, vocab) of one forward over each prompt
    followed by the answer tree (`_passes` batches them)."""
    if method not in SCORING_METHODS:
        raise ValueError(f"method={method!r}: choose one of {SCORING_METHODS}")
    if method == "auto":
        method = "packed" if model.device.type == "cuda" else "tree"
    if method == "packed":
        def tail_logits(rows, length, opening_cache):
            return packed_logits(model, pack_batch(rows, tree, length, model.device),
                                 _opening_share(opening_cache, length))[0]
        layout = packed_attention(model)
    else:
        def tail_logits(rows, length, opening_cache):
            return _tree_logits(model, rows, tree, length, opening_cache, prompts.tokenizer.pad_token_id)
        layout = nullcontext()
    yield from _passes(model, prompts, batch_size, layout, tail_logits, desc, progress, leave)


def trunk_passes(model, prompts: Prompts, tree: AnswerTree, batch_size: int, progress: bool, riders: list):
    """Per batch: its article indices, the logits (articles, stem + 1, vocab) of one packed forward over each prompt
    and the answers' stem (`tree_passes`' without the branches), the logits (tokens, vocab) of the riders that forward
    ran after them (None for none), and `pack_branches(which, branches)`: articles `which`'s tokens `branches` after
    their trunks, packed to attend to the keys the trunks' forward kept (`finetune.packed.pack_taken`), for a forward
    of their own (`taken_logits`) or to ride in a later batch's: a caller puts them in `riders`, whose one entry the
    next forward takes (`finetune.packed.with_riders`)."""
    def trunks(rows, length, opening_cache):
        batch = pack_batch(rows, tree, length, model.device, with_branches=False)
        if riders:
            batch = with_riders(batch, riders.pop())
        opening = _opening_share(opening_cache, length)
        return *packed_logits(model, batch, opening), \
            lambda which, branches: pack_taken(batch, which, branches, model.device, opening)
    yield from _passes(model, prompts, batch_size, packed_attention(model), trunks, "answer tree", progress, False)


def _passes(model, prompts: Prompts, batch_size: int, layout, run, desc: str, progress: bool, leave: bool):
    """Per batch: its article indices and `run(rows, length, opening_cache)` under `layout`, `rows` its prompts after
    the opening's first `length` tokens. A batch's articles are encoded once the batch before is queued, while the GPU
    runs it (`Prompts`), so batches group the articles by their length in characters.

    The opening runs once, over the first batch's shared tokens. A later batch whose articles share fewer of them
    (the first batch's all starting with one word, say) runs its prompts from where they part: its articles attend
    to that part of the opening's cache and to their own tokens, as with the whole prompt each."""
    batches = list(length_sorted_batches(prompts.texts, batch_size))
    if not batches:
        return
    with without_cudnn_attention():  # switched once for the pass, not in each masked call (`masked_sdpa`)
        first = prompts.take(batches[0])
        opening_length, opening_cache = shared_opening(model, first)
        opening = first[0][:opening_length]
        with layout:
            for k, batch in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=leave)):
                rows = prompts.take(batch)
                length = min(shared_prefix_length(rows), matching_length(opening, rows[0]))
                queued = run([row[length:] for row in rows], length, opening_cache)
                # The next batch is encoded now, while this one's forward runs: a caller that waits for this batch
                # at once (generation's first check) then finds only the packing left before the GPU has work again.
                if k + 1 < len(batches):
                    prompts.take(batches[k + 1])
                yield batch, queued


def _opening_share(opening_cache, length: int) -> list | None:
    """The first `length` tokens of the opening's keys and values per layer in the packed layout (views), None for
    none."""
    opening_kv = opening_keys(opening_cache)
    return [(k[:length], v[:length]) for k, v in opening_kv] if opening_kv and length else None


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
    prompts = Prompts(tokenizer, texts, prompt_budget(tokenizer, max_length))
    logprobs = np.zeros((len(texts), len(answers)))
    seconds = np.zeros(len(texts))
    start, pending = time.perf_counter(), None

    def read_back(batch: list[int], scores: HostCopy) -> None:
        nonlocal start
        logprobs[batch] = scores.numpy()  # waits for that batch's forward, not for the one queued after it
        seconds[batch] = time.perf_counter() - start
        start = time.perf_counter()

    for batch, logits in tree_passes(model, prompts, tree, batch_size, method, "label scoring", progress):
        scores = HostCopy(answer_logprobs(logits, terms))
        del logits  # before the next batch's forward allocates
        # The previous batch is read back only now, with this one's forward queued behind it: the GPU goes on while
        # the host waits, reads, encodes and packs the next batch, instead of idling through that at every batch.
        if pending is not None:
            read_back(*pending)
        pending = batch, scores
    if pending is not None:
        read_back(*pending)
    return Predictions(labels=logprobs.argmax(1), batch_seconds=seconds, truncated=prompts.truncated,
                       label_logprobs=logprobs)


def _tree_logits(model, rows: list[list[int]], tree: AnswerTree, opening_length: int, opening_cache,
                 pad_id: int) -> torch.Tensor:
    """Tail logits of left-padded rows, each an article then the answer tree, under the tree's 4D mask, after the
    opening's first `opening_length` tokens."""
    device, n_branch = model.device, len(tree.branch)
    depth, branches = torch.tensor(tree.depth, device=device), torch.from_numpy(tree.sees()).to(device)
    # Left padding sits between the opening and each article; the mask hides it, positions skip it.
    ids, valid = left_pad([row + tree.tokens for row in rows], pad_id, device)
    positions = opening_length + (valid.cumsum(-1) - 1).clamp(min=0)
    positions[:, -n_branch:] = positions[:, -n_branch - 1:-n_branch] + 1 + depth  # branches run side by side
    mask = _scoring_mask(valid.bool(), branches, opening_length)
    cache = _batch_cache(opening_cache, len(rows), opening_length)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                 use_cache=cache is not None,
                 logits_to_keep=len(tree.tokens) + 1).logits
