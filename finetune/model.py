"""Tokenizer and model loading for every profile: a hub id, a local folder, or a small Qwen2 built from scratch."""

import hashlib
import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config

from data_prep.task import LABELS, SYSTEM_PROMPT, USER_TEMPLATE, format_answer
from finetune.adapters import is_adapter, quantization_config, with_adapter
from finetune.attention import choose_inference_attn_implementation
from finetune.config import RunConfig
from finetune.last_layer import mlp_only_where_read
from finetune.plan import GPU, plan_evaluation
from finetune.sources import TOKENIZER_FILES, ModelShape, check_source
from finetune.qwen_tokenizer import CHAT_TEMPLATE, build_qwen25_tokenizer
from finetune.residual_adds import adds_in_matmuls
from finetune.speedups import compile_decoder_layers, weights_dtype

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # Qwen's ChatML markers, same strings and roles


def load_tokenizer(config: RunConfig, train_texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    """The run's tokenizer. "bpe" needs the training texts (it is trained on them, then cached)."""
    cache = Path(config.checkpoints_dir) / "tokenizers"
    if config.tokenizer == "bpe":
        if train_texts is None:
            raise ValueError("tokenizer='bpe' is trained on the training texts: pass train_texts")
        return train_bpe_tokenizer(train_texts, config.vocab_size, cache)
    if config.tokenizer == "qwen2.5":
        return build_qwen25_tokenizer(cache)
    if not config.tokenizer and config.model == "scratch":
        raise ValueError("a scratch model has no tokenizer of its own: choose --tokenizer bpe (trained on the "
                         "articles) or qwen2.5 (Qwen's, built offline), or a folder or hub id")
    if config.tokenizer:
        check_source(config.tokenizer, "tokenizer", TOKENIZER_FILES)
    return AutoTokenizer.from_pretrained(config.tokenizer or config.model)


def train_bpe_tokenizer(texts: list[str], vocab_size: int, cache_dir: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE with Qwen's ChatML tokens and chat template, so the tiny model shares the 7B code path."""
    digest = hashlib.sha1("\n".join(texts).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"bpe-{vocab_size}-{digest}"
    if (path / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(path)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # The prompt strings and answers go in too, so the constant parts of every example tokenize compactly.
    tokenizer.train_from_iterator(texts + task_strings(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:], chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(path)
    log.info("trained a %d-token BPE tokenizer on %d texts -> %s", len(fast), len(texts), path)
    return fast


def task_strings() -> list[str]:
    """The constant parts of every example, the prompt strings and the four answers (no article, no pairing), a
    hundred times over: as often as the words every article shares, so that a tokenizer or a base model trained on
    the articles learns them too."""
    return ([SYSTEM_PROMPT, USER_TEMPLATE] + [format_answer(label) for label in LABELS]) * 100


def load_model(config: RunConfig, tokenizer: PreTrainedTokenizerFast, attn_implementation: str = "sdpa",
               path: str | Path | None = None) -> torch.nn.Module:
    """The model at `path` (e.g. a fine-tuned checkpoint), else the config's model: hub id, folder or "scratch".
    With method="qlora" its linear weights are loaded in 4-bit NF4, on the GPU."""
    dtype = weights_dtype(config)
    source = str(path or config.model)
    quantization = quantization_config(config)
    device_map = {"": torch.cuda.current_device()} if quantization else None  # bitsandbytes quantizes as it loads
    if source != "scratch":
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation,
                                                    quantization_config=quantization, device_map=device_map)
    torch.manual_seed(config.seed)  # the same untrained model for the base evaluation and for training
    model_config = Qwen2Config(
        vocab_size=max(len(tokenizer), config.vocab_size), hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=max(config.max_length, 1024), tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, use_cache=False,
    )
    # Built where it will run: a 7B-shape model initialised on the CPU would take minutes and 30 GB of RAM.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype, attn_implementation=attn_implementation)
    log.info("built a scratch Qwen2 model with %.2fM parameters", model.num_parameters() / 1e6)
    if quantization:  # the random weights go through the same quantizing load as a checkpoint's, from memory
        model_class, state_dict = type(model), model.state_dict()
        del model
        model = model_class.from_pretrained(None, config=model_config, state_dict=state_dict, dtype=dtype,
                                            attn_implementation=attn_implementation,
                                            quantization_config=quantization, device_map=device_map)
        del state_dict
        torch.cuda.empty_cache()
        model.name_or_path = model.config.name_or_path = ""  # from memory, like from_config: no folder or hub id
    return model


def check_tokenizer_fits(tokenizer: PreTrainedTokenizerFast, model: torch.nn.Module) -> None:
    """Refuse a tokenizer whose ids do not mean what the model's embedding learned: more ids than it has rows, or its
    end/padding/start tokens at other ids than the model's config names (e.g. a BPE trained here fed to Qwen's
    weights, whose ids would all land on unrelated rows)."""
    rows = model.get_input_embeddings().num_embeddings
    model_name = model.config.name_or_path or "the scratch model"
    tokenizer_name = tokenizer.name_or_path or "the tokenizer"
    fix = "use the model's own tokenizer (--tokenizer none) or a model built for this one"
    if len(tokenizer) > rows:
        raise ValueError(f"{tokenizer_name} has {len(tokenizer)} tokens but {model_name}'s embedding has {rows} rows: "
                         f"{fix}")
    for role in ("eos", "pad", "bos"):
        ours, theirs = getattr(tokenizer, f"{role}_token_id"), getattr(model.config, f"{role}_token_id", None)
        if ours is None or theirs is None:
            continue
        if ours not in (theirs if isinstance(theirs, list) else [theirs]):
            raise ValueError(f"{tokenizer_name} puts its {role} token {getattr(tokenizer, f'{role}_token')!r} at id "
                             f"{ours}, but {model_name}'s config says {role}_token_id={theirs}: they do not share a "
                             f"vocabulary; {fix}")


def load_for_inference(config: RunConfig, tokenizer: PreTrainedTokenizerFast,
                       path: str | Path | None = None) -> torch.nn.Module:
    """The model for evaluation: the suite's attention for padded batches (`choose_inference_attn_implementation`), on
    the GPU where there is one, in eval mode, and with Liger's kernels or compiled decoder layers (inductor fuses the
    same norms, RoPE and SwiGLU) when the config asks for them, as for the last layer's MLP only where scoring reads
    (`finetune.last_layer`). A LoRA adapter at `path` is loaded onto the config's model and merged into it; a QLoRA
    adapter stays beside its 4-bit base."""
    if "auto" in (config.use_liger_kernel, config.compile_layers, config.eval_batch_size):  # evaluate() planned already
        config, _ = plan_evaluation(config, GPU.current(), ModelShape.of(config, path))
    adapter = is_adapter(path)
    model = load_model(config, tokenizer, choose_inference_attn_implementation(config.attn_implementation),
                       path=None if adapter else path)
    if adapter:
        model = with_adapter(model, path, merge=config.method != "qlora")
    if not quantization_config(config):  # a 4-bit model is loaded onto the GPU already, and cannot be moved
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    model.eval()
    if config.last_layer_where_read:  # before any compilation
        mlp_only_where_read(model)
    speed_up_for_inference(model, config.use_liger_kernel, config.compile_layers)
    return model


def speed_up_for_inference(model: torch.nn.Module, use_liger_kernel: bool, compile_layers: bool) -> None:
    """Liger's kernels when asked for, then compiled decoder layers or, where the layers run eagerly, their residual
    adds inside the matmuls (`finetune.residual_adds`): at load, or (the eval benchmark) after the plain anchors have
    run on the model as built."""
    if use_liger_kernel:
        apply_liger_kernels(model)
    if compile_layers:
        compile_decoder_layers(model)
    else:
        adds_in_matmuls(model)


def apply_liger_kernels(model: torch.nn.Module) -> None:
    """Liger's fused RMSNorm, RoPE and SwiGLU kernels in this Qwen2 model, for inference (training gets them, plus the
    fused loss, from TRL's `use_liger_kernel`). Unfused, these elementwise ops take a large share of label scoring's
    GPU time (`label_scoring_profile` in results/benchmarks/). Liger swaps RoPE for every Qwen2 model in the process,
    which is why benchmarks run it last."""
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2
    except ImportError as e:
        raise ImportError("use_liger_kernel=True needs liger-kernel and a GPU: pip install -e '.[gpu]', or run with "
                          "--use_liger_kernel false") from e

    apply_liger_kernel_to_qwen2(model=model, fused_linear_cross_entropy=False)  # evaluation needs the logits
