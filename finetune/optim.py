"""AdamW for bf16 weights with stochastic rounding: torchao's update, with its compiled function built once, and its
moments in bf16 or in 8 bits.

torchao's `_AdamW.step` calls `torch.compile(single_param_adam, ...)` anew for every parameter at every step. Building
that wrapper costs far more host time than the update itself: on the 7B shape (339 parameters) the step took several
times as long as its GPU kernels (`optimizer_step_seconds` and `step_profile` in
results/benchmarks/h100_7b_train_f.json, then h100_7b_train_g.json with this class). The math is torchao's own
function, unchanged, so the updates are bit-identical (tests/test_optimizers.py), and so are its checks: a learning rate
that stops being a tensor is an error, not a recompile at every step.

8-bit moments are torchao's `AdamW8bit` states (`OptimState8bit`: blockwise dynamic-tree quantization, as in
bitsandbytes and Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"): 2 bytes of moments a weight
instead of 4, so the 7B shape's states shrink by 14 GiB. On CUDA their update is one Triton kernel, launched once
for a parameter group's weights (finetune/adamw8bit_kernel.py: the compiled one spends its time binary-searching the
quantization map; both are measured in results/benchmarks/h200_7b_train_fused.json), same math, same states, so
checkpoints are torchao's either way. The same kernel updates bf16 moments (a second launch: the tensors torchao
leaves unquantized, or every weight of `adamw_bf16_sr_fused`); CPU weights, DTensor shards and tensors that are not
whole blocks of the kernel's keep the compiled update, and so does every weight with `fused=False`.

The rounding's random bits are a function of (rounding_seed, step, the weight's index), not of torch's running RNG:
under plain DDP every rank applies the same averaged gradient to its own replica, and each rank's RNG has moved on by
its own dropout draws, so rounding from it would let the replicas drift apart. Seeded per step and weight, every
replica rounds identically, and a resumed run rounds as the uninterrupted one. Under FSDP each rank rounds its own
shard, so the rank joins the seed.
"""

from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torchao.optim import _AdamW
from torchao.optim.adam import single_param_adam
from torchao.optim.subclass_8bit import OptimState8bit

_update = torch.compile(single_param_adam, fullgraph=True, dynamic=False)  # compiled lazily, once per shape


def _fused(p: torch.Tensor, state: dict, device_type: str = "cuda") -> bool:
    """Whether the fused kernel takes this weight: bf16 on CUDA (tests run the kernel on CPU tensors, on Triton's
    interpreter), its gradient too, with both moments in 8 bits, or both bf16 tensors over whole blocks of the
    kernel's (a DTensor shard's states are DTensors; torchao keeps the tensors it does not quantize in bf16)."""
    if not (p.device.type == device_type and p.dtype is torch.bfloat16 and p.is_contiguous()
            and p.grad.dtype is torch.bfloat16):
        return False
    m, v = state["exp_avg"], state["exp_avg_sq"]
    if isinstance(m, OptimState8bit) and isinstance(v, OptimState8bit):
        return True
    from finetune.adamw8bit_kernel import BF16_BLOCK  # triton: imported where it runs

    return type(m) is type(v) is torch.Tensor and m.dtype is v.dtype is torch.bfloat16 and p.numel() % BF16_BLOCK == 0


def rounding_seed(seed: int, step: int, index: int, shard: int = 0) -> int:
    """The 31-bit seed of the stochastic rounding of weight `index` (its place among the optimizer's parameters) at
    `step`: the same on every process that holds the same weight (`shard`: the rank, for an FSDP shard). Python's
    hash of a tuple of ints is a fixed function (PYTHONHASHSEED salts only strings and bytes) and costs a fraction of
    a microsecond, against ~20 for seeding a `random.Random`, which LoRA's 392 adapter weights paid at every step."""
    return hash((seed, step, index, shard)) & 0x7FFFFFFF


@contextmanager
def _seeded(device: torch.device, seed: int):
    """torch's generator on `device` seeded with `seed` inside, and back to where it was after: the compiled update
    draws its rounding from it (Inductor's seeds come from the device's default generator)."""
    if device.type == "cuda":
        generator = torch.cuda.default_generators[device.index if device.index is not None else
                                                  torch.cuda.current_device()]
    else:
        generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


class AdamWBf16SR(_AdamW):
    """`torchao.optim._AdamW(bf16_stochastic_round=True)` with one compiled update reused across calls; with
    `state_bits=8`, torchao's `AdamW8bit(bf16_stochastic_round=True)` (bitsandbytes' block of 256 values, and its
    rule of keeping tensors under 4,096 values unquantized). The rounding is seeded per step and weight from
    `rounding_seed` (the module docstring says why). `fused`: the weights the fused kernel takes (`_fused`) are
    updated by it, one launch for each kind of moments, the rest by the compiled update; off, all by the compiled
    update (the bf16 reference's)."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, state_bits: int = 16,
                 rounding_seed: int = 0, fused: bool = True):
        if state_bits not in (8, 16):
            raise ValueError(f"state_bits={state_bits}: the moments are kept in 16 (bf16) or 8 bits")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bf16_stochastic_round=True)
        self.rounding_seed = rounding_seed
        self.fused = fused
        self._grad_scale = None  # set by clip_grad_norm_, applied by the next step
        if state_bits == 8:
            self.block_size = 256  # torchao's base class quantizes a buffer only when its size divides by this

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, with the learning rates and step counts put back on the host, where torchao keeps them and reading
        them waits for nothing. accelerate's prepare() loads the optimizer's own state dict moved to the GPU, and a
        resumed run loads its steps there. The Trainer builds its scheduler after prepare(), from these rates: with
        them on the GPU its every step read one back (torch's LRScheduler `_to_scalar`), once a parameter group, a
        host sync right after the update was queued, so the GPU sat idle through the Trainer's work between steps
        (2 syncs a step at "torch/optim/lr_scheduler.py:90", host_syncs_by_site in results/benchmarks)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key in ("lr", "initial_lr"):
                if isinstance(group.get(key), torch.Tensor):
                    group[key] = group[key].cpu()
        for state in self.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].cpu()

    @staticmethod
    def _subclass_zeros(p: torch.Tensor, signed: bool, block_size: int) -> OptimState8bit:
        return OptimState8bit.zeros(p.shape, signed, block_size, p.device, dtype=p.dtype)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """`torch.nn.utils.clip_grad_norm_` over this optimizer's gradients, with the scaling left to the next step:
        the fused kernel multiplies each gradient by the coefficient as it reads it (rounded to the gradient's dtype,
        as `mul_` rounds), which saves a pass over every gradient's bytes; the other weights' gradients are scaled
        by `_foreach_mul_` at the step, as torch does. Returns the total norm, computed as torch computes it."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        self._grad_scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return norm

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, self._grad_scale = self._grad_scale, None  # clip_grad_norm_'s, left to the step
        index = -1  # the weight's place among all groups' parameters: the same on every rank
        with torch._dynamo.utils.disable_cache_limit():  # one compiled variant per parameter shape, as in torchao
            for group in self.param_groups:
                # torchao's own check: the update is compiled for a tensor learning rate. A float would be baked in
                # as a constant, and with the cache limit lifted every new value would recompile, silently.
                if not isinstance(group["lr"], torch.Tensor):
                    raise RuntimeError("lr was changed to a non-Tensor object. If you want to update lr, please use "
                                       "optim.param_groups[0]['lr'].fill_(new_lr)")
                fused, compiled = {}, []  # (weight, state, step, rounding seed) for each update; fused by moments
                for p in group["params"]:
                    index += 1
                    if p.grad is None:
                        continue
                    if p.grad.is_sparse:
                        raise RuntimeError("Sparse gradient is not supported")
                    state = self.state[p]
                    if not state:
                        state.update(step=torch.tensor(0.0), exp_avg=self._new_buffer(p, True),
                                     exp_avg_sq=self._new_buffer(p, False))
                    state["step"] += 1
                    step = state["step"].item()  # a host tensor: no wait
                    shard = dist.get_rank() if isinstance(p, DTensor) else 0
                    seed = rounding_seed(self.rounding_seed, int(step), index, shard)
                    if self.fused and _fused(p, state):
                        fused.setdefault(isinstance(state["exp_avg"], OptimState8bit), []).append((p, state, step, seed))
                    else:
                        compiled.append((p, state, step, seed))
                for updates in fused.values():  # first, so that the GPU runs them while the host makes the calls below
                    from finetune.adamw8bit_kernel import adamw8bit_step  # triton: imported where it runs
                    params, states, steps, seeds = zip(*updates)
                    adamw8bit_step([p.detach() for p in params], [p.grad for p in params],
                                   [state["exp_avg"] for state in states], [state["exp_avg_sq"] for state in states],
                                   steps=steps, seeds=seeds, lr=group["lr"].item(), beta1=group["betas"][0],
                                   beta2=group["betas"][1], weight_decay=group["weight_decay"], eps=group["eps"],
                                   grad_scale=grad_scale)
                if compiled and grad_scale is not None:  # the fused kernel scales its gradients as it reads them
                    torch._foreach_mul_([p.grad for p, *_ in compiled], grad_scale)
                for p, state, _, seed in compiled:
                    with _seeded(p.device, seed):
                        _update(p.detach(), p.grad, state["step"], state["exp_avg"], state["exp_avg_sq"], None,
                                group["lr"], group["betas"][0], group["betas"][1], group["weight_decay"],
                                group["eps"], True, p.dtype is torch.bfloat16)
        return loss
