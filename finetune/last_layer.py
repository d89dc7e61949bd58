"""The last decoder layer's MLP only at the positions whose logits are read (`RunConfig.last_layer_where_read`).

A position's output of the last decoder layer feeds nothing but the LM head at that position: no later layer attends
to it. Training reads the head only where the next token carries loss (TRL's fused head: the answer, ~7.5 of the ~62
tokens an article runs once the opening is shared), label scoring at each article's tail (its last prompt token and
the answer tree), a decoder's prefill at each prompt's last token. The last layer still runs its attention over every
position (the read ones attend to the others' keys and values), then its MLP, 87% of a Qwen2.5-7B layer's FLOPs, on
the read rows alone: ~3% of a step's or a scoring pass's FLOPs. The read rows get the same operations as before, on
fewer rows; the others hold the attention's output, which nothing reads, and get no gradient through the MLP (they
got none before: their logits carry no loss). On an H100 it saved less time than FLOPs (docs/performance.md, "The last
layer where the loss reads").
"""

import types
from dataclasses import dataclass
from typing import Callable

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


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions of a packed row (`labels` of shape (1, tokens)) whose logits the loss reads: TRL's fused head
    scores position t against label t + 1, so those whose next label is not -100."""
    return torch.nonzero(labels[0, 1:] != -100)[:, 0]


@dataclass
class ReadPositionsCollator:
    """A padding-free collator's batches with their `loss_positions` added, the last layer's read rows. It runs in the
    data-loader workers, on the host: the training loop never waits for the positions."""

    collate: Callable[[list[dict]], dict]

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collate(examples)
        return {**batch, READ_POSITIONS: loss_positions(batch["labels"])}

