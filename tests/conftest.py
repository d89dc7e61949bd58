"""Shared fixtures: a small synthetic AG News folder (tests never need ../shared) and a tiny config around it."""

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

# Compiled-layer tests load Inductor's C++ kernels, whose OpenMP threads then spin beside torch's own after every
# parallel region: on a 2-core machine every later test ran several times slower. Idle threads sleep instead. Read
# once, when OpenMP starts, hence before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels (the fused 8-bit AdamW's) run on Triton's interpreter. Triton reads this as each kernel
# is defined, including its own library's, so it is set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from finetune.config import get_config  # noqa: E402
from finetune.results import PROJECT_DIR  # noqa: E402

# Each class gets its own words, so a tiny model can learn the task from a few hundred articles in seconds.
TOPIC_WORDS = {
    1: "election minister troops embassy rebels summit parliament ceasefire refugees treaty",
    2: "striker goal league coach tournament playoff inning quarterback medal season",
    3: "shares profit earnings merger investors dollar quarterly stocks revenue bank",
    4: "software internet microsoft nasa chip researchers wireless computer genome browser",
}
FILLER = "the a of on in and to with after said new report officials week"


def committed_benchmark(name: str) -> dict:
    """A benchmark file committed under results/benchmarks: what a GPU run wrote, read by CPU tests as it is."""
    return json.loads((PROJECT_DIR / "results" / "benchmarks" / name).read_text())


def compiled_offline_output(script: str):
    """What `script` prints last, as JSON, run in a fresh interpreter where Triton compiles its kernels (for a GPU
    architecture the script names, no GPU needed) instead of interpreting them."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=PROJECT_DIR)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


# The most shared memory a block may take: 227 KB on Hopper, 99 KB on the GB10 (sm_12x), as CUDA's guide lists them.
SHARED_MEMORY_A_BLOCK = {90: 232_448, 121: 101_376}


def assert_compiles_offline_for_hopper_and_the_dgx_spark(module: str, kernel: str, call: str,
                                                        pipelined_loads: bool = False) -> None:
    """The Triton `kernel` of `module`, launched as `call` makes its first launch (a Python expression on `k`, the
    module, and `z(*shape)`, bf16 zeros on the CPU), compiled on this CPU for sm_90 (H100, H200) and sm_121 (GB10, the
    DGX Spark): its matmuls run on the tensor cores, and its shared memory fits a block of each (Triton would refuse it
    only at the first launch there). With `pipelined_loads`, it also copies global memory to shared memory
    asynchronously, 16 bytes at a time (cp.async: the loads its pipeline stages overlap)."""
    script = (f"import json, torch; import {module} as k; "
              "from finetune.lab.sass_adamw8bit import compile_offline, first_launch; "
              "z = lambda *s: torch.zeros(*s, dtype=torch.bfloat16); "
              f"launch = first_launch(k, '{kernel}', lambda: {call}); "
              f"compiled = {{arch: compile_offline(k.{kernel}, *launch, arch) for arch in (90, 121)}}; "
              "print(json.dumps({arch: [c.asm['ptx'].count('mma'), c.metadata.shared, "
              "c.asm['ptx'].count('cp.async.cg.shared.global')] for arch, c in compiled.items()}))")
    for arch, (mma, shared, async_copies) in compiled_offline_output(script).items():
        assert mma and shared <= SHARED_MEMORY_A_BLOCK[int(arch)], (arch, mma, shared)
        assert async_copies or not pipelined_loads, arch


def write_synthetic_csv(path: Path, per_class: int, seed: int = 0) -> None:
    """A classic AG News CSV (class 1-4, title, description; no header) with AG News' debris in some rows."""
    rng = random.Random(seed)
    rows = []
    for label, words in TOPIC_WORDS.items():
        vocab, filler = words.split(), FILLER.split()
        for i in range(per_class):
            title = " ".join(rng.choice(vocab).capitalize() for _ in range(3))
            body = " ".join(rng.choice(vocab if rng.random() < 0.5 else filler) for _ in range(rng.randint(8, 20)))
            if i % 7 == 0:
                body += " It#39;s quot;big quot; news\\says #36;5 report."
            rows.append([str(label), f"{title} {i}", body])
    rng.shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


@pytest.fixture
def mfu_as_given(monkeypatch):
    """Synthetic benchmark rows record no token statistics, which the recount of a file's MFU needs: their MFU stands
    as the test gives it (a real file without them counts toward no MFU figure, tests/test_report.py)."""
    from finetune.lab import measurements

    monkeypatch.setattr(measurements, "recounted_mfu", lambda record, row: row["mfu"])


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """Only a test split, as on the lab machines: 4 x 100 articles."""
    folder = tmp_path_factory.mktemp("ag_news")
    write_synthetic_csv(folder / "test.csv", per_class=100)
    return folder


@pytest.fixture
def tiny_config(synthetic_dir, tmp_path):
    """The tiny profile on synthetic data, small and quick, writing only under tmp_path."""
    return get_config(
        "tiny", data_dir=str(synthetic_dir), holdout_train_size=300, checkpoints_dir=str(tmp_path / "checkpoints"),
        results_dir=str(tmp_path / "results"), vocab_size=512, hidden_size=64, num_heads=4, intermediate_size=128,
        num_train_epochs=2.0, per_device_train_batch_size=8, max_length=128, logging_steps=5, save_steps=20,
        eval_batch_size=32,
    )


def pytest_collection_modifyitems(config, items):
    """GPU-only checks are marked `gpu` and skipped where CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
