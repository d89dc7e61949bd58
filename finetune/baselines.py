"""Classic baselines on the same split as the LLM runs: majority class and TF-IDF + logistic regression.

    python -m finetune.baselines --profile tiny
"""

import time
from pathlib import Path

import numpy as np
from sklearn.dummy import DummyClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from data_prep.read import DataError
from data_prep.splits import Splits
from finetune.config import RunConfig, config_from_args
from finetune.data import load_splits
from finetune.metrics import Predictions, summarize
from finetune.results import write_record

BASELINES = {
    "majority": lambda seed: DummyClassifier(strategy="most_frequent"),
    # Word uni+bigrams with sublinear tf: the usual strong linear baseline for topic classification.
    "tfidf_logreg": lambda seed: make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
        LogisticRegression(C=10.0, max_iter=2000, random_state=seed),
    ),
}


def run_baseline(name: str, config: RunConfig, splits: Splits | None = None) -> dict:
    """Fit baseline `name` on the train split, evaluate on the eval split, write `baseline_<name>_results.json`."""
    splits = splits or load_splits(config)
    start = time.perf_counter()
    model = BASELINES[name](config.seed).fit(splits.train["text"], splits.train["label"])
    fit_seconds = time.perf_counter() - start
    texts = list(splits.eval["text"])
    t0 = time.perf_counter()
    labels = model.predict(texts)
    seconds = time.perf_counter() - t0
    predictions = Predictions(labels=np.asarray(labels), batch_seconds=np.full(len(texts), seconds), truncated=0)
    record = {
        "name": f"baseline_{name}", "kind": "baseline", "profile": config.profile, "model": name,
        "config": {"baseline": name, "params": {k: repr(v) for k, v in model.get_params(deep=False).items()},
                   "seed": config.seed, "fit_seconds": fit_seconds},
        "data": splits.describe(), "primary_mode": "classifier",
        "evaluations": {"classifier": summarize(splits.eval["label"].to_numpy(), predictions, texts, len(texts), seconds)},
        "wall_seconds": time.perf_counter() - start,
    }
    write_record(record, Path(config.results_dir) / f"baseline_{name}_results.json")
    return record


def main(argv: list[str] | None = None) -> None:
    config = config_from_args(argv, description=__doc__)
    try:
        splits = load_splits(config)
    except DataError as error:  # as train and evaluate end on bad data: the message, no traceback
        raise SystemExit(f"error: {error}") from None
    for name in BASELINES:
        accuracy = run_baseline(name, config, splits)["evaluations"]["classifier"]["metrics"]["accuracy"]
        print(f"{name}: accuracy {accuracy:.2%}")


if __name__ == "__main__":
    main()
