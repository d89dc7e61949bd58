"""One dataclass per run, with named profiles. Notebook parameters and CLI flags override its fields.

The defaults are the reference experiment (Qwen2.5-7B-Instruct, full fine-tuning); the `tiny` profile changes only
what a laptop CPU needs changed.
"""

import argparse
import dataclasses
import typing
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass
class RunConfig:
    profile: str = "qwen2.5-7b"
    run_name: str = "qwen7b-ag-news-full"

    # Model: a hub id or local folder, or "scratch" for a Qwen2-architecture model built from the shape below.
    model: str = "Qwen/Qwen2.5-7B-Instruct"
    # Tokenizer: None = the model's own; "bpe" = byte-level BPE trained on the training texts (cached under
    # checkpoints/); "qwen2.5" = Qwen2.5's exact tokenizer rebuilt offline; or a hub id / local folder.
    tokenizer: str | None = None
    # "bpe" trains this many tokens; a scratch model has max(len(tokenizer), vocab_size) rows, so the Qwen2.5 shape
    # keeps its padded 152,064 (the tokenizer has 151,665).
    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    tie_word_embeddings: bool = True

    # Data: data_dir, else $AG_NEWS_DIR, else the hub. Protocol "auto" picks "standard" when a train split exists.
    data_dir: str | None = None
    protocol: str = "auto"
    holdout_train_size: int = 6000
    # Seed of the holdout carve and the sample limits, apart from `seed` (initialisation, data order), so that a seed
    # sweep evaluates every run on the same articles.
    split_seed: int = 42
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    skip_bad_rows: bool = False

    # Training (the reference recipe).
    learning_rate: float = 2e-5
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 stops after this many optimizer steps (benchmarks, quick checks)
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 4
    max_length: int = 512
    warmup_steps: float = 0  # a float below 1 is a fraction of all training steps
    lr_scheduler_type: str = "linear"
    weight_decay: float = 0.0
    gradient_checkpointing: bool = True
    # Selective checkpointing: only the first N decoder layers recompute their activations in the backward pass; the
    # rest keep them (faster, more memory). None = every layer. "auto" = the fewest that fit the GPU's memory, capped
    # at max_memory_gib (finetune/speedups.py explains the estimate).
    checkpointed_layers: int | str | None = None
    # The memory "auto" may plan for, in GiB; None = all the GPU has. 70 keeps a setting chosen on a 141 GB H200
    # within an 80 GB card.
    max_memory_gib: float | None = None
    # torch.compile each decoder layer (regional compilation: one graph shared by every layer, compiled in seconds
    # rather than the whole model's minutes); the varlen attention compiles into the graph.
    compile_layers: bool = False
    # FP8 matmuls in the decoder layers' linear layers through torchao's float8 training: "rowwise" or "tensorwise"
    # scaling, None = bf16. Needs an FP8 GPU (H100, H200, L40S); best with compile_layers (it fuses the casts).
    fp8: str | None = None
    # Liger's fused RMSNorm, SwiGLU and RoPE kernels, in training (with its fused loss) and evaluation (GPU, needs
    # liger-kernel)
    use_liger_kernel: bool = False
    bf16: bool = True
    packing: bool = True
    attn_implementation: str = "auto"  # "auto": flash_attention_2 if installed, else exact varlen (see attention.py)
    # How the weights are updated (see README, "bf16 that really updates"):
    #   "adamw": AdamW in the weights' own dtype. With bf16 weights this is the reference, and at lr 2e-5 most
    #            updates round away (bf16 keeps 8 significant bits).
    #   "adamw_bf16_sr": bf16 weights updated with stochastic rounding (torchao): unbiased, no extra memory.
    #   "adamw8bit_bf16_sr": the same with its two moments in 8 bits (torchao's AdamW8bit): 6 bytes a parameter
    #            instead of 8, room for activations that would otherwise be recomputed.
    #   "adamw_fp32_master": fp32 weights and states under bf16 autocast: exact, 16 bytes a parameter.
    optimizer: str = "adamw_bf16_sr"
    # Which weights train (finetune/adapters.py): "full" every weight; "lora" low-rank adapters (peft) beside the
    # frozen weights; "qlora" the same over a 4-bit NF4 copy of the frozen weights (bitsandbytes, GPU only). Data,
    # loss, optimizer, resume and evaluation are the same for all three; adapters are saved alone, a few MB.
    method: str = "full"
    lora_rank: int = 16
    lora_alpha: int = 32  # the adapter's update is scaled by alpha / rank
    lora_dropout: float = 0.05
    # The learning rate of lora and qlora runs (full fine-tuning uses learning_rate): adapters start at zero and move
    # only a low-rank slice of each weight, so they take larger steps. 2e-4 is the QLoRA paper's rate for its 7B and
    # 13B models (Dettmers et al., 2023, appendix), ten times the full recipe's 2e-5; not measured on AG News here.
    lora_learning_rate: float = 2e-4
    # peft's "all-linear" is every linear projection of the decoder layers (not the LM head); or comma-separated module
    # names, e.g. "q_proj,v_proj".
    lora_target_modules: str = "all-linear"
    # Modules trained whole beside the adapters and saved with them (peft's modules_to_save), comma-separated; "norm"
    # is every RMSNorm. None = the adapters alone.
    lora_modules_to_save: str | None = None
    # A LoRA adapter on the input embedding too (peft's nn.Embedding adapter beside lora_target_modules): a low-rank
    # update of every token's input vector, vocab x rank + rank x hidden weights (2.5M on Qwen2.5-7B at rank 16). The
    # LM head stays frozen: TRL's fused loss reads its weight directly. A head tied to the embedding is untied when the
    # adapter is merged, so the merged model is the one trained.
    lora_embedding: bool = False
    seed: int = 42
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 2
    dataloader_num_workers: int = 4
    # A resumed run must have the config its checkpoint was trained with, apart from the fields that do not change the
    # training (finetune.train.RESUME_FREE_FIELDS); True resumes anyway, with a warning naming what changed.
    allow_config_change: bool = False

    # Evaluation.
    eval_batch_size: int = 64
    # Generation's token budget. None = the longest trained answer in the tokenizer's tokens plus room for an instruct
    # model's own style, e.g. a code fence (finetune.predict.default_max_new_tokens: 16 for Qwen2.5).
    max_new_tokens: int | None = None

    # Where things go.
    checkpoints_dir: str = "checkpoints"
    results_dir: str = "results"

    @property
    def output_dir(self) -> Path:
        return Path(self.checkpoints_dir) / self.run_name

    @property
    def final_dir(self) -> Path:
        return self.output_dir / "final"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PROFILES: dict[str, dict] = {
    "qwen2.5-7b": {},
    # The same recipe with the fastest settings that learn what it learns (benchmark row 36: 69.9% MFU, 3.14x stock TRL
    # on one H200, results/benchmarks/README.md): compiled layers, FP8 at power-of-2 scales (within 2% of bf16's loss,
    # results/gpu/fp8/), 8-bit AdamW moments, the same 32 rows a step as 2 micro-batches of 16, and as few recomputed
    # layers as the card holds (none on a 141 GB H200: 67.7 GiB). Needs an FP8 GPU (H100, H200, L40S).
    "qwen2.5-7b-fast": dict(
        run_name="qwen7b-ag-news-fast", compile_layers=True, fp8="tensorwise_pow2_scales",
        optimizer="adamw8bit_bf16_sr", per_device_train_batch_size=16, gradient_accumulation_steps=2,
        checkpointed_layers="auto",
    ),
    # The exact Qwen2.5-7B-Instruct shape with random weights and the real tokenizer rebuilt offline: for GPU
    # throughput and memory benchmarks where the weights cannot be downloaded.
    "qwen2.5-7b-shape": dict(
        run_name="qwen7b-shape", model="scratch", tokenizer="qwen2.5", vocab_size=152064, hidden_size=3584,
        intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4, tie_word_embeddings=False,
    ),
    # 2.4M parameters (1.6M of them the tied 8K-token embedding): learns AG News from scratch on 2 CPU cores in
    # about three minutes. Whole-word tokens and weight decay matter more here than depth or width.
    "tiny": dict(
        run_name="tiny-ag-news", model="scratch", tokenizer="bpe", vocab_size=8192, hidden_size=192,
        intermediate_size=512, num_layers=2, num_heads=6, num_kv_heads=2, learning_rate=1e-3, num_train_epochs=4.0,
        per_device_train_batch_size=16, gradient_accumulation_steps=1, max_length=256, warmup_steps=0.05,
        lr_scheduler_type="cosine", weight_decay=0.1, gradient_checkpointing=False, bf16=False, optimizer="adamw",
        logging_steps=20, save_steps=250, dataloader_num_workers=0, eval_batch_size=128,
        # The holdout carve's sizes, so that without $AG_NEWS_DIR the hub's 120,000 training articles do not turn
        # minutes into an hour. Results notes say when a cap bites; `max_train_samples=None` (an override, or
        # `--max_train_samples none`) lifts it.
        max_train_samples=6000, max_eval_samples=1600,
        # LoRA: chosen on a carve of the training articles, never the evaluation ones (make tiny-lora-carve; scores in
        # results/methods/carve/lora_carve.json). Two thirds of this model's weights are its 8K-token embedding: with
        # it frozen the projections' adapters trail full fine-tuning (also with rank 64 or no dropout); an adapter on
        # the embedding beside them, with the five RMSNorms (960 weights) trained whole, scores level with it there.
        lora_learning_rate=3e-3, lora_modules_to_save="norm", lora_embedding=True,
    ),
}


def get_config(profile: str = "tiny", **overrides) -> RunConfig:
    """The profile's config with `overrides` applied; unknown names fail loudly rather than being ignored."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {sorted(PROFILES)}")
    known = {f.name for f in fields(RunConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown config field(s) {sorted(unknown)}")
    return RunConfig(**{**PROFILES[profile], "profile": profile, **overrides})


def overrides_from_args(argv: list[str] | None = None, description: str = "") -> tuple[str, dict]:
    """`--profile tiny --learning_rate 1e-3 ...`: the profile and the fields given, each typed as the field is."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="tiny", choices=sorted(PROFILES))
    for f in fields(RunConfig):
        if f.name != "profile":
            parser.add_argument(f"--{f.name}", type=_caster(f.type), default=argparse.SUPPRESS)
    args = vars(parser.parse_args(argv))
    return args.pop("profile"), args


def config_from_args(argv: list[str] | None = None, description: str = "") -> RunConfig:
    """The profile's config with every field given on the command line applied."""
    profile, overrides = overrides_from_args(argv, description)
    return get_config(profile, **overrides)


def _caster(field_type):
    types = typing.get_args(field_type) or (field_type,)

    def cast(text: str):
        if text.lower() == "none" and type(None) in types:
            return None
        if bool in types:
            if text.lower() not in ("true", "false", "1", "0"):
                raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
            return text.lower() in ("true", "1")
        for base in (t for t in types if t is not type(None)):  # the first type that reads it: int | str takes 16, auto
            try:
                return base(text)
            except ValueError:
                continue
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as {field_type}")

    cast.__name__ = getattr(field_type, "__name__", str(field_type))  # argparse names the type in its errors
    return cast
