# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel on the lab machines; elsewhere e.g. TORCH="torch --index-url https://download.pytorch.org/whl/cpu".
TORCH ?= torch==2.13.0
INSTALLED := $(VENV)/.installed

.PHONY: demo test lab tensorboard check-data gpu-training-core gpu-bench gpu-methods rehearse gpu-fsdp gpu-bench-fsdp tiny-methods

$(INSTALLED): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

check-data:  ## fail in seconds, before installing anything, when there is no data to run on
	@$(PYTHON) -m data_prep.source

demo: check-data $(INSTALLED)  ## the tiny profile end to end: data overview, base eval, training, eval, baselines
	rm -rf checkpoints/tiny-ag-news
	$(BIN)/python -m finetune.lab.notebooks --profile tiny
	$(BIN)/python -m finetune.lab.report

test: $(INSTALLED)
	$(BIN)/python -m pytest -q

# Both serve on localhost only (their defaults); the README says how to reach them from another machine. Extra flags
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
# The tiny recipe on the GPU: bf16 autocast over fp32 master weights, the CUDA varlen attention kernel.
GPU_TINY := --profile tiny --bf16 true --optimizer adamw_fp32_master --results_dir $(GPU_OUT)

gpu-training-core:  ## packed-vs-alone equivalence on CUDA, holdout runs with and without packing, optimizer measurement
	mkdir -p $(GPU_OUT)
	$(PY) -m pytest -q -m gpu -s tests/test_model_and_attention.py 2>&1 | tee $(GPU_OUT)/gpu_equivalence_test.log
	for packing in true false; do \
	  run=gpu-packing-$$packing; \
	  $(PY) -m finetune.train $(GPU_TINY) --packing $$packing --run_name $$run && \
	  cp checkpoints/$$run/final/train_summary.json $(GPU_OUT)/$${run}_train_summary.json && \
	  $(PY) -m finetune.evaluate $(GPU_TINY) --packing $$packing --run_name $$run \
	    --model_path checkpoints/$$run/final --name $$run || exit 1; \
	done
	$(PY) -m finetune.lab.bench_optimizers --profile tiny --bf16 true --tokenizer qwen2.5 --vocab_size 152064 \
	  --hidden_size 1024 --intermediate_size 2816 --num_layers 8 --num_heads 16 --num_kv_heads 4 \
	  --tie_word_embeddings false --learning_rate 2e-5 --warmup_steps 0 --max_steps 60 --logging_steps 5 \
	  --run_name optimizers --results_dir $(GPU_OUT)

# expandable_segments: the allocator maps memory instead of caching fixed blocks, so variants near the card's limit
# are not slowed by allocator retries.
gpu-bench: export PYTORCH_CUDA_ALLOC_CONF = expandable_segments:True
gpu-bench:  ## the 7B shape: training ablations (with a profiled step each) and evaluation throughput, plain and Liger
	$(PY) -m finetune.lab.bench train --profile qwen2.5-7b-shape --name h100_7b_train --profile_step
	$(PY) -m finetune.lab.bench eval --profile qwen2.5-7b-shape --name h100_7b_eval --eval_batch_size 256
	$(PY) -m finetune.lab.bench eval --profile qwen2.5-7b-shape --name h100_7b_eval_liger --eval_batch_size 256 \
	  --use_liger_kernel true

# Full fine-tuning, LoRA and QLoRA (TRAIN_VARIANTS 0, 5 and 6) in one process, then QLoRA's GPU test. QLoRA needs
# bitsandbytes (the `gpu` extra).
gpu-methods: export PYTORCH_CUDA_ALLOC_CONF = expandable_segments:True
gpu-methods:  ## ~6 min: the 7B shape trained in full, with LoRA and with QLoRA (tokens/s, MFU, peak memory)
	mkdir -p $(GPU_OUT)
	$(PY) -m finetune.lab.bench train --profile qwen2.5-7b-shape --name h200_7b_methods --variants 0,5,6 \
	  --warmup_steps 1 --measured_steps 3
	$(PY) -m pytest -q -m gpu -s tests/test_adapters.py 2>&1 | tee $(GPU_OUT)/gpu_qlora_test.log

# The tiny profile's comparison on the CPU: a pretrained base (finetune/pretrain.py), then full fine-tuning and LoRA
# from it, evaluated on the same held-out articles (results/methods/).
tiny-methods: check-data $(INSTALLED)  ## CPU, ~15 min: full fine-tuning vs LoRA from one pretrained tiny base
	$(BIN)/python -m finetune.lab.methods --profile tiny --methods full,lora

rehearse: export PYTORCH_CUDA_ALLOC_CONF = expandable_segments:True
rehearse:  ## GPU: the four notebooks, qwen2.5-7b recipe, 40 steps, on a 15 GB stand-in of the hub snapshot (results/rehearsal/)
	$(PY) -m finetune.lab.rehearse --shape 7b

# --- FSDP2 on several GPUs (configs/accelerate/fsdp2.yaml). NCCL's NVLink multicast stays off: the lent machines
# require it, and the script sets it too. ---
NPROC ?= 2
FSDP_NAME ?= h200_7b_fsdp
ACCELERATE := $(PY) -m accelerate.commands.launch --config_file configs/accelerate/fsdp2.yaml

gpu-fsdp:  ## 4 GPUs, ~6 min: the 7B reference recipe per GPU on 1, 2 and 4 GPUs, a resume, a save + evaluation
	PY=$(PY) NAME=$(FSDP_NAME) scripts/gpu_fsdp.sh

gpu-bench-fsdp: export PYTORCH_CUDA_ALLOC_CONF = expandable_segments:True
gpu-bench-fsdp: export NCCL_NVLS_ENABLE = 0
gpu-bench-fsdp:  ## the 7B shape on NPROC GPUs: every FSDP variant (finetune/lab/bench.py), one profiled step each
	$(ACCELERATE) --num_processes $(NPROC) -m finetune.lab.bench train --profile qwen2.5-7b-shape \
	  --name $(FSDP_NAME)_$(NPROC)gpu_variants --profile_step --dataloader_num_workers 2
