"""Choose adapter settings without looking at the evaluation articles: each candidate trained, from the same
pretrained base as `finetune.lab.methods`, on 5,000 of the run's training articles and scored on the other 1,000
(the holdout carve, applied to the training side).

    python -m finetune.lab.lora_carve --profile tiny --candidates full:method=full lora:method=lora \\
        r64:method=lora,lora_rank=64,lora_alpha=128     # -> results/methods/carve/lora_carve.json

A candidate is a name and the RunConfig fields it changes (typed as the command line types them).
"""

import dataclasses
import json
from pathlib import Path

from data_prep.splits import Splits, make_splits
from finetune.config import RunConfig, command_from_args, command_parser, overrides_from_args
from finetune.data import load_splits
from finetune.evaluate import evaluate
from finetune.pretrain import pretrained_base
from finetune.results import environment
from finetune.train import train

CARVE_TRAIN_SIZE = 5000
CARVE_SEED = 7  # not the evaluation carve's seed: another draw of the training side


def parse_candidate(text: str) -> tuple[str, dict]:
    """"name:field=value,field=value" -> (name, typed overrides)."""
    name, _, fields = text.partition(":")
    argv = [token for pair in fields.split(",") if pair for token in ("--" + pair.split("=")[0], pair.split("=")[1])]
    return name, overrides_from_args(argv)[1]


def carve_splits(config: RunConfig) -> Splits:
    """The run's training articles carved in two: 5,000 to train candidates on, 1,000 to score them."""
    training_side = load_splits(config)
    return make_splits({"test": training_side.train}, training_side.source, "holdout", CARVE_TRAIN_SIZE, CARVE_SEED)


def carve_run_name(config: RunConfig, candidate: str) -> str:
    """The run (its folder under checkpoints/) that trains `candidate` on the carve."""
    return f"{config.run_name}-carve-{candidate}"


def score_candidates(config: RunConfig, candidates: dict[str, dict]) -> dict:
    """Label-scoring accuracy on the carve's 1,000 articles, per candidate, and its last logged training loss."""
    carve = carve_splits(config)
    base = str(pretrained_base(config)) if config.model == "scratch" else config.model
    out = Path(config.results_dir) / "methods" / "carve"
    scores = {}
    for name, overrides in candidates.items():
        # The base's own tokenizer: a BPE trained on the carve's 5,000 articles would not be the one it learned.
        run = dataclasses.replace(config, model=base, tokenizer=base, run_name=carve_run_name(config, name),
                                  results_dir=str(out), **overrides)
        final = train(run, splits=carve)
        record = evaluate(run, name, final, modes=("label_scoring",), splits=carve)
        history = json.loads((final / "train_summary.json").read_text())["log_history"]
        scores[name] = {"overrides": overrides,
                        "carve_accuracy": record["evaluations"]["label_scoring"]["metrics"]["accuracy"],
                        "final_training_loss": next(h["loss"] for h in reversed(history) if "loss" in h)}
        print(name, json.dumps(scores[name]), flush=True)
    return {"carve": carve.describe(), "config": config.to_dict(), "candidates": scores, "environment": environment()}


def main(argv: list[str] | None = None) -> None:
    parser = command_parser()
    parser.add_argument("--candidates", nargs="+", required=True, help="name:field=value,... (see above)")
    config, known = command_from_args(parser, argv, description=__doc__)
    record = score_candidates(config, dict(map(parse_candidate, known.candidates)))
    path = Path(config.results_dir) / "methods" / "carve" / "lora_carve.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
