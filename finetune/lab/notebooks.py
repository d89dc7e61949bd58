"""Run the notebooks headless with papermill, in order, keeping the executed copies.

    python -m finetune.lab.notebooks --profile tiny --results_dir build/demo              # what `make demo` runs
    python -m finetune.lab.notebooks --profile tiny                   # `make demo-results`: the committed reference
    python -m finetune.lab.notebooks --profile qwen2.5-7b --model ~/models/Qwen2.5-7B-Instruct   # any RunConfig field
"""

import json
import os
import sys
from pathlib import Path
from unittest import mock

import papermill

from data_prep.source import DATA_ENV
from finetune.config import get_config, overrides_from_args

PROJECT_DIR = Path(__file__).resolve().parents[2]
NOTEBOOKS = ("00_data_overview", "01_base_model_performance", "02_fine_tuning_full", "03_finetuned_model_performance")
# 04 only reads results files: the method runs (`make tiny-methods`, `make gpu-methods`) under results/.
METHOD_COMPARISON = "04_method_comparison"
METHODS_RESULTS_DIR = "results"
# What the kernels see: text progress bars from the suite (finetune/notebook_progress.py), none from the libraries'
# loading, saving and dataset mapping. Widget bars would be saved at their first frame: "0%".
HEADLESS = {"FINETUNE_HEADLESS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
# The runs notebooks 01 and 03 write, as the demo's closing lines show them.
DEMO_RUNS = ("base_model", "finetuned_model", "baseline_majority", "baseline_tfidf_logreg")


def run_notebooks(parameters: dict, output_dir: str | Path, names: tuple[str, ...] = NOTEBOOKS) -> list[Path]:
    """Execute each notebook with `parameters` and write the executed copy to `output_dir`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    executed = []
    for name in names:
        out = output_dir / f"{name}.ipynb"
        print(f"running notebooks/{name}.ipynb -> {out}", flush=True)
        # The kernel starts in notebooks/, as Jupyter starts one in the notebook's folder: the notebook finds the
        # project root above it, as an executed copy re-run from results/notebooks/ does. The input path is recorded
        # relative to where this runs, so the committed reference runs name no folder of the machine that made them.
        notebook = os.path.relpath(PROJECT_DIR / "notebooks" / f"{name}.ipynb")
        # coalesce_streams: each cell's stdout in one output, a text bar's frames reduced to its last.
        with mock.patch.dict(os.environ, HEADLESS):
            papermill.execute_notebook(notebook, out, cwd=PROJECT_DIR / "notebooks", parameters=parameters,
                                       kernel_name="python3", progress_bar=False, log_output=False,
                                       coalesce_streams=True)
        executed.append(out)
    return executed


def notebook_parameters(profile: str, overrides: dict) -> dict:
    """Papermill parameters for the notebooks: the profile and the RunConfig fields given (only those, so the profile's
    own values, e.g. the tiny demo's sample limits, hold otherwise).

    Notebooks run from the project root, so a relative path is rewritten to mean the same there. Results record paths
    and the data source as named: a folder given relative stays relative (to the project), $AG_NEWS_DIR its name."""
    get_config(profile, **overrides)  # a bad value fails here, before any kernel starts
    overrides = dict(overrides)
    for field in ("data_dir", "results_dir", "checkpoints_dir", "model"):
        path = overrides.get(field)
        local = field != "model" or Path(path or "").is_dir()  # a model may be a hub id
        if path and local and not os.path.isabs(path):
            overrides[field] = os.path.relpath(Path(path).resolve(), PROJECT_DIR)
    if os.environ.get(DATA_ENV):  # the kernels inherit it, and read it from the project root
        os.environ[DATA_ENV] = str(Path(os.environ[DATA_ENV]).resolve())
    return {"profile": profile, "data_dir": overrides.pop("data_dir", None),
            "results_dir": overrides.pop("results_dir", "results"), "method": overrides.pop("method", "full"),
            "overrides": overrides}


def accuracy_lines(results_dir: Path) -> list[str]:
    """One line for each of the demo's runs found in `results_dir`: its primary mode's accuracy and macro-F1."""
    lines = []
    for name in DEMO_RUNS:
        path = results_dir / f"{name}_results.json"
        if path.exists():
            record = json.loads(path.read_text())
            metrics = record["evaluations"][record["primary_mode"]]["metrics"]
            lines.append(f"{name:<22} {record['primary_mode']:<14} accuracy {metrics['accuracy']:.2%}  "
                         f"macro-F1 {metrics['macro_f1']:.2%}")
    return lines


def main(argv: list[str] | None = None) -> None:
    profile, overrides = overrides_from_args(argv, description=__doc__)  # `--max_train_samples none` lifts a limit
    results_dir = Path(overrides.get("results_dir", "results"))
    parameters = notebook_parameters(profile, overrides)
    try:
        run_notebooks(parameters, results_dir / "notebooks")
        run_notebooks({"results_dir": METHODS_RESULTS_DIR}, results_dir / "notebooks", names=(METHOD_COMPARISON,))
    except papermill.PapermillExecutionError as e:
        sys.exit(f"error: notebook failed: {e.ename}: {e.evalue}")
    print("\n".join(accuracy_lines(results_dir)))
    print(f"done: results in {results_dir.resolve()}/ (summary.md, *_results.json, PNGs, executed notebooks)")


if __name__ == "__main__":
    main()
