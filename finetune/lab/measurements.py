"""The one-GPU benchmark files read as measurements: each file one run, each row grouped with the rows of other runs
that ran the same configuration, with its ratios to the anchors of its own file and its MFU by today's count. What the
targets (`finetune.lab.targets`), the report and the DGX Spark projection are computed from.
"""

import json
import statistics
from pathlib import Path
from typing import NamedTuple

from transformers import Qwen2Config

from finetune.config import REFERENCE_SPEED, RunConfig
from finetune.lab.bench_eval import ALL_ANCHORS, BENCHMARK_CHANGES, KERNEL_ANCHORS
from finetune.lab.stock_trl import STOCK_TRL, STOCK_TRL_TUNED
from finetune.results import hardware_label, made_before
from finetune.throughput import ArticleTokens, bf16_peak_tflops, training_flops_per_token

# The benchmark row of the qwen2.5-7b recipe as a user runs it (finetune/lab/bench.py), which the pages quote.
RECIPE_ROW = "the qwen2.5-7b recipe, planned for this GPU"
LORA_ROW = "LoRA r16, the qwen2.5-7b recipe"  # LoRA with the recipe's speed settings, planned for the same GPU


class Measured(NamedTuple):
    """One configuration's figure over the runs (files) that measured it."""
    median: float
    low: float
    high: float
    where: str  # the files and the configuration, for a table cell
    runs: int
    figures: list[dict]  # each run's variant or mode (its first, where it has two), for what else a row wants to say
    key: tuple = ()  # the group: (device, variant) for training, (mode, device, model, batch, changes it lacked) for
    # evaluation


# (group key, configuration label, file name, the variant's or mode's figures): one configuration on one device is
# one group, whichever files measured it.
Row = tuple[tuple, str, str, dict]


def summarize(rows: list[Row], metric: str, higher_is_better: bool = True) -> Measured | None:
    """The configuration whose median `metric` over its runs is best, with its spread; None without rows. A run is a
    file: where one file measured a configuration under two names (the recipe as planned, and the same settings
    asked for by hand), its figure is their mean, one run, not two. A row whose figure is None (an MFU too early to
    recount) is left out."""
    groups: dict[tuple, dict[str, list[tuple[str, dict]]]] = {}
    for key, label, file, figures in (row for row in rows if row[3][metric] is not None):
        groups.setdefault(key, {}).setdefault(file, []).append((label, figures))
    measured = []
    for key, files in groups.items():
        values = [statistics.mean(figures[metric] for _, figures in named) for named in files.values()]
        labels = " = ".join(dict.fromkeys(label for named in files.values() for label, _ in named))
        where = ", ".join(f"`{file}`" for file in files)
        measured.append(Measured(statistics.median(values), min(values), max(values), f"{where}: {labels}",
                                 len(files), [named[0][1] for named in files.values()], key))
    if not measured:
        return None
    return (max if higher_is_better else min)(measured, key=lambda m: m.median)


def benchmark_records(results_dir: Path, kind: str) -> list[tuple[Path, dict]]:
    """The `python -m finetune.lab.bench <kind>` outputs under results/benchmarks, by file name."""
    records = [(p, json.loads(p.read_text())) for p in sorted((results_dir / "benchmarks").glob("*.json"))]
    return [(p, r) for p, r in records if r.get("benchmark") == kind]


def step_flops_per_token(record: dict, row: dict) -> float | None:
    """The FLOPs a full fine-tuning step computes per token for a training benchmark's row, counted by today's
    `training_flops_per_token` from the shape and token statistics the file recorded. A file's own `mfu` is the
    count of the bench that wrote it (earlier ones counted the LM head for every token), so figures compared across
    files are recounted here. None where the file recorded no token statistics."""
    attention_length = row.get("attention_length", row.get("token_weighted_article_tokens"))
    loss_share = row.get("loss_share")
    if loss_share is None and "loss_tokens_per_article" in row:
        loss_share = row["loss_tokens_per_article"] / row["mean_article_tokens"]
    if attention_length is None or loss_share is None:
        return None
    config = record["config"]
    model = Qwen2Config(hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
                        num_hidden_layers=config["num_layers"], num_attention_heads=config["num_heads"],
                        num_key_value_heads=config["num_kv_heads"], vocab_size=config["vocab_size"])
    return training_flops_per_token(model, ArticleTokens(attention_length, loss_share, row.get("opening_share", 0.0),
                                                         row.get("opening_length", 0),
                                                         row.get("last_layer_where_read", False)))


def row_steps(record: dict, row: dict) -> tuple[int, int, int, int]:
    """What a training row timed: rows a micro-batch, micro-batches a step (as configured: a plan that merges them
    trains the same steps), warm-up steps and measured steps. The bench records them in every row; for files written
    before, they are inferred the way the bench ran the row: its overrides' batch, else the reference's where the
    file's profile was the recipe's (the bench starts its variants there), else the file's; its own steps, else the
    file's."""
    if "batch" in row:
        return (*row["batch"], row["warmup_steps"], row["measured_steps"])
    config = record["config"]
    start = REFERENCE_SPEED if config.get("compile_layers") == "auto" and not row.get("stock_trl") else {}
    batch = {**config, **start, **row.get("overrides", {})}
    return (batch["per_device_train_batch_size"], batch["gradient_accumulation_steps"],
            row.get("warmup_steps", record.get("warmup_steps")),
            row.get("measured_steps", record.get("measured_steps")))


def anchor_mismatch(record: dict, row: dict, anchor: dict) -> str | None:
    """Why `row` may not be divided by `anchor`, or None where both timed the same steps at the same batch: the same
    rows an optimizer step, so the same articles, as a ratio to an anchor must be. How each side splits a step's rows
    into micro-batches is its own setting, as the suite's plan chooses it and a user tuning TRL would (a smaller
    micro-batch where the memory runs out)."""
    (rows, micro_batches, warmup, measured), theirs = row_steps(record, row), row_steps(record, anchor)
    if rows * micro_batches != theirs[0] * theirs[1]:
        return f"anchor at {theirs[0] * theirs[1]} rows a step"
    if (warmup, measured) != theirs[2:]:
        return f"anchor timed over steps {theirs[2] + 1}-{theirs[2] + theirs[3]}"
    return None


def anchor_ratios(record: dict, row: dict) -> dict:
    """`row` without its ratios to stock TRL (as documented, and tuned) where the anchor timed other steps or another
    batch (files before the bench checked: stock TRL over 8 steps beside rows over 4), and without its ratio to the
    tuned anchor where that was not at its strongest: a tuned row ran out of memory and was not run again in smaller
    micro-batches (files before the bench did; on an H100 the row without checkpointing fits at 4 x 8)."""
    tuned = [record["variants"].get(name) for name in STOCK_TRL_TUNED]
    anchors = {"speed_vs_stock_trl": [record["variants"].get(STOCK_TRL)], "speed_vs_stock_trl_tuned": tuned}
    untried = any(a and a.get("error", "").startswith("OutOfMemoryError") and "out_of_memory_at" not in a
                  for a in tuned)
    return {k: v for k, v in row.items()
            if k not in anchors or not (any(a and anchor_mismatch(record, row, a) for a in anchors[k])
                                        or k == "speed_vs_stock_trl_tuned" and untried)}


def recounted_mfu(record: dict, row: dict) -> float | None:
    """A full fine-tuning row's MFU by today's count (`step_flops_per_token`), of its GPU's bf16 peak; None where the
    file recorded too little to count (its own figure counted the LM head for every token, ~8% more FLOPs) or the
    GPU's peak is unknown."""
    flops = step_flops_per_token(record, row)
    peak = bf16_peak_tflops(hardware_label(record["environment"]))
    if flops is None or peak is None:
        return None
    return row["tokens_per_second"] * flops / (peak * 1e12)


def fp8_recipes_within_tolerance(results_dir: Path) -> set[str]:
    """FP8 recipes that reached bf16's loss in every comparison recorded (`finetune.lab.bench_fp8`, results/gpu/fp8/):
    a recipe that missed once, or was never checked, is not a checked option."""
    verdicts: dict[str, list[bool]] = {}
    for path in sorted((results_dir / "gpu" / "fp8").glob("*.json")):
        for name, run in json.loads(path.read_text())["runs"].items():
            if not name.startswith("bf16"):
                verdicts.setdefault(name, []).append(run["within_tolerance"])
    return {recipe for recipe, passed in verdicts.items() if all(passed)}


def on_one_gpu(results_dir: Path, kind: str) -> list[tuple[str, dict]]:
    """The benchmark files of `kind` run on one H100 or H200, by file name: the runs the targets are judged on."""
    return [(p.name, r) for p, r in benchmark_records(results_dir, kind)
            if any(gpu in hardware_label(r["environment"]) for gpu in ("H100", "H200")) and r.get("world_size", 1) == 1]


def what_ran(row: dict) -> tuple:
    """A training row's configuration as it ran: its settings with each "auto" its plan resolved replaced by the
    choice, the micro-batches the plan chose (recorded with the plan) and the layers it recomputed. Rows under
    different names that ran alike are one configuration (on an H100 the recipe as planned and the recipe told to sum
    in the matmul, as the plan now does there); one name whose plan changed between commits is several. A memory cap
    only steers the plan. A setting the code no longer has ran as the code without it where it was off (the update
    beside the forward, reverted after 275bfa0); rows written before the opening was shared (cf33cf6) or the last
    layer's MLP ran only where read ran them off."""
    plan = row.get("plan", {})
    settings = {name: plan.get(name, value) if value == "auto" else value for name, value in row["overrides"].items()
                if name != "max_memory_gib"}
    settings = {name: value for name, value in settings.items()
                if name in RunConfig.__dataclass_fields__ or value not in (False, None)}
    for added in ("share_opening", "last_layer_where_read"):  # rows written before these settings ran them off
        if not settings.get(added):
            settings.pop(added, None)
    if plan and "micro_batches" in row:  # without a plan the overrides say the layout
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "merge_micro_batches"):
            settings.pop(name, None)
        settings["micro_batches"] = tuple(row["micro_batches"])
    if row.get("checkpointed_layers") is not None:
        settings["checkpointed_layers"] = row["checkpointed_layers"]
    return tuple(sorted(settings.items()))


def training_rows(results_dir: Path) -> list[tuple[Row, str]]:
    """The suite's variants that may count toward a target, each with its device: an optimizer that really updates
    bf16 weights (not stock TRL, not plain bf16 AdamW), an FP8 recipe, if any, that passed the learning check, a known
    GPU. Their "mfu" is today's count, None where the file cannot be recounted."""
    checked = {None, *fp8_recipes_within_tolerance(results_dir)}
    rows = []
    for file, record in on_one_gpu(results_dir, "train"):
        device = hardware_label(record["environment"])
        for name, v in record["variants"].items():
            fp8 = v["overrides"].get("fp8")
            fp8 = None if fp8 == "auto" else fp8  # "auto" chooses FP8 only once its recipe is checked (plan.py)
            if ("error" not in v and v["mfu"] and not v.get("stock_trl") and fp8 in checked
                    and v["overrides"].get("method", "full") == "full"
                    and v["overrides"].get("optimizer", "adamw_bf16_sr") != "adamw"):
                figures = {**anchor_ratios(record, v), "mfu": recounted_mfu(record, v)}
                rows.append((((device, what_ran(v)), name, file, figures), device))
    return rows


def by_name(rows: list[Row]) -> list[Row]:
    """The rows grouped under their names, whatever each run's plan chose: the recipe as a user ran it at each commit,
    for what to expect of it, where `training_rows` groups by what ran, for the goals. Runs that shared the opening
    (since cf33cf6) stay apart from those before, whose articles each ran their own: a third less work a step."""
    return [((key[0], label, dict(key[1]).get("share_opening", False)), label, file, figures)
            for key, label, file, figures in rows]


def tuned_anchor_ceilings(results_dir: Path) -> list[Row]:
    """Per run, the ratio a step computing the anchor's FLOPs a token at the bf16 peak would reach against that run's
    tuned stock TRL (its faster tuned row): 1 / the anchor's MFU. A row that runs each article's whole prompt cannot
    pass it; the shared opening runs two fifths of the tokens once a micro-batch, so the recipe's bound lies higher."""
    rows = []
    for file, record in on_one_gpu(results_dir, "train"):
        device = hardware_label(record["environment"])
        for name, v in record["variants"].items():
            mfu = v.get("speed_vs_stock_trl_tuned") == 1.0 and recounted_mfu(record, v)
            if name.startswith("stock TRL tuned") and mfu:
                rows.append(((device, name), name, file, {**v, "ceiling": 1 / mfu}))
    return rows


def lora_over_recipe(results_dir: Path) -> list[Row]:
    """Per run, LoRA's tokens/s over the full recipe's, each as planned for the card: the same steps and batch, and
    LoRA computing no weight gradients for its frozen base. A pair is one configuration where both ran alike
    (`what_ran`): the plan for the card changed between commits (layers recomputed, 8-bit or bf16 moments)."""
    rows = []
    for file, record in on_one_gpu(results_dir, "train"):
        lora, full = (record["variants"].get(name, {}) for name in (LORA_ROW, RECIPE_ROW))
        if "tokens_per_second" in lora and "tokens_per_second" in full:
            device = hardware_label(record["environment"])
            rows.append(((device, what_ran(lora), what_ran(full)), LORA_ROW, file,
                         {"lora_over_recipe": lora["tokens_per_second"] / full["tokens_per_second"]}))
    return rows


def changes_missed(record: dict, modes: tuple[str, ...]) -> tuple[str, ...]:
    """The evaluation changes to `modes` and the benchmark's own changes to them (how it times them, its own modes'
    code) that an eval run predates."""
    return tuple(made_before(record, modes) + made_before(record, modes, BENCHMARK_CHANGES))


def eval_weights(record: dict) -> str:
    """What an eval run's model had learned: "random weights", "taught N steps" (`bench eval --teach_steps`, from
    scratch in the same process) or a folder's weights."""
    if "teaching" in record:
        return f"taught {record['teaching']['steps']} steps"
    model = record.get("config", {}).get("model", "scratch")
    return "random weights" if model == "scratch" else f"`{model}`"


def mode_over_mode(results_dir: Path, mode: str | tuple[str, ...], over: str | tuple[str, ...], what: str,
                   taught_only: bool = False, rate: str = "articles_per_second") -> list[Row]:
    """Per run, `mode`'s articles/s over `over`'s, where all ran at one batch size in one run (`what` names the ratio,
    e.g. "label scoring over plain `generate`"), grouped like `eval_rows` by device, batch and the changes the run
    lacked; `taught_only` keeps runs on weights taught the answer format. Several modes on a side count as
    run one after the other (their seconds an article summed): label scoring and generation apart, over the one pass
    that gives both. `rate` is the figure read on `mode`'s side (`gpu_bound_articles_per_second`: what its kernels
    would make were the GPU never left waiting), where the run measured it. The ratio is the row's "ratio" figure."""
    modes, overs = ((m,) if isinstance(m, str) else m for m in (mode, over))
    rows = []
    for file, record in on_one_gpu(results_dir, "eval"):
        tops, bottoms = ([record["modes"].get(m) for m in side] for side in (modes, overs))
        taught = eval_weights(record) != "random weights"
        if ((taught or not taught_only) and all(tops + bottoms) and all(m.get(rate) for m in tops)
                and len({m["batch_size"] for m in tops + bottoms}) == 1):
            device, batch = hardware_label(record["environment"]), tops[0]["batch_size"]
            missed = changes_missed(record, modes + overs)
            ratio = sum(1 / m["articles_per_second"] for m in bottoms) / sum(1 / m[rate] for m in tops)
            rows.append(((device, batch, missed), f"{what}, batch {batch}, {device}", file, {"ratio": ratio}))
    return rows


def grouped_over_flash_attention(results_dir: Path, mode: str, taught_only: bool = False) -> list[Row]:
    """`mode` with the grouped varlen kernel over the same mode with FlashAttention's varlen kernel, per run: `mode`
    over "<mode>_flash_attention" since the grouped kernel became the default, "<mode>_grouped_varlen" over `mode` in
    the runs before (the same two kernels, named the other way round)."""
    what = f"{mode.replace('_', ' ')}'s grouped varlen kernel over FlashAttention's"
    return (mode_over_mode(results_dir, f"{mode}_grouped_varlen", mode, what, taught_only)
            + mode_over_mode(results_dir, mode, f"{mode}_flash_attention", what, taught_only))


def eval_anchor_mismatch(record: dict, mode: str, anchors: dict = ALL_ANCHORS) -> str | None:
    """Why an evaluation mode may not be divided by its plain-HF anchor (`KERNEL_ANCHORS`: the one with the same
    kernels) because the anchor ran at another batch size, or None."""
    anchor_batch = record["modes"][anchors[mode]]["batch_size"]
    return None if anchor_batch == record["modes"][mode]["batch_size"] else f"anchor at batch {anchor_batch}"


def eval_rows(results_dir: Path) -> list[Row]:
    """Every mode timed beside its plain-HF anchor (as transformers builds the model, or with the same kernels),
    grouped by mode, device, kernels, model, batch and the changes its run lacked (`changes_missed`: runs of other
    code, or timed another way, are another configuration, not noise around this one). A row's `vs_anchor` is
    dropped where its anchor ran at another batch size (files before the anchors ran at the suite's batch timed plain
    `generate` at 64): a ratio compares equal batches or is not made."""
    rows = []
    for file, record in on_one_gpu(results_dir, "eval"):
        device = hardware_label(record["environment"])
        if (record.get("liger_kernels") or {}).get("in_use"):
            device += ", Liger"
        config = record.get("config", {})
        if config.get("compile_layers") is True:  # "auto" beside Liger plans them off
            device += ", compiled layers"
        model = "random weights" if eval_weights(record) == "random weights" else "trained weights"
        for mode, m in record["modes"].items():
            if "vs_anchor" in m or "vs_anchor_with_kernels" in m:
                m = {k: v for k, v in m.items() if not (k == "vs_anchor" and eval_anchor_mismatch(record, mode) or
                     k == "vs_anchor_with_kernels" and eval_anchor_mismatch(record, mode, KERNEL_ANCHORS))}
                missed = changes_missed(record, (mode,))
                label = f"{mode}, batch {m.get('batch_size')}, {device}, {model}"
                if missed:
                    label += f", before {', '.join(missed)}"
                rows.append(((mode, device, model, m.get("batch_size"), missed), label, file, m))
    return rows
