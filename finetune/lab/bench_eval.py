"""Evaluation throughput beside a plain Hugging Face anchor measured in the same process, on the same articles and
model (`python -m finetune.lab.bench eval`).

The anchors are what anyone would write first: label scoring as one left-padded forward over prompt + `{"category":"`
read at its last position (the four labels' first tokens; `logits_to_keep=1`), and plain `generate`, each at the
suite's own batch size, on the same articles, plain `generate` with the suite's new-token budget (and, as an extra
row, at batch 64 on every 4th article: what a first try usually uses), both with transformers' own sdpa attention
(the suite's modes use its own, `finetune.attention`). Every mode gets an untimed pass over the articles it is timed
on (`time_mode`), then `repeats` timed passes over them: median, min and max, and each mode's median as a ratio to its
anchor's. The plain modes
run first, on the model as built; Liger's kernels, when the config asks for them, are applied after them (they patch
the process for good), before the suite's modes and a second timing of both anchors with them. Last, where FP8 can
run, label scoring and its anchor once more with the decoder layers' linear layers in FP8 (`quantize_for_fp8`).
"""

import statistics
import time

import numpy as np
import torch
from transformers import GenerationConfig

from finetune.answers import parse_strict
from finetune.attention import attention_implementation
from finetune.generation import generate_labels, parsed, score_then_generate
from finetune.lab.profiling import (gpu_busy_seconds, gpu_busy_share, gpu_idle_by_host_range, matmul_rates,
                                    matmul_seconds, profile_table)
from finetune.metrics import Predictions, throughput
from finetune.model import speed_up_for_inference
from finetune.packed import attention_kernels
from finetune.plan import GPU, fp8_unsupported
from finetune.predict import AnswerTree, left_pad, length_sorted_batches, score_labels
from finetune.prompts import answer_token_ids, default_max_new_tokens, encode_prompts, end_token_ids, prompt_budget
from finetune.speedups import as_transformers_writes, decoder_layers
from finetune.throughput import peak_memory_gib, reset_peak_memory

# The extra batch-64 row is slow: timed on every 4th article, an even sample of the same
# articles, so that every pass of every mode fits one command on the GPU machine (its `articles` says how many).
SMALL_BATCH = 64
SMALL_BATCH_EVERY = 4
ANCHORS = {"label_scoring_tree": "plain_label_scoring", "label_scoring": "plain_label_scoring",
           "label_scoring_whole_last_layer": "plain_label_scoring",
           "label_scoring_separate_adds": "plain_label_scoring", "label_scoring_dense_branches": "plain_label_scoring",
           "label_scoring_flash_attention": "plain_label_scoring", "generation": "plain_generate",
           "generation_decoding": "plain_generate", "generation_flash_attention": "plain_generate",
           "generation_gathered_keys": "plain_generate"}
# The same anchors timed again after the suite's kernels were applied: the anchor at its strongest.
KERNEL_ANCHORS = {mode: f"{anchor}_kernels" for mode, anchor in ANCHORS.items()}
# Label scoring and its anchor again, last, once the decoder layers' linear layers are FP8 (`quantize_for_fp8`): a
# measurement of what FP8 evaluation would give, each against the other at the same precision and kernels, and
# against bf16's labels (`agreement_with_tree`). Not part of the recipe; skipped where FP8 cannot run.
FP8_ANCHORS = {"label_scoring_fp8": "plain_label_scoring_fp8"}
FP8_MODES = (*FP8_ANCHORS.values(), *FP8_ANCHORS)
# Modes of older benchmark files, read by the tables: the grouped kernel's, from before it became the default.
FORMER_ANCHORS = {"label_scoring_grouped_varlen": "plain_label_scoring", "generation_grouped_varlen": "plain_generate"}
ALL_ANCHORS = {**ANCHORS, **FP8_ANCHORS, **FORMER_ANCHORS}  # every suite mode's plain-HF anchor, at its own precision
# The anchors attend as transformers does by default, whatever the suite loaded the model with.
ANCHOR_ATTENTION = "sdpa"
PLAIN_MODES = ("plain_label_scoring", "plain_generate", "plain_generate_batch64")
# "generation" is the suite's (the check first: each prompt and the answers' stem, then the branch each article took;
# decoding for the rest); "generation_decoding" decodes every article, to show what the check saves. The "_kernels"
# anchors are the plain ones again, timed after Liger's kernels (or compiled layers) were applied for the suite's
# modes, so that `vs_anchor_with_kernels` is the suite's method alone.
# "label_scoring_whole_last_layer" is label scoring with the last layer's MLP on every row, and
# "label_scoring_separate_adds" with the residual adds in kernels of their own (`as_transformers_writes`), and
# "label_scoring_dense_branches" with the answer branches in one masked sdpa call (`attention_kernels`): what running
# the MLP only where the logits are read (finetune/last_layer.py), the adds inside the matmuls
# (finetune/residual_adds.py) and the branches' kernel (finetune/branch_attention_kernel.py) save, in the same run.
# "label_scoring_flash_attention" and "generation_flash_attention" run their packed sequences through FlashAttention's
# varlen kernel, not the grouped one (finetune/grouped_varlen_kernel.py): what the grouped kernel saves, in the same
# run. Runs before it became the default timed it the other way round, as "label_scoring_grouped_varlen" and
# "generation_grouped_varlen". "generation_gathered_keys" runs the grouped kernel over keys gathered into one tensor
# first, as before it read them where they lie (403a85b).
# "label_scoring_and_generation" is both from one pass, as an evaluation of both runs them (`score_then_generate`; its
# predictions are generation's): against "label_scoring" and "generation" in the same run, what sharing the pass saves.
MODES = PLAIN_MODES + ("plain_label_scoring_kernels", "plain_generate_kernels", "label_scoring_tree", "label_scoring",
                       "label_scoring_whole_last_layer", "label_scoring_separate_adds", "label_scoring_dense_branches",
                       "label_scoring_flash_attention", "generation", "generation_decoding",
                       "generation_flash_attention", "generation_gathered_keys", "label_scoring_and_generation",
                       *FP8_MODES)
# Changes to the benchmark itself, oldest first (commit, its time, the modes, what): to how it times every mode, or to
# a mode of its own rather than evaluation's (those are `finetune.results.EVALUATION_CHANGES`, whose shape this
# follows). The tables take runs made before one for another configuration, as they do runs before an evaluation change.
WHOLE_WARM_UP = ("f0c4135", "2026-12-07T18:43:19+00:00", MODES, "a whole warm-up pass")
BENCHMARK_CHANGES = (WHOLE_WARM_UP, ("e141fb0", "2026-12-07T21:52:24+00:00",
                                    ("label_scoring_grouped_varlen", "generation_grouped_varlen"),
                                    "the grouped kernel's benchmarked setting"))
# The modes whose labels are set against the tree method's, the reference implementation (`agreement`).
AGREEMENT_MODES = ("plain_label_scoring", "label_scoring", "label_scoring_flash_attention", *FP8_MODES)


@torch.inference_mode()
def plain_label_scoring(model, tokenizer, texts: list[str], batch_size: int, max_length: int) -> Predictions:
    """The label-scoring anchor: whole prompts, left-padded, plus the answers' stem (`AnswerTree`); the label whose
    first token is likeliest next."""
    answers = answer_token_ids(tokenizer)
    tree = AnswerTree.from_answers(answers)
    stem = tree.tokens[: len(tree.tokens) - len(tree.branch)]  # {"category":"
    first_tokens = torch.tensor([a[len(stem)] for a in answers], device=model.device)
    prompts, truncated = encode_prompts(tokenizer, texts, prompt_budget(tokenizer, max_length))
    labels, seconds = np.zeros(len(texts), dtype=int), np.zeros(len(texts))
    with attention_implementation(model, ANCHOR_ATTENTION):
        for batch in length_sorted_batches(prompts, batch_size):
            start = time.perf_counter()
            ids, mask = left_pad([prompts[i] + stem for i in batch], tokenizer.pad_token_id, model.device)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                           logits_to_keep=1).logits[:, -1]
            labels[batch] = logits[:, first_tokens].argmax(-1).cpu().numpy()
            seconds[batch] = time.perf_counter() - start
    return Predictions(labels=labels, batch_seconds=seconds, truncated=truncated)


def greedy_decoding(max_new_tokens: int, eos: list[int], pad: int) -> GenerationConfig:
    """The anchor's `generate` decoding as the suite's (`GreedyDecoder`), whatever the checkpoint's
    generation_config.json asks (Qwen2.5-Instruct's samples at temperature 0.7 with a 1.05 repetition penalty):
    greedy, no penalty, no minimum length. transformers fills every field left unset here from the model's own
    generation config, hence each knob set to its neutral value. The KV cache is asked for too: a model trained here
    carries use_cache=False (training never reuses keys and values), and without a cache every decoding step would
    re-run the whole prompt."""
    return GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False, num_beams=1,
                            repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=eos, pad_token_id=pad,
                            use_cache=True)


@torch.inference_mode()
def plain_generate(model, tokenizer, texts: list[str], batch_size: int, max_length: int) -> Predictions:
    """The generation anchor: whole prompts, left-padded, length-sorted, `generate` greedy with the suite's budget of
    new tokens (it stops once every row has ended its turn, as the suite's does)."""
    prompts, truncated = encode_prompts(tokenizer, texts, prompt_budget(tokenizer, max_length))
    decoding = greedy_decoding(default_max_new_tokens(tokenizer), end_token_ids(tokenizer), tokenizer.pad_token_id)
    answers, seconds = [""] * len(texts), np.zeros(len(texts))
    with attention_implementation(model, ANCHOR_ATTENTION):
        for batch in length_sorted_batches(prompts, batch_size):
            start = time.perf_counter()
            ids, mask = left_pad([prompts[i] for i in batch], tokenizer.pad_token_id, model.device)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=decoding)
            for i, answer in zip(batch, tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)):
                answers[i] = answer
            seconds[batch] = time.perf_counter() - start
    return parsed(Predictions(labels=np.full(len(texts), -1), batch_seconds=seconds, truncated=truncated,
                              answers=answers), parse_strict)


def mode_runner(mode: str, model, tokenizer, batch_size: int, generation_batch_size: int, max_length: int):
    """texts -> Predictions for one mode, and the batch size it runs at."""
    batch = {"plain_generate": generation_batch_size, "plain_generate_kernels": generation_batch_size,
             "plain_generate_batch64": SMALL_BATCH, "generation": generation_batch_size,
             "generation_decoding": generation_batch_size, "generation_flash_attention": generation_batch_size,
             "generation_gathered_keys": generation_batch_size,
             "label_scoring_and_generation": generation_batch_size}.get(mode, batch_size)
    runners = {
        "plain_label_scoring": lambda t: plain_label_scoring(model, tokenizer, t, batch, max_length),
        "plain_generate": lambda t: plain_generate(model, tokenizer, t, batch, max_length),
        "plain_generate_batch64": lambda t: plain_generate(model, tokenizer, t, batch, max_length),
        "plain_label_scoring_kernels": lambda t: plain_label_scoring(model, tokenizer, t, batch, max_length),
        "plain_label_scoring_fp8": lambda t: plain_label_scoring(model, tokenizer, t, batch, max_length),
        "plain_generate_kernels": lambda t: plain_generate(model, tokenizer, t, batch, max_length),
        "label_scoring_tree": lambda t: score_labels(model, tokenizer, t, batch, max_length, False, "tree"),
        "label_scoring": lambda t: score_labels(model, tokenizer, t, batch, max_length, False, "packed"),
        "label_scoring_whole_last_layer": lambda t: _with(
            as_transformers_writes(decoder_layers(model)[-1:]),
            lambda: score_labels(model, tokenizer, t, batch, max_length, False, "packed")),
        "label_scoring_separate_adds": lambda t: _with(
            as_transformers_writes(decoder_layers(model)[:-1]),
            lambda: score_labels(model, tokenizer, t, batch, max_length, False, "packed")),
        "label_scoring_dense_branches": lambda t: _with(
            attention_kernels(branch_kernel=False),
            lambda: score_labels(model, tokenizer, t, batch, max_length, False, "packed")),
        "label_scoring_flash_attention": lambda t: _with(
            attention_kernels(grouped_varlen=False),
            lambda: score_labels(model, tokenizer, t, batch, max_length, False, "packed")),
        "label_scoring_fp8": lambda t: score_labels(model, tokenizer, t, batch, max_length, False, "packed"),
        "generation": lambda t: generate_labels(model, tokenizer, t, batch, max_length, progress=False),
        "generation_decoding": lambda t: generate_labels(model, tokenizer, t, batch, max_length, progress=False,
                                                         tree_check=False),
        "generation_flash_attention": lambda t: _with(
            attention_kernels(grouped_varlen=False),
            lambda: generate_labels(model, tokenizer, t, batch, max_length, progress=False)),
        "generation_gathered_keys": lambda t: _with(
            attention_kernels(keys_in_place=False),
            lambda: generate_labels(model, tokenizer, t, batch, max_length, progress=False)),
        "label_scoring_and_generation": lambda t: dict(score_then_generate(model, tokenizer, t, batch, max_length,
                                                                           progress=False))["generation"],
    }
    return runners[mode], batch


def _with(context, run):
    with context:
        return run()


def time_mode(run, texts: list[str], repeats: int, batch_size: int) -> tuple[dict, Predictions]:
    """An untimed pass over `texts`, then `repeats` timed ones. The warm-up is a whole pass because the plain anchors'
    attention (cuDNN's, transformers' default on Hopper) builds an execution graph for every shape it meets: each
    batch's prompt length, each decoding step's key length. Warmed on three batches, the anchors built most of them
    inside the first timed pass, which ran up to a fifth slower than the second: the ratios favoured the suite."""
    run(texts)
    reset_peak_memory()
    seconds, predictions = [], None
    for _ in range(repeats):
        _synchronize()
        start = time.perf_counter()
        predictions = run(texts)
        _synchronize()
        seconds.append(time.perf_counter() - start)
    rates = [len(texts) / s for s in seconds]
    result = {**throughput(predictions, batch_size, statistics.median(seconds)), "repeats": repeats,
              "seconds_per_run": seconds, "articles_per_second_per_run": rates,
              "articles_per_second_min": min(rates), "articles_per_second_max": max(rates),
              "truncated_articles": predictions.truncated, "peak_allocated_gib": peak_memory_gib(),
              "peak_reserved_gib": peak_memory_gib(reserved=True)}
    if predictions.failures or predictions.answers:
        result["failures"] = sum(map(len, predictions.failures.values()))
    if predictions.decoded is not None:
        result["decoded_answers"] = predictions.decoded
    if predictions.decoding_cuda_graph is not None:
        result["decoding_cuda_graph"] = predictions.decoding_cuda_graph
    return result, predictions


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def liger_in_use(model) -> dict:
    """Which of Liger's kernels this model really runs: its module classes, and whether RoPE is Liger's."""
    from transformers.models.qwen2 import modeling_qwen2

    def liger(function) -> bool:
        return getattr(function, "__module__", "").startswith("liger_kernel")

    # Liger patches the instances' forward (their class may keep its name) and Qwen2's RoPE function.
    modules = sorted({type(m).__name__ for m in model.modules() if liger(type(m)) or liger(m.forward)})
    rope = modeling_qwen2.apply_rotary_pos_emb
    return {"modules_with_liger_forward": modules, "rotary_embedding": rope.__module__,
            "in_use": bool(modules) or liger(rope)}


def held_out_accuracy(predictions: Predictions, labels: np.ndarray) -> float:
    """Accuracy on the held-out articles, which come first in the benchmark's texts (`finetune.lab.bench.bench_eval`):
    how modes that answer differently differ in what a user would report. A failed answer (-1) counts as wrong."""
    return float((predictions.labels[: len(labels)] == labels).mean())


def agreement(predictions: Predictions, reference: Predictions) -> dict:
    """How far a mode's answers are from the reference implementation's (label scoring, method "tree")."""
    result = {"same_labels": float((predictions.labels == reference.labels).mean())}
    if predictions.label_logprobs is not None:
        result["max_abs_logprob_difference"] = float(np.abs(predictions.label_logprobs
                                                            - reference.label_logprobs).max())
    return result


def quantize_for_fp8(model) -> None:
    """torchao's FP8 inference in the decoder layers: each linear layer's weight in float8 with a scale per row, each
    activation row quantized as it comes (`Float8DynamicActivationFloat8WeightConfig`, PerRow), so that the matmuls
    run on the FP8 tensor cores. The LM head stays bf16: it scores a few positions an article, and its rounding would
    fall on the answers' log-probabilities directly. In place, for good: the FP8 modes run last."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda module, name: isinstance(module, torch.nn.Linear) and "lm_head" not in name)


def profile_mode(run, texts: list[str]) -> tuple[list[str], dict]:
    """A torch profiler table (top kernels and ops by device time) of `run` over `texts`; how much of the GPU's
    timeline was busy, what the host did while it waited, and the articles a second the GPU's own time allows: the
    mode's ceiling while its kernels stay as they are, however little the host makes it wait (None on the CPU); the
    articles a second its matmuls' time alone allows: the ceiling while its FLOPs and their rates stay as they are,
    however much of the rest is fused away (`matmul_seconds`); and each matmul shape's rate (`matmul_rates`)."""
    with torch.profiler.profile(record_shapes=True) as profiler:
        run(texts)
        _synchronize()
    busy, matmuls = gpu_busy_seconds(profiler), matmul_seconds(profiler)
    return profile_table(profiler), {"gpu_busy_share": gpu_busy_share(profiler),
                                     "gpu_idle_ms_by_host_range": gpu_idle_by_host_range(profiler),
                                     "gpu_bound_articles_per_second": len(texts) / busy if busy else None,
                                     "matmul_bound_articles_per_second": len(texts) / matmuls if matmuls else None,
                                     "matmul_rates": matmul_rates(profiler)}


def compare_modes(model, tokenizer, texts: list[str], modes: list[str], *, batch_size: int,
                  generation_batch_size: int, max_length: int, repeats: int, liger: bool,
                  compile_layers: bool = False, held_out_labels: np.ndarray | None = None,
                  profile_modes: tuple[str, ...] = ("plain_label_scoring", "label_scoring_tree", "label_scoring",
                                                    "label_scoring_flash_attention", "plain_generate", "generation",
                                                    "generation_decoding", "generation_flash_attention",
                                                    "generation_gathered_keys", "label_scoring_fp8"),
                  report=print, save=lambda compared: None) -> dict:
    """Every mode in `MODES` order (plain ones first; Liger's kernels and compiled layers, when asked for, applied
    after them; the FP8 ones last, on the model quantized for them, or listed in `skipped_modes` with the reason),
    timed, with ratios to its anchor, agreement with the tree method, accuracy on the first texts where
    `held_out_labels` are given, and a profiler table of two batches for each of `profile_modes`; `save` gets the
    results so far after each mode."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown eval mode(s) {sorted(unknown)}: choose from {', '.join(MODES)}")
    results, profiles, predictions, liger_report, sped_up, skipped, fp8_checked = {}, {}, {}, None, False, {}, False
    for mode in [m for m in MODES if m in modes]:
        if mode not in PLAIN_MODES and not sped_up:
            speed_up_for_inference(model, liger, compile_layers)
            if liger:
                liger_report = liger_in_use(model)
                report("liger", liger_report)
            sped_up = True
        if mode in FP8_MODES:
            if not fp8_checked:  # the first FP8 mode quantizes the model, or says why it cannot
                fp8_checked, why = True, fp8_unsupported(GPU.current())
                if why:
                    skipped = dict.fromkeys(FP8_MODES, why)
                else:
                    quantize_for_fp8(model)
            if mode in skipped:
                report(mode, {"skipped": skipped[mode]})
                continue
        # Each mode compiles afresh: the tree's cache views recompile every compiled layer, and once a function has
        # used torch's 8 recompilations it runs uncompiled for every mode after (h100_7b_eval_fp8_taught.json's FP8).
        torch._dynamo.reset()
        run, batch = mode_runner(mode, model, tokenizer, batch_size, generation_batch_size, max_length)
        timed = texts[::SMALL_BATCH_EVERY] if mode == "plain_generate_batch64" else texts
        results[mode], predictions[mode] = time_mode(run, timed, repeats, batch)
        anchor = results.get(ALL_ANCHORS.get(mode))
        if anchor:
            results[mode]["vs_anchor"] = results[mode]["articles_per_second"] / anchor["articles_per_second"]
        kernel_anchor = results.get(KERNEL_ANCHORS.get(mode))
        if kernel_anchor:
            results[mode]["vs_anchor_with_kernels"] = (results[mode]["articles_per_second"]
                                                       / kernel_anchor["articles_per_second"])
        if held_out_labels is not None and timed is texts:
            results[mode]["held_out_accuracy"] = held_out_accuracy(predictions[mode], held_out_labels)
        for other in AGREEMENT_MODES if "label_scoring_tree" in predictions else ():  # so far: a run cut short keeps it
            if other in predictions:
                results[other]["agreement_with_tree"] = agreement(predictions[other], predictions["label_scoring_tree"])
        if mode in profile_modes:
            profiles[mode], timeline = profile_mode(run, texts[: 2 * batch])  # two of its own batches
            results[mode].update(timeline)
        report(mode, {k: v for k, v in results[mode].items() if not k.endswith("_per_run")})
        save({"modes": results, "liger_kernels": liger_report, "profiles": profiles, "skipped_modes": skipped})
    return {"modes": results, "liger_kernels": liger_report, "profiles": profiles, "skipped_modes": skipped}
