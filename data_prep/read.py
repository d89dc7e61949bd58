"""AG News from a folder (CSV, gzipped CSV, parquet, jsonl) or the hub, as one table of articles per split.

Every reader returns the same columns and refuses a malformed row with its file and line, or skips and counts it."""

import csv
import gzip
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from data_prep.clean import near_duplicate_key, normalize_text
from data_prep.source import DATA_ENV, HUB_DATASET, NO_DATA_MESSAGE, hub_reachable
from data_prep.task import LABELS

log = logging.getLogger(__name__)

# One row per article: label is 0-3 in LABELS order, group its near_duplicate_key.
COLUMNS = ["id", "text", "label", "group"]
SKIP_HINT = "to skip such rows: --skip_bad_rows true, or --skip-bad-rows for data_prep.convert_dataset"


class DataError(ValueError):
    """Bad or missing input data; the message names the file and line, or how to supply the data."""


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


def _find_split_file(folder: Path, split: str) -> Path | None:
    for suffix in (".csv", ".csv.gz", ".parquet", ".jsonl", ".jsonl.gz"):
        if (folder / f"{split}{suffix}").exists():
            return folder / f"{split}{suffix}"
    return None


def read_csv_split(path: Path, skip_bad_rows: bool = False) -> tuple[pd.DataFrame, int]:
    """Read a classic AG News CSV (no header; class 1-4, title, description). Returns rows and the skipped count."""
    rows, skipped = [], 0
    with _open_text(path) as f:
        # strict: a quote left open at the end of the file is an error, not a silently swallowed last row.
        reader = csv.reader(f, strict=True)
        while True:
            start = reader.line_num + 1  # a quoted field may run across lines: the record's first line
            try:
                fields, problem = next(reader), None
            except StopIteration:
                break
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{_undecodable_line(path)}: undecodable bytes (expected UTF-8): {e}") from e
            except csv.Error as e:
                fields, problem = [], f"malformed quoting ({e})"
            if fields == [] and problem is None:  # a blank line
                continue
            line = reader.line_num
            problem = problem or _check_csv_row(fields)
            if problem and line > start:  # a quote left open joins the rows after it: skipping would lose them all
                raise DataError(f"{path}:{start}-{line}: {problem}, read as one record across {line - start + 1} "
                                "lines: a quote left open on its first line? Fix the file; skipping would drop them")
            if problem:
                if not skip_bad_rows:
                    raise DataError(f"{path}:{line}: {problem} ({SKIP_HINT})")
                skipped += 1
                continue
            rows.append({"id": f"{path.name}:{line}", "text": _article_text(fields[1], fields[2]),
                         "label": int(fields[0]) - 1, "group": near_duplicate_key(fields[2])})
    return pd.DataFrame(rows, columns=COLUMNS), skipped


def _open_text(path: Path) -> io.TextIOBase:
    # utf-8-sig: spreadsheet programs save CSVs with a byte-order mark, which would otherwise stick to the class.
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="strict", newline="")


def _undecodable_line(path: Path) -> int:
    """The line of the first byte that is not UTF-8. Decoding runs a chunk ahead of the csv reader, so the reader's
    line number is that of the last row it finished, not of the bad bytes: they are found in the raw bytes instead."""
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        raw = f.read()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return raw.count(b"\n", 0, e.start) + 1
    return 1  # not reached: the reader failed on these bytes


def _check_csv_row(fields: list[str]) -> str | None:
    if len(fields) != 3:
        return f"expected 3 columns (class, title, description), found {len(fields)}"
    if fields[0].strip() not in {"1", "2", "3", "4"}:
        return f"class must be 1-4, found {fields[0]!r}"
    if not _article_text(fields[1], fields[2]):
        return "empty article text"
    return None


def _article_text(title: str, description: str) -> str:
    return normalize_text(f"{title}\n{description}") if title.strip() else normalize_text(description)


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
        valid = label in range(len(LABELS)) and not pd.api.types.is_bool(label)  # True == 1: not a label
        problem = None if valid else f"label must be 0-3 or one of {LABELS}, found {label!r}"
        problem = problem or (None if text else "empty article text")
        if problem:
            if not skip_bad_rows:
                raise DataError(f"{path}: row {i}: {problem} ({SKIP_HINT})")
            skipped += 1
            continue
        rows.append({"id": f"{path.name}:{i}", "text": text, "label": int(label), "group": near_duplicate_key(text)})
    return pd.DataFrame(rows, columns=COLUMNS), skipped


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
