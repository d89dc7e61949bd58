"""Turn AG News into the chat JSONL the suite trains and evaluates on: read, clean, split, write.

    python -m data_prep.convert_dataset --source /path/to/ag_news --out data/ag_news_chat
"""

import argparse
import json
import logging
from pathlib import Path

import pandas as pd

from data_prep.read import DataError, load_ag_news
from data_prep.source import DATA_ENV
from data_prep.splits import HOLDOUT_TRAIN_SIZE, SPLIT_SEED, make_splits
from data_prep.task import LABELS, build_messages


def to_chat_records(df: pd.DataFrame) -> list[dict]:
    """Chat-format examples, one per article, in the shape the trainer and the JSONL share."""
    return [{"id": i, "label": LABELS[y], "messages": build_messages(t, LABELS[y])}
            for i, t, y in zip(df["id"], df["text"], df["label"])]


def write_jsonl(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help=f"folder with AG News files (default: ${DATA_ENV}, else the hub)")
    parser.add_argument("--out", default="data/ag_news_chat", help="output folder for train.jsonl and eval.jsonl")
    parser.add_argument("--protocol", default="auto", choices=["auto", "standard", "holdout"])
    parser.add_argument("--holdout-train-size", type=int, default=HOLDOUT_TRAIN_SIZE)
    parser.add_argument("--seed", type=int, default=SPLIT_SEED, help="seed of the holdout carve (default: %(default)s)")
    parser.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows and report the count")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        data, source = load_ag_news(args.source, args.skip_bad_rows)
        splits = make_splits(data, source, args.protocol, args.holdout_train_size, args.seed)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    out = Path(args.out)
    write_jsonl(to_chat_records(splits.train), out / "train.jsonl")
    write_jsonl(to_chat_records(splits.eval), out / "eval.jsonl")
    (out / "splits.json").write_text(json.dumps(splits.describe(), indent=2) + "\n")
    print(f"wrote {len(splits.train)} train and {len(splits.eval)} eval examples ({splits.protocol}) to {out}/")
    for note in splits.notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
