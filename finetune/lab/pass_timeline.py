"""Where one whole evaluation pass leaves the GPU waiting: the eval benchmark profiles two batches of a mode, which
show a pass's start and its first batch larger than they weigh in a pass of fifteen. This profiles a whole pass over
every test-split article: its wall time unprofiled, the GPU's busy time, each idle stretch and when in the pass it
fell, what the host was doing meanwhile, the kernels on either side of the waits (the short ones included), and the
source lines that stopped the host for the GPU.

    python -m finetune.lab.pass_timeline --profile qwen2.5-7b-shape --teach_steps 60 --per_device_train_batch_size 8 \
        --gradient_accumulation_steps 1 --eval_batch_size 512 --use_liger_kernel true --mode generation

Weights taught the answer format (`--teach_steps`) take generation's checked path, as the benchmark's do.
"""

import json

import torch

from finetune.config import command_from_args, command_parser
from finetune.data import load_splits
from finetune.generation import generate_labels
from finetune.lab.bench import teach
from finetune.lab.bench_eval import time_mode
from finetune.lab.profiling import (gpu_busy_seconds, gpu_idle_between_kernels, gpu_idle_by_host_range,
                                    gpu_idle_stretches, host_syncs)
from finetune.model import load_for_inference, load_tokenizer
from finetune.plan import GPU, plan_evaluation
from finetune.predict import score_labels
from finetune.sources import ModelShape

MODES = ("generation", "label_scoring")


def pass_timeline(run, texts: list[str], batch_size: int) -> dict:
    """`run(texts)` warmed and timed as the eval benchmark times a mode (`time_mode`, one timed pass), then profiled
    and watched for host syncs, one whole pass each."""
    timed, _ = time_mode(run, texts, 1, batch_size)
    with torch.profiler.profile() as profiler:
        run(texts)
        torch.cuda.synchronize()
    busy = gpu_busy_seconds(profiler)
    with host_syncs() as sites:
        run(texts)
        torch.cuda.synchronize()
    return {**timed, "gpu_busy_seconds": busy, "gpu_bound_articles_per_second": len(texts) / busy,
            "gpu_idle_ms_by_host_range": gpu_idle_by_host_range(profiler, top=12),
            "gpu_idle_stretches_ms": [(round(at, 1), round(ms, 1)) for at, ms in gpu_idle_stretches(profiler)],
            "gpu_idle_between_kernels": gpu_idle_between_kernels(profiler, top=12),
            "host_syncs_by_site": dict(sites.most_common())}


def main(argv: list[str] | None = None) -> None:
    parser = command_parser()
    parser.add_argument("--mode", choices=MODES, default="generation")
    parser.add_argument("--teach_steps", type=int, default=0, help="first train the model this many optimizer steps")
    config, args = command_from_args(parser, argv, description=__doc__)
    if not torch.cuda.is_available():
        raise SystemExit("pass_timeline profiles a GPU's timeline: it needs a CUDA GPU")
    state = teach(config, args.teach_steps)["state"] if args.teach_steps else None
    config, _ = plan_evaluation(config, GPU.current(), ModelShape.of(config))  # any "auto" left: this GPU's choice
    splits = load_splits(config)
    texts = list(splits.eval["text"]) + list(splits.train["text"])
    tokenizer = load_tokenizer(config, train_texts=list(splits.train["text"]))
    model = load_for_inference(config, tokenizer)
    if state is not None:
        model.load_state_dict(state)
    runs = {"generation": lambda t: generate_labels(model, tokenizer, t, config.eval_batch_size, config.max_length,
                                                    progress=False),
            "label_scoring": lambda t: score_labels(model, tokenizer, t, config.eval_batch_size, config.max_length,
                                                    False, "packed")}
    print(json.dumps({"mode": args.mode, **pass_timeline(runs[args.mode], texts, config.eval_batch_size)}, indent=1))


if __name__ == "__main__":
    main()
