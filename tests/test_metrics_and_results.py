"""Metrics against hand-computed cases; results JSON schema, records and the generated summary table."""

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from finetune.metrics import classification_metrics
from finetune.results import load_records, summary_table, validate_record, write_record, write_summary


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
    assert "| base_model | scratch | holdout | 4 | label_scoring | 75.00% |" in table and "| CPU (" in table
    assert "| finetuned_model | scratch | holdout | 4 | label_scoring | 100.00% |" in table
    assert "do not edit by hand" in write_summary(tmp_path).read_text()


def test_readme_generated_sections_match_the_committed_results(tmp_path):
    """The README's tables are regenerated from results/; a hand edit or a stale table fails here."""
    from finetune.notebooks import PROJECT_DIR
    from finetune.report import update_readme

    readme = (PROJECT_DIR / "README.md").read_text()
    copy = tmp_path / "README.md"
    copy.write_text(readme)
    assert update_readme(copy, PROJECT_DIR / "results") == readme


def test_calibration_bins_match_a_hand_computed_case():
    from finetune.metrics import calibration

    probabilities = np.array([[0.95, 0.05, 0, 0], [0.9, 0.1, 0, 0], [0.3, 0.6, 0.1, 0], [0.25, 0.25, 0.25, 0.25]])
    c = calibration(probabilities, np.array([0, 1, 1, 3]), bins=4)
    assert c["count"] == [0, 1, 1, 2]  # 0.25 -> bin 1, 0.6 -> bin 2, 0.9 and 0.95 -> bin 3
    assert c["accuracy"] == [0, 0, 1, 0.5] and c["confidence"][3] == pytest.approx(0.925)
    assert c["ece"] == pytest.approx((0.25 + 0.4 + 2 * 0.425) / 4)


def test_baselines_import_no_torch():
    """The scikit-learn baselines report through finetune.metrics, not through evaluate (and with it torch)."""
    code = "import sys, finetune.baselines; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
