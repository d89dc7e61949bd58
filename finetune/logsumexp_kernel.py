"""Each row's logsumexp over the vocabulary in one read of the bf16 logits, for label scoring (`finetune.predict`).

Label scoring reads a few logits of each answer row, so what it needs of the whole row is only its normalizer. Torch
had no one-pass way to it: `log_softmax(..., dtype=float32)` wrote a float32 copy of all 152K logits of every read
row, 18 ms a batch of 512 articles, 2.4% of label scoring's GPU time on an H100 (the profile in
results/benchmarks/h100_7b_eval_taught_200_read_rows_b.json), and `logsumexp` made separate passes. Here one program
a row keeps a running maximum and a running sum rescaled to it, a block of the row at a time, all in float32.
"""

import torch
import triton
import triton.language as tl

BLOCK = 4096  # logits a program reads at once: 37 blocks for Qwen2.5's 152,064


@triton.jit
def _row_logsumexp(logits, out, columns, row_stride, BLOCK: tl.constexpr):
    row = logits + tl.program_id(0).to(tl.int64) * row_stride
    peak = float("-inf")
    total = 0.0
    for start in range(0, columns, BLOCK):
        at = start + tl.arange(0, BLOCK)
        x = tl.load(row + at, mask=at < columns, other=float("-inf")).to(tl.float32)
        new_peak = tl.maximum(peak, tl.max(x, 0))
        total = total * tl.exp(peak - new_peak) + tl.sum(tl.exp(x - new_peak), 0)
        peak = new_peak
    tl.store(out + tl.program_id(0), peak + tl.log(total))


def row_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """float32 logsumexp over the last dimension of CUDA `logits` (finite values), shaped as `logits[..., 0]`."""
    rows = logits.reshape(-1, logits.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(len(rows), dtype=torch.float32, device=logits.device)
    _row_logsumexp[(len(rows),)](rows, out, rows.shape[1], rows.stride(0), BLOCK=BLOCK, num_warps=8)
    return out.view(logits.shape[:-1])
