"""What a run trains and evaluates on: the config's data fields, through `load_splits`."""

import dataclasses
import os

from finetune import notebooks
from finetune.data import load_splits


def test_split_seed_alone_chooses_the_eval_articles(tiny_config):
    reference = load_splits(tiny_config)
    other_init = load_splits(dataclasses.replace(tiny_config, seed=tiny_config.seed + 1))
    other_carve = load_splits(dataclasses.replace(tiny_config, split_seed=tiny_config.split_seed + 1))
    assert list(other_init.eval["id"]) == list(reference.eval["id"])
    assert list(other_carve.eval["id"]) != list(reference.eval["id"])
    assert reference.describe()["seed"] == tiny_config.split_seed == 42
    assert other_carve.describe()["seed"] == 43


def test_notebook_runs_record_the_data_folder_as_named(tmp_path, monkeypatch):
    passed = []
    monkeypatch.setattr(notebooks, "run_notebooks", lambda parameters, output_dir: passed.append(parameters))
    monkeypatch.chdir(notebooks.PROJECT_DIR)
    notebooks.main(["--data_dir", "../shared/data/ag_news"])
    assert passed[-1]["data_dir"] == "../shared/data/ag_news"
    monkeypatch.chdir(tmp_path)  # a relative folder given elsewhere still names the same folder from the project
    notebooks.main(["--data_dir", "ag_news"])
    assert (notebooks.PROJECT_DIR / passed[-1]["data_dir"]).resolve() == (tmp_path / "ag_news").resolve()
    monkeypatch.setenv("AG_NEWS_DIR", "ag_news")  # the notebooks read it from the project root, recorded by name
    notebooks.main([])
    assert passed[-1]["data_dir"] is None and os.environ["AG_NEWS_DIR"] == str((tmp_path / "ag_news").resolve())
