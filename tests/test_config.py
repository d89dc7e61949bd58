"""One config, two profiles: overrides from code and from the command line, and loud failures for typos."""

import pytest

from finetune.config import PROFILES, command_from_args, command_parser, config_from_args, get_config


def test_cli_flags_are_typed_like_the_fields():
    config = config_from_args(["--profile", "tiny", "--learning_rate", "2e-4", "--max_train_samples", "100",
                               "--packing", "false", "--data_dir", "none", "--run_name", "123"])
    assert config.learning_rate == 2e-4 and config.max_train_samples == 100
    assert config.packing is False and config.data_dir is None and config.run_name == "123"


def test_fields_that_take_a_switch_or_auto_read_both_from_the_command_line(capsys):
    """The tiny and reference profiles pin compile_layers, use_liger_kernel and merge_micro_batches off: `auto` turns
    the planner back on from the command line, a number or switch still reads as one, any other text is refused."""
    config = config_from_args(["--profile", "qwen2.5-7b-reference", "--compile_layers", "auto", "--use_liger_kernel",
                               "auto", "--merge_micro_batches", "auto", "--eval_batch_size", "auto",
                               "--checkpointed_layers", "auto"])
    assert [config.compile_layers, config.use_liger_kernel, config.merge_micro_batches, config.eval_batch_size,
            config.checkpointed_layers] == ["auto"] * 5
    config = config_from_args(["--profile", "tiny", "--compile_layers", "1", "--eval_batch_size", "64",
                               "--checkpointed_layers", "none"])
    assert config.compile_layers is True and config.eval_batch_size == 64 and config.checkpointed_layers is None
    for flag, text, expected in (("--compile_layers", "maybe", "expected true or false or auto, got 'maybe'"),
                                 ("--eval_batch_size", "big", "expected int or auto, got 'big'"),
                                 ("--bf16", "auto", "expected true or false, got 'auto'")):
        with pytest.raises(SystemExit):
            config_from_args(["--profile", "tiny", flag, text])
        assert f"argument {flag}: {expected}" in capsys.readouterr().err


def test_lora_settings_are_flags_and_leave_full_fine_tunings_learning_rate_alone():
    config = config_from_args(["--profile", "tiny", "--lora_learning_rate", "5e-3", "--lora_modules_to_save", "none"])
    assert config.lora_learning_rate == 5e-3 and config.lora_modules_to_save is None
    assert config.learning_rate == PROFILES["tiny"]["learning_rate"]


def test_overrides_win_and_everything_else_comes_from_the_profile():
    config = get_config("tiny", learning_rate=5e-4)
    assert config.learning_rate == 5e-4
    assert all(getattr(config, k) == v for k, v in PROFILES["tiny"].items() if k != "learning_rate")
    assert config.output_dir.as_posix() == "checkpoints/tiny-ag-news"
    assert config.to_dict()["profile"] == "tiny"


@pytest.mark.parametrize("call", [
    lambda: get_config("tiny", learning_rat=1e-3),
    lambda: get_config("huge"),
    lambda: config_from_args(["--packing", "maybe"]),
])
def test_typos_and_unknown_profiles_fail_loudly(call):
    with pytest.raises((ValueError, SystemExit)):
        call()


def test_recipe_never_imports_the_lab_and_data_prep_never_imports_finetune():
    import ast
    from pathlib import Path

    def imported(path: Path) -> set[str]:
        tree = ast.parse(path.read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module} | {
            alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}

    root = Path(__file__).resolve().parents[1]
    for path in (root / "finetune").glob("*.py"):
        assert not any(name.startswith("finetune.lab") for name in imported(path)), path.name
    for path in (root / "data_prep").glob("*.py"):
        assert not any(name.startswith("finetune") for name in imported(path)), path.name


def test_every_module_is_named_in_the_layout_page():
    """docs/layout.md is where a newcomer looks for a module: a module it does not name is one nobody finds."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "layout.md").read_text()
    modules = [p for folder in ("data_prep", "finetune", "finetune/lab") for p in (root / folder).glob("*.py")
               if p.name != "__init__.py"]
    missing = [str(p.relative_to(root)) for p in modules if f"`{p.name}`" not in page and f"/{p.name}`" not in page]
    assert len(modules) > 50 and not missing, missing


def test_without_a_profile_the_command_line_trains_the_7b_recipe():
    config = config_from_args(["--model", "/models/Qwen2.5-7B-Instruct"])
    assert config.profile == "qwen2.5-7b" and config.tokenizer is None and config.bf16
    assert config.learning_rate == 2e-5 and config.num_train_epochs == 1.0


def test_a_commands_own_flags_take_no_abbreviation_and_join_the_help(capsys):
    """`evaluate --model <base>` once went to `--model_path` as its abbreviation, losing the base model."""
    command = command_parser()
    command.add_argument("--model_path")
    argv = ["--profile", "tiny", "--model", "/models/Qwen2.5-7B-Instruct"]
    assert config_from_args(argv, command=command).model == "/models/Qwen2.5-7B-Instruct"
    assert command.parse_known_args(argv)[0].model_path is None
    with pytest.raises(SystemExit):
        config_from_args(["--model_pth", "x"], command=command)
    with pytest.raises(SystemExit):
        config_from_args(["--help"], command=command)
    assert "--model_path" in capsys.readouterr().out


def test_a_commands_flag_named_like_a_field_is_the_commands_not_the_fields():
    """The benchmark's --warmup_steps counts its untimed steps; it once also set the learning rate's warm-up."""
    command = command_parser()
    command.add_argument("--warmup_steps", type=int, default=2)
    config, known = command_from_args(command, ["--profile", "tiny", "--warmup_steps", "3"])
    assert known.warmup_steps == 3 and config.warmup_steps == get_config("tiny").warmup_steps


def test_help_documents_every_field_in_its_group(capsys):
    """--help is read from the dataclass: every field has a line of help, listed under one of the groups."""
    from dataclasses import fields

    from finetune.config import GROUPS, RunConfig

    with pytest.raises(SystemExit):
        config_from_args(["--help"])
    text = capsys.readouterr().out
    for group in GROUPS:
        assert f"{group} options:" in text
    for f in fields(RunConfig):
        assert f.metadata["help"] and f.metadata["group"] in GROUPS
        if f.name != "profile":
            assert f"--{f.name}" in text
    assert "packed rows per micro-batch and GPU" in text


def test_the_reference_recipe_is_the_7b_recipe_without_speed_ups():
    """One flag away: the same hyperparameters, the same rows a step, none of the speed settings."""
    recipe, reference = get_config("qwen2.5-7b"), get_config("qwen2.5-7b-reference")
    learning = ("learning_rate", "num_train_epochs", "max_length", "lr_scheduler_type", "packing", "model", "bf16")
    assert all(getattr(recipe, k) == getattr(reference, k) for k in learning)
    assert recipe.per_device_train_batch_size * recipe.gradient_accumulation_steps == (
        reference.per_device_train_batch_size * reference.gradient_accumulation_steps)
    assert (reference.compile_layers, reference.fp8, reference.optimizer) == (False, None, "adamw_bf16_sr")
    assert "auto" in (recipe.compile_layers, recipe.fp8, recipe.optimizer)


def test_a_scratch_model_without_a_tokenizer_is_told_which_to_choose():
    """`--tokenizer none` means the model's own, and a scratch model has none: asking the hub for "scratch" would fail
    with a network error that says nothing of the cause."""
    from finetune.model import load_tokenizer

    with pytest.raises(ValueError, match="scratch model has no tokenizer of its own: choose --tokenizer bpe"):
        load_tokenizer(get_config("tiny", tokenizer=None))
