"""Where a run's model and tokenizer come from, checked before anything loads, and the model's shape read from
there (what the memory plan of `finetune.plan` counts)."""

from dataclasses import dataclass
from pathlib import Path

from finetune.config import RunConfig


class SourceNotFound(ValueError):
    """A model, adapter or tokenizer argument that names no such folder here and cannot be a hub id."""


MODEL_FILES = ("config.json", "adapter_config.json")  # a model's folder (save_pretrained, `hf download`); an adapter's
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def check_source(source: str | Path, what: str, files: tuple[str, ...] = MODEL_FILES) -> None:
    """Fail at once where `source` cannot be what `what` names: a folder with none of `files`, or a path to no
    folder. transformers would take such a path for a hub id and fail later, on the repo id's form or on the network,
    without saying that the folder is missing. A name of the hub's form (owner/name) whose owner is no folder here is
    left to the hub; "scratch", the model built here, needs no check."""
    if source == "scratch":
        return
    path = Path(source).expanduser()
    if path.is_dir():
        if not any((path / name).exists() for name in files):
            raise SourceNotFound(f"{what} {source}: the folder holds no {' or '.join(files)}")
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(str(source))
        hub_form = not (path.parent != Path(".") and path.parent.is_dir())
    except HFValidationError:
        hub_form = False
    if not hub_form:
        raise SourceNotFound(f"{what} {source}: no such folder, and not a hub id such as Qwen/Qwen2.5-7B-Instruct")


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool

    @classmethod
    def of(cls, config: RunConfig, path: str | Path | None = None) -> "ModelShape":
        """The shape of the model at `path` (a trained folder with its config.json) or of the run's model: the
        scratch fields, or the checkpoint's config.json (a hub id or folder). An adapter folder has the base's shape.
        The first reader of both in training and evaluation, so it checks them (`check_source`)."""
        if path is not None:
            check_source(path, "model_path")
        check_source(config.model, "model")
        if path is not None and (Path(path) / "config.json").exists():
            source = str(path)
        elif config.model == "scratch":
            return cls(config.hidden_size, config.intermediate_size, config.num_layers, config.vocab_size,
                       config.num_heads, config.num_kv_heads, config.tie_word_embeddings)
        else:
            source = config.model
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(source)
        return cls(c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size, c.num_attention_heads,
                   c.num_key_value_heads, c.tie_word_embeddings)

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.hidden // self.heads

    @property
    def linear_parameters(self) -> int:
        """The decoder layers' projections: q, k, v, o and the SwiGLU's three."""
        per_layer = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_width + 3 * self.hidden * self.intermediate
        return self.layers * per_layer

    @property
    def parameters(self) -> int:
        return self.linear_parameters + self.vocab * self.hidden * (1 if self.tied else 2)

    def adapter_parameters(self, rank: int) -> int:
        """LoRA on every decoder projection (peft's all-linear; an upper bound for fewer targets)."""
        h, kv, i = self.hidden, self.kv_width, self.intermediate
        return self.layers * rank * (2 * (h + h) + 2 * (h + kv) + 2 * (h + i) + (i + h))
