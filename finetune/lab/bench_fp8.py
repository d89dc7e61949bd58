"""Does FP8 change what is learned? The same model trained through `build_trainer` in bf16 and with each FP8 recipe,
from the same initial weights on the same batches, every step's loss recorded, and the end of training compared.

Beside them, bf16 again with another stream of the optimizer's stochastic rounding (the only randomness left once the
weights and batches are fixed): how far rounding noise alone moves the same run, the yardstick for FP8's own rounding.

    python -m finetune.lab.bench_fp8 --profile tiny --bf16 true --hidden_size 1024 ... --max_steps 60   # GPU (FP8)
    python -m finetune.lab.bench_fp8 --profile qwen2.5-7b-shape --recipes tensorwise_pow2_scales --max_steps 200 \
        --evaluate --name fp8_7b                                           # the recipe at the 7B shape (make gpu-fp8-7b)

With `--evaluate`, each trained model's weights are also scored (label scoring, bf16, no FP8) on the held-out articles:
a model that learned the answer format and the labels reads them, one that learned less reads fewer.
"""

import dataclasses
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import PercentFormatter
from transformers import TrainerCallback

from finetune.config import RunConfig, command_from_args, command_parser
from finetune.lab.bench_optimizers import train_for_losses
from finetune.lab.fp8_recipes import COMPARISON
from finetune.model import load_model
from finetune.predict import score_labels
from finetune.results import environment

# FP8 passes if the mean loss over the last quarter of the steps is within this fraction of bf16's: set before
# measuring, tight enough that a recipe which learns less (a loss that stalls) fails, loose enough for the rounding of
# one short run. The per-step differences are recorded beside it.
FINAL_LOSS_TOLERANCE = 0.02


class ReseedRounding(TrainerCallback):
    """Another stream of the optimizer's stochastic rounding (its `rounding_seed`) once the weights are built; the
    weights' initialisation and the batches' order keep the run's seed."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
        inner.rounding_seed = self.seed


def losses(config: RunConfig, fp8: str | None, rounding_seed: int | None = None, evaluate: bool = False) -> dict:
    """Every optimizer step's training loss, the time it took and the peak memory, for one precision; with
    `evaluate`, the trained weights' label-scoring accuracy on the held-out articles."""
    name = f"fp8-{fp8 or 'bf16'}" + (f"-rounding{rounding_seed}" if rounding_seed is not None else "")
    return train_for_losses(dataclasses.replace(config, fp8=fp8, logging_steps=1, save_steps=10**9, run_name=name),
                            callbacks=[ReseedRounding(rounding_seed)] if rounding_seed is not None else None,
                            after=held_out_accuracy if evaluate else None)


def held_out_accuracy(trainer) -> dict:
    """The trained weights loaded into a plain bf16 model (what the saved model would be), scored on the held-out
    articles: FP8 and compilation are how the weights were trained, not how they are read."""
    config = dataclasses.replace(trainer.run_config, fp8=None, compile_layers=False, use_liger_kernel=False)
    model = load_model(config, trainer.processing_class, "sdpa")
    model.load_state_dict(trainer.model.state_dict())
    model.eval()
    texts, labels = list(trainer.splits.eval["text"]), trainer.splits.eval["label"].to_numpy()
    predictions = score_labels(model, trainer.processing_class, texts, 256, config.max_length, progress=False)
    del model
    return {"held_out_accuracy": float((predictions.labels == labels).mean()), "held_out_articles": len(texts)}


def compare(config: RunConfig, recipes: tuple[str, ...] = COMPARISON, evaluate: bool = False) -> dict:
    """bf16 first (the reference), bf16 with other rounding draws (the noise floor), then each FP8 recipe."""
    runs = {"bf16": losses(config, None, evaluate=evaluate),
            "bf16, other rounding draws": losses(config, None, rounding_seed=1, evaluate=evaluate),
            **{recipe: losses(config, recipe, evaluate=evaluate) for recipe in recipes}}
    reference = runs["bf16"]["losses"]
    tail = max(1, len(reference) // 4)
    reference_end = sum(reference[-tail:]) / tail
    for name, run in runs.items():
        end = sum(run["losses"][-tail:]) / tail
        run["final_loss_mean_last_quarter"] = end
        run["final_loss_relative_difference"] = abs(end - reference_end) / reference_end
        run["max_step_relative_difference"] = max(abs(a - b) / b for a, b in zip(run["losses"], reference))
        run["within_tolerance"] = run["final_loss_relative_difference"] <= FINAL_LOSS_TOLERANCE
    return runs


def plot_losses(record: dict) -> plt.Figure:
    """Each run's loss per step, and beside it the difference from bf16's at each step: the curves lie on top of each
    other, and the differences are what the tolerance judges. The legend sits below the panels, clear of the curves."""
    runs, config = record["runs"], record["config"]
    fig, (loss_ax, diff_ax) = plt.subplots(1, 2, figsize=(10, 4.6), layout="constrained")
    bf16 = np.asarray(runs["bf16"]["losses"])
    for name, run in runs.items():
        losses = np.asarray(run["losses"])
        label = f"{name} (last quarter {run['final_loss_mean_last_quarter']:.3f})"
        line, = loss_ax.plot(losses, linewidth=1, label=label)
        if name != "bf16":
            diff_ax.plot((losses - bf16) / bf16, linewidth=1, color=line.get_color())
    loss_ax.set_yscale("log")
    loss_ax.set_ylabel("training loss")
    diff_ax.axhline(0, color="grey", linewidth=0.8)
    diff_ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    diff_ax.set_ylabel("loss relative to bf16's")
    for ax in (loss_ax, diff_ax):
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"FP8 vs bf16: {config['hidden_size']}-wide, {config['num_layers']} layers, "
                 f"lr {config['learning_rate']:g}")
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = command_parser()
    parser.add_argument("--recipes", default=",".join(COMPARISON), help="which FP8 recipes, comma-separated")
    parser.add_argument("--name", default="fp8_vs_bf16", help="the results' file name, without extension")
    parser.add_argument("--evaluate", action="store_true", help="score each trained model on the held-out articles")
    config, known = command_from_args(parser, argv, description=__doc__)
    runs = compare(config, tuple(r for r in known.recipes.split(",") if r), known.evaluate)
    out = Path(config.results_dir) / "fp8"
    out.mkdir(parents=True, exist_ok=True)
    record = {"question": "trained with FP8 matmuls from the same weights on the same batches, does the model reach "
                          "bf16's loss?", "tolerance": {"final_loss_relative_difference": FINAL_LOSS_TOLERANCE},
              "config": config.to_dict(), "runs": runs, "environment": environment()}
    (out / f"{known.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    plot_losses(record).savefig(out / f"{known.name}.png", dpi=120, bbox_inches="tight")
    for name, run in runs.items():
        print(f"{name:<11} last-quarter loss {run['final_loss_mean_last_quarter']:.4f}  vs bf16 "
              f"{run['final_loss_relative_difference']:.2%} (max step {run['max_step_relative_difference']:.2%})  "
              f"{'within' if run['within_tolerance'] else 'OUTSIDE'} {FINAL_LOSS_TOLERANCE:.0%}  {run['seconds']:.0f} s"
              + (f"  held-out accuracy {run['held_out_accuracy']:.2%}" if "held_out_accuracy" in run else ""))
    print(f"wrote {out / known.name}.json")


if __name__ == "__main__":
    main()
