"""The optimizer's update of one step beside the next step's forward, on a second CUDA stream.

The update (`AdamWBf16SR`) is bound by memory and the forward by matmuls, yet in the Trainer's loop each waits for the
other: 29-51 ms a 7B step on one H100 or H200, 3-5% of it, in which the tensor cores idle (the step profiles in
results/benchmarks). Here the update runs bucket by bucket in the order the forward uses the weights: the embedding,
each decoder layer, then the rest (the final norm, the LM head); each bucket's end is a CUDA event, and a forward hook
on the module that uses a bucket makes the main stream wait for that event alone. So decoder layer k's forward can
start while layers k+1... are still being updated. The math is the same kernel's with the same seeds, so the weights
are bit-identical to the update in turn (tests/test_overlap_update.py).

The main stream waits for the whole update before anything else reads the weights or the optimizer's states: a
checkpoint, an evaluation, the end of training (`on_step_end` below, and `AdamWBf16SR.state_dict`). Clipping needs
every gradient's norm before any update, so the update cannot start inside the backward pass (optimizer-in-backward);
beside the next forward it can. One process only: under DDP and FSDP the weights' updates meet collective traffic, not
timed here. The summed gradients' buffers (finetune/grad_accumulation.py) are zeroed as a step starts, which would
race the update still reading them, so the plan keeps the two apart.
"""

import torch
from transformers import TrainerCallback

from finetune.speedups import decoder_layers


class OverlapUpdate(TrainerCallback):
    """Wires an `AdamWBf16SR` (its `update_in_order`) to the model's forward as training starts."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds it
        layers = decoder_layers(model)
        embedding = model.get_input_embeddings()
        bucket_of = {id(p): 0 for p in embedding.parameters()}
        for k, layer in enumerate(layers, start=1):
            bucket_of.update({id(p): k for p in layer.parameters() if id(p) not in bucket_of})
        stream = torch.cuda.Stream() if next(model.parameters()).is_cuda else None
        self.optimizer.update_in_order(bucket_of, buckets=len(layers) + 2, stream=stream)
        # One hook function for all the modules, run outside the compiled layers (one graph still serves them all).
        buckets = {module: k for k, module in enumerate([embedding, *layers])}
        before = torch._dynamo.disable(lambda module, inputs: self.optimizer.wait(buckets[module]))
        self.hooks = [module.register_forward_pre_hook(before, prepend=True) for module in buckets]
        # The rest (the final norm, the LM head) is used after the last layer.
        self.hooks.append(layers[-1].register_forward_hook(
            torch._dynamo.disable(lambda module, inputs, output: self.optimizer.wait(len(layers) + 1)), prepend=True))

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or control.should_evaluate or control.should_training_stop:
            self.optimizer.wait_all()

    def on_train_end(self, args, state, control, **kwargs):
        self.optimizer.wait_all()
        for hook in self.hooks:
            hook.remove()
