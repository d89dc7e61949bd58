"""The opt-in speed-ups (finetune/speedups.py): compiled layers learn what eager ones do, FP8 refuses hardware without
FP8, `checkpointed_layers="auto"` picks the fastest setting that fits the memory it is given, and a result read back
waits for its own work only."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from finetune.attention import VARLEN, choose_attn_implementation
from finetune.config import config_from_args, get_config
from finetune.model import load_model, train_bpe_tokenizer
from finetune.plan import FP8_RECIPE
from finetune.speedups import (GIB, WORKSPACE_GIB, HostCopy, check_speedups, compile_decoder_layers,
                               convert_to_fp8, decoder_layers, layer_activation_bytes, layers_to_checkpoint)
from finetune.train import build_trainer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = ["Stocks rallied after the earnings report.", "The striker scored twice in the final."]
    return train_bpe_tokenizer(texts * 20, vocab_size=400, cache_dir=tmp_path_factory.mktemp("tok"))


def _packed_batch(lengths: list[int], vocab: int, seed: int, device: str = "cpu") -> dict:
    """One padding-free row as TRL's collator builds it: boundaries and the longest article's length as an int."""
    ids = torch.randint(0, vocab, (1, sum(lengths)), generator=torch.Generator().manual_seed(seed))
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    batch = dict(input_ids=ids, labels=ids, position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
                 cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    return {k: v.to(device) for k, v in batch.items()} | dict(max_length_q=max(lengths), max_length_k=max(lengths))


def _losses_and_grads(model: torch.nn.Module, device: str = "cpu") -> tuple[list[float], list[torch.Tensor]]:
    """Three packed micro-batches of different lengths and article counts, through checkpointed layers."""
    model.gradient_checkpointing_enable()
    model.train()
    losses = []
    for seed, lengths in enumerate(([30, 50, 20], [40, 17, 60, 9], [25, 25])):
        loss = model(**_packed_batch(lengths, model.config.vocab_size, seed, device)).loss
        loss.backward()
        losses.append(loss.item())
    return losses, [p.grad.clone() for p in model.parameters()]


def test_compiled_layers_trace_packed_rows_whole_and_match_eager(tiny_config, tokenizer):
    """Regional compilation with the varlen attention inside the graph: no graph break (a host read-back would
    make one), no recompile when the row length, article count and longest article change, and the same losses
    and gradients as eager. aot_eager traces forward and backward as inductor does, without its code generation
    (minutes on 2 CPU cores); the GPU test below runs inductor."""
    from torch._dynamo.utils import counters

    choose_attn_implementation("auto", packing=True)
    eager = _losses_and_grads(load_model(tiny_config, tokenizer, VARLEN))
    torch._dynamo.reset()
    counters.clear()
    model = load_model(tiny_config, tokenizer, VARLEN)
    compile_decoder_layers(model, backend="aot_eager")
    compiled = _losses_and_grads(model)
    # Every layer was compiled (layers left eager would pass every other check here), and ran without a graph break
    # or a recompile. The layers share one graph, so the count of graphs cannot tell one layer compiled from all.
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(model))
    assert counters["stats"]["unique_graphs"] > 0 and not counters["graph_break"] and not counters["recompiles"]
    assert compiled[0] == pytest.approx(eager[0], rel=1e-6)
    for a, b in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
def test_compiled_layers_match_eager_on_gpu(tiny_config, tokenizer):
    """Inductor's kernels in bf16: the same losses to bf16 rounding, from layers that did compile."""
    from torch._dynamo.utils import counters

    config = dataclasses.replace(tiny_config, hidden_size=256, num_heads=4, intermediate_size=512, bf16=True,
                                 optimizer="adamw")
    attn = choose_attn_implementation("auto", packing=True)
    eager = _losses_and_grads(load_model(config, tokenizer, attn).cuda(), "cuda")[0]
    torch._dynamo.reset()
    counters.clear()
    model = load_model(config, tokenizer, attn).cuda()
    compile_decoder_layers(model)
    compiled = _losses_and_grads(model, "cuda")[0]
    print(f"eager {eager} compiled {compiled}")
    assert counters["stats"]["unique_graphs"] > 0
    assert compiled == pytest.approx(eager, rel=1e-2)


@pytest.mark.gpu
def test_fp8_converts_the_decoder_linears_only_and_keeps_the_loss(tiny_config, tokenizer):
    from torchao.float8.float8_linear import Float8Linear

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9+")
    config = dataclasses.replace(tiny_config, hidden_size=256, num_heads=4, intermediate_size=512, bf16=True,
                                 optimizer="adamw")
    attn = choose_attn_implementation("auto", packing=True)
    bf16 = _losses_and_grads(load_model(config, tokenizer, attn).cuda(), "cuda")[0]
    import finetune.lab.fp8_recipes  # noqa: F401  rowwise and tensorwise beside the recipe's own

    for recipe in ("rowwise", "tensorwise", FP8_RECIPE):  # FP8_RECIPE: tensorwise_pow2_scales, the one recommended
        model = load_model(config, tokenizer, attn).cuda()
        convert_to_fp8(model, recipe)
        assert all(isinstance(m, Float8Linear) for layer in decoder_layers(model) for m in layer.modules()
                   if isinstance(m, torch.nn.Linear)) and not isinstance(model.lm_head, Float8Linear)
        fp8 = _losses_and_grads(model, "cuda")[0]
        print(f"bf16 {bf16} fp8 {recipe} {fp8}")
        assert fp8 == pytest.approx(bf16, rel=2e-2) and fp8 != bf16  # FP8's rounding, not a run left in bf16


@pytest.mark.slow
def test_fp8_layers_compile_whole_and_learn_what_high_precision_ones_do(tiny_config, tokenizer):
    """torchao's emulation: the same FP8 casts and scales with high-precision matmuls, so the CPU checks which layers
    convert, that the compiled FP8 layers trace into one graph, and that the losses stay within FP8's rounding."""
    from torch._dynamo.utils import counters
    from torchao.float8.float8_linear import Float8Linear

    import finetune.lab.fp8_recipes  # noqa: F401  rowwise and tensorwise beside the recipe's own

    choose_attn_implementation("auto", packing=True)
    reference = _losses_and_grads(load_model(tiny_config, tokenizer, VARLEN))[0]
    for recipe, compiled in (("rowwise", True), ("tensorwise", False)):  # compiling both would double the time
        torch._dynamo.reset()
        counters.clear()
        model = load_model(tiny_config, tokenizer, VARLEN)
        convert_to_fp8(model, recipe, emulate=True)
        linears = [m for layer in decoder_layers(model) for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) == 7 * tiny_config.num_layers and all(isinstance(m, Float8Linear) for m in linears)
        assert not isinstance(model.lm_head, Float8Linear)
        if compiled:
            compile_decoder_layers(model, backend="aot_eager")
        fp8 = _losses_and_grads(model)[0]
        assert (counters["stats"]["unique_graphs"] > 0) == compiled  # the compiled row did compile, the other did not
        assert not counters["graph_break"] and not counters["recompiles"]
        assert fp8 == pytest.approx(reference, rel=1e-3) and fp8 != reference


def test_every_fp8_recipe_is_a_config_torchao_accepts_and_trains_with():
    """Each recipe compared (finetune/lab/fp8_recipes.py, the recipe's own among them) builds a Float8LinearConfig that torchao's checks accept (each operand one FP8 dtype in
    both matmuls it feeds) and that runs forward and backward (emulated); an unknown name is refused by name."""
    from torchao.float8 import convert_to_float8_training

    from finetune.lab.fp8_recipes import COMPARISON
    from finetune.speedups import fp8_linear_config

    torch.manual_seed(0)
    x = torch.randn(48, 64, dtype=torch.bfloat16)
    reference = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)).to(torch.bfloat16)
    for recipe in COMPARISON:
        model = torch.nn.Sequential(*[torch.nn.Linear(m.in_features, m.out_features) for m in reference])
        model.load_state_dict(reference.state_dict())
        model = model.to(torch.bfloat16)
        convert_to_float8_training(model, config=dataclasses.replace(fp8_linear_config(recipe), emulate=True))
        model(x).float().square().mean().backward()
        assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters()), recipe
        assert model(x).float().sub(reference(x).float()).abs().max() < 0.1, recipe  # FP8's rounding, not another net
    with pytest.raises(ValueError, match="unknown fp8 recipe 'fp4'"):
        fp8_linear_config("fp4")


def test_the_recipe_offers_its_own_fp8_recipe_and_the_lab_adds_the_compared_ones():
    """The recipe's `--fp8` takes the recommended recipe; the comparison's others are the lab's, registered when a lab
    benchmark imports them (in a fresh process here: registration lasts for the process)."""
    code = ("import finetune.train\n"
            "from finetune.speedups import FP8_RECIPES\n"
            "print(list(FP8_RECIPES))\n"
            "from finetune.lab import bench\n"
            "print(all(row.get('fp8') in (None, 'auto', *FP8_RECIPES) for row in bench.TRAIN_VARIANTS.values()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == [f"[{FP8_RECIPE!r}]", "True"]
    with pytest.raises(ValueError, match=f"unknown fp8 recipe 'int8'; choose from .*{FP8_RECIPE}"):
        check_speedups(config_from_args(["--profile", "tiny", "--fp8", "int8"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU's refusal")
def test_fp8_without_an_fp8_gpu_names_the_fix(tiny_config):
    with pytest.raises(ValueError, match="--fp8 none"):
        build_trainer(dataclasses.replace(tiny_config, fp8=FP8_RECIPE))
    with pytest.raises(ValueError, match="choose from"):
        build_trainer(dataclasses.replace(tiny_config, fp8="int8"))


@pytest.mark.parametrize("method, why", [("lora", "compute a gradient for every weight"),
                                         ("qlora", "nothing would run in FP8")])
def test_fp8_with_adapters_is_refused_before_anything_loads_and_names_the_fix(tiny_config, method, why):
    """QLoRA's 4-bit layers would stay as they are (no FP8 at all); LoRA's frozen weights would get weight gradients
    they do not need. Refused before data, tokenizer or model load (the data folder does not exist)."""
    config = dataclasses.replace(tiny_config, method=method, fp8="tensorwise_pow2_scales", data_dir="/nonexistent")
    with pytest.raises(ValueError, match=rf"fp8='tensorwise_pow2_scales' with method='{method}': .*{why}.*"
                                         rf"Use --fp8 none with --method {method}, or --method full"):
        check_speedups(config)
    check_speedups(dataclasses.replace(config, fp8=None))
    check_speedups(dataclasses.replace(config, method="full"))


def test_auto_checkpointing_keeps_every_layer_that_fits():
    """The 7B shape with a micro-batch of 8 packed 512-token rows: 61 GB of weights, gradients and AdamW states."""
    kept, checkpointed = layer_activation_bytes(hidden=3584, intermediate=18944, tokens=8 * 512)
    assert kept / GIB == pytest.approx(0.65, abs=0.01) and checkpointed == 2 * 8 * 512 * 3584

    def choose(budget_gib: float) -> int:
        return layers_to_checkpoint(budget_gib * GIB, 7.6e9 * 8, kept, checkpointed, num_layers=28)

    assert choose(136) == 0  # a 141 GB H200: nothing recomputed
    assert choose(67) == 14  # the H100 runs (Liger's fused loss) measured 16 checkpointed at 68.1 GiB
    assert choose(70 - WORKSPACE_GIB) == 18  # within 70 GiB without Liger: 14 peaked at 72.5 GiB on the H200
    assert choose(20) == 28  # does not fit at all: every layer, as the recipe does by default
    assert [choose(b) for b in (60, 64, 68, 72, 76)] == sorted([choose(b) for b in (60, 64, 68, 72, 76)],
                                                                reverse=True)  # more memory, never more recompute


def test_adapter_runs_plan_for_frozen_weights_and_small_adapter_states(tiny_config, tokenizer):
    """The plan counts from the shape what the built model holds: every weight (8 bytes each with bf16 AdamW states),
    and for LoRA 2 bytes a frozen weight plus the trainable adapters' 8 (counted by peft on the real model)."""
    from peft import get_peft_model

    from finetune.adapters import lora_config
    from finetune.plan import training_state_bytes
    from finetune.sources import ModelShape

    config = dataclasses.replace(tiny_config, bf16=True, optimizer="adamw_bf16_sr", tie_word_embeddings=False)
    model = load_model(config, tokenizer)
    shape = ModelShape.of(dataclasses.replace(config, vocab_size=model.config.vocab_size))
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n or "bias" in n)
    weights = model.num_parameters() - norms  # counted before peft adds the adapters to the same model
    assert training_state_bytes(config, shape) == weights * 8
    lora = dataclasses.replace(config, method="lora", lora_rank=4, lora_modules_to_save=None, lora_embedding=False)
    adapters = sum(p.numel() for p in get_peft_model(model, lora_config(lora, model)).parameters() if p.requires_grad)
    assert training_state_bytes(lora, shape) == weights * 2 + adapters * 8


def test_auto_checkpointing_on_the_cpu_recomputes_every_layer(tiny_config):
    trainer = build_trainer(dataclasses.replace(tiny_config, gradient_checkpointing=True, checkpointed_layers="auto",
                                                max_steps=1))
    trainer.train()
    assert all(layer.gradient_checkpointing for layer in decoder_layers(trainer.model))


def test_evaluation_with_compiled_layers_scores_as_eager(tiny_config, tokenizer, monkeypatch):
    """`compile_layers` also compiles the evaluation model's layers (load_for_inference); the label log-probabilities
    are eager's. aot_eager stands in for inductor, as above."""
    import finetune.model
    from finetune.model import load_for_inference
    from finetune.predict import score_labels
    from torch._dynamo.utils import counters

    texts = ["Stocks rallied after the earnings report.", "The striker scored twice in the final."] * 3
    eager = score_labels(load_for_inference(tiny_config, tokenizer), tokenizer, texts, progress=False)
    compiled_layers = []
    monkeypatch.setattr(finetune.model, "compile_decoder_layers",
                        lambda model: compiled_layers.append(model) or compile_decoder_layers(model, "aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    model = load_for_inference(dataclasses.replace(tiny_config, compile_layers=True), tokenizer)
    compiled = score_labels(model, tokenizer, texts, progress=False)
    assert compiled_layers == [model] and counters["stats"]["unique_graphs"] > 0  # the scoring ran compiled layers
    torch.testing.assert_close(compiled.label_logprobs, eager.label_logprobs, rtol=1e-5, atol=1e-5)


def test_checkpointed_layers_reads_a_number_or_auto_from_the_command_line():
    assert config_from_args(["--checkpointed_layers", "16"]).checkpointed_layers == 16
    assert config_from_args(["--checkpointed_layers", "auto", "--max_memory_gib", "70"]).max_memory_gib == 70.0
    with pytest.raises(SystemExit):  # the command line takes a number, auto or none
        config_from_args(["--checkpointed_layers", "most"])
    with pytest.raises(ValueError, match="'auto' or none"):  # from code: refused before any model config is read
        build_trainer(get_config("qwen2.5-7b", checkpointed_layers="most"))


def test_fp8_comparison_passes_a_recipe_within_tolerance_and_fails_one_that_stalls(monkeypatch):
    from finetune.lab import bench_fp8

    curves = {None: [4.0, 2.0, 1.0, 0.50], "rowwise": [4.0, 2.1, 1.0, 0.505], "tensorwise": [4.0, 3.0, 2.0, 1.0]}
    curves["noise"] = [4.0, 2.0, 1.0, 0.502]
    monkeypatch.setattr(bench_fp8, "losses",
                        lambda config, fp8, rounding_seed=None, evaluate=False:
                        {"losses": curves["noise" if rounding_seed else fp8]})
    runs = bench_fp8.compare(config=None, recipes=("rowwise", "tensorwise"))
    assert runs["bf16, other rounding draws"]["final_loss_relative_difference"] == pytest.approx(0.004)
    assert runs["rowwise"]["final_loss_relative_difference"] == pytest.approx(0.01) and runs["rowwise"]["within_tolerance"]
    assert runs["rowwise"]["max_step_relative_difference"] == pytest.approx(0.05)
    assert not runs["tensorwise"]["within_tolerance"] and runs["bf16"]["final_loss_relative_difference"] == 0


def test_training_with_compiled_layers_through_the_trainer_logs_the_eager_losses(tiny_config, monkeypatch):
    """The recipe's own path (TRL's collator, the Trainer, selective checkpointing) with compile_layers; aot_eager
    stands in for inductor as above."""
    import functools

    import finetune.train
    from torch._dynamo.utils import counters

    config = dataclasses.replace(tiny_config, max_steps=3, logging_steps=1, gradient_checkpointing=True,
                                 checkpointed_layers=1, save_steps=10**9)

    def logged_losses(run: dict) -> list[float]:
        trainer = build_trainer(dataclasses.replace(config, **run))
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    eager = logged_losses({"run_name": "eager"})
    monkeypatch.setattr(finetune.train, "compile_decoder_layers",
                        functools.partial(compile_decoder_layers, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    compiled = logged_losses({"run_name": "compiled", "compile_layers": True})
    assert counters["stats"]["unique_graphs"] > 0 and not counters["graph_break"] and not counters["recompiles"]
    assert compiled == pytest.approx(eager, rel=1e-5)


@pytest.mark.gpu
def test_a_host_copy_waits_for_the_work_before_it_not_for_the_work_queued_after():
    """Label scoring reads a batch back once the next batch's forward is queued: the read must not wait for that
    forward. Here about a second of GPU sleep stands for it; `.cpu()` in place of the copy waits it out, and fails."""
    computed = torch.arange(4.0, device="cuda") * 2
    copy = HostCopy(computed)
    torch.cuda._sleep(2_000_000_000)  # clock cycles: about a second of work queued behind the copy
    assert copy.numpy().tolist() == [0.0, 2.0, 4.0, 6.0]
    assert not torch.cuda.current_stream().query(), "the read waited for the work queued after the copy"
    torch.cuda.synchronize()
