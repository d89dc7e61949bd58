"""Metrics against hand-computed cases; results JSON schema, records and the generated summary table."""

import json
import subprocess
import sys

import jsonschema
import numpy as np
import pytest

from finetune.metrics import classification_metrics
from finetune.results import (EVALUATION_CHANGES, PROJECT_DIR, RUN_START_GIT_STATE, environment, git_state,
                              load_records, summary_table, validate_record, write_record, write_summary)


def test_metrics_match_a_hand_computed_case():
    y_true = np.array([0, 0, 1, 1, 2, 3])
    y_pred = np.array([0, 1, 1, 1, -1, 3])  # -1: an answer that could not be parsed
    m = classification_metrics(y_true, y_pred)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["World"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["per_class"]["Sports"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8),
                                        "support": 2}
    assert m["per_class"]["Business"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0 + 1) / 4)
    assert m["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    assert m["confusion_matrix_normalized"][0] == [0.5, 0.5, 0, 0]
    assert m["confusion_matrix_normalized"][2] == [0, 0, 0, 0]  # its one article failed: recall 0, not 0/0


def make_record(name="base_model", accuracy=0.5):
    metrics = classification_metrics(np.array([0, 1, 2, 3]), np.array([0, 1, 2, 0] if accuracy < 1 else [0, 1, 2, 3]))
    return {
        "name": name, "kind": "llm", "profile": "tiny", "model": "scratch", "config": {"seed": 0},
        "data": {"protocol": "holdout", "source": "synthetic", "seed": 0, "train_size": 10, "eval_size": 4, "notes": []},
        "primary_mode": "label_scoring",
        "evaluations": {"label_scoring": {
            "metrics": metrics, "failures": {"count": 0, "by_kind": {}, "examples": []},
            "throughput": {"articles": 4, "seconds": 2.0, "articles_per_second": 2.0,
                           "latency_ms": {"mean": 1.0, "p50": 1.0, "p95": 1.0}}}},
        "wall_seconds": 3.0,
    }


def test_written_record_carries_run_facts_and_validates(tmp_path):
    path = write_record(make_record(), tmp_path / "base_model_results.json")
    record = json.loads(path.read_text())
    validate_record(record)
    assert record["schema_version"] == 1 and record["environment"]["python"]
    assert {"git_commit", "hardware", "packages"} <= set(record["environment"])
    assert record["environment"]["packages"]["torch"]


@pytest.mark.parametrize("breakage", [
    lambda r: r["evaluations"]["label_scoring"]["metrics"].pop("accuracy"),
    lambda r: r["data"].update(protocol="trained-on-test"),
    lambda r: r.pop("environment"),
    lambda r: r["evaluations"]["label_scoring"]["metrics"]["per_class"].pop("Sci/Tech"),
])
def test_schema_rejects_incomplete_records(tmp_path, breakage):
    record = json.loads(write_record(make_record(), tmp_path / "r.json").read_text())
    breakage(record)
    with pytest.raises(jsonschema.ValidationError):
        validate_record(record)


def test_summary_is_generated_from_every_results_file(tmp_path):
    write_record(make_record("base_model", 0.75), tmp_path / "base_model_results.json")
    write_record(make_record("finetuned_model", 1.0), tmp_path / "finetuned_model_results.json")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "train.json").write_text('{"schema_version": 1, "evaluations": {}}')
    records = load_records(tmp_path)
    assert [r["name"] for r in records] == ["base_model", "finetuned_model"]
    table = summary_table(records)
    assert "| base_model | scratch | holdout | 4 | 75.00% / " in table and "| CPU (" in table
    assert "| finetuned_model | scratch | holdout | 4 | 100.00% / " in table
    summary = write_summary(tmp_path).read_text()
    assert "do not edit by hand" in summary and "`python -m finetune.lab.report`" in summary


def test_generated_sections_match_the_committed_results(tmp_path):
    """The tables of README.md and docs/*.md are regenerated from results/; a hand edit or a stale table fails here."""
    from finetune.lab.report import doc_pages, update_docs

    pages = {page.relative_to(PROJECT_DIR): page.read_text() for page in doc_pages(PROJECT_DIR)}
    for relative, text in pages.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    regenerated = update_docs(tmp_path, PROJECT_DIR / "results")
    assert {page.relative_to(tmp_path): text for page, text in regenerated.items()} == pages


def test_calibration_bins_match_a_hand_computed_case():
    from finetune.metrics import calibration

    probabilities = np.array([[0.95, 0.05, 0, 0], [0.9, 0.1, 0, 0], [0.3, 0.6, 0.1, 0], [0.25, 0.25, 0.25, 0.25]])
    c = calibration(probabilities, np.array([0, 1, 1, 3]), bins=4)
    assert c["count"] == [0, 1, 1, 2]  # 0.25 -> bin 1, 0.6 -> bin 2, 0.9 and 0.95 -> bin 3
    assert c["accuracy"] == [0, 0, 1, 0.5] and c["confidence"][3] == pytest.approx(0.925)
    assert c["ece"] == pytest.approx((0.25 + 0.4 + 2 * 0.425) / 4)


def test_git_state_is_unknown_without_git(tmp_path):
    """No git on the PATH: whether the tree was dirty is unknown (None), not False."""
    code = "from finetune.results import environment; e = environment(); print(e['git_commit'], e['git_dirty'])"
    env = {"PATH": str(tmp_path), "PYTHONPATH": str(PROJECT_DIR)}  # an empty folder: no git to run
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_DIR, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["None", "None"]


def test_dirty_means_tracked_files_outside_results_changed(tmp_path):
    """The notebooks rewrite results/ before their record is written: that alone does not make the run dirty."""
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "summary.md").write_text("old")
    (tmp_path / "train.py").write_text("old")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "start")
    (tmp_path / "results" / "summary.md").write_text("rewritten by the run")
    assert git_state(tmp_path)["git_dirty"] is False and len(git_state(tmp_path)["git_commit"]) == 40
    (tmp_path / "train.py").write_text("edited")
    assert git_state(tmp_path)["git_dirty"] is True


def test_records_carry_the_git_state_from_the_start_of_the_process(monkeypatch):
    """Files changed during a run (or git vanishing) do not change what its records say produced them."""
    if RUN_START_GIT_STATE["git_commit"] is None:
        pytest.skip("this tree is not a git checkout")
    monkeypatch.delenv("GIT_COMMIT", raising=False)

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    env = environment()
    assert (env["git_commit"], env["git_dirty"]) == (RUN_START_GIT_STATE["git_commit"], RUN_START_GIT_STATE["git_dirty"])


def _record_made(tmp_path, name, commit, created_at, dirty=False):
    record = json.loads(write_record(make_record(name), tmp_path / f"{name}_results.json").read_text())
    record["environment"].update(git_commit=commit, git_dirty=dirty)
    record["created_at"] = created_at
    generation = record["evaluations"]["label_scoring"]
    record["evaluations"]["generation"] = generation
    (tmp_path / f"{name}_results.json").write_text(json.dumps(record))


def test_tables_name_the_commit_and_mark_records_made_before_an_evaluation_change(tmp_path):
    # No commit recorded (a copied tree): the creation time says it came before every change.
    _record_made(tmp_path, "old_run", None, "2026-11-25T11:39:36+00:00")
    _record_made(tmp_path, "new_run", RUN_START_GIT_STATE["git_commit"] or None, "2099-01-01T00:00:00+00:00", dirty=True)
    table = summary_table(load_records(tmp_path))
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines()[2:] if line.startswith("| ")}
    # the first change and the count of the rest: every change touches label scoring or generation
    assert "| unknown | " in rows["old_run"]
    assert f"| cached decoding (b3ef6a2) and {len(EVALUATION_CHANGES) - 1} more |" in rows["old_run"]
    commit = (RUN_START_GIT_STATE["git_commit"] or "unknown")[:7]
    assert rows["new_run"].endswith(f"| {commit} (dirty) |  | `new_run_results.json` |")
    assert "`(dirty)` with uncommitted changes" in table and "*evaluation changed since*:" in table  # the legend


def label_scoring_changes() -> list[str]:
    """Every evaluation change to label scoring, as `made_before` names them, in order."""
    return [f"{what} ({change})" for change, _, modes, what in EVALUATION_CHANGES if "label_scoring" in modes]


def test_a_commit_in_this_history_is_judged_by_its_ancestry_not_its_date(tmp_path):
    """140d4f3 predates every evaluation change, however late its record was written."""
    from finetune.results import made_before

    record = {"environment": {"git_commit": "140d4f3"}, "created_at": "2099-01-01T00:00:00+00:00"}
    if subprocess.run(["git", "cat-file", "-e", "140d4f3^{commit}"], cwd=PROJECT_DIR).returncode:
        pytest.skip("a shallow or copied tree: the commit is not in its history")
    every = label_scoring_changes()
    assert len(every) >= 7 and made_before(record, ("label_scoring",)) == every
    assert made_before({**record, "environment": {"git_commit": "HEAD"}}, ("generation", "label_scoring")) == []


def test_a_commit_this_history_lacks_with_no_creation_time_predates_every_change():
    """A record of a since-rewritten commit that says nothing of when it was made cannot be counted as today's code."""
    from finetune.results import made_before

    record = {"environment": {"git_commit": "0" * 40}}
    assert made_before(record, ("label_scoring",)) == label_scoring_changes()
    assert made_before({"environment": {}}, ("label_scoring",)) == []  # no commit at all: as written (tests' records)


def test_evaluation_changes_carry_their_commit_times():
    """The creation-time fallback is only as good as these times: they must be the commits' own."""
    for commit, committed, _, _ in EVALUATION_CHANGES:
        done = subprocess.run(["git", "show", "-s", "--format=%cI", commit], cwd=PROJECT_DIR, capture_output=True,
                              text=True)
        if done.returncode:
            pytest.skip("a shallow or copied tree: the commits are not in its history")
        assert done.stdout.strip() == committed, commit


def test_training_runs_table_says_how_many_articles_each_optimizer_step_saw(tmp_path):
    """Summaries from before train.py recorded optimizer steps carry them in the Trainer's last log entry."""
    from finetune.lab.report import eval_benchmark_table, training_runs_table

    for name, summary in (("packed", {"log_history": [{"loss": 1.0}, {"epoch": 4.0, "step": 750}]}),
                          ("unpacked", {"optimizer_steps": 1500, "articles_per_optimizer_step": 16.0})):
        write_record({**make_record(name), "evaluations": {**make_record()["evaluations"],
                                                           "generation": make_record()["evaluations"]["label_scoring"]}},
                     tmp_path / "runs" / f"{name}_results.json")
        (tmp_path / "runs" / f"{name}_train_summary.json").write_text(json.dumps(
            {"train_seconds": 20.0, "data": {"train_size": 6000}, **summary}))
    table = training_runs_table(tmp_path / "runs")
    assert "| packed | 75.00% / " in table and "| 20 | 750 | 32.0 | CPU (" in table
    assert "| unpacked | 75.00% / " in table and "| 20 | 1500 | 16.0 | CPU (" in table
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 1 + 2  # the header and one row per run
    benchmark = {"benchmark": "eval", "environment": {**environment(), "git_commit": "abcdef123", "git_dirty": False},
                 "config": {"model": "checkpoints/run/final"},
                 "modes": {"label_scoring": {"articles": 4, "articles_per_second": 2.0, "batch_size": 4,
                                             "peak_allocated_gib": None,
                                             "latency_ms": {"mean": 1.0, "p50": 1.0, "p95": 1.0}}}}
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "eval.json").write_text(json.dumps(benchmark))
    assert eval_benchmark_table(tmp_path).splitlines()[2].endswith("| n/a | abcdef1 |")
    assert "| `checkpoints/run/final` | label_scoring |" in eval_benchmark_table(tmp_path)  # the model the speeds were measured on


def test_baselines_import_no_torch():
    """The scikit-learn baselines report through finetune.metrics, not through evaluate (and with it torch)."""
    code = "import sys, finetune.baselines; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_DIR, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_loss_plot_shows_the_last_logged_loss_or_says_none_was_logged():
    """A run shorter than logging_steps logs only its summary: the notebook's plot says so instead of failing."""
    from finetune.plots import plot_training_loss

    summary_only = [{"train_loss": 0.5, "step": 5, "epoch": 1.0}]
    assert "No training loss logged" in plot_training_loss(summary_only).axes[0].get_title()
    logged = [{"loss": 2.0, "step": 20}, {"loss": 0.25, "step": 40}, *summary_only]
    assert plot_training_loss(logged).axes[0].get_title().endswith("last logged 0.25")
