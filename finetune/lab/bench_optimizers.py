"""Do bf16 weights really update? Each optimizer option, trained through the same `build_trainer`, from the same
initial weights on the same batches at the reference learning rate, measured against the exact fp32 run.

    python -m finetune.lab.bench_optimizers --profile tiny --max_steps 50                    # CPU check
    python -m finetune.lab.bench_optimizers --profile tiny --bf16 true --hidden_size 1024 ...  # GPU measurement
"""

import dataclasses
import gc
import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
from transformers import TrainerCallback
from transformers.trainer_utils import SaveStrategy

from finetune.config import RunConfig, command_from_args, command_parser
from finetune.results import environment
from finetune.throughput import peak_memory_gib, reset_peak_memory
from finetune.speedups import OPTIMIZERS
from finetune.train import build_trainer


class UpdateProbe(TrainerCallback):
    """Records which weights the first optimizer step changed, and the weights at the end."""

    def __init__(self):
        self.first_step_changed = None
        self.initial = None
        self.final = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.initial = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            changed = sum(int((p.detach().float().cpu() != self.initial[n]).sum()) for n, p in model.named_parameters())
            self.first_step_changed = changed / sum(t.numel() for t in self.initial.values())

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.final = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}


def train_for_losses(config: RunConfig, callbacks: list[TrainerCallback] | None = None, after=None) -> dict:
    """Train `config` through `build_trainer`: every logged loss, the seconds training took and the peak memory, and
    whatever `after(trainer)` adds (e.g. the trained model's accuracy)."""
    reset_peak_memory()
    trainer = build_trainer(config, callbacks=callbacks)
    trainer.args.save_strategy = SaveStrategy.NO  # else the Trainer writes a checkpoint after the last step
    start = time.perf_counter()
    trainer.train()
    result = {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
              "seconds": time.perf_counter() - start, "peak_memory_gib": peak_memory_gib()}
    if after is not None:
        result.update(after(trainer))
    trainer.accelerator.free_memory()
    del trainer
    gc.collect()
    return result


def measure(config: RunConfig, optimizers: list[str]) -> dict:
    """Train each option for `config.max_steps`; compare its total weight change with the fp32-master run's."""
    runs = {}
    for optimizer in ["adamw_fp32_master", *(o for o in optimizers if o != "adamw_fp32_master")]:  # exact first
        probe = UpdateProbe()
        run_config = dataclasses.replace(config, optimizer=optimizer, run_name=f"optimizer-{optimizer}",
                                         save_steps=10**9)
        runs[optimizer] = {"probe": probe, **train_for_losses(run_config, callbacks=[probe])}
    exact = runs["adamw_fp32_master"]["probe"]
    exact_delta = {n: exact.final[n] - exact.initial[n] for n in exact.initial}
    results = {}
    for optimizer, run in runs.items():
        probe = run["probe"]
        delta = {n: probe.final[n] - probe.initial[n] for n in probe.initial}
        dot = sum(float((delta[n] * exact_delta[n]).sum()) for n in delta)
        norm = sum(float(delta[n].pow(2).sum()) for n in delta) ** 0.5
        exact_norm = sum(float(d.pow(2).sum()) for d in exact_delta.values()) ** 0.5
        results[optimizer] = {
            "first_step_fraction_of_weights_changed": probe.first_step_changed,
            "update_norm_ratio_to_fp32": norm / exact_norm,  # 1.0 = moved as far as exact arithmetic says
            "update_cosine_to_fp32": dot / max(norm * exact_norm, 1e-30),
            "final_loss": run["losses"][-1], "losses": run["losses"], "seconds": run["seconds"],
            "peak_memory_gib": run["peak_memory_gib"],
        }
    return results


def main(argv: list[str] | None = None) -> None:
    parser = command_parser()  # "--optim..." must not match a config field
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated, of " + ",".join(OPTIMIZERS))
    config, known = command_from_args(parser, argv, description=__doc__)
    results = measure(config, known.optimizers.split(","))
    out = Path(config.results_dir) / "optimizers"
    out.mkdir(parents=True, exist_ok=True)
    record = {"config": config.to_dict(), "options": results, "environment": environment(),
              "question": "with bf16 weights at the reference lr, does each optimizer move the weights as fp32 does?"}
    (out / "optimizers.json").write_text(json.dumps(record, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for optimizer, r in results.items():
        ax.plot(r["losses"], label=f"{optimizer} (update {r['update_norm_ratio_to_fp32']:.2f}x fp32)")
    ax.set_xlabel(f"log step (every {config.logging_steps} steps)")
    ax.set_ylabel("training loss")
    ax.set_title(f"Optimizer options at lr {config.learning_rate:g}")
    ax.legend()
    fig.savefig(out / "optimizers.png", dpi=120, bbox_inches="tight")
    print(f"{'optimizer':<20} {'changed@1':>10} {'|dw|/fp32':>10} {'cos':>6} {'final loss':>10}")
    for optimizer, r in results.items():
        print(f"{optimizer:<20} {r['first_step_fraction_of_weights_changed']:>10.3f} "
              f"{r['update_norm_ratio_to_fp32']:>10.3f} {r['update_cosine_to_fp32']:>6.3f} {r['final_loss']:>10.4f}")


if __name__ == "__main__":
    main()
