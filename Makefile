# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel on the lab machines; elsewhere e.g. TORCH="torch --index-url https://download.pytorch.org/whl/cpu".
TORCH ?= torch==2.13.0
INSTALLED := $(VENV)/.installed

.PHONY: demo test lab tensorboard check-data

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
	$(BIN)/python -m finetune.notebooks --profile tiny

test: $(INSTALLED)
	$(BIN)/python -m pytest -q

lab: $(INSTALLED)  ## Jupyter Lab from the project's .venv
	$(BIN)/jupyter lab --notebook-dir=. --port 8888

tensorboard: $(INSTALLED)  ## TensorBoard on the training logs under checkpoints/
	$(BIN)/tensorboard --logdir checkpoints --port 6006
