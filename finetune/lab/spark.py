"""The DGX Spark (GB10) section of docs/dgx-spark.md: what the `qwen2.5-7b` recipe chooses there, and the epoch time
and label-scoring speed projected from what was measured elsewhere. No GB10 has been lent to this project, so every
figure here is a projection, labelled as one: the FLOPs one epoch needs (the same count as the benchmarks' MFU) over
GB10's datasheet peak, at the median MFU of the recipe's runs as it trains today on an H100 or H200 (with their
range), and at the MFU the published run reported on the Spark itself; label scoring at the share of its card's peak
it reached on Hopper.
"""

import statistics
from pathlib import Path
from typing import NamedTuple

from finetune.config import get_config
from finetune.lab.standin import standin_shape
from finetune.lab.measurements import RECIPE_ROW, eval_rows, on_one_gpu, recounted_mfu, step_flops_per_token
from finetune.opening import tokens_run_per_row
from finetune.plan import GPU, plan_evaluation, plan_training
from finetune.results import hardware_label
from finetune.throughput import PEAK_BF16_TFLOPS, bf16_peak_tflops

# GB10 as CUDA would describe it: compute capability 12.1, 128 GB shared by CPU and GPU (about 119 GiB as CUDA counts
# it), of which the plan assumes 110 GiB free with the OS up. The published run reports 38.2 TFLOP/s there (30.6% of
# its bf16 peak) and about 10 h for the epoch.
GB10 = GPU("NVIDIA GB10", (12, 1), total_gib=119.7, free_gib=110.0, integrated=True)
PUBLISHED_MFU = 0.306
PUBLISHED_EPOCH_HOURS = 10
PUBLISHED_ARTICLES_PER_SECOND = 49.6  # its evaluation's inference speed there
QWEN_7B = standin_shape("7b")  # the published config.json of Qwen/Qwen2.5-7B-Instruct
EPOCH_ARTICLES = 120_000


class RecipeRun(NamedTuple):
    file: str
    device: str
    epoch_flops: float  # what one epoch computes, by today's count
    mfu: float
    row_tokens: float | None  # the tokens a packed row runs, where the articles shared their opening


def recipe_runs(results_dir: Path) -> list[RecipeRun]:
    """The one-GPU benchmark runs of the recipe as it trains today: those that shared the opening (since cf33cf6,
    on an H100 or H200: the epoch's FLOPs are the card's, its share of the peak the nearest to GB10's there is); where
    there are none, the H200 runs before it."""
    runs: dict[bool, list[RecipeRun]] = {True: [], False: []}
    for file, record in on_one_gpu(results_dir, "train"):
        row = record["variants"].get(RECIPE_ROW)
        flops_per_token = row and "error" not in row and step_flops_per_token(record, row)
        device = hardware_label(record["environment"])
        shared = bool(row and row.get("opening_length"))
        if flops_per_token and (shared or "H200" in device):
            row_tokens = (tokens_run_per_row(record["config"]["max_length"], row["opening_length"],
                                             row["mean_article_tokens"]) if shared else None)
            runs[shared].append(RecipeRun(file, device, EPOCH_ARTICLES * row["mean_article_tokens"] * flops_per_token,
                                          recounted_mfu(record, row), row_tokens))
    return runs[True] or runs[False]


def scoring_runs(results_dir: Path, batch_size: int) -> list[tuple[str, float]]:
    """Every one-GPU run of label scoring as the recipe evaluates on a GB10 (Liger's kernels, `batch_size`) on a card
    of known peak, as (file, articles/s scaled by GB10's bf16 peak over that card's). Label scoring is matmul-bound:
    a batch of 512 articles reads the weights once (about 0.06 s at GB10's 273 GB/s) for seconds of matmuls there."""
    runs = []
    for (mode, device, _, batch, _), _, file, figures in eval_rows(results_dir):
        peak = bf16_peak_tflops(device)
        if mode == "label_scoring" and batch == batch_size and device.endswith(", Liger") and peak:
            runs.append((file, figures["articles_per_second"] * PEAK_BF16_TFLOPS["GB10"] / peak))
    return runs


def scoring_lines(results_dir: Path, batch_size: int) -> list[str]:
    runs = scoring_runs(results_dir, batch_size)
    if not runs:
        return [f"(no run of label scoring at batch {batch_size} with Liger's kernels yet: `make PY=python3 "
                "gpu-bench-eval` writes one)"]
    rates = [rate for _, rate in runs]
    return [
        f"Label scoring, as the recipe evaluates there (Liger's kernels, batch {batch_size}), projected from its runs "
        f"on Hopper cards ({', '.join(f'`{name}`' for name, _ in runs)}), each at the same share of its card's bf16 "
        "peak:",
        "",
        "| evaluation on a DGX Spark | articles/s |",
        "|---|---|",
        f"| projection: label scoring, median of {len(runs)} runs | {statistics.median(rates):.0f} "
        f"({min(rates):.0f} - {max(rates):.0f}) |",
        f"| the published run's inference, measured there | {PUBLISHED_ARTICLES_PER_SECOND} |",
    ]


def spark_section(results_dir: Path = Path("results")) -> str:
    runs = recipe_runs(results_dir)
    if not runs:
        return "(no H200 run of the recipe yet: `make PY=python3 gpu-bench-train-recipe` writes one)"
    epoch_flops = statistics.median(run.epoch_flops for run in runs)
    mfus = [run.mfu for run in runs]
    cards = " and ".join(sorted({run.device for run in runs}))

    def hours(mfu: float) -> float:
        return epoch_flops / (PEAK_BF16_TFLOPS["GB10"] * 1e12 * mfu) / 3600

    container = {"triton", "torchao", "liger_kernel"}.__contains__  # the NGC image with the `gpu` extra
    _, training_plan = plan_training(get_config("qwen2.5-7b"), GB10, QWEN_7B, has=container,
                                     row_tokens=runs[0].row_tokens)
    _, evaluation_plan = plan_evaluation(get_config("qwen2.5-7b"), GB10, QWEN_7B, has=container)
    lines = [
        f"Projected from the recipe's benchmark runs on one {cards} ({', '.join(f'`{run.file}`' for run in runs)}), "
        f"their MFU counted by the FLOPs a step computes: {epoch_flops / 1e15:,.0f} PFLOP for one epoch of "
        f"{EPOCH_ARTICLES:,} articles"
        + (", the opening run once per micro-batch." if runs[0].row_tokens else "."),
        "",
        "| one epoch of 120,000 articles on a DGX Spark | hours |",
        "|---|---|",
        f"| projection: GB10's {PEAK_BF16_TFLOPS['GB10']:.0f} TFLOP/s at the MFU of those runs, "
        f"median of {len(runs)} "
        f"runs ({statistics.median(mfus):.1%}; {min(mfus):.1%} - {max(mfus):.1%}) "
        f"| {hours(statistics.median(mfus)):.1f} ({hours(max(mfus)):.1f} - {hours(min(mfus)):.1f}) |",
        f"| projection: at the published run's MFU on the Spark ({PUBLISHED_MFU:.1%}) | {hours(PUBLISHED_MFU):.1f} |",
        f"| the published run, measured there | about {PUBLISHED_EPOCH_HOURS} |",
        "",
        *scoring_lines(results_dir, evaluation_plan["eval_batch_size"]["value"]),
        "",
        f"What `qwen2.5-7b` chooses on a GB10 ({GB10.free_gib:.0f} GiB free assumed, the container's packages; "
        "`finetune/plan.py`, checked by `tests/test_plan.py`):",
        "",
        "| | setting | choice | why |",
        "|---|---|---|---|",
        *(f"| {phase} | `{name}` | {choice['value']} | {choice['reason']} |"
          for phase, plan in (("training", training_plan), ("evaluation", evaluation_plan))
          for name, choice in plan.items()),
    ]
    return "\n".join(lines)
