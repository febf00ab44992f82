# lorapipe: the two commands the README gives are `make quickstart` and `make test`.
# Both create .venv through `make setup` when it is missing or out of date.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch build goes in first, pinned, so nothing later swaps it for a multi-GB CUDA wheel.
# CUDA users: make setup TORCH_SPEC="torch==2.13.0" TORCH_CONSTRAINTS=/dev/null
TORCH_SPEC ?= torch==2.13.0
TORCH_CONSTRAINTS ?= constraints/torch-cpu.txt
# Extras installed by default. On Linux CI all backends are installed so all are tested here;
# on a Mac use EXTRAS=mlx,tracking,test, on a CUDA box EXTRAS=cuda,tracking,test.
EXTRAS ?= cuda,mlx,tracking,test
STAMP := $(VENV)/.lorapipe-setup
TINY_MODEL := models/tiny-llama
TINY_ENCODER := models/tiny-encoder
QUICKSTART_CONFIG ?= configs/quickstart.yaml
PYTEST_ARGS ?=
# test processes (pytest-xdist): CI's 2 cores; a test module runs in one process (tests/conftest.py: SHARED_WORKER)
TEST_WORKERS ?= 2

.PHONY: setup quickstart classification-quickstart dpo-quickstart test test-fast lint tiny-model tiny-encoder dashboard bench clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml $(TORCH_CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -c $(TORCH_CONSTRAINTS) -e ".[$(EXTRAS)]"
	@# unsloth pulls a CUDA-built torchvision that breaks `import transformers.Trainer` beside CPU torch;
	@# nothing in lorapipe needs torchvision.
	@if [ "$$($(BIN)/python -c 'import torch; print(torch.version.cuda is None)')" = "True" ]; then \
		$(BIN)/pip uninstall --quiet -y torchvision 2>/dev/null || true; fi
	$(BIN)/python -c "import lorapipe, torch; print('lorapipe ready: torch', torch.__version__)"
	@touch $(STAMP)

$(TINY_MODEL)/config.json: $(STAMP)
	$(BIN)/lorapipe build-tiny-model --out $(TINY_MODEL)

tiny-model: $(TINY_MODEL)/config.json

quickstart: setup tiny-model
	$(BIN)/lorapipe run -c $(QUICKSTART_CONFIG)

$(TINY_ENCODER)/config.json: $(STAMP)
	$(BIN)/lorapipe build-tiny-model --encoder --out $(TINY_ENCODER)

tiny-encoder: $(TINY_ENCODER)/config.json

# task: classification on the same pipeline: a tiny encoder routes requests (general / sql / sports)
classification-quickstart: setup tiny-encoder
	$(BIN)/lorapipe run -c configs/classification-quickstart.yaml

# DPO on top of the quickstart's SFT version: the SFT run first (served from the cache when it already ran)
dpo-quickstart: quickstart
	$(BIN)/lorapipe run -c configs/dpo-quickstart.yaml

# the code's checks: ruff (pyproject [tool.ruff]) and the import layers (pyproject [tool.importlinter])
lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

# the inner loop: the checks and every test not marked slow (no whole pipeline runs, no child processes that train)
test-fast: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope -m "not slow" $(PYTEST_ARGS)

# The local ZenML dashboard (no Docker): shows runs, artifacts and the model version's lineage.
dashboard: setup
	$(BIN)/zenml login --local

bench: setup tiny-model
	$(BIN)/python bench/run_all.py
