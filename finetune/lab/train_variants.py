"""The training benchmark's rows (`python -m finetune.lab.bench train --variants ...`): what each changes from the
suite's reference configuration and why it is there, the short names the Makefile uses, and the FSDP2 rows."""

from finetune.config import REFERENCE_SPEED, RunConfig
from finetune.lab import fp8_recipes  # noqa: F401  the rows' FP8 recipes beside the recipe's own
from finetune.lab.measurements import RECIPE_ROW

# Each variant changes the reference configuration in one respect, or adds one to a row above it. New rows are
# appended, so that an index keeps naming the same variant in the commands recorded in results/benchmarks/README.md.
# Liger patches the Qwen2 classes for the whole process, so its variants run last whatever their index
# (run_order): every variant before them runs without its kernels. Compiled variants start from an empty compile
# cache (bench_train_variant); FP8 rows follow the bf16 ones they extend, as torchao patches inductor's code
# generation for the process once a model is converted. "auto ... within 70 GiB" plans for at most 70 GiB (an 80 GB
# card); plain "auto" for all the card has.
# Every row starts from the reference's speed settings (REFERENCE_SPEED), whatever the profile's defaults are, so that
# a row's overrides say all it changes; the recipe rows set them back to the recipe's "auto".
RECIPE_SPEED = {name: RunConfig.__dataclass_fields__[name].default for name in REFERENCE_SPEED}
AUTO_70 = {"checkpointed_layers": "auto", "max_memory_gib": 70}
FP8_8BIT = {"compile_layers": True, "fp8": "tensorwise", "optimizer": "adamw8bit_bf16_sr"}
BATCH_16X2 = {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 2}
TRAIN_VARIANTS = {
    "reference (packed, varlen, full GC, bf16 SR AdamW)": {},
    "no packing (padded batches, sdpa)": {"packing": False},
    "plain bf16 AdamW (the published recipe)": {"optimizer": "adamw"},
    "batch 16 x accumulation 2": {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 2},
    "no gradient checkpointing, batch 4 x 8": {"gradient_checkpointing": False, "per_device_train_batch_size": 4,
                                               "gradient_accumulation_steps": 8},
    "Liger fused kernels": {"use_liger_kernel": True},
    "Liger + no gradient checkpointing, batch 4 x 8": {"use_liger_kernel": True, "gradient_checkpointing": False,
                                                       "per_device_train_batch_size": 4,
                                                       "gradient_accumulation_steps": 8},
    "Liger, batch 16 x 2": {"use_liger_kernel": True, "per_device_train_batch_size": 16,
                            "gradient_accumulation_steps": 2},
    "Liger, checkpointing 16 of 28 layers": {"use_liger_kernel": True, "checkpointed_layers": 16},
    "Liger, checkpointing 4 of 28 layers, batch 4 x 8": {"use_liger_kernel": True, "checkpointed_layers": 4,
                                                         "per_device_train_batch_size": 4,
                                                         "gradient_accumulation_steps": 8},
    "Liger, checkpointing 16 of 28 layers, plain bf16 AdamW": {"use_liger_kernel": True, "checkpointed_layers": 16,
                                                               "optimizer": "adamw"},
    "checkpointing auto within 70 GiB": AUTO_70,
    "checkpointing auto": {"checkpointed_layers": "auto"},
    "compiled layers, checkpointing auto within 70 GiB": {**AUTO_70, "compile_layers": True},
    "compiled layers, FP8 rowwise, checkpointing auto within 70 GiB": {**AUTO_70, "compile_layers": True,
                                                                       "fp8": "rowwise"},
    "compiled layers, FP8 tensorwise, checkpointing auto within 70 GiB": {**AUTO_70, "compile_layers": True,
                                                                          "fp8": "tensorwise"},
    "compiled layers, checkpointing auto": {"checkpointed_layers": "auto", "compile_layers": True},
    "compiled layers, FP8 rowwise, checkpointing auto": {"checkpointed_layers": "auto", "compile_layers": True,
                                                         "fp8": "rowwise"},
    "Liger, checkpointing auto within 70 GiB": {**AUTO_70, "use_liger_kernel": True},
    "Liger, checkpointing auto": {"checkpointed_layers": "auto", "use_liger_kernel": True},
    "Liger, compiled layers, checkpointing auto within 70 GiB": {**AUTO_70, "use_liger_kernel": True,
                                                                 "compile_layers": True},
    "Liger, compiled layers, FP8 rowwise, checkpointing auto within 70 GiB": {**AUTO_70, "use_liger_kernel": True,
                                                                              "compile_layers": True, "fp8": "rowwise"},
    # Last, so that the indices recorded with earlier runs keep naming the same rows. LoRA and QLoRA (rank 16 on every linear projection): MFU counts the frozen weights' forward and input-gradient
    # backward and the adapters' full training (finetune/throughput.py::training_flops_per_token).
    "LoRA r16, all linear projections (peft)": {"method": "lora"},
    "QLoRA r16, 4-bit NF4 frozen weights (bitsandbytes)": {"method": "qlora"},
    # Adapter dropout copies every projection's input; compiled layers fuse the adapters' small ops; with the frozen
    # weights' 2 bytes a parameter, "auto" keeps layers within what a 24 GB card has.
    "LoRA r16, no adapter dropout": {"method": "lora", "lora_dropout": 0.0},
    "LoRA r16, no adapter dropout, compiled layers, checkpointing auto within 24 GiB": {
        "method": "lora", "lora_dropout": 0.0, "compile_layers": True, "checkpointed_layers": "auto",
        "max_memory_gib": 24},
    # "auto" plans for bf16 activations; FP8 layers keep less, so fewer checkpointed layers fit in 70 GiB.
    "compiled layers, FP8 tensorwise, checkpointing 10 of 28 layers": {"compile_layers": True, "fp8": "tensorwise",
                                                                       "checkpointed_layers": 10},
    "compiled layers, FP8 tensorwise, checkpointing 8 of 28 layers": {"compile_layers": True, "fp8": "tensorwise",
                                                                      "checkpointed_layers": 8},
    # 8-bit AdamW moments free 14 GiB of the 7B shape's states: "auto" then keeps every layer's activations within
    # 70 GiB (with bf16 moments, compiled layers with none recomputed peaked above it).
    "compiled layers, 8-bit AdamW moments, checkpointing auto within 70 GiB": {
        **AUTO_70, "compile_layers": True, "optimizer": "adamw8bit_bf16_sr"},
    "compiled layers, FP8 tensorwise, 8-bit AdamW moments, checkpointing auto within 70 GiB": {**AUTO_70, **FP8_8BIT},
    # The same 32 rows a step in 2 micro-batches of 16 instead of 4 of 8 (the loss is normalized over the whole step,
    # so the update is the same): half the kernel launches a token, twice the activations. The row above left the GPU
    # idle for part of a profiled step (gpu_busy_share in h200_7b_train_trace.json); 16 x 2's peak with every layer
    # kept is in h200_7b_train_16x2.json.
    "compiled layers, FP8 tensorwise, 8-bit AdamW moments, batch 16 x 2, checkpointing 4 of 28 layers": {
        **FP8_8BIT, **BATCH_16X2, "checkpointed_layers": 4},
    "compiled layers, FP8 tensorwise, 8-bit AdamW moments, batch 16 x 2, checkpointing 8 of 28 layers": {
        **FP8_8BIT, **BATCH_16X2, "checkpointed_layers": 8},
    "compiled layers, FP8 tensorwise, 8-bit AdamW moments, batch 16 x 2, checkpointing auto": {
        **FP8_8BIT, **BATCH_16X2, "checkpointed_layers": "auto"},
    # Tensorwise FP8 fell outside the 2% tolerance of bf16's loss on the 1024-wide model, rowwise held it
    # (results/gpu/fp8/): the recipes that held the tolerance there.
    **{f"compiled layers, FP8 {recipe}, 8-bit AdamW moments, batch 16 x 2, checkpointing auto": {
        **FP8_8BIT, **BATCH_16X2, "checkpointed_layers": "auto", "fp8": recipe}
       for recipe in ("rowwise", "rowwise_with_gw_hp", "tensorwise_forward_rowwise_grads", "tensorwise_pow2_scales")},
    # The qwen2.5-7b recipe as a user runs it: every speed setting "auto", chosen for this GPU (finetune/plan.py);
    # then with the FP8 recipe on, and LoRA and QLoRA taking the same speed-ups.
    RECIPE_ROW: RECIPE_SPEED,
    "the qwen2.5-7b recipe with FP8 tensorwise_pow2_scales": {**RECIPE_SPEED, "fp8": "tensorwise_pow2_scales"},
    "LoRA r16, the qwen2.5-7b recipe": {**RECIPE_SPEED, "method": "lora"},
    "QLoRA r16, the qwen2.5-7b recipe": {**RECIPE_SPEED, "method": "qlora"},
    # The recipe's remaining choices, each against the planned row: the same 32 rows a step in one micro-batch (half
    # the launches and fixed costs a token, twice the activations), 16-bit moments (a lighter update, 14 GiB more
    # state), and LoRA without adapter dropout (each projection's input copied and masked otherwise).
    "the qwen2.5-7b recipe, batch 32 x 1": {**RECIPE_SPEED, "per_device_train_batch_size": 32,
                                            "gradient_accumulation_steps": 1},
    "the qwen2.5-7b recipe, 16-bit AdamW moments": {**RECIPE_SPEED, "optimizer": "adamw_bf16_sr"},
    "LoRA r16, the qwen2.5-7b recipe, no adapter dropout": {**RECIPE_SPEED, "method": "lora", "lora_dropout": 0.0},
    "LoRA r16, the qwen2.5-7b recipe, no adapter dropout, batch 32 x 1": {
        **RECIPE_SPEED, "method": "lora", "lora_dropout": 0.0, "per_device_train_batch_size": 32,
        "gradient_accumulation_steps": 1},
    # 8-bit moments for the adapters too: ~400 small weights, each one fused Triton kernel rather than a compiled call
    # under a reseeded generator.
    "LoRA r16, the qwen2.5-7b recipe, 8-bit AdamW moments": {**RECIPE_SPEED, "method": "lora",
                                                             "optimizer": "adamw8bit_bf16_sr"},
    # The recipe planned for at most 70 GiB, the memory the benchmark-honesty targets allow: on a 141 GB card, what an
    # 80 GB one would run (until 359c358 the plan recomputed 13 layers at 16 x 2 there; since, 8 x 4 with none).
    "the qwen2.5-7b recipe, within 70 GiB": {**RECIPE_SPEED, "max_memory_gib": 70},
    # Where the memory holds bf16 moments at the 8-bit layout, the plan chooses them (finetune/plan.py): the row it
    # would otherwise run, beside it; and bf16 moments where the plan keeps 8-bit ones (more layers recomputed).
    "the qwen2.5-7b recipe, 8-bit AdamW moments": {**RECIPE_SPEED, "optimizer": "adamw8bit_bf16_sr"},
    "the qwen2.5-7b recipe, fused bf16 AdamW moments": {**RECIPE_SPEED, "optimizer": "adamw_bf16_sr_fused"},
    # The same 32 rows in 4 micro-batches of 8, whose activations fit with no layer recomputed, beside the plan's 16 x 2
    # recomputing 13 layers before 359c358 (h100_7b_train_recipe_layouts*.json); since, the plan chooses this layout
    # within 70 GiB itself, so the two rows run alike.
    "the qwen2.5-7b recipe, within 70 GiB, batch 8 x 4": {**RECIPE_SPEED, "max_memory_gib": 70,
                                                          "per_device_train_batch_size": 8,
                                                          "gradient_accumulation_steps": 4},
    # The weight gradients summed inside their matmuls (finetune/grad_accumulation.py): what it saves where a step runs
    # several micro-batches (the H100's plan, the 70 GiB one), beside the rows above in the same run.
    "the qwen2.5-7b recipe, weight gradients summed in the matmul": {**RECIPE_SPEED, "accumulate_in_matmul": True},
    "the qwen2.5-7b recipe, within 70 GiB, weight gradients summed in the matmul": {
        **RECIPE_SPEED, "max_memory_gib": 70, "accumulate_in_matmul": True},
    # Since the plan sums in the matmul wherever a step runs several micro-batches, the rows above are the recipe as
    # planned there: autograd's sums, beside them. And the layouts the plan weighs against 8 x 4 on an H100, 16 x 2
    # recomputing 7 and 13 layers, which time a micro-batch in recomputed layers (plan.MICRO_BATCH_COST_IN_LAYERS).
    "the qwen2.5-7b recipe, weight gradients summed by autograd": {**RECIPE_SPEED, "accumulate_in_matmul": False},
    "the qwen2.5-7b recipe, within 70 GiB, weight gradients summed by autograd": {
        **RECIPE_SPEED, "max_memory_gib": 70, "accumulate_in_matmul": False},
    **{f"the qwen2.5-7b recipe, batch 16 x 2, recomputing {layers} layers": {
        **RECIPE_SPEED, **BATCH_16X2, "checkpointed_layers": layers} for layers in (7, 13)},
    # The profile's 16 x 2 rows kept as given: on an H200 the plan merges them into 32 x 1 (one micro-batch, so
    # nothing to sum); this row times the layout it chose against.
    "the qwen2.5-7b recipe, batch 16 x 2 as given": {**RECIPE_SPEED, **BATCH_16X2, "merge_micro_batches": False},
    # The opening (system turn and instruction, 41 of ~103 tokens an article) run once per micro-batch
    # (finetune/opening.py), beside every article running its own, as the rows above ran before 2026-12-06; and the
    # 70 GiB recipe at 16 x 2 with every layer kept, which the smaller activations of a shared opening may fit.
    "the qwen2.5-7b recipe, every article with its own opening": {**RECIPE_SPEED, "share_opening": False},
    "the qwen2.5-7b recipe, within 70 GiB, every article with its own opening": {
        **RECIPE_SPEED, "max_memory_gib": 70, "share_opening": False},
    "the qwen2.5-7b recipe, within 70 GiB, batch 16 x 2, no layer recomputed": {
        **RECIPE_SPEED, **BATCH_16X2, "max_memory_gib": 70, "checkpointed_layers": 0, "merge_micro_batches": False},
    # The last layer's MLP on every row, as before finetune/last_layer.py: what running it only where the loss reads
    # saves, in the same run.
    "the qwen2.5-7b recipe, within 70 GiB, the whole last layer": {
        **RECIPE_SPEED, "max_memory_gib": 70, "last_layer_where_read": False},
}


# Short names for the rows the Makefile runs (`--variants recipe,lora`). An index names the same row as ever (the
# commands recorded in results/benchmarks/README.md); the labels stay as the committed results and measurements.py
# have them.
VARIANT_SLUGS = {
    "auto70": "checkpointing auto within 70 GiB",
    "compiled-auto70": "compiled layers, checkpointing auto within 70 GiB",
    "compiled-fp8-rowwise-auto70": "compiled layers, FP8 rowwise, checkpointing auto within 70 GiB",
    "compiled-fp8-tensorwise-auto70": "compiled layers, FP8 tensorwise, checkpointing auto within 70 GiB",
    "compiled-auto": "compiled layers, checkpointing auto",
    "liger-gc16": "Liger, checkpointing 16 of 28 layers",
    "liger-compiled-auto70": "Liger, compiled layers, checkpointing auto within 70 GiB",
    "liger-compiled-fp8-rowwise-auto70": "Liger, compiled layers, FP8 rowwise, checkpointing auto within 70 GiB",
    "lora-reference": "LoRA r16, all linear projections (peft)",
    "qlora-reference": "QLoRA r16, 4-bit NF4 frozen weights (bitsandbytes)",
    "recipe": RECIPE_ROW,
    "recipe-fp8": "the qwen2.5-7b recipe with FP8 tensorwise_pow2_scales",
    "lora": "LoRA r16, the qwen2.5-7b recipe",
    "qlora": "QLoRA r16, the qwen2.5-7b recipe",
    "lora-8bit": "LoRA r16, the qwen2.5-7b recipe, 8-bit AdamW moments",
    "recipe-70": "the qwen2.5-7b recipe, within 70 GiB",
    "recipe-70-8x4": "the qwen2.5-7b recipe, within 70 GiB, batch 8 x 4",
    "recipe-8bit": "the qwen2.5-7b recipe, 8-bit AdamW moments",
    "recipe-bf16": "the qwen2.5-7b recipe, fused bf16 AdamW moments",
    "recipe-summed": "the qwen2.5-7b recipe, weight gradients summed in the matmul",
    "recipe-70-summed": "the qwen2.5-7b recipe, within 70 GiB, weight gradients summed in the matmul",
    "recipe-autograd-sums": "the qwen2.5-7b recipe, weight gradients summed by autograd",
    "recipe-70-autograd-sums": "the qwen2.5-7b recipe, within 70 GiB, weight gradients summed by autograd",
    "recipe-16x2": "the qwen2.5-7b recipe, batch 16 x 2 as given",
    "recipe-16x2-gc7": "the qwen2.5-7b recipe, batch 16 x 2, recomputing 7 layers",
    "recipe-16x2-gc13": "the qwen2.5-7b recipe, batch 16 x 2, recomputing 13 layers",
    "recipe-own-openings": "the qwen2.5-7b recipe, every article with its own opening",
    "recipe-70-own-openings": "the qwen2.5-7b recipe, within 70 GiB, every article with its own opening",
    "recipe-70-16x2": "the qwen2.5-7b recipe, within 70 GiB, batch 16 x 2, no layer recomputed",
    "recipe-70-whole-last-layer": "the qwen2.5-7b recipe, within 70 GiB, the whole last layer",
}


def chosen_indices(catalogue: dict[str, dict], variants: str) -> list[int]:
    """`--variants`: "all", or comma-separated indices into `catalogue` or slugs of VARIANT_SLUGS."""
    names = list(catalogue)
    if variants == "all":
        return list(range(len(names)))
    indices = []
    for item in variants.split(","):
        if not item.isdigit() and VARIANT_SLUGS.get(item) not in catalogue:
            raise SystemExit(f"--variants: no variant {item!r}; give indices into the catalogue or names of "
                             f"VARIANT_SLUGS ({', '.join(VARIANT_SLUGS)})")
        indices.append(int(item) if item.isdigit() else names.index(VARIANT_SLUGS[item]))
    return indices


def run_order(catalogue: dict[str, dict], indices: list[int]) -> list[str]:
    """The chosen variants (always with the reference, index 0) by index, the Liger ones last."""
    names = list(catalogue)
    return sorted((names[i] for i in {0, *indices}),
                  key=lambda n: (catalogue[n].get("use_liger_kernel") is True, names.index(n)))


# Under FSDP2 (`accelerate launch`, configs/accelerate/fsdp2.yaml) the same per-GPU recipe: who checkpoints the
# activations (FSDP per decoder layer, or the Trainer; never both), when gathered weights are freed, and how the
# weights are updated. With FSDP2, adamw_fp32_master is its mixed precision (fp32 shards, bf16 compute); the others
# keep bf16 shards (finetune/train.py::sft_config). Keys starting with "fsdp_" replace the accelerate config's
# setting of that name for the variant. Without checkpointing comes last: it may not fit on fewer GPUs.
FSDP_VARIANTS = {
    "FSDP2 reference (FSDP activation checkpointing, bf16 SR AdamW)": {
        "gradient_checkpointing": False, "fsdp_activation_checkpointing": True},
    "FSDP2, the Trainer's gradient checkpointing instead of FSDP's": {
        "gradient_checkpointing": True, "fsdp_activation_checkpointing": False},
    "FSDP2, fp32 master weights (FSDP2 mixed precision)": {
        "gradient_checkpointing": False, "fsdp_activation_checkpointing": True, "optimizer": "adamw_fp32_master"},
    "FSDP2, plain bf16 AdamW": {
        "gradient_checkpointing": False, "fsdp_activation_checkpointing": True, "optimizer": "adamw"},
    "FSDP2, weights re-gathered for every forward and backward (reshard_after_forward)": {
        "gradient_checkpointing": False, "fsdp_activation_checkpointing": True, "fsdp_reshard_after_forward": True},
    "FSDP2, no activation checkpointing": {"gradient_checkpointing": False, "fsdp_activation_checkpointing": False},
}
