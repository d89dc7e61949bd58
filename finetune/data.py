"""From the run config to AG News splits, and from splits to the prompt/completion datasets TRL trains on."""

import logging

import datasets
import pandas as pd
from transformers import PreTrainedTokenizerBase

from data_prep.read import load_ag_news
from data_prep.splits import Splits, make_splits
from data_prep.task import LABELS, build_prompt_messages, format_answer
from finetune.config import RunConfig
from finetune.prompts import fit_articles, prompt_budget

log = logging.getLogger(__name__)


def load_splits(config: RunConfig) -> Splits:
    """The train/eval articles for this run, by the config's data source, protocol and sample limits."""
    data, source = load_ag_news(config.data_dir, config.skip_bad_rows)
    splits = make_splits(data, source, config.protocol, config.holdout_train_size, config.split_seed,
                         config.max_train_samples, config.max_eval_samples)
    for note in splits.notes:
        log.warning(note)
    return splits


def to_prompt_completion(df: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, max_length: int) -> datasets.Dataset:
    """Conversational prompt/completion rows: TRL then puts the loss on the assistant answer alone.

    An article too long for `max_length` loses the end of its text, as at evaluation, so that every example keeps
    its answer: TRL cuts an over-long tokenized example from the right, answer first."""
    room = prompt_budget(tokenizer, max_length)
    return datasets.Dataset.from_dict({
        "prompt": [build_prompt_messages(text) for text in fit_articles(tokenizer, list(df["text"]), room)],
        "completion": [[{"role": "assistant", "content": format_answer(LABELS[y])}] for y in df["label"]],
    })
