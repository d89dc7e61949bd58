"""Training: answer-only loss inside packed rows, a short run whose loss falls, and the saved model loading back."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_prep.config import LABELS, format_answer
from finetune.config import get_config
from finetune.train import build_trainer, train


def test_label_mask_covers_exactly_each_packed_answer(tiny_config):
    trainer = build_trainer(tiny_config)
    tokenizer = trainer.processing_class
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # padding-free packed row
    ids, labels, cu = batch["input_ids"][0], batch["labels"][0], batch["cu_seq_lens_q"].tolist()
    answers = {format_answer(label) + "<|im_end|>\n" for label in LABELS}
    articles = 0
    for start, end in zip(cu[:-1], cu[1:]):
        text = tokenizer.decode(ids[start:end])
        if not text.startswith("<|im_start|>system"):
            continue  # padding at the end of the row
        articles += 1
        trained = labels[start:end] != -100
        answer = tokenizer.decode(ids[start:end][trained])
        assert answer in answers, answer
        # The trained tokens are one contiguous run at the end of the article: nothing from the prompt.
        first = int(trained.nonzero()[0])
        assert trained[first:].all() and not trained[:first].any()
        assert text.endswith("<|im_start|>assistant\n" + answer)
        assert (labels[start:end][trained] == ids[start:end][trained]).all()
    assert articles >= 3


def test_short_training_run_lowers_the_loss_and_saves_a_loadable_model(tiny_config):
    final = train(tiny_config)
    summary = json.loads((final / "train_summary.json").read_text())
    losses = [h["loss"] for h in summary["log_history"] if "loss" in h]
    assert len(losses) >= 3 and losses[-1] < losses[0] / 2
    assert summary["data"]["protocol"] == "holdout" and summary["config"]["profile"] == "tiny"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.vocab_size == len(tokenizer)
    assert (final / "model.safetensors").exists()
    assert list((tiny_config.output_dir / "runs").rglob("events.out.tfevents.*"))


def test_profiles_differ_only_where_the_tiny_run_needs_it():
    reference, tiny = get_config("qwen2.5-7b"), get_config("tiny")
    assert (reference.model, reference.learning_rate, reference.num_train_epochs) == ("Qwen/Qwen2.5-7B-Instruct", 2e-5, 1.0)
    assert (reference.per_device_train_batch_size, reference.gradient_accumulation_steps) == (8, 4)
    assert (reference.max_length, reference.gradient_checkpointing, reference.bf16, reference.packing) == (
        512, True, True, True)
    assert tiny.model == "scratch" and tiny.tokenizer == "bpe" and not tiny.bf16
    assert torch.cuda.is_available() or tiny.dataloader_num_workers == 0
