"""FSDP2 (configs/accelerate/fsdp2.yaml) with 2 processes on the CPU (gloo): it trains as one process does, saves a
model that plain `from_pretrained` loads, resumes from either checkpoint format, rounds sharded bf16 weights
stochastically, and benchmarks with one writer.

Two things accelerate 1.15 does on the CPU that these tests work around, found by reading its source:
- `accelerate launch --cpu` always takes the simple launcher (commands/launch.py: `elif args.use_fsdp and not
  args.cpu: multi_gpu_launcher`), i.e. ONE plain process with no FSDP, whatever --num_processes says. So the launches
  below leave --cpu out: torchrun starts 2 ranks and the Trainer's use_cpu=True (no CUDA) picks gloo.
- With use_cpu the state is MULTI_CPU, and AcceleratorState only turns ACCELERATE_USE_FSDP into DistributedType.FSDP
  for MULTI_GPU/XPU/NPU/... (state.py), so the ranks silently run DDP. WRAPPER makes MULTI_CPU + an FSDP plugin mean
  FSDP with both assignments state.py makes for GPUs: on the AcceleratorState and on the PartialState that every later
  AcceleratorState() copies from. (With the first alone, the state fell back to MULTI_CPU before the end-of-training
  save, rank 0 gathered the shards by itself, and gloo failed: what this file used to mark as an expected failure.)
torch's fully_shard itself works on CPU tensors over gloo (the parameters become DTensors sharded on dim 0).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from finetune.train import last_checkpoint

ROOT = Path(__file__).resolve().parents[1]

WRAPPER = '''
import atexit, runpy, sys
import accelerate.state as S
from torch.distributed.fsdp._fully_shard import _fsdp_param_group
from accelerate.utils import DistributedType
_init = S.AcceleratorState.__init__
def __init__(self, *a, fsdp_plugin=None, **kw):
    _init(self, *a, fsdp_plugin=fsdp_plugin, **kw)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        S.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
S.AcceleratorState.__init__ = __init__
gathers, _foreach_all_gather = [0], _fsdp_param_group.foreach_all_gather
def foreach_all_gather(*args, **kwargs):  # one call gathers one FSDP unit's weights
    gathers[0] += 1
    return _foreach_all_gather(*args, **kwargs)
_fsdp_param_group.foreach_all_gather = foreach_all_gather
atexit.register(lambda: print(f"FSDP all-gathers on this rank: {gathers[0]}", flush=True))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''

# Global batch 8 either way: 1 x 8, or 2 ranks x 4 (accelerate hands consecutive per-rank batches of one seeded
# permutation to the ranks, so both runs see the same 8 articles per step). Packing off: packed rows carry different
# token counts per rank; the loss is still token-weighted globally, but unpacked rows keep the comparison simple.
# An untied LM head, as in the 7B shape: accelerate then puts the final norm and the head in one FSDP unit, and the
# head's weight is read by TRL's fused loss without its forward running (configs/accelerate/fsdp2.yaml). A constant
# learning rate (no warm-up): an interrupted run stops by max_steps, and a schedule over max_steps would differ.
COMMON = ["--profile", "tiny", "--holdout_train_size", "300", "--vocab_size", "512", "--hidden_size", "64",
          "--num_heads", "4", "--intermediate_size", "128", "--max_length", "128", "--tie_word_embeddings", "false",
          "--logging_steps", "1", "--lr_scheduler_type", "constant", "--packing", "false"]


@pytest.fixture(scope="module")
def launch(synthetic_dir, tmp_path_factory):
    """`launch(script, *flags)` runs a repository script on 2 FSDP2 ranks and returns the finished process;
    `launch.single(*flags)` runs finetune.train in one process. Both write under one temporary folder."""
    folder = tmp_path_factory.mktemp("fsdp")
    wrapper = folder / "cpu_fsdp.py"
    wrapper.write_text(WRAPPER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    common = COMMON + ["--data_dir", str(synthetic_dir), "--checkpoints_dir", str(folder / "ck"),
                       "--results_dir", str(folder / "results"), "--per_device_train_batch_size", "4"]

    def run(script: str, *flags: str, accelerate_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        """`flags` go first (the benchmark's own come before the config's) and must not repeat the common ones."""
        # mixed_precision stays the run config's (fp32 for tiny): bf16 would make "equal" loose. FSDP's activation
        # checkpointing recomputes the same numbers, so it cannot change the loss; on CPU it only costs time.
        done = subprocess.run(
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/fsdp2.yaml",
             "--num_processes", "2", "--main_process_port", "29533", "--fsdp_activation_checkpointing", "false",
             *accelerate_flags, str(wrapper), script, *flags, *common],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        if "--run_name" in flags:
            run.outputs[flags[flags.index("--run_name") + 1]] = done.stdout
        return done

    def single(*flags: str) -> None:
        subprocess.run([sys.executable, "-m", "finetune.train", *common, *flags], cwd=ROOT, env=env, check=True,
                       capture_output=True)

    run.single, run.checkpoints, run.results, run.outputs = single, folder / "ck", folder / "results", {}
    return run


@pytest.fixture(scope="module")
def uninterrupted(launch):
    """4 steps on 2 ranks with FULL_STATE_DICT checkpoints every 2 steps (the accelerate config's format). It runs
    first, so both ranks need the BPE tokenizer that is not cached yet: one builds it while the other waits."""
    launch("finetune/train.py", "--run_name", "fsdp", "--max_steps", "4", "--save_steps", "2")
    return launch.checkpoints / "fsdp"


@pytest.fixture(scope="module")
def single(launch, uninterrupted):
    """The same 4 steps in one process, on the same global batch of 8."""
    launch.single("--run_name", "single", "--max_steps", "4", "--per_device_train_batch_size", "8")
    return launch.checkpoints / "single"


def _losses(final: Path) -> list[float]:
    summary = json.loads((final / "train_summary.json").read_text())
    return [h["loss"] for h in summary["log_history"] if "loss" in h]


def _all_gathers(output: str) -> int:
    """All-gathers of FSDP units on each rank, as WRAPPER counts them (both ranks do the same)."""
    counts = set(re.findall(r"FSDP all-gathers on this rank: (\d+)", output))
    assert len(counts) == 1, output[-2000:]
    return int(counts.pop())


def _logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.arange(3, 67).reshape(2, 32)).logits


@pytest.mark.slow
def test_bf16_weights_stay_bf16_shards_under_fsdp(launch):
    """FSDP2's mixed precision is fp32 shards with bf16 compute (adamw_fp32_master): accelerate upcasts every trained
    weight to fp32 as it shards it. The optimizers that keep bf16 weights run with it off, so that stochastic rounding
    has bf16 weights to round into: the saved model (gathered from the shards) is bf16, as one process saves it."""
    launch("finetune/train.py", "--run_name", "bf16", "--max_steps", "1", "--save_steps", "100", "--bf16", "true",
           "--optimizer", "adamw_bf16_sr")
    saved = load_file(launch.checkpoints / "bf16" / "final" / "model.safetensors")
    assert {tensor.dtype for tensor in saved.values()} == {torch.bfloat16}


@pytest.mark.slow
def test_two_ranks_train_like_one_process_and_save_a_model_from_pretrained_loads(single, uninterrupted):
    single, sharded = single / "final", uninterrupted / "final"
    assert len(_losses(sharded)) == 4 and _losses(sharded) == pytest.approx(_losses(single), rel=1e-5)
    assert json.loads((sharded / "train_summary.json").read_text())["world_size"] == 2
    # Saved by rank 0 from the gathered shards, loaded with no FSDP: the same model the single process trained.
    torch.testing.assert_close(_logits(sharded), _logits(single), atol=1e-5, rtol=1e-5)
    checkpoint = uninterrupted / "checkpoint-4"
    assert {"pytorch_model_fsdp.bin", "optimizer.bin", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"} <= {
        p.name for p in checkpoint.iterdir()}
    assert last_checkpoint(uninterrupted, world_size=2) == str(checkpoint)
    with pytest.raises(RuntimeError, match=r"missing RNG state \(rng_state.pth\).*another number of processes"):
        last_checkpoint(uninterrupted, world_size=1)


@pytest.mark.slow
def test_weights_are_gathered_once_per_optimizer_step_whatever_the_gradient_accumulation(launch, uninterrupted):
    """Two micro-batches a step: the weights stay gathered from the first forward to the last backward (the accelerate
    config's reshard_after_forward false), so a step gathers each unit once, as with one micro-batch; resharding after
    every forward and backward gathers more often and trains the same."""
    flags = ("--max_steps", "2", "--save_steps", "100", "--gradient_accumulation_steps", "2")
    launch("finetune/train.py", "--run_name", "gathered", *flags)
    launch("finetune/train.py", "--run_name", "resharded", *flags,
           accelerate_flags=("--fsdp_reshard_after_forward", "true"))
    per_step = {name: _all_gathers(launch.outputs[name]) / steps
                for name, steps in (("fsdp", 4), ("gathered", 2), ("resharded", 2))}
    assert per_step["gathered"] == per_step["fsdp"] < per_step["resharded"]
    gathered, resharded = (_losses(launch.checkpoints / name / "final") for name in ("gathered", "resharded"))
    assert len(gathered) == 2 and gathered == pytest.approx(resharded, rel=1e-5)


@pytest.mark.slow
def test_run_resumed_from_a_sharded_checkpoint_ends_where_the_uninterrupted_run_does(launch, uninterrupted):
    """Stopped after the step-2 checkpoint (SHARDED_STATE_DICT: every rank writes its shards), then run again."""
    sharded = ("--fsdp_state_dict_type", "SHARDED_STATE_DICT")
    flags = ("--run_name", "resumed", "--save_steps", "2")
    launch("finetune/train.py", *flags, "--max_steps", "2", accelerate_flags=sharded)
    checkpoint = launch.checkpoints / "resumed" / "checkpoint-2"
    assert {"pytorch_model_fsdp_0", "optimizer_0"} <= {p.name for p in checkpoint.iterdir()}
    assert last_checkpoint(checkpoint.parent, world_size=2) == str(checkpoint)  # complete: every part is there
    # DCP writes .metadata once every rank's shards are on disk: without it the optimizer state is cut off.
    metadata = checkpoint / "optimizer_0" / ".metadata"
    metadata.rename(checkpoint / "held.metadata")
    with pytest.raises(RuntimeError, match=r"checkpoint-2 is incomplete \(missing optimizer state"):
        last_checkpoint(checkpoint.parent, world_size=2)
    (checkpoint / "held.metadata").rename(metadata)
    # max_steps 2, then 4: a changed run config, which resuming refuses unless allowed. Under the constant learning
    # rate here it is the same training, stopped early.
    launch("finetune/train.py", *flags, "--max_steps", "4", "--allow_config_change", "true", accelerate_flags=sharded)
    resumed = launch.checkpoints / "resumed" / "final"
    assert json.loads((resumed / "train_summary.json").read_text())["resumed_from"] == str(checkpoint)
    assert _losses(resumed) == pytest.approx(_losses(uninterrupted / "final"), rel=1e-5)
    torch.testing.assert_close(_logits(resumed), _logits(uninterrupted / "final"), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_benchmark_on_two_ranks_writes_one_record_with_per_gpu_figures(launch):
    """Packing off and 4 rows a rank (launch's flags), each row one article: a step's token count sums both ranks'
    8 articles, the rate is one rank's 4 a step. Articles here are 80-128 tokens, ~94 on average with a spread of ~9,
    so 8 of them average within ~3% (one standard deviation) of the training set's mean: hence 15%. Counting one
    rank's tokens, or the rate not divided among the GPUs, is off by 2x."""
    flags = ("train", "--name", "fsdp_smoke", "--variants", "0,1", "--warmup_steps", "1", "--measured_steps", "1")
    output = launch("finetune/lab/bench.py", *flags).stdout
    record = json.loads((launch.results / "benchmarks" / "fsdp_smoke.json").read_text())
    assert record["world_size"] == 2 and output.count("wrote ") == 1
    fsdp_checkpointing, trainer_checkpointing = record["variants"].values()
    assert fsdp_checkpointing["overrides"] == {"gradient_checkpointing": False, "fsdp_activation_checkpointing": True}
    assert trainer_checkpointing["overrides"]["gradient_checkpointing"]
    for variant in (fsdp_checkpointing, trainer_checkpointing):
        mean_article = variant["mean_article_tokens"]
        assert variant["tokens_per_step"] == pytest.approx(2 * 4 * mean_article, rel=0.15)
        assert variant["tokens_per_second"] == pytest.approx(4 * mean_article / variant["step_seconds"], rel=0.15)
        assert variant["peak_allocated_gib"] is None


# One AdamW step at lr 2e-5 on a bf16 weight sharded over 2 ranks, as FSDP2 holds it: how far each shard moved along
# its intended direction, as a fraction of lr (exact arithmetic: 1.0; see tests/test_optimizers.py).
SHARDED_STEP = '''
import torch, torch.distributed as dist
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
from finetune.optim import AdamWBf16SR
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2,))
for name, optimizer in (("sr", AdamWBf16SR), ("plain", torch.optim.AdamW)):
    torch.manual_seed(0)
    full, grad = (torch.randn(256, 256) * 0.03).to(torch.bfloat16), torch.randn(256, 256).to(torch.bfloat16)
    weight = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
    weight.grad = distribute_tensor(grad, mesh, [Shard(0)])
    optimizer([weight], lr=2e-5, weight_decay=0.0).step()
    moved = (full.float() - weight.detach().full_tensor().float()) * grad.float().sign() / 2e-5
    if dist.get_rank() == 0:
        print(name, type(weight.data).__name__, moved[:128].mean().item(), moved[128:].mean().item())
dist.barrier()  # a rank that tears gloo down while the other still runs can abort it ("terminate called ...")
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_stochastic_rounding_moves_sharded_bf16_weights_by_the_learning_rate(tmp_path):
    script = tmp_path / "sharded_step.py"
    script.write_text(SHARDED_STEP)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29534", str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    moved = {name: (kind, float(a), float(b)) for name, kind, a, b in re.findall(r"^(sr|plain) (\w+) (\S+) (\S+)$",
                                                                                  done.stdout, re.M)}
    assert moved["sr"][0] == "DTensor"
    assert all(abs(shard - 1.0) < 0.15 for shard in moved["sr"][1:])  # each rank's shard, unbiased
    assert all(abs(shard - 1.0) > 0.3 for shard in moved["plain"][1:])  # round-to-nearest drops most of the step
