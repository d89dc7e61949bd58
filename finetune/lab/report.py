"""Regenerate results/summary.md and the README's generated sections from the files under results/.

    python -m finetune.lab.report          # `make demo` runs it last

Every number in those sections comes from a results or benchmark JSON; nothing here is typed by hand.
"""

import json
import re
from pathlib import Path

from finetune.lab.methods import methods_section
from finetune.lab.rehearse import rehearsal_table
from finetune.results import commit_label, hardware_label, load_records, made_before, summary_table, write_summary

MARKERS = "<!-- {}:start -->", "<!-- {}:end -->"


def replace_section(readme: str, name: str, body: str) -> str:
    """`readme` with the text between the `name` markers replaced by `body`."""
    start, end = (m.format(name) for m in MARKERS)
    head, rest = readme.split(start, 1)
    return f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}"


def benchmark_records(results_dir: Path, kind: str) -> list[tuple[Path, dict]]:
    """The `python -m finetune.lab.bench <kind>` outputs under results/benchmarks, by file name."""
    records = [(p, json.loads(p.read_text())) for p in sorted((results_dir / "benchmarks").glob("*.json"))]
    return [(p, r) for p, r in records if r.get("benchmark") == kind]


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
            ratios = " | ".join(f"{v[k]:.2f}x" if k in v else "" for k in ("speed_vs_reference", "speed_vs_stock_trl"))
            lines.append(f"| `{path.name}` | {device} | {name} | {v['tokens_per_second']:,.0f} | {ratios} "
                         f"| {mfu} | {v['step_seconds']:.2f} | {update} | {_count(v.get('host_syncs_per_step'))} "
                         f"| {_count(v.get('checkpointed_layers'))} "
                         f"| {_gib(v['peak_allocated_gib'])} / "
                         f"{_gib(v['peak_reserved_gib'])} | {v['projected_epoch_minutes_full_train']:.0f} | {commit} |")
    return "\n".join(lines)


def eval_benchmark_table(results_dir: Path) -> str:
    """Every eval benchmark's modes; runs that timed the plain-HF anchors give each mode's speed as a ratio to its
    anchor in the same process (median of the timed passes; min to max beside it)."""
    lines = ["| run | device | model | mode | articles | articles/s (median) | min - max over passes "
             "| vs plain HF (same run) | latency p50 / p95 (ms) | batch | peak alloc (GiB) | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path, record in benchmark_records(results_dir, "eval"):
        device, commit = hardware_label(record["environment"]), commit_label(record["environment"])
        if (record.get("liger_kernels") or {}).get("in_use"):
            device += ", Liger (suite's modes)"
        if record["config"].get("compile_layers"):
            device += ", compiled layers (suite's modes)"
        # Speed does not depend on what a model learned, except generation's: decoding stops when answers end.
        model = record["config"]["model"]
        model = "random weights" if model == "scratch" else f"`{model}`"
        for mode, m in record["modes"].items():
            lat = m["latency_ms"]
            spread = (f"{m['articles_per_second_min']:.0f} - {m['articles_per_second_max']:.0f} ({m['repeats']} passes)"
                      if "repeats" in m else "one cold pass")
            ratio = f"{m['vs_anchor']:.2f}x" if "vs_anchor" in m else ""
            lines.append(f"| `{path.name}` | {device} | {model} | {mode} | {m['articles']} | {m['articles_per_second']:.1f} "
                         f"| {spread} | {ratio} | {lat['p50']:.0f} / {lat['p95']:.0f} | {m['batch_size']} "
                         f"| {_gib(m['peak_allocated_gib'])} | {commit} |")
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
    """Runs trained and evaluated into `folder` (results/gpu, results/cpu_packing), each with its
    `<name>_train_summary.json`: accuracy, and what one optimizer step saw (packing fits several articles a row)."""
    lines = ["| run | accuracy (label scoring) | macro-F1 | generation accuracy | train seconds | optimizer steps "
             "| articles per optimizer step | hardware | commit | made before | file |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for record in load_records(folder):
        ev = record["evaluations"]
        steps = articles = seconds = float("nan")
        summary_path = folder / f"{record['name']}_train_summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            seconds, (steps, articles) = summary["train_seconds"], optimizer_steps(summary)
        lines.append(f"| {record['name']} | {ev['label_scoring']['metrics']['accuracy']:.2%} "
                     f"| {ev['label_scoring']['metrics']['macro_f1']:.2%} | {ev['generation']['metrics']['accuracy']:.2%} "
                     f"| {seconds:.0f} | {steps:.0f} | {articles:.1f} | {hardware_label(record['environment'])} "
                     f"| {commit_label(record['environment'])} | {', '.join(made_before(record, tuple(ev)))} "
                     f"| `{folder.name}/{record['path']}` |")
    return "\n".join(lines)


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


def fp8_recipes_within_tolerance(results_dir: Path) -> set[str]:
    """FP8 recipes that reached bf16's loss in every comparison recorded (`finetune.lab.bench_fp8`, results/gpu/fp8/):
    a recipe that missed once, or was never checked, is not a checked option."""
    verdicts: dict[str, list[bool]] = {}
    for path in sorted((results_dir / "gpu" / "fp8").glob("*.json")):
        for name, run in json.loads(path.read_text())["runs"].items():
            if not name.startswith("bf16"):
                verdicts.setdefault(name, []).append(run["within_tolerance"])
    return {recipe for recipe, passed in verdicts.items() if all(passed)}


def targets_table(results_dir: Path) -> str:
    """The targets next to the best figure any one-GPU H100 or H200 variant (or mode) measured, where, and pass or
    miss. Ratios are the same run's: a training variant and the stock TRL row of one benchmark file; an evaluation
    mode and the plain-HF anchors timed in the same process."""
    def on_one_gpu(kind: str) -> list[tuple[str, dict]]:
        return [(p.name, r) for p, r in benchmark_records(results_dir, kind)
                if any(gpu in hardware_label(r["environment"]) for gpu in ("H100", "H200"))
                and r.get("world_size", 1) == 1]

    # The training targets ask for one of the suite's variants whose optimizer really updates bf16 weights (not stock
    # TRL, not plain bf16 AdamW) and whose FP8 recipe, if any, passed the learning check, on a known GPU; memory
    # targets are on the peak allocated.
    checked = {None, *fp8_recipes_within_tolerance(results_dir)}
    ours = [(f"`{file}`: {name}", v, hardware_label(r["environment"])) for file, r in on_one_gpu("train")
            for name, v in r["variants"].items() if "error" not in v and v["mfu"] and not v.get("stock_trl")
            and v["overrides"].get("optimizer", "adamw_bf16_sr") != "adamw" and v["overrides"].get("fp8") in checked]
    fits = [(where, v) for where, v, _ in ours if v["peak_allocated_gib"] <= 70]
    evals = [(f"`{file}`", mode, m) for file, r in on_one_gpu("eval") for mode, m in r["modes"].items()
             if "vs_anchor" in m]
    if not fits and not evals:
        return "(no GPU benchmark yet: `make PY=python3 gpu-bench-train` and `make PY=python3 gpu-bench-eval`)"

    def best(rows: list[tuple[str, dict]], key: str, higher_is_better: bool = True) -> tuple[float, str]:
        where, value = (max if higher_is_better else min)(((w, v[key]) for w, v in rows), key=lambda wv: wv[1])
        return value, where

    def best_eval(mode: str, key: str) -> tuple[float, str]:
        return best([(where, m) for where, md, m in evals if md == mode], key)

    # (target, goal or None for a figure reported beside them, (best, where), format, whether higher is better)
    rows = []
    if fits:
        rows.append(("MFU (7B shape, peak memory <= 70 GiB; FP8 rows counted against the bf16 peak)", 0.55,
                     best(fits, "mfu"), "{:.1%}", True))
        same_run = [(where, v) for where, v in fits if "speed_vs_stock_trl" in v]
        if same_run:
            bf16 = [(where, v) for where, v in fits if not v["overrides"].get("fp8")]
            auto_h200 = [(f"{where} ({v['peak_allocated_gib']:.1f} GiB)", v) for where, v, device in ours
                         if "H200" in device and v["overrides"].get("checkpointed_layers") == "auto"
                         and not v["overrides"].get("max_memory_gib")]
            # The issue asks both of one variant: the best MFU and the best ratio above may be different rows.
            both = [where for where, v in same_run if v["mfu"] >= 0.55 and v["speed_vs_stock_trl"] >= 2.8]
            rows += [("speed vs stock TRL, same run (peak memory <= 70 GiB)", 2.8,
                      best(same_run, "speed_vs_stock_trl"), "{:.2f}x", True),
                     ("variants with both >= 55% MFU and >= 2.8x stock TRL of their run (<= 70 GiB)", 1,
                      (len(both), "; ".join(both) or "none"), "{:d}", True),
                     ("MFU, bf16 only (no FP8), peak memory <= 70 GiB", None, best(bf16, "mfu"), "{:.1%}", True)]
            if auto_h200:
                rows.append(("MFU, checkpointing auto on all of a 141 GB H200", None, best(auto_h200, "mfu"),
                             "{:.1%}", True))
        rows += [("real tokens/s", 10_800, best(fits, "tokens_per_second"), "{:,.0f}", True),
                 ("one epoch of 120K articles (min, lower is better)", 50,
                  best(fits, "projected_epoch_minutes_full_train", higher_is_better=False), "{:.0f}", False)]
    if any(md == "label_scoring" for _, md, _ in evals):
        rows += [("label scoring articles/s over 7,600 (one H100 or H200)", 500,
                  best_eval("label_scoring", "articles_per_second"), "{:.0f}", True),
                 ("label scoring vs plain HF label scoring, same run", 1.4, best_eval("label_scoring", "vs_anchor"),
                  "{:.2f}x", True)]
    if any(md == "generation" for _, md, _ in evals):
        rows += [("generation articles/s over 7,600", 250, best_eval("generation", "articles_per_second"), "{:.0f}",
                  True),
                 ("generation vs plain `generate` (batch 64, 8 new tokens), same run", 3.0,
                  best_eval("generation", "vs_anchor"), "{:.2f}x", True)]
    lines = ["| target | goal | best measured | measured by | met |", "|---|---|---|---|---|"]
    for name, goal, (value, where), fmt, higher_is_better in rows:
        if goal is None:
            lines.append(f"| {name} | (reported) | {fmt.format(value)} | {where} | |")
            continue
        met = value >= goal if higher_is_better else value <= goal
        lines.append(f"| {name} | {fmt.format(goal)} | {fmt.format(value)} | {where} | {'yes' if met else 'no'} |")
    return "\n".join(lines)


def rehearsal_section(results_dir: Path) -> str:
    """The GPU rehearsal's costs, step by step (what a user with the weights needs to know about their card)."""
    folder = results_dir / "rehearsal"
    if not (folder / "rehearsal.json").exists():
        return "(not rehearsed yet: `make PY=python3 rehearse` on a GPU)"
    facts = json.loads((folder / "rehearsal.json").read_text())
    return (f"Measured by `make rehearse` on {hardware_label(facts['environment'])} at commit "
            f"`{(facts['environment']['git_commit'] or 'unknown')[:7]}` (`results/rehearsal/`, its README has the "
            f"command):\n\n{rehearsal_table(folder)}")


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
    for name, runs in sets.items():
        one_gpu = next(iter(runs.get(1, {}).get("variants", {}).values()), {})
        if "tokens_per_second" not in one_gpu:
            continue
        for n, record in sorted(runs.items()):
            commit = commit_label(record["environment"])
            for variant, v in record["variants"].items():
                if "tokens_per_second" in v:
                    lines.append(f"| `{name}_{n}gpu.json` | `{commit}` | {n} | {variant} | {v['tokens_per_second']:,.0f} "
                                 f"| {v['tokens_per_second'] / one_gpu['tokens_per_second']:.2f} | {v['mfu']:.1%} "
                                 f"| {_gib(v['peak_allocated_gib'])} |")
    return "\n".join(lines) if len(lines) > 2 else "(no multi-GPU benchmark yet: `make PY=python3 gpu-fsdp`)"


def update_readme(readme_path: Path = Path("README.md"), results_dir: Path = Path("results")) -> str:
    readme = readme_path.read_text()
    sections = {"results-table": summary_table(load_records(results_dir)),
                "bench-train": training_benchmark_table(results_dir),
                "bench-eval": eval_benchmark_table(results_dir),
                "bench-targets": targets_table(results_dir),
                "optimizers": optimizer_table(results_dir),
                "gpu-runs": training_runs_table(results_dir / "gpu"),
                "cpu-packing-runs": training_runs_table(results_dir / "cpu_packing"),
                "rehearsal-articles-per-update": rehearsal_articles_per_update(results_dir),
                "rehearsal": rehearsal_section(results_dir),
                "fsdp-scaling": scaling_table(results_dir),
                "methods": methods_section(results_dir)}
    for name, body in sections.items():
        if MARKERS[0].format(name) in readme:
            readme = replace_section(readme, name, body)
    readme_path.write_text(readme)
    return readme


if __name__ == "__main__":
    print(f"wrote {write_summary()}")
    update_readme()
    print("refreshed the generated sections of README.md")
