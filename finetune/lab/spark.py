"""The DGX Spark (GB10) section of docs/dgx-spark.md: what the `qwen2.5-7b` recipe chooses there, and the epoch time
projected from what was measured elsewhere. No GB10 has been lent to this project, so every figure here is a
projection, labelled as one: the FLOPs one epoch needs (the same count as the benchmarks' MFU) over GB10's datasheet
peak, at the MFU the recipe reached on an H200 and at the MFU the published run reported on the Spark itself.
"""

import json
from pathlib import Path

from finetune.config import get_config
from finetune.lab.targets import RECIPE_ROW, step_flops_per_token
from finetune.plan import GPU, ModelShape, plan_evaluation, plan_training
from finetune.throughput import PEAK_BF16_TFLOPS

# GB10 as CUDA would describe it: compute capability 12.1, 128 GB shared by CPU and GPU (about 119 GiB as CUDA counts
# it), of which the plan assumes 110 GiB free with the OS up. The published run reports 38.2 TFLOP/s there (30.6% of
# its bf16 peak) and about 10 h for the epoch.
GB10 = GPU("NVIDIA GB10", (12, 1), total_gib=119.7, free_gib=110.0, integrated=True)
PUBLISHED_MFU = 0.306
PUBLISHED_EPOCH_HOURS = 10
QWEN_7B = ModelShape(hidden=3584, intermediate=18944, layers=28, vocab=152064, heads=28, kv_heads=4, tied=False)
EPOCH_ARTICLES = 120_000
MEASURED = Path("results/benchmarks/h200_7b_train_recipe.json")


def spark_section(results_dir: Path = Path("results")) -> str:
    path = results_dir / "benchmarks" / MEASURED.name
    if not path.exists():
        return f"(no H200 run of the recipe yet: `make PY=python3 gpu-bench-train-recipe` writes `{MEASURED}`)"
    record = json.loads(path.read_text())
    row = record["variants"][RECIPE_ROW]
    flops_per_token = step_flops_per_token(record, row)
    epoch_flops = EPOCH_ARTICLES * row["mean_article_tokens"] * flops_per_token
    h200_mfu = row["tokens_per_second"] * flops_per_token / (PEAK_BF16_TFLOPS["H200"] * 1e12)
    peak = PEAK_BF16_TFLOPS["GB10"] * 1e12
    container = {"triton", "torchao", "liger_kernel"}.__contains__  # the NGC image with the `gpu` extra
    _, training_plan = plan_training(get_config("qwen2.5-7b"), GB10, QWEN_7B, has=container)
    _, evaluation_plan = plan_evaluation(get_config("qwen2.5-7b"), GB10, QWEN_7B, has=container)
    lines = [
        f"Projected from `{path.relative_to(results_dir.parent)}` (one H200, commit "
        f"`{(record['environment']['git_commit'] or 'unknown')[:7]}`): the recipe's "
        f"{row['tokens_per_second']:,.0f} tokens/s there are {h200_mfu:.1%} of the H200's bf16 peak by the FLOPs a "
        f"step computes ({flops_per_token / 1e9:.1f} GFLOP a token, {row['mean_article_tokens']:.1f} tokens an "
        f"article: {epoch_flops / 1e15:,.0f} PFLOP for one epoch of {EPOCH_ARTICLES:,} articles).",
        "",
        "| one epoch of 120,000 articles on a DGX Spark | hours |",
        "|---|---|",
        f"| projection: GB10's {PEAK_BF16_TFLOPS['GB10']:.0f} TFLOP/s at the recipe's H200 MFU ({h200_mfu:.1%}) "
        f"| {epoch_flops / (peak * h200_mfu) / 3600:.1f} |",
        f"| projection: at the published run's MFU on the Spark ({PUBLISHED_MFU:.1%}) "
        f"| {epoch_flops / (peak * PUBLISHED_MFU) / 3600:.1f} |",
        f"| the published run, measured there | about {PUBLISHED_EPOCH_HOURS} |",
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
