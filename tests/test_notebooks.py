"""The notebooks: committed thin, stripped and as Jupyter Lab saves them; run headless (papermill) on a small synthetic
sample, they write valid results files and show a person plain output (the data notes, text progress bars), no stderr.
`make demo` writes only where git ignores."""

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest
from IPython.core.inputtransformer2 import TransformerManager
from ipykernel.ipkernel import IPythonKernel
from ipykernel.kernelspec import get_kernel_dict

from finetune.config import get_config
from finetune.lab.methods import compare_methods, methods_section
from finetune.lab.notebooks import METHOD_COMPARISON, NOTEBOOKS, PROJECT_DIR, run_notebooks
from finetune.results import validate_record

# What finetune/lab/notebooks.py and finetune/lab/rehearse.py pass to papermill.
PARAMETERS = {"profile", "data_dir", "results_dir", "max_train_samples", "max_eval_samples", "project_dir", "method",
              "overrides"}
# The method comparison only reads results files (finetune/lab/methods.py writes them).
COMPARISON = METHOD_COMPARISON
ALL_NOTEBOOKS = (*NOTEBOOKS, COMPARISON)
WIDGET = "application/vnd.jupyter.widget-view+json"
# A model of a few thousand parameters on the synthetic sample: seconds to train and to evaluate.
SMALL_RUN = {"holdout_train_size": 300, "vocab_size": 512, "hidden_size": 64, "num_heads": 4, "intermediate_size": 128,
             "num_train_epochs": 4.0, "learning_rate": 3e-3, "per_device_train_batch_size": 8, "max_length": 128,
             "save_steps": 1000, "eval_batch_size": 64}


def committed(name: str) -> nbformat.NotebookNode:
    return nbformat.read(PROJECT_DIR / "notebooks" / f"{name}.ipynb", as_version=4)


def code_cells(notebook: nbformat.NotebookNode) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def outputs(notebook: nbformat.NotebookNode) -> list:
    return [output for cell in code_cells(notebook) for output in cell.outputs]


def stream(notebook: nbformat.NotebookNode, name: str) -> str:
    """Everything the notebook wrote to stdout or stderr."""
    return "".join(output.text for output in outputs(notebook) if output.get("name") == name)


def python_source(notebook: nbformat.NotebookNode) -> str:
    """The code cells as one Python file, IPython magics turned into the calls they stand for."""
    return "\n".join(TransformerManager().transform_cell(cell.source) for cell in code_cells(notebook))


def lab_metadata() -> dict:
    """The notebook metadata Jupyter Lab sets from the kernel it runs: its kernelspec (as ipykernel installs it) and
    the kernel_info reply's language_info."""
    spec = get_kernel_dict()
    return {"kernelspec": {"name": "python3", "display_name": spec["display_name"], "language": spec["language"]},
            "language_info": IPythonKernel.language_info}


def test_notebooks_are_committed_thin_and_parameterized():
    for name in ALL_NOTEBOOKS:
        notebook = committed(name)
        code = code_cells(notebook)
        assert "parameters" in code[0].metadata.get("tags", []), name
        # papermill reads each parameter's default and help from this cell; a line it cannot parse drops the name.
        expected = {"results_dir", "project_dir"} if name == COMPARISON else PARAMETERS
        assert set(papermill.inspect_notebook(PROJECT_DIR / "notebooks" / f"{name}.ipynb")) == expected, name
        assert all(not cell.outputs and cell.execution_count is None for cell in code), f"{name} has outputs"
        definitions = [node for node in ast.walk(ast.parse(python_source(notebook)))
                       if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))]
        assert not definitions, f"{name} holds logic: it belongs in a package"


def test_notebooks_import_only_what_they_use():
    for name in ALL_NOTEBOOKS:
        tree = ast.parse(python_source(committed(name)))
        imported = {alias.asname or alias.name.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
        used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        assert imported <= used, f"{name} imports {sorted(imported - used)} and never uses them"


def test_notebooks_are_committed_as_jupyter_lab_saves_them():
    """Lab sets the kernelspec and language_info from the running kernel, upgrades nbformat_minor, and writes JSON as
    nbformat does; a notebook committed in any other form is marked modified on opening and autosave rewrites it."""
    for name in ALL_NOTEBOOKS:
        path = PROJECT_DIR / "notebooks" / f"{name}.ipynb"
        notebook = committed(name)
        assert (notebook.nbformat, notebook.nbformat_minor) == (4, nbformat.v4.nbformat_minor), name
        expected = lab_metadata()
        assert notebook.metadata.kernelspec == expected["kernelspec"], name
        # The Python version is the project .venv's; a kernel on another Python has Lab rewrite that one field.
        assert {**notebook.metadata.language_info, "version": None} == {**expected["language_info"], "version": None}
        assert set(notebook.metadata) == {"kernelspec", "language_info"}, name
        assert path.read_text(encoding="utf-8") == nbformat.writes(notebook) + "\n", f"{name} is not as nbformat writes"


def test_importing_the_trainer_writes_nothing_to_stderr():
    """transformers imports torchao whenever it is installed; its import-time messages (CUDA extensions the optimizer
    never calls, torch's Enum deprecation) once opened notebooks 01-03 with a red block."""
    result = subprocess.run([sys.executable, "-c", "import finetune.train, finetune.evaluate"], cwd=PROJECT_DIR,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_notebooks_find_the_project_root_from_their_own_folder(tmp_path, monkeypatch):
    """Jupyter starts a kernel in the notebook's folder: an executed copy in results/notebooks/ run again writes to the
    project's results/, not to results/notebooks/results/."""
    (tmp_path / "pyproject.toml").touch()
    folders = (tmp_path / "results" / "notebooks", tmp_path / "notebooks", tmp_path)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    for name in ALL_NOTEBOOKS:
        setup = code_cells(committed(name))[1].source
        finding = setup[:setup.index("os.chdir(project_dir)")]  # up to the chdir
        for folder in folders:
            monkeypatch.chdir(folder)
            namespace = {"project_dir": None}
            exec(finding, namespace)
            assert Path(namespace["project_dir"]) == tmp_path, (name, folder)
        namespace = {"project_dir": "elsewhere"}  # given: kept
        exec(finding, namespace)
        assert namespace["project_dir"] == "elsewhere"


def test_a_headless_notebook_shows_notes_and_progress_as_plain_output(synthetic_dir, tmp_path):
    """Notebook 01 on the synthetic sample: the data notes are ordinary output, not a red stderr block, and the progress
    bars text at their last frame (a widget bar is saved at its first: 0%)."""
    results = tmp_path / "results"
    overrides = {**SMALL_RUN, "checkpoints_dir": str(tmp_path / "checkpoints")}
    executed, = run_notebooks({"profile": "tiny", "data_dir": str(synthetic_dir), "results_dir": str(results),
                               "overrides": overrides}, tmp_path / "executed", names=("01_base_model_performance",))
    record = json.loads((results / "base_model_results.json").read_text())
    validate_record(record)
    notebook = nbformat.read(executed, as_version=4)
    assert stream(notebook, "stderr") == ""
    stdout = stream(notebook, "stdout")
    assert record["data"]["notes"] and all(note in stdout for note in record["data"]["notes"])
    assert re.search(r"label scoring: 100%.*\b2/2\b", stdout) and "\r" not in stdout, stdout  # the last frame only
    assert not any(WIDGET in output.get("data", {}) for output in outputs(notebook))
    assert any("image/png" in output.get("data", {}) for output in outputs(notebook))


@pytest.mark.skipif(not (PROJECT_DIR / ".git").exists() or not shutil.which("git") or not shutil.which("make"),
                    reason="needs a git checkout and make")
def test_make_demo_writes_only_where_git_ignores():
    """A clone stays clean after `make demo`: its notebooks write into an ignored folder, and the committed results and
    the README are regenerated only by `make demo-results`."""
    commands = subprocess.run(["make", "-n", "demo"], cwd=PROJECT_DIR, capture_output=True, text=True,
                              check=True).stdout
    demo_dir, = re.findall(r"finetune\.lab\.notebooks .*--results_dir (\S+)", commands)
    for written in (f"{demo_dir}/summary.md", f"{demo_dir}/notebooks/03_finetuned_model_performance.ipynb",
                    "checkpoints/tiny-ag-news/final/model.safetensors"):
        assert subprocess.run(["git", "check-ignore", "-q", written], cwd=PROJECT_DIR).returncode == 0, written
    assert "finetune.lab.report" not in commands
    maintainer = subprocess.run(["make", "-n", "demo-results"], cwd=PROJECT_DIR, capture_output=True, text=True,
                                check=True).stdout
    assert "finetune.lab.report" in maintainer


@pytest.mark.slow
def test_notebooks_execute_headless_and_write_valid_results(synthetic_dir, tmp_path):
    results = tmp_path / "results"
    overrides = {**SMALL_RUN, "checkpoints_dir": str(tmp_path / "checkpoints")}
    executed = run_notebooks({"profile": "tiny", "data_dir": str(synthetic_dir), "results_dir": str(results),
                              "overrides": overrides}, tmp_path / "executed")
    for name in ("base_model", "finetuned_model", "baseline_majority", "baseline_tfidf_logreg"):
        record = json.loads((results / f"{name}_results.json").read_text())
        validate_record(record)
        assert record["data"]["protocol"] == "holdout" and record["data"]["eval_size"] == 100
    finetuned = json.loads((results / "finetuned_model_results.json").read_text())
    assert set(finetuned["evaluations"]) == {"label_scoring", "generation", "generation_lenient"}
    base = json.loads((results / "base_model_results.json").read_text())["evaluations"]["generation"]
    assert base["decoded_answers"] == 100 and base["decoding_cuda_graph"] is False  # every answer decoded, on the CPU
    assert finetuned["evaluations"]["label_scoring"]["metrics"]["accuracy"] > 0.5  # synthetic classes are easy
    for png in ("ag_news_distribution", "ag_news_text_lengths", "base_model_confusion_matrix", "calibration",
                "finetuned_model_confusion_matrix", "per_class_f1_base_vs_finetuned", "comparison", "training_loss"):
        assert (results / f"{png}.png").stat().st_size > 1000, png
    assert "finetuned_model" in (results / "summary.md").read_text()
    assert [path.name for path in executed] == [f"{name}.ipynb" for name in NOTEBOOKS]
    for name, path in zip(NOTEBOOKS, executed):  # no folder of this machine in what the runs record
        papermill_run = nbformat.read(path, as_version=4).metadata.papermill
        assert papermill_run.input_path == f"notebooks/{name}.ipynb" and "project_dir" not in papermill_run.parameters

    # What a person sees: plain output, no stderr (the data notes print as output), no widget bars.
    for path in executed:
        notebook = nbformat.read(path, as_version=4)
        assert stream(notebook, "stderr") == "", f"{path.name} writes to stderr:\n{stream(notebook, 'stderr')}"
        assert not any(WIDGET in output.get("data", {}) for output in outputs(notebook)), path.name
        assert any("image/png" in output.get("data", {}) for output in outputs(notebook)), f"{path.name}: no figure"
        # Executed copies keep the committed form (Lab opens them without rewriting), with this kernel's Python.
        assert {k: notebook.metadata[k] for k in ("kernelspec", "language_info")} == lab_metadata(), path.name
        assert (notebook.nbformat, notebook.nbformat_minor) == (4, nbformat.v4.nbformat_minor), path.name
    training = nbformat.read(executed[2], as_version=4)  # a progress bar, but not the Trainer's table of every loss
    shown = "".join(str(output.get("data", {}).get("text/html", "")) for output in outputs(training))
    assert "<progress" in shown and "Training Loss" not in shown


@pytest.mark.slow
def test_method_comparison_notebook_shows_each_method_from_its_results(synthetic_dir, tmp_path):
    """Full fine-tuning and LoRA from one pretrained base (finetune.lab.methods), then notebook 04 on their records."""
    config = get_config("tiny", data_dir=str(synthetic_dir), holdout_train_size=300, max_train_samples=80,
                        checkpoints_dir=str(tmp_path / "checkpoints"), results_dir=str(tmp_path / "results"),
                        vocab_size=512, hidden_size=64, num_heads=4, intermediate_size=128, num_train_epochs=1.0,
                        per_device_train_batch_size=8, max_length=128, eval_batch_size=64)
    written = compare_methods(config, ["full", "lora"], modes=("label_scoring",))
    records = [json.loads(path.read_text()) for path in written]
    for record in records:
        validate_record(record)
    full, lora = (record["training"] for record in records)
    assert (full["method"], lora["method"]) == ("full", "lora") and lora["output_bytes"] < full["output_bytes"]
    assert len({record["config"]["model"] for record in records}) == 1  # the same pretrained base
    assert "| lora |" in methods_section(config.results_dir)
    executed = run_notebooks({"results_dir": config.results_dir}, tmp_path / "executed", names=(COMPARISON,))
    notebook = nbformat.read(executed[0], as_version=4)
    shown = "".join(str(output.get("data", {}).get("text/html", "")) for output in outputs(notebook))
    assert "lora" in shown and "output_mb" in shown
    assert any("image/png" in output.get("data", {}) for output in outputs(notebook))
    assert not any(output.get("name") == "stderr" for output in outputs(notebook))
