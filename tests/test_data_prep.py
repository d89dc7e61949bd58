"""data_prep: the chat format, text cleaning, every source format, bad input, and honest splits."""

import csv
import gzip
import json
import subprocess
import sys

import pandas as pd
import pytest

from data_prep.clean import near_duplicate_key, normalize_text
from data_prep.convert_dataset import main, to_chat_records
from data_prep.read import DataError, load_ag_news
from data_prep.splits import make_splits
from data_prep.task import LABELS, SYSTEM_PROMPT, build_messages, build_prompt_messages, format_answer
from tests.conftest import write_synthetic_csv


def test_chat_format_is_exact():
    assert format_answer("Sci/Tech") == '{"category":"Sci/Tech"}'
    assert build_messages("Stocks rise.", "Business") == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "Classify the following news article:\n\nStocks rise."},
        {"role": "assistant", "content": '{"category":"Business"}'},
    ]
    assert build_prompt_messages("x") == build_messages("x", "World")[:2]
    assert LABELS == ("World", "Sports", "Business", "Sci/Tech")


def test_unknown_label_is_refused():
    with pytest.raises(ValueError, match="unknown label"):
        format_answer("Politics")


@pytest.mark.parametrize("raw, clean", [
    ("Texas Instruments Inc. &lt;TXN.N&gt; said", "Texas Instruments Inc. <TXN.N> said"),
    ("a second\\team of\\\\rocketeers", "a second team of rocketeers"),
    ("<b>Bold</b> claim &lt;p&gt;here", "Bold claim here"),
    ("  many   spaces\n\there ", "many spaces here"),
])
def test_normalize_text_repairs_ag_news_debris(raw, clean):
    assert normalize_text(raw) == clean


# Excerpts of rows of the AG News test split. The scrape turned each entity's "&" into a space, so a single space
# before a bare entity is the lost ampersand and a real space shows as a second one.
@pytest.mark.parametrize("raw, clean", [
    ("Britain #39;s biggest mortgage lender", "Britain's biggest mortgage lender"),
    ("you won #39;t see this console", "you won't see this console"),
    ("MCI Inc. #39;s (MCIP.O: Quote", "MCI Inc.'s (MCIP.O: Quote"),
    ("Iran  #39;committed #39; to nuke freeze", "Iran 'committed' to nuke freeze"),
    ("and a  quot;real quot; cease-fire", 'and a "real" cease-fire'),
    ("to  quot;buy quot; from  quot;neutral, quot; following", 'to "buy" from "neutral," following'),
    ("Ahead of Key GM Meeting\n quot;There is a very good", 'Ahead of Key GM Meeting "There is a very good'),
    ("Oil prices edged below  #36;49 a barrel", "Oil prices edged below $49 a barrel"),
    ("Verizon will pay US #36;3 billion", "Verizon will pay US$3 billion"),
    ("15,000 pounds ( #36;27,000).", "15,000 pounds ($27,000)."),
    ("purchase of AT amp;T Wireless", "purchase of AT&T Wireless"),
    ("NEW YORK Johnson  amp; Johnson is", "NEW YORK Johnson & Johnson is"),
    ("hard-drive storage  #151; enough to record", "hard-drive storage \u2014 enough to record"),
    ("but it isn't #151;not when the frog", "but it isn't\u2014not when the frog"),
    ("Don #146;t let less-than-perfect", "Don\u2019t let less-than-perfect"),
    ("Sports India: Cricket  gt; Kanpur", "Sports India: Cricket > Kanpur"),
])
def test_a_space_before_a_bare_entity_is_its_lost_ampersand(raw, clean):
    assert normalize_text(raw) == clean


def _write(path, rows):
    path.write_text("".join(rows), encoding="utf-8")


def test_csv_gz_parquet_and_jsonl_load_the_same_articles(tmp_path):
    write_synthetic_csv(tmp_path / "csv" / "test.csv", per_class=5)
    csv_split = load_ag_news(tmp_path / "csv")[0]["test"]
    (tmp_path / "gz").mkdir()
    with gzip.open(tmp_path / "gz" / "test.csv.gz", "wb") as f:
        f.write((tmp_path / "csv" / "test.csv").read_bytes())
    table = csv_split[["text", "label"]]
    (tmp_path / "pq").mkdir()
    table.to_parquet(tmp_path / "pq" / "test.parquet")
    (tmp_path / "jl").mkdir()
    table.assign(label=[LABELS[y] for y in table["label"]]).to_json(tmp_path / "jl" / "test.jsonl", orient="records",
                                                                   lines=True)
    for folder in ("gz", "pq", "jl"):
        loaded = load_ag_news(tmp_path / folder)[0]["test"]
        pd.testing.assert_frame_equal(loaded[["text", "label"]], table)
    assert len(csv_split) == 20 and set(csv_split["label"]) == {0, 1, 2, 3}


def test_csv_title_and_description_are_joined_and_cleaned(tmp_path):
    _write(tmp_path / "test.csv", ['"3","Wall St. Bears","Short-sellers, Wall Street#39;s dwindling\\band"\n'])
    split = load_ag_news(tmp_path)[0]["test"]
    assert split.loc[0, "text"] == "Wall St. Bears Short-sellers, Wall Street's dwindling band"
    assert split.loc[0, "label"] == 2 and split.loc[0, "id"] == "test.csv:1"


@pytest.mark.parametrize("row, message", [
    ('"1","only two columns"\n', "expected 3 columns"),
    ('"5","Title","Body"\n', "class must be 1-4"),
    ('"0","Title","Body"\n', "class must be 1-4"),
    ('"2","",""\n', "empty article text"),
])
def test_bad_csv_row_names_file_and_line(tmp_path, row, message):
    _write(tmp_path / "test.csv", ['"1","Fine","Row"\n', row])
    with pytest.raises(DataError, match=rf"test.csv:2: {message}"):
        load_ag_news(tmp_path)


@pytest.mark.parametrize("name", ["test.csv", "test.csv.gz"])
def test_csv_saved_with_a_byte_order_mark_is_read(tmp_path, name):
    data = '\ufeff"3","Wall St. Bears","Short-sellers"\n"1","Fine","Row"\n'.encode("utf-8")
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    split = load_ag_news(tmp_path)[0]["test"]
    assert list(split["label"]) == [2, 0] and split.loc[0, "text"] == "Wall St. Bears Short-sellers"


def test_unterminated_quote_in_the_last_row_names_file_and_line(tmp_path):
    _write(tmp_path / "test.csv", ['"1","Fine","Row"\n', '"2","Title","Text without end\n'])
    with pytest.raises(DataError, match=r"test.csv:2: malformed quoting"):
        load_ag_news(tmp_path)
    split = load_ag_news(tmp_path, skip_bad_rows=True)[0]["test"]
    assert list(split["text"]) == ["Fine Row"] and split.attrs["skipped_rows"] == 1


def test_a_quote_left_open_mid_file_names_its_lines_and_is_never_skipped(tmp_path):
    """Rows 3-5 are fine but sit inside the open quote of row 2: skipping "one bad row" would lose them silently."""
    _write(tmp_path / "test.csv", ['1,A,a\n', '2,B,"b\n', '3,C,c\n', '4,D,d\n', '1,E,e\n'])
    for skip in (False, True):
        with pytest.raises(DataError, match=r"test.csv:2-5: malformed quoting .* across 4 lines"):
            load_ag_news(tmp_path, skip_bad_rows=skip)


def test_blank_lines_are_not_rows(tmp_path):
    _write(tmp_path / "test.csv", ['"1","Fine","Row"\n', '\n', '"2","Also","Fine"\n', '\n'])
    assert list(load_ag_news(tmp_path)[0]["test"]["label"]) == [0, 1]


def test_the_skip_hint_names_a_flag_the_commands_take(tmp_path):
    from finetune.config import config_from_args

    _write(tmp_path / "test.csv", ['"9","Bad","Label"\n'])
    with pytest.raises(DataError) as error:
        load_ag_news(tmp_path)
    flag, value = str(error.value).split("to skip such rows: ")[1].split(",")[0].split()
    assert config_from_args(["--profile", "tiny", flag, value]).skip_bad_rows is True


def test_bad_rows_skipped_when_asked_are_noted_in_the_results(tmp_path):
    write_synthetic_csv(tmp_path / "test.csv", per_class=5)
    with open(tmp_path / "test.csv", "a", encoding="utf-8") as f:
        f.write('"9","Bad","Label"\n')
    data, source = load_ag_news(tmp_path, skip_bad_rows=True)
    assert len(data["test"]) == 20
    notes = make_splits(data, source, holdout_train_size=8).notes  # what every results file records
    assert notes[0] == "skipped 1 malformed rows of the test split (skip_bad_rows)"


@pytest.mark.parametrize("name", ["test.csv", "test.csv.gz"])
def test_undecodable_bytes_name_the_file_and_their_line(tmp_path, name):
    """The bad bytes are on line 3 of 50: the csv reader, a decoded chunk behind, has finished no row yet."""
    data = b'"1","Fine","Row"\n"2","Also","Fine"\n"2","Bad \xff\xfe bytes","x"\n' + b'"3","More","Rows"\n' * 47
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    with pytest.raises(DataError, match=rf"{name}:3: undecodable bytes \(expected UTF-8\)"):
        load_ag_news(tmp_path)


def test_table_with_bad_label_names_row(tmp_path):
    pd.DataFrame({"text": ["ok", "bad"], "label": [0, 7]}).to_json(tmp_path / "test.jsonl", orient="records", lines=True)
    with pytest.raises(DataError, match=r"test.jsonl: row 2: label must be 0-3"):
        load_ag_news(tmp_path)


def test_a_true_or_false_label_is_refused(tmp_path):
    """True == 1: a column of booleans would otherwise be read as World and Sports."""
    pd.DataFrame({"text": ["a", "b"], "label": [False, True]}).to_json(tmp_path / "test.jsonl", orient="records",
                                                                      lines=True)
    with pytest.raises(DataError, match=r"test.jsonl: row 1: label must be 0-3 .* found False"):
        load_ag_news(tmp_path)


def test_missing_folder_and_empty_folder_say_how_to_supply_data(tmp_path):
    with pytest.raises(DataError, match="does not exist.*AG_NEWS_DIR"):
        load_ag_news(tmp_path / "nope")
    with pytest.raises(DataError, match="holds no train/test file.*AG_NEWS_DIR"):
        load_ag_news(tmp_path)


def test_no_source_at_all_fails_fast_with_one_message(monkeypatch):
    monkeypatch.delenv("AG_NEWS_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="No AG News data found"):
        load_ag_news(None)
    check = subprocess.run([sys.executable, "-m", "data_prep.source"], capture_output=True, text=True, timeout=30)
    assert check.returncode != 0 and "No AG News data found" in check.stderr


def test_source_is_recorded_as_named_with_a_hash_of_its_files(tmp_path, monkeypatch):
    write_synthetic_csv(tmp_path / "a" / "test.csv", per_class=5)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "test.csv").write_bytes((tmp_path / "a" / "test.csv").read_bytes())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AG_NEWS_DIR", "a")
    relative, absolute, from_env = load_ag_news("a")[1], load_ag_news(tmp_path / "b")[1], load_ag_news()[1]
    assert (relative.name, absolute.name, from_env.name) == ("a", str(tmp_path / "b"), "$AG_NEWS_DIR")
    assert relative.sha256 == absolute.sha256 == from_env.sha256 and len(relative.sha256) == 12
    with open(tmp_path / "b" / "test.csv", "a", encoding="utf-8") as f:
        f.write('"1","One more","article"\n')
    assert load_ag_news("b")[1].sha256 != relative.sha256
    data, source = load_ag_news("a")
    described = make_splits(data, source, holdout_train_size=10).describe()
    assert (described["source"], described["source_sha256"]) == ("a", relative.sha256)


def test_holdout_carve_is_disjoint_stratified_and_deterministic(synthetic_dir):
    data, source = load_ag_news(synthetic_dir)
    splits = make_splits(data, source, "auto", holdout_train_size=300, split_seed=3)
    assert splits.protocol == "holdout" and "No separate train split" in splits.notes[0]
    assert len(splits.train) == 300 and len(splits.eval) == 100
    assert not set(splits.train["id"]) & set(splits.eval["id"])
    assert not set(splits.train["text"]) & set(splits.eval["text"])
    assert splits.train["label"].value_counts().tolist() == [75] * 4
    again = make_splits(data, source, "holdout", holdout_train_size=300, split_seed=3)
    assert list(again.train["id"]) == list(splits.train["id"])
    other_seed = make_splits(data, source, "holdout", holdout_train_size=300, split_seed=4)
    assert list(other_seed.train["id"]) != list(splits.train["id"])
    described = splits.describe()
    assert (described["protocol"], described["seed"], described["train_size"], described["eval_size"]) == (
        "holdout", 3, 300, 100)


# Two pairs of descriptions from the AG News test split, each pair one story under two headlines.
@pytest.mark.parametrize("first, second", [
    ("HOUSTON - Oilfield services giant Halliburton Co. on Tuesday swung to a loss in the third quarter ended Sept. 30",
     "HOUSTON -- Oilfield services giant Halliburton Co. on Tuesday swung to a loss in the third quarter ended Sept."),
    ("A decades-long struggle between the world #39;s two largest aircraft makers escalated into a new trade war",
     "A decades-long struggle between the world's two largest aircraft makers escalated into a trade war between"),
])
def test_near_duplicate_key_ignores_case_punctuation_and_the_ending(first, second):
    assert near_duplicate_key(first) == near_duplicate_key(second)
    assert near_duplicate_key(first) != near_duplicate_key(first.replace("Tuesday", "Monday").replace("long", "old"))


def test_near_duplicates_stay_on_one_side_of_the_holdout_carve(tmp_path):
    write_synthetic_csv(tmp_path / "test.csv", per_class=100)
    with open(tmp_path / "test.csv", newline="", encoding="utf-8") as f:
        stories = list(csv.reader(f))[:40]
    with open(tmp_path / "test.csv", "a", newline="", encoding="utf-8") as f:  # 40 stories again, new headlines
        csv.writer(f).writerows([label, f"Second headline {i}", body] for i, (label, _, body) in enumerate(stories))
    data, source = load_ag_news(tmp_path)
    splits = make_splits(data, source, holdout_train_size=330, split_seed=3)
    assert not set(splits.train["group"]) & set(splits.eval["group"])
    assert len(splits.train) == 330 and len(splits.eval) == 110
    expected = data["test"]["label"].value_counts() * 330 / 440  # stratified: each class's share, to the article
    assert ((splits.train["label"].value_counts() - expected).abs() < 1).all()
    assert any(note.startswith("kept 80 near-duplicate articles (40 groups") for note in splits.notes)
    again = make_splits(data, source, holdout_train_size=330, split_seed=3)
    assert list(again.train["id"]) == list(splits.train["id"])


def test_standard_protocol_never_trains_on_eval_articles(tmp_path):
    write_synthetic_csv(tmp_path / "train.csv", per_class=20, seed=1)
    write_synthetic_csv(tmp_path / "test.csv", per_class=5, seed=2)
    with open(tmp_path / "train.csv", "a", encoding="utf-8") as f:  # one test article leaked into train
        f.write((tmp_path / "test.csv").read_text().splitlines()[0] + "\n")
    data, source = load_ag_news(tmp_path)
    splits = make_splits(data, source)
    assert splits.protocol == "standard" and len(splits.eval) == 20
    assert len(splits.train) == 80 and any("dropped 1 training" in n for n in splits.notes)
    assert not set(splits.train["text"]) & set(splits.eval["text"])


def test_convert_cli_says_which_training_articles_it_dropped_and_why(tmp_path, capsys):
    write_synthetic_csv(tmp_path / "train.csv", per_class=5, seed=1)
    write_synthetic_csv(tmp_path / "test.csv", per_class=5, seed=2)
    with open(tmp_path / "train.csv", "a", encoding="utf-8") as f:  # two test articles leaked into train
        f.writelines(line + "\n" for line in (tmp_path / "test.csv").read_text().splitlines()[:2])
    main(["--source", str(tmp_path), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "wrote 20 train and 20 eval examples" in out
    assert "note: dropped 2 training articles whose text also appears in the eval set" in out


def test_a_train_split_that_is_a_copy_of_test_is_an_error_that_names_the_cause(tmp_path):
    write_synthetic_csv(tmp_path / "test.csv", per_class=2)
    (tmp_path / "train.csv").write_bytes((tmp_path / "test.csv").read_bytes())
    data, source = load_ag_news(tmp_path)
    with pytest.raises(DataError, match="nothing to train on.*dropped 8 training articles.*protocol 'holdout'"):
        make_splits(data, source)
    with pytest.raises(SystemExit, match="error: nothing to train on"):
        main(["--source", str(tmp_path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("empty, full, message", [
    ("train", "test", "nothing to train on.*holds no articles"),
    ("test", "train", "nothing to evaluate on.*holds no articles.*protocol 'holdout'"),  # before any training
])
def test_an_empty_split_is_an_error(tmp_path, empty, full, message):
    write_synthetic_csv(tmp_path / f"{full}.csv", per_class=5)
    _write(tmp_path / f"{empty}.csv", ['"9","Bad","Label"\n'])
    data, source = load_ag_news(tmp_path, skip_bad_rows=True)
    with pytest.raises(DataError, match=message):
        make_splits(data, source)


def test_limits_a_stratified_take_cannot_meet_name_their_setting(synthetic_dir, tmp_path):
    """Fewer articles than classes (or all but fewer than a class's worth) cannot be stratified: the message names
    the option, not scikit-learn's `train_size`, and the converter stops with it instead of a traceback."""
    data, source = load_ag_news(synthetic_dir)
    with pytest.raises(DataError, match="max_eval_samples=2: a stratified take from 100 articles of 4 classes needs "
                                        "between 4 and 96"):
        make_splits(data, source, holdout_train_size=300, max_eval_samples=2)
    with pytest.raises(SystemExit, match="error: holdout_train_size=3: a stratified take"):
        main(["--source", str(synthetic_dir), "--out", str(tmp_path / "out"), "--holdout-train-size", "3"])


def test_standard_protocol_without_train_split_is_an_error(synthetic_dir):
    data, source = load_ag_news(synthetic_dir)
    with pytest.raises(DataError, match="needs train and test"):
        make_splits(data, source, "standard")


def test_convert_cli_writes_deterministic_chat_jsonl(synthetic_dir, tmp_path):
    for out in ("a", "b"):
        main(["--source", str(synthetic_dir), "--out", str(tmp_path / out), "--holdout-train-size", "300"])
    first = (tmp_path / "a" / "train.jsonl").read_bytes()
    assert first == (tmp_path / "b" / "train.jsonl").read_bytes()
    source = load_ag_news(synthetic_dir)[0]["test"].set_index("id")
    for record in map(json.loads, first.splitlines()):  # each article and its label as the source file has them
        article = source.loc[record["id"]]
        assert record["messages"] == build_messages(article["text"], LABELS[article["label"]])
    described = json.loads((tmp_path / "a" / "splits.json").read_text())
    assert (described["protocol"], described["seed"]) == ("holdout", 42)  # the carve every run makes by default
    assert len((tmp_path / "a" / "eval.jsonl").read_text().splitlines()) == 100


def test_to_chat_records_keeps_ids_and_labels(synthetic_dir):
    split = load_ag_news(synthetic_dir)[0]["test"].head(3)
    records = to_chat_records(split)
    assert [r["id"] for r in records] == list(split["id"])
    assert [r["label"] for r in records] == [LABELS[y] for y in split["label"]]
    assert [r["messages"][1]["content"].split("\n\n", 1)[1] for r in records] == list(split["text"])
    assert [r["messages"][2]["content"] for r in records] == [format_answer(LABELS[y]) for y in split["label"]]
