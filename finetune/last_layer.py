"""The last decoder layer's MLP only at the positions whose logits are read.

A position's output of the last decoder layer feeds nothing but the LM head at that position: no later layer attends
to it. Label scoring reads the logits at each article's tail (its last prompt token and the answer tree, ~10 of ~80
tokens an article once the opening is shared), a decoder's prefill at each prompt's last token. The last layer still
runs its attention over every position (the read ones attend to the others' keys and values), then its MLP, 87% of a
Qwen2.5-7B layer's FLOPs, on the read rows alone: ~3% of a scoring pass's FLOPs, with the read rows as before (the
same operations on fewer rows) and the others holding the attention's output, which nothing reads.
"""

import types
from contextlib import contextmanager

import torch

from finetune.speedups import decoder_layers

READ_POSITIONS = "read_positions"  # the forward keyword: the positions of a packed row (batch of one) that are read


def mlp_only_where_read(model: torch.nn.Module) -> None:
    """Give `model`'s last decoder layer `_forward_read_rows`: calls that pass `read_positions` run its MLP on those
    rows only, every other call runs the layer as it was. Installed once, before any compilation: a compiled layer
    whose forward changed between calls would compile again each time."""
    layer = decoder_layers(model)[-1]
    layer.forward = types.MethodType(_forward_read_rows, layer)


def _forward_read_rows(layer: torch.nn.Module, hidden_states: torch.Tensor, read_positions: torch.Tensor | None = None,
                       **kwargs) -> torch.Tensor:
    """Qwen2's (and Llama's) decoder layer, its MLP on `read_positions` of a packed row only."""
    if read_positions is None:
        return type(layer).forward(layer, hidden_states, **kwargs)
    attended = hidden_states + layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)[0]
    read = attended[:, read_positions]
    return attended.index_copy(1, read_positions, read + layer.mlp(layer.post_attention_layernorm(read)))


@contextmanager
def whole_last_layer(model: torch.nn.Module):
    """The last layer as transformers runs it, whatever the call reads, for the duration: the eval benchmark's measure
    of what `mlp_only_where_read` saves, in the same run."""
    layer = decoder_layers(model)[-1]
    forward = layer.__dict__.pop("forward", None)
    try:
        yield
    finally:
        if forward is not None:
            layer.forward = forward
