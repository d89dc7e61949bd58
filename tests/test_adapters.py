"""LoRA and QLoRA: one switch in the run config; the adapter trains alone, is saved small, resumes, is evaluated on
its base, and merges into a standalone model. QLoRA's own path runs on the GPU; elsewhere it fails early."""

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch
from scipy.special import softmax
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_prep.splits import make_splits
from finetune.adapters import is_adapter, with_adapter
from finetune.attention import VARLEN
from finetune.data import load_splits
from finetune.evaluate import evaluate
from finetune.lab import bench
from finetune.lab import lora_carve
from finetune.lab.answer_loss import answer_token_losses
from finetune.lab.lora_carve import parse_candidate
from finetune.lab.methods import benchmark_method_rows, methods_section
from finetune.lab.measurements import RECIPE_ROW
from finetune.merge import merge_adapter
from finetune.results import PROJECT_DIR
from finetune.model import load_for_inference, load_model
from finetune.predict import score_labels
from finetune.pretrain import pretrained_base
from finetune.train import build_trainer, sft_config, train
from tests.conftest import committed_benchmark
from tests.test_train import StopAt, _losses


@pytest.fixture
def lora_config(tiny_config):
    return dataclasses.replace(tiny_config, method="lora", lora_rank=4, lora_alpha=8, lora_learning_rate=5e-3,
                               num_train_epochs=1.0, max_train_samples=120, logging_steps=1, save_steps=5)


def test_lora_trains_only_adapters_on_every_linear_projection(lora_config):
    model = build_trainer(dataclasses.replace(lora_config, lora_modules_to_save=None, lora_embedding=False)).model
    assert model.config._attn_implementation == VARLEN  # packed articles stay apart under the adapters too
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    adapted = {name.split(".")[-4] for name in trainable}  # ...q_proj.lora_A.default.weight
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("optimizer, dtype", [("adamw", torch.bfloat16), ("adamw_fp32_master", torch.float32)])
def test_adapters_train_in_the_weights_dtype(lora_config, optimizer, dtype):
    """Not peft's fp32 beside bf16 weights (every adapted layer would cast its input to fp32 on every call)."""
    model = build_trainer(dataclasses.replace(lora_config, bf16=True, optimizer=optimizer, lora_embedding=True)).model
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {dtype}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {dtype}


def test_lora_trains_the_named_modules_whole_beside_the_adapters(lora_config):
    model = build_trainer(dataclasses.replace(lora_config, lora_modules_to_save="norm")).model
    whole = {name for name, p in model.named_parameters() if p.requires_grad and ".lora_" not in name}
    assert all(name.endswith("norm.modules_to_save.default.weight") for name in whole)
    assert len(whole) == 2 * lora_config.num_layers + 1  # each decoder layer's two RMSNorms and the final one


@pytest.mark.parametrize("tied", [True, False])
def test_lora_embedding_adapts_the_input_embedding_and_leaves_the_lm_head_frozen(lora_config, tied):
    """A low-rank update of every token's input vector beside the projections' adapters; the LM head (the same weight
    in the tiny model, its own in Qwen2.5-7B) gets none, since TRL's fused loss reads its weight directly."""
    config = dataclasses.replace(lora_config, lora_embedding=True, lora_modules_to_save=None, tie_word_embeddings=tied)
    model = build_trainer(config).model
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    embedding = {name: p for name, p in trainable.items() if ".lora_embedding_" in name}
    assert {name.split(".")[-3] for name in embedding} == {"embed_tokens"}
    assert sorted(p.numel() for p in embedding.values()) == sorted(
        [config.lora_rank * model.config.vocab_size, config.lora_rank * config.hidden_size])
    adapted = {name.split(".")[-4] for name in trainable.keys() - embedding.keys()}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    head = model.get_output_embeddings()
    assert type(head) is torch.nn.Linear and not head.weight.requires_grad


@pytest.mark.parametrize("tied", [True, False])
def test_fused_loss_with_an_embedding_adapter_is_the_models_own(lora_config, tied):
    """Our trainer's loss (TRL's fused LM head over the answer positions) against the model's own forward and loss:
    the same value and the same gradient for every adapter. No adapter dropout, so both passes see one model."""
    config = dataclasses.replace(lora_config, lora_embedding=True, lora_dropout=0.0, tie_word_embeddings=tied)
    trainer = build_trainer(config)
    model, batch = trainer.model, trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    results = []
    for loss_of in (lambda: trainer.compute_loss(model, dict(batch)), lambda: model(**batch).loss):
        model.zero_grad()
        loss = loss_of()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (fused, fused_grads), (own, own_grads) = results
    torch.testing.assert_close(fused, own)
    assert any(".lora_embedding_" in name and grad.abs().sum() > 0 for name, grad in fused_grads.items())
    for name, grad in own_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("tied", [True, False])
def test_embedding_adapter_is_saved_alone_and_merges_into_the_model_it_trained(lora_config, tmp_path, tied):
    """Merged (evaluation, finetune.merge) is the adapter as trained: with the LM head tied to the embedding, merging
    into the shared weight would change the output layer too, which training never did."""
    config = dataclasses.replace(lora_config, lora_embedding=True, tie_word_embeddings=tied)
    final = train(config)
    saved = load_file(final / "adapter_model.safetensors")
    assert not [name for name in saved if "base_layer" in name]  # not peft's copy of the whole embedding
    assert {name.split(".")[-2] for name in saved if "embed_tokens" in name} == {"embed_tokens"}
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = tokenizer("Striker goal league", return_tensors="pt")["input_ids"]
    trained = with_adapter(load_model(config, tokenizer), final, merge=False).eval()(ids).logits
    assert not torch.allclose(trained, load_model(config, tokenizer)(ids).logits, atol=1e-4)
    torch.testing.assert_close(load_for_inference(config, tokenizer, final)(ids).logits, trained, atol=1e-5, rtol=1e-5)
    standalone = AutoModelForCausalLM.from_pretrained(merge_adapter(config, final, tmp_path / "merged")).eval()
    torch.testing.assert_close(standalone(ids).logits, trained, atol=1e-5, rtol=1e-5)


def test_adapters_train_at_the_lora_learning_rate_and_full_fine_tuning_at_the_learning_rate(tiny_config):
    config = dataclasses.replace(tiny_config, learning_rate=1e-3, lora_learning_rate=7e-3)
    assert sft_config(config).learning_rate == 1e-3
    assert sft_config(dataclasses.replace(config, method="lora")).learning_rate == 7e-3
    assert sft_config(dataclasses.replace(config, method="qlora")).learning_rate == 7e-3


def test_lora_run_saves_an_adapter_that_evaluation_and_merge_put_on_its_base(lora_config, tmp_path):
    final = train(lora_config)
    assert is_adapter(final) and not (final / "model.safetensors").exists()
    losses = _losses(json.loads((final / "train_summary.json").read_text()))
    assert losses[-1] < losses[0]
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = tokenizer("Striker goal league", return_tensors="pt")["input_ids"]
    base_logits = load_model(lora_config, tokenizer)(ids).logits
    adapted_logits = load_for_inference(lora_config, tokenizer, final)(ids).logits
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-4)  # the adapter is applied
    merged = merge_adapter(lora_config, final, tmp_path / "merged")
    standalone = AutoModelForCausalLM.from_pretrained(merged).eval()
    torch.testing.assert_close(standalone(ids).logits, adapted_logits, atol=1e-4, rtol=1e-4)
    assert sum(f.stat().st_size for f in final.glob("*.safetensors")) < (merged / "model.safetensors").stat().st_size
    _assert_evaluation_scored_the_adapter(lora_config, final)
    merged_config = dataclasses.replace(lora_config, model=str(merged))  # another base than the adapter's
    adapter_config = json.loads((final / "adapter_config.json").read_text())
    (final / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": "some/base"}))
    with pytest.raises(ValueError, match=r"is an adapter for some/base, not for .*merged: set model to some/base"):
        load_for_inference(merged_config, tokenizer, final)


def _assert_evaluation_scored_the_adapter(config, final) -> None:
    """evaluate() on an adapter's folder gives the label probabilities of the adapter on its base (scored here
    directly, on the first articles), not those of the base alone."""
    record = evaluate(config, config.method, final, modes=("label_scoring",))
    evaluated = np.array(record["evaluations"]["label_scoring"]["label_probabilities"][:8])  # rounded to 4 decimals
    tokenizer, texts = AutoTokenizer.from_pretrained(final), list(load_splits(config).eval["text"])[:8]
    adapted, base = (softmax(score_labels(model, tokenizer, texts, config.eval_batch_size, config.max_length,
                                          progress=False).label_logprobs, axis=-1)
                     for model in (load_for_inference(config, tokenizer, final), load_for_inference(config, tokenizer)))
    np.testing.assert_allclose(evaluated, adapted, atol=1e-4)
    assert np.abs(evaluated - base).max() > 1e-3


@pytest.mark.slow  # the full run's resume test covers the mechanism in the fast set; this adds the adapter's state
def test_interrupted_lora_run_resumes_to_the_same_adapter_and_losses(lora_config, tmp_path):
    straight = train(dataclasses.replace(lora_config, checkpoints_dir=str(tmp_path / "straight")))
    interrupted = dataclasses.replace(lora_config, checkpoints_dir=str(tmp_path / "interrupted"))
    train(interrupted, callbacks=[StopAt(5)])
    assert (interrupted.output_dir / "checkpoint-5" / "adapter_model.safetensors").is_file()
    resumed = train(interrupted)
    summary = json.loads((resumed / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-5")
    expected = json.loads((straight / "train_summary.json").read_text())
    assert len(_losses(summary)) > 5 and _losses(summary) == pytest.approx(_losses(expected), rel=1e-4)
    want, got = load_file(straight / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert set(want) == set(got)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-4, msg=name)


def test_a_full_run_cannot_resume_as_lora(lora_config):
    full = dataclasses.replace(lora_config, method="full")
    train(full, callbacks=[StopAt(5)])
    with pytest.raises(ValueError, match=r"method 'full' -> 'lora'"):
        train(lora_config)


def test_unknown_method_is_a_clear_error(tiny_config):
    with pytest.raises(ValueError, match=r"unknown method 'adapter'; choose from \('full', 'lora', 'qlora'\)"):
        build_trainer(dataclasses.replace(tiny_config, method="adapter"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's error")
def test_qlora_on_the_cpu_fails_before_loading_anything_and_names_the_fix(tiny_config):
    with pytest.raises(RuntimeError, match="needs a GPU. On the CPU use --method lora"):
        build_trainer(dataclasses.replace(tiny_config, method="qlora", data_dir="/nonexistent"))


def test_qlora_without_bitsandbytes_names_the_install(tiny_config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if it were not installed
    with pytest.raises(ImportError, match=r"needs bitsandbytes: pip install -e '\.\[gpu\]'"):
        build_trainer(dataclasses.replace(tiny_config, method="qlora", data_dir="/nonexistent"))


@pytest.mark.slow
def test_pretrained_base_reads_only_training_texts_and_is_cached(tiny_config):
    config = dataclasses.replace(tiny_config, num_train_epochs=1.0, max_train_samples=80)
    base = pretrained_base(config)
    assert json.loads((base / "pretrain_inputs.json").read_text())["articles"] == 80
    assert AutoModelForCausalLM.from_pretrained(base).config.hidden_size == config.hidden_size
    stamp = (base / "model.safetensors").stat().st_mtime_ns
    assert pretrained_base(config) == base and (base / "model.safetensors").stat().st_mtime_ns == stamp
    assert pretrained_base(dataclasses.replace(config, seed=1)) != base


@pytest.mark.gpu
def test_qlora_trains_an_adapter_over_4bit_weights_and_evaluates_it(tiny_config):
    bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs the gpu extra's bitsandbytes")

    config = dataclasses.replace(tiny_config, method="qlora", bf16=True, optimizer="adamw_bf16_sr", lora_rank=4,
                                 lora_learning_rate=5e-3, num_train_epochs=1.0, max_train_samples=120, logging_steps=1)
    trainer = build_trainer(config)
    quantized = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    state = quantized[0].weight.quant_state
    assert len(quantized) == 7 * config.num_layers and state.quant_type == "nf4" and state.nested  # double quantized
    final = train(config)
    assert is_adapter(final)
    losses = _losses(json.loads((final / "train_summary.json").read_text()))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    _assert_evaluation_scored_the_adapter(config, final)


def test_lora_benchmark_row_counts_the_adapters_and_reaches_the_methods_table(tiny_config, tmp_path):
    args = ["train", "--name", "methods_smoke", "--variants", "22", "--warmup_steps", "1", "--measured_steps", "1",
            "--stock_trl_steps", "none",
            "--profile", "tiny", "--data_dir", tiny_config.data_dir, "--holdout_train_size", "300",
            "--vocab_size", "512", "--hidden_size", "64", "--num_heads", "4", "--max_length", "128",
            "--checkpoints_dir", tiny_config.checkpoints_dir, "--results_dir", str(tmp_path)]
    bench.main(args)
    record = json.loads((tmp_path / "benchmarks" / "methods_smoke.json").read_text())
    full, lora = record["variants"].values()
    assert full["adapter_parameters"] is None and lora["overrides"] == {"method": "lora"}
    # The adapters the tiny profile's LoRA trains, counted from the shapes: a rank-r adapter on an n -> m projection is
    # r x n (A) plus m x r (B). Each layer's q and o map h -> h, k and v h -> kv (kv heads x head dim), gate and up
    # h -> i and down i -> h: r (2h + 2h + 2(h + kv) + 3(h + i)) a layer. The embedding's adapter is r x (vocab + h)
    # (the BPE tokenizer has at most the config's 512 tokens); the RMSNorms train whole (lora_modules_to_save="norm"):
    # two a layer and the final one, h weights each. 2 x 34,816 + 9,216 + 320 = 79,168 here.
    c = record["config"]
    h, i, r = c["hidden_size"], c["intermediate_size"], c["lora_rank"]
    kv = c["num_kv_heads"] * h // c["num_heads"]
    assert (c["lora_embedding"], c["lora_modules_to_save"], c["vocab_size"]) == (True, "norm", 512)
    per_layer = r * (2 * h + 2 * h + 2 * (h + kv) + 3 * (h + i))
    expected = c["num_layers"] * per_layer + r * (c["vocab_size"] + h) + (2 * c["num_layers"] + 1) * h
    assert lora["adapter_parameters"] == expected == 79_168 and lora["tokens_per_second"] > 0
    rows = benchmark_method_rows(tmp_path)
    assert [row["method"] for row in rows] == ["full", "lora"] and rows[1]["speed_vs_full"] > 0
    assert "| lora | LoRA r16" in methods_section(tmp_path)


def test_adapter_rows_are_compared_with_the_full_fine_tuning_they_change():
    """On the committed 7B runs: LoRA and QLoRA on the recipe against the recipe's row, not the bf16 reference; an
    adapter row with its own optimizer still against the recipe; the peft defaults against the reference; a row that
    changes more than the method (compiled layers within 24 GiB) against nothing; stock TRL never listed."""
    from finetune.lab.methods import _full_twin

    recipe, methods, lora_fp8 = (committed_benchmark(f"h200_7b_{name}.json")["variants"]
                                 for name in ("train_recipe_methods", "methods", "train_lora_fp8"))
    assert _full_twin(recipe, recipe["LoRA r16, the qwen2.5-7b recipe, 8-bit AdamW moments"]) == RECIPE_ROW
    assert _full_twin(methods, methods["LoRA r16, all linear projections (peft)"]).startswith("reference")
    compiled = next(v for n, v in lora_fp8.items() if "within 24 GiB" in n)
    assert _full_twin(lora_fp8, compiled) is None
    rows = [row for row in benchmark_method_rows(PROJECT_DIR / "results") if row["file"].endswith("lora_fp8.json")]
    assert not any("stock TRL" in row["variant"] for row in rows)


def test_carve_candidates_read_as_the_command_line_types_them():
    assert parse_candidate("r64:method=lora,lora_rank=64,lora_learning_rate=3e-3,lora_modules_to_save=none") == (
        "r64", {"method": "lora", "lora_rank": 64, "lora_learning_rate": 3e-3, "lora_modules_to_save": None})


def test_answer_loss_is_the_trained_loss_split_by_answer_token(lora_config, monkeypatch, tmp_path):
    """finetune.lab.answer_loss on a carve run: every answer token counted, the stem all four answers share named,
    and the mean over tokens is the loss TRL computes on the same examples."""
    monkeypatch.setattr(lora_carve, "CARVE_TRAIN_SIZE", 80)  # the fixture trains on 120 articles
    config = dataclasses.replace(lora_config, lora_dropout=0.0)
    carve = lora_carve.carve_splits(config)
    run = dataclasses.replace(config, run_name=lora_carve.carve_run_name(config, "x"))
    train(run, splits=carve)
    record = answer_token_losses(config, "x", articles=16)
    assert "".join(record["opening_tokens"]) == '{"category":"'
    assert set(record["loss_by_token"]) >= {"<|im_end|>", "World", "Sports", "Business", "Tech"}
    merged = str(merge_adapter(run, run.final_dir, tmp_path / "merged"))
    trainer = build_trainer(dataclasses.replace(run, model=merged, tokenizer=merged, method="full",
                                                per_device_train_batch_size=16),  # all 16 articles in one batch
                            splits=dataclasses.replace(carve, train=carve.train.iloc[:16]))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
    assert record["mean_answer_token_loss"] == pytest.approx(trl_loss.item(), rel=1e-5)


def test_training_takes_the_articles_it_is_given(lora_config):
    """The carve that chooses adapter settings trains on part of the training side, never on evaluation articles. The
    packed rows the trainer reads hold exactly the carve's training articles: as many, and each of them (decoded)."""
    training_side = load_splits(lora_config)
    carve = make_splits({"test": training_side.train}, training_side.source, "holdout", 60, 7)
    trainer = build_trainer(lora_config, splits=carve)
    assert set(carve.train["text"]) <= set(training_side.train["text"]) and len(carve.train) < len(training_side.train)
    rows = [trainer.processing_class.decode(ids) for ids in trainer.train_dataset["input_ids"]]
    assert sum(map(len, trainer.train_dataset["seq_lengths"])) == len(carve.train)
    assert all(any(text in row for row in rows) for text in carve.train["text"])



def test_merge_without_an_adapter_says_so_without_a_traceback(tmp_path):
    import finetune.merge

    with pytest.raises(SystemExit, match=f"error: {tmp_path} holds no adapter_config.json"):
        finetune.merge.main(["--profile", "tiny", "--adapter_path", str(tmp_path), "--out", str(tmp_path / "merged")])
