"""Run the four notebooks headless with papermill, in order, keeping the executed copies.

    python -m finetune.lab.notebooks --profile tiny                                   # what `make demo` runs
    python -m finetune.lab.notebooks --profile qwen2.5-7b --model ~/models/Qwen2.5-7B-Instruct   # any RunConfig field
"""

import os
import sys
from pathlib import Path

import papermill

from data_prep.source import DATA_ENV
from finetune.config import get_config, overrides_from_args

PROJECT_DIR = Path(__file__).resolve().parents[2]
NOTEBOOKS = ("00_data_overview", "01_base_model_performance", "02_fine_tuning_full", "03_finetuned_model_performance")


def run_notebooks(parameters: dict, output_dir: str | Path, names: tuple[str, ...] = NOTEBOOKS) -> list[Path]:
    """Execute each notebook with `parameters` and write the executed copy to `output_dir`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    executed = []
    for name in names:
        out = output_dir / f"{name}.ipynb"
        print(f"running notebooks/{name}.ipynb -> {out}", flush=True)
        papermill.execute_notebook(PROJECT_DIR / "notebooks" / f"{name}.ipynb", out, cwd=PROJECT_DIR,
                                   parameters={"project_dir": str(PROJECT_DIR), **parameters},
                                   kernel_name="python3", progress_bar=False, log_output=False)
        executed.append(out)
    return executed


def main(argv: list[str] | None = None) -> None:
    # Only the fields given are passed on, so the profile's own values (e.g. the tiny demo's sample limits) hold
    # otherwise; `--max_train_samples none` lifts a limit.
    profile, overrides = overrides_from_args(argv, description=__doc__)
    get_config(profile, **overrides)  # a bad value fails here, before any kernel starts
    # Notebooks run from the project root: a relative path must mean the same there as here. Results record the data
    # source as named, so a folder given relative stays relative (to the project) and $AG_NEWS_DIR stays its name.
    data_dir = overrides.pop("data_dir", None)
    if data_dir and not os.path.isabs(data_dir):
        data_dir = os.path.relpath(data_dir, PROJECT_DIR)
    if os.environ.get(DATA_ENV):
        os.environ[DATA_ENV] = str(Path(os.environ[DATA_ENV]).resolve())
    if "model" in overrides and Path(overrides["model"]).is_dir():  # a local checkpoint folder, not a hub id
        overrides["model"] = str(Path(overrides["model"]).resolve())
    results_dir = Path(overrides.pop("results_dir", "results"))
    parameters = {"profile": profile, "data_dir": data_dir, "results_dir": str(results_dir.resolve()),
                  "overrides": overrides}
    try:
        run_notebooks(parameters, results_dir / "notebooks")
    except papermill.PapermillExecutionError as e:
        sys.exit(f"error: notebook failed: {e.ename}: {e.evalue}")
    print(f"done: results in {results_dir.resolve()}/ (summary.md, *_results.json, PNGs, executed notebooks)")


if __name__ == "__main__":
    main()
