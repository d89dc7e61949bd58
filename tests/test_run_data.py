"""What a run trains and evaluates on: the config's data fields, through `load_splits`."""

import dataclasses

from finetune.data import load_splits


def test_split_seed_alone_chooses_the_eval_articles(tiny_config):
    reference = load_splits(tiny_config)
    other_init = load_splits(dataclasses.replace(tiny_config, seed=tiny_config.seed + 1))
    other_carve = load_splits(dataclasses.replace(tiny_config, split_seed=tiny_config.split_seed + 1))
    assert list(other_init.eval["id"]) == list(reference.eval["id"])
    assert list(other_carve.eval["id"]) != list(reference.eval["id"])
    assert reference.describe()["seed"] == tiny_config.split_seed == 42
    assert other_carve.describe()["seed"] == 43
