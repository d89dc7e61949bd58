"""A tiny base model that knows something: the profile's scratch model first trained as a plain causal LM on the
training texts (and the task's fixed strings), so that LoRA has a base to adapt and full fine-tuning and LoRA can start
from the same one.

Only training-side articles are read (never the evaluation ones), and the model is cached under checkpoints/,
keyed by its inputs like the BPE tokenizer: the texts, the model's shape and the training recipe.

    python -m finetune.pretrain --profile tiny        # prints the folder; then e.g. finetune.train --model <folder>
"""

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

from datasets import Dataset
from transformers.trainer_utils import SaveStrategy

from finetune.attention import choose_attn_implementation
from finetune.config import RunConfig, config_from_args
from finetune.data import load_splits
from finetune.model import load_model, load_tokenizer, task_strings
from finetune.train import FusedHeadSFTTrainer, optimizer_cls_and_kwargs, sft_config

log = logging.getLogger(__name__)

# The fields that make the pretrained model what it is; anything else (run name, method, evaluation) does not.
PRETRAIN_FIELDS = ("model", "tokenizer", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                   "intermediate_size", "tie_word_embeddings", "learning_rate", "max_steps",
                   "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "warmup_steps",
                   "lr_scheduler_type", "weight_decay", "bf16", "optimizer", "seed")
# Every position is scored, so an epoch costs about two of fine-tuning's (whose loss is on the answer alone); four
# take about seven minutes on 2 CPU cores for the tiny profile's 6,000 articles. From a one-pass base LoRA could not
# learn to answer: its output distribution stayed near uniform, since it cannot rescale the frozen embeddings and
# norms that full fine-tuning grows (results/methods/ has the comparison from this base).
PRETRAIN_EPOCHS = 4.0


def pretrained_base(config: RunConfig) -> Path:
    """The folder of `config`'s model pretrained on its training texts with its own recipe (for PRETRAIN_EPOCHS),
    trained once, then cached. Its loss is on every token of the plain text (no chat template, no article's label)."""
    if config.model != "scratch":
        raise ValueError(f"pretraining starts from a scratch model, not {config.model!r}: use --model scratch with "
                         "a small shape (e.g. --profile tiny)")
    # The prompt strings and the four answers go in too, as they do into the BPE tokenizer: without them their
    # tokens keep their random embeddings, and LoRA, which cannot change embeddings, cannot learn to answer. They
    # carry no article and no pairing of an article with its label.
    articles = list(load_splits(config).train["text"])
    texts = articles + task_strings()
    inputs = {**{name: getattr(config, name) for name in PRETRAIN_FIELDS}, "epochs": PRETRAIN_EPOCHS}
    digest = hashlib.sha1((json.dumps(inputs, sort_keys=True) + "\n".join(texts)).encode()).hexdigest()[:12]
    path = Path(config.checkpoints_dir) / "pretrained" / f"{config.profile}-{digest}"
    if (path / "config.json").exists():
        return path
    config = dataclasses.replace(config, method="full", run_name=f"pretrain-{digest}", packing=True,
                                 num_train_epochs=PRETRAIN_EPOCHS)
    tokenizer = load_tokenizer(config, train_texts=articles)  # the fine-tuning run's tokenizer
    args = sft_config(config)
    args.completion_only_loss = False  # plain text: every token is trained
    args.save_strategy = SaveStrategy.NO  # minutes of CPU: a cut-off run starts again
    model = load_model(config, tokenizer, choose_attn_implementation(config.attn_implementation, config.packing))
    trainer = FusedHeadSFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                                  processing_class=tokenizer,
                                  optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(config, args))
    trainer.train()
    trainer.save_model(path)
    (path / "pretrain_inputs.json").write_text(json.dumps({**inputs, "articles": len(articles)}, indent=2) + "\n")
    log.info("pretrained %s on %d training articles -> %s", config.model, len(articles), path)
    return path


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(pretrained_base(config_from_args(argv, description=__doc__)))


if __name__ == "__main__":
    main()
