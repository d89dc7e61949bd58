"""LoRA and QLoRA: the peft adapter a run trains, the 4-bit NF4 quantization QLoRA loads its frozen weights in, and
loading a saved adapter onto its base model.

The method is one config field (`method`: full, lora, qlora). TRL's SFTTrainer wraps the model with the adapter
(`peft_config`), so packing, the answer-only loss, the optimizers, resume and TensorBoard are the full recipe's own.
"""

import functools
from pathlib import Path

import torch

from finetune.config import RunConfig

METHODS = ("full", "lora", "qlora")


def check_method(config: RunConfig) -> None:
    """Fail before anything loads: an unknown method, or QLoRA where it cannot run (bitsandbytes' 4-bit kernels need
    a CUDA GPU, and the package is the `gpu` extra, not part of the CPU install)."""
    if config.method not in METHODS:
        raise ValueError(f"unknown method {config.method!r}; choose from {METHODS}")
    if config.method != "qlora":
        return
    if not torch.cuda.is_available():
        raise RuntimeError("method='qlora' quantizes the frozen weights with bitsandbytes' 4-bit CUDA kernels: it "
                           "needs a GPU. On the CPU use --method lora.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError("method='qlora' needs bitsandbytes: pip install -e '.[gpu]' (or pip install bitsandbytes), "
                          "or use --method lora") from e


def lora_config(config: RunConfig, model: torch.nn.Module | None = None):
    """The peft LoraConfig for a lora or qlora run; None for full fine-tuning. `lora_embedding` needs the `model`, to
    name its layers."""
    check_method(config)
    if config.method == "full":
        return None
    from peft import LoraConfig  # imported here: a full fine-tuning run does not need peft

    targets, saved = config.lora_target_modules, config.lora_modules_to_save
    targets = targets if targets == "all-linear" else targets.split(",")
    if config.lora_embedding:
        if model is None:
            raise ValueError("lora_embedding=True names the model's embedding layer: pass the model to lora_config")
        targets = [*(linear_layer_names(model) if targets == "all-linear" else targets),
                   layer_name(model, model.get_input_embeddings())]
    return LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, modules_to_save=saved.split(",") if saved else None,
                      task_type="CAUSAL_LM")


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """What peft's "all-linear" adapts, by name: every linear layer but the LM head. peft takes that shorthand only
    alone, so beside the embedding it is spelled out."""
    head = model.get_output_embeddings()
    return sorted({layer_name(model, m) for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head})


def layer_name(model: torch.nn.Module, layer: torch.nn.Module) -> str:
    """The last part of `layer`'s name in `model` (q_proj, embed_tokens), as peft matches target modules."""
    return next(name for name, m in model.named_modules() if m is layer).rsplit(".", 1)[-1]


def quantization_config(config: RunConfig):
    """QLoRA's frozen weights: 4-bit NF4 with double quantization (the scales quantized too), bf16 compute, as in the
    QLoRA paper. None for the other methods."""
    check_method(config)
    if config.method != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def adapters_in_weights_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The LoRA matrices in the frozen weights' dtype. peft makes them fp32 whatever the weights are (for low-bit
    bases), and each adapted layer then casts its input to fp32 on every call: on the 7B shape that is a copy of every
    projection's input, the 18,944-wide one included, in the forward, the recompute and the backward. The optimizer
    option then applies as in full fine-tuning: bf16 with stochastic rounding (unbiased), or fp32 master weights."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapters in (module.lora_A, module.lora_B, module.lora_embedding_A, module.lora_embedding_B):
                adapters.to(dtype)


def adapter_alone_in_saves(model: torch.nn.Module) -> None:
    """Checkpoints and final/ hold the adapter alone, with an embedding adapter too. peft then also saves the whole
    base embedding by default (it assumes the vocabulary was resized; here it never is): 6 MB on the tiny model, a GB
    on the 7B, in every checkpoint. The Trainer calls save_pretrained without that option, so it is bound here."""
    model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)


def is_adapter(path: str | Path | None) -> bool:
    """Whether `path` holds a peft adapter (a lora or qlora run's final/ or checkpoint) rather than a whole model."""
    return path is not None and (Path(path) / "adapter_config.json").exists()


def with_adapter(base: torch.nn.Module, path: str | Path, merge: bool) -> torch.nn.Module:
    """`base` with the adapter at `path` applied; `merge` folds it into the weights (a plain transformers model, as
    fast as the base), which a 4-bit base cannot take. An adapter trained on another base is an error: it would load
    without complaint and predict nonsense."""
    from peft import PeftConfig, PeftModel

    adapter = PeftConfig.from_pretrained(str(path))
    trained_on, given = adapter.base_model_name_or_path or "", base.name_or_path
    if trained_on and given and Path(trained_on).resolve() != Path(given).resolve():
        raise ValueError(f"{path} is an adapter for {trained_on}, not for {given}: set model to {trained_on} "
                         f"(--model {trained_on})")
    if merge and adapts_tied_embedding(base, adapter.target_modules):
        untie_lm_head(base)
    model = PeftModel.from_pretrained(base, str(path))
    return model.merge_and_unload() if merge else model


def adapts_tied_embedding(model: torch.nn.Module, targets: str | list[str]) -> bool:
    """Whether an adapter on `targets` (peft's target_modules) changes an embedding that `model`'s LM head shares."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is not embedding.weight:
        return False
    name = layer_name(model, embedding)
    return any(target.rsplit(".", 1)[-1] == name for target in ([targets] if isinstance(targets, str) else targets))


def untie_lm_head(model: torch.nn.Module) -> None:
    """The LM head as a copy of the embedding rather than the same weight. An embedding adapter trained the input
    vectors alone (the LM head stayed frozen), and merging it into a weight the head shares would change the output
    layer too: peft warns of this and advises merging after cloning the weights."""
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    model.config.tie_word_embeddings = False
    model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)  # no longer tied
