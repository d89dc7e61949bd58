"""FSDP2 (configs/accelerate/fsdp2.yaml) with 2 processes on the CPU (gloo): same losses as one process.

Two things accelerate 1.15 does on the CPU that this test works around, found by reading its source:
- `accelerate launch --cpu` always takes the simple launcher (commands/launch.py: `elif args.use_fsdp and not
  args.cpu: multi_gpu_launcher`), i.e. ONE plain process with no FSDP, whatever --num_processes says. So the launch
  below leaves --cpu out: torchrun starts 2 ranks and the Trainer's use_cpu=True (no CUDA) picks gloo.
- With use_cpu the state is MULTI_CPU, and AcceleratorState only turns ACCELERATE_USE_FSDP into DistributedType.FSDP
  for MULTI_GPU/XPU/NPU/... (state.py), so the ranks silently run DDP. A small wrapper (written below) makes
  MULTI_CPU + an FSDP plugin mean FSDP, the same assignment state.py makes for GPUs; torch's fully_shard itself
  works on CPU tensors over gloo (the parameters become DTensors sharded on dim 0).
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

WRAPPER = '''
import runpy, sys
import accelerate.state as S
from accelerate.utils import DistributedType
_init = S.AcceleratorState.__init__
def __init__(self, *a, fsdp_plugin=None, **kw):
    _init(self, *a, fsdp_plugin=fsdp_plugin, **kw)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
S.AcceleratorState.__init__ = __init__
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''

# Global batch 8 either way: 1 x 8, or 2 ranks x 4 (accelerate hands consecutive per-rank batches of one seeded
# permutation to the ranks, so both runs see the same 8 articles per step). Packing off: packed rows carry different
# token counts per rank; the loss is still token-weighted globally, but unpacked rows keep the comparison simple.
COMMON = ["--profile", "tiny", "--holdout_train_size", "300", "--vocab_size", "512", "--hidden_size", "64",
          "--num_heads", "4", "--intermediate_size", "128", "--max_length", "128", "--max_steps", "4",
          "--logging_steps", "1", "--save_steps", "1000", "--warmup_steps", "0", "--packing", "false"]


def _losses_from_summary(final: Path) -> list[float]:
    history = json.loads((final / "train_summary.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


@pytest.mark.slow
def test_fsdp2_two_cpu_processes_match_single_process(synthetic_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    common = COMMON + ["--data_dir", str(synthetic_dir), "--checkpoints_dir", str(tmp_path / "ck"),
                       "--results_dir", str(tmp_path / "results")]
    start = time.perf_counter()
    # The single-process run goes first: it also trains and caches the BPE tokenizer under ck/tokenizers, so the two
    # FSDP ranks load it instead of both writing it at once.
    subprocess.run([sys.executable, "-m", "finetune.train", *common, "--run_name", "single",
                    "--per_device_train_batch_size", "8"], cwd=ROOT, env=env, check=True, capture_output=True)
    single = _losses_from_summary(tmp_path / "ck" / "single" / "final")

    wrapper = tmp_path / "cpu_fsdp.py"
    wrapper.write_text(WRAPPER)
    # mixed_precision no: the reference run is fp32 (tiny profile bf16=False), and bf16 would make "equal" loose.
    # Activation checkpointing off: it recomputes the same numbers, so it cannot change the loss, and on CPU it only
    # costs time; the GPU config keeps it on.
    fsdp = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/fsdp2.yaml",
         "--num_processes", "2", "--main_process_port", "29533", "--mixed_precision", "no",
         "--fsdp_activation_checkpointing", "false", str(wrapper), "finetune/train.py", *common,
         "--run_name", "fsdp", "--per_device_train_batch_size", "4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    output = fsdp.stdout + fsdp.stderr

    summary = tmp_path / "ck" / "fsdp" / "final"
    if (summary / "train_summary.json").exists():
        sharded = _losses_from_summary(summary)
    else:  # the rank-0 Trainer log lines (4 significant digits), the same numbers log_history holds
        sharded = [float(x) for x in re.findall(r"'loss': '([0-9.]+)'", output)]
    print(f"\nsingle-process losses: {single}\nFSDP2 2-process losses: {sharded}\nboth runs: {elapsed:.1f}s")
    assert len(sharded) == len(single) == 4, output[-3000:]
    assert sharded == pytest.approx(single, rel=2e-3)

    if fsdp.returncode != 0:
        # Seen with accelerate 1.15 / torch 2.13: the end-of-training checkpoint's FULL_STATE_DICT gather
        # (get_model_state_dict, then save_pretrained's tied-weight check touching a DTensor) desyncs the ranks.
        errors = [line.strip() for line in output.splitlines() if "what():" in line or re.search(r"rank\d\]: \w*Error", line)]
        pytest.xfail("FSDP2 on CPU trains with matching losses, but Trainer.save_model fails: " + " | ".join(errors[:2]))
