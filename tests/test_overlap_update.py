"""The update beside the next forward (finetune/overlap_update.py): bucketed in the forward's order, bit-identical to the
update in turn, through compiled layers without a graph more, and on a GPU's second stream the same weights, resumable."""

import dataclasses

import pytest
import torch
from transformers.trainer_utils import SaveStrategy

from finetune.overlap_update import OverlapUpdate
from finetune.plan import plan_training
from finetune.speedups import check_speedups, decoder_layers
from finetune.train import build_trainer, train


def _trained(config, overlap: bool, compile_backend: str | None = None):
    """The model and loss log after training `config`, the update bucketed (OverlapUpdate: on the CPU in turn on the
    current stream, on a GPU beside the forward) or not."""
    trainer = build_trainer(config)
    trainer.args.save_strategy = SaveStrategy.NO
    if overlap and not config.overlap_update:
        trainer.add_callback(OverlapUpdate())
    if compile_backend:
        from finetune.speedups import compile_decoder_layers

        torch._dynamo.reset()
        compile_decoder_layers(trainer.model, backend=compile_backend)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, losses


def test_buckets_follow_the_forward_and_update_bit_for_bit_as_one_pass(tiny_config):
    """Every trained weight in one bucket: the embedding first, each decoder layer's next, the rest (the final norm)
    last; each hook waits for its own bucket. The weights after 3 steps equal the unbucketed update's, bit for bit,
    with clipping (its scale read by every bucket) on."""
    config = dataclasses.replace(tiny_config, optimizer="adamw_bf16_sr", bf16=True, max_steps=3, logging_steps=1)
    trainer, ours, our_losses = _trained(config, overlap=True)
    optimizer = trainer.optimizer.optimizer
    layers = decoder_layers(trainer.model)
    assert len(optimizer._pending) == len(layers) + 2
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    buckets = [optimizer._bucket_of.get(id(p), len(layers) + 1) for p in trained]
    assert sorted(set(buckets)) == list(range(len(layers) + 2))
    embedding = trainer.model.get_input_embeddings().weight
    assert optimizer._bucket_of[id(embedding)] == 0
    for k, layer in enumerate(layers, start=1):
        assert all(optimizer._bucket_of[id(p)] == k for p in layer.parameters())
    overlap = next(c for c in trainer.callback_handler.callbacks if isinstance(c, OverlapUpdate))
    assert len(overlap.hooks) == len(layers) + 2
    assert not any(hook.id in m._forward_pre_hooks or hook.id in m._forward_hooks  # removed as training ends
                   for hook in overlap.hooks for m in trainer.model.modules())

    _, theirs, their_losses = _trained(config, overlap=False)
    assert our_losses == their_losses
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_the_hooks_cost_compiled_layers_no_graph(tiny_config):
    """The hooks run outside the compiled layers: the same number of compiled graphs with them as without (a guard on
    each layer's own hooks would compile one graph a layer), and the same weights."""
    from torch._dynamo.utils import counters

    config = dataclasses.replace(tiny_config, optimizer="adamw_bf16_sr", bf16=True, max_steps=3, logging_steps=1,
                                 num_layers=3)
    graphs = []
    for overlap in (True, False):
        counters.clear()
        _, weights, _ = _trained(config, overlap, compile_backend="aot_eager")
        graphs.append((counters["stats"]["unique_graphs"], weights))
    (with_hooks, ours), (without, theirs) = graphs
    assert 0 < with_hooks <= without + 1, (with_hooks, without)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_the_plan_overlaps_the_update_where_nothing_races_it(tiny_config, monkeypatch):
    from tests.test_plan import EVERYTHING, H100, H200, QWEN_7B
    from finetune.config import get_config

    h200, plan = plan_training(get_config("qwen2.5-7b"), H200, QWEN_7B, has=EVERYTHING)
    assert h200.overlap_update is True and "second CUDA stream" in plan["overlap_update"]["reason"]
    h100, plan = plan_training(get_config("qwen2.5-7b"), H100, QWEN_7B, has=EVERYTHING)  # sums in the matmul
    assert h100.accumulate_in_matmul is True and h100.overlap_update is False
    assert "zeroed" in plan["overlap_update"]["reason"]
    forced, plan = plan_training(get_config("qwen2.5-7b", overlap_update=True), H100, QWEN_7B, has=EVERYTHING)
    assert forced.accumulate_in_matmul is False and forced.overlap_update is True
    assert plan_training(get_config("qwen2.5-7b"), None, QWEN_7B, has=EVERYTHING)[0].overlap_update is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert plan_training(get_config("qwen2.5-7b", method="lora"), H200, QWEN_7B,
                         has=EVERYTHING)[0].overlap_update is False
    monkeypatch.delenv("WORLD_SIZE")
    for change in (dict(optimizer="adamw"), dict(accumulate_in_matmul=True)):
        with pytest.raises(ValueError, match="overlap_update"):
            check_speedups(dataclasses.replace(tiny_config, overlap_update=True, **change))


@pytest.mark.gpu
def test_on_a_gpu_the_update_beside_the_forward_trains_the_same_weights_and_resumes(tiny_config, tmp_path):
    """On CUDA: the update on its second stream, the forward waiting per layer, gives the weights and losses of the
    update in turn, bit for bit (fused kernel, 8-bit and bf16 moments); a run stopped at a checkpoint resumes to them."""
    base = dataclasses.replace(tiny_config, bf16=True, max_steps=6, logging_steps=1, save_steps=3,
                               optimizer="adamw8bit_bf16_sr", compile_layers=True, accumulate_in_matmul=False)
    runs = {}
    for overlap in (True, False):
        config = dataclasses.replace(base, overlap_update=overlap, checkpoints_dir=str(tmp_path / str(overlap)))
        trainer, weights, losses = _trained(config, overlap)
        assert isinstance(trainer.optimizer.optimizer._stream, torch.cuda.Stream) is overlap
        runs[overlap] = weights, losses
    (ours, our_losses), (theirs, their_losses) = runs[True], runs[False]
    assert our_losses == their_losses
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

    from tests.test_train import StopAt, _weights

    straight = train(dataclasses.replace(base, overlap_update=True, checkpoints_dir=str(tmp_path / "straight")))
    interrupted = dataclasses.replace(base, overlap_update=True, checkpoints_dir=str(tmp_path / "interrupted"))
    train(interrupted, callbacks=[StopAt(3)])
    resumed = _weights(train(interrupted))
    for name, value in _weights(straight).items():
        assert torch.equal(resumed[name], value), name
