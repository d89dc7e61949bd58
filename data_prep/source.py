"""Where AG News comes from: a folder ($AG_NEWS_DIR or an explicit path) or the hub. Standard library only, so
`python3 -m data_prep.source` can check for data before any package is installed (and for the Python the packages
need)."""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import urlparse

HUB_DATASET = "fancyzhx/ag_news"
DATA_ENV = "AG_NEWS_DIR"
NO_DATA_MESSAGE = (
    f"No AG News data found. Set {DATA_ENV}=/path/to/ag_news (a folder with train.csv and/or test.csv, "
    "optionally .gz, or train/test .parquet/.jsonl with text,label columns), pass --source DIR / data_dir=..., "
    f"or run where the Hugging Face hub is reachable (dataset {HUB_DATASET})."
)


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick connect, so that a machine without hub access fails in seconds instead of after minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def data_available(source: str | None = None) -> bool:
    source = source or os.environ.get(DATA_ENV)
    return os.path.isdir(source) if source else hub_reachable()


PYTHON_NEEDED = (3, 11)  # trl 1.16's own requirement

if __name__ == "__main__":
    if sys.version_info < PYTHON_NEEDED:
        needed = ".".join(map(str, PYTHON_NEEDED))
        sys.exit(f"error: Python {sys.version.split()[0]} is too old: the suite needs Python >= {needed} (TRL's "
                 f"minimum). Give make one, e.g. make PYTHON=python{needed} demo")
    if not data_available(sys.argv[1] if len(sys.argv) > 1 else None):
        sys.exit(f"error: {NO_DATA_MESSAGE}")
