"""Training throughput: real tokens/s and model FLOPs utilization (MFU), logged to TensorBoard with the loss, and the
benchmark's step clock and profiler."""

import math
import statistics
import time
import warnings

import torch
from accelerate.utils import is_peft_model
from transformers import PretrainedConfig, TrainerCallback

# Dense bf16 tensor-core peaks from the vendors' datasheets, by device-name substring (first match wins).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "GB10": 125.0}


def peak_flops() -> float | None:
    """The GPU's dense bf16 peak in FLOP/s, or None where it is unknown (CPU, unlisted GPUs)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)


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
    if "seq_lengths" in train_dataset.column_names:
        lengths = [n for row in train_dataset["seq_lengths"] for n in row]
    else:
        lengths = [len(ids) for ids in train_dataset["input_ids"]]
    return sum(lengths) / len(lengths)


def training_flops_per_token(config: PretrainedConfig, mean_seq_len: float, adapter_params: int | None = None) -> float:
    """Forward + backward FLOPs per real token: 6 x matmul parameters plus causal attention over its own article.

    Attention scores and values cost 2 x 2 x hidden x (context) per layer forward; a causal token sees on average
    half its sequence. Embedding lookups are free; the LM head is a matmul and counts.

    LoRA and QLoRA (`adapter_params`, the adapters' trainable parameters): the frozen matmuls run forward (2 per
    parameter) and backward to their inputs (2), but compute no weight gradient; the adapters cost the full 6. QLoRA
    is counted the same (bf16 matmul FLOPs after dequantization), so its MFU shows what the 4-bit weights cost.
    Recomputation under gradient checkpointing is never counted, as for full fine-tuning.
    """
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    per_layer = hidden * (hidden + 2 * kv) + hidden * hidden + 3 * hidden * config.intermediate_size
    matmul_params = layers * per_layer + hidden * config.vocab_size
    attention = layers * 2 * 2 * config.num_attention_heads * head_dim * (mean_seq_len / 2)
    if adapter_params is None:
        return 6 * matmul_params + 3 * attention
    return 4 * matmul_params + 6 * adapter_params + 3 * attention


def adapter_parameters(model: torch.nn.Module) -> int | None:
    """The trainable parameters of a peft model (its adapters); None for a model trained whole."""
    if not is_peft_model(model):
        return None
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class ThroughputCallback(TrainerCallback):
    """Adds tokens_per_second and (on a known GPU) mfu to every log line, from TRL's running `num_tokens`; the run's
    last line gets their medians over the logging intervals. An interval in which a checkpoint was written reports
    nothing: the write is not training speed (it is timed on its own in the training summary)."""

    def __init__(self, model_config: PretrainedConfig, mean_seq_len: float, adapter_params: int | None = None):
        self.flops_per_token = training_flops_per_token(model_config, mean_seq_len, adapter_params)
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
        self.nccl_share = self.busy_share = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step and self.profiler is None and self.table is None:
            self.profiler = torch.profiler.profile()
            self.profiler.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None and state.global_step == self.step:
            synchronized_now()  # the step's last kernels finish inside the trace
            self.profiler.stop()
            self.table = profile_table(self.profiler)
            self.nccl_share = nccl_kernel_share(self.profiler)
            self.busy_share = gpu_busy_share(self.profiler)
            if self.trace_path:
                self.profiler.export_chrome_trace(self.trace_path)
            self.profiler = None


class HostSyncCounter(TrainerCallback):
    """How many times one optimizer step stopped the host until the GPU caught up (a `.item()`, a data-dependent
    shape, a copy to the CPU), counted by torch's sync debug mode; each one drains the queue of launched kernels.
    None on the CPU. The step clock's own synchronizations are not counted (torch does not flag an explicit
    `torch.cuda.synchronize`)."""

    def __init__(self, step: int):
        self.step, self.count, self._caught, self._records = step, None, None, None

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
            self.count = sum("synchronizing" in str(w.message) for w in self._records)
            self._caught = None


def profile_table(profiler) -> list[str]:
    sort_key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_key, row_limit=25, max_name_column_width=60).splitlines()


def nccl_kernel_share(profiler) -> float | None:
    """The share of the profiled step's GPU timeline with an NCCL kernel running; None without GPU events. NCCL runs
    on its own streams, overlapping compute: this is how long communication is in flight, an upper bound on the time
    it adds."""
    return _timeline_share(profiler, lambda e: e.name.startswith(("ncclDevKernel", "ncclKernel")))


def gpu_busy_share(profiler) -> float | None:
    """The share of the profiled step's GPU timeline with any kernel or copy running; None without GPU events. The
    rest is time the GPU waited for the host: launches, host syncs, data loading, logging."""
    return _timeline_share(profiler, lambda e: True)


def _timeline_share(profiler, chosen) -> float | None:
    """The union of the `chosen` GPU events' intervals over the GPU timeline (first kernel start to last kernel end).
    Annotations (`record_function` ranges such as "Optimizer.step#..." or "nccl:...") are on the GPU timeline too but
    run nothing: skipped."""
    device = [e for e in profiler.events() if e.device_type == torch.profiler.DeviceType.CUDA
              and not e.is_user_annotation]
    if not device:
        return None
    busy, end = 0, -math.inf
    for span in sorted((e.time_range for e in device if chosen(e)), key=lambda span: span.start):
        busy += max(0, span.end - max(span.start, end))
        end = max(end, span.end)
    return busy / (max(e.time_range.end for e in device) - min(e.time_range.start for e in device))


def max_over_ranks(accelerator, value: float | None) -> float | None:
    """The largest of every rank's `value` (a collective: every rank calls it); None where it is None (CPU)."""
    gathered = accelerator.gather(torch.tensor([math.nan if value is None else value], device=accelerator.device))
    return None if value is None else gathered.max().item()
