"""What a benchmark reads from a step beyond its tokens/s: a clock on the GPU's stream, the torch profiler's view of
one step or pass (where the GPU waited and on what, each matmul shape's rate, NCCL's share), and the host syncs."""

import bisect
import collections
import contextlib
import math
import time
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback

from finetune.results import PROJECT_DIR


def synchronized_now() -> float:
    """Wall time once the GPU has finished the work queued so far."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


class StepClock(TrainerCallback):
    """Where training starts and every optimizer step ends on the GPU's stream (CUDA events), with TRL's cumulative
    real-token count (every rank's, its logged `num_tokens`), and how long each optimizer update took there (the part
    of a step that does not shrink with faster kernels or less recompute). Nothing waits for the GPU, so the host runs
    ahead as it does in a run without this clock: before 275bfa0 each step's end waited, and the GPU idled while the
    host queued the next step's first kernels. Needs a log every step."""

    def __init__(self):
        self.marks = []  # [event, tokens]: marks[0] as training starts, marks[k] after optimizer step k
        self._updates = []  # per optimizer step: its start and end on the GPU's stream

    def window(self, warmup_steps: int, measured_steps: int) -> tuple[float, int]:
        """Seconds and tokens of the `measured_steps` optimizer steps that follow the first `warmup_steps`."""
        (t0, n0), (t1, n1) = self.marks[warmup_steps], self.marks[warmup_steps + measured_steps]
        return _seconds_between(t0, t1), n1 - n0

    @property
    def optimizer_seconds(self) -> list[float]:
        """Each update's seconds (read after training: an event's time is known once the GPU has passed it)."""
        return [_seconds_between(start, end) for start, end in self._updates]

    def on_train_begin(self, args, state, control, **kwargs):
        self.marks.append([_stream_mark(), 0])

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._updates.append([_stream_mark()])

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._updates[-1].append(_stream_mark())

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append([_stream_mark(), None])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "num_tokens" in logs and self.marks[-1][1] is None:  # the step's log, right after its end
            self.marks[-1][1] = int(logs["num_tokens"])


def _stream_mark():
    """A point on the GPU's stream (a CUDA event recorded there), or the wall time without a GPU."""
    if not torch.cuda.is_available():
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _seconds_between(start, end) -> float:
    if isinstance(start, float):
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1000  # milliseconds


class StepProfiler(TrainerCallback):
    """A torch profiler table (top ops by device time) of one optimizer step: where a training step's time goes; with
    `trace_path`, its whole timeline too, for Perfetto or chrome://tracing (`.json.gz` is written compressed)."""

    def __init__(self, step: int, trace_path: str | None = None):
        self.step, self.trace_path, self.profiler, self.table = step, trace_path, None, None
        self.nccl_share = self.busy_share = self.idle_by_host_range = self.idle_between_kernels = None
        self.matmul_rates = None

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
            self.idle_by_host_range = gpu_idle_by_host_range(self.profiler, top=12)
            self.idle_between_kernels = gpu_idle_between_kernels(self.profiler)
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
        self.step, self.count, self.sites, self._counting = step, None, None, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step and torch.cuda.is_available():
            self._counting = contextlib.ExitStack()
            self.sites = self._counting.enter_context(host_syncs())

    def on_step_end(self, args, state, control, **kwargs):
        if self._counting is not None and state.global_step == self.step:
            self._counting.close()
            self.count, self._counting = sum(self.sites.values()), None


@contextlib.contextmanager
def host_syncs():
    """The source lines that stopped the host until the GPU caught up while the block ran, counted (filled in when
    it ends), from the warnings of torch's sync debug mode, whatever the warning filters say outside."""
    sites = collections.Counter()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites.update(_source_line(w.filename, w.lineno) for w in records if "synchronizing" in str(w.message))


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


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::addmm_")  # addmm_: a product added into its input


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


def matmul_seconds(profiler) -> float | None:
    """How long the matmul ops' own kernels ran (`MATMUL_OPS`, and FP8's `_scaled_mm`); None without GPU events. The
    work profiled over this is the rate it would reach were everything else on the GPU (attention, norms, activations,
    copies) fused away and no wait left, its matmuls at the rates they ran: past that, only fewer or faster FLOPs."""
    micros = sum(event.self_device_time_total for event in profiler.key_averages()
                 if event.key in MATMUL_OPS + ("aten::_scaled_mm",))
    return micros / 1e6 if micros else None


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
    as "Optimizer.step#...", "enumerate(DataLoader)#..." or an aten op), else to where the host was when it began:
    "(began in) " and the ranges open at its start, outermost of the innermost three first (a sync such as
    "aten::item > aten::_local_scalar_dense > cudaStreamSynchronize" returns just after the GPU ran dry, so the idle
    after it is the host's time to queue the next kernel), or "(began after) " the last range to end before it;
    milliseconds per range, the `top` largest. None without GPU events. `gpu_busy_share` says how much the GPU waited;
    this says what the host was doing meanwhile."""
    gaps = _idle_gaps(profiler)
    if gaps is None:
        return None
    threads = _host_ranges_by_thread(profiler)
    by_end = sorted((e for events, _, _ in threads for e in events), key=lambda e: e.time_range.end)
    ends = [e.time_range.end for e in by_end]
    idle: dict[str, float] = {}
    for start, stop, *_ in gaps:
        open_at_start = [_open_at(*thread, start) for thread in threads]
        # per thread, the innermost range open at the start that lasts past the stop (enclosing ones end no earlier)
        spanning = [next(e for e in chain if e.time_range.end >= stop) for chain in open_at_start
                    if chain and chain[-1].time_range.end >= stop]
        name = min(spanning, key=lambda e: e.time_range.end - e.time_range.start).name if spanning else \
            _where_idle_began(open_at_start, by_end, ends, start)
        idle[name] = idle.get(name, 0.0) + (stop - start) / 1000  # the profiler's times are microseconds
    return dict(sorted(idle.items(), key=lambda item: -item[1])[:top])


def gpu_idle_stretches(profiler, at_least_ms: float = 0.5) -> list[tuple[float, float]] | None:
    """Each idle stretch of the GPU timeline at least `at_least_ms` long, as (its start in ms after the first kernel's
    start, its length in ms): where in a pass the waits fall, which `gpu_idle_by_host_range` sums away. None without
    GPU events."""
    gaps = _idle_gaps(profiler)
    if gaps is None:
        return None
    first = min(e.time_range.start for e in _device_events(profiler))
    return [((start - first) / 1000, (stop - start) / 1000) for start, stop, *_ in gaps
            if stop - start >= at_least_ms * 1000]


def gpu_idle_between_kernels(profiler, top: int = 10) -> dict[str, dict] | None:
    """The GPU timeline's idle stretches by what ran on either side: per pair "kernel before -> kernel after" (the one
    to end last before the stretch, the one to start it), how many stretches and their milliseconds, the `top` pairs
    by milliseconds. A pass's waits shorter than 0.5 ms sum to hundreds of them (`gpu_idle_stretches` leaves them
    out): a pair that takes most says whether they come at one kind of kernel boundary (one launch path, one copy)
    or at every one. Kernel names cut at 60 characters; None without GPU events."""
    gaps = _idle_gaps(profiler)
    if gaps is None:
        return None
    pairs: dict[str, dict] = {}
    for start, stop, before, after in gaps:
        pair = pairs.setdefault(f"{before[:60]} -> {after[:60]}", {"stretches": 0, "ms": 0.0})
        pair["stretches"] += 1
        pair["ms"] += (stop - start) / 1000
    return dict(sorted(pairs.items(), key=lambda item: -item[1]["ms"])[:top])


def _idle_gaps(profiler) -> list[tuple[int, int, str, str]] | None:
    """Each stretch of the GPU timeline with nothing running: its start and stop in the profiler's microseconds, the
    name of the event to end last before it and of the one after it."""
    device = sorted(_device_events(profiler), key=lambda e: e.time_range.start)
    if not device:
        return None
    gaps, last = [], device[0]
    for event in device[1:]:
        if event.time_range.start > last.time_range.end:
            gaps.append((last.time_range.end, event.time_range.start, last.name, event.name))
        last = max(last, event, key=lambda e: e.time_range.end)
    return gaps


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


def _open_at(events: list, starts: list[int], parents: list[int | None], time: int) -> list:
    """One thread's ranges open at `time`, innermost first: from the last one to begin by then, out through its
    enclosing ranges (ranges on one thread nest)."""
    chain, i = [], bisect.bisect_right(starts, time) - 1
    while i is not None and i >= 0:
        if events[i].time_range.end > time:
            chain.append(events[i])
        i = parents[i]
    return chain


def _where_idle_began(open_at_start: list[list], by_end: list, ends: list[int], start: int) -> str:
    """The ranges open at `start` on the thread where they nest deepest, the innermost three; else the range that
    ended last before it (`by_end`: every thread's ranges sorted by their `ends`; a step has thousands of idle
    stretches and its ranges number in the hundred thousands, so it is bisected, not scanned)."""
    deepest = max(open_at_start, key=len, default=[])
    if deepest:
        return "(began in) " + " > ".join(e.name for e in reversed(deepest[:3]))
    last = bisect.bisect_right(ends, start) - 1
    return f"(began after) {by_end[last].name}" if last >= 0 else "(before any host range)"


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
