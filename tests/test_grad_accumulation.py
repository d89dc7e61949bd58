"""Weight gradients summed inside their matmul (finetune/grad_accumulation.py): the gradients autograd sums, through
compiled and checkpointed layers, from zero at each optimizer step, and the same trained weights through the Trainer."""

import dataclasses

import pytest
import torch

from finetune.attention import VARLEN, choose_attn_implementation
from finetune.grad_accumulation import GradIntoBuffers, GradIntoLinear, accumulate_in_matmul
from finetune.model import load_model, train_bpe_tokenizer
from finetune.speedups import check_speedups, compile_decoder_layers, decoder_layers
from finetune.train import build_trainer
from tests.test_speedups import _losses_and_grads, _packed_batch


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(["Stocks rallied after the earnings report."] * 40, vocab_size=400,
                               cache_dir=tmp_path_factory.mktemp("tok"))


def test_compiled_layers_sum_the_gradients_autograd_sums_and_start_from_zero_each_step(tiny_config, tokenizer):
    """Three micro-batches through compiled (aot_eager: the backward traced as inductor traces it) and checkpointed
    layers give autograd's gradients, every decoder linear's in its buffer, which is its `.grad`; the next step
    starts from zero rather than adding to the last one's."""
    choose_attn_implementation("auto", packing=True)
    torch.manual_seed(0)
    eager = load_model(tiny_config, tokenizer, VARLEN)
    model = load_model(tiny_config, tokenizer, VARLEN)
    model.load_state_dict(eager.state_dict())
    weights = accumulate_in_matmul(model)
    linears = [m for layer in decoder_layers(model) for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    assert len(weights) == len(linears) == 7 * len(decoder_layers(model))
    assert all(type(m) is GradIntoLinear for m in linears)
    torch._dynamo.reset()
    compile_decoder_layers(model, backend="aot_eager")
    step = GradIntoBuffers(weights)

    step.on_step_begin(None, None, None)
    expected, got = _losses_and_grads(eager), _losses_and_grads(model)
    assert got[0] == pytest.approx(expected[0], rel=1e-6)
    for a, b in zip(got[1], expected[1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert all(w.grad.data_ptr() == w.grad_buffer.data_ptr() for w in weights)

    model.zero_grad()  # as the Trainer does after each optimizer step
    eager.zero_grad()
    step.on_step_begin(None, None, None)
    batch = _packed_batch([30, 50, 20], model.config.vocab_size, seed=0)
    model(**batch).loss.backward()
    eager(**batch).loss.backward()
    for w, e in zip(weights, [m.weight for layer in decoder_layers(eager) for m in layer.modules()
                              if isinstance(m, torch.nn.Linear)]):
        torch.testing.assert_close(w.grad, e.grad, atol=1e-6, rtol=1e-5)


def test_the_buffers_are_made_where_the_weights_are_at_the_first_step(tiny_config, tokenizer):
    """The Trainer moves a model loaded on the CPU after it is built, and the buffers must follow: a move to float64
    stands in for the one to the GPU (a buffer left behind cannot be a weight's `.grad`: another dtype, as another
    device, is refused). Autograd's gradients, in the moved weights' dtype."""
    choose_attn_implementation("auto", packing=True)
    torch.manual_seed(0)
    eager = load_model(tiny_config, tokenizer, VARLEN).double()
    model = load_model(tiny_config, tokenizer, VARLEN)
    weights = accumulate_in_matmul(model)
    model.double().load_state_dict(eager.state_dict())
    GradIntoBuffers(weights).on_step_begin(None, None, None)
    expected, got = _losses_and_grads(eager), _losses_and_grads(model)
    assert all(w.grad.dtype == torch.float64 and w.grad.data_ptr() == w.grad_buffer.data_ptr() for w in weights)
    for a, b in zip(got[1], expected[1]):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_inductor_sums_in_place_on_the_gpu(tiny_config, tokenizer):
    """Inductor's compiled layers on CUDA: autograd's gradients, summed into the buffers themselves. The model is
    turned on the CPU and moved after, as a `from_pretrained` model is."""
    choose_attn_implementation("auto", packing=True)
    torch.manual_seed(0)
    eager = load_model(tiny_config, tokenizer, VARLEN).cuda()
    model = load_model(tiny_config, tokenizer, VARLEN).cpu()
    weights = accumulate_in_matmul(model)
    model.cuda().load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    compile_decoder_layers(model)
    GradIntoBuffers(weights).on_step_begin(None, None, None)
    expected, got = _losses_and_grads(eager, "cuda"), _losses_and_grads(model, "cuda")
    for a, b in zip(got[1], expected[1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    assert all(w.grad.data_ptr() == w.grad_buffer.data_ptr() for w in weights)


def test_the_trainer_trains_the_same_weights_with_gradients_summed_in_the_matmul(tiny_config, tmp_path):
    """Three micro-batches a step through the Trainer (its zero_grad, clipping and AdamW), with and without. Were the
    buffers not the weights' `.grad` at the optimizer, those weights would not move, and differ from the plain run's."""
    config = dataclasses.replace(tiny_config, num_train_epochs=1.0, max_train_samples=120, logging_steps=1,
                                 gradient_accumulation_steps=3, per_device_train_batch_size=4, save_steps=1000)
    summed = build_trainer(dataclasses.replace(config, accumulate_in_matmul=True,
                                               checkpoints_dir=str(tmp_path / "summed")))
    assert any(type(m) is GradIntoLinear for m in summed.model.modules())
    summed.train()
    plain = build_trainer(dataclasses.replace(config, checkpoints_dir=str(tmp_path / "plain")))
    before = {name: value.clone() for name, value in plain.model.state_dict().items()}
    plain.train()
    assert summed.state.global_step == plain.state.global_step >= 3
    for name, value in plain.model.state_dict().items():
        assert not torch.equal(value, before[name]) or "norm" in name, name
        torch.testing.assert_close(summed.model.state_dict()[name], value, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("change", [dict(method="lora"), dict(fp8="tensorwise_pow2_scales"), dict(world_size=2)])
def test_summing_in_the_matmul_is_refused_where_nothing_would_be_summed(tiny_config, monkeypatch, change):
    if change.pop("world_size", None):
        monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="accumulate_in_matmul"):
        check_speedups(dataclasses.replace(tiny_config, accumulate_in_matmul=True, **change))
