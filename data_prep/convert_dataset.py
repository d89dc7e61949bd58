"""Load AG News from a folder or the hub, clean its text, carve train/eval splits and write chat JSONL.

    python -m data_prep.convert_dataset --source ../shared/data/ag_news --out data/ag_news_chat
"""

import argparse
import csv
import gzip
import hashlib
import html
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from data_prep.config import LABELS, build_messages
from data_prep.source import DATA_ENV, HUB_DATASET, NO_DATA_MESSAGE, hub_reachable

log = logging.getLogger(__name__)

class DataError(ValueError):
    """Bad or missing input data; the message names the file and line, or how to supply the data."""


# AG News was scraped with the ampersand of most HTML entities turned into a space ("Apple&#39;s" became
# "Apple #39;s", "a &quot;real&quot; truce" became "a  quot;real quot; truce") and its line breaks written as
# backslashes. In the test split every bare entity has a space before it, and a space that was really there shows as
# a second one, so one space before a bare entity is the lost ampersand. We put the ampersands back so html.unescape
# can decode the entities (it also maps Windows-1252 codes such as #151; to an em dash), keep decoded "<TXN.N>"
# ticker symbols, drop real HTML tags, and turn backslashes into spaces. The same function runs on every split, so
# train and eval text never differ in kind.
_BARE_ENTITY = re.compile(r"(?<!&) ?(#\d{2,5};|\b(?:quot|amp|lt|gt|nbsp|hellip);)")
_HTML_TAG = re.compile(r"</?(?:a|b|i|p|br|em|strong|font|span|div)\b[^<>]*>", re.IGNORECASE)


def normalize_text(text: str) -> str:
    """Clean one AG News text: decode entities, drop HTML tags and backslash line breaks, squeeze spaces."""
    text = html.unescape(_BARE_ENTITY.sub(r"&\1", text)).replace("\\", " ")
    text = _HTML_TAG.sub(" ", text)
    return " ".join(text.split())


def near_duplicate_key(description: str) -> str:
    """The first 80 letters and digits of a description, lower-cased. AG News repeats some stories under a second
    headline with the same description, or one reworded only towards its end; articles that share this key are
    near-duplicates and must not land on both sides of a carve."""
    return " ".join(re.findall(r"[a-z0-9]+", normalize_text(description).lower()))[:80]


def _article_text(title: str, description: str) -> str:
    return normalize_text(f"{title}\n{description}") if title.strip() else normalize_text(description)


# One row per article; `group` is its near_duplicate_key.
COLUMNS = ["id", "text", "label", "group"]


def _open_text(path: Path) -> io.TextIOBase:
    # utf-8-sig: spreadsheet programs save CSVs with a byte-order mark, which would otherwise stick to the class.
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="strict", newline="")


def read_csv_split(path: Path, skip_bad_rows: bool = False) -> tuple[pd.DataFrame, int]:
    """Read a classic AG News CSV (no header; class 1-4, title, description). Returns rows and the skipped count."""
    rows, skipped = [], 0
    with _open_text(path) as f:
        # strict: a quote left open at the end of the file is an error, not a silently swallowed last row.
        reader = csv.reader(f, strict=True)
        while True:
            try:
                fields, problem = next(reader), None
            except StopIteration:
                break
            except UnicodeDecodeError as e:
                # Decoding runs ahead of the csv reader, so the row number is the reader's, not exact bytes.
                raise DataError(f"{path}: undecodable bytes near line {reader.line_num + 1} (expected UTF-8): {e}") from e
            except csv.Error as e:
                fields, problem = [], f"malformed quoting ({e})"
            line = reader.line_num
            problem = problem or _check_csv_row(fields)
            if problem:
                if not skip_bad_rows:
                    raise DataError(f"{path}:{line}: {problem} (pass skip_bad_rows / --skip-bad-rows to skip)")
                skipped += 1
                continue
            rows.append({"id": f"{path.name}:{line}", "text": _article_text(fields[1], fields[2]),
                         "label": int(fields[0]) - 1, "group": near_duplicate_key(fields[2])})
    return pd.DataFrame(rows, columns=COLUMNS), skipped


def _check_csv_row(fields: list[str]) -> str | None:
    if len(fields) != 3:
        return f"expected 3 columns (class, title, description), found {len(fields)}"
    if fields[0].strip() not in {"1", "2", "3", "4"}:
        return f"class must be 1-4, found {fields[0]!r}"
    if not _article_text(fields[1], fields[2]):
        return "empty article text"
    return None


def read_table_split(path: Path, skip_bad_rows: bool = False) -> tuple[pd.DataFrame, int]:
    """Read parquet or jsonl with `text` and `label` (0-3 as on the hub, or a label name). Title and description are
    one text here, so near-duplicates are found by the text's opening."""
    try:
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_json(path, lines=True)
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    missing = {"text", "label"} - set(table.columns)
    if missing:
        raise DataError(f"{path}: missing column(s) {sorted(missing)}; expected text and label")
    rows, skipped = [], 0
    for i, (text, label) in enumerate(zip(table["text"], table["label"]), start=1):
        label = LABELS.index(label) if label in LABELS else label
        text = normalize_text(text) if isinstance(text, str) else ""
        problem = None if label in range(len(LABELS)) else f"label must be 0-3 or one of {LABELS}, found {label!r}"
        problem = problem or (None if text else "empty article text")
        if problem:
            if not skip_bad_rows:
                raise DataError(f"{path}: row {i}: {problem} (pass skip_bad_rows / --skip-bad-rows to skip)")
            skipped += 1
            continue
        rows.append({"id": f"{path.name}:{i}", "text": text, "label": int(label), "group": near_duplicate_key(text)})
    return pd.DataFrame(rows, columns=COLUMNS), skipped


def _find_split_file(folder: Path, split: str) -> Path | None:
    for suffix in (".csv", ".csv.gz", ".parquet", ".jsonl", ".jsonl.gz"):
        if (folder / f"{split}{suffix}").exists():
            return folder / f"{split}{suffix}"
    return None


@dataclass(frozen=True)
class DataSource:
    """Where the articles came from as the user named it, never a resolved (perhaps temporary) path, and a hash of
    what was there, so that two results files can be told to rest on the same data."""

    name: str  # the folder as given, "$AG_NEWS_DIR", or "hub:fancyzhx/ag_news"
    sha256: str  # the first 12 hex digits, over the split files' names and bytes (for the hub: over its rows)


def load_ag_news(source: str | Path | None = None,
                 skip_bad_rows: bool = False) -> tuple[dict[str, pd.DataFrame], DataSource]:
    """All splits found at `source` (a folder), else `$AG_NEWS_DIR`, else the hub, and where they came from."""
    if not source and not os.environ.get(DATA_ENV):
        return _load_hub()
    name = str(source) if source else f"${DATA_ENV}"
    folder = Path(source or os.environ[DATA_ENV]).expanduser()
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist. {NO_DATA_MESSAGE}")
    splits, digest = {}, hashlib.sha256()
    for split in ("train", "test"):
        path = _find_split_file(folder, split)
        if path is None:
            continue
        digest.update(path.name.encode() + path.read_bytes())
        reader = read_csv_split if ".csv" in path.suffixes else read_table_split
        splits[split], skipped = reader(path, skip_bad_rows)
        if skipped:
            log.warning("%s: skipped %d malformed rows", path, skipped)
        splits[split].attrs["skipped_rows"] = skipped
    if not splits:
        raise DataError(f"{folder} holds no train/test file. {NO_DATA_MESSAGE}")
    return splits, DataSource(name, digest.hexdigest()[:12])


def _load_hub() -> tuple[dict[str, pd.DataFrame], DataSource]:
    if not hub_reachable():
        raise DataError(NO_DATA_MESSAGE)
    import datasets  # imported late: it is slow to import and only the hub path needs it

    try:
        hub = datasets.load_dataset(HUB_DATASET)
    except Exception as e:  # any network or hub failure means the same thing to the user
        raise DataError(f"{NO_DATA_MESSAGE} (hub error: {type(e).__name__})") from e
    splits, digest = {}, hashlib.sha256()
    for split, ds in sorted(hub.items()):
        raw = ds.to_pandas()  # label: the ClassLabel's ids 0-3, in LABELS order
        texts, labels = raw["text"].tolist(), raw["label"].tolist()
        digest.update(json.dumps([split, texts, labels]).encode())
        texts = [normalize_text(t) for t in texts]
        splits[split] = pd.DataFrame({"id": [f"hub-{split}:{i}" for i in range(len(raw))], "text": texts,
                                      "label": labels, "group": [near_duplicate_key(t) for t in texts]})
    return splits, DataSource(f"hub:{HUB_DATASET}", digest.hexdigest()[:12])


# The carve every run makes unless told otherwise (RunConfig.split_seed has the same default).
SPLIT_SEED = 42


@dataclass
class Splits:
    """What to train on and what to evaluate on, with the protocol that produced them."""

    train: pd.DataFrame
    eval: pd.DataFrame
    protocol: str  # "standard": train split vs all of test; "holdout": a stratified carve of one split
    source: DataSource
    split_seed: int
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        """The facts every results JSON records about its data."""
        counts = lambda df: {LABELS[k]: int(v) for k, v in sorted(df["label"].value_counts().items())}
        # "seed" is the split seed: the results schema names it so (data.seed).
        return {"protocol": self.protocol, "source": self.source.name, "source_sha256": self.source.sha256,
                "seed": self.split_seed, "train_size": len(self.train), "eval_size": len(self.eval),
                "train_label_counts": counts(self.train), "eval_label_counts": counts(self.eval), "notes": self.notes}


def make_splits(data: dict[str, pd.DataFrame], source: DataSource, protocol: str = "auto", holdout_train_size: int = 6000,
                split_seed: int = SPLIT_SEED, max_train_samples: int | None = None,
                max_eval_samples: int | None = None) -> Splits:
    """Choose the protocol, carve if needed, and guarantee no article is both trained on and evaluated on.

    Everything done to the data beyond the protocol itself is said in `notes`; callers show them to the user."""
    if protocol == "auto":
        protocol = "standard" if {"train", "test"} <= data.keys() else "holdout"
    notes = []
    if protocol == "standard":
        if not {"train", "test"} <= data.keys():
            raise DataError(f"protocol 'standard' needs train and test splits; {source.name} has only {sorted(data)}")
        train, eval_ = data["train"], data["test"]
    elif protocol == "holdout":
        name = "test" if "test" in data else next(iter(data))
        notes.append(f"No separate train split: training on a stratified carve of {holdout_train_size} articles "
                     f"of the {name} split ({len(data[name])} articles), evaluating on the rest "
                     f"(split seed {split_seed}).")
        pool = data[name].drop_duplicates("text")
        if len(pool) < len(data[name]):
            notes.append(f"dropped {len(data[name]) - len(pool)} duplicate texts before carving")
        train, eval_, carve_notes = _carve(pool, holdout_train_size, split_seed)
        notes += carve_notes
    else:
        raise DataError(f"unknown protocol {protocol!r}; use auto, standard or holdout")
    leaked = train["text"].isin(set(eval_["text"]))
    if leaked.any():
        notes.append(f"dropped {int(leaked.sum())} training articles whose text also appears in the eval set")
        train = train[~leaked]
    if train.empty:
        why = notes[-1] if leaked.any() else "its train split holds no articles"
        raise DataError(f"nothing to train on in {source.name}: {why}. Supply a train split that is not a copy of the eval "
                        "split, or carve the test split with protocol 'holdout' (--protocol holdout)")
    if max_train_samples and max_train_samples < len(train):
        train = _stratified_take(train, max_train_samples, split_seed)[0]
        notes.append(f"training limited to {max_train_samples} articles")
    if max_eval_samples and max_eval_samples < len(eval_):
        eval_ = _stratified_take(eval_, max_eval_samples, split_seed)[0]
        notes.append(f"evaluation limited to {max_eval_samples} articles")
    return Splits(train.reset_index(drop=True), eval_.reset_index(drop=True), protocol, source, split_seed, notes)


def _carve(pool: pd.DataFrame, n: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """`n` training articles and the rest, stratified and seeded, with each group of near-duplicates on one side.

    scikit-learn's stratified split first; then every group it split moves whole to the side of its first article,
    each article moved trading places with a random ungrouped article of its class, so that the sizes and class
    counts stay exactly those of the stratified split and most of the carve stays as it was."""
    taken, _ = _stratified_take(pool, n, seed)
    in_train = pd.Series(pool.index.isin(taken.index), index=pool.index)
    grouped = pool["group"].ne("") & pool["group"].duplicated(keep=False)
    if not grouped.any():
        return taken, pool[~in_train], []
    rng = np.random.default_rng(seed)
    ungrouped = pool[~grouped]
    partners = {key: list(rng.permutation(rows)) for key, rows in
                ungrouped.groupby([in_train[~grouped], ungrouped["label"]]).groups.items()}
    moved = 0
    for _, group in pool[grouped].groupby("group", sort=False):
        side = bool(in_train[group.index[0]])
        for i in group.index[in_train[group.index] != side]:
            label = pool.at[i, "label"]
            if not partners.get((side, label)):
                raise DataError(f"cannot carve exactly {n} training articles with near-duplicates kept together: no "
                                f"ungrouped {LABELS[label]} article is left to trade places with; choose another "
                                "holdout_train_size")
            j = partners[(side, label)].pop()
            in_train[i], in_train[j] = side, not side
            moved += 1
    note = (f"kept {int(grouped.sum())} near-duplicate articles ({pool.loc[grouped, 'group'].nunique()} groups "
            "sharing the first 80 letters and digits of their description) each group on one side of the carve; "
            f"{moved} of them traded places with an ungrouped article of their class")
    return pool[in_train], pool[~in_train], [note]


def _stratified_take(df: pd.DataFrame, n: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`n` articles with the split's class balance, and the rest; both in file order."""
    if n >= len(df):
        raise DataError(f"cannot take {n} articles from a split of {len(df)}")
    taken, rest = train_test_split(df, train_size=n, stratify=df["label"], random_state=seed)
    return taken.sort_index(), rest.sort_index()


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
    parser.add_argument("--holdout-train-size", type=int, default=6000)
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
