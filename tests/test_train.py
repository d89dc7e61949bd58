"""Training: answer-only loss inside packed rows, a short run whose loss falls, and the saved model loading back."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import trl
import trl.trainer.utils
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from data_prep.task import LABELS, format_answer
from finetune.config import get_config
from finetune.resume import RESUME_FREE_FIELDS, config_changes, last_checkpoint
from finetune.train import build_trainer, train


@pytest.mark.parametrize("share_opening", [False, True])
def test_label_mask_covers_exactly_each_packed_answer(tiny_config, share_opening):
    """Each article of a packed micro-batch, as the attention sees it (with a shared opening: the opening's keys and
    its own, `opening_key_index`), is its whole chat example with the loss on its answer alone."""
    trainer = build_trainer(dataclasses.replace(tiny_config, share_opening=share_opening))
    tokenizer = trainer.processing_class
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # padding-free packed row
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    keys = batch.get("opening_key_index", torch.arange(len(ids)))
    cu_q, cu_k = batch["cu_seq_lens_q"].tolist(), batch["cu_seq_lens_k"].tolist()
    assert ("opening_key_index" in batch) == share_opening
    answers = {format_answer(label) + "<|im_end|>\n" for label in LABELS}
    articles = 0
    for q_start, q_end, k_start, k_end in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
        article = ids[keys[k_start:k_end]]
        article_labels = torch.cat([torch.full((k_end - k_start - (q_end - q_start),), -100), labels[q_start:q_end]])
        text = tokenizer.decode(article)
        if not text.startswith("<|im_start|>system") or (share_opening and q_start == 0):
            continue  # padding at the end of the row; the shared opening, which is no article
        articles += 1
        trained = article_labels != -100
        answer = tokenizer.decode(article[trained])
        assert answer in answers, answer
        # The trained tokens are one contiguous run at the end of the article: nothing from the prompt.
        first = int(trained.nonzero()[0])
        assert trained[first:].all() and not trained[:first].any()
        assert text.endswith("<|im_start|>assistant\n" + answer)
        assert (article_labels[trained] == article[trained]).all()
    assert articles >= 3


def test_short_training_run_lowers_the_loss_and_saves_a_loadable_model(tiny_config):
    final = train(tiny_config)
    summary = json.loads((final / "train_summary.json").read_text())
    losses = [h["loss"] for h in summary["log_history"] if "loss" in h]
    assert len(losses) >= 3 and losses[-1] < losses[0] / 2
    assert summary["data"]["protocol"] == "holdout" and summary["config"]["profile"] == "tiny"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.vocab_size >= len(tokenizer)
    assert (final / "model.safetensors").exists()
    assert list((tiny_config.output_dir / "runs").rglob("events.out.tfevents.*"))


def test_profiles_differ_only_where_the_tiny_run_needs_it():
    reference, tiny = get_config("qwen2.5-7b-reference"), get_config("tiny")
    assert (reference.model, reference.learning_rate, reference.num_train_epochs) == ("Qwen/Qwen2.5-7B-Instruct", 2e-5, 1.0)
    assert (reference.per_device_train_batch_size, reference.gradient_accumulation_steps) == (8, 4)
    assert (reference.max_length, reference.gradient_checkpointing, reference.bf16, reference.packing) == (
        512, True, True, True)
    assert tiny.model == "scratch" and tiny.tokenizer == "bpe" and not tiny.bf16
    assert torch.cuda.is_available() or tiny.dataloader_num_workers == 0


class StopAt(TrainerCallback):
    """Simulates an interruption: training ends after `step`, right after that step's checkpoint is saved."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _weights(folder):
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def _losses(summary: dict) -> list[float]:
    return [h["loss"] for h in summary["log_history"] if "loss" in h]


# The stochastic-rounding case checks the resume and its random bits; plain AdamW's is a subset (make test-all). The
# last case sums two micro-batches' weight gradients in the matmul, as the plan does on an H100 or a GB10.
@pytest.mark.parametrize("optimizer, bf16, summed", [pytest.param("adamw", False, False, marks=pytest.mark.slow),
                                                     ("adamw_bf16_sr", True, False), ("adamw_bf16_sr", True, True)])
def test_interrupted_run_resumes_to_the_same_weights_and_losses(tiny_config, tmp_path, optimizer, bf16, summed):
    """Stochastic rounding draws random bits at every update: the resumed run must draw the same ones."""
    config = dataclasses.replace(tiny_config, num_train_epochs=1.0, save_steps=5, logging_steps=1,
                                 max_train_samples=120, optimizer=optimizer, bf16=bf16)
    if summed:
        config = dataclasses.replace(config, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                     accumulate_in_matmul=True)
    straight = train(dataclasses.replace(config, checkpoints_dir=str(tmp_path / "straight")))
    interrupted = dataclasses.replace(config, checkpoints_dir=str(tmp_path / "interrupted"))
    train(interrupted, callbacks=[StopAt(5)])
    assert (interrupted.output_dir / "checkpoint-5" / "run_config.json").is_file()
    resumed = train(interrupted)
    summary = json.loads((resumed / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-5") and summary["config"]["accumulate_in_matmul"] is summed
    expected = json.loads((straight / "train_summary.json").read_text())
    assert len(_losses(summary)) > 5 and _losses(summary) == pytest.approx(_losses(expected), rel=1e-4)
    # the whole run's mean loss, not the steps since the resume divided by all of them (logged losses: 4 decimals)
    assert summary["metrics"]["train_loss"] == pytest.approx(expected["metrics"]["train_loss"], rel=1e-3)
    # rates over the steps this session ran in its runtime, not the whole run's steps in it
    assert summary["optimizer_steps_this_session"] == summary["optimizer_steps"] - 5
    assert summary["metrics"]["train_steps_per_second"] == pytest.approx(
        summary["optimizer_steps_this_session"] / summary["metrics"]["train_runtime"], rel=0.02)
    straight_weights, resumed_weights = _weights(straight), _weights(resumed)
    assert next(iter(resumed_weights.values())).dtype == (torch.bfloat16 if bf16 else torch.float32)
    for name, value in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, atol=1e-5, rtol=1e-4, msg=name)


def test_resuming_with_a_changed_training_config_names_the_fields_unless_allowed(tiny_config):
    config = dataclasses.replace(tiny_config, num_train_epochs=1.0, save_steps=5, max_train_samples=120)
    train(config, callbacks=[StopAt(5)])
    changed = dataclasses.replace(config, learning_rate=5e-3, packing=False, logging_steps=1, eval_batch_size=7)
    with pytest.raises(ValueError, match=r"checkpoint-5 was trained with another run config \(learning_rate "
                                         r"0\.001 -> 0\.005, packing True -> False\).*allow_config_change"):
        train(changed)
    summary = json.loads((train(dataclasses.replace(changed, allow_config_change=True)) / "train_summary.json")
                         .read_text())
    assert summary["resumed_from"].endswith("checkpoint-5") and summary["config"]["learning_rate"] == 5e-3


def test_fields_that_do_not_change_the_training_may_differ_on_resume(tiny_config):
    stored = json.loads(json.dumps(tiny_config.to_dict()))
    free = {"logging_steps": 1, "save_steps": 3, "results_dir": "elsewhere", "dataloader_num_workers": 2,
            "eval_batch_size": 7, "max_new_tokens": 5, "max_eval_samples": 9, "allow_config_change": True}
    assert set(free) <= RESUME_FREE_FIELDS
    assert config_changes(stored, dataclasses.replace(tiny_config, **free)) == {}
    assert config_changes(stored, dataclasses.replace(tiny_config, max_steps=3, seed=1)) == {"max_steps": (-1, 3),
                                                                                              "seed": (42, 1)}
    del stored["seed"]  # a field the checkpoint's older code did not have is not compared
    assert config_changes(stored, dataclasses.replace(tiny_config, seed=1)) == {}


def test_running_a_finished_run_again_leaves_its_summary_alone(tiny_config, caplog):
    config = dataclasses.replace(tiny_config, num_train_epochs=1.0, max_train_samples=80)
    summary = train(config) / "train_summary.json"
    before = summary.read_text()
    assert json.loads(before)["train_seconds"] > 0
    with caplog.at_level("WARNING", logger="finetune.train"):
        assert train(config) == config.final_dir
    assert summary.read_text() == before
    assert "is finished" in caplog.text
    # A change that is allowed but adds no step (a learning rate) resumes, trains nothing and keeps them too.
    changed = dataclasses.replace(config, learning_rate=5e-3, allow_config_change=True)
    with caplog.at_level("WARNING", logger="finetune.train"):
        assert train(changed) == config.final_dir
    assert summary.read_text() == before
    assert "adds no step to it" in caplog.text


def test_partial_checkpoint_is_a_clear_error(tiny_config):
    partial = tiny_config.output_dir / "checkpoint-7"
    partial.mkdir(parents=True)
    (partial / "trainer_state.json").write_text("{}")
    with pytest.raises(RuntimeError, match="checkpoint-7 is incomplete .*Delete that folder"):
        train(tiny_config)


# Each part the Trainer writes into a checkpoint, as the completeness check names it when it is missing. Without
# scheduler.pt the Trainer would load neither optimizer nor schedule (fresh Adam moments, the warm-up again); without
# rng_state.pth, dropout and stochastic rounding would draw other numbers than the uninterrupted run.
CHECKPOINT_FILES = {"trainer_state.json": "trainer_state.json", "model.safetensors": "model weights",
                    "optimizer.pt": "optimizer state", "scheduler.pt": "scheduler state", "rng_state.pth": "RNG state",
                    "run_config.json": "run config"}


def test_a_checkpoint_the_trainer_wrote_is_complete_and_each_missing_part_is_named(tiny_config, tmp_path):
    """The FSDP writers' checkpoints (FULL_STATE_DICT, SHARDED_STATE_DICT) are checked on real ones in test_fsdp.py,
    a sharded one without its .metadata too."""
    config = dataclasses.replace(tiny_config, num_train_epochs=1.0, save_steps=5, max_train_samples=120)
    train(config, callbacks=[StopAt(5)])
    checkpoint = config.output_dir / "checkpoint-5"
    assert set(CHECKPOINT_FILES) <= {p.name for p in checkpoint.iterdir()}
    assert last_checkpoint(config.output_dir) == str(checkpoint)
    for name, part in CHECKPOINT_FILES.items():
        (checkpoint / name).rename(tmp_path / name)
        with pytest.raises(RuntimeError, match=rf"checkpoint-5 is incomplete \(missing {part} \("):
            last_checkpoint(config.output_dir)
        (tmp_path / name).rename(checkpoint / name)
    with pytest.raises(RuntimeError, match=r"missing RNG state \(rng_state_0.pth and rng_state_1.pth\)"):
        last_checkpoint(config.output_dir, world_size=2)  # two processes resume from their own RNG states


def test_the_trainers_packed_rows_skip_transformers_packed_sequence_check(tiny_config, monkeypatch):
    """The rows carry their boundaries, so the check (a host sync a micro-batch on the GPU) is not made."""
    from transformers import masking_utils

    trainer = build_trainer(tiny_config)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices",
                        lambda *args: pytest.fail("transformers checked packed rows for their sequences"))
    assert torch.isfinite(trainer.compute_loss(trainer.model, dict(batch)))


def test_answer_only_lm_head_gives_trls_loss_and_gradients(tiny_config, monkeypatch):
    """On the CPU our trainer puts only the answer positions through TRL's fused LM head, where TRL's own path puts
    every position: the same loss and gradients from fewer rows, and TRL's choice is back once the loss is computed."""
    trainer = build_trainer(tiny_config)
    model, batch = trainer.model, trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    rows = []
    apply = trl.trainer.utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl.trainer.utils._ChunkedLogProbFunction, "apply",
                        lambda hidden, *args: rows.append(len(hidden)) or apply(hidden, *args))
    use_triton = trl.trainer.utils._use_triton
    results = []
    for compute_loss in (trainer.compute_loss, lambda *args: trl.SFTTrainer.compute_loss(trainer, *args)):
        model.zero_grad()
        loss = compute_loss(model, dict(batch))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert trl.trainer.utils._use_triton is use_triton and not use_triton(batch["input_ids"].device)
    shifted = batch["labels"][:, 1:]
    assert rows == [int((shifted != -100).sum()), shifted.numel()]
    (ours, our_grads), (trls, trl_grads) = results
    torch.testing.assert_close(ours, trls)
    for ours, trls in zip(our_grads, trl_grads):
        torch.testing.assert_close(ours, trls, atol=1e-6, rtol=1e-5)


def test_tensorboard_scalars_logged_again_after_a_resume_count_once(tmp_path):
    """The interrupted session logged steps 6-7 after its checkpoint at 5; the resumed one logs them again."""
    import time

    from torch.utils.tensorboard import SummaryWriter

    from finetune.train import tensorboard_scalars

    for session, (steps, loss) in enumerate([(range(1, 8), 2.0), (range(6, 10), 1.0)]):
        with SummaryWriter(tmp_path / "runs" / f"Dec0{9 - session}_session") as writer:  # names sort against time
            for step in steps:
                writer.add_scalar("train/loss", loss, step)
        time.sleep(1.1)  # event files are named by their start second
    scalars = tensorboard_scalars(tmp_path)["train/loss"]
    assert scalars["steps"] == list(range(1, 10)) and scalars["values"] == [2.0] * 5 + [1.0] * 4


def test_tensorboard_gets_throughput_scalars(tiny_config):
    final = train(dataclasses.replace(tiny_config, max_train_samples=80, num_train_epochs=1.0, logging_steps=2))
    scalars = json.loads((final / "train_summary.json").read_text())["tensorboard"]
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second"} <= set(scalars)
    assert scalars["train/tokens_per_second"]["values"] and min(scalars["train/tokens_per_second"]["values"]) > 0


def test_selective_checkpointing_recomputes_only_the_first_layers(tiny_config):
    """One optimizer step on one batch: a checkpointed layer runs forward twice (again in backward), the other once."""
    config = dataclasses.replace(tiny_config, gradient_checkpointing=True, checkpointed_layers=1, max_steps=1,
                                 gradient_accumulation_steps=1)
    trainer = build_trainer(config)
    calls = [0] * len(trainer.model.model.layers)
    for i, layer in enumerate(trainer.model.model.layers):  # counted in forward: the recompute skips module hooks
        def counted(*args, i=i, forward=layer.forward, **kwargs):
            calls[i] += 1
            return forward(*args, **kwargs)
        layer.forward = counted
    trainer.train()
    assert calls == [2, 1]


def test_a_tokenizer_that_does_not_fit_the_model_is_refused_naming_both(tiny_config):
    """A BPE trained here fed to a checkpoint's weights would put every id on an unrelated row: refused, by size or by
    the special tokens' ids, with both names in the message."""
    from finetune.model import check_tokenizer_fits, load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_config, train_texts=["Stocks rallied.", "The striker scored."] * 50)
    model = load_model(tiny_config, tokenizer)
    check_tokenizer_fits(tokenizer, model)  # the model built for it fits
    model.config.eos_token_id = 151645  # Qwen2.5-Instruct's <|im_end|>
    model.config.name_or_path = "Qwen/Qwen2.5-7B-Instruct"
    with pytest.raises(ValueError, match=r"'<\|im_end\|>' at id \d+, but Qwen/Qwen2.5-7B-Instruct's config says "
                                         r"eos_token_id=151645"):
        check_tokenizer_fits(tokenizer, model)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.resize_token_embeddings(len(tokenizer) - 10)
    with pytest.raises(ValueError, match=f"has {len(tokenizer)} tokens but .* has {len(tokenizer) - 10} rows"):
        check_tokenizer_fits(tokenizer, model)


def test_the_run_ends_with_median_interval_speed_not_the_whole_run_average():
    """The closing log line gets the median of the logging intervals' tokens/s; an interval in which a checkpoint was
    written reports none (the write is timed on its own)."""
    from unittest import mock

    from transformers import Qwen2Config

    from finetune.throughput import ArticleTokens, ThroughputCallback

    callback = ThroughputCallback(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
                                  ArticleTokens(attention_length=100.0, loss_share=0.07))
    args, state = mock.Mock(world_size=1), mock.Mock(log_history=[])
    logs = []
    clock = iter([0.0, 1.0, 2.0, 4.0, 14.0, 15.0, 99.0])  # seconds at each log
    with mock.patch("finetune.throughput.time.perf_counter", lambda: next(clock)):
        for step, tokens in enumerate([0, 1000, 2000, 3000, 4000, 5000]):
            if step == 4:
                callback.on_save(args, state, None)  # written during the interval that ends at the 5th log
            logs.append({"num_tokens": tokens})
            state.log_history.append(dict(logs[-1]))  # as Trainer.log does, before the callbacks
            callback.on_log(args, state, None, logs=logs[-1])
        final = {"train_runtime": 99.0}  # TRL cleared its num_tokens at the last step's log line
        state.log_history.append(dict(final))
        callback.on_log(args, state, None, logs=final)
    rates = [log.get("tokens_per_second") for log in logs]
    assert rates == [None, 1000.0, 1000.0, 500.0, None, 1000.0]
    assert final["train_tokens_per_second_median"] == 1000.0 and "tokens_per_second" not in final
    assert state.log_history == [*logs, final]  # the summary's log_history has them too


def test_evaluation_of_both_modes_runs_one_pass_for_both(tiny_config, monkeypatch):
    """Label scoring and generation share the answer tree's pass (`score_then_generate`): neither mode's own function
    runs, each mode's seconds run from the shared start (generation's include its decoding), and the record says so."""
    import finetune.evaluate
    from finetune.evaluate import evaluate

    for alone in ("score_labels", "generate_labels"):
        monkeypatch.setattr(finetune.evaluate, alone, lambda *a, **k: pytest.fail("a mode ran a pass of its own"))
    record = evaluate(dataclasses.replace(tiny_config, max_new_tokens=4), "both")
    assert record["name"] == "both" and (Path(tiny_config.results_dir) / "both_results.json").exists()
    evaluations = record["evaluations"]
    assert list(evaluations) == ["label_scoring", "generation", "generation_lenient"]
    scored, generated = evaluations["label_scoring"]["throughput"], evaluations["generation"]["throughput"]
    assert scored["pass_shared_by"] == generated["pass_shared_by"] == ["label_scoring", "generation"]
    assert 0 < scored["seconds"] < generated["seconds"]
    assert evaluations["generation"]["decoded_answers"] == scored["articles"]  # an untrained model: all decode


def test_evaluation_defaults_are_planned_and_recorded_with_the_warm_up_apart(tiny_config):
    """"auto" evaluation settings are chosen for the machine (on the CPU: batch 64, no Liger, eager layers), written
    into the results JSON with their reasons, and the warm-up is reported beside the timed speed, never inside it."""
    from finetune.evaluate import evaluate

    config = dataclasses.replace(tiny_config, eval_batch_size="auto", use_liger_kernel="auto", compile_layers="auto")
    record = evaluate(config, "planned", modes=("label_scoring",))
    assert list(record["evaluations"]) == ["label_scoring"]  # the mode asked for, no other
    assert record["plan"]["eval_batch_size"]["value"] == 64 and record["plan"]["use_liger_kernel"]["value"] is False
    assert record["config"]["eval_batch_size"] == 64 and "no GPU" in record["plan"]["eval_batch_size"]["reason"]
    speed = record["evaluations"]["label_scoring"]["throughput"]
    assert speed["warmup_seconds"] == 0.0 and speed["batch_size"] == 64  # nothing to compile or grow on the CPU
    assert record["attn_implementation"] == "varlen"  # "auto": the suite's, not transformers' sdpa


class OutOfMemoryAt(TrainerCallback):
    """Simulates the GPU running out of memory during step `step + 1`."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_a_model_or_tokenizer_folder_that_is_not_there_is_named(tiny_config, tmp_path):
    """A missing model folder, given to training or to evaluation, stops the command at once, before any data loads;
    without the check transformers takes it for a hub id and fails on the repo id's form or the network. A folder
    without a model (or tokenizer) in it is named too; a model folder, an adapter folder and a name of the hub's form
    pass."""
    import finetune.evaluate
    import finetune.train
    from finetune.model import load_tokenizer
    from finetune.sources import SourceNotFound, check_source

    missing = tmp_path / "models" / "Qwen2.5-7B-Instruct"
    with pytest.raises(SystemExit, match=f"error: model {missing}: no such folder"):
        finetune.train.main(["--model", str(missing), "--checkpoints_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=f"error: model_path {missing}: no such folder"):
        finetune.evaluate.main(["--profile", "tiny", "--model_path", str(missing), "--results_dir", str(tmp_path)])
    with pytest.raises(SourceNotFound, match="holds no config.json or adapter_config.json"):
        check_source(tmp_path, "model")
    with pytest.raises(SourceNotFound, match=f"tokenizer {missing}: no such folder"):
        load_tokenizer(dataclasses.replace(tiny_config, tokenizer=str(missing)))
    with pytest.raises(SourceNotFound, match="holds no tokenizer.json or tokenizer_config.json"):
        load_tokenizer(dataclasses.replace(tiny_config, tokenizer=str(tmp_path)))
    (tmp_path / "adapter_config.json").write_text("{}")
    check_source(tmp_path, "model_path")
    check_source("Qwen/Qwen2.5-7B-Instruct", "model")  # no folder Qwen/ here: the hub's to answer


@pytest.mark.parametrize("command", ["finetune.train", "finetune.evaluate", "finetune.baselines"])
def test_each_command_ends_on_missing_data_with_the_message_alone(command, tmp_path):
    import importlib

    with pytest.raises(SystemExit, match=f"error: data folder {tmp_path / 'none'} does not exist"):
        importlib.import_module(command).main(["--profile", "tiny", "--data_dir", str(tmp_path / "none"),
                                               "--checkpoints_dir", str(tmp_path), "--results_dir", str(tmp_path)])


def test_a_resumed_run_keeps_the_optimizer_its_checkpoint_was_saved_by(tiny_config, monkeypatch):
    """Under "auto" the plan picks the moments' format from the memory, which a resume may change (`--max_memory_gib`,
    as the out-of-memory advice suggests): the other optimizer would be handed moments in a format it does not keep."""
    import finetune.plan

    config = dataclasses.replace(tiny_config, num_train_epochs=1.0, save_steps=5, max_train_samples=120,
                                 optimizer="auto", bf16=True)
    train(config, callbacks=[StopAt(5)])
    stored = json.loads((config.output_dir / "checkpoint-5" / "run_config.json").read_text())
    assert stored["optimizer"] == "auto" and stored["planned_optimizer"] == "adamw_bf16_sr"
    monkeypatch.setattr(finetune.plan, "_optimizer", lambda *args: ("adamw", "adamw: what the plan would now choose"))
    summary = json.loads((train(config) / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-5")
    assert summary["plan"]["optimizer"]["value"] == "adamw_bf16_sr" and "kept" in summary["plan"]["optimizer"]["reason"]


def test_running_out_of_memory_names_what_is_kept_and_what_needs_less(tiny_config):
    """An out-of-memory error mid-run says which checkpoint the same command resumes from and which settings need less
    memory; the rerun then resumes there. Before the first checkpoint, it says a rerun starts afresh."""
    from finetune.plan import OutOfMemory

    config = dataclasses.replace(tiny_config, num_train_epochs=1.0, save_steps=5, max_train_samples=120,
                                 per_device_train_batch_size=4, gradient_accumulation_steps=1)
    with pytest.raises(OutOfMemory, match="starts afresh.*recompute more of the 2 decoder layers.*now 0.*"
                                          "--gradient_checkpointing true --checkpointed_layers 1"):
        train(config, callbacks=[OutOfMemoryAt(2)])  # the tiny profile recomputes nothing
    with pytest.raises(OutOfMemory) as raised:
        train(dataclasses.replace(config, gradient_checkpointing=True, checkpointed_layers=None),
              callbacks=[OutOfMemoryAt(7)])  # every layer recomputes; both may change on resume
    message = str(raised.value)
    assert "optimizer step 8" in message and "Training up to checkpoint-5 is kept" in message
    assert "--per_device_train_batch_size 2 --gradient_accumulation_steps 2" in message
    assert "--max_memory_gib" in message and "--checkpointed_layers" not in message  # nothing more to recompute
    summary = json.loads((train(config) / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-5")


def test_evaluation_out_of_memory_asks_for_a_smaller_batch(tiny_config, monkeypatch):
    import finetune.evaluate
    from finetune.plan import OutOfMemory

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(finetune.evaluate, "score_labels", out_of_memory)
    with pytest.raises(OutOfMemory, match="label_scoring at 16 articles a batch.*--eval_batch_size 8"):
        finetune.evaluate.evaluate(dataclasses.replace(tiny_config, eval_batch_size=16), "oom", modes=("label_scoring",))


def test_out_of_memory_advice_splits_a_micro_batch_without_changing_the_rows_a_step(tiny_config):
    """3 rows x 4 micro-batches is advised as 1 x 12 (not 1 x 8: four rows a step lost), and with merging on (the
    plan's "auto") the advice turns it off, else the plan would merge the smaller micro-batches straight back. Layers
    given keep the micro-batches given: where the plan had merged them, the advice to recompute more names the merged
    ones, not the given ones (which need more memory at the same layers)."""
    from finetune.train import out_of_memory_advice

    trainer = build_trainer(dataclasses.replace(tiny_config, max_steps=1))
    trainer.run_config = dataclasses.replace(trainer.run_config, per_device_train_batch_size=3,
                                             gradient_accumulation_steps=4)
    advice = out_of_memory_advice(dataclasses.replace(tiny_config, merge_micro_batches="auto"), trainer)
    assert "--per_device_train_batch_size 1 --gradient_accumulation_steps 12 --merge_micro_batches false" in advice
    unmerged = dataclasses.replace(tiny_config, merge_micro_batches=False)
    assert "--gradient_accumulation_steps 12 (resuming" in out_of_memory_advice(unmerged, trainer)
    # The plan had merged 3 x 4 into 6 x 2: more layers recomputed at the given 3 x 4 would be another layout.
    trainer.run_config = dataclasses.replace(trainer.run_config, per_device_train_batch_size=6,
                                             gradient_accumulation_steps=2)
    given = dataclasses.replace(tiny_config, per_device_train_batch_size=3, gradient_accumulation_steps=4)
    assert "--checkpointed_layers 1 --per_device_train_batch_size 6 --gradient_accumulation_steps 2 (resuming" in \
        out_of_memory_advice(given, trainer)


def test_settings_the_plan_resolved_are_checked_like_settings_given(tiny_config, monkeypatch):
    """fp8 "auto" passed the check before the plan; had the plan turned FP8 on beside an explicit sum in the matmul,
    the sum would silently skip the FP8 layers. The resolved config is checked too."""
    import finetune.train

    def fp8_on(config, *args, **kwargs):
        return dataclasses.replace(config, fp8="tensorwise_pow2_scales"), {}

    monkeypatch.setattr(finetune.train, "plan_training", fp8_on)
    with pytest.raises(ValueError, match="accumulate_in_matmul=true .* FP8"):
        build_trainer(dataclasses.replace(tiny_config, fp8="auto", accumulate_in_matmul=True))
