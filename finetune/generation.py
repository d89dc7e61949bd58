"""Generation: greedy answers read back as JSON (strictly, or leniently: see `finetune.answers`), failures counted.

Articles whose greedy choices follow a trained answer all the way are answered from label scoring's forward over the
answer tree (`finetune.predict`); the rest decode token by token (`finetune.decode.GreedyDecoder`). Asked for label
scoring as well, that one forward gives both (`score_then_generate`).
"""

import dataclasses
import time
from collections.abc import Callable
from contextlib import closing

import numpy as np
import torch
from tqdm.auto import tqdm

from finetune.answers import parse_strict
from finetune.attention import without_cudnn_attention
from finetune.decode import GreedyDecoder
from finetune.metrics import Predictions
from finetune.predict import (AnswerTree, AnswerTreeTerms, answer_logprobs, length_sorted_batches, shared_opening,
                              tree_passes)
from finetune.prompts import Prompts, answer_token_ids, default_max_new_tokens, end_token_ids, prompt_budget
from finetune.speedups import HostCopy


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
    longest = max(map(len, answer_ids))
    prompts = Prompts(tokenizer, texts, prompt_budget(tokenizer, max_length))  # encoded as the passes reach them
    answers, seconds = [None] * len(texts), np.zeros(len(texts))
    if tree_check and max_new_tokens >= longest:
        answers, seconds = _tree_check(model, tokenizer, prompts, answer_ids, batch_size, progress)
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
                scores: np.ndarray | None = None) -> tuple[list[str | None], np.ndarray]:
    """Each article's trained answer where its greedy choices follow one (None elsewhere), and its batch's wall time;
    with `scores` (articles, answers), each answer's log-probability written there too, and every batch checked.

    The first batch is read at once, so that a model which mostly answers otherwise stops the check there. Each later
    one is read only once the next is queued behind it, as in label scoring: the GPU goes on while the host reads and
    packs. A batch that stops the check then leaves the one queued after it to decoding, which answers the same."""
    tree = AnswerTree.from_answers(answer_ids)
    terms = AnswerTreeTerms.of(tree, model.device)
    trained = tokenizer.batch_decode(answer_ids, skip_special_tokens=True)
    answers, seconds = [None] * len(prompts.texts), np.zeros(len(prompts.texts))
    start = time.perf_counter()

    def read(batch: list[int], followed: HostCopy, logprobs: HostCopy | None) -> bool:
        """The batch's answers from its check (and its scores); whether the check goes on."""
        nonlocal start
        followed = followed.numpy()  # (articles, labels): at most one per article
        for i, row in zip(batch, followed):
            if row.any():
                answers[i] = trained[row.argmax()]
        if logprobs is not None:
            scores[batch] = logprobs.numpy()
        seconds[batch] = time.perf_counter() - start
        start = time.perf_counter()
        # a model that mostly answers otherwise stops the check, unless the scores need the pass anyway
        return scores is not None or 2 * followed.any(1).sum() >= len(batch)

    waiting, first = None, True
    # closing(): a pass stopped early must restore the model's attention before decoding starts.
    # leave=False: a check stopped early (a model off the trained format) clears its bar, not leaving it short. With
    # the scores it runs to the end: label scoring's pass, as its bar says.
    desc = "answer tree" if scores is None else "label scoring"
    with closing(tree_passes(model, prompts, tree, batch_size, "auto", desc, progress,
                             leave=scores is not None)) as passes:
        for batch, logits in passes:
            # argmax before the terms' gather, which copied a vocabulary-wide row for each of the 17 terms
            missed = (logits.argmax(-1)[:, terms.positions] != terms.tokens).float()  # (articles, terms)
            logprobs = None if scores is None else HostCopy(answer_logprobs(logits, terms))
            del logits  # before the next batch's forward allocates
            check = batch, HostCopy(missed @ terms.owner == 0), logprobs
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
    for i, answer in enumerate(predictions.answers):
        labels[i], failure = parse(answer)
        if failure:
            failures.setdefault(failure, []).append(i)
    return dataclasses.replace(predictions, labels=labels, failures=failures)
