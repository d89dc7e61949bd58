"""The suite's speed targets beside what the one-GPU benchmarks measured, and the published run beside the suite.

Each benchmark file is one run, and its ratios are that run's own (a variant over the stock TRL row of the same file,
a mode over the plain-HF anchor timed in the same process). Runs of the same configuration differ by a fifth and more
(the stock TRL anchor most of all), so a target row gives, for each configuration, the median over the files that
measured it with min - max beside it, and is met when the best configuration's median meets it: never a maximum over
runs.
"""

import re
from pathlib import Path

from finetune.lab.measurements import (RECIPE_ROW, Measured, Row, by_name, eval_rows, grouped_over_flash_attention,
                                       lora_over_recipe, mode_over_mode, summarize, training_rows,
                                       tuned_anchor_ceilings)
from finetune.results import load_records

SCORING_TARGET = "label scoring articles/s over 7,600 (one H100 or H200)"
GENERATION_TARGET = "generation articles/s over 7,600"


# (target, goal or None for a figure reported beside them, the measurement or None, format, whether higher is better)
Target = tuple[str, float | None, Measured | None, str, bool]


def targets(results_dir: Path) -> list[Target]:
    """Every target with the best configuration's median; peak memory counts the allocated peak."""
    ours = training_rows(results_dir)
    fits = [row for row, _ in ours if row[3]["peak_allocated_gib"] <= 70]
    evals = eval_rows(results_dir)
    rows: list[Target] = []
    if fits:
        rows.append(("MFU (7B shape, peak memory <= 70 GiB; FP8 rows counted against the bf16 peak)", 0.55,
                     summarize(fits, "mfu"), "{:.1%}", True))
        same_run = [row for row in fits if "speed_vs_stock_trl" in row[3]]
        tuned = [row for row in fits if "speed_vs_stock_trl_tuned" in row[3]]
        bf16 = [row for row in fits if row[3]["overrides"].get("fp8") in (None, "auto")]  # "auto": off until checked
        # The plan's own choices: a row that forces the optimizer (8-bit moments beside the H200's planned bf16 ones)
        # compares a choice, it is not the recipe.
        auto_h200 = [row for row, device in ours if "H200" in device
                     and row[3]["overrides"].get("checkpointed_layers") == "auto"
                     and not row[3]["overrides"].get("max_memory_gib")
                     and row[3]["overrides"].get("optimizer", "auto") == "auto"]
        # A row per card: the tuned anchor turns checkpointing off where the card's memory holds it (at the compared
        # batch on an H200, only in smaller micro-batches on an H100), so each card's anchor is its own.
        rows += [(f"speed vs stock TRL tuned (Liger, FlashAttention where installed, checkpointing off where it fits), "
                  f"same run, steps and batch (peak memory <= 70 GiB; {device})", 3.0,
                  summarize(on_card, "speed_vs_stock_trl_tuned"), "{:.2f}x", True)
                 for device, on_card in _per_card(tuned).items()]
        rows += [("speed vs stock TRL, same run, steps and batch (peak memory <= 70 GiB)", 2.8,
                  summarize(same_run, "speed_vs_stock_trl"), "{:.2f}x", True),
                 ("configurations whose medians reach both >= 55% MFU and >= 3.0x stock TRL tuned (<= 70 GiB)", 1,
                  _both(tuned), "{:.0f}", True),
                 ("MFU, bf16 only (no FP8), peak memory <= 70 GiB", None, summarize(bf16, "mfu"), "{:.1%}", True)]
        recipe_tuned = [row for row, _ in ours if row[1] == RECIPE_ROW and "speed_vs_stock_trl_tuned" in row[3]]
        rows += [(f"the `qwen2.5-7b` recipe vs stock TRL tuned, same run, steps and batch (all of the card's memory, "
                  f"as both use it; {device})", None, summarize(on_card, "speed_vs_stock_trl_tuned"), "{:.2f}x", True)
                 for device, on_card in _per_card(recipe_tuned).items()]
        rows += [(f"LoRA r16 vs the full `qwen2.5-7b` recipe, same run, both as planned for the card ({device})", 1.3,
                  summarize(on_card, "lora_over_recipe"), "{:.2f}x", True)  # the card's memory changes both plans
                 for device, on_card in _per_card(lora_over_recipe(results_dir)).items()]
        best_auto = summarize(by_name(auto_h200), "mfu")  # the recipe as planned, over its commits
        if best_auto:
            peak = max(v["peak_allocated_gib"] for v in best_auto.figures)
            rows.append(("MFU, checkpointing auto on all of a 141 GB H200", None,
                         best_auto._replace(where=f"{best_auto.where} ({peak:.1f} GiB)"), "{:.1%}", True))
        rows += [(f"the most a row computing the anchor's FLOPs a token can reach against stock TRL tuned: a step at "
                  f"100% MFU (1 / the anchor's MFU), same run ({device})", None, summarize(on_card, "ceiling"),
                  "{:.2f}x", True) for device, on_card in _per_card(tuned_anchor_ceilings(results_dir)).items()]
        rows += [("real tokens/s", 10_800, summarize(fits, "tokens_per_second"), "{:,.0f}", True),
                 ("one epoch of 120K articles (min, lower is better)", 50,
                  summarize(fits, "projected_epoch_minutes_full_train", higher_is_better=False), "{:.0f}", False)]
    def of_mode(mode: str, model: str | None = None) -> list[Row]:
        return [row for row in evals if row[0][0] == mode and model in (None, row[0][2])]

    taught = "trained weights"
    for name, goal, measured, metric in (
            (SCORING_TARGET, 700, of_mode("label_scoring"), "articles_per_second"),
            # what the same kernels would make were the GPU never left waiting on the host: a goal above it needs
            # faster kernels (FP8, below), not less host time
            ("label scoring's ceiling with its kernels as they are: the profiled articles over the GPU's busy time, "
             "articles/s", None, of_mode("label_scoring"), "gpu_bound_articles_per_second"),
            # and what its matmuls alone would make, were everything else on the GPU fused away: a goal above that
            # needs fewer or faster FLOPs
            ("the most label scoring can reach against plain HF label scoring with its matmuls as they are and "
             "nothing else on the GPU: its profiled articles over its matmuls' time, same run and batch", None,
             mode_over_mode(results_dir, "label_scoring", "plain_label_scoring",
                            "label scoring's matmul-bound rate over plain HF label scoring",
                            rate="matmul_bound_articles_per_second"), "ratio"),
            ("label scoring vs plain HF label scoring, same run and batch", 2.0, of_mode("label_scoring"), "vs_anchor"),
            ("label scoring vs plain HF label scoring with the same kernels (Liger), same run and batch", None,
             of_mode("label_scoring"), "vs_anchor_with_kernels"),
            ("label scoring with the last layer's MLP only where the logits are read, over the whole last layer, same "
             "run and batch", None, mode_over_mode(results_dir, "label_scoring", "label_scoring_whole_last_layer",
                                                   "label scoring over the whole last layer"), "ratio"),
            ("label scoring with the residual adds inside the matmuls, over separate adds, same run and batch", None,
             mode_over_mode(results_dir, "label_scoring", "label_scoring_separate_adds",
                            "label scoring over separate adds"), "ratio"),
            ("label scoring with the answer branches in their own kernel, over one masked sdpa call, same run and "
             "batch", None, mode_over_mode(results_dir, "label_scoring", "label_scoring_dense_branches",
                                           "label scoring over dense branches"), "ratio"),
            ("label scoring with the grouped varlen kernel, over FlashAttention's varlen kernel, same run and batch",
             None, grouped_over_flash_attention(results_dir, "label_scoring"), "ratio"),
            (GENERATION_TARGET, 250, of_mode("generation"), "articles_per_second"),
            ("generation vs plain `generate`, same run and batch, on weights taught the answer format", 3.0,
             of_mode("generation", taught), "vs_anchor"),
            ("decoding every article vs plain `generate`, same run and batch, on weights taught the answer format", 2.0,
             of_mode("generation_decoding", taught), "vs_anchor"),
            # the stronger anchor, where a run timed it: plain `generate` with the suite's evaluation kernels (Liger)
            ("generation vs plain `generate` with the same kernels (Liger), same run and batch", None,
             of_mode("generation"), "vs_anchor_with_kernels"),
            ("decoding every article vs plain `generate` with the same kernels (Liger), same run and batch", None,
             of_mode("generation_decoding"), "vs_anchor_with_kernels"),
            # Generation alone checks only the branch each article's greedy choices took; the one pass of both modes
            # checks the whole tree, as generation did before (5b191b0), and scores it. On taught weights only: on
            # random weights no article reaches a branch, and both decode everything.
            ("generation checking only the branch taken, over the one pass checking (and scoring) the whole answer "
             "tree, same run and batch, on weights taught the answer format", None,
             mode_over_mode(results_dir, "generation", "label_scoring_and_generation",
                            "generation over the whole tree's one pass", taught_only=True), "ratio"),
            ("generation with the grouped varlen kernel, over FlashAttention's varlen kernel, same run and batch, on "
             "weights taught the answer format", None, grouped_over_flash_attention(results_dir, "generation", True),
             "ratio"),
            # The check's bounds, as label scoring's above: the GPU never left waiting, then its matmuls alone.
            *((f"the most generation can reach against plain `generate` with its {what}, same run and batch, on "
               "weights taught the answer format", None,
               mode_over_mode(results_dir, "generation", "plain_generate",
                              f"generation's {bound} rate over plain `generate`", taught_only=True, rate=rate), "ratio")
              for what, bound, rate in (
                  ("kernels as they are: its profiled articles over the GPU's busy time", "GPU-bound",
                   "gpu_bound_articles_per_second"),
                  ("matmuls as they are and nothing else on the GPU: its profiled articles over its matmuls' time",
                   "matmul-bound", "matmul_bound_articles_per_second"))),
            # Decoding every article runs fewer tokens, its own answer's and not all four's, but waits on the host
            # longer: its kernels' rate bounds the other way to generation.
            ("the most decoding every article can reach against plain `generate` with its kernels as they are: its "
             "profiled articles over the GPU's busy time, same run and batch", None,
             mode_over_mode(results_dir, "generation_decoding", "plain_generate",
                            "decoding every article's GPU-bound rate over plain `generate`", taught_only=True,
                            rate="gpu_bound_articles_per_second"), "ratio"),
            # an evaluation of both modes (the notebooks') runs one pass for both (`score_then_generate`)
            ("label scoring and generation from one pass, against the two apart: their seconds over the pass's, same "
             "run and batch, on weights taught the answer format", None,
             mode_over_mode(results_dir, "label_scoring_and_generation", ("label_scoring", "generation"),
                            "label scoring and generation apart over one pass", taught_only=True), "ratio"),
            ("label scoring with the decoder layers in FP8 (an eval benchmark mode, not the recipe's), articles/s over "
             "7,600", None, of_mode("label_scoring_fp8"), "articles_per_second"),
            ("label scoring in FP8 vs plain HF label scoring in the same FP8, same run and batch", None,
             of_mode("label_scoring_fp8"), "vs_anchor"),
            # the suite's FP8 pass against the anchor as anyone writes it (its `vs_anchor` divides by plain HF in FP8)
            ("label scoring in FP8 vs plain HF label scoring in bf16, same run and batch", None,
             mode_over_mode(results_dir, "label_scoring_fp8", "plain_label_scoring",
                            "label_scoring_fp8 over plain_label_scoring (bf16)"), "ratio")):
        measured = [row for row in measured if row[3].get(metric) is not None]
        # A goal is met by the code as it is where that was timed, else shown by the newest code that was: an
        # evaluation row's key ends with the changes its code lacked.
        newest = min((len(row[0][-1]) for row in measured), default=0)
        rows.append((name, goal, summarize([row for row in measured if len(row[0][-1]) == newest], metric),
                     "{:.0f}" if metric.endswith("articles_per_second") else "{:.2f}x", True))
    return rows


def _per_card(rows: list[Row]) -> dict[str, list[Row]]:
    """The rows of each card (the first item of their key), cards in order: for the figures whose comparison the
    card's memory changes."""
    cards: dict[str, list[Row]] = {}
    for row in sorted(rows, key=lambda row: row[0][0]):
        cards.setdefault(row[0][0], []).append(row)
    return cards


def _both(rows: list[Row]) -> Measured:
    """How many configurations reach both training goals by their medians, and which: MFU and the ratio to stock TRL at
    its strongest (the tuned anchor), not to stock TRL as documented, the weaker anchor of an older goal."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(row[0], []).append(row)
    both = []
    for group in groups.values():
        mfu, ratio = summarize(group, "mfu"), summarize(group, "speed_vs_stock_trl_tuned")
        if mfu and ratio and mfu.median >= 0.55 and ratio.median >= 3.0:
            both.append(mfu.where)
    return Measured(len(both), len(both), len(both), "; ".join(both) or "none", 1, [])


def runs(measured: Measured, fmt: str = "{:.0f}") -> str:
    """How many runs a figure stands for and their spread: `1 run`, `median of 3 runs, 632 - 650`."""
    if measured.runs == 1:
        return "1 run"
    return f"median of {measured.runs} runs, {fmt.format(measured.low)} - {fmt.format(measured.high)}"


def card(label: str) -> str:
    """The card's short name for a sentence: "NVIDIA H100 80GB HBM3, Liger" -> "H100"."""
    return label.removeprefix("NVIDIA ").split(",")[0].split()[0]


def _spread(measured: Measured, fmt: str) -> str:
    if measured.runs == 1:
        return "1 run"
    return f"{fmt.format(measured.low)} - {fmt.format(measured.high)} ({measured.runs} runs)"


def targets_table(results_dir: Path) -> str:
    """The targets, each beside the best configuration's median over its runs, its spread and where it was measured."""
    rows = targets(results_dir)
    if all(m is None for _, _, m, _, _ in rows):
        return "(no GPU benchmark yet: `make PY=python3 gpu-bench-train` and `make PY=python3 gpu-bench-eval`)"
    lines = ["| target | goal | median over runs | measured by | met | min - max over runs |",
             "|---|---|---|---|---|---|"]
    for name, goal, m, fmt, higher_is_better in rows:
        if m is None:
            if goal is not None:
                lines.append(f"| {name} | {fmt.format(goal)} | not measured yet | | no | |")
            continue
        spread = "" if name.startswith("configurations") else _spread(m, fmt)
        if goal is None:
            lines.append(f"| {name} | (reported) | {fmt.format(m.median)} | {m.where} | | {spread} |")
            continue
        met = m.median >= goal if higher_is_better else m.median <= goal
        shown = fmt.format(m.median)
        if shown == fmt.format(goal) and m.median != goal:  # say on which side of the goal a figure rounding to it lies
            shown = re.sub(r"\.(\d)", lambda digits: f".{int(digits[1]) + 1}", fmt).format(m.median)
        lines.append(f"| {name} | {fmt.format(goal)} | {shown} | {m.where} | {'yes' if met else 'no'} | {spread} |")
    return "\n".join(lines)


# The published reference run (Qwen2.5-7B-Instruct, one epoch of full fine-tuning on 120,000 articles on a DGX Spark,
# evaluated on the 7,600 test articles by generation), in its own figures: what this suite sets out to improve on.
PUBLISHED_RUN = {"epoch": "about 10 h (DGX Spark)", "accuracy": "88.33%",
                 "evaluation": "49.6 articles/s, generation (DGX Spark)"}


def finetuned_7b_accuracy(results_dir: Path) -> str:
    """The fine-tuned Qwen2.5-7B-Instruct's accuracy on the standard protocol's 7,600 articles, if a results file holds
    it."""
    for r in load_records(results_dir):
        if (r["profile"] == "qwen2.5-7b" and r["data"]["protocol"] == "standard"
                and r["name"] == "finetuned_model"):
            ev = r["evaluations"]
            return (f"{ev['label_scoring']['metrics']['accuracy']:.2%} scored, "
                    f"{ev['generation']['metrics']['accuracy']:.2%} generated (`{r['path']}`)")
    return "not measured yet: it needs the weights on a GPU (see below); the lab machines have none"


def timed_before(measured: Measured) -> str:
    """"; before 2 evaluation changes" where no run of today's code was timed (an evaluation key ends with the
    changes its code lacked): the front page then says its figure is older code's."""
    missed = measured.key[-1]
    return f"; before {len(missed)} evaluation change{'s' * (len(missed) > 1)}" if missed else ""


def published_comparison(results_dir: Path) -> str:
    """The published run's figures beside the suite's: medians over the one-GPU benchmark runs of the 7B shape."""
    measured = {name: m for name, _, m, _, _ in targets(results_dir)}
    recipe = [row for row, _ in training_rows(results_dir) if row[1] == RECIPE_ROW]
    epoch = summarize(by_name(recipe), "projected_epoch_minutes_full_train", higher_is_better=False)
    scoring, generation = measured.get(SCORING_TARGET), measured.get(GENERATION_TARGET)
    suite_epoch = ("not measured yet: `make PY=python3 gpu-bench-train`" if epoch is None else
                   f"{epoch.median:.0f} min, projected from the real tokens/s of the `qwen2.5-7b` recipe on one "
                   f"{card(epoch.key[0])} ({runs(epoch)})")
    speeds = [f"{m.median:.0f} articles/s, {what}, on one {card(m.key[1])} ({runs(m)}{timed_before(m)})"
              for m, what in ((scoring, "label scoring"), (generation, "generation")) if m]
    return "\n".join([
        "| | published run | this suite |", "|---|---|---|",
        f"| one epoch of 120,000 articles, Qwen2.5-7B | {PUBLISHED_RUN['epoch']} | {suite_epoch} |",
        f"| accuracy on the 7,600 test articles | {PUBLISHED_RUN['accuracy']} | {finetuned_7b_accuracy(results_dir)} |",
        f"| evaluation speed over the 7,600 articles | {PUBLISHED_RUN['evaluation']} "
        f"| {'; '.join(speeds) or 'not measured yet: `make PY=python3 gpu-bench-eval`'} |"])
