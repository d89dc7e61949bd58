"""Rehearse the real run before downloading the weights: the four notebooks on the `qwen2.5-7b` profile, with the model
replaced by a stand-in folder laid out like the hub snapshot (random weights, see `finetune/lab/standin.py`).

    python -m finetune.lab.rehearse --shape 7b    # GPU: `make rehearse`; writes results/rehearsal/
    python -m finetune.lab.rehearse --shape tiny --bf16 false --optimizer adamw --max_steps 3    # CPU, as the test

It tells a user whether their card, driver and container hold the recipe, and what each step costs: model load,
training tokens/s, peak memory in training and evaluation, checkpoint write and reload, evaluation speed, disk.
Random weights learn the answer format within a few dozen steps, so the accuracies it reports are not Qwen's.
Any RunConfig field is a flag (`--max_steps 20` and `--logging_steps 5` by default; the rest is the profile's recipe).
"""

import json
import statistics
import sys
import time
from pathlib import Path

from finetune.config import RunConfig, command_parser, get_config, overrides_from_args
from finetune.data import load_splits
from finetune.disk import (OutOfDisk, check_disk, folder_bytes, free_bytes, same_disk, saved_tokenizer_bytes,
                           written_bytes)
from finetune.lab.notebooks import NOTEBOOKS, notebook_parameters, run_notebooks
from finetune.lab.standin import HUB_ID, standin_shape, write_standin
from finetune.lab.measurements import RECIPE_ROW
from finetune.opening import planned_row_tokens
from finetune.plan import GPU, plan_training
from finetune.qwen_tokenizer import build_qwen25_tokenizer
from finetune.results import environment

PROFILE = "qwen2.5-7b"


def rehearse(shape: str, standin: Path, overrides: dict) -> dict:
    """Write the stand-in (unless it exists), run every notebook on it, and return the timings the notebooks'
    results files do not hold themselves."""
    facts = {"shape": shape, "standin": str(standin), "overrides": overrides}
    if not (standin / "config.json").exists():
        start = time.perf_counter()
        write_standin(standin, shape, cache_dir=Path(overrides.get("checkpoints_dir", "checkpoints")) / "tokenizers")
        facts["standin_write_seconds"] = time.perf_counter() - start
    facts["standin_gb"] = folder_bytes(standin) / 1e9
    config = get_config(PROFILE, **overrides, model=str(standin))
    parameters = notebook_parameters(PROFILE, {**overrides, "model": str(standin)})
    facts["notebook_seconds"] = {}
    for name in NOTEBOOKS:
        start = time.perf_counter()
        run_notebooks(parameters, Path(config.results_dir) / "notebooks", names=(name,))
        facts["notebook_seconds"][name] = time.perf_counter() - start
    facts["checkpoints_gb"] = folder_bytes(config.output_dir) / 1e9
    summary = config.final_dir / "train_summary.json"
    (Path(config.results_dir) / "train_summary.json").write_text(summary.read_text())
    return facts


def check_room(config: RunConfig, standin: Path, shape: str) -> str:
    """The stand-in and the run's saves, counted before either is written: a disk that cannot hold both would stop
    the rehearsal minutes in, at a save (training checks its own saves again, with the stand-in there by then).
    The plan chooses the moments, which set a checkpoint's size, by the tokens a row runs: counted here with the
    stand-in's tokenizer (Qwen2.5's, offline) on the run's own training articles, as training will count them."""
    model = standin_shape(shape)
    tokenizer = build_qwen25_tokenizer(Path(config.checkpoints_dir) / "tokenizers")
    row_tokens = planned_row_tokens(config, tokenizer, list(load_splits(config).train["text"]))
    planned, _ = plan_training(config, GPU.current(), model, row_tokens=row_tokens)
    standin_bytes = 0 if (standin / "config.json").exists() else model.parameters * 2  # bf16 weights
    shared = same_disk(standin, config.output_dir)
    if not shared and standin_bytes > free_bytes(standin):
        raise OutOfDisk(f"The stand-in ({standin_bytes / 1e9:.1f} GB) would not fit in {standin}: "
                        f"{free_bytes(standin) / 1e9:.1f} GB free. --standin <a folder on a larger disk>.")
    free = free_bytes(config.output_dir) - (standin_bytes if shared else 0)
    if config.max_steps <= 0:  # by epochs: the steps are known once the data is packed, where training counts them
        return f"the stand-in fits; the saves are counted by training ({free / 1e9:.1f} GB free beside the stand-in)"
    try:
        return check_disk(planned, model, config.max_steps, free, written_bytes(config.output_dir),
                          saved_tokenizer_bytes(tokenizer))
    except OutOfDisk as error:
        if not shared or not standin_bytes:
            raise
        raise OutOfDisk(f"{error} The {standin_bytes / 1e9:.1f} GB stand-in would take the same disk first: "
                        "--standin <a folder on another disk> leaves it to the run.") from None


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _row(label: str, value) -> str:
    return f"| {label} | {value} |"


def _num(value, fmt: str = "{:,.1f}") -> str:
    return "not recorded" if value is None else fmt.format(value)


def rehearsal_table(results_dir: Path) -> str:
    """What each step cost, as a markdown table read from a rehearsal's files (its README and docs/hardware.md)."""
    facts = json.loads((results_dir / "rehearsal.json").read_text())
    base = json.loads((results_dir / "base_model_results.json").read_text())
    tuned = json.loads((results_dir / "finetuned_model_results.json").read_text())
    train = json.loads((results_dir / "train_summary.json").read_text())
    # The throughput callback's figures live in the TensorBoard scalars: one per logging interval after the first.
    rates, mfu = (sorted(train["tensorboard"].get(f"train/{tag}", {"values": []})["values"])
                  for tag in ("tokens_per_second", "mfu"))
    lines = [
        "| step | measured |",
        "|---|---|",
        _row("stand-in written (s)", _num(facts["standin_write_seconds"]) if "standin_write_seconds" in facts
             else "already there: written before this run"),
        _row("stand-in size on disk (GB)", _num(facts["standin_gb"], "{:.2f}")),
        _row("base model load, sharded `from_pretrained` (s)", _num(base.get("model_load_seconds"))),
        _row("base evaluation peak GPU memory (GiB)", _num(base.get("peak_memory_gib"))),
        _row("training setup: data, tokenizer, model (s)", _num(train.get("setup_seconds"))),
        _row("optimizer steps", train["log_history"][-1]["step"]),
        _row("training tokens/s per GPU, MFU (medians over logging intervals)",
             f"{_num(median(rates), '{:,.0f}')}, {_num(median(mfu), '{:.1%}')}"),
        _row("training peak GPU memory (GiB)", _num(train.get("peak_memory_gib"))),
        _row("checkpoint write, model + optimizer state (s, the last one)",
             _num(train["checkpoint_save_seconds"][-1] if train.get("checkpoint_save_seconds") else None)),
        _row("final model write (s)", _num(train.get("final_save_seconds"))),
        _row("checkpoints folder on disk (GB)", _num(facts["checkpoints_gb"], "{:.1f}")),
        _row("fine-tuned model reload (s)", _num(tuned.get("model_load_seconds"))),
        _row("post-training evaluation peak GPU memory (GiB)", _num(tuned.get("peak_memory_gib"))),
    ]
    for name, record in (("base", base), ("fine-tuned", tuned)):
        for mode, ev in record["evaluations"].items():
            lines.append(_row(f"{name} {mode}: articles/s, accuracy",
                              f"{ev['throughput']['articles_per_second']:,.1f}, {ev['metrics']['accuracy']:.2%}"))
    lines += same_run_rows(facts.get("same_run", {}), median(rates), tuned)
    return "\n".join(lines)


def same_run_rows(same_run: dict, rehearsal_rate: float | None, tuned: dict) -> list[str]:
    """The benchmark rows measured at the rehearsal's commit on the same kind of GPU, in the same session, and the
    notebook path's share of them: training tokens/s against the benchmark's recipe row, label scoring against the
    benchmark's."""
    rows = []
    if "train" in same_run:
        record = json.loads(Path(same_run["train"]).read_text())
        recipe = next((v for n, v in record["variants"].items() if n == RECIPE_ROW
                       and "tokens_per_second" in v), None)
        if recipe:
            rows += [_row(f"benchmark's recipe row, same commit (`{Path(same_run['train']).name}`): tokens/s, MFU",
                          f"{recipe['tokens_per_second']:,.0f}, {recipe['mfu']:.1%}"),
                     _row("notebook path's training tokens/s / benchmark's",
                          _num(rehearsal_rate / recipe["tokens_per_second"] if rehearsal_rate else None, "{:.2f}"))]
    if "eval" in same_run:
        record = json.loads(Path(same_run["eval"]).read_text())
        scoring = record["modes"].get("label_scoring")
        if scoring:
            ours = tuned["evaluations"]["label_scoring"]["throughput"]["articles_per_second"]
            rows += [_row(f"benchmark's label scoring, same commit (`{Path(same_run['eval']).name}`): articles/s",
                          f"{scoring['articles_per_second']:,.1f} (batch {scoring['batch_size']})"),
                     _row("notebook path's label scoring / benchmark's",
                          f"{ours / scoring['articles_per_second']:.2f}")]
    return rows


def readme(results_dir: Path) -> str:
    """results/rehearsal/README.md, every figure read from the files beside it."""
    facts = json.loads((results_dir / "rehearsal.json").read_text())
    base = json.loads((results_dir / "base_model_results.json").read_text())
    env = facts["environment"]
    gpu = env["hardware"]["gpu"]
    return "\n".join([
        f"# Rehearsal: the `{PROFILE}` profile on a stand-in for `{HUB_ID}` ({facts['shape']} shape)",
        "",
        "Generated by `python -m finetune.lab.rehearse` (command below); do not edit by hand. The stand-in has the hub "
        "snapshot's files (config, generation config, tokenizer, sharded safetensors) and random weights, so the "
        "accuracies show at most whether the answer format is learned: they are **not** Qwen2.5's.",
        "",
        f"Hardware: {gpu['name'] if gpu else 'CPU'}; commit `{(env['git_commit'] or 'unknown')[:7]}`; data: "
        f"{base['data']['protocol']} protocol, {base['data']['train_size']} training and "
        f"{base['data']['eval_size']} evaluation articles.",
        "",
        "```bash",
        facts["command"],
        "```",
        "",
        rehearsal_table(results_dir),
        "",
        "Wall time of each notebook (s): " + ", ".join(
            f"`{name}` {seconds:.0f}" for name, seconds in facts["notebook_seconds"].items()),
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = command_parser()
    parser.add_argument("--shape", choices=["tiny", "7b"], default="7b")
    parser.add_argument("--standin", help="stand-in folder (default checkpoints/standin-<shape>; written if missing)")
    parser.add_argument("--same_run", nargs="*", default=None, metavar="BENCH_JSON", help="only rewrite the README, "
                        "adding the train and eval benchmark files measured right after the rehearsal on its machine")
    argv = sys.argv[1:] if argv is None else argv
    known = parser.parse_known_args(argv)[0]
    defaults = {"run_name": f"rehearsal-{known.shape}", "max_steps": 20, "logging_steps": 5,
                "results_dir": "results/rehearsal"}
    _, overrides = overrides_from_args(["--profile", PROFILE, *[f"--{k}={v}" for k, v in defaults.items()], *argv],
                                       description=__doc__, command=parser)
    overrides.pop("model", None)  # the stand-in is the model
    config = get_config(PROFILE, **overrides)
    standin = Path(known.standin or Path(config.checkpoints_dir) / f"standin-{known.shape}")
    results_dir = Path(config.results_dir)
    if known.same_run is not None:
        facts = json.loads((results_dir / "rehearsal.json").read_text())
        facts["same_run"] = {json.loads(Path(p).read_text())["benchmark"]: p for p in known.same_run}
        (results_dir / "rehearsal.json").write_text(json.dumps(facts, indent=2) + "\n")
        (results_dir / "README.md").write_text(readme(results_dir))
        print(f"done: {results_dir}/README.md")
        return
    try:
        print(f"disk: {check_room(config, standin, known.shape)}")
    except OutOfDisk as error:
        raise SystemExit(f"error: {error}") from None
    facts = rehearse(known.shape, standin, overrides)
    facts["command"] = "python -m finetune.lab.rehearse " + " ".join(argv if argv is not None else sys.argv[1:])
    facts["environment"] = environment()
    (results_dir / "rehearsal.json").write_text(json.dumps(facts, indent=2) + "\n")
    (results_dir / "README.md").write_text(readme(results_dir))
    print(f"done: {results_dir}/README.md")


if __name__ == "__main__":
    main()
