"""One config, two profiles: overrides from code and from the command line, and loud failures for typos."""

import pytest

from finetune.config import PROFILES, config_from_args, get_config


def test_cli_flags_are_typed_like_the_fields():
    config = config_from_args(["--profile", "tiny", "--learning_rate", "2e-4", "--max_train_samples", "100",
                               "--packing", "false", "--data_dir", "none", "--run_name", "123"])
    assert config.learning_rate == 2e-4 and config.max_train_samples == 100
    assert config.packing is False and config.data_dir is None and config.run_name == "123"


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


def test_the_fast_7b_profile_is_the_benchmarks_fastest_checked_row():
    """`qwen2.5-7b-fast` promises the speed measured for bench row 36 on the 7B shape: the same settings, and an FP8
    recipe that held bf16's loss."""
    from finetune.lab.bench import TRAIN_VARIANTS

    row = list(TRAIN_VARIANTS.values())[36]
    fast = {k: v for k, v in PROFILES["qwen2.5-7b-fast"].items() if k != "run_name"}
    assert fast == row and fast["fp8"] == "tensorwise_pow2_scales"
    config = get_config("qwen2.5-7b-fast")
    reference = get_config("qwen2.5-7b")
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps == (
        reference.per_device_train_batch_size * reference.gradient_accumulation_steps)  # the same rows a step
