"""The optimizer options: bf16 weights under plain AdamW lose most small updates; stochastic rounding keeps them."""

import dataclasses

import pytest
import torch

from finetune.config import get_config
from finetune.model import weights_dtype
from finetune.train import optimizer_cls_and_kwargs, sft_config


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
    """Same seed, same gradients, three steps with weight decay: bit-identical weights and states, against torchao's
    _AdamW (bf16 moments) or AdamW8bit (8-bit moments for the tensors large enough to quantize, the 48 x 128 one)."""
    from torchao.optim import AdamW8bit, _AdamW

    from finetune.optim import AdamWBf16SR

    theirs = {16: _AdamW, 8: AdamW8bit}[state_bits]
    runs = []
    for make in (lambda ps: theirs(ps, lr=1e-3, weight_decay=0.1, bf16_stochastic_round=True),
                 lambda ps: AdamWBf16SR(ps, lr=1e-3, weight_decay=0.1, state_bits=state_bits)):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n, 128).to(torch.bfloat16)) for n in (16, 48, 16)]
        optimizer = make(params)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            optimizer.step()
        runs.append([t for p in params for t in (p.detach(), *optimizer.state[p].values())])
    quantized = [type(t).__name__ for t in runs[1]].count("OptimState8bit")
    assert quantized == (2 if state_bits == 8 else 0)  # the two moments of the one tensor of >= 4,096 values
    for ours, theirs_ in zip(*runs):
        assert torch.equal(_plain(ours), _plain(theirs_))


def _plain(t: torch.Tensor) -> torch.Tensor:
    """An 8-bit state's codes and scales (equal codes and scales: equal states); any other tensor as it is."""
    return torch.cat([t.codes.flatten().float(), t.scale.flatten()]) if type(t).__name__ == "OptimState8bit" else t


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
    reference = get_config("qwen2.5-7b")
    assert reference.optimizer == "adamw_bf16_sr" and weights_dtype(reference) == torch.bfloat16
    cls, kwargs = optimizer_cls_and_kwargs(reference, sft_config(reference))
    assert cls.__name__ == "AdamWBf16SR" and kwargs["lr"] == 2e-5
    master = dataclasses.replace(reference, optimizer="adamw_fp32_master")
    assert weights_dtype(master) == torch.float32 and optimizer_cls_and_kwargs(master, sft_config(master)) is None
    eight_bit = dataclasses.replace(reference, optimizer="adamw8bit_bf16_sr")
    assert weights_dtype(eight_bit) == torch.bfloat16
    assert optimizer_cls_and_kwargs(eight_bit, sft_config(eight_bit))[1]["state_bits"] == 8
    assert kwargs["state_bits"] == 16
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
