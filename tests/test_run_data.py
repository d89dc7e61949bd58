"""What a run trains and evaluates on: the config's data fields through `load_splits`, the hub, the tiny profile's
limits, and what the notebooks pass on."""

import dataclasses
import json
import os
import re

import datasets
import nbformat
import papermill
import pytest

from data_prep import convert_dataset, read
from data_prep.task import LABELS
from finetune.lab import notebooks
from finetune.config import get_config
from finetune.data import load_splits
from tests.conftest import TOPIC_WORDS

WALL_ST = ("Wall St. Bears Claw Back Into the Black (Reuters) Reuters - Short-sellers, Wall Street #39;s dwindling"
           "\\band of ultra-cynics, are seeing green again.")
WALL_ST_CLEAN = ("Wall St. Bears Claw Back Into the Black (Reuters) Reuters - Short-sellers, Wall Street's dwindling "
                 "band of ultra-cynics, are seeing green again.")


def _hub_split(split: str, per_class: int) -> datasets.Dataset:
    """Hub-shaped articles: one `text` (title and description) and `label` as ClassLabel ids 0-3."""
    texts = [f"{split} story {i}: {words}" for i in range(per_class) for words in TOPIC_WORDS.values()]
    texts[0] = WALL_ST if split == "train" else texts[0]
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(LABELS))})
    return datasets.Dataset.from_dict({"text": texts, "label": [0, 1, 2, 3] * per_class}, features=features)


@pytest.fixture
def hub(monkeypatch) -> list[str]:
    """The hub's AG News in miniature (train and test splits, 1,600 and 500 articles a class), without a network.
    Returns the names asked for."""
    hub = datasets.DatasetDict(train=_hub_split("train", 1600), test=_hub_split("test", 500))
    asked = []
    monkeypatch.delenv("AG_NEWS_DIR", raising=False)
    monkeypatch.setattr(read, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda name: asked.append(name) or hub)
    return asked


def test_hub_articles_are_loaded_cleaned_and_converted(hub, tmp_path):
    data, source = read.load_ag_news()
    assert hub == ["fancyzhx/ag_news"]
    assert source.name == "hub:fancyzhx/ag_news" and len(source.sha256) == 12
    assert {split: len(df) for split, df in data.items()} == {"train": 6400, "test": 2000}
    first = data["train"].iloc[0]
    assert (first["id"], first["text"], first["label"]) == ("hub-train:0", WALL_ST_CLEAN, 0)
    convert_dataset.main(["--out", str(tmp_path)])
    described = json.loads((tmp_path / "splits.json").read_text())
    assert (described["protocol"], described["source"]) == ("standard", "hub:fancyzhx/ag_news")
    assert (described["train_size"], described["eval_size"]) == (6400, 2000)
    record = json.loads((tmp_path / "train.jsonl").read_text().splitlines()[0])
    assert record["label"] == "World" and record["messages"][1]["content"].endswith(WALL_ST_CLEAN)


def test_tiny_profile_limits_what_the_demo_trains_and_evaluates_on(hub):
    splits = load_splits(get_config("tiny"))
    described = splits.describe()
    assert (described["protocol"], described["train_size"], described["eval_size"]) == ("standard", 6000, 1600)
    assert described["train_label_counts"] == dict.fromkeys(LABELS, 1500)
    assert described["eval_label_counts"] == dict.fromkeys(LABELS, 400)
    assert {"training limited to 6000 articles", "evaluation limited to 1600 articles"} <= set(described["notes"])
    lifted = load_splits(get_config("tiny", max_train_samples=None, max_eval_samples=None))
    assert (len(lifted.train), len(lifted.eval), lifted.notes) == (6400, 2000, [])


def test_notebook_setup_keeps_the_profile_limits_unless_overridden(tmp_path):
    opening = [[cell.source for cell in nbformat.read(notebooks.PROJECT_DIR / "notebooks" / f"{name}.ipynb",
                                                      as_version=4).cells[1:3]] for name in notebooks.NOTEBOOKS]
    assert all(parameters == opening[0][0] for parameters, _ in opening)  # one parameters cell, four times
    # Each setup cell imports what its notebook uses, then builds the config with the same lines as the probe's.
    config_lines = [re.search(r"limits = .*?\*\*overrides\)", setup, re.DOTALL).group() for _, setup in opening]
    assert all(lines == config_lines[0] for lines in config_lines)
    probe = nbformat.read(notebooks.PROJECT_DIR / "notebooks" / f"{notebooks.NOTEBOOKS[0]}.ipynb", as_version=4)
    probe.cells = probe.cells[:3] + [nbformat.v4.new_code_cell("print(config.max_train_samples, config.max_eval_samples)")]
    # Two runs (a kernel each) cover all four cases: each limit both kept and overridden.
    for given, limits in [({"max_eval_samples": 40}, "6000 40"),
                          ({"overrides": {"max_train_samples": None}}, "None 1600")]:
        parameters = {"project_dir": str(notebooks.PROJECT_DIR), "results_dir": str(tmp_path), **given}
        ran = papermill.execute_notebook(probe, None, parameters, kernel_name="python3", progress_bar=False)
        assert ran.cells[-1].outputs[0]["text"].strip() == limits, given


def four_notebook_runs(monkeypatch) -> list[dict]:
    """The parameters each run of the four notebooks is given, the runs stubbed (04, the method comparison, too)."""
    passed = []
    monkeypatch.setattr(notebooks, "run_notebooks", lambda parameters, output_dir, names=notebooks.NOTEBOOKS:
                        passed.append(parameters) if names == notebooks.NOTEBOOKS else None)
    return passed


def test_notebook_runs_pass_on_only_the_limits_given(monkeypatch):
    passed = four_notebook_runs(monkeypatch)
    notebooks.main([])
    notebooks.main(["--max_train_samples", "200", "--max_eval_samples", "none"])
    assert [p["overrides"] for p in passed] == [{}, {"max_train_samples": 200, "max_eval_samples": None}]


def test_notebook_runs_pass_the_method_as_its_own_parameter(monkeypatch):
    passed = four_notebook_runs(monkeypatch)
    notebooks.main(["--method", "lora", "--lora_rank", "8"])
    notebooks.main([])
    assert (passed[0]["method"], passed[0]["overrides"]) == ("lora", {"lora_rank": 8})
    assert passed[1]["method"] == "full"


def test_split_seed_alone_chooses_the_eval_articles(tiny_config):
    reference = load_splits(tiny_config)
    other_init = load_splits(dataclasses.replace(tiny_config, seed=tiny_config.seed + 1))
    other_carve = load_splits(dataclasses.replace(tiny_config, split_seed=tiny_config.split_seed + 1))
    assert list(other_init.eval["id"]) == list(reference.eval["id"])
    assert list(other_carve.eval["id"]) != list(reference.eval["id"])
    assert reference.describe()["seed"] == tiny_config.split_seed == 42
    assert other_carve.describe()["seed"] == 43


def test_a_trained_model_is_evaluated_only_on_its_carves_other_side(tiny_config, tmp_path):
    """Another split seed, carve size or the standard protocol's whole split would hold articles it trained on."""
    from data_prep.read import DataError
    from finetune.data import check_held_out

    final = tmp_path / "final"
    final.mkdir()
    trained = load_splits(tiny_config)
    (final / "train_summary.json").write_text(json.dumps({"data": trained.describe(),
                                                          "config": tiny_config.to_dict()}))
    check_held_out(tiny_config, load_splits(tiny_config), final)  # the same carve: its other side
    for change in ({"split_seed": tiny_config.split_seed + 1}, {"holdout_train_size": 200}):
        other = dataclasses.replace(tiny_config, **change)
        with pytest.raises(DataError, match="would include articles it trained on"):
            check_held_out(other, load_splits(other), final)
    whole = dataclasses.replace(trained, protocol="standard")  # e.g. the full test split, under the standard protocol
    with pytest.raises(DataError, match="protocol standard"):
        check_held_out(tiny_config, whole, final)


def test_notebook_runs_record_the_data_folder_as_named(tmp_path, monkeypatch):
    passed = four_notebook_runs(monkeypatch)
    monkeypatch.delenv("AG_NEWS_DIR", raising=False)
    monkeypatch.chdir(notebooks.PROJECT_DIR)
    notebooks.main(["--data_dir", "../shared/data/ag_news"])
    assert passed[-1]["data_dir"] == "../shared/data/ag_news"
    monkeypatch.chdir(tmp_path)  # a relative folder given elsewhere still names the same folder from the project
    notebooks.main(["--data_dir", "ag_news"])
    assert (notebooks.PROJECT_DIR / passed[-1]["data_dir"]).resolve() == (tmp_path / "ag_news").resolve()
    monkeypatch.setenv("AG_NEWS_DIR", "ag_news")  # the notebooks read it from the project root, recorded by name
    notebooks.main([])
    assert passed[-1]["data_dir"] is None and os.environ["AG_NEWS_DIR"] == str((tmp_path / "ag_news").resolve())
