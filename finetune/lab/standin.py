"""A stand-in for the `Qwen/Qwen2.5-7B-Instruct` hub snapshot: the same files, metadata and tokenizer, random weights.

    python -m finetune.lab.standin --shape tiny --out checkpoints/standin-tiny   # 20M parameters, for CPU tests
    python -m finetune.lab.standin --shape 7b   --out checkpoints/standin-7b     # the real size: 15 GB of safetensors

It lets the path a user with the real weights takes (`--model <folder>`: sharded `from_pretrained`, the checkpoint's
own tokenizer files and `generation_config.json`) run where the weights cannot be downloaded, and lets a user
rehearse the whole suite on their card before downloading 15 GB (`make rehearse`). Only the shape differs between
`tiny` and `7b`; nothing in the suite knows it is looking at a stand-in.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from finetune.disk import folder_bytes
from finetune.sources import ModelShape
from finetune.qwen_tokenizer import ADDED_TOKENS, CHAT_TEMPLATE, NON_SPECIAL_TOKENS, build_qwen25_tokenizer

HUB_ID = "Qwen/Qwen2.5-7B-Instruct"
# config.json as published, field for field.
PUBLISHED_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
}
# generation_config.json as published: sampling defaults that evaluation must not inherit.
PUBLISHED_GENERATION_CONFIG = {
    "bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "transformers_version": "4.37.0",
}
SHAPES = {
    "7b": {},
    # Two layers of width 64; the 152,064-row embedding and untied head stay, so token ids and logits are Qwen's.
    "tiny": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_window_layers": 2},
}
SHARDS = 4  # the hub snapshot's count: model-00001-of-00004.safetensors ...


def tokenizer_config() -> dict:
    """tokenizer_config.json as published (slow-tokenizer keys included: the hub file carries them)."""
    first_id = PUBLISHED_CONFIG["bos_token_id"]
    added = {str(first_id + i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False, "special": token not in NON_SPECIAL_TOKENS}
             for i, token in enumerate(ADDED_TOKENS)}
    return {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
            "additional_special_tokens": list(ADDED_TOKENS[1:14]), "bos_token": None, "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
            "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}


def write_tokenizer(out: Path, cache_dir: Path) -> None:
    """tokenizer.json from the offline Qwen2.5 tokenizer, plus the vocab.json and merges.txt the hub also ships."""
    tokenizer = build_qwen25_tokenizer(cache_dir)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    (out / "tokenizer.json").write_text(json.dumps(backend, ensure_ascii=False))
    (out / "vocab.json").write_text(json.dumps(backend["model"]["vocab"], ensure_ascii=False))
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in backend["model"]["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n")


def standin_shape(shape: str) -> ModelShape:
    """The stand-in's shape, before it is written."""
    c = {**PUBLISHED_CONFIG, **SHAPES[shape]}
    return ModelShape(c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"],
                      c["num_attention_heads"], c["num_key_value_heads"], c["tie_word_embeddings"])


def write_standin(out: str | Path, shape: str = "tiny", seed: int = 0,
                  cache_dir: str | Path = "checkpoints/tokenizers") -> Path:
    """Write the stand-in folder and return it. Weights are random (seeded) bf16, in four shards with their index."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {**PUBLISHED_CONFIG, **SHAPES[shape]}
    model_config = Qwen2Config(**{k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")})
    torch.manual_seed(seed)
    # Built where it will be saved from: a 7B model initialised on the CPU takes minutes.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.bfloat16)
    shard_bytes = math.ceil(sum(p.numel() * p.element_size() for p in model.parameters()) / SHARDS) + 2**20
    model.save_pretrained(out, max_shard_size=shard_bytes)
    del model
    # Give the weights' memory back to the device: left in this process's allocator cache, it is memory the notebooks
    # that `rehearse` runs next do not see free, and their plan recomputed 18 layers on an H100 where 7 fit
    # (results/rehearsal/h100/).
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    # save_pretrained writes today's config and generation-config formats; the snapshot has the published files.
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(PUBLISHED_GENERATION_CONFIG, indent=2) + "\n")
    write_tokenizer(out, Path(cache_dir))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--out", required=True, help="folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = write_standin(args.out, args.shape, args.seed)
    size = folder_bytes(out) / 1e9
    print(f"wrote a {args.shape} stand-in for {HUB_ID} to {out}/ ({size:.2f} GB, {time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
