"""The last decoder layer's MLP only where the loss reads, in training: the same loss and gradients as the whole
layer, for the answer rows alone (label scoring's and decoding's side: tests/test_predict.py; the FLOPs it saves:
tests/test_bench.py)."""

import dataclasses

import pytest
import torch

from finetune.last_layer import READ_POSITIONS
from finetune.speedups import decoder_layers
from finetune.train import build_trainer


def _first_step(config) -> tuple[dict, float, dict, list]:
    """A trainer's first micro-batch, its loss and gradients from the same initial weights, and the rows the last
    layer's MLP saw."""
    trainer = build_trainer(config)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    rows = []
    decoder_layers(trainer.model)[-1].mlp.register_forward_hook(lambda module, args, out: rows.append(args[0].shape))
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return batch, loss.item(), {n: p.grad for n, p in trainer.model.named_parameters()}, rows


@pytest.mark.parametrize("share_opening", [True, False])
def test_training_runs_the_last_layers_mlp_on_the_answer_rows_with_the_same_loss_and_gradients(tiny_config,
                                                                                              share_opening):
    config = dataclasses.replace(tiny_config, dataloader_num_workers=0, share_opening=share_opening)
    whole_batch, whole_loss, whole_grads, whole_rows = _first_step(dataclasses.replace(config,
                                                                                       last_layer_where_read=False))
    batch, loss, grads, rows = _first_step(dataclasses.replace(config, last_layer_where_read=True))
    answers = int((batch["labels"] != -100).sum())
    assert READ_POSITIONS not in whole_batch and 0 < answers < batch["input_ids"].shape[1]
    assert [r[1] for r in whole_rows] == [batch["input_ids"].shape[1]] and [r[1] for r in rows] == [answers]
    assert loss == pytest.approx(whole_loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, whole_grads[name], rtol=1e-5, atol=1e-7, msg=name)
