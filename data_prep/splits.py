"""What a run trains on and what it evaluates on: the protocol, the holdout carve, and everything done on the way."""

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from data_prep.read import DataError, DataSource
from data_prep.task import LABELS

# The carve every run makes unless told otherwise (RunConfig has the same defaults).
HOLDOUT_TRAIN_SIZE = 6000
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


def make_splits(data: dict[str, pd.DataFrame], source: DataSource, protocol: str = "auto",
                holdout_train_size: int = HOLDOUT_TRAIN_SIZE, split_seed: int = SPLIT_SEED,
                max_train_samples: int | None = None, max_eval_samples: int | None = None) -> Splits:
    """Choose the protocol, carve if needed, and guarantee no article is both trained on and evaluated on.

    Everything done to the data beyond the protocol itself is said in `notes`; callers show them to the user."""
    if protocol == "auto":
        protocol = "standard" if {"train", "test"} <= data.keys() else "holdout"
    notes = [f"skipped {frame.attrs['skipped_rows']} malformed rows of the {split} split (skip_bad_rows)"
             for split, frame in data.items() if frame.attrs.get("skipped_rows")]
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
        raise DataError(f"nothing to train on in {source.name}: {why}. Supply a train split that is not a copy of "
                        "the eval split, or carve the test split with protocol 'holdout' (--protocol holdout)")
    if eval_.empty:
        raise DataError(f"nothing to evaluate on in {source.name}: its test split holds no articles. Supply one, or "
                        "carve the train split with protocol 'holdout' (--protocol holdout)")
    if max_train_samples and max_train_samples < len(train):
        train = _stratified_take(train, max_train_samples, split_seed, "max_train_samples")[0]
        notes.append(f"training limited to {max_train_samples} articles")
    if max_eval_samples and max_eval_samples < len(eval_):
        eval_ = _stratified_take(eval_, max_eval_samples, split_seed, "max_eval_samples")[0]
        notes.append(f"evaluation limited to {max_eval_samples} articles")
    return Splits(train.reset_index(drop=True), eval_.reset_index(drop=True), protocol, source, split_seed, notes)


def _carve(pool: pd.DataFrame, n: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """`n` training articles and the rest, stratified and seeded, with each group of near-duplicates on one side.

    scikit-learn's stratified split first; then every group it split moves whole to the side of its first article,
    each article moved trading places with a random ungrouped article of its class, so that the sizes and class
    counts stay exactly those of the stratified split and most of the carve stays as it was."""
    taken, _ = _stratified_take(pool, n, seed, "holdout_train_size")
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
            "sharing the first 80 letters and digits of their description) together, each group on one side of the "
            f"carve; {moved} of them traded places with an ungrouped article of their class")
    return pool[in_train], pool[~in_train], [note]


def _stratified_take(df: pd.DataFrame, n: int, seed: int, setting: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`n` articles with the split's class balance, and the rest; both in file order. `setting` names the option that
    asked for `n`, for the message when it cannot be done."""
    counts = df["label"].value_counts()
    classes, rarest = len(counts), counts.min()
    if not classes <= n <= len(df) - classes or rarest < 2:
        raise DataError(f"{setting}={n}: a stratified take from {len(df)} articles of {classes} classes needs "
                        f"between {classes} and {len(df) - classes} of them, and at least two articles of every "
                        f"class (the rarest has {rarest})")
    taken, rest = train_test_split(df, train_size=n, stratify=df["label"], random_state=seed)
    return taken.sort_index(), rest.sort_index()
