"""Run the four notebooks headless with papermill, in order, keeping the executed copies.

    python -m finetune.notebooks --profile tiny            # what `make demo` runs
"""

import argparse
import os
import sys
from pathlib import Path

import papermill

from data_prep.source import DATA_ENV

PROJECT_DIR = Path(__file__).resolve().parents[1]
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


# Passed on only when given, so that the profile's own limits (the tiny demo's) hold otherwise.
CAPS = ("max_train_samples", "max_eval_samples")


def _sample_cap(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--data_dir", default=None, help="default: $AG_NEWS_DIR, else the hub")
    parser.add_argument("--results_dir", default="results")
    for cap in CAPS:
        parser.add_argument(f"--{cap}", type=_sample_cap, default=argparse.SUPPRESS,
                            help="default: the profile's limit; none lifts it")
    args = parser.parse_args(argv)
    # Notebooks run from the project root: a relative data path must mean the same there as here. Results record the
    # source as named, so a folder given relative stays relative (to the project) and $AG_NEWS_DIR stays its name.
    data_dir = args.data_dir
    if data_dir and not os.path.isabs(data_dir):
        data_dir = os.path.relpath(data_dir, PROJECT_DIR)
    if os.environ.get(DATA_ENV):
        os.environ[DATA_ENV] = str(Path(os.environ[DATA_ENV]).resolve())
    parameters = {"profile": args.profile, "data_dir": data_dir,
                  "results_dir": str(Path(args.results_dir).resolve()),
                  "overrides": {cap: getattr(args, cap) for cap in CAPS if hasattr(args, cap)}}
    try:
        run_notebooks(parameters, Path(args.results_dir) / "notebooks")
    except papermill.PapermillExecutionError as e:
        sys.exit(f"error: notebook failed: {e.ename}: {e.evalue}")
    print(f"done: results in {Path(args.results_dir).resolve()}/ (summary.md, *_results.json, PNGs, executed notebooks)")


if __name__ == "__main__":
    main()
