"""Generation: greedy answers read back as JSON (strictly, or leniently: see `finetune.answers`), failures counted.

Articles whose greedy choices follow a trained answer all the way are answered from a forward over the prompts and
the answers' tokens, as label scoring's (`finetune.predict`); the rest decode token by token
(`finetune.decode.GreedyDecoder`). Asked for label scoring as well, its forward over the whole answer tree gives both
(`score_then_generate`).
"""

import dataclasses
import time
from collections.abc import Callable
from contextlib import closing
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from finetune.answers import parse_strict
from finetune.attention import without_cudnn_attention
from finetune.decode import GreedyDecoder
from finetune.metrics import Predictions
from finetune.packed import PackedBranches, taken_logits
from finetune.predict import (AnswerTree, AnswerTreeTerms, answer_logprobs, length_sorted_batches, shared_opening,
                              tree_passes, trunk_passes)
from finetune.prompts import Prompts, answer_token_ids, default_max_new_tokens, end_token_ids, prompt_budget
from finetune.speedups import HostCopy, queued_copy


@torch.inference_mode()
def generate_labels(model, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 512,
                    max_new_tokens: int | None = None, progress: bool = True, tree_check: bool = True) -> Predictions:
    """Greedy answers read strictly (`parsed` reads them another way); every raw answer is kept, every failure with
    its kind. `max_new_tokens` defaults to `default_max_new_tokens`.

    With `tree_check`, the trained answers are checked first, each article's prompt followed by the answers' tokens
    in one forward as label scoring runs them, and then only the branch its greedy choices took (`_branch_check`): an
    article whose every greedy choice along one trained answer is that answer's next token would decode to exactly
    that answer, its end-of-turn included, so it is answered without decoding. The rest (off the trained format: a
    fence, a space, an unknown label) decode token by token as without it: the answers are greedy decoding's either
    way, and a model answering as trained costs about one scoring pass instead of eight decoding steps. Once a batch
    has fewer than half its articles on a trained answer, the check stops and the rest decode: a model that answers
    otherwise pays for one checked batch, not a second pass over everything.

    Prompts are cut as in label scoring (and training), to leave room for the longest trained answer: the headroom
    past it must not change what the model reads, and may run past `max_length` (positions allow it)."""
    max_new_tokens = max_new_tokens or default_max_new_tokens(tokenizer)
    answer_ids = answer_token_ids(tokenizer)
    longest = max(map(len, answer_ids))
    prompts = Prompts(tokenizer, texts, prompt_budget(tokenizer, max_length))  # encoded as the passes reach them
    answers, seconds = [None] * len(texts), np.zeros(len(texts))
    if tree_check and max_new_tokens >= longest:
        answers, seconds = _branch_check(model, tokenizer, prompts, answer_ids, batch_size, progress)
    return _decode_the_rest(model, tokenizer, prompts, answers, seconds, batch_size, max_new_tokens, longest, progress)


@torch.inference_mode()
def score_then_generate(model, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 512,
                        max_new_tokens: int | None = None, progress: bool = True):
    """Label scoring and generation from one pass over the answer tree: yields ("label_scoring", predictions) once the
    pass is done, then ("generation", predictions) once the articles off the trained answers are decoded, so that a
    caller's clock times each. The pass's logits give each answer's log-probability and, through their argmaxes, the
    articles whose greedy answer is a trained one (`generate_labels`' check, here on every batch: the pass runs for
    the scores anyway). The predictions are `score_labels`' and `generate_labels`' with the same method; the two
    modes take about one's time."""
    max_new_tokens = max_new_tokens or default_max_new_tokens(tokenizer)
    answer_ids = answer_token_ids(tokenizer)
    longest = max(map(len, answer_ids))
    prompts = Prompts(tokenizer, texts, prompt_budget(tokenizer, max_length))
    logprobs = np.zeros((len(texts), len(answer_ids)))
    answers, seconds = _tree_check(model, tokenizer, prompts, answer_ids, batch_size, progress, scores=logprobs)
    yield "label_scoring", Predictions(labels=logprobs.argmax(1), batch_seconds=seconds.copy(),
                                       truncated=prompts.truncated, label_logprobs=logprobs)
    if max_new_tokens < longest:  # a budget too short for the trained answers: all decode
        answers = [None] * len(texts)
    yield "generation", _decode_the_rest(model, tokenizer, prompts, answers, seconds, batch_size, max_new_tokens,
                                         longest, progress)


def _decode_the_rest(model, tokenizer, prompts: Prompts, answers: list[str | None], seconds: np.ndarray,
                     batch_size: int, max_new_tokens: int, answer_length: int, progress: bool) -> Predictions:
    """The answers with every article the check left undecided (None) decoded, read strictly; `seconds` per article
    so far, its decoding batch's added. `answer_length`: the longest trained answer's tokens (`GreedyDecoder`)."""
    undecided, graphed = [i for i, answer in enumerate(answers) if answer is None], None
    if undecided:
        decoded, decode_seconds, graphed = _decode(model, tokenizer, prompts.take(undecided), batch_size,
                                                   max_new_tokens, answer_length, progress)
        for i, answer, s in zip(undecided, decoded, decode_seconds):
            answers[i], seconds[i] = answer, seconds[i] + s
    return parsed(Predictions(labels=np.full(len(answers), -1), batch_seconds=seconds, truncated=prompts.truncated,
                              answers=answers, decoded=len(undecided), decoding_cuda_graph=graphed), parse_strict)


def _tree_check(model, tokenizer, prompts: Prompts, answer_ids: list[list[int]], batch_size: int, progress: bool,
                scores: np.ndarray) -> tuple[list[str | None], np.ndarray]:
    """Each article's trained answer where its greedy choices follow one (None elsewhere) and its batch's wall time,
    from label scoring's pass over the whole answer tree, each answer's log-probability written into `scores`
    (articles, answers). Each batch is read once the next is queued behind it: the GPU goes on while the host reads
    and packs."""
    tree = AnswerTree.from_answers(answer_ids)
    terms = AnswerTreeTerms.of(tree, model.device)
    trained = tokenizer.batch_decode(answer_ids, skip_special_tokens=True)
    answers, seconds = [None] * len(prompts.texts), np.zeros(len(prompts.texts))
    start, waiting = time.perf_counter(), None

    def read(batch: list[int], followed: HostCopy, logprobs: HostCopy) -> None:
        nonlocal start
        for i, row in zip(batch, followed.numpy()):  # (articles, labels): at most one per article
            if row.any():
                answers[i] = trained[row.argmax()]
        scores[batch] = logprobs.numpy()
        seconds[batch] = time.perf_counter() - start
        start = time.perf_counter()

    for batch, logits in tree_passes(model, prompts, tree, batch_size, "auto", "label scoring", progress):
        # argmax before the terms' gather, which copied a vocabulary-wide row for each of the 17 terms
        missed = (logits.argmax(-1)[:, terms.positions] != terms.tokens).float()  # (articles, terms)
        check = batch, HostCopy(missed @ terms.owner == 0), HostCopy(answer_logprobs(logits, terms))
        del logits  # before the next batch's forward allocates
        if waiting is not None:
            read(*waiting)
        waiting = check
    if waiting is not None:
        read(*waiting)
    return answers, seconds


def _branch_check(model, tokenizer, prompts: Prompts, answer_ids: list[list[int]], batch_size: int,
                  progress: bool) -> tuple[list[str | None], np.ndarray]:
    """Each article's trained answer where its greedy choices follow one (None elsewhere) and its batch's wall time,
    from each prompt and the answers' stem in one packed forward a batch (`trunk_passes`), whose last greedy choice
    picks a branch, then only the branches picked, after their trunks' kept keys. Running every branch instead ran ten
    tree tokens an article for Qwen2.5's answers; the branch taken runs two (four for Sci/Tech).

    The forwards are staggered so that the GPU never waits for the host, and the branches ride in a later batch's
    forward, after its trunks, rather than run every layer over a few tokens an article in one of their own: a batch's
    picks are read once the next batch's trunks are queued, its branches ride in the forward after that, and their
    check is read once the batch after that is queued. The first batch is read at once, its branches in a forward of
    their own, so that a model which mostly answers otherwise stops the check there (fewer than half its articles on
    a trained answer); the batches queued after the one that stops it decode. The last two batches' branches, with no
    forward left to ride in, run in one of their own each."""
    tree = AnswerTree.from_answers(answer_ids)
    n_stem, device = len(tree.tokens) - len(tree.branch), model.device
    stem, firsts = (torch.tensor(t, device=device) for t in (tree.tokens[:n_stem], [a[n_stem] for a in answer_ids]))
    trained = tokenizer.batch_decode(answer_ids, skip_special_tokens=True)
    answers, seconds = [None] * len(prompts.texts), np.zeros(len(prompts.texts))
    start = time.perf_counter()

    def picks(logits: torch.Tensor) -> HostCopy:
        """(articles,) the answer whose branch each article's greedy choices entered after the stem, -1 for none."""
        choice = logits.argmax(-1)  # (articles, stem + 1)
        enters = (choice[:, n_stem, None] == firsts) & (choice[:, :n_stem] == stem).all(1, keepdim=True)
        return HostCopy(torch.where(enters.any(1), enters.float().argmax(1), -1))

    def picked_branches(batch: list[int], picked: HostCopy, pack) -> _Picked:
        """The batch's picked branches, packed to run after their trunks."""
        picked = picked.numpy()
        which = np.flatnonzero(picked >= 0)
        taken = [answer_ids[label][n_stem:] for label in picked[which]]  # each token predicts the next
        return _Picked(batch, which, picked, taken, pack(which, [a[:-1] for a in taken]) if len(which) else None)

    def checked(branches: _Picked, logits: torch.Tensor | None) -> _Check:
        """The check of `branches` from the logits of their tokens: whether each article's greedy choices followed
        its branch to the end (queued; `read` waits for it)."""
        if branches.packed is None:
            return _Check(branches, None)
        lengths = np.array([len(answer) - 1 for answer in branches.taken])
        wanted = queued_copy(torch.tensor([t for answer in branches.taken for t in answer[1:]]), device)
        owner = queued_copy(torch.from_numpy(np.repeat(np.arange(len(branches.which)), lengths)), device)
        missed = (logits.argmax(-1) != wanted).int()
        return _Check(branches, HostCopy(torch.zeros(len(branches.which), dtype=torch.int, device=device).index_add_(
            0, owner, missed) == 0))

    def alone(branches: _Picked) -> _Check:
        """`checked` of branches run in a forward of their own."""
        return checked(branches, taken_logits(model, branches.packed) if branches.packed is not None else None)

    def read(check: _Check) -> bool:
        """The batch's answers from its check; whether the check goes on."""
        nonlocal start
        batch, which, picked = check.branches.batch, check.branches.which, check.branches.picked
        followed = check.followed.numpy() if check.followed is not None else np.zeros(0, bool)
        for i in which[followed]:
            answers[batch[i]] = trained[picked[i]]
        seconds[batch] = time.perf_counter() - start
        start = time.perf_counter()
        return 2 * followed.sum() >= len(batch)

    riders = []  # the packed branches the next trunks' forward runs after its trunks (`trunk_passes` takes them)
    # the batch whose picks are still to read; the branches waiting to ride in the next forward; the check to read
    entering = riding = checking = None
    first = True
    # closing(): a pass stopped early must restore the model's attention before decoding starts
    with closing(trunk_passes(model, prompts, tree, batch_size, progress, riders)) as passes:
        for batch, (logits, rider_logits, pack) in passes:
            trunks = batch, picks(logits), pack
            rode = checked(riding, rider_logits) if riding is not None else None  # they rode in this forward
            del logits, rider_logits  # before the next batch's forward allocates
            if first:
                first, going_on = False, read(alone(picked_branches(*trunks)))
            else:
                riding = picked_branches(*entering) if entering is not None else None
                if riding is not None and riding.packed is not None:
                    riders.append(riding.packed)
                going_on = checking is None or read(checking)
                checking, entering = rode, trunks
            if not going_on:
                entering = riding = checking = None  # their batches decode with the rest
                break
    # No forward left to ride in: the last two batches' branches run alone, the first queued before anything waits.
    last = [alone(riding)] if riding is not None else []
    if entering is not None:
        last.append(alone(picked_branches(*entering)))
    for check in (checking, *last):
        if check is not None:
            read(check)
    return answers, seconds


class _Picked(NamedTuple):
    """A batch's picks: which of its articles entered a branch, each article's answer (-1: none), the branches'
    tokens, and those tokens packed to run after their trunks (None where no article entered one)."""
    batch: list[int]
    which: np.ndarray
    picked: np.ndarray
    taken: list[list[int]]
    packed: PackedBranches | None


class _Check(NamedTuple):
    """Picked branches and whether each one's greedy choices followed it to the end (queued; None: none was run)."""
    branches: _Picked
    followed: HostCopy | None


def _decode(model, tokenizer, prompts: list[list[int]], batch_size: int, max_new_tokens: int, answer_length: int,
            progress: bool) -> tuple[list[str], np.ndarray, bool]:
    """Greedy decoding of each prompt (`GreedyDecoder`), the wall time of each one's batch, and whether the steps
    replayed a captured CUDA graph. As in label scoring, the opening runs once."""
    answers, seconds = [""] * len(prompts), np.zeros(len(prompts))
    batches = list(length_sorted_batches(prompts, batch_size))
    with without_cudnn_attention():  # switched once for the pass, not in each masked call (`masked_sdpa`)
        opening_length, opening_cache = shared_opening(model, prompts)
        decoder = GreedyDecoder(model, opening_cache, opening_length, rows=max(map(len, batches)),
                                max_tail=max(map(len, prompts)) - opening_length, max_new_tokens=max_new_tokens,
                                eos=end_token_ids(tokenizer), pad_id=tokenizer.pad_token_id,
                                answer_length=answer_length)
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
    # each distinct answer read once: a trained model's 7,600 answers are four strings, and reading each took
    # 0.1 s of the pass on a 2-core machine with the GPU long done
    readings = {answer: parse(answer) for answer in dict.fromkeys(predictions.answers)}
    for i, answer in enumerate(predictions.answers):
        labels[i], failure = readings[answer]
        if failure:
            failures.setdefault(failure, []).append(i)
    return dataclasses.replace(predictions, labels=labels, failures=failures)
