"""The path of a user with real weights: a folder laid out like the Qwen2.5-7B-Instruct hub snapshot, the `qwen2.5-7b`
profile, all four notebooks, the fine-tuned checkpoint saved, reloaded and evaluated."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.lab import notebooks, rehearse
from finetune.config import get_config
from finetune.results import validate_record
from finetune.lab.standin import PUBLISHED_CONFIG, SHAPES, write_standin
from tests.test_qwen_tokenizer import NOT_SPECIAL, SPECIAL_IDS

# Qwen/Qwen2.5-7B-Instruct's config.json and generation_config.json on the hub, written out here rather than read
# from the stand-in's own constants, so that a wrong constant there cannot agree with itself.
HUB_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
}
HUB_GENERATION_CONFIG = {
    "bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "transformers_version": "4.37.0",
}


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub") / "Qwen2.5-7B-Instruct"
    return write_standin(folder, "tiny", cache_dir=tmp_path_factory.mktemp("tokenizers"))


def test_standin_has_the_hub_snapshot_files_and_published_metadata(standin):
    index = json.loads((standin / "model.safetensors.index.json").read_text())
    shards = sorted({name for name in index["weight_map"].values()})
    assert len(shards) > 1 and all((standin / name).exists() for name in shards)
    assert shards[0].startswith("model-00001-of-0000")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert (standin / name).stat().st_size > 1000, name
    # The tiny shape changes sizes only; every other field is the hub's, and the 7b shape is the hub's config whole.
    assert set(SHAPES["tiny"]) <= {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "max_window_layers"}
    assert json.loads((standin / "config.json").read_text()) == {**HUB_CONFIG, **SHAPES["tiny"]}
    assert {**PUBLISHED_CONFIG, **SHAPES["7b"]} == HUB_CONFIG
    assert json.loads((standin / "generation_config.json").read_text()) == HUB_GENERATION_CONFIG
    tokenizer_config = json.loads((standin / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "Qwen2Tokenizer"
    assert {int(i): (t["content"], t["special"]) for i, t in tokenizer_config["added_tokens_decoder"].items()} == {
        i: (token, token not in NOT_SPECIAL) for token, i in SPECIAL_IDS.items()}


def test_standin_loads_through_the_auto_classes_with_qwens_tokens(standin):
    tokenizer = AutoTokenizer.from_pretrained(standin)
    assert tokenizer("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    model = AutoModelForCausalLM.from_pretrained(standin)
    assert model.config.num_hidden_layers == SHAPES["tiny"]["num_hidden_layers"]
    assert model.generation_config.repetition_penalty == 1.05 and model.generation_config.do_sample


@pytest.mark.gpu
def test_standin_gives_its_gpu_memory_back(tmp_path):
    """The stand-in is built on the GPU; memory its writer keeps cached is memory the rehearsal's notebooks, run next
    as other processes, do not see free, and their plan recomputes layers that would fit."""
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    write_standin(tmp_path / "standin", "tiny", cache_dir=tmp_path / "tokenizers")
    assert torch.cuda.memory_reserved() <= before


@pytest.mark.slow
def test_qwen_profile_runs_every_notebook_from_a_hub_layout_folder(standin, synthetic_dir, tmp_path):
    checkpoints, results = tmp_path / "checkpoints", tmp_path / "results"
    # CPU overrides only: fp32, a few steps, a small evaluation; everything else is the qwen2.5-7b recipe.
    rehearse.main(["--shape", "tiny", "--standin", str(standin), "--data_dir", str(synthetic_dir),
                   "--checkpoints_dir", str(checkpoints), "--results_dir", str(results), "--bf16", "false",
                   "--optimizer", "adamw", "--max_steps", "3", "--save_steps", "2", "--logging_steps", "1",
                   "--holdout_train_size", "300", "--max_eval_samples", "40", "--eval_batch_size", "20",
                   "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
                   "--dataloader_num_workers", "0"])
    final = get_config("qwen2.5-7b", checkpoints_dir=str(checkpoints), run_name="rehearsal-tiny").final_dir
    base = json.loads((results / "base_model_results.json").read_text())
    tuned = json.loads((results / "finetuned_model_results.json").read_text())
    for record in (base, tuned):
        validate_record(record)
        assert record["profile"] == "qwen2.5-7b" and record["config"]["model"] == str(standin.resolve())
        assert record["data"]["eval_size"] == 40
    assert tuned["model"] == str(final)  # evaluated from the checkpoint written to disk, not the trained object
    assert any(final.glob("model*.safetensors")) and (final / "tokenizer.json").exists()
    summary = json.loads((results / "train_summary.json").read_text())
    assert summary["log_history"][-1]["step"] == summary["optimizer_steps"] == 3
    assert summary["config"]["learning_rate"] == 2e-5
    assert len(summary["checkpoint_save_seconds"]) == 2 and summary["final_save_seconds"] > 0  # steps 2 and 3
    assert summary["articles_per_optimizer_step"] > 4 * 2  # packing: several articles in each row of a batch of 4
    assert (checkpoints / "rehearsal-tiny" / "checkpoint-2").is_dir()  # a resumable checkpoint on the way
    readme = (results / "README.md").read_text()
    assert "not** Qwen2.5's" in readme and "| fine-tuned model reload (s) |" in readme
    assert len(list((results / "notebooks").glob("*.ipynb"))) == 4


def test_notebook_runs_take_any_config_field_and_a_local_model_folder(standin, monkeypatch):
    calls = []
    monkeypatch.setattr(notebooks, "run_notebooks", lambda parameters, output_dir, names=notebooks.NOTEBOOKS:
                        calls.append((names, parameters)))
    monkeypatch.chdir(standin.parent)
    notebooks.main(["--profile", "qwen2.5-7b", "--model", standin.name, "--learning_rate", "1e-5"])
    notebooks.main(["--profile", "qwen2.5-7b"])
    passed = [parameters for names, parameters in calls if names == notebooks.NOTEBOOKS]
    comparison = [parameters for names, parameters in calls if names == (notebooks.METHOD_COMPARISON,)]
    assert comparison == [{"results_dir": "results"}] * 2  # the committed method results, whatever the run
    model = passed[0]["overrides"].pop("model")  # relative to the project root, where the notebooks run
    assert not Path(model).is_absolute() and (notebooks.PROJECT_DIR / model).resolve() == standin.resolve()
    assert passed[0]["overrides"] == {"learning_rate": 1e-5}
    assert passed[0]["profile"] == "qwen2.5-7b" and passed[1]["overrides"] == {}  # the hub id stays the profile's
    assert passed[1]["results_dir"] == "results"  # recorded as named, not as this machine's absolute path
    with pytest.raises(SystemExit):
        notebooks.main(["--profile", "qwen2.5-7b", "--no_such_field", "1"])


def test_a_disk_that_cannot_hold_the_standin_and_the_saves_stops_the_rehearsal_before_either(tmp_path, monkeypatch,
                                                                                            synthetic_dir):
    """On an H200 the recipe's checkpoint (bf16 moments) and final model after 20 steps take 61.0 GB, the tokenizer's
    files included (the rehearsal measured 60.96): beside the 15.2 GB stand-in, a 64 GiB disk (68.7 GB free here) does
    not hold them, as a rehearsal found at its last save. A stand-in already written, or on another disk, leaves the
    room to the run."""
    import shutil

    from finetune.disk import OutOfDisk
    from finetune.plan import GPU
    from tests.test_plan import H200

    monkeypatch.setattr(GPU, "current", classmethod(lambda cls: H200))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2 * 68.7e9, 68.7e9, 68.7e9))
    config = get_config("qwen2.5-7b", max_steps=20, run_name="rehearsal-7b", checkpoints_dir=str(tmp_path),
                        data_dir=str(synthetic_dir), holdout_train_size=300)
    standin = tmp_path / "standin-7b"
    with pytest.raises(OutOfDisk, match=r"61.0 GB more, 53.5 GB free.*15.2 GB stand-in.*--standin"):
        rehearse.check_room(config, standin, "7b")
    standin.mkdir()
    (standin / "config.json").write_text("{}")
    assert "61.0 GB more, 68.7 GB free" in rehearse.check_room(config, standin, "7b")
    monkeypatch.setattr(rehearse, "same_disk", lambda a, b: False)
    assert "61.0 GB more, 68.7 GB free" in rehearse.check_room(config, tmp_path / "on-another-disk", "7b")


def test_the_disk_check_plans_the_moments_with_the_rows_training_will_run(tmp_path, monkeypatch):
    """On a GB10, rows of AG News-long articles that share their opening run ~305 of 512 tokens, which leaves room for
    bf16 moments: 45.7 GB checkpoints where 8-bit moments make 30.7. The check counts the rows as training does (it
    once planned full rows, and so 8-bit moments, whatever training would choose)."""
    import csv
    import random
    import shutil

    from finetune.lab.spark import GB10
    from finetune.plan import GPU

    rng, words = random.Random(0), "markets rally as investors weigh central bank signals while officials talk".split()
    with open(tmp_path / "test.csv", "w", newline="") as f:  # ~100 Qwen tokens an example, as AG News
        csv.writer(f).writerows([str(i % 4 + 1), f"Headline {i}", " ".join(rng.choices(words, k=40))]
                                for i in range(400))
    monkeypatch.setattr(GPU, "current", classmethod(lambda cls: GB10))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1e12, 5e11, 5e11))
    checkpoint = {}
    for share in (True, False):
        config = get_config("qwen2.5-7b", max_steps=20, checkpoints_dir=str(tmp_path), data_dir=str(tmp_path),
                            holdout_train_size=300, share_opening=share)
        checkpoint[share] = rehearse.check_room(config, tmp_path / "standin-7b", "7b").split(" GB")[0]
    assert checkpoint == {True: "1 checkpoint(s) of 45.7", False: "1 checkpoint(s) of 30.7"}
