"""Training examples as TRL tokenizes them: an over-long article loses the end of its text, never its answer."""

import dataclasses

import pandas as pd
import pytest
from trl import SFTTrainer

from data_prep.task import LABELS, build_prompt_messages, format_answer
from finetune.data import to_prompt_completion
from finetune.model import load_model, train_bpe_tokenizer
from finetune.train import sft_config

LONG = " ".join(["Rebels and troops agree to a ceasefire after talks in the capital city."] * 100)
NORMAL = "NASA tests a new chip."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer([LONG, NORMAL] * 20, vocab_size=400, cache_dir=tmp_path_factory.mktemp("tok"))


def test_over_long_article_is_cut_and_still_trains_its_full_answer(tokenizer, tiny_config):
    """Unpacked, so that each tokenized example is its own row; TRL truncates at max_length either way."""
    config = dataclasses.replace(tiny_config, max_length=96, packing=False)
    examples = to_prompt_completion(pd.DataFrame({"text": [LONG, NORMAL], "label": [0, 3]}), tokenizer,
                                    config.max_length)
    trainer = SFTTrainer(model=load_model(config, tokenizer), args=sft_config(config), train_dataset=examples,
                         processing_class=tokenizer)
    rows = trainer.train_dataset
    assert len(rows) == 2  # TRL drops an example whose answer was cut off entirely
    for row, label in zip(rows, (LABELS[0], LABELS[3])):
        answer = format_answer(label) + "<|im_end|>\n"
        trained = [token for token, target in zip(row["input_ids"], row["labels"]) if target != -100]
        assert len(row["input_ids"]) <= config.max_length
        assert tokenizer.decode(trained) == answer
        assert tokenizer.decode(row["input_ids"]).endswith("<|im_start|>assistant\n" + answer)
    article = examples[0]["prompt"][1]["content"]
    assert LONG[:60] in article and len(article) < len(LONG) / 4
    assert examples[1]["prompt"] == build_prompt_messages(NORMAL)
