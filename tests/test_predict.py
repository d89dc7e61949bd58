"""Label scoring equals an explicit per-answer log-probability; generation parsing counts every failure kind."""

import numpy as np
import pytest
import torch

from data_prep.task import LABELS, build_messages, build_prompt_messages
from finetune.model import load_model, train_bpe_tokenizer
from finetune.predict import answer_token_ids, encode_prompts, generate_labels, parse_answer, score_labels

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


def test_label_scoring_equals_explicit_per_answer_logprob(model, tokenizer):
    texts = TEXTS[:6]
    predictions = score_labels(model, tokenizer, texts, batch_size=4, max_length=512, progress=False)
    expected = np.array([[explicit_logprob(model, tokenizer, t, label) for label in LABELS] for t in texts])
    np.testing.assert_allclose(predictions.label_logprobs, expected, atol=1e-4)
    assert list(predictions.labels) == list(expected.argmax(1))
    assert predictions.truncated == 0 and (predictions.batch_seconds > 0).all()


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
    assert scored.truncated == 1 and set(scored.labels) <= {0, 1, 2, 3}
    generated = generate_labels(model, tokenizer, TEXTS, batch_size=3, max_length=160, max_new_tokens=6,
                                progress=False)
    failed = sorted(i for idx in generated.failures.values() for i in idx)
    assert failed == [i for i, y in enumerate(generated.labels) if y == -1]
    assert len(generated.answers) == len(TEXTS) and set(generated.failures) <= {
        "empty", "not_json", "no_category", "unknown_label"}


@pytest.mark.parametrize("answer, expected", [
    ('{"category":"Sports"}', (1, None)),
    (' {"category": "Sci/Tech"} ', (3, None)),
    ("", (-1, "empty")),
    ("   \n", (-1, "empty")),
    ("Sports", (-1, "not_json")),
    ('{"category":"Spo', (-1, "not_json")),
    ('{"label":"Sports"}', (-1, "no_category")),
    ('["Sports"]', (-1, "no_category")),
    ('{"category":"Politics"}', (-1, "unknown_label")),
    ('{"category":null}', (-1, "unknown_label")),
])
def test_parse_answer_names_each_failure_kind(answer, expected):
    assert parse_answer(answer) == expected


def test_generation_reads_back_a_well_formed_answer(tokenizer):
    """A stand-in model that always answers Business checks the decode + parse path end to end."""
    answer = answer_token_ids(tokenizer)[LABELS.index("Business")]

    class AlwaysBusiness(torch.nn.Module):
        device = torch.device("cpu")

        def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
            return torch.cat([input_ids, torch.tensor([answer] * len(input_ids))], 1)

    predictions = generate_labels(AlwaysBusiness(), tokenizer, TEXTS[:2], batch_size=2, progress=False)
    assert list(predictions.labels) == [2, 2] and predictions.failures == {}
    assert predictions.answers[0] == build_messages("x", "Business")[2]["content"]
