"""Label scoring equals an explicit per-answer log-probability; generation is plain greedy decoding, whatever the
checkpoint's generation config says, with room for an instruct model's own answer style."""

import copy

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, RepetitionPenaltyLogitsProcessor

from data_prep.task import LABELS, build_messages, build_prompt_messages
from finetune import generation, predict
from finetune import prompts as prompts_module
from finetune.model import load_model, train_bpe_tokenizer
from finetune.opening import shared_prefix_length
from finetune.packed import attention_kernels, pack_batch, pack_prefill, pack_taken, taken_logits
from finetune.generation import generate_labels, score_then_generate
from finetune.last_layer import mlp_only_where_read
from finetune.predict import AnswerTree, score_labels
from finetune.prompts import Prompts, answer_token_ids, default_max_new_tokens, encode_prompts, prompt_budget
from finetune.qwen_tokenizer import build_qwen25_tokenizer
from finetune.speedups import HostCopy, as_transformers_writes, decoder_layers
from finetune.lab.standin import PUBLISHED_GENERATION_CONFIG, write_standin
from tests.conftest import compiled_offline_output

TEXTS = ["Stocks rally as profits beat forecasts.", "The striker scored twice in the final.",
         "Rebels and troops agree to a ceasefire after talks in the capital city.", "NASA tests a new chip.",
         "", "caf\u00e9 \u00fcber \u6f22\u5b57 \U0001F600 \u200b odd unicode", "long " * 400]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(TEXTS[:4] * 20, vocab_size=400, cache_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model(tokenizer, tmp_path_factory):
    from finetune.config import get_config

    config = get_config("tiny", hidden_size=64, intermediate_size=128, checkpoints_dir=str(tmp_path_factory.mktemp("c")))
    return load_model(config, tokenizer).eval()


def explicit_logprob(model, tokenizer, text: str, label: str) -> float:
    """The slow, obvious way: run prompt + answer, sum the answer tokens' log-probabilities."""
    prompt = tokenizer.apply_chat_template(build_prompt_messages(text), add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
    answer = answer_token_ids(tokenizer)[LABELS.index(label)]
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0].log_softmax(-1)
    return sum(logprobs[len(prompt) - 1 + i, token].item() for i, token in enumerate(answer))


@pytest.mark.parametrize("method", ["tree", "packed"])
def test_label_scoring_equals_explicit_per_answer_logprob(model, tokenizer, method):
    texts = TEXTS[:6]
    predictions = score_labels(model, tokenizer, texts, batch_size=4, max_length=512, progress=False, method=method)
    expected = np.array([[explicit_logprob(model, tokenizer, t, label) for label in LABELS] for t in texts])
    np.testing.assert_allclose(predictions.label_logprobs, expected, atol=1e-4)
    assert list(predictions.labels) == list(expected.argmax(1))
    assert predictions.truncated == 0 and (predictions.batch_seconds > 0).all()


@pytest.mark.parametrize("method", ["tree", "packed"])
def test_a_batch_sharing_less_of_the_opening_runs_from_where_its_prompts_part(model, tokenizer, method):
    """The opening is the first batch's shared tokens. Here its two articles (the longest) also share their first
    word, and the later batch's two another: those run from where their prompts part from the opening, over that
    part of its cache."""
    texts = ["Stocks rally as profits beat forecasts in every market.", "Stocks fall as the central bank acts.",
             "NASA tests a new chip.", "NASA launches a probe."]
    prompts, _ = encode_prompts(tokenizer, texts, prompt_budget(tokenizer, 512))
    first, later, every = (shared_prefix_length(rows) for rows in (prompts[:2], prompts[2:], prompts))
    assert first > every and later > every  # the case this test is about
    predictions = score_labels(model, tokenizer, texts, batch_size=2, progress=False, method=method)
    expected = np.array([[explicit_logprob(model, tokenizer, t, label) for label in LABELS] for t in texts])
    np.testing.assert_allclose(predictions.label_logprobs, expected, atol=1e-4)


def record_host_copies(monkeypatch, module, events: list[str]) -> None:
    """`module`'s `HostCopy` noting in `events` when each copy is queued ("copy") and when it is read ("read")."""

    class RecordedCopy(HostCopy):
        def __init__(self, tensor):
            events.append("copy")
            super().__init__(tensor)

        def numpy(self):
            events.append("read")
            return super().numpy()

    monkeypatch.setattr(module, "HostCopy", RecordedCopy)


def test_label_scoring_keeps_the_host_work_of_the_next_batch_behind_the_forward_before_it(model, tokenizer,
                                                                                          monkeypatch):
    """The GPU starts on the first batch while the other articles are still text (`Prompts`): the next batch's
    articles are encoded right after each forward is queued, before anything waits for that forward, never all of them
    before the first. A batch's scores are queued
    for the host before the next batch's forward and read only after it: a copy queued at reading (`.cpu()`) would
    wait for that forward too, and the GPU would idle while the host prepares the batch after."""
    events = []
    fitted, forward = prompts_module._fitted_prompts, model.forward
    monkeypatch.setattr(prompts_module, "_fitted_prompts", lambda tokenizer_, texts, *a: (
        events.append(f"encode {len(texts)}") or fitted(tokenizer_, texts, *a)))
    monkeypatch.setattr(model, "forward", lambda *a, **k: events.append("forward") or forward(*a, **k))
    record_host_copies(monkeypatch, predict, events)
    score_labels(model, tokenizer, TEXTS[:6], batch_size=2, progress=False, method="tree")
    assert events == (["encode 2", "forward", "forward", "encode 2", "copy"]  # the first batch, its opening, its own
                      + ["forward", "encode 2", "copy", "read"] + ["forward", "copy", "read", "read"])  # forward


def test_packed_passes_run_the_last_layers_mlp_only_on_the_rows_they_read(model, tokenizer):
    """With the last layer's MLP on the read rows only (`mlp_only_where_read`, as evaluation loads a model): label
    scoring still gives each answer's explicit log-probability and decoding the same answers, while that MLP saw each
    scored article's tail (its last prompt token and the answer tree), each prefilled prompt's last token, and every
    row only in the passes that read them all (the opening's, each decoding step's) or inside `as_transformers_writes`."""
    trimmed = copy.deepcopy(model)
    mlp_only_where_read(trimmed)
    rows = []
    decoder_layers(trimmed)[-1].mlp.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[:2]))
    texts = TEXTS[:6]
    scored = score_labels(trimmed, tokenizer, texts, batch_size=3, progress=False, method="packed")
    expected = np.array([[explicit_logprob(trimmed, tokenizer, t, label) for label in LABELS] for t in texts])
    np.testing.assert_allclose(scored.label_logprobs, expected, atol=1e-4)
    tail = len(AnswerTree.from_answers(answer_token_ids(tokenizer)).tokens) + 1
    opening = rows[0]
    assert rows[1:len(texts) // 3 + 1] == [(1, 3 * tail)] * 2
    rows.clear()
    decoded = generate_labels(trimmed, tokenizer, texts, batch_size=3, max_new_tokens=4, progress=False,
                              tree_check=False)
    assert decoded.answers == generate_labels(model, tokenizer, texts, batch_size=3, max_new_tokens=4, progress=False,
                                              tree_check=False).answers
    assert rows[0] == opening and (1, 3) in rows and set(rows) == {opening, (1, 3), (3, 1)}
    rows.clear()
    # the eval benchmark's comparison: every row, the same log-probabilities
    with as_transformers_writes(decoder_layers(trimmed)[-1:]):
        whole = score_labels(trimmed, tokenizer, texts, batch_size=3, progress=False, method="packed")
    np.testing.assert_allclose(whole.label_logprobs, scored.label_logprobs, atol=1e-5)
    assert all(n > 3 * tail for _, n in rows[1:])
    rows.clear()
    score_labels(trimmed, tokenizer, texts[:3], batch_size=3, progress=False, method="packed")
    assert rows[1:] == [(1, 3 * tail)]  # and back to the read rows after it


def test_packed_rows_through_the_grouped_kernel_score_check_and_decode_as_the_exact_path(model, tokenizer,
                                                                                        monkeypatch):
    """The packed passes on their CUDA kernels, here on Triton's interpreter, every packed sequence through the grouped
    varlen kernel (the default): label scoring gives each answer's explicit log-probability (the trunks), a branch
    run after its trunk the logits the whole tree gives it (the taken branches: fewer queries than keys), and decoding
    the exact path's answers (its prefill)."""
    from finetune import grouped_varlen_kernel, packed

    texts = TEXTS[:6]
    expected = np.array([[explicit_logprob(model, tokenizer, t, label) for label in LABELS] for t in texts])
    exact = generate_labels(model, tokenizer, texts, batch_size=3, progress=False, tree_check=False)
    queries, kernel = [], grouped_varlen_kernel.grouped_varlen_attention
    monkeypatch.setattr(grouped_varlen_kernel, "grouped_varlen_attention",
                        lambda q, *args, **kwargs: queries.append(q.shape[0]) or kernel(q, *args, **kwargs))
    monkeypatch.setattr(packed, "_on_kernels", lambda q: True)
    scored = score_labels(model, tokenizer, texts, batch_size=3, progress=False, method="packed")
    with packed.attention_kernels(keys_in_place=False):  # the benchmark's comparison: the same sums, bit for bit
        gathered = score_labels(model, tokenizer, texts, batch_size=3, progress=False, method="packed")
    np.testing.assert_array_equal(gathered.label_logprobs, scored.label_logprobs)
    check_branches_after_trunks(model, tokenizer, 1e-4)
    decoded = generate_labels(model, tokenizer, texts, batch_size=3, progress=False, tree_check=False)
    np.testing.assert_allclose(scored.label_logprobs, expected, atol=1e-4)
    assert decoded.answers == exact.answers
    assert min(queries) <= 2 * len(LABELS)  # the taken branches' rows (a few tokens an article) went through it too
    with packed.attention_kernels(grouped_varlen=False):
        assert not packed.GROUPED_VARLEN  # FlashAttention's inside the block (the benchmark's comparison)
        with packed.attention_kernels(branch_kernel=False):
            assert not packed.GROUPED_VARLEN and not packed.BRANCH_KERNEL  # a nested block keeps the outer's switch
        assert packed.BRANCH_KERNEL and packed.KEYS_IN_PLACE
    assert packed.GROUPED_VARLEN  # the default again after it


def test_packed_prefill_writes_each_prompt_right_aligned_in_its_own_cache_row():
    """Decoding's prefill packs its prompts with no padding; each token's key goes to its article's cache row, the
    prompts right-aligned to end at one slot, positions counted from the opening as if each article were alone."""
    articles = [[5, 6, 7], [8], [9, 10]]
    prefill = pack_prefill(articles, opening_length=4, cache=None, device="cpu")
    assert prefill.ids.tolist() == [[5, 6, 7, 8, 9, 10]] and prefill.end == 7
    assert prefill.positions.tolist() == [[4, 5, 6, 4, 4, 5]]
    assert prefill.cache_rows.tolist() == [0, 0, 0, 1, 2, 2] and prefill.cache_slots.tolist() == [4, 5, 6, 6, 5, 6]
    assert prefill.last_index.tolist() == [2, 3, 5] and prefill.cu_k.tolist() == [0, 7, 12, 18]
    assert prefill.key_index[7:12].tolist() == [0, 1, 2, 3, 7]  # the second article: the opening, then its one token


def test_packed_rows_hold_every_article_and_answer_tree_without_padding(tokenizer):
    """Trunks (article and stem) first, one varlen sequence each; then each article's branches, whose keys are the
    opening, their own trunk and their own branch's earlier tokens: never padding, another article or another label."""
    tree = AnswerTree.from_answers(answer_token_ids(tokenizer))
    n_stem = len(tree.tokens) - len(tree.branch)
    stem, branches = tree.tokens[:n_stem], tree.tokens[n_stem:]
    articles = [[5, 6, 7], [8], [9, 10]]
    batch = pack_batch(articles, tree, opening_length=4, device="cpu")
    assert batch.ids[0].tolist() == [t for a in articles for t in a + stem] + branches * 3
    trunks = [len(a) + n_stem for a in articles]
    assert batch.trunk_tokens == sum(trunks) and batch.cu_q.tolist() == [0, *np.cumsum(trunks)]
    assert batch.positions[0, :3].tolist() == [4, 5, 6] and batch.positions[0, trunks[0]].item() == 4
    assert batch.positions[0, sum(trunks):].tolist() == [4 + t + d for t in trunks for d in tree.depth]
    assert batch.key_index[:trunks[0] + 5].tolist() == list(range(4 + trunks[0])) + [0]  # opening, trunk; opening
    second = 1  # the second article's branches: keys that are real are its opening, its trunk, its own branches
    seen = batch.branch_key_index[second][batch.branch_mask[second].any(0)].tolist()
    first_branch = 4 + sum(trunks) + second * len(branches)
    assert sorted(seen) == list(range(4)) + list(range(4 + trunks[0], 4 + trunks[0] + trunks[1])) + list(
        range(first_branch, first_branch + len(branches)))
    for i, (label, depth) in enumerate(zip(tree.branch, tree.depth)):  # within the tree: own label, not deeper
        sees = batch.branch_mask[second, i, -len(branches):]
        assert sees.tolist() == [b == label and d <= depth for b, d in zip(tree.branch, tree.depth)]
    tail = batch.tail_index.view(3, -1)
    assert tail[1].tolist() == [trunks[0] + 1 - 1 + k for k in range(n_stem + 1)] + list(
        range(sum(trunks) + len(branches), sum(trunks) + 2 * len(branches)))


@torch.inference_mode()
def check_branches_after_trunks(model, tokenizer, tolerance: float) -> None:
    """A trunks-only pass reads the last prompt token and the stem as the whole tree's pass does; a branch run after
    it, from the keys that pass kept, gives each of its tokens the logits the whole tree gives that token, in a forward
    of its own or riding in the next batch's after its trunks. Two batches sharing the opening to different depths
    (the riders attend to their own), each article with its own branch (two of them the longest)."""
    answers = answer_token_ids(tokenizer)
    tree = AnswerTree.from_answers(answers)
    n_stem = len(tree.tokens) - len(tree.branch)
    texts = ["The " + TEXTS[0], TEXTS[1], "The " + TEXTS[2], TEXTS[3], TEXTS[4]]  # the 3 longest: "The ..."
    prompts = Prompts(tokenizer, texts, prompt_budget(tokenizer, 512))
    first, second = predict.length_sorted_batches(texts, 3)
    assert shared_prefix_length(prompts.take(first)) > shared_prefix_length(prompts.take(first + second))
    whole = dict((tuple(b), logits) for b, logits in predict.tree_passes(model, prompts, tree, 3, "packed", "", False))
    longest = max(range(len(answers)), key=lambda label: len(answers[label]))
    riders, rode = [], None
    for batch, (logits, rider_logits, pack) in predict.trunk_passes(model, prompts, tree, 3, False, riders):
        tree_logits = whole[tuple(batch)]
        torch.testing.assert_close(logits, tree_logits[:, :n_stem + 1], rtol=tolerance, atol=tolerance)
        which = np.arange(len(batch))[::-1]  # in another order than the batch's
        labels = [(i + 1) % len(answers) if i % 2 else longest for i in which]
        lengths = [len(answers[label]) - n_stem - 1 for label in labels]
        expected = [tree_logits[i, [n_stem + 1 + j for j, b in enumerate(tree.branch) if b == label]]
                    for i, label in zip(which, labels)]
        branches = [answers[label][n_stem:-1] for label in labels]
        for got, want in zip(taken_logits(model, pack(which, branches)).split(lengths), expected):
            torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
        if rode is not None:  # the first batch's branches, run after this batch's trunks
            for got, want in zip(rider_logits.split(rode[0]), rode[1]):
                torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
        assert (rider_logits is None) == (rode is None)
        riders.append(pack(which, branches))
        rode = lengths, expected
    assert rode is not None and len(first) and len(second)


def test_a_branch_run_after_its_trunk_gives_the_logits_it_has_in_the_whole_tree(model, tokenizer):
    check_branches_after_trunks(model, tokenizer, 1e-4)


def test_scoring_methods_are_named(model, tokenizer):
    with pytest.raises(ValueError, match="choose one of"):
        score_labels(model, tokenizer, TEXTS[:1], method="fast", progress=False)


def test_long_article_is_truncated_but_keeps_instruction_and_answer_slot(tokenizer):
    empty = tokenizer.apply_chat_template(build_prompt_messages(""), add_generation_prompt=True, tokenize=True,
                                          return_dict=False)
    budget = len(empty) + 40  # room for every article but the 400-word one
    prompts, truncated = encode_prompts(tokenizer, TEXTS, max_prompt_tokens=budget)
    assert truncated == 1 and len(empty) < len(prompts[-1]) <= budget
    assert prompts[-1][:10] == empty[:10]
    assert tokenizer.decode(prompts[-1]).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_scoring_and_generation_survive_bad_input_and_garbage_answers(model, tokenizer):
    scored = score_labels(model, tokenizer, TEXTS, batch_size=3, max_length=160, progress=False)
    assert scored.truncated == 1 and np.isfinite(scored.label_logprobs).all()
    # The empty and the odd-unicode article, batched beside the truncated one, score as each does alone, uncut.
    alone = np.array([[explicit_logprob(model, tokenizer, TEXTS[i], label) for label in LABELS] for i in (4, 5)])
    np.testing.assert_allclose(scored.label_logprobs[4:6], alone, atol=1e-4)
    generated = generate_labels(model, tokenizer, TEXTS, batch_size=3, max_length=160, max_new_tokens=6,
                                progress=False)
    failed = sorted(i for idx in generated.failures.values() for i in idx)
    assert failed == [i for i, y in enumerate(generated.labels) if y == -1]
    assert len(generated.answers) == len(TEXTS) and set(generated.failures) <= {
        "empty", "no_json", "no_category", "unknown_label", "code_fence", "extra_text", "extra_keys", "case",
        "spacing"}


def test_generation_reads_back_a_well_formed_answer(model, tokenizer, monkeypatch):
    """A decoder that always answers Business checks the decode + parse path end to end."""
    from finetune.decode import GreedyDecoder

    answer = answer_token_ids(tokenizer)[LABELS.index("Business")]
    monkeypatch.setattr(GreedyDecoder, "decode", lambda self, tails: [answer] * len(tails))
    predictions = generate_labels(model, tokenizer, TEXTS[:2], batch_size=2, progress=False)
    assert list(predictions.labels) == [2, 2] and predictions.failures == {}
    assert predictions.answers[0] == build_messages("x", "Business")[2]["content"]


@pytest.fixture(scope="module")
def qwen_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("qwen")


@pytest.fixture(scope="module")
def qwen_tokenizer(qwen_cache):
    return build_qwen25_tokenizer(qwen_cache)


@pytest.fixture(scope="module")
def published_checkpoint(qwen_cache, tmp_path_factory):
    """A random Qwen2.5 stand-in folder carrying the published generation_config.json (sampling at temperature 0.7,
    repetition penalty 1.05), loaded as a user loads the real one (in float32: exact greedy comparisons)."""
    folder = write_standin(tmp_path_factory.mktemp("standin"), "tiny", cache_dir=qwen_cache)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def greedy_answer(model, tokenizer, prompt: list[int], max_new_tokens: int, penalty: float = 1.0) -> str:
    """The slow, obvious way: one token at a time, the argmax of the logits (after a repetition penalty, if any)."""
    ids, end = list(prompt), {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids], device=model.device), logits_to_keep=1).logits[:, -1]
        ids.append(int(RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([ids], device=model.device),
                                                                 logits).argmax()))
        if ids[-1] in end:
            break
    return tokenizer.decode(ids[len(prompt):], skip_special_tokens=True)


def test_generation_is_greedy_whatever_the_checkpoint_generation_config_says(published_checkpoint):
    model, tokenizer = published_checkpoint
    assert model.generation_config.do_sample and model.generation_config.repetition_penalty == 1.05
    n = 32  # a long budget, where the penalty has repeated tokens to act on
    prompts, _ = encode_prompts(tokenizer, TEXTS, 10_000)
    greedy = [greedy_answer(model, tokenizer, p, n) for p in prompts]
    penalized = [greedy_answer(model, tokenizer, p, n, PUBLISHED_GENERATION_CONFIG["repetition_penalty"])
                 for p in prompts]
    assert greedy != penalized, "the published penalty changes no answer here: this test could not see it leak in"
    generated = generate_labels(model, tokenizer, TEXTS, batch_size=3, max_new_tokens=n, progress=False)
    assert generated.answers == greedy


def answer_trained(model, tokenizer, texts: list[str], steps: int = 80) -> torch.nn.Module:
    """A copy of `model` taught to answer each text with a label (answer-only loss), so that generation follows the
    trained answers for some articles."""
    model = copy.deepcopy(model).train()
    rows = []
    for i, text in enumerate(texts):
        prompt = tokenizer.apply_chat_template(build_prompt_messages(text), add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        answer = answer_token_ids(tokenizer)[i % len(LABELS)]
        rows.append((torch.tensor([prompt + answer], device=model.device), len(prompt)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        for ids, n_prompt in rows:
            labels = ids.clone()
            labels[:, :n_prompt] = -100
            model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.slow
def test_tree_check_answers_exactly_as_greedy_decoding(trained_model, tokenizer):
    """Articles whose greedy answer is a trained one are answered from the scoring pass, the rest decoded: every
    answer is the token-by-token greedy one, and both kinds occur here."""
    trained = trained_model
    prompts, _ = encode_prompts(tokenizer, TEXTS, prompt_budget(tokenizer, 512))  # as generation
    greedy = [greedy_answer(trained, tokenizer, p, 16) for p in prompts]
    checked = generate_labels(trained, tokenizer, TEXTS, batch_size=8, progress=False)
    decoded = generate_labels(trained, tokenizer, TEXTS, batch_size=8, progress=False, tree_check=False)
    both = dict(score_then_generate(trained, tokenizer, TEXTS, batch_size=8, progress=False))
    assert checked.answers == decoded.answers == both["generation"].answers == greedy
    assert both["generation"].decoded == checked.decoded
    assert 0 < checked.decoded < len(TEXTS) and decoded.decoded == len(TEXTS)
    assert sum(a == build_messages("x", LABELS[i])[2]["content"] for i, a in enumerate(checked.answers[:4])) >= 2



@pytest.fixture(scope="module")
def trained_model(model, tokenizer):
    return answer_trained(model, tokenizer, TEXTS[:4])


@pytest.mark.parametrize("kernels", [False, True], ids=["exact", "kernels"])
def test_branches_riding_in_later_forwards_answer_as_greedy_decoding(trained_model, tokenizer, monkeypatch, kernels):
    """Six batches of articles the model answers as trained: batches 2 to 4's branches ride in the forwards of
    batches 4 to 6, after their trunks, the last two batches' run alone, and every answer is greedy decoding's; on
    the exact path here and on the CUDA kernels (Triton's interpreter), where the riders' keys are read in place."""
    from finetune import packed

    if kernels:
        monkeypatch.setattr(packed, "_on_kernels", lambda q: True)
    rode, with_riders = [], predict.with_riders
    monkeypatch.setattr(predict, "with_riders", lambda batch, riders: rode.append(1) or with_riders(batch, riders))
    texts = TEXTS[:4] * 3
    checked = generate_labels(trained_model, tokenizer, texts, batch_size=2, progress=False)
    decoded = generate_labels(trained_model, tokenizer, texts, batch_size=2, progress=False, tree_check=False)
    assert checked.answers == decoded.answers and checked.decoded < len(texts) // 2
    assert len(rode) == 3

def test_decoding_reads_the_stop_flag_from_the_trained_answers_length_on(model, tokenizer, monkeypatch):
    """Each read of the stop flag waits for the GPU, so none is made before a row of a model answering as trained
    could have ended: with every row ending at its first step, a batch still runs steps up to the longest trained
    answer's length, and each answer is cut at its end token as before (its first token alone)."""
    from finetune.decode import GreedyDecoder

    forward, steps = GreedyDecoder._forward, []

    def ending(self):  # every row's next token is the end-of-turn
        forward(self)
        self.next_tokens.fill_(tokenizer.convert_tokens_to_ids("<|im_end|>"))
        steps.append(1)

    monkeypatch.setattr(GreedyDecoder, "_forward", ending)
    decoded = generate_labels(model, tokenizer, TEXTS[:4], batch_size=4, max_new_tokens=16, progress=False,
                              tree_check=False)
    assert len(steps) == max(map(len, answer_token_ids(tokenizer))) - 1 > 1
    prompts, _ = encode_prompts(tokenizer, TEXTS[:4], prompt_budget(tokenizer, 512))
    assert decoded.answers == [greedy_answer(model, tokenizer, p, 1) for p in prompts]


@pytest.fixture(scope="module")
def evaluation_model(tokenizer, tmp_path_factory):
    """The model as evaluation loads it (`load_for_inference`), with fewer key/value heads than query heads."""
    from finetune.config import get_config
    from finetune.model import load_for_inference

    config = get_config("tiny", hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                        checkpoints_dir=str(tmp_path_factory.mktemp("c")))
    return load_for_inference(config, tokenizer)


def test_evaluation_decodes_without_copying_keys_and_the_anchor_as_transformers_does(evaluation_model, tokenizer,
                                                                                     monkeypatch):
    """The model evaluation loads takes the suite's attention: decoding its left-padded batches never calls
    transformers' `repeat_kv` (a copy of every key per query head, at every step) and answers as transformers' own sdpa
    does. The benchmark's plain `generate` anchor keeps transformers' attention, and hands the model back as it was."""
    import transformers.integrations.sdpa_attention as sdpa_attention

    from finetune.attention import VARLEN, attention_implementation
    from finetune.lab.bench_eval import plain_generate

    model = evaluation_model
    assert model.config._attn_implementation == VARLEN
    copies, repeat_kv = [], sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda *args: copies.append(args[1]) or repeat_kv(*args))
    texts = TEXTS[:5]

    def answers() -> list[str]:
        return generate_labels(model, tokenizer, texts, batch_size=4, max_length=512, progress=False,
                               tree_check=False).answers

    ours = answers()
    assert copies == []
    plain_generate(model, tokenizer, texts, 4, 512)
    assert set(copies) == {2} and model.config._attn_implementation == VARLEN
    with attention_implementation(model, "sdpa"):
        assert answers() == ours


def test_the_opening_runs_without_looking_for_packed_articles_in_its_positions(evaluation_model, tokenizer,
                                                                               monkeypatch):
    """Under the suite's varlen attention the opening runs sdpa itself: the varlen attention looks for packed articles
    in a row's positions, and on CUDA reading them back stops the host in every layer. Its cache is the one the varlen
    attention's own path for one sequence gives, to the bit."""
    import finetune.attention as attention

    looked, boundaries = [], attention._boundaries_from_positions
    monkeypatch.setattr(attention, "_boundaries_from_positions", lambda p: looked.append(p) or boundaries(p))
    prompts, _ = encode_prompts(tokenizer, TEXTS[:3], 512)
    with torch.inference_mode():
        length, ours = predict.shared_opening(evaluation_model, prompts)
        assert looked == []
        theirs = evaluation_model(input_ids=torch.tensor([prompts[0][:length]]), use_cache=True).past_key_values
    assert looked  # the varlen attention's path, which the opening no longer takes
    for mine, other in zip(ours.layers, theirs.layers, strict=True):
        assert torch.equal(mine.keys, other.keys) and torch.equal(mine.values, other.values)


def test_evaluation_switches_cudnn_attention_off_once_a_pass(evaluation_model, tokenizer, monkeypatch):
    """Every attention call of label scoring and decoding runs with cuDNN's attention off (it rebuilds its graph for
    each new shape), switched once around each pass: not by each masked call, one a layer at every decoding step,
    whose switching is Python time on a host that decoding waits for. A masked call outside a pass still switches."""
    from finetune import attention

    model = evaluation_model
    switches, cudnn_on, real = [], [], attention.without_cudnn_attention
    monkeypatch.setattr(attention, "without_cudnn_attention", lambda: switches.append(1) or real())
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: cudnn_on.append(torch.backends.cuda.cudnn_sdp_enabled())
                        or sdpa(*args, **kwargs))
    generate_labels(model, tokenizer, TEXTS[:5], batch_size=4, max_length=512, progress=False, tree_check=False)
    score_labels(model, tokenizer, TEXTS[:5], batch_size=4, progress=False, method="tree")
    assert len(cudnn_on) > 2 * model.config.num_hidden_layers and not any(cudnn_on)
    assert switches == [] and torch.backends.cuda.cudnn_sdp_enabled()
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    attention._masked_grouped_attention(q, k, v, torch.ones(2, 1, 3, 5, dtype=torch.bool), 0.0, None)
    assert switches == [1] and cudnn_on[-1] is False


def test_tree_check_stops_after_a_batch_mostly_off_the_trained_answers(model, tokenizer, monkeypatch):
    """An untrained model never answers as trained: one batch is checked, then every article decodes."""
    checked_batches = []
    packed_logits = predict.packed_logits
    monkeypatch.setattr(predict, "packed_logits", lambda *a: checked_batches.append(1) or packed_logits(*a))
    generated = generate_labels(model, tokenizer, TEXTS, batch_size=2, max_new_tokens=8, progress=False)
    assert len(checked_batches) == 1 and generated.decoded == len(TEXTS)


def test_one_pass_scores_and_generates_as_each_mode_alone(model, tokenizer, monkeypatch):
    """score_then_generate's scores are score_labels', its answers generate_labels', and its one pass checks every
    batch: the pass runs for the scores anyway, where generate_labels alone stops at the first batch an untrained model
    mostly answers otherwise."""
    checked = []
    tree_logits = predict._tree_logits
    monkeypatch.setattr(predict, "_tree_logits", lambda *a: checked.append(1) or tree_logits(*a))
    both = dict(score_then_generate(model, tokenizer, TEXTS, batch_size=2, max_new_tokens=8, progress=False))
    assert len(checked) == 4  # 7 articles, batches of 2
    scored = score_labels(model, tokenizer, TEXTS, batch_size=2, progress=False)
    generated = generate_labels(model, tokenizer, TEXTS, batch_size=2, max_new_tokens=8, progress=False)
    np.testing.assert_array_equal(both["label_scoring"].label_logprobs, scored.label_logprobs)
    assert both["label_scoring"].labels.tolist() == scored.labels.tolist()
    assert both["generation"].answers == generated.answers and both["generation"].decoded == len(TEXTS)
    assert both["generation"].failures == generated.failures


def test_tree_check_reads_each_forward_behind_the_next_and_decodes_from_the_batch_that_stops_it(model, tokenizer,
                                                                                                 monkeypatch):
    """The first batch is checked at once: its trunks, the branches they picked in a forward of their own, their
    check. Later, a batch's picks are read once the next batch's trunks are queued, its branches ride in the forward
    after that, after its trunks, and their check is read once the batch after is queued: the host never waits for
    the forward it has just queued. Batches 1 and 2 follow a trained answer and are answered by the check; batch 3
    picks no branch (nothing rides in batch 5) and stops the check when read, as batch 6's trunks are queued: batches
    4 to 7 decode with it, batch 4's branches rode for nothing. Without a stop, the last two batches' branches run
    in forwards of their own."""
    answers = answer_token_ids(tokenizer)
    tree = AnswerTree.from_answers(answers)
    n_stem = len(tree.tokens) - len(tree.branch)
    follows, decoded, events = [True, True, False, True, True, True, True], [], []
    branch_logits = lambda: logits_choosing(answers[0][n_stem + 1:] * 2)  # each article on the first answer's branch

    def logits_choosing(tokens: list[int]) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor(tokens), len(tokenizer)).float()

    def trunk_passes(model, prompts, tree_, batch_size, progress, riders):
        for k, batch in enumerate(predict.length_sorted_batches(prompts.texts, batch_size)):
            rider = riders.pop() if riders else None
            events.append("trunks" + (f" + batch {rider}'s branches" if rider else ""))
            # every greedy choice along the first answer's stem into its branch, or none
            choices = answers[0][:n_stem + 1] if follows[k] else [0] * (n_stem + 1)

            def pack(which, branches, k=k):
                assert branches == [answers[0][n_stem:-1]] * len(which)
                return k + 1  # stands for the packed branches: the batch they are from

            yield batch, (logits_choosing(choices).expand(len(batch), -1, -1), rider and branch_logits(), pack)

    def taken_logits(model, packed):
        events.append(f"batch {packed}'s branches alone")
        return branch_logits()

    monkeypatch.setattr(generation, "trunk_passes", trunk_passes)
    monkeypatch.setattr(generation, "taken_logits", taken_logits)
    monkeypatch.setattr(generation, "_decode", lambda model, tokenizer, prompts, *args: (
        decoded.extend(prompts) or ["decoded"] * len(prompts), np.zeros(len(prompts)), False))
    record_host_copies(monkeypatch, generation, events)
    generated = generate_labels(model, tokenizer, [f"article {i}" for i in range(14)], batch_size=2, progress=False)
    assert events == ["trunks", "copy", "read", "batch 1's branches alone", "copy", "read",  # batch 1, at once
                      "trunks", "copy",  # batch 2 queued
                      "trunks", "copy", "read",  # batch 3 queued: batch 2's picks, its branches to ride next
                      "trunks + batch 2's branches", "copy", "copy", "read",  # batch 2 checked; batch 3 picks none
                      "trunks", "copy", "read", "read",  # batch 5 queued: batch 4's picks; batch 2's check read
                      "trunks + batch 4's branches", "copy", "copy", "read"]  # batch 3's check (none) stops it
    assert generated.decoded == len(decoded) == 10
    assert sorted(generated.answers).count("decoded") == 10 and list(generated.labels).count(0) == 4

    events.clear()
    follows[2] = True
    generated = generate_labels(model, tokenizer, [f"article {i}" for i in range(10)], batch_size=2, progress=False)
    assert events[-13:] == ["trunks + batch 3's branches", "copy", "copy", "read", "read",  # batch 5 queued
                            "batch 4's branches alone", "copy",  # no forward left for them to ride in
                            "read", "batch 5's branches alone", "copy",  # nor for batch 5's
                            "read", "read", "read"]  # the checks of batches 3, 4 and 5
    assert generated.decoded == 0 and list(generated.labels).count(0) == 10


def test_qwen_gets_room_for_a_fenced_instruct_answer(qwen_tokenizer):
    """The trained answers are 6 to 8 Qwen2.5 tokens (Sci/Tech longest), end-of-turn included; 8 more of headroom
    hold the answer as an instruct model writes it before fine-tuning, fence, spaces and end-of-turn included."""
    assert [len(a) for a in answer_token_ids(qwen_tokenizer)] == [6, 6, 6, 8]
    fenced = qwen_tokenizer('```json\n{"category": "Sci/Tech"}\n```<|im_end|>', add_special_tokens=False)["input_ids"]
    assert default_max_new_tokens(qwen_tokenizer) == 16 >= len(fenced)


def test_default_max_new_tokens_follows_the_tokenizer(tokenizer, tmp_path):
    """The tiny BPE learns the answers as Qwen2.5 knows them (8 tokens at most): 16 new tokens. A coarse BPE (270
    tokens: hardly a merge) spells them out, and its budget grows with them, the same 8 to spare."""
    coarse = train_bpe_tokenizer(TEXTS[:4] * 20, vocab_size=270, cache_dir=tmp_path)
    longest = max(map(len, answer_token_ids(coarse)))
    assert default_max_new_tokens(tokenizer) == 16
    assert longest > 8 and default_max_new_tokens(coarse) == longest + 8


def test_compiled_layers_compile_the_same_graphs_whatever_the_number_of_layers(tokenizer, tmp_path):
    """Packed label scoring and decoding through compiled decoder layers (`--compile_layers`) compile as many graphs
    for 4 layers as for 2: nothing in a pass makes each layer compile its own. The 7B's 28 would pass torch's limit of
    8 a function, and the layers would then run uncompiled, in that pass and every later one."""
    from torch._dynamo.utils import counters

    from finetune.config import get_config
    from finetune.speedups import compile_decoder_layers

    compiled = []
    for layers in (2, 4):
        config = get_config("tiny", hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                            num_layers=layers, checkpoints_dir=str(tmp_path))
        model = load_model(config, tokenizer).eval()
        compile_decoder_layers(model, backend="eager")
        torch._dynamo.reset()
        counters.clear()
        score_labels(model, tokenizer, TEXTS, batch_size=4, progress=False, method="packed")
        generate_labels(model, tokenizer, TEXTS, batch_size=4, max_new_tokens=4, progress=False, tree_check=False)
        compiled.append(counters["frames"]["ok"])
    assert compiled[0] == compiled[1] > 0


def test_one_pass_logsumexp_matches_torch_over_qwens_vocabulary():
    """The kernel label scoring reads each row's normalizer from (on Triton's interpreter without a GPU): rows of
    Qwen2.5's 152,064 logits, whose last block is partial, spread wide enough that a running maximum must rescale."""
    from finetune.logsumexp_kernel import row_logsumexp

    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 152_064, generator=generator) * 4
    logits[0, 0, -1] = 60.0  # the maximum in the last, partial block
    logits[1, 1, :4096] -= 80.0  # the first block far below the rest
    logits = logits.bfloat16().to(device)
    np.testing.assert_allclose(row_logsumexp(logits).cpu(), torch.logsumexp(logits.float(), -1).cpu(), rtol=1e-6)


def test_the_logsumexp_kernel_compiles_offline_for_hopper_and_the_dgx_spark():
    """A kernel the interpreter runs can still fail to compile: compiled on this CPU from the arguments label scoring
    passes, for sm_90 (H100, H200) and sm_121 (GB10, the DGX Spark), its loads of the bf16 logits are vectors."""
    script = ("import json, torch; import finetune.logsumexp_kernel as k; "
              "from finetune.lab.sass_adamw8bit import compile_offline, first_launch; "
              "launch = first_launch(k, '_row_logsumexp', lambda: k.row_logsumexp(torch.zeros(2, 152_064, "
              "dtype=torch.bfloat16))); "
              "print(json.dumps([compile_offline(k._row_logsumexp, *launch, arch).asm['ptx'].count('ld.global.v4') "
              "for arch in (90, 121)]))")
    assert all(compiled_offline_output(script))


@pytest.mark.gpu
def test_answer_logprobs_on_cuda_are_log_softmax_read_at_the_terms(tokenizer):
    tree = AnswerTree.from_answers(answer_token_ids(tokenizer))
    terms = predict.AnswerTreeTerms.of(tree, torch.device("cuda"))
    tail = len(tree.tokens) + 1
    logits = (torch.randn(64, tail, len(tokenizer), device="cuda") * 4).bfloat16()
    want = torch.log_softmax(logits, -1, dtype=torch.float32)[:, terms.positions, terms.tokens] @ terms.owner
    # Sums of a few log-probabilities near -80: the kernel and torch add in other orders, an ulp or two apart.
    torch.testing.assert_close(predict.answer_logprobs(logits, terms), want, rtol=1e-6, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("grouped_varlen", [False, True], ids=["flash_attention", "grouped_varlen"])
def test_packed_scoring_on_cuda_matches_the_tree(tokenizer, tmp_path, grouped_varlen):
    """The varlen kernel's path (FlashAttention's, or the grouped one) against the 4D-mask one, on a bf16 model as the
    7B runs."""
    from finetune.config import get_config

    config = get_config("tiny", hidden_size=256, num_heads=2, num_kv_heads=1, intermediate_size=256, bf16=True,
                        checkpoints_dir=str(tmp_path))  # head_dim 128, GQA, as in the 7B
    model = load_model(config, tokenizer).cuda().eval()
    texts = TEXTS * 10
    tree = score_labels(model, tokenizer, texts, batch_size=16, progress=False, method="tree")
    with attention_kernels(grouped_varlen=grouped_varlen):
        packed = score_labels(model, tokenizer, texts, batch_size=16, progress=False, method="packed")
    np.testing.assert_allclose(packed.label_logprobs, tree.label_logprobs, atol=0.05)


@pytest.mark.gpu
def test_a_branch_run_after_its_trunk_on_cuda_gives_the_logits_it_has_in_the_whole_tree(tokenizer, tmp_path):
    """The branches through the varlen kernel against the whole tree's through the branches' kernel, bf16."""
    from finetune.config import get_config

    config = get_config("tiny", hidden_size=256, num_heads=2, num_kv_heads=1, intermediate_size=256, bf16=True,
                        checkpoints_dir=str(tmp_path))  # head_dim 128, GQA, as in the 7B
    check_branches_after_trunks(load_model(config, tokenizer).cuda().eval(), tokenizer, 0.05)


@pytest.mark.gpu
def test_packing_the_next_batch_on_cuda_does_not_wait_for_the_gpu(tokenizer):
    """Each batch is packed while the previous one's forward runs: no copy may synchronize (a pageable one waits for
    everything queued), or the GPU idles through every batch's packing and launch. The copies still arrive intact."""
    tree = AnswerTree.from_answers(answer_token_ids(tokenizer))
    articles = [[5, 6, 7], [8], [9, 10]]
    expected, prefill_expected = pack_batch(articles, tree, 4, "cpu"), pack_prefill(articles, 4, None, "cpu")
    branches = [[3, 4], [5, 6, 7, 8]]
    taken_expected = pack_taken(pack_batch(articles, tree, 4, "cpu", with_branches=False), [2, 0], branches, "cpu")
    busy = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):  # work the copies would otherwise wait for
        busy = busy @ busy / 64
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch, prefill = pack_batch(articles, tree, 4, "cuda"), pack_prefill(articles, 4, None, "cuda")
        taken = pack_taken(pack_batch(articles, tree, 4, "cuda", with_branches=False), [2, 0], branches, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(batch.ids.cpu(), expected.ids) and torch.equal(batch.key_index.cpu(), expected.key_index)
    assert torch.equal(prefill.cache_slots.cpu(), prefill_expected.cache_slots)
    assert torch.equal(taken.key_index.cpu(), taken_expected.key_index)


@pytest.mark.gpu
@pytest.mark.parametrize("grouped_varlen", [False, True], ids=["flash_attention", "grouped_varlen"])
def test_tree_check_on_cuda_answers_as_greedy_decoding(tokenizer, tmp_path, grouped_varlen):
    """On CUDA the tree check reads the packed rows' logits (the varlen kernel, FlashAttention's or the grouped one,
    which decoding's prefill takes too): the same answers as decoding; with the scores from the same pass, the scores
    of label scoring."""
    from finetune.config import get_config

    # head_dim 16 (the kernel needs multiples of 8), GQA. Narrow enough to learn the answer format in 80 steps (a
    # 256-wide one did not, and nothing then reached the check); taught on every text, so every batch stays on the
    # trained answers and the check is not stopped early (the CPU test covers articles that decode).
    config = get_config("tiny", hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                        checkpoints_dir=str(tmp_path))
    model = load_model(config, tokenizer).cuda()
    trained = answer_trained(model, tokenizer, TEXTS).to(torch.bfloat16)  # the varlen kernel: bf16
    with attention_kernels(grouped_varlen=grouped_varlen):
        checked = generate_labels(trained, tokenizer, TEXTS * 4, batch_size=8, progress=False)
        decoded = generate_labels(trained, tokenizer, TEXTS * 4, batch_size=8, progress=False, tree_check=False)
        both = dict(score_then_generate(trained, tokenizer, TEXTS * 4, batch_size=8, progress=False))  # one pass
        scored = score_labels(trained, tokenizer, TEXTS * 4, batch_size=8, progress=False)
    assert checked.answers == decoded.answers and checked.decoded < len(checked.answers)
    assert both["generation"].answers == checked.answers and both["generation"].decoded == checked.decoded
    np.testing.assert_array_equal(both["label_scoring"].label_logprobs, scored.label_logprobs)


@pytest.mark.gpu
def test_decoding_on_cuda_replays_one_captured_step_and_answers_as_greedy_decoding(tokenizer, tmp_path, monkeypatch):
    """On CUDA a decoding step is captured once per pass, then replayed for every later step of every batch (batches
    of two sizes here: the smaller filled up); the answers are still the token-by-token greedy ones."""
    from finetune.config import get_config

    config = get_config("tiny", hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                        checkpoints_dir=str(tmp_path))
    model = load_model(config, tokenizer).cuda().eval()  # float32: exact greedy comparisons
    captures, replays = [], []
    capture_begin, replay = torch.cuda.CUDAGraph.capture_begin, torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", lambda self, *a, **k: captures.append(1)
                        or capture_begin(self, *a, **k))
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: replays.append(1) or replay(self))
    texts = TEXTS * 3 + TEXTS[:1]  # 22 articles in batches of 8: 8, 7 and 7
    generated = generate_labels(model, tokenizer, texts, batch_size=8, max_new_tokens=12, progress=False,
                                tree_check=False)
    prompts, _ = encode_prompts(tokenizer, texts, prompt_budget(tokenizer, 512))
    assert generated.answers == [greedy_answer(model, tokenizer, p, 12) for p in prompts]
    assert len(captures) == 1 and len(replays) > 2 and generated.decoding_cuda_graph is True


@pytest.mark.gpu
def test_decoding_on_cuda_goes_on_step_by_step_when_capture_fails(tokenizer, tmp_path, monkeypatch, caplog):
    """A step that cannot be captured (here one that reads a value back mid-step, as a host sync would) is said once
    in the log, decoding goes on a launch at a time with the same greedy answers, and CUDA's random generator is left
    as it was, usable."""
    from finetune.config import get_config
    from finetune.decode import GreedyDecoder

    config = get_config("tiny", hidden_size=64, intermediate_size=128, checkpoints_dir=str(tmp_path))
    model = load_model(config, tokenizer).cuda().eval()
    forward = GreedyDecoder._forward
    monkeypatch.setattr(GreedyDecoder, "_forward", lambda self: forward(self) or self.next_tokens.sum().item())
    rng = torch.cuda.get_rng_state()
    generated = generate_labels(model, tokenizer, TEXTS, batch_size=4, max_new_tokens=8, progress=False,
                                tree_check=False)
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    torch.randn(4, device="cuda")  # a failed capture left the generator mid-capture: this draw raised
    prompts, _ = encode_prompts(tokenizer, TEXTS, prompt_budget(tokenizer, 512))
    assert generated.answers == [greedy_answer(model, tokenizer, p, 8) for p in prompts]
    assert sum("capturing a step as a CUDA graph failed" in r.message for r in caplog.records) == 1
    assert torch.cuda.current_stream() == torch.cuda.default_stream()  # the failed capture's stream is left behind
    assert generated.decoding_cuda_graph is False
