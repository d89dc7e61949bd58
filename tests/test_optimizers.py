"""The optimizer options: bf16 weights under plain AdamW lose most small updates; stochastic rounding keeps them."""

import dataclasses
import functools
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from finetune.config import get_config
from finetune.speedups import weights_dtype
from finetune.train import optimizer_cls_and_kwargs, sft_config
from tests.conftest import compiled_offline_output


def _realized_update(optimizer_cls, **kwargs) -> float:
    """How far one step at lr 2e-5 moved bf16 weights along its intended direction, as a fraction of lr.

    Adam's first step moves every weight by lr against the sign of its gradient, so exact arithmetic gives 1.0."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter((torch.randn(256, 256) * 0.03).to(torch.bfloat16))  # typical LLM weight scale
    before = weight.detach().float().clone()
    weight.grad = torch.randn_like(weight)
    optimizer_cls([weight], lr=2e-5, weight_decay=0.0, **kwargs).step()
    return ((before - weight.detach().float()) * weight.grad.float().sign()).mean().item() / 2e-5


def test_plain_bf16_adamw_rounds_away_most_updates_and_stochastic_rounding_does_not():
    from torchao.optim import _AdamW

    plain = _realized_update(torch.optim.AdamW)
    rounded = _realized_update(_AdamW, bf16_stochastic_round=True)
    # A 2e-5 step is below half a bf16 ulp for weights above ~0.005: round-to-nearest drops it (and rounds some
    # small weights too far), while stochastic rounding moves each weight by the right amount on average.
    assert abs(rounded - 1.0) < 0.15
    assert abs(plain - 1.0) > 0.3


@pytest.mark.parametrize("state_bits", [16, 8])
def test_our_stochastic_rounding_adamw_updates_exactly_as_torchao_does(state_bits):
    """Same gradients, three steps with weight decay: bit-identical weights and states, against torchao's _AdamW
    (bf16 moments) or AdamW8bit (8-bit moments for the tensors large enough to quantize, the 48 x 128 one), each of
    torchao's steps run with torch's generator seeded as ours seeds each weight's rounding at that step."""
    from torchao.optim import AdamW8bit, _AdamW

    from finetune.optim import AdamWBf16SR, rounding_seed

    theirs = {16: _AdamW, 8: AdamW8bit}[state_bits]

    def torchao_seeded_per_step_and_weight(params):
        optimizers = [theirs([p], lr=1e-3, weight_decay=0.1, bf16_stochastic_round=True) for p in params]

        def step():
            for index, optimizer in enumerate(optimizers):
                torch.manual_seed(rounding_seed(7, int(optimizer.state[params[index]].get("step", 0)) + 1, index))
                optimizer.step()
        return SimpleNamespace(step=step, state={p: o.state[p] for p, o in zip(params, optimizers)})

    runs = []
    for make in (torchao_seeded_per_step_and_weight,
                 lambda ps: AdamWBf16SR(ps, lr=1e-3, weight_decay=0.1, state_bits=state_bits, rounding_seed=7)):
        generator = torch.Generator().manual_seed(0)  # not torch's: torchao's side reseeds that at every step
        params = [torch.nn.Parameter(torch.randn(n, 128, generator=generator).to(torch.bfloat16)) for n in (16, 48, 16)]
        optimizer = make(params)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(torch.bfloat16)
            optimizer.step()
        runs.append([t for p in params for t in (p.detach(), *optimizer.state[p].values())])
    quantized = [type(t).__name__ for t in runs[1]].count("OptimState8bit")
    assert quantized == (2 if state_bits == 8 else 0)  # the two moments of the one tensor of >= 4,096 values
    for ours, theirs_ in zip(*runs):
        assert torch.equal(_plain(ours), _plain(theirs_))


def _fused_on_the_interpreter(monkeypatch) -> None:
    """CUDA's fused path for CPU weights: the kernel then runs on Triton's interpreter."""
    from finetune import optim

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernel on CPU tensors: needs TRITON_INTERPRET=1 (no CUDA)")
    monkeypatch.setattr(optim, "_fused", functools.partial(optim._fused, device_type="cpu"))


@pytest.mark.parametrize("state_bits, fused", [(16, False), (8, False), (8, True), (16, True)])
def test_replicas_whose_rng_has_drifted_apart_still_round_identically(state_bits, fused, monkeypatch):
    """Plain DDP: every rank applies the same averaged gradient to its own replica, but each rank's RNG has moved on
    by its own dropout draws. The rounding is seeded per step and weight, so the replicas stay bit-identical, in the
    compiled update and in the fused kernel (CUDA's path; here on Triton's interpreter, with 8-bit moments for the
    larger weight and bf16 ones for the smaller, or bf16 for both); another rounding_seed (another run's seed) draws
    other rounding."""
    from finetune.optim import AdamWBf16SR

    if fused:
        _fused_on_the_interpreter(monkeypatch)

    def replica(rng_draws: int, rounding_seed: int = 0) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n, 128, generator=generator).to(torch.bfloat16)) for n in (48, 16)]
        optimizer = AdamWBf16SR(params, lr=1e-3, weight_decay=0.1, state_bits=state_bits, rounding_seed=rounding_seed,
                                fused=fused)
        torch.manual_seed(rng_draws)
        for _ in range(3):
            torch.rand(rng_draws)  # this rank's dropout
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(torch.bfloat16)
            optimizer.step()
        return [p.detach().clone() for p in params]

    one, other = replica(rng_draws=1), replica(rng_draws=1000)
    assert all(torch.equal(a, b) for a, b in zip(one, other))
    assert not all(torch.equal(a, b) for a, b in zip(one, replica(rng_draws=1, rounding_seed=1)))


@pytest.fixture
def interpreter_bf16_rounding_to_nearest(monkeypatch):
    """Triton's interpreter casts float32 to bf16 by truncation; a GPU's cast, like torch's, rounds to nearest even."""
    import triton.language as tl
    from triton.runtime import interpreter

    cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return cast(self, src, dst_type)
        bits = src.data.astype(np.float32).view(np.uint32).astype(np.uint64)
        return interpreter.TensorHandle(((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16),
                                        dst_type.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)


@pytest.mark.parametrize("state_bits, fused", [(16, False), (8, False), (8, True), (16, True)])
def test_clipping_left_to_the_step_updates_as_torchs_clipping_does(state_bits, fused, monkeypatch,
                                                                    interpreter_bf16_rounding_to_nearest):
    """`clip_grad_norm_` returns torch's norm and leaves the gradients alone; the step then scales them (inside the
    fused kernel for its weights, here on Triton's interpreter) to the same weights and states, bit for bit, as
    `torch.nn.utils.clip_grad_norm_` followed by a step."""
    from finetune import optim

    if fused:
        _fused_on_the_interpreter(monkeypatch)

    def run(clip_in_the_step: bool, rows=(48, 16)) -> tuple[list[torch.Tensor], list[float]]:
        generator = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n, 128, generator=generator).to(torch.bfloat16)) for n in rows]
        optimizer = optim.AdamWBf16SR(params, lr=1e-3, weight_decay=0.1, state_bits=state_bits, fused=fused)
        norms = []
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(torch.bfloat16)
            if clip_in_the_step:
                grads = [p.grad.clone() for p in params]
                norms.append(optimizer.clip_grad_norm_(0.5).item())
                assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))  # scaled by the step, not here
            else:
                norms.append(torch.nn.utils.clip_grad_norm_(params, 0.5).item())
            optimizer.step()
        return [t for p in params for t in (p.detach(), *optimizer.state[p].values())], norms

    # The first mixes both paths where fused (3 x 128 is not whole blocks of 256: the compiled update takes it); the
    # second has every weight's gradient scaled by the kernel (LoRA's adapters).
    for rows in [(48, 16, 3), (48,)]:
        (ours, our_norms), (torchs, torch_norms) = run(True, rows), run(False, rows)
        assert our_norms == torch_norms and min(our_norms) > 0.5 * 10  # every step clipped, by 10x or more
        for a, b in zip(ours, torchs):
            assert torch.equal(_plain(a), _plain(b))


def test_the_trainer_leaves_clipping_to_the_optimizer_with_the_same_result(tiny_config, monkeypatch):
    """FusedHeadSFTTrainer hands clipping to AdamWBf16SR: three clipped steps give the weights and logged gradient
    norms of the Trainer's own clipping, bit for bit."""
    import trl
    from transformers.trainer_utils import SaveStrategy

    from finetune.optim import AdamWBf16SR
    from finetune.train import FusedHeadSFTTrainer, build_trainer

    config = dataclasses.replace(tiny_config, optimizer="adamw_bf16_sr", bf16=True, max_steps=3, logging_steps=1)
    calls = []
    clip = AdamWBf16SR.clip_grad_norm_
    monkeypatch.setattr(AdamWBf16SR, "clip_grad_norm_", lambda self, max_norm: calls.append(1) or clip(self, max_norm))

    def trained() -> tuple[dict, list[float]]:
        trainer = build_trainer(config)
        trainer.args.save_strategy = SaveStrategy.NO
        trainer.args.max_grad_norm = 0.05  # small enough that every step clips
        trainer.train()
        norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
        return {k: v.clone() for k, v in trainer.model.state_dict().items()}, norms

    ours, our_norms = trained()
    assert len(calls) == 3
    monkeypatch.setattr(FusedHeadSFTTrainer, "_clip_grad_norm", trl.SFTTrainer._clip_grad_norm)
    theirs, their_norms = trained()
    assert len(calls) == 3 and len(our_norms) == 3 and our_norms == their_norms and min(our_norms) > 0.05
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """An 8-bit state's codes and scales (equal codes and scales: equal states); any other tensor as it is."""
    return torch.cat([t.codes.flatten().float(), t.scale.flatten()]) if type(t).__name__ == "OptimState8bit" else t


@pytest.mark.gpu
def test_the_trainers_scheduler_steps_without_waiting_for_the_gpu():
    """accelerate's prepare() loads the optimizer's state dict moved to the GPU, and the Trainer builds its scheduler
    after it, from the optimizer's learning rates: a scheduler reading them back from the GPU at each of its steps
    stops the host there, right after the update was queued (torch's sync debug mode makes that an error)."""
    from accelerate.optimizer import move_to_device

    from finetune.optim import AdamWBf16SR

    weights = [torch.nn.Parameter(torch.zeros(16, 256, device="cuda", dtype=torch.bfloat16)) for _ in range(2)]
    optimizer = AdamWBf16SR([{"params": weights[:1]}, {"params": weights[1:], "weight_decay": 0.0}], lr=1e-3,
                            state_bits=8)
    optimizer.load_state_dict(move_to_device(optimizer.state_dict(), "cuda"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 10)  # the Trainer's "linear"
    for w in weights:
        w.grad = torch.ones_like(w)
    optimizer.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        scheduler.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [group["lr"].item() for group in optimizer.param_groups] == pytest.approx([0.9e-3, 0.9e-3])


def test_a_resumed_optimizer_keeps_its_scheduled_learning_rates_as_host_tensors():
    """A resumed run loads the optimizer's file after the Trainer built a fresh scheduler: the learning rates come
    back as the schedule left them, still tensors (the compiled update takes nothing else), and the schedule goes on
    from there."""
    from finetune.optim import AdamWBf16SR

    def build():
        weight = torch.nn.Parameter(torch.zeros(16, 256, dtype=torch.bfloat16))
        optimizer = AdamWBf16SR([weight], lr=1e-3, state_bits=8)
        return weight, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 10)

    weight, optimizer, scheduler = build()
    for _ in range(3):
        weight.grad = torch.ones_like(weight)
        optimizer.step()
        scheduler.step()
    _, resumed, resumed_scheduler = build()
    resumed.load_state_dict(optimizer.state_dict())
    resumed_scheduler.load_state_dict(scheduler.state_dict())
    group = resumed.param_groups[0]
    assert isinstance(group["lr"], torch.Tensor) and group["lr"].item() == pytest.approx(0.7e-3)
    assert isinstance(group["initial_lr"], torch.Tensor) and group["initial_lr"].item() == pytest.approx(1e-3)
    assert next(iter(resumed.state.values()))["step"].item() == 3
    resumed_scheduler.step()
    assert group["lr"].item() == pytest.approx(0.6e-3)


def test_8bit_moments_take_a_byte_a_value_and_reload_as_the_trainer_resumes():
    """The point of 8-bit moments is memory: one byte per value (plus a scale per 256). A resumed run reads the
    optimizer's file with `torch.load(weights_only=True)`, as the Trainer does; the states must come back intact."""
    import io

    from finetune.optim import AdamWBf16SR

    weight = torch.nn.Parameter(torch.randn(64, 256).to(torch.bfloat16))
    optimizer = AdamWBf16SR([weight], lr=1e-3, state_bits=8)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    moment = optimizer.state[weight]["exp_avg"]
    assert moment.codes.dtype == torch.uint8 and moment.codes.numel() == weight.numel()
    assert moment.scale.numel() == weight.numel() // 256
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    restored = AdamWBf16SR([torch.nn.Parameter(weight.detach().clone())], lr=1e-3, state_bits=8)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    reloaded = next(iter(restored.state.values()))["exp_avg"]
    assert torch.equal(reloaded.dequantize(), moment.dequantize())


def test_optimizer_options_map_to_weights_and_optimizer():
    reference = get_config("qwen2.5-7b-reference")
    assert reference.optimizer == "adamw_bf16_sr" and weights_dtype(reference) == torch.bfloat16
    cls, kwargs = optimizer_cls_and_kwargs(reference, sft_config(reference))
    assert cls.__name__ == "AdamWBf16SR" and kwargs["lr"] == 2e-5
    master = dataclasses.replace(reference, optimizer="adamw_fp32_master")
    assert weights_dtype(master) == torch.float32 and optimizer_cls_and_kwargs(master, sft_config(master)) is None
    eight_bit = dataclasses.replace(reference, optimizer="adamw8bit_bf16_sr")
    assert weights_dtype(eight_bit) == torch.bfloat16
    assert {k: v for k, v in optimizer_cls_and_kwargs(eight_bit, sft_config(eight_bit))[1].items()
            if k in ("state_bits", "fused")} == {"state_bits": 8, "fused": True}
    assert (kwargs["state_bits"], kwargs["fused"]) == (16, False)  # the reference: torchao's compiled update
    fused = dataclasses.replace(reference, optimizer="adamw_bf16_sr_fused")
    assert {k: v for k, v in optimizer_cls_and_kwargs(fused, sft_config(fused))[1].items()
            if k in ("state_bits", "fused")} == {"state_bits": 16, "fused": True}
    plain = dataclasses.replace(reference, optimizer="adamw")
    assert weights_dtype(plain) == torch.bfloat16 and optimizer_cls_and_kwargs(plain, sft_config(plain)) is None
    with pytest.raises(ValueError, match="needs bf16=True"):
        optimizer_cls_and_kwargs(dataclasses.replace(reference, bf16=False), sft_config(reference))
    with pytest.raises(ValueError, match="unknown optimizer"):
        optimizer_cls_and_kwargs(dataclasses.replace(reference, optimizer="sgd"), sft_config(reference))


def test_a_learning_rate_that_stops_being_a_tensor_is_refused():
    """The compiled update takes lr as a tensor (schedulers fill it in place); a float would be compiled in as a
    constant, and with the cache limit lifted each new value would recompile, silently. torchao refuses it; so do we."""
    from finetune.optim import AdamWBf16SR

    weight = torch.nn.Parameter(torch.randn(16, 32).to(torch.bfloat16))
    optimizer = AdamWBf16SR([weight], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))  # as the Trainer's
    for _ in range(2):
        weight.grad = torch.randn_like(weight)
        optimizer.step()
        scheduler.step()
    assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
    optimizer.param_groups[0]["lr"] = 1e-4
    with pytest.raises(RuntimeError, match="lr was changed to a non-Tensor object"):
        optimizer.step()


# The fused 8-bit step's tests run its Triton kernels on CPU tensors, on Triton's interpreter (tests/conftest.py turns
# it on where CUDA is absent); on a GPU machine the `gpu` tests below run the kernel itself.
on_the_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                        reason="runs the kernel on CPU tensors: needs TRITON_INTERPRET=1 (no CUDA)")


@pytest.mark.parametrize("signed", [True, False])
def test_the_fused_quantizer_gives_torchaos_codes_exactly(signed):
    """No binary search, the same codes: at every map value, every midpoint between neighbours (where torchao's own
    float32 rounding decides), the floats either side of both, and a million values spread evenly over eight decades."""
    kernel = pytest.importorskip("finetune.adamw8bit_kernel")
    from torchao.optim.quant_utils import quantize_8bit_with_qmap
    from torchao.optim.subclass_8bit import get_qmap_signed, get_qmap_unsigned

    device = "cuda" if torch.cuda.is_available() else "cpu"
    qmap = torch.tensor(get_qmap_signed() if signed else get_qmap_unsigned(), device=device)
    midpoints = (qmap[:-1] + qmap[1:]) / 2
    generator = torch.Generator(device).manual_seed(0)
    spread = 10 ** (torch.rand(10**6, generator=generator, device=device) * -8)  # 1e-8 to 1
    if signed:
        spread *= torch.randint(0, 2, spread.shape, generator=generator, device=device) * 2 - 1
    edges = torch.cat([qmap, midpoints, torch.tensor([-0.0, 1e-30], device=device)])
    up, down = torch.tensor(2.0, device=device), torch.tensor(-2.0, device=device)
    x = torch.cat([edges, torch.nextafter(edges, up), torch.nextafter(edges, down), spread])
    x = x.clamp(-1.0 if signed else 0.0, 1.0)  # the range of values / absmax
    assert torch.equal(kernel.quantize(x, signed), quantize_8bit_with_qmap(x, qmap))


@pytest.mark.gpu
@pytest.mark.parametrize("signed", [True, False])
def test_the_fused_quantizer_gives_torchaos_codes_for_every_float32_on_cuda(signed):
    """All 2.1 (signed) or 1.1 (unsigned) billion float32 in the map's range, in the GPU's own arithmetic."""
    from torchao.optim.quant_utils import quantize_8bit_with_qmap
    from torchao.optim.subclass_8bit import get_qmap_signed, get_qmap_unsigned

    from finetune.adamw8bit_kernel import quantize

    qmap = torch.tensor(get_qmap_signed() if signed else get_qmap_unsigned(), device="cuda")
    one = 0x3F800000  # the bits of 1.0; -x is x with the sign bit set
    for start in range(0, one + 1, 2**27):
        bits = torch.arange(start, min(start + 2**27, one + 1), dtype=torch.int32, device="cuda")
        for x in ([bits, bits | -(2**31)] if signed else [bits]):
            x = x.view(torch.float32)
            assert torch.equal(quantize(x, signed), quantize_8bit_with_qmap(x, qmap))


@pytest.fixture
def interpreter_fma_rounding_once(monkeypatch):
    """Triton's interpreter computes tl.fma as x * y + z in float32, rounding twice; a GPU's FMA rounds once, and so
    does torch's CPU lerp, which the reference runs. In float64 the product is exact and only the sum rounds, which
    matches one rounding unless that sum lands exactly halfway between two float32 (about once in 2^29)."""
    from triton.runtime import interpreter

    def fma(builder, x, y, z):
        return interpreter.TensorHandle((x.data.astype(np.float64) * y.data + z.data).astype(np.float32),
                                        z.dtype.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_fma", fma)


def _state_copy(state):
    from torchao.optim.subclass_8bit import OptimState8bit

    return OptimState8bit(state.codes.clone(), state.scale.clone(), state.qmap, state.signed)


def _bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two bf16 values around each float32 (as float32): toward zero, and one bf16 ulp further from zero."""
    toward_zero = x.view(torch.int32) & -65536
    return toward_zero.view(torch.float32), (toward_zero + 0x10000).view(torch.float32)


@on_the_interpreter
@pytest.mark.parametrize("state_bits", [8, 16])
def test_fused_step_computes_torchaos_update(state_bits, interpreter_fma_rounding_once,
                                            interpreter_bf16_rounding_to_nearest):
    """Three AdamW steps with weight decay, each from the same weights and states as torchao's eager single_param_adam
    (fp32 weights, no rounding): the same moments, bit for bit (8-bit codes and scales, or bf16 values), and bf16
    weights that are one of the two bf16 values around torchao's fp32 weight. Weights of 5, 16 and 21 blocks of 256:
    programs take 4 blocks, so the last one is part-filled."""
    kernel = pytest.importorskip("finetune.adamw8bit_kernel")
    from torchao.optim.adam import single_param_adam

    from finetune.lab.bench_adamw8bit import zero_states

    def copy(state):
        return _state_copy(state) if state_bits == 8 else state.clone()

    torch.manual_seed(0)
    lr = torch.tensor(1e-3)
    for shape in [(5, 256), (64, 64), (48, 112)]:
        weight = (torch.randn(shape) * 0.05).to(torch.bfloat16)
        [(exp_avg, exp_avg_sq)] = zero_states([weight], state_bits)
        for step in (1.0, 2.0, 3.0):
            grad = (torch.randn(shape) * 1e-2).to(torch.bfloat16)
            theirs = weight.float(), copy(exp_avg), copy(exp_avg_sq)
            single_param_adam(theirs[0], grad, torch.tensor(step), theirs[1], theirs[2], None, lr, 0.9, 0.999, 0.1,
                              1e-8, True, False)
            kernel.adamw8bit_step([weight], [grad], [exp_avg], [exp_avg_sq], steps=[step], seeds=[int(step)],
                                  lr=lr.item(), beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8)
            for ours, reference in [(exp_avg, theirs[1]), (exp_avg_sq, theirs[2])]:
                assert torch.equal(_plain(ours), _plain(reference))
            down, up = _bf16_neighbours(theirs[0])
            assert ((weight.float() == down) | (weight.float() == up)).all()
        assert exp_avg_sq.dtype is torch.bfloat16 if state_bits == 16 else type(exp_avg_sq).__name__ == "OptimState8bit"


@on_the_interpreter
@pytest.mark.parametrize("state_bits", [8, 16])
def test_fused_step_rounds_to_bf16_without_bias_and_from_its_seed_alone(state_bits):
    """A step of a third of a bf16 ulp on weights of 1.0 moves a third of them a whole ulp down (to 1 - 2^-8) and
    leaves the rest: on average, exactly the step. Each seed draws its own rounding; the same seed repeats it, whatever
    torch's generator holds."""
    kernel = pytest.importorskip("finetune.adamw8bit_kernel")
    from finetune.lab.bench_adamw8bit import zero_states

    lr = 2**-8 / 3  # Adam's first step moves each weight by lr (grad / |grad|)

    def one_step(seed: int) -> torch.Tensor:
        weight = torch.ones(16, 256, dtype=torch.bfloat16)
        [(exp_avg, exp_avg_sq)] = zero_states([weight], state_bits)
        kernel.adamw8bit_step([weight], [torch.ones_like(weight)], [exp_avg], [exp_avg_sq], steps=[1.0], seeds=[seed],
                              lr=lr, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8)
        return weight.float()

    draws = torch.stack([one_step(seed) for seed in range(8)])  # 32,768 roundings
    assert set(draws.unique().tolist()) == {1 - 2**-8, 1.0}
    assert abs(draws.mean().item() - (1 - lr)) < 6e-5  # six standard deviations of the mean of 32,768 draws
    assert not torch.equal(draws[0], draws[1])
    torch.manual_seed(123)
    assert torch.equal(one_step(0), draws[0])


def test_the_fused_kernel_takes_bf16_moments_only_over_whole_blocks():
    """The kernel's loads are vectors over whole blocks of 256 values: a bf16-moment weight of another size takes the
    compiled update (torchao's norms and biases under 8-bit moments are bf16 ones, and whole blocks on Qwen2.5-7B);
    one handed to the kernel anyway is refused, not updated out of bounds."""
    kernel = pytest.importorskip("finetune.adamw8bit_kernel")
    from finetune import optim
    from finetune.lab.bench_adamw8bit import zero_states

    def takes(shape, state_bits=16, dtype=torch.bfloat16, device_type="cpu") -> bool:
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = torch.zeros_like(p)
        [(m, v)] = zero_states([p.detach()], state_bits)
        return optim._fused(p, {"exp_avg": m, "exp_avg_sq": v}, device_type=device_type)

    assert takes((3584,)) and takes((512,)) and takes((48, 128), state_bits=8)
    assert not takes((3, 128)) and not takes((100,))  # 384 and 100 values: not whole blocks
    assert not takes((48, 128), dtype=torch.float32) and not takes((48, 128), device_type="cuda")
    weight = torch.zeros(3, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="blocks of 256"):
        kernel.adamw8bit_step([weight], [weight], [weight.clone()], [weight.clone()], steps=[1.0], seeds=[0], lr=1e-3,
                              beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8)


@on_the_interpreter
def test_programs_of_other_sizes_update_as_the_kernels_do():
    """bench_adamw8bit --programs times the kernel with other programs: they must compute the same step.
    Weights of 5, 16 and 21 blocks: in programs of 8 blocks, the 5's and the 21's last are partly out of bounds."""
    from finetune.lab.bench_adamw8bit import kernel_step, load_kernel_module, zero_states

    kernel = pytest.importorskip("finetune.adamw8bit_kernel")
    other = load_kernel_module(kernel.__file__)
    other.BLOCKS_PER_PROGRAM = 8
    shapes = [(5, 256), (64, 64), (48, 112)]
    results = []
    for module in (kernel, other):
        generator = torch.Generator().manual_seed(0)
        params = [(torch.randn(s, generator=generator) * 0.05).to(torch.bfloat16) for s in shapes]
        grads = [(torch.randn(s, generator=generator) * 1e-2).to(torch.bfloat16) for s in shapes]
        states = zero_states(params)
        for t in (1, 2):
            kernel_step(module, params, grads, states, t)
        results.append(params + [_plain(x) for pair in states for x in pair])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    launched = [len(module._programs((5, 16, 21), torch.device("cpu"))[0]) for module in (kernel, other)]
    assert launched == [2 + 4 + 6, 1 + 2 + 3]  # the copy did launch its own number of programs


@on_the_interpreter
def test_the_kernel_loads_vectors_only_from_addresses_the_host_found_aligned(monkeypatch):
    """A weight that starts 2 bytes into its storage (a view) takes the scalar path, and updates as the aligned copy
    of it does; an aligned one is marked aligned (the kernel then loads 8 values an instruction)."""
    kernel = pytest.importorskip("finetune.adamw8bit_kernel")
    from torchao.optim.subclass_8bit import OptimState8bit

    launched, real = [], kernel._adamw8bit_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(kwargs["ALIGNED"])
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(kernel, "_adamw8bit_kernel", Spy())
    storage = (torch.randn(2 * 256 + 1, generator=torch.Generator().manual_seed(0)) * 0.05).to(torch.bfloat16)
    before = storage[1:].clone().view(2, 256)
    weights = [before.clone(), storage[1:].view(2, 256)]  # equal values, aligned and not
    grad = torch.full((2, 256), 1e-2, dtype=torch.bfloat16)
    for weight in weights:
        kernel.adamw8bit_step([weight], [grad], [OptimState8bit.zeros(weight.shape, signed=True)],
                              [OptimState8bit.zeros(weight.shape, signed=False)], steps=[1.0], seeds=[7], lr=1e-3,
                              beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8)
    assert launched == [True, False]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], before)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="runs the kernel: on CUDA, or on CPU tensors with TRITON_INTERPRET=1")
def test_one_launch_over_many_weights_updates_each_as_its_own_launch_does():
    """The kernel finds each weight through the table: four weights of 5, 16, 21 and 3 blocks (part-filled last
    programs), each at its own step and seed, updated in one launch, give the weights and states of four launches.
    On a GPU where one is present (the tables then travel through pinned memory), else on Triton's interpreter."""
    kernel = pytest.importorskip("finetune.adamw8bit_kernel")
    from torchao.optim.subclass_8bit import OptimState8bit

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(5, 256), (64, 64), (48, 112), (3, 256)]

    def three_steps(together: bool) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        weights = [(torch.randn(s, generator=generator) * 0.05).to(device, torch.bfloat16) for s in shapes]
        moments = [(OptimState8bit.zeros(s, signed=True, device=device),
                    OptimState8bit.zeros(s, signed=False, device=device)) for s in shapes]
        for step in (1, 2, 3):
            grads = [(torch.randn(s, generator=generator) * 1e-2).to(device, torch.bfloat16) for s in shapes]
            updates = [([w], [g], [m], [v], [float(step + i)], [10 * step + i])
                       for i, (w, g, (m, v)) in enumerate(zip(weights, grads, moments))]
            if together:
                updates = [[sum(lists, []) for lists in zip(*updates)]]
            for w, g, m, v, steps, seeds in updates:
                kernel.adamw8bit_step(w, g, m, v, steps=steps, seeds=seeds, lr=1e-3, beta1=0.9, beta2=0.999,
                                      weight_decay=0.1, eps=1e-8)
        return [t.cpu() for t in weights + [_plain(t) for pair in moments for t in pair]]

    together, apart = three_steps(True), three_steps(False)
    assert all(torch.equal(a, b) for a, b in zip(together, apart))
    generator = torch.Generator().manual_seed(0)
    initial = [(torch.randn(s, generator=generator) * 0.05).to(torch.bfloat16) for s in shapes]
    assert all((w != w0).float().mean() > 0.5 for w, w0 in zip(together, initial))  # every weight was updated


def test_the_optimizer_launches_the_fused_kernel_once_for_each_group_and_kind_of_moments(monkeypatch):
    """LoRA's 392 adapter weights took 392 launches, each costing more host time than its GPU work: the step hands
    all of a group's fused weights to one call for each kind of moments (8-bit states, and the bf16 ones torchao keeps
    for tensors under 4,096 values), and only those; with `fused=False` (the bf16 reference's), none."""
    pytest.importorskip("triton")
    from finetune import adamw8bit_kernel, optim

    calls = []
    monkeypatch.setattr(optim, "_fused", functools.partial(optim._fused, device_type="cpu"))
    monkeypatch.setattr(adamw8bit_kernel, "adamw8bit_step", lambda params, *args, **kwargs: calls.append(params))
    monkeypatch.setattr(optim, "_update", lambda *args: calls.append("compiled"))
    for fused in (True, False):
        weights = [torch.nn.Parameter(torch.zeros(n, 128, dtype=torch.bfloat16)) for n in (32, 48, 16, 64, 40)]
        optimizer = optim.AdamWBf16SR([{"params": weights[:3]}, {"params": weights[3:], "weight_decay": 0.0}],
                                      lr=1e-3, state_bits=8, fused=fused)
        for w in weights:
            w.grad = torch.ones_like(w)
        optimizer.step()
    shapes = [call if call == "compiled" else [p.shape[0] for p in call] for call in calls]
    assert shapes == [[32, 48], [16], [64, 40]] + ["compiled"] * 5  # 16 x 128: bf16 moments, a launch of its own


@pytest.mark.gpu
@pytest.mark.parametrize("state_bits", [8, 16])
def test_fused_step_on_cuda_matches_the_compiled_update(state_bits, monkeypatch):
    """On CUDA, AdamWBf16SR's weights take the fused kernel (the compiled update must not run for them). From the same
    weights and states, torchao's compiled update with fp32 weights gives the same 8-bit codes but for rare neighbours
    (Inductor rounds its division by the absmax its own way, and may fuse other multiply-adds than the kernel does),
    scales within 1e-6, bf16 moments equal but for rare one-ulp neighbours, and weights one bf16 ulp at most from the
    kernel's stochastically rounded ones."""
    from accelerate.optimizer import move_to_device

    from finetune import optim
    from finetune.lab.bench_adamw8bit import zero_states

    def copy(state):
        return _state_copy(state) if state_bits == 8 else state.clone()

    compiled = optim._update
    # The earlier tests' graphs of the compiled update count toward Dynamo's recompile limit, which its fullgraph
    # compile turns into an error: start this one from none.
    torch._dynamo.reset()
    monkeypatch.setattr(optim, "_update", lambda *args: pytest.fail("the compiled update ran for a fused weight"))
    torch.manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(shape, device="cuda") * 0.05).to(torch.bfloat16))
              for shape in [(16, 256), (64, 96), (48, 112)]]  # 16, 24 and 21 blocks of 256
    optimizer = optim.AdamWBf16SR(params, lr=1e-3, weight_decay=0.1, state_bits=state_bits)
    optimizer.load_state_dict(move_to_device(optimizer.state_dict(), "cuda"))  # as accelerate's prepare() does
    for _ in range(3):
        references = []
        for p in params:
            p.grad = (torch.randn_like(p, dtype=torch.float32) * 1e-2).to(torch.bfloat16)
            state = optimizer.state[p]
            if state:
                theirs = p.detach().float(), copy(state["exp_avg"]), copy(state["exp_avg_sq"])
            else:  # the optimizer's first step makes its states
                theirs = (p.detach().float(), *zero_states([p.detach()], state_bits)[0])
            step = state["step"] + 1 if state else torch.tensor(1.0)
            with torch.no_grad():  # as the optimizer's step runs: a change of grad mode would recompile each shape
                compiled(theirs[0], p.grad, step, theirs[1], theirs[2], None, optimizer.param_groups[0]["lr"], 0.9,
                         0.999, 0.1, 1e-8, True, False)
            references.append(theirs)
        optimizer.step()
        for p, theirs in zip(params, references):
            state = optimizer.state[p]
            for ours, reference in [(state["exp_avg"], theirs[1]), (state["exp_avg_sq"], theirs[2])]:
                if state_bits == 8:
                    differ = ours.codes.int() - reference.codes.int()
                    torch.testing.assert_close(ours.scale, reference.scale, rtol=1e-6, atol=0)
                else:  # neighbouring bf16 values are neighbouring integers of their bits, sign aside
                    differ = ours.view(torch.int16).int() - reference.view(torch.int16).int()
                assert differ.abs().max() <= 1 and (differ != 0).float().mean() < 1e-3
            # Stochastic rounding picks a bf16 neighbour of the fp32 result; the two fp32 results may differ by the
            # rounding of an update of about lr, which near a bf16 boundary can put the neighbours one ulp apart.
            down, up = _bf16_neighbours(theirs[0])
            assert ((p.detach().float() - theirs[0]).abs() <= (up - down).abs() + 1e-4 * 1e-3).all()


def test_the_kernels_main_path_leaves_out_only_the_slow_paths_branched_over_to_a_call():
    from finetune.lab.sass_adamw8bit import main_path

    sass = ["LDG.E R0, desc[UR4][R2.64]", "@!P4 BRA 0x40", "MOV R4, R0", "CALL.REL.NOINC 0x90",  # slow division
            "FFMA R1, R0, R0, R0", "@P0 BRA 0x70", "FADD R1, R1, R1",  # a branch over plain code counts
            "STG.E desc[UR4][R2.64], R1", "EXIT", "RET.REL.NODEC R4 0x0"]
    assert main_path(sass) == ["LDG.E R0, desc[UR4][R2.64]", "@!P4 BRA 0x40", "FFMA R1, R0, R0, R0",
                               "@P0 BRA 0x70", "FADD R1, R1, R1", "STG.E desc[UR4][R2.64], R1", "EXIT"]


def test_the_fused_kernel_compiles_offline_to_vector_loads_for_hopper():
    """Compiled for sm_90 from the arguments a step passes, on this CPU: each thread's 16 values two loads of weight,
    gradient and codes (8 values a load). Reading the weights' addresses from a table lost their alignment (and the
    vector loads) at 66a08cf: 165 instructions a value with Triton 3.9, 177 with 3.6 (the H200 image's); ad67def, one
    launch a weight, 122 and 136; this kernel 116 and 128 at 4 warps a program, 103 with Triton 3.9 at its 2
    (results/benchmarks/adamw8bit_sass*.json). With bf16 moments, no quantization: fewer instructions, the moments'
    loads vectors too (two a thread, as the weight's)."""
    pytest.importorskip("torchao")
    script = ("import json; from finetune.lab.sass_adamw8bit import count, load_kernel_module; "
              "module = load_kernel_module('finetune/adamw8bit_kernel.py'); "
              "print(json.dumps([count(module, 90, bits) for bits in (8, 16)]))")
    eight_bit, sixteen_bit = compiled_offline_output(script)
    assert eight_bit["instructions_per_value"] < 150 and eight_bit["values_per_thread"] == 16
    assert sixteen_bit["instructions_per_value"] < 0.8 * eight_bit["instructions_per_value"]
    # A thread's loads: 2 vectors each of weight, gradient and both moments, and the table's entries (weight, scalars)
    assert sixteen_bit["by_opcode_per_value"]["LDG"] * sixteen_bit["values_per_thread"] < 32


def test_pretraining_a_base_trains_with_the_configs_optimizer(tiny_config, monkeypatch):
    """The optimizer is part of a pretrained base's cache key (finetune/pretrain.py), so it must be the one used."""
    import finetune.pretrain as pretrain

    class Built(Exception):
        pass

    def trainer(**kwargs):
        raise Built(kwargs["optimizer_cls_and_kwargs"])

    monkeypatch.setattr(pretrain, "FusedHeadSFTTrainer", trainer)
    config = dataclasses.replace(tiny_config, optimizer="adamw_bf16_sr", bf16=True, max_train_samples=40)
    with pytest.raises(Built) as built:
        pretrain.pretrained_base(config)
    optimizer_cls, kwargs = built.value.args[0]
    assert optimizer_cls.__name__ == "AdamWBf16SR" and kwargs["state_bits"] == 16
