"""One dataclass per run, with named profiles. Notebook parameters and CLI flags override its fields.

The defaults are the real experiment (Qwen2.5-7B-Instruct, full fine-tuning), with its speed-ups chosen from the
hardware at start (`finetune/plan.py`, fields set to "auto"); the other profiles change only what they need changed.
Each field's help text is its documentation: `python -m finetune.train --help` prints it, grouped.
"""

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

GROUPS = ("data", "model", "training", "speed", "evaluation", "output")


def option(default, group: str, help: str, **kwargs):
    """A config field with its --help line and the group it is listed under."""
    assert group in GROUPS, group
    return field(default=default, metadata={"group": group, "help": help}, **kwargs)


@dataclass
class RunConfig:
    profile: str = option("qwen2.5-7b", "model", "named set of defaults (PROFILES); flags override its fields")
    run_name: str = option("qwen7b-ag-news-full", "output", "folder under checkpoints_dir for this run's checkpoints "
                           "and final model")

    # Model.
    model: str = option("Qwen/Qwen2.5-7B-Instruct", "model", "hub id or local folder, or 'scratch' for a "
                        "Qwen2-architecture model built from the shape fields below")
    tokenizer: str | None = option(None, "model", "none = the model's own; 'bpe' = byte-level BPE trained on the "
                                   "training texts (scratch models only); 'qwen2.5' = Qwen2.5's tokenizer rebuilt "
                                   "offline; or a hub id / local folder")
    vocab_size: int = option(4096, "model", "'bpe' trains this many tokens; a scratch model has max(len(tokenizer), "
                             "vocab_size) embedding rows (the Qwen2.5 shape keeps its padded 152,064)")
    hidden_size: int = option(128, "model", "scratch model: width")
    num_layers: int = option(2, "model", "scratch model: decoder layers")
    num_heads: int = option(4, "model", "scratch model: attention heads")
    num_kv_heads: int = option(2, "model", "scratch model: key/value heads (grouped-query attention)")
    intermediate_size: int = option(384, "model", "scratch model: SwiGLU width")
    tie_word_embeddings: bool = option(True, "model", "scratch model: the LM head shares the embedding's weights")
    method: str = option("full", "model", "which weights train: 'full' every weight; 'lora' low-rank adapters beside "
                         "the frozen weights (peft); 'qlora' the same over 4-bit NF4 frozen weights (GPU, "
                         "bitsandbytes). Adapters are saved alone (finetune.merge merges them)")
    lora_rank: int = option(16, "model", "LoRA/QLoRA: adapter rank")
    lora_alpha: int = option(32, "model", "LoRA/QLoRA: the adapter's update is scaled by alpha / rank")
    # peft's default. Dropout copies and masks every adapted projection's input: the 7B recipe's LoRA trained faster
    # without it (measured in results/benchmarks/h200_7b_train_choices.json).
    lora_dropout: float = option(0.0, "model", "LoRA/QLoRA: dropout on each adapter's input")
    # 2e-4 is the QLoRA paper's rate for its 7B and 13B models (Dettmers et al., 2023, appendix), ten times the full
    # recipe's: adapters start at zero and move only a low-rank slice of each weight.
    lora_learning_rate: float = option(2e-4, "model", "LoRA/QLoRA learning rate (full fine-tuning uses "
                                       "learning_rate)")
    lora_target_modules: str = option("all-linear", "model", "LoRA/QLoRA: 'all-linear' (every decoder projection, "
                                      "not the LM head) or comma-separated module names, e.g. q_proj,v_proj")
    lora_modules_to_save: str | None = option(None, "model", "LoRA/QLoRA: modules trained whole and saved with the "
                                              "adapters, comma-separated ('norm' = every RMSNorm); none = adapters "
                                              "alone")
    # The LM head stays frozen: TRL's fused loss reads its weight directly. A head tied to the embedding is untied when
    # the adapter is merged, so the merged model is the one trained.
    lora_embedding: bool = option(False, "model", "LoRA/QLoRA: an adapter on the input embedding too")

    # Data.
    data_dir: str | None = option(None, "data", "AG News folder (train.csv/test.csv, or test only); none = "
                                  "$AG_NEWS_DIR, else the hub")
    protocol: str = option("auto", "data", "'standard' (train on train, evaluate on test), 'holdout' (a stratified "
                           "carve of one split) or 'auto' (standard when a train split exists)")
    holdout_train_size: int = option(6000, "data", "holdout protocol: articles carved out to train on")
    # Apart from `seed` (initialisation, data order), so that a seed sweep evaluates every run on the same articles.
    split_seed: int = option(42, "data", "seed of the holdout carve and the sample limits")
    max_train_samples: int | None = option(None, "data", "train on at most this many articles (none = all)")
    max_eval_samples: int | None = option(None, "data", "evaluate on at most this many articles (none = all)")
    skip_bad_rows: bool = option(False, "data", "skip malformed rows (csv, parquet, jsonl) instead of stopping at "
                                 "the first; how many is logged and noted in the results")

    # Training.
    learning_rate: float = option(2e-5, "training", "full fine-tuning's peak learning rate")
    num_train_epochs: float = option(1.0, "training", "passes over the training articles")
    max_steps: int = option(-1, "training", "> 0 stops after this many optimizer steps (benchmarks, quick checks)")
    # 16 x 2 rows of 512 packed tokens: the reference's 32 rows a step (8 x 4) in half the kernel launches a token.
    per_device_train_batch_size: int = option(16, "training", "packed rows per micro-batch and GPU")
    gradient_accumulation_steps: int = option(2, "training", "micro-batches per optimizer step")
    max_length: int = option(512, "training", "tokens per packed row (and the longest prompt + answer)")
    warmup_steps: float = option(0, "training", "learning-rate warm-up: steps, or a fraction of all steps below 1")
    lr_scheduler_type: str = option("linear", "training", "transformers' scheduler name")
    weight_decay: float = option(0.0, "training", "AdamW weight decay")
    bf16: bool = option(True, "training", "bf16 weights (or bf16 autocast over fp32 master weights)")
    packing: bool = option(True, "training", "whole articles share a row (best fit), kept apart by the attention")
    optimizer: str = option("auto", "training", "'adamw' (in the weights' dtype: with bf16 weights most updates at lr "
                            "2e-5 round away), 'adamw_bf16_sr' (bf16 weights, stochastic rounding), "
                            "'adamw_bf16_sr_fused' (the same, one fused Triton update for all weights on CUDA), "
                            "'adamw8bit_bf16_sr' (fused, with 8-bit moments: 6 bytes a parameter instead of 8), "
                            "'adamw_fp32_master' (fp32 weights and states, bf16 autocast), or 'auto'")
    seed: int = option(42, "training", "initialisation and data order")
    logging_steps: int = option(10, "training", "log loss, tokens/s and MFU every this many optimizer steps")
    save_steps: int = option(200, "training", "write a checkpoint every this many optimizer steps")
    save_total_limit: int = option(2, "training", "checkpoints kept (the oldest are deleted)")
    dataloader_num_workers: int = option(4, "training", "data-loader processes")
    allow_config_change: bool = option(False, "training", "resume even if the checkpoint was trained with another "
                                       "config (fields that do not change training never block a resume)")

    # Speed: "auto" is chosen from the hardware at start and logged with its reason (finetune/plan.py).
    gradient_checkpointing: bool = option(True, "speed", "recompute activations in the backward pass (see "
                                          "checkpointed_layers)")
    checkpointed_layers: int | str | None = option("auto", "speed", "how many decoder layers recompute (the first "
                                                   "N): a number, none (every layer) or 'auto' (the fewest the "
                                                   "GPU's memory allows)")
    merge_micro_batches: bool | str = option("auto", "speed", "run each optimizer step's rows (per_device_train_"
                                             "batch_size x gradient_accumulation_steps) in the micro-batches that "
                                             "cost least, the same update: 'auto' (or true) merges them while every "
                                             "layer's activations fit, and with checkpointed_layers 'auto' splits "
                                             "them where that saves more recompute than the passes it adds; false "
                                             "keeps them as given")
    max_memory_gib: float | None = option(None, "speed", "cap for the memory 'auto' plans with, in GiB (e.g. 70 to "
                                          "plan on a 141 GB card what fits an 80 GB one); none = what is free")
    accumulate_in_matmul: bool | str = option("auto", "speed", "add each micro-batch's weight gradients inside the "
                                              "decoder layers' weight-gradient matmuls, not in a pass of their own: "
                                              "true, false or 'auto' (on where a step runs several micro-batches on "
                                              "one GPU, full fine-tuning without FP8; finetune/grad_accumulation.py)")
    compile_layers: bool | str = option("auto", "speed", "torch.compile each decoder layer (one graph for all): "
                                        "true, false or 'auto' (on with a CUDA GPU and Triton)")
    fp8: str | None = option("auto", "speed", "FP8 matmuls in the decoder layers (torchao): a recipe name such as "
                             "'tensorwise_pow2_scales', none, or 'auto' (on GPUs with FP8 tensor cores once the "
                             "recipe's learning is checked at the 7B shape)")
    use_liger_kernel: bool | str = option("auto", "speed", "Liger's fused kernels: true, false or 'auto' (training: "
                                          "off when layers are compiled; evaluation: on with a GPU and liger-kernel)")
    share_opening: bool = option(True, "speed", "packed training runs the prompt's opening (system turn and "
                                 "instruction, the same in every article) once per micro-batch, every article "
                                 "attending to it: the same loss and gradients, run on 41 fewer tokens of an AG "
                                 "News article's ~103 (finetune/opening.py); needs packing and the 'varlen' "
                                 "attention")
    last_layer_where_read: bool = option(True, "speed", "the last decoder layer's MLP only on the rows whose logits "
                                         "are read: the answer tokens in packed training, each article's tail in "
                                         "label scoring; the same loss, gradients and scores for fewer FLOPs "
                                         "(finetune/last_layer.py)")
    attn_implementation: str = option("auto", "speed", "'auto' (training: the exact varlen kernel, or FlashAttention-2 "
                                      "where installed and the opening is not shared; evaluation: the varlen one; "
                                      "finetune/attention.py)")

    # Evaluation.
    eval_batch_size: int | str = option("auto", "evaluation", "articles per batch, or 'auto' (from the GPU's free "
                                        "memory, at most 512)")
    max_new_tokens: int | None = option(None, "evaluation", "generation's token budget; none = the longest trained "
                                        "answer plus room for an instruct model's own style (16 for Qwen2.5)")

    # Output.
    checkpoints_dir: str = option("checkpoints", "output", "where runs keep checkpoints and final models")
    results_dir: str = option("results", "output", "where results JSON files and PNGs go")

    @property
    def output_dir(self) -> Path:
        return Path(self.checkpoints_dir) / self.run_name

    @property
    def final_dir(self) -> Path:
        return self.output_dir / "final"

    @property
    def shares_opening(self) -> bool:
        """Whether training runs the opening once per micro-batch: only packed rows have one to share."""
        return self.share_opening and self.packing

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The speed settings of the bf16 reference: every layer recomputed, plain eager layers, no FP8, 16-bit moments, every
# article with its own opening, the whole last layer.
REFERENCE_SPEED = dict(compile_layers=False, fp8=None, optimizer="adamw_bf16_sr", per_device_train_batch_size=8,
                       gradient_accumulation_steps=4, checkpointed_layers=None, use_liger_kernel=False,
                       merge_micro_batches=False, accumulate_in_matmul=False, share_opening=False,
                       last_layer_where_read=False)

PROFILES: dict[str, dict] = {
    "qwen2.5-7b": {},
    # The same recipe without any speed-up: the yardstick the speed-ups are measured against.
    "qwen2.5-7b-reference": dict(run_name="qwen7b-ag-news-reference", **REFERENCE_SPEED, eval_batch_size=64),
    # The exact Qwen2.5-7B-Instruct shape with random weights and the real tokenizer rebuilt offline: for GPU
    # throughput and memory benchmarks where the weights cannot be downloaded.
    "qwen2.5-7b-shape": dict(
        run_name="qwen7b-shape", model="scratch", tokenizer="qwen2.5", vocab_size=152064, hidden_size=3584,
        intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4, tie_word_embeddings=False,
    ),
    # 2.4M parameters (1.6M of them the tied 8K-token embedding): learns AG News from scratch on 2 CPU cores in
    # minutes. Whole-word tokens and weight decay matter more here than depth or width.
    "tiny": dict(
        run_name="tiny-ag-news", model="scratch", tokenizer="bpe", vocab_size=8192, hidden_size=192,
        intermediate_size=512, num_layers=2, num_heads=6, num_kv_heads=2, learning_rate=1e-3, num_train_epochs=4.0,
        per_device_train_batch_size=16, gradient_accumulation_steps=1, max_length=256, warmup_steps=0.05,
        lr_scheduler_type="cosine", weight_decay=0.1, gradient_checkpointing=False, bf16=False, optimizer="adamw",
        compile_layers=False, fp8=None, use_liger_kernel=False, checkpointed_layers=None, merge_micro_batches=False,
        accumulate_in_matmul=False,
        logging_steps=20, save_steps=250, dataloader_num_workers=0, eval_batch_size=128,
        # The holdout carve's sizes, so that without $AG_NEWS_DIR the hub's 120,000 training articles do not turn
        # minutes into an hour. Results notes say when a cap bites; `max_train_samples=None` (an override, or
        # `--max_train_samples none`) lifts it.
        max_train_samples=6000, max_eval_samples=1600,
        # LoRA: chosen on a carve of the training articles, never the evaluation ones (make tiny-lora-carve; scores in
        # results/methods/carve/lora_carve.json). Two thirds of this model's weights are its 8K-token embedding: with
        # it frozen the projections' adapters trail full fine-tuning (also with rank 64 or no dropout); an adapter on
        # the embedding beside them, with the five RMSNorms (960 weights) trained whole, scores level with it there.
        lora_learning_rate=3e-3, lora_dropout=0.05, lora_modules_to_save="norm", lora_embedding=True,
    ),
}


def launched_processes() -> int:
    """The processes `accelerate launch` (torchrun) started for this run, each with this code; 1 under plain python."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def get_config(profile: str = "tiny", **overrides) -> RunConfig:
    """The profile's config with `overrides` applied; unknown names fail loudly rather than being ignored."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {sorted(PROFILES)}")
    known = {f.name for f in fields(RunConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown config field(s) {sorted(unknown)}")
    return RunConfig(**{**PROFILES[profile], "profile": profile, **overrides})


def command_parser() -> argparse.ArgumentParser:
    """A command's own flags (`--model_path`, `--name`, ...), for `config_from_args(command=...)`. No abbreviations:
    with them `--model` would be taken for `--model_path`; no help of its own: the config's `--help` lists its flags."""
    return argparse.ArgumentParser(add_help=False, allow_abbrev=False)


def overrides_from_args(argv: list[str] | None = None, description: str = "",
                        command: argparse.ArgumentParser | None = None) -> tuple[str, dict]:
    """`--profile tiny --learning_rate 1e-3 ...`: the profile and the fields given, each typed as the field is. Without
    --profile, the real experiment's recipe (`make demo` and the tests name `tiny`). `command`'s flags are parsed
    beside them, so that --help lists them and a flag neither knows is an error; they are the command's, not fields,
    whatever their names (the benchmark's --warmup_steps counts its untimed steps, not the learning rate's)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[command] if command else [], allow_abbrev=False)
    parser.add_argument("--profile", default="qwen2.5-7b", choices=sorted(PROFILES),
                        help="named set of defaults; every flag below overrides one of its fields "
                             "(default: %(default)s)")
    groups = {name: parser.add_argument_group(f"{name} options") for name in GROUPS}
    for f in fields(RunConfig):
        if f.name == "profile":
            continue
        try:
            groups[f.metadata["group"]].add_argument(
                f"--{f.name}", type=_caster(f.type), default=argparse.SUPPRESS, metavar=_metavar(f.type),
                help=f"{f.metadata['help']} (recipe default: {f.default})")
        except argparse.ArgumentError:  # the command's own flag of that name (the benchmark's --warmup_steps)
            continue
    args = vars(parser.parse_args(argv))
    own = vars(command.parse_known_args(argv)[0]) if command else {}
    return args.pop("profile"), {name: value for name, value in args.items()
                                 if name in RunConfig.__dataclass_fields__ and name not in own}


def config_from_args(argv: list[str] | None = None, description: str = "",
                     command: argparse.ArgumentParser | None = None) -> RunConfig:
    """The profile's config with every field given on the command line applied."""
    profile, overrides = overrides_from_args(argv, description, command)
    return get_config(profile, **overrides)


def command_from_args(command: argparse.ArgumentParser, argv: list[str] | None = None,
                      description: str = "") -> tuple[RunConfig, argparse.Namespace]:
    """A command's run config and its own flags (`command_parser`), from one command line."""
    return config_from_args(argv, description, command), command.parse_known_args(argv)[0]


def _metavar(field_type) -> str:
    types = typing.get_args(field_type) or (field_type,)
    return "|".join("none" if t is type(None) else "auto" if t is str and _auto_only(types) else t.__name__.upper()
                    for t in types)


def _auto_only(types: tuple) -> bool:
    """Beside a bool or a number, the one text a field takes is "auto" (compile_layers, eval_batch_size, ...)."""
    return str in types and len(set(types) - {type(None)}) > 1


def _caster(field_type):
    types = typing.get_args(field_type) or (field_type,)

    def cast(text: str):
        if text.lower() == "none" and type(None) in types:
            return None
        if bool in types and text.lower() in ("true", "false", "1", "0"):
            return text.lower() in ("true", "1")
        for base in (t for t in types if t not in (type(None), bool)):  # int | str takes 16 and auto
            if base is str and _auto_only(types) and text != "auto":
                continue
            try:
                return base(text)
            except ValueError:
                continue
        expected = _metavar(field_type).lower().replace("bool", "true or false").replace("|", " or ")
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")

    cast.__name__ = getattr(field_type, "__name__", str(field_type))  # argparse names the type in its errors
    return cast
