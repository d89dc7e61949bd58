"""Regenerate results/summary.md and the generated sections of README.md and docs/*.md from the files under results/.

    python -m finetune.lab.report          # `make demo` runs it last

A section lies between `<!-- name:start -->` and `<!-- name:end -->` in whichever page holds those markers. Every
number in those sections comes from a results or benchmark JSON; nothing here is typed by hand.
"""

import argparse
import json
import re
import statistics
from pathlib import Path

from finetune.lab.bench_eval import MODES, WHOLE_WARM_UP
from finetune.lab.methods import methods_section
from finetune.lab.rehearse import rehearsal_table
from finetune.lab.spark import spark_section
from finetune.lab.stock_trl import STOCK_TRL
from finetune.lab.measurements import (RECIPE_ROW, anchor_mismatch, benchmark_records, by_name, eval_anchor_mismatch,
                                       eval_weights, on_one_gpu, summarize, training_rows)
from finetune.lab.targets import published_comparison, runs, targets_table
from finetune.results import (answer_cells, commit_label, hardware_label, load_records, made_before, run_group,
                              run_table, summary_table, write_summary)

MARKERS = "<!-- {}:start -->", "<!-- {}:end -->"


def replace_section(readme: str, name: str, body: str) -> str:
    """`readme` with the text between the `name` markers replaced by `body`."""
    start, end = (m.format(name) for m in MARKERS)
    head, rest = readme.split(start, 1)
    return f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}"


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _count(value: int | None) -> str:
    return "" if value is None else str(value)


def training_benchmark_table(results_dir: Path) -> str:
    lines = ["| run | device | variant | real tokens/s | vs reference (same run) | vs stock TRL (same run) | MFU "
             "| step (s) | optimizer update (s) | host syncs a step | layers recomputed | peak alloc / reserved (GiB) "
             "| projected epoch, 120K articles (min) | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path, record in benchmark_records(results_dir, "train"):
        device, commit = hardware_label(record["environment"]), commit_label(record["environment"])
        if record.get("world_size", 1) > 1:  # FSDP2 runs: figures per GPU, the epoch on all of them
            device = f"{record['world_size']} x {device} (FSDP2, per GPU)"
        for name, v in record["variants"].items():
            if "error" in v:
                lines.append(f"| `{path.name}` | {device} | {name} | failed: {v['error']} | | | | | | | | | | {commit} |")
                continue
            mfu = f"{v['mfu']:.1%}" if v["mfu"] else "n/a"
            update = f"{v['optimizer_step_seconds']:.3f}" if "optimizer_step_seconds" in v else "not timed"
            stock = record["variants"].get(STOCK_TRL)
            mismatch = stock and "speed_vs_stock_trl" in v and anchor_mismatch(record, v, stock)
            vs_stock = f"{v['speed_vs_stock_trl']:.2f}x" if "speed_vs_stock_trl" in v else ""
            vs_stock += f" ({mismatch}: not a ratio)" if mismatch else ""
            vs_reference = f"{v['speed_vs_reference']:.2f}x" if "speed_vs_reference" in v else ""
            ratios = f"{vs_reference} | {vs_stock}"
            lines.append(f"| `{path.name}` | {device} | {name} | {v['tokens_per_second']:,.0f} | {ratios} "
                         f"| {mfu} | {v['step_seconds']:.2f} | {update} | {_count(v.get('host_syncs_per_step'))} "
                         f"| {_count(v.get('checkpointed_layers'))} "
                         f"| {_gib(v['peak_allocated_gib'])} / "
                         f"{_gib(v['peak_reserved_gib'])} | {v['projected_epoch_minutes_full_train']:.0f} | {commit} |")
    return "\n".join(lines)


def eval_benchmark_table(results_dir: Path) -> str:
    """Every eval benchmark's modes; runs that timed the plain-HF anchors give each mode's speed as a ratio to its
    anchor in the same process (median of the timed passes; min to max beside it), and where the tree method ran, the
    share of articles each mode gives the tree's label (bf16 rounding moves some labels of a weak model, FP8 more) and,
    in runs that record it, each mode's accuracy on the held-out articles."""
    lines = ["| run | device | model | mode | articles | articles/s (median) | min - max over passes "
             "| vs plain HF (same run) | same labels as the tree | held-out accuracy | latency p50 / p95 (ms) | batch "
             "| peak alloc (GiB) | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path, record in benchmark_records(results_dir, "eval"):
        device, commit = hardware_label(record["environment"]), commit_label(record["environment"])
        if (record.get("liger_kernels") or {}).get("in_use"):
            device += ", Liger (suite's modes)"
        if record["config"].get("compile_layers") is True:  # "auto" beside Liger plans them off
            device += ", compiled layers (suite's modes)"
        # Speed does not depend on what a model learned, except generation's: decoding stops when answers end.
        model = eval_weights(record)
        for mode, m in record["modes"].items():
            lat = m["latency_ms"]
            spread = "one cold pass" if "repeats" not in m else (
                "one timed pass" if m["repeats"] == 1 else
                f"{m['articles_per_second_min']:.0f} - {m['articles_per_second_max']:.0f} ({m['repeats']} passes)")
            ratio = f"{m['vs_anchor']:.2f}x" if "vs_anchor" in m else ""
            mismatch = ratio and eval_anchor_mismatch(record, mode)
            ratio += f" ({mismatch})" if mismatch else ""
            same = f"{m['agreement_with_tree']['same_labels']:.1%}" if "agreement_with_tree" in m else ""
            accuracy = f"{m['held_out_accuracy']:.2%}" if "held_out_accuracy" in m else ""
            lines.append(f"| `{path.name}` | {device} | {model} | {mode} | {m['articles']} "
                         f"| {m['articles_per_second']:.1f} | {spread} | {ratio} | {same} | {accuracy} "
                         f"| {lat['p50']:.0f} / {lat['p95']:.0f} | {m['batch_size']} | {_gib(m['peak_allocated_gib'])} "
                         f"| {commit} |")
    return "\n".join(lines)


def first_pass_table(results_dir: Path) -> str:
    """Each mode's first timed pass over its second, in seconds, over the one-GPU eval runs, by how the run warmed its
    modes up (`bench_eval.time_mode`): a first pass slower than the second is warm-up the clock counted."""
    ratios: dict[tuple[str, bool], list[float]] = {}
    for _, record in on_one_gpu(results_dir, "eval"):
        whole = not made_before(record, MODES, (WHOLE_WARM_UP,))
        for mode, m in record["modes"].items():
            seconds = m.get("seconds_per_run", [])
            if len(seconds) > 1:
                ratios.setdefault((mode, whole), []).append(seconds[0] / seconds[1])
    lines = ["| mode | warmed up on | runs | first timed pass over the second (median) | min - max |",
             "|---|---|---|---|---|"]

    def order(item):  # the benchmark's modes in its order, then any mode it no longer has, by name
        (mode, whole), _ = item
        return (MODES.index(mode) if mode in MODES else len(MODES), mode, whole)

    for (mode, whole), figures in sorted(ratios.items(), key=order):
        lines.append(f"| {mode} | {'every timed article' if whole else 'part of the articles'} | {len(figures)} "
                     f"| {statistics.median(figures):.2f}x | {min(figures):.2f}x - {max(figures):.2f}x |")
    return "\n".join(lines)


def optimizer_table(results_dir: Path) -> str:
    path = results_dir / "gpu" / "optimizers" / "optimizers.json"
    if not path.exists():
        return "(not measured yet: `make PY=python3 gpu-training-core` on a GPU)"
    record = json.loads(path.read_text())
    lines = [f"Measured by `{path.relative_to(results_dir.parent)}`: a {record['config']['hidden_size']}-wide, "
             f"{record['config']['num_layers']}-layer Qwen2 from scratch, lr {record['config']['learning_rate']:g}, "
             f"{record['config']['max_steps']} steps, same data and initial weights for each option.", "",
             "| optimizer | weights changed by step 1 | total update vs fp32 (norm ratio) | cosine to fp32 update "
             "| loss after the last step |", "|---|---|---|---|---|"]
    for name, r in record["options"].items():
        lines.append(f"| `{name}` | {r['first_step_fraction_of_weights_changed']:.1%} "
                     f"| {r['update_norm_ratio_to_fp32']:.2f} | {r['update_cosine_to_fp32']:.2f} | {r['final_loss']:.3f} |")
    return "\n".join(lines)


def training_runs_table(folder: Path) -> str:
    """Runs trained and evaluated into `folder` (results/gpu, results/cpu_packing), one row each, with its
    `<name>_train_summary.json`: accuracy, and what one optimizer step saw (packing fits several articles a row)."""
    header = ["run", *(f"{name}: accuracy / macro-F1" for name in ("scored", "generated", "lenient")), "train seconds",
              "optimizer steps", "articles per optimizer step", "hardware", "commit", "file"]
    rows = []
    for record in load_records(folder):
        steps = articles = seconds = float("nan")
        summary_path = folder / f"{record['name']}_train_summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            seconds, (steps, articles) = summary["train_seconds"], optimizer_steps(summary)
        cells = [record["name"], *answer_cells(record), f"{seconds:.0f}", f"{steps:.0f}", f"{articles:.1f}",
                 hardware_label(record["environment"]), commit_label(record["environment"]),
                 f"`{folder.name}/{record['path']}`"]
        rows.append((cells, made_before(record, tuple(record["evaluations"]))))
    return run_table(header, rows)


def group_table(results_dir: Path, group: str) -> str:
    """The summary table of one group of runs (`demo`, `fsdp`, ...: see finetune.results.run_group)."""
    records = [r for r in load_records(results_dir) if run_group(r) == group]
    return summary_table(records) if records else f"(no `{group}` run in `results/` yet)"


def rehearsal_articles_per_update(results_dir: Path) -> str:
    """What one update of the 7B recipe saw in the rehearsal, packed, against the same flags unpacked."""
    path = results_dir / "rehearsal" / "train_summary.json"
    if not path.exists():
        return "(not rehearsed yet: `make PY=python3 rehearse` on a GPU)"
    summary = json.loads(path.read_text())
    c = summary["config"]
    return (f"In the 7B recipe's rehearsal (`{path.relative_to(results_dir.parent)}`), packed {c['max_length']}-token "
            f"rows, {c['per_device_train_batch_size']} x {c['gradient_accumulation_steps']} a step, held "
            f"{optimizer_steps(summary)[1]:.0f} articles per optimizer step; unpacked, the same flags give "
            f"{c['per_device_train_batch_size'] * c['gradient_accumulation_steps']}.")


def optimizer_steps(summary: dict) -> tuple[int, float]:
    """Optimizer steps of a training summary, and training articles per step. Summaries written before train.py
    recorded them carry the step count in the Trainer's last log entry."""
    if "optimizer_steps" in summary:
        return summary["optimizer_steps"], summary["articles_per_optimizer_step"]
    last = summary["log_history"][-1]
    return last["step"], summary["data"]["train_size"] * last["epoch"] / last["step"]


def rehearsal_section(results_dir: Path) -> str:
    """The GPU rehearsal's costs, step by step (what a user with the weights needs to know about their card)."""
    folder = results_dir / "rehearsal"
    if not (folder / "rehearsal.json").exists():
        return "(not rehearsed yet: `make PY=python3 rehearse` on a GPU)"
    facts = json.loads((folder / "rehearsal.json").read_text())
    return (f"Measured by `make rehearse` on {hardware_label(facts['environment'])} at commit "
            f"`{(facts['environment']['git_commit'] or 'unknown')[:7]}` (`results/rehearsal/`, its README has the "
            f"command):\n\n{rehearsal_table(folder)}")


def gpu_expectations(results_dir: Path, card: str, rehearsal: Path) -> str:
    """What the real run costs on one `card` (H100, H200): the epochs of the bf16 reference and of the `qwen2.5-7b`
    recipe as planned for the card (medians over the benchmark runs), and their training memory. The recipe's memory,
    disk and evaluation memory are the card's rehearsal's (the `rehearsal` folder), not a median: memory follows the
    plan, which changed between the benchmark runs (8-bit moments before bf16 ones, full rows before shared
    openings), and the rehearsal ran one plan through the notebooks."""
    rows = [(row, device) for row, device in training_rows(results_dir) if card in device]
    reference_rows = [row for row, _ in rows if not row[3]["overrides"]]
    recipe_rows = [row for row, _ in rows if row[1] == RECIPE_ROW]
    reference, fastest = (summarize(by_name(chosen), "projected_epoch_minutes_full_train", higher_is_better=False)
                          for chosen in (reference_rows, recipe_rows))
    if reference is None or fastest is None:
        return f"(no {card} benchmark yet: `make PY=python3 gpu-bench-train-recipe`)"

    def peak(m) -> str:
        return f"{statistics.median(v['peak_allocated_gib'] for v in m.figures):.1f}"

    lines = [f"| on one {card} | bf16 reference (`qwen2.5-7b-reference`) | the `qwen2.5-7b` recipe as planned |",
             "|---|---|---|",
             f"| one epoch of 120,000 articles, projected (min) | {reference.median:.0f} ({runs(reference)}) "
             f"| {fastest.median:.0f} ({runs(fastest)}) |"]
    facts = json.loads((rehearsal / "rehearsal.json").read_text()) if (rehearsal / "rehearsal.json").exists() else None
    if facts is None or card not in hardware_label(facts["environment"]):
        lines.append(f"| training peak GPU memory, allocated (GiB) | {peak(reference)} | {peak(fastest)} |")
        return "\n".join(lines)
    summary = json.loads((rehearsal / "train_summary.json").read_text())
    tuned = json.loads((rehearsal / "finetuned_model_results.json").read_text())
    commit = (facts["environment"]["git_commit"] or "unknown")[:7]
    lines += [f"| training peak GPU memory, allocated (GiB) | {peak(reference)} | {summary['peak_memory_gib']:.1f} "
              f"(rehearsal, `{commit}`) |",
              f"| weights on disk (GB) | {facts['standin_gb']:.1f} | {facts['standin_gb']:.1f} |",
              f"| checkpoints folder after {facts['overrides'].get('max_steps')} steps: one resumable checkpoint "
              f"and the final model (GB) | | {facts['checkpoints_gb']:.1f} (rehearsal) |",
              f"| evaluation peak GPU memory (GiB) | | {tuned['peak_memory_gib']:.1f} (rehearsal) |"]
    return "\n".join(lines)


def scaling_table(results_dir: Path) -> str:
    """Per-GPU speed of each variant on N GPUs over the reference variant's on one GPU, for each set of
    `<name>_<N>gpu.json` files (one command, one machine: the 1-GPU run is the same lease's)."""
    sets: dict[str, dict[int, dict]] = {}
    for path, record in benchmark_records(results_dir, "train"):
        match = re.fullmatch(r"(.+)_(\d+)gpu", path.stem)
        if match and "world_size" in record:
            sets.setdefault(match[1], {})[record["world_size"]] = record
    lines = ["| run | commit | GPUs | variant | tokens/s per GPU | per-GPU speed vs 1 GPU | MFU | peak GiB per GPU |",
             "|---|---|---|---|---|---|---|---|"]
    for name, by_size in sets.items():
        one_gpu = next(iter(by_size.get(1, {}).get("variants", {}).values()), {})
        if "tokens_per_second" not in one_gpu:
            continue
        for n, record in sorted(by_size.items()):
            commit = commit_label(record["environment"])
            for variant, v in record["variants"].items():
                if "tokens_per_second" in v:
                    lines.append(f"| `{name}_{n}gpu.json` | `{commit}` | {n} | {variant} | {v['tokens_per_second']:,.0f} "
                                 f"| {v['tokens_per_second'] / one_gpu['tokens_per_second']:.2f} | {v['mfu']:.1%} "
                                 f"| {_gib(v['peak_allocated_gib'])} |")
    return "\n".join(lines) if len(lines) > 2 else "(no multi-GPU benchmark yet: `make PY=python3 gpu-fsdp`)"


def sections(results_dir: Path) -> dict[str, str]:
    """Every generated section by its marker name."""
    return {"published-comparison": published_comparison(results_dir),
            "demo-results": group_table(results_dir, "demo"),
            "gpu-expectations": gpu_expectations(results_dir, "H100", results_dir / "rehearsal" / "h100"),
            "gpu-expectations-h200": gpu_expectations(results_dir, "H200", results_dir / "rehearsal"),
            "dgx-spark-projection": spark_section(results_dir),
            "fsdp-runs": group_table(results_dir, "fsdp"),
            "bench-train": training_benchmark_table(results_dir),
            "bench-eval": eval_benchmark_table(results_dir),
            "bench-eval-first-pass": first_pass_table(results_dir),
            "bench-targets": targets_table(results_dir),
            "optimizers": optimizer_table(results_dir),
            "gpu-runs": training_runs_table(results_dir / "gpu"),
            "cpu-packing-runs": training_runs_table(results_dir / "cpu_packing"),
            "rehearsal-articles-per-update": rehearsal_articles_per_update(results_dir),
            "rehearsal": rehearsal_section(results_dir),
            "fsdp-scaling": scaling_table(results_dir),
            "methods": methods_section(results_dir)}


def doc_pages(root: Path) -> list[Path]:
    """The pages that may hold generated sections: README.md and docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def update_docs(root: Path = Path("."), results_dir: Path = Path("results")) -> dict[Path, str]:
    """Rewrite each generated section in whichever page holds its markers; the pages' new texts, by path."""
    bodies = sections(results_dir)
    pages = {}
    for page in doc_pages(root):
        text = page.read_text()
        for name, body in bodies.items():
            if MARKERS[0].format(name) in text:
                text = replace_section(text, name, body)
        if text != page.read_text():
            page.write_text(text)
        pages[page] = text
    return pages


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate results/summary.md and the tables of README.md and docs/ "
                                                 "from the files under results/ (no options: it always reads results/)")
    parser.parse_args(argv)
    print(f"wrote {write_summary()}")
    update_docs()
    print("refreshed the generated sections of README.md and docs/")


if __name__ == "__main__":
    main()
