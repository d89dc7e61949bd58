"""Results JSON files: the run facts every one records, the schema they follow, and the summary table built from them."""

import datetime
import json
import os
import platform
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path

import jsonschema

SCHEMA_PATH = Path(__file__).with_name("results_schema.json")
PROJECT_DIR = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "transformers", "trl", "datasets", "accelerate", "tokenizers", "scikit-learn", "flash-attn")

# Commits that changed what an evaluation mode measures (its accuracy or its speed), oldest first, with their commit
# times. The tables mark a row whose record was made before one of them: a rerun at today's code may differ.
EVALUATION_CHANGES = (
    ("b3ef6a2", "2026-11-25T12:52:33+00:00", ("generation", "generation_lenient"), "cached decoding"),
    ("33dda75", "2026-11-25T13:34:38+00:00", ("label_scoring",), "answer-tree label scoring"),
    ("ad4c322", "2026-11-28T18:37:04+00:00", ("generation", "generation_lenient"), "greedy GenerationConfig"),
    ("d6676b1", "2026-11-28T18:37:17+00:00", ("generation", "generation_lenient"), "strict/lenient generation"),
)


def _git(root: Path, *args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=root).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_state(root: Path = PROJECT_DIR) -> dict:
    """The commit checked out at `root` and whether tracked files outside results/ differ from it (a run's own
    outputs are not what produced it); None for what cannot be known (no git, not a repository)."""
    commit = _git(root, "rev-parse", "HEAD")
    changes = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)results")
    return {"git_commit": commit, "git_dirty": None if commit is None or changes is None else bool(changes)}


# The tree as the process started, before the run rewrote anything (notebooks write results/ as they go, and others
# may edit the checkout during a long run): every record of this process carries it.
RUN_START_GIT_STATE = git_state()


def environment() -> dict:
    """Git commit, hardware and package versions: enough to trace a number back to what produced it."""
    import torch  # here, not at the top: a scikit-learn baseline imports this module without needing torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "count": torch.cuda.device_count(), "memory_gib": round(props.total_memory / 2**30, 1),
               "cuda": torch.version.cuda}
    # A copied tree (e.g. on a lent GPU machine) passes its commit in GIT_COMMIT: any .git it carries may be stale,
    # so the variable wins, and whether the copy had uncommitted changes is then unknown (None).
    copied_commit = os.environ.get("GIT_COMMIT")
    return {
        **({"git_commit": copied_commit, "git_dirty": None} if copied_commit else RUN_START_GIT_STATE),
        "hardware": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                     "torch_threads": torch.get_num_threads(), "gpu": gpu},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
    }


def commit_label(environment: dict) -> str:
    """The short commit a record was made at, in a table cell; `(dirty)` when tracked files had changed."""
    commit = (environment.get("git_commit") or "unknown")[:7]
    return f"{commit} (dirty)" if environment.get("git_dirty") else commit


@cache
def _commit_contains(commit: str, change: str) -> bool | None:
    """Whether `change` is in the history of `commit`; None where git cannot tell (no git, a commit it lacks)."""
    try:
        rc = subprocess.run(["git", "merge-base", "--is-ancestor", change, commit], capture_output=True,
                            cwd=PROJECT_DIR).returncode
    except OSError:
        return None
    return {0: True, 1: False}.get(rc)


def made_before(record: dict, modes: tuple[str, ...]) -> list[str]:
    """The evaluation changes to any of `modes` that `record` predates: by its commit's history where git knows it,
    else by its creation time (a record written before a change was committed cannot have it)."""
    commit, created = record["environment"].get("git_commit"), record.get("created_at")
    missed = []
    for change, committed, changed_modes, what in EVALUATION_CHANGES:
        if not set(modes) & set(changed_modes):
            continue
        contains = _commit_contains(commit, change) if commit else None
        if contains is None:
            contains = created is None or (datetime.datetime.fromisoformat(created)
                                           >= datetime.datetime.fromisoformat(committed))
        if not contains:
            missed.append(f"{what} ({change})")
    return missed


def hardware_label(environment: dict) -> str:
    """What ran it, in a table cell: the GPU's name, or the CPU and its thread count."""
    hardware = environment["hardware"]
    gpu = hardware["gpu"]
    return gpu["name"] if gpu else f"CPU ({hardware['torch_threads']} threads)"


def validate_record(record: dict) -> None:
    """Raise jsonschema.ValidationError if `record` does not follow results_schema.json."""
    jsonschema.validate(record, json.loads(SCHEMA_PATH.read_text()))


def write_record(record: dict, path: str | Path) -> Path:
    """Stamp the run facts onto `record`, check it against the schema, and write it."""
    record = {"schema_version": 1, **record, "environment": environment(),
              "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    validate_record(record)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def load_records(results_dir: str | Path) -> list[dict]:
    """Every results JSON under `results_dir`, except benchmarks (their own schema), the rehearsal (random weights:
    its accuracies are not a model's, see results/rehearsal/README.md) and the adapter-settings carve (scored on
    training articles, see finetune/lab/lora_carve.py)."""
    records = []
    for path in sorted(Path(results_dir).rglob("*.json")):
        if {"benchmarks", "rehearsal", "carve"} & set(path.relative_to(results_dir).parts):
            continue
        record = json.loads(path.read_text())
        if isinstance(record, dict) and record.get("schema_version") == 1 and "evaluations" in record:
            records.append({**record, "path": str(path.relative_to(results_dir))})
    return records


def summary_table(records: list[dict]) -> str:
    """A markdown table, one row per evaluation of every run, with the commit that made it and the evaluation changes
    made since (`made before`)."""
    lines = ["| run | model | protocol | eval articles | mode | accuracy | macro-F1 | failures | articles/s | hardware "
             "| commit | made before | file |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: r["path"]):
        hardware, commit = hardware_label(r["environment"]), commit_label(r["environment"])
        for mode, ev in r["evaluations"].items():
            m, t = ev["metrics"], ev["throughput"]
            lines.append(f"| {r['name']} | {r['model']} | {r['data']['protocol']} | {r['data']['eval_size']} | {mode} "
                         f"| {m['accuracy']:.2%} | {m['macro_f1']:.2%} | {ev['failures']['count']} "
                         f"| {t['articles_per_second']:.1f} | {hardware} | {commit} "
                         f"| {', '.join(made_before(r, (mode,)))} | `{r['path']}` |")
    return "\n".join(lines)


def write_summary(results_dir: str | Path = "results") -> Path:
    """results/summary.md, generated from the results JSON files; never edit it by hand."""
    path = Path(results_dir) / "summary.md"
    path.write_text("# Results summary\n\nGenerated by `python -m finetune.results` from every results JSON under "
                    "`results/`; do not edit by hand.\n\n" + summary_table(load_records(results_dir)) + "\n")
    return path


if __name__ == "__main__":
    print(f"wrote {write_summary()}")
