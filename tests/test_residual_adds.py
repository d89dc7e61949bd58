"""The decoder layers' residual adds inside the matmuls that feed them, at inference (`finetune.residual_adds`): the
same scores and answers, no add kernel of their own, and a forward with gradients as transformers writes it."""

import copy

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from finetune.config import get_config
from finetune.generation import generate_labels
from finetune.last_layer import mlp_only_where_read
from finetune.model import load_model, train_bpe_tokenizer
from finetune.predict import score_labels
from finetune.residual_adds import adds_in_matmuls
from finetune.speedups import as_transformers_writes, decoder_layers

TEXTS = ["Stocks rally as profits beat forecasts.", "The striker scored twice in the final.",
         "Rebels and troops agree to a ceasefire after talks in the capital city.", "NASA tests a new chip."]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(TEXTS * 20, vocab_size=400, cache_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model(tokenizer, tmp_path_factory):
    config = get_config("tiny", hidden_size=64, intermediate_size=128, num_layers=3,
                        checkpoints_dir=str(tmp_path_factory.mktemp("c")))
    return load_model(config, tokenizer).eval()


def fused(model):
    """The model as evaluation loads it: the last layer's MLP where read, the other layers' adds in the matmuls."""
    model = copy.deepcopy(model)
    mlp_only_where_read(model)
    adds_in_matmuls(model)
    return model


class ResidualOps(TorchDispatchMode):
    """The ops a forward runs on whole (tokens, hidden) residual streams: separate adds and in-place addmm."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden, self.ops = hidden, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("add", "add_", "addmm_") and out.shape[-1] == self.hidden and out.numel() > self.hidden:
            self.ops.append(name)
        return out


def test_each_layer_but_the_last_adds_inside_its_two_matmuls(model, tokenizer):
    ids = torch.tensor([tokenizer(TEXTS[2])["input_ids"]])
    hidden, layers = model.config.hidden_size, len(decoder_layers(model))
    counted = {}
    for name, candidate in (("stock", model), ("fused", fused(model))):
        with torch.inference_mode(), ResidualOps(hidden) as recorded:
            candidate(input_ids=ids)
        counted[name] = sorted(recorded.ops)
    assert counted["stock"] == ["add"] * 2 * layers
    assert counted["fused"] == ["add"] * 2 + ["addmm_"] * 2 * (layers - 1)  # the last layer keeps its own forward


def test_label_scoring_and_decoding_give_the_same_answers_with_the_adds_inside_the_matmuls(model, tokenizer):
    sped_up = fused(model)
    scored = score_labels(sped_up, tokenizer, TEXTS, batch_size=2, progress=False, method="packed")
    stock = score_labels(model, tokenizer, TEXTS, batch_size=2, progress=False, method="packed")
    np.testing.assert_allclose(scored.label_logprobs, stock.label_logprobs, atol=1e-5)
    with as_transformers_writes(decoder_layers(sped_up)[:-1]):  # the eval benchmark's comparison
        separate = score_labels(sped_up, tokenizer, TEXTS, batch_size=2, progress=False, method="packed")
    np.testing.assert_allclose(separate.label_logprobs, stock.label_logprobs, atol=1e-6)
    decode = dict(batch_size=2, max_new_tokens=4, progress=False, tree_check=False)
    assert (generate_labels(sped_up, tokenizer, TEXTS, **decode).answers
            == generate_labels(model, tokenizer, TEXTS, **decode).answers)


def test_a_forward_with_gradients_runs_the_layers_as_transformers_writes_them(model, tokenizer):
    ids = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    grads = []
    for candidate in (model, fused(model)):
        candidate.zero_grad()
        candidate(input_ids=ids, labels=ids).loss.backward()
        grads.append({name: p.grad.clone() for name, p in candidate.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_hidden_states_asked_for_are_each_layers_own(model, tokenizer):
    """transformers records each layer's output as it comes, and that output is the next layer's input: adding into
    it in place would rewrite every recorded state."""
    ids = torch.tensor([tokenizer(TEXTS[2])["input_ids"]])
    sped_up = fused(model)
    with torch.inference_mode():
        recorded = sped_up(input_ids=ids, output_hidden_states=True).hidden_states
        stock = copy.deepcopy(model)(input_ids=ids, output_hidden_states=True).hidden_states  # hooks stay on a copy
    for layer, (state, want) in enumerate(zip(recorded, stock)):
        torch.testing.assert_close(state, want, msg=f"hidden state {layer}")


def test_the_models_own_input_is_left_as_it_was_given(model, tokenizer):
    ids = torch.tensor([tokenizer(TEXTS[2])["input_ids"]])
    sped_up = fused(model)
    with torch.inference_mode():
        embeds = sped_up.get_input_embeddings()(ids)
        given = embeds.clone()
        logits = sped_up(inputs_embeds=embeds).logits
        torch.testing.assert_close(logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(embeds, given)


class Quantized(torch.Tensor):
    """A stand-in for a quantized weight (torchao's FP8 tensors): a tensor subclass, which addmm_ is not given."""


def test_a_quantized_weight_adds_after_its_own_matmul(model, tokenizer):
    ids = torch.tensor([tokenizer(TEXTS[1])["input_ids"]])
    sped_up = fused(model)
    for layer in decoder_layers(sped_up):
        for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
            linear.weight = torch.nn.Parameter(linear.weight.detach().as_subclass(Quantized), requires_grad=False)
    with torch.inference_mode(), ResidualOps(model.config.hidden_size) as recorded:
        logits = sped_up(input_ids=ids).logits
    assert "addmm_" not in recorded.ops
    with torch.inference_mode():
        torch.testing.assert_close(logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_layers_whose_projections_are_not_plain_linear_ones_keep_their_forward(model, tokenizer):
    """QLoRA's 4-bit projections (and an adapter beside them) are other modules: their layers run as they were."""
    ids = torch.tensor([tokenizer(TEXTS[2])["input_ids"]])
    other = copy.deepcopy(model)
    first = decoder_layers(other)[0]
    first.mlp.down_proj = torch.nn.Sequential(first.mlp.down_proj)  # a module wrapping the projection, as LoRA's do
    with torch.inference_mode():
        want = other(input_ids=ids).logits
    mlp_only_where_read(other)
    adds_in_matmuls(other)
    assert "forward" not in vars(first) and "forward" in vars(decoder_layers(other)[1])
    with torch.inference_mode(), ResidualOps(model.config.hidden_size) as recorded:
        logits = other(input_ids=ids).logits
    assert sorted(recorded.ops) == ["add"] * 4 + ["addmm_"] * 2 * (len(decoder_layers(model)) - 2)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_on_cuda_in_bf16_with_ligers_kernels_the_adds_run_inside_the_matmuls(model, tokenizer):
    """As the 7B evaluates: bf16 on CUDA, Liger's norm and SwiGLU calling the projections. One rounding where the
    separate add made two, so the logits agree to bf16's precision, not bit for bit."""
    from finetune.model import apply_liger_kernels

    sped_up = copy.deepcopy(model).to("cuda", torch.bfloat16)
    apply_liger_kernels(sped_up)
    adds_in_matmuls(sped_up)
    ids = torch.tensor([tokenizer(TEXTS[2])["input_ids"]], device="cuda")
    with torch.inference_mode(), ResidualOps(model.config.hidden_size) as recorded:
        logits = sped_up(input_ids=ids).logits.float()
    with torch.inference_mode(), as_transformers_writes(decoder_layers(sped_up)[:-1]):
        separate = sped_up(input_ids=ids).logits.float()
    assert recorded.ops.count("addmm_") == 2 * (len(decoder_layers(model)) - 1)
    torch.testing.assert_close(logits, separate, rtol=0, atol=0.05 * separate.abs().max().item())


@pytest.mark.gpu
def test_cuda_graph_decoding_gives_the_same_answers_with_the_adds_inside_the_matmuls(model, tokenizer, monkeypatch):
    """Decoding's steps are captured as one CUDA graph: the in-place adds must capture and replay as they run. In
    float32 without TF32 (a training test may have turned it on), where one rounding against two cannot turn a greedy
    choice."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    sped_up = fused(model).cuda()
    decode = dict(batch_size=2, max_new_tokens=6, progress=False, tree_check=False)
    with_adds = generate_labels(sped_up, tokenizer, TEXTS, **decode)
    with as_transformers_writes(decoder_layers(sped_up)[:-1]):
        separate = generate_labels(sped_up, tokenizer, TEXTS, **decode)
    assert with_adds.decoding_cuda_graph is True and with_adds.answers == separate.answers
