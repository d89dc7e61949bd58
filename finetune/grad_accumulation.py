"""Weight gradients accumulated inside their matmul: with several micro-batches a step, autograd computes each
micro-batch's weight gradient into a new tensor and then adds it to `.grad` (`AccumulateGrad`), three more passes over
every weight's bytes (read both, write one). Here the decoder layers' linear layers add their weight gradient to a
buffer that stays `.grad`, inside the matmul (cuBLAS with beta = 1, in place): one read of the buffer instead of the
three passes, as Megatron's gradient-accumulation fusion does. In an H100 profile of the recipe at 8 x 4 rows the
adds took 46 ms of a 1.16 s step (results/benchmarks/h100_7b_train_recipe_profile_e.json).

The sum is a custom op that says it mutates the buffer: inductor calls it on the buffer itself. Every micro-batch adds
(a buffer zeroed at the step's start, one pass, beside the three a micro-batch saves): whether to overwrite instead
would be host state that a compiled graph cannot see. One process only: DDP and FSDP reduce what autograd
accumulates, and nothing is accumulated here.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import TrainerCallback

from finetune.speedups import decoder_layers


@torch.library.custom_op("finetune::weight_grad_into", mutates_args=("buffer",))
def weight_grad_into(buffer: torch.Tensor, grad_output: torch.Tensor, x: torch.Tensor) -> None:
    """buffer += dY^T x, inside the matmul."""
    buffer.addmm_(grad_output.reshape(-1, grad_output.shape[-1]).t(), x.reshape(-1, x.shape[-1]))


@weight_grad_into.register_fake
def _(buffer, grad_output, x) -> None:
    return None


class _LinearGradInto(torch.autograd.Function):
    """F.linear whose weight gradient goes into `buffer` (and is returned as None to autograd)."""

    @staticmethod
    def forward(ctx, x, weight, bias, buffer):
        ctx.save_for_backward(x, weight, buffer)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, buffer = ctx.saved_tensors
        weight_grad_into(buffer, grad_output, x)
        grad_x = grad_output @ weight if ctx.needs_input_grad[0] else None
        grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0) if ctx.has_bias else None
        return grad_x, None, grad_bias, None


class GradIntoLinear(nn.Linear):
    """nn.Linear (the same weights and state dict) whose weight gradient goes into `weight.grad_buffer`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LinearGradInto.apply(x, self.weight, self.bias, self.weight.grad_buffer)


def accumulate_in_matmul(model: nn.Module) -> list[nn.Parameter]:
    """Turn the decoder layers' trained linear layers into `GradIntoLinear`; returns their weights for
    `GradIntoBuffers`, which allocates each one's buffer at the first step. Before compiling the layers: the compiled
    graph is traced from these modules."""
    weights = []
    for layer in decoder_layers(model):
        for module in layer.modules():
            if type(module) is nn.Linear and module.weight.requires_grad:
                module.weight.grad_buffer = None  # a forward without gradients needs none
                module.__class__ = GradIntoLinear
                weights.append(module.weight)
    return weights


class GradIntoBuffers(TrainerCallback):
    """At each optimizer step's first micro-batch: the buffers zeroed, and the weights' `.grad` again (the Trainer's
    `zero_grad` after the last step set it to None), so that clipping and the optimizer read them.

    The first step allocates the buffers (the gradients autograd would allocate at the first backward), on the device
    the weights are on by then: the Trainer moves a model loaded on the CPU (`from_pretrained`) after it is built, and
    an attribute does not move with its weight (buffers allocated at build stayed on the CPU, and the first step
    failed, as the H100 rehearsal of the real-weights path found)."""

    def __init__(self, weights: list[nn.Parameter]):
        self.weights = weights

    def on_step_begin(self, args, state, control, **kwargs):
        if self.weights and self.weights[0].grad_buffer is None:
            for weight in self.weights:
                weight.grad_buffer = torch.zeros_like(weight)
        else:
            torch._foreach_zero_([weight.grad_buffer for weight in self.weights])
        for weight in self.weights:
            weight.grad = weight.grad_buffer
