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
# DECODING: the benchmark's mode that decodes every article (finetune/lab/bench_eval.py); decoding changes change it.
DECODING = "generation_decoding"
# The changes to what every pass runs: label scoring, generation read strictly and leniently, and decoding.
EVERY_MODE = ("label_scoring", "generation", "generation_lenient", DECODING)
EVALUATION_CHANGES = (
    ("b3ef6a2", "2026-11-25T12:52:33+00:00", ("generation", "generation_lenient"), "cached decoding"),
    ("33dda75", "2026-11-25T13:34:38+00:00", ("label_scoring",), "answer-tree label scoring"),
    ("ad4c322", "2026-11-28T18:37:04+00:00", ("generation", "generation_lenient"), "greedy GenerationConfig"),
    ("d6676b1", "2026-11-28T18:37:17+00:00", ("generation", "generation_lenient"), "strict/lenient generation"),
    ("84f9ac6", "2026-12-05T01:21:32+00:00", EVERY_MODE, "training's prompt budget"),
    ("3af8add", "2026-12-05T04:09:41+00:00", EVERY_MODE, "the suite's attention in evaluation"),
    ("a0526c6", "2026-12-05T07:10:51+00:00", EVERY_MODE, "CUDA-graph decoding, even batches"),
    ("1d41fa0", "2026-12-05T07:59:55+00:00", ("generation", "generation_lenient"),
     "answer-tree check read behind the next batch"),
    ("25d6540", "2026-12-05T12:26:57+00:00", ("generation", "generation_lenient", DECODING), "packed decoding prefill"),
    ("a28d1f5", "2026-12-06T21:40:17+00:00", EVERY_MODE, "last layer's MLP where read"),
    ("73fa760", "2026-12-06T23:31:31+00:00", ("label_scoring",), "one-pass normalizers"),
    ("53ca317", "2026-12-06T23:32:10+00:00", ("generation", "generation_lenient"), "tree check's argmax before its terms"),
    ("07751f7", "2026-12-07T02:06:22+00:00", ("label_scoring", "generation", "generation_lenient"),
     "prompts encoded batch by batch"),
    ("0d79fb5", "2026-12-07T03:56:13+00:00", ("label_scoring", "generation", "generation_lenient"),
     "results copied back behind their own batch"),
    ("16bcd74", "2026-12-07T06:07:53+00:00", EVERY_MODE, "residual adds inside the matmuls"),
    ("f548db6", "2026-12-07T07:27:10+00:00", ("label_scoring", "generation", "generation_lenient"),
     "answer branches' own kernel"),
    ("6d99b6e", "2026-12-07T07:36:10+00:00", ("label_scoring", "generation", "generation_lenient"),
     "32 keys a step in the branches' kernel"),
    ("3365365", "2026-12-07T09:05:03+00:00", ("generation", "generation_lenient", DECODING),
     "stop flag read from the trained answers' length on"),
    ("5b191b0", "2026-12-07T17:25:10+00:00", ("generation", "generation_lenient"), "only the branch taken checked"),
    ("15ca141", "2026-12-07T22:48:31+00:00", EVERY_MODE, "the grouped varlen kernel"),
    ("e5fd5a1", "2026-12-08T00:15:15+00:00", EVERY_MODE, "next batch encoded behind the forward, answers parsed once"),
    ("73c3f66", "2026-12-08T00:58:53+00:00", EVERY_MODE, "the opening's forward without host syncs"),
    ("403a85b", "2026-12-08T02:26:06+00:00", EVERY_MODE, "keys read where they lie"),
    ("c221af7", "2026-12-08T02:41:50+00:00", ("generation", "generation_lenient"),
     "the branches picked ride in a later forward"),
    ("194d1fd", "2026-12-08T02:56:19+00:00", ("label_scoring", "generation", "generation_lenient"),
     "attention's parts written into one output"),
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


def made_before(record: dict, modes: tuple[str, ...], changes: tuple = EVALUATION_CHANGES) -> list[str]:
    """The `changes` to any of `modes` that `record` predates: by its commit's history where git knows it,
    else by its creation time (a record written before a change was committed cannot have it). A commit this history
    lacks (since rewritten), with no creation time, may predate any change: it is taken to predate them all."""
    commit, created = record["environment"].get("git_commit"), record.get("created_at")
    missed = []
    for change, committed, changed_modes, what in changes:
        if not set(modes) & set(changed_modes):
            continue
        contains = _commit_contains(commit, change) if commit else None
        if contains is None:
            contains = not commit if created is None else (datetime.datetime.fromisoformat(created)
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


# What each column of a run table reads from a record: the answer scored among the four (a baseline's own prediction),
# the answer generated and read strictly, and the same answer read leniently.
ANSWER_COLUMNS = (("scored", ("label_scoring", "classifier")), ("generated", ("generation",)),
                  ("lenient", ("generation_lenient",)))
RUN_TABLE_LEGEND = ("*scored*: the most probable of the four answers (label scoring; a baseline's own prediction); "
                    "*generated*: the model's own answer, the exact trained JSON; *lenient*: the same answer, its "
                    "first JSON object, label in any case. *commit*: the code that wrote the file, `(dirty)` with "
                    "uncommitted changes, `unknown` where the file records none.")
EVALUATION_CHANGED_LEGEND = ("*evaluation changed since*: the first change to the evaluation code committed after the "
                             "file was written that changes what a column measures, and how many more followed "
                             "(`finetune/results.py::EVALUATION_CHANGES` lists them all); a rerun today may differ.")


def run_group(record: dict) -> str:
    """The folder of results/ a record lies in (`gpu`, `methods`, ...), or `demo` for the notebooks' own records at its
    top level."""
    parts = Path(record["path"]).parts
    return parts[0] if len(parts) > 1 else "demo"


def answer_cells(record: dict) -> list[str]:
    """Accuracy / macro-F1 of each answer column (ANSWER_COLUMNS), blank where the run has no such evaluation."""
    cells = []
    for _, modes in ANSWER_COLUMNS:
        ev = next((record["evaluations"][m] for m in modes if m in record["evaluations"]), None)
        cells.append("" if ev is None else f"{ev['metrics']['accuracy']:.2%} / {ev['metrics']['macro_f1']:.2%}")
    return cells


def run_table(header: list[str], rows: list[tuple[list[str], list[str]]]) -> str:
    """A markdown table of `header` and rows of cells, with an `evaluation changed since` column before the last
    (the file) only where some row has one, and the legends under it."""
    changed = any(since for _, since in rows)
    if changed:
        header = [*header[:-1], "evaluation changed since", header[-1]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cells, since in rows:
        cells = [*cells[:-1], changes_cell(since), cells[-1]] if changed else cells
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", RUN_TABLE_LEGEND + (" " + EVALUATION_CHANGED_LEGEND if changed else "")]
    return "\n".join(lines)


def changes_cell(since: list[str]) -> str:
    """The first of the changes a record predates and how many came after it: the whole list, repeated in every row
    of a table, made the rows unreadable."""
    if len(since) < 2:
        return "".join(since)
    return f"{since[0]} and {len(since) - 1} more"


def summary_table(records: list[dict]) -> str:
    """A markdown table, one row per run: accuracy and macro-F1 of each way of reading its answer, speed, what ran it
    and the commit that made it."""
    header = ["run", "model", "protocol", "eval articles",
              *(f"{name}: accuracy / macro-F1" for name, _ in ANSWER_COLUMNS), "failed answers (generated)",
              "articles/s (scored)", "hardware", "commit", "file"]
    rows = []
    for r in sorted(records, key=lambda r: r["path"]):
        evs = r["evaluations"]
        primary = evs.get(r.get("primary_mode")) or next(iter(evs.values()))
        failures = str(evs["generation"]["failures"]["count"]) if "generation" in evs else ""
        cells = [r["name"], r["model"], r["data"]["protocol"], str(r["data"]["eval_size"]), *answer_cells(r), failures,
                 f"{primary['throughput']['articles_per_second']:,.1f}", hardware_label(r["environment"]),
                 commit_label(r["environment"]), f"`{r['path']}`"]
        rows.append((cells, made_before(r, tuple(evs))))
    return run_table(header, rows)


# The groups in results/summary.md, in order, with a heading each; a folder not named here comes after them.
GROUP_TITLES = {"demo": "`make demo` (the notebooks, tiny profile)", "methods": "Methods (full fine-tuning, LoRA)",
                "gpu": "GPU runs of the tiny recipe", "fsdp": "FSDP2 runs",
                "cpu_packing": "Packing at equal articles per update (CPU)"}


def write_summary(results_dir: str | Path = "results") -> Path:
    """results/summary.md, generated from the results JSON files, one table per group of runs; never edit it by
    hand."""
    records = load_records(results_dir)
    groups = sorted({run_group(r) for r in records}, key=lambda g: (list(GROUP_TITLES).index(g) if g in GROUP_TITLES
                                                                      else len(GROUP_TITLES), g))
    parts = ["# Results summary", "Generated by `python -m finetune.lab.report` from every results JSON under "
             "`results/`; do not edit by hand."]
    for group in groups:
        parts += [f"## {GROUP_TITLES.get(group, group)}",
                  summary_table([r for r in records if run_group(r) == group])]
    path = Path(results_dir) / "summary.md"
    path.write_text("\n\n".join(parts) + "\n")
    return path
