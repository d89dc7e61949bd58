"""Training throughput: real tokens/s and model FLOPs utilization (MFU), logged to TensorBoard with the loss, and the
benchmark's step clock and profiler."""

import bisect
import collections
import math
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import is_peft_model
from transformers import PretrainedConfig, TrainerCallback

from finetune.results import PROJECT_DIR

# Dense bf16 tensor-core peaks from the vendors' datasheets, by device-name substring (first match wins).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "GB10": 125.0}


def bf16_peak_tflops(gpu_name: str) -> float | None:
    """The dense bf16 peak of the GPU named `gpu_name` (as CUDA names it), or None for an unlisted one."""
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in gpu_name), None)


def peak_flops() -> float | None:
    """The GPU's dense bf16 peak in FLOP/s, or None where it is unknown (CPU, unlisted GPUs)."""
    if not torch.cuda.is_available():
        return None
    tflops = bf16_peak_tflops(torch.cuda.get_device_name(0))
    return None if tflops is None else tflops * 1e12


def reset_peak_memory() -> None:
    """Free cached blocks and restart the peak counters, so the next measurement stands alone (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(reserved: bool = False) -> float | None:
    """Peak GPU memory since the last reset, allocated by tensors (or reserved by the allocator); None on CPU."""
    if not torch.cuda.is_available():
        return None
    return (torch.cuda.max_memory_reserved() if reserved else torch.cuda.max_memory_allocated()) / 2**30


def mean_article_tokens(train_dataset) -> float:
    """Mean tokens per article in TRL's prepared dataset (packed rows list each article's length)."""
    lengths = _article_lengths(train_dataset)
    return sum(lengths) / len(lengths)


def _article_lengths(train_dataset) -> list[int]:
    if "seq_lengths" in train_dataset.column_names:
        return [n for row in train_dataset["seq_lengths"] for n in row]
    return [len(ids) for ids in train_dataset["input_ids"]]


@dataclass(frozen=True)
class ArticleTokens:
    """What sets a training step's FLOPs per token, read from TRL's prepared dataset."""

    attention_length: float  # sum of L^2 / sum of L: the article length an average token attends within
    loss_share: float  # the share of tokens that carry loss (labels != -100): the answer tokens


def article_tokens(train_dataset) -> ArticleTokens:
    """The token-weighted article length and the loss-bearing share of the tokens of TRL's prepared dataset."""
    lengths = _article_lengths(train_dataset)
    if "labels" in train_dataset.column_names:
        labelled = sum(label != -100 for row in train_dataset["labels"] for label in row)
    else:  # a preparation that leaves the completion mask for the collator to turn into labels
        labelled = sum(map(sum, train_dataset["completion_mask"]))
    return ArticleTokens(sum(n * n for n in lengths) / sum(lengths), labelled / sum(lengths))


def training_flops_per_token(config: PretrainedConfig, tokens: ArticleTokens, adapter_params: int | None = None,
                             head_on_every_token: bool = False) -> float:
    """Forward + backward FLOPs per real token that a training step needs: the decoder's matmuls for every token, the
    LM head for the tokens whose logits are computed, and causal attention within each article.

    Matmuls cost 2 FLOPs per weight and token forward and 4 backward (gradients of input and weight). Embedding
    lookups, norms and activations are not counted; recomputation (gradient checkpointing, the fused loss recomputing
    its logits in backward) never is: the count is what the step needs, not what a recipe spends.

    The LM head: TRL 1.16's loss (its fused LM head, `trl.trainer.utils.add_fused_lm_head`) projects only the positions
    whose next-token label is not -100, the answer tokens (`tokens.loss_share`, ~7.5 of ~102.5 per article), wherever
    Triton is available; the suite's FusedHeadSFTTrainer forces that path on every device. `head_on_every_token`
    counts every position instead: TRL's path where there is no Triton (fixed tile shapes), e.g. stock TRL on the CPU.
    Liger's fused linear cross-entropy never runs under TRL 1.16: TRL's SFTTrainer turns it off with
    `use_liger_kernel` (it would replace the forward TRL patches with its fused head) and applies only Liger's layer
    kernels, so Liger rows compute the head as every other row does.

    Attention: scores and values cost 2 x 2 x (query heads x head dim) per earlier position forward, and twice that
    backward; a causal token at position i of its article sees i + 1 positions, (L + 1) / 2 on average over an article
    of L tokens, which over articles of different lengths, weighted by tokens, is (sum L^2 / sum L + 1) / 2.

    LoRA and QLoRA (`adapter_params`, the adapters' trainable parameters): the frozen matmuls, the LM head among them,
    run forward (2 per parameter) and backward to their inputs (2), but compute no weight gradient; the adapters cost
    the full 6. QLoRA is counted the same (bf16 matmul FLOPs after dequantization), so its MFU shows what the 4-bit
    weights cost. FP8 matmuls are counted as these same FLOPs, against the bf16 peak.
    """
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    decoder_params = layers * (hidden * (hidden + 2 * kv) + hidden * hidden + 3 * hidden * config.intermediate_size)
    head_params = hidden * config.vocab_size * (1.0 if head_on_every_token else tokens.loss_share)
    attention = layers * 2 * 2 * config.num_attention_heads * head_dim * (tokens.attention_length + 1) / 2
    if adapter_params is None:
        return 6 * (decoder_params + head_params) + 3 * attention
    return 4 * (decoder_params + head_params) + 6 * adapter_params + 3 * attention


def lm_head_on_every_token(trainer) -> bool:
    """Whether `trainer`'s loss projects every position through the LM head: TRL's own `compute_loss` where Triton is
    missing (stock TRL on the CPU). The suite's FusedHeadSFTTrainer (finetune.train) overrides it to score only the
    answer tokens on every device, as TRL itself does wherever Triton is."""
    import trl
    from trl.trainer.utils import _use_triton

    return type(trainer).compute_loss is trl.SFTTrainer.compute_loss and not _use_triton(trainer.args.device)


def adapter_parameters(model: torch.nn.Module) -> int | None:
    """The trainable parameters of a peft model (its adapters); None for a model trained whole."""
    if not is_peft_model(model):
        return None
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class ThroughputCallback(TrainerCallback):
    """Adds tokens_per_second and (on a known GPU) mfu to every log line, from TRL's running `num_tokens`; the run's
    last line gets their medians over the logging intervals. An interval in which a checkpoint was written reports
    nothing: the write is not training speed (it is timed on its own in the training summary)."""

    def __init__(self, model_config: PretrainedConfig, tokens: ArticleTokens, adapter_params: int | None = None):
        self.flops_per_token = training_flops_per_token(model_config, tokens, adapter_params)
        self.peak = peak_flops()
        self.last = None  # (time, tokens) at the previous log
        self.rates: list[float] = []
        self.saved = False

    def on_save(self, args, state, control, **kwargs):
        self.saved = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "num_tokens" not in logs:
            return
        if "train_runtime" in logs:  # the Trainer's closing summary, not an interval
            if self.rates:
                logs["train_tokens_per_second_median"] = statistics.median(self.rates)
                if self.peak:
                    logs["train_mfu_median"] = logs["train_tokens_per_second_median"] * self.flops_per_token / self.peak
            return
        now, tokens = time.perf_counter(), float(logs["num_tokens"])
        if self.last is not None and tokens > self.last[1] and not self.saved:
            rate = (tokens - self.last[1]) / (now - self.last[0]) / max(args.world_size, 1)
            self.rates.append(rate)
            logs["tokens_per_second"] = rate
            if self.peak:
                logs["mfu"] = rate * self.flops_per_token / self.peak
        self.last, self.saved = (now, tokens), False


def synchronized_now() -> float:
    """Wall time once the GPU has finished the work queued so far."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


class StepClock(TrainerCallback):
    """Wall time and the Trainer's cumulative real-token count (all ranks) as training starts and at the end of every
    optimizer step, and how long each optimizer update itself took (the part of a step that does not shrink with
    faster kernels or less recompute)."""

    def __init__(self):
        self.marks = []  # (seconds, tokens): marks[0] as training starts, marks[k] after optimizer step k
        self.optimizer_seconds = []
        self._update_start = None

    def window(self, warmup_steps: int, measured_steps: int) -> tuple[float, int]:
        """Seconds and tokens of the `measured_steps` optimizer steps that follow the first `warmup_steps`."""
        (t0, n0), (t1, n1) = self.marks[warmup_steps], self.marks[warmup_steps + measured_steps]
        return t1 - t0, n1 - n0

    def on_train_begin(self, args, state, control, **kwargs):
        self.marks.append((synchronized_now(), state.num_input_tokens_seen or 0))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._update_start = synchronized_now()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.optimizer_seconds.append(synchronized_now() - self._update_start)

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append((synchronized_now(), state.num_input_tokens_seen or 0))


class StepProfiler(TrainerCallback):
    """A torch profiler table (top ops by device time) of one optimizer step: where a training step's time goes; with
    `trace_path`, its whole timeline too, for Perfetto or chrome://tracing (`.json.gz` is written compressed)."""

    def __init__(self, step: int, trace_path: str | None = None):
        self.step, self.trace_path, self.profiler, self.table = step, trace_path, None, None
        self.nccl_share = self.busy_share = self.idle_by_host_range = self.matmul_rates = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step and self.profiler is None and self.table is None:
            self.profiler = torch.profiler.profile(record_shapes=True)
            self.profiler.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None and state.global_step == self.step:
            synchronized_now()  # the step's last kernels finish inside the trace
            self.profiler.stop()
            self.table = profile_table(self.profiler)
            self.nccl_share = nccl_kernel_share(self.profiler)
            self.busy_share = gpu_busy_share(self.profiler)
            self.idle_by_host_range = gpu_idle_by_host_range(self.profiler)
            self.matmul_rates = matmul_rates(self.profiler)
            if self.trace_path:
                self.profiler.export_chrome_trace(self.trace_path)
            self.profiler = None


class HostSyncCounter(TrainerCallback):
    """How many times one optimizer step stopped the host until the GPU caught up (a `.item()`, a data-dependent
    shape, a copy to the CPU), counted by torch's sync debug mode; each one drains the queue of launched kernels.
    None on the CPU. The step clock's own synchronizations are not counted (torch does not flag an explicit
    `torch.cuda.synchronize`). `sites` says which source lines made them: the count alone cannot say what to remove."""

    def __init__(self, step: int):
        self.step, self.count, self.sites, self._caught, self._records = step, None, None, None, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step and torch.cuda.is_available():
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_step_end(self, args, state, control, **kwargs):
        if self._caught is not None and state.global_step == self.step:
            torch.cuda.set_sync_debug_mode("default")
            self._caught.__exit__(None, None, None)
            self.sites = collections.Counter(_source_line(w.filename, w.lineno) for w in self._records
                                             if "synchronizing" in str(w.message))
            self.count = sum(self.sites.values())
            self._caught = None


def _source_line(filename: str, lineno: int) -> str:
    """`package/module.py:line`: the path from site-packages or from this repository, never a machine's own."""
    path = Path(filename)
    for root in (*(p for p in path.parents if p.name in ("site-packages", "dist-packages")), PROJECT_DIR):
        if path.is_relative_to(root):
            return f"{path.relative_to(root)}:{lineno}"
    return f"{path.name}:{lineno}"


def profile_table(profiler) -> list[str]:
    sort_key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_key, row_limit=25, max_name_column_width=60).splitlines()


MATMUL_OPS = ("aten::mm", "aten::addmm")


def matmul_rates(profiler, top: int = 12) -> list[dict]:
    """Each matmul shape's calls, time and TFLOP/s (2 M K N a call, from the shapes a `record_shapes=True` profile
    keeps), the longest first: which projection of a pass runs well below the others' rate. Times are the GPU's
    kernels' where there are any, else the CPU's (`clock`)."""
    rows = []
    for event in profiler.key_averages(group_by_input_shape=True):
        if event.key not in MATMUL_OPS or not event.input_shapes:
            continue
        (m, k), (_, n) = event.input_shapes[:2] if event.key == "aten::mm" else event.input_shapes[1:3]
        on_gpu = event.self_device_time_total > 0
        micros = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        rows.append({"op": event.key, "m": m, "k": k, "n": n, "calls": event.count, "ms": micros / 1000,
                     "clock": "gpu" if on_gpu else "cpu",
                     "tflops_per_second": 2 * m * k * n * event.count / micros / 1e6 if micros else None})
    return sorted(rows, key=lambda row: -row["ms"])[:top]


def nccl_kernel_share(profiler) -> float | None:
    """The share of the profiled step's GPU timeline with an NCCL kernel running; None without GPU events. NCCL runs
    on its own streams, overlapping compute: this is how long communication is in flight, an upper bound on the time
    it adds."""
    return _timeline_share(profiler, lambda e: e.name.startswith(("ncclDevKernel", "ncclKernel")))


def gpu_busy_share(profiler) -> float | None:
    """The share of the profiled step's GPU timeline with any kernel or copy running; None without GPU events. The
    rest is time the GPU waited for the host: launches, host syncs, data loading, logging."""
    return _timeline_share(profiler, lambda e: True)


def gpu_busy_seconds(profiler) -> float | None:
    """How long any kernel or copy ran in the profile, overlaps counted once; None without GPU events. The work
    profiled over this is the rate it would reach if the GPU never waited for the host."""
    device = _device_events(profiler)
    return _union_length([e.time_range for e in device]) / 1e6 if device else None  # the profiler's us


def gpu_idle_by_host_range(profiler, top: int = 6) -> dict[str, float] | None:
    """Where the profiled step's GPU waited: each idle stretch of its timeline (between the first kernel's start and
    the last one's end, nothing running) charged to the innermost host range that spans all of it (an annotation such
    as "Optimizer.step#...", "enumerate(DataLoader)#..." or an aten op), else to "(between host ranges)"; milliseconds
    per range, the `top` largest. None without GPU events. `gpu_busy_share` says how much the GPU waited; this says
    what the host was doing meanwhile."""
    device = sorted((e.time_range for e in _device_events(profiler)), key=lambda span: span.start)
    if not device:
        return None
    gaps, end = [], device[0].end
    for span in device[1:]:
        if span.start > end:
            gaps.append((end, span.start))
        end = max(end, span.end)
    threads = _host_ranges_by_thread(profiler)
    idle: dict[str, float] = {}
    for start, stop in gaps:
        spanning = [r for thread in threads for r in [_innermost_spanning(*thread, start, stop)] if r is not None]
        name = min(spanning, key=lambda e: e.time_range.end - e.time_range.start).name if spanning else \
            "(between host ranges)"
        idle[name] = idle.get(name, 0.0) + (stop - start) / 1000  # the profiler's times are microseconds
    return dict(sorted(idle.items(), key=lambda item: -item[1])[:top])


def _host_ranges_by_thread(profiler) -> list[tuple[list, list[int], list[int | None]]]:
    """Per host thread (the autograd engine runs the backward on its own): its ranges sorted by start, their starts,
    and each one's enclosing range (ranges on one thread nest), found with a stack."""
    by_thread: dict[int, list] = {}
    for e in profiler.events():
        if e.device_type == torch.profiler.DeviceType.CPU:
            by_thread.setdefault(getattr(e, "thread", 0), []).append(e)
    threads = []
    for events in by_thread.values():
        events.sort(key=lambda e: (e.time_range.start, -e.time_range.end))
        parents, open_ranges = [], []
        for i, e in enumerate(events):
            while open_ranges and events[open_ranges[-1]].time_range.end <= e.time_range.start:
                open_ranges.pop()
            parents.append(open_ranges[-1] if open_ranges else None)
            open_ranges.append(i)
        threads.append((events, [e.time_range.start for e in events], parents))
    return threads


def _innermost_spanning(events: list, starts: list[int], parents: list[int | None], start: int, stop: int):
    """The innermost of one thread's ranges that spans [start, stop]: from the last one to begin by `start`, out
    through its enclosing ranges until one lasts past `stop`. None if none does."""
    i = bisect.bisect_right(starts, start) - 1
    while i is not None and i >= 0 and events[i].time_range.end < stop:
        i = parents[i]
    return events[i] if i is not None and i >= 0 else None


def _device_events(profiler) -> list:
    """The GPU timeline's kernels and copies. Annotations (`record_function` ranges such as "Optimizer.step#..." or
    "nccl:...") are on the GPU timeline too but run nothing: left out."""
    return [e for e in profiler.events() if e.device_type == torch.profiler.DeviceType.CUDA
            and not e.is_user_annotation]


def _timeline_share(profiler, chosen) -> float | None:
    """The union of the `chosen` GPU events' intervals over the GPU timeline (first kernel start to last kernel
    end)."""
    device = _device_events(profiler)
    if not device:
        return None
    span = max(e.time_range.end for e in device) - min(e.time_range.start for e in device)
    return _union_length([e.time_range for e in device if chosen(e)]) / span


def _union_length(spans: list) -> float:
    busy, end = 0, -math.inf
    for span in sorted(spans, key=lambda span: span.start):
        busy += max(0, span.end - max(span.start, end))
        end = max(end, span.end)
    return busy


def max_over_ranks(accelerator, value: float | None) -> float | None:
    """The largest of every rank's `value` (a collective: every rank calls it); None where it is None (CPU)."""
    gathered = accelerator.gather(torch.tensor([math.nan if value is None else value], device=accelerator.device))
    return None if value is None else gathered.max().item()
