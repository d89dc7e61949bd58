"""The decoder layers' residual adds inside the matmuls that feed them, at inference (`adds_in_matmuls`).

A Qwen2 decoder layer adds its attention's output projection (o_proj) and its MLP's (down_proj) into the residual
stream. As transformers writes the layer, each add is a kernel of its own that reads two (tokens, hidden) tensors and
writes a third: 26.7 ms of the 1.46 s of GPU time in label scoring's profile on an H100, 1.8%
(results/benchmarks/h100_7b_eval_taught_200_copied.json). A GEMM adds a matrix into its product as it writes it
(cuBLAS's beta = 1): `residual.addmm_(x, weight.T)` reads the residual once, in the matmul's epilogue, and writes the
sum over it, rounded once where the separate add rounded twice: label scoring 1.013x the same layers with separate
adds, in each of three runs on an H100 (results/benchmarks/h100_7b_eval_taught_200_adds*.json). In place, into a
stream the forward itself made (the first layer adds into a copy of the model's input), so inference only: a forward
with gradients, or one whose hidden states are recorded, runs the layer as transformers writes it.
"""

import types

import torch
import torch.nn.functional as F

from finetune.speedups import decoder_layers


def adds_in_matmuls(model: torch.nn.Module) -> None:
    """Every decoder layer but the last (`finetune.last_layer` gives that one a forward of its own) adds o_proj's and
    down_proj's products into its input in place, inside their matmuls. Once, at load, in place of compiled layers
    (inductor fuses the layer its own way). A layer whose projections are not plain bias-free linear layers (QLoRA's
    4-bit ones, an adapter left beside them) keeps its forward."""
    for index, layer in enumerate(decoder_layers(model)[:-1]):
        projections = (layer.self_attn.o_proj, layer.mlp.down_proj)
        if not all(type(projection) is torch.nn.Linear and projection.bias is None for projection in projections):
            continue
        for projection in projections:
            projection.into = None
            projection.forward = types.MethodType(_project_into, projection)
        layer.forward = types.MethodType(_forward_adding_in_matmuls, layer)
        layer.adds_into_a_copy = index == 0  # the model's input (a caller's `inputs_embeds`) stays as it was given


def _forward_adding_in_matmuls(layer: torch.nn.Module, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """Qwen2's (and Llama's) decoder layer, its attention and MLP each adding into `hidden_states` itself. As
    transformers writes it where autograd needs the input, or where something reads the layer's outputs as they come
    (a forward hook: transformers records `output_hidden_states` so, each layer's output being the next one's input,
    and keeps the hooks once a model was asked)."""
    if torch.is_grad_enabled() or layer._forward_hooks:
        return type(layer).forward(layer, hidden_states, **kwargs)
    if layer.adds_into_a_copy:
        hidden_states = hidden_states.clone()
    attention, mlp = layer.self_attn, layer.mlp
    attention.o_proj.into = mlp.down_proj.into = hidden_states
    try:
        attention(hidden_states=layer.input_layernorm(hidden_states), **kwargs)
        mlp(layer.post_attention_layernorm(hidden_states))
    finally:
        attention.o_proj.into = mlp.down_proj.into = None
    return hidden_states


def _project_into(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The bias-free projection of `x`, or, where its layer set `into`, `into` with the projection added in place:
    inside the matmul for a plain weight, after it for a quantized one (the eval benchmark's FP8 modes)."""
    into = linear.into
    if into is None:
        return F.linear(x, linear.weight)
    if type(linear.weight.data) is not torch.Tensor:
        return into.add_(F.linear(x, linear.weight))
    into.view(-1, linear.out_features).addmm_(x.reshape(-1, linear.in_features), linear.weight.t())
    return into
