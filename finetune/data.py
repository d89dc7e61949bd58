"""From the run config to AG News splits, and from splits to the prompt/completion datasets TRL trains on."""

import json
import logging
from pathlib import Path

import datasets
import pandas as pd
from transformers import PreTrainedTokenizerBase

from data_prep.read import DataError, load_ag_news
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


def check_held_out(config: RunConfig, splits: Splits, model_path: str | Path) -> None:
    """A model this suite trained (its train_summary.json beside the weights) on a holdout carve is evaluated on the
    same carve's other side: with another seed, carve size or data, or on the whole split under the standard
    protocol, some evaluation articles would be ones it trained on."""
    summary = Path(model_path) / "train_summary.json"
    if not summary.is_file():
        return  # trained elsewhere: nothing to compare
    trained = json.loads(summary.read_text())
    data, carve = trained["data"], trained["config"].get("holdout_train_size")
    if data["protocol"] != "holdout":
        return  # trained on the train split: no evaluation split holds its articles
    now = splits.describe()
    if (now["protocol"], now["source_sha256"], now["seed"], config.holdout_train_size) != (
            "holdout", data["source_sha256"], data["seed"], carve):
        raise DataError(f"{model_path} was trained on a holdout carve of {data['source']} (data {data['source_sha256']}"
                        f", split_seed {data['seed']}, holdout_train_size {carve}); this evaluation's articles "
                        f"(protocol {now['protocol']}, data {now['source_sha256']}, split_seed {now['seed']}, "
                        f"holdout_train_size {config.holdout_train_size}) would include articles it trained on. "
                        "Evaluate on the same data with --protocol holdout and its split_seed and holdout_train_size.")


def to_prompt_completion(df: pd.DataFrame, tokenizer: PreTrainedTokenizerBase, max_length: int) -> datasets.Dataset:
    """Conversational prompt/completion rows: TRL then puts the loss on the assistant answer alone.

    An article too long for `max_length` loses the end of its text, as at evaluation, so that every example keeps
    its answer: TRL cuts an over-long tokenized example from the right, answer first."""
    room = prompt_budget(tokenizer, max_length)
    return datasets.Dataset.from_dict({
        "prompt": [build_prompt_messages(text) for text in fit_articles(tokenizer, list(df["text"]), room)],
        "completion": [[{"role": "assistant", "content": format_answer(LABELS[y])}] for y in df["label"]],
    })
