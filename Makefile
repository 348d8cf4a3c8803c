# The two commands of the README:
#   make demo   set up .venv if missing, train PPO on CartPole (the embedded default), evaluate it
#   make test   set up .venv if missing, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Where the CPU build of torch comes from when there is no GPU and no local wheel.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup demo test test-slow bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if ! $(BIN)/python -c "import torch" >/dev/null 2>&1; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then \
	    echo "setup: GPU found, installing the default (CUDA) torch build"; $(BIN)/pip install -q "torch>=2.4"; \
	  else \
	    echo "setup: no GPU, installing a CPU torch build first"; \
	    $(BIN)/pip install -q --no-index --no-deps "torch>=2.4" 2>/dev/null \
	      || $(BIN)/pip install -q "torch>=2.4" --index-url $(TORCH_CPU_INDEX) --extra-index-url https://pypi.org/simple; \
	  fi; \
	fi
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

demo: setup
	$(BIN)/rlprox train recipes/ppo/cartpole.yaml run.name=demo run.overwrite=true
	$(BIN)/rlprox eval runs/demo --episodes 20

test: setup
	$(BIN)/python -m pytest -q --durations=15

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/ppo_vs_sb3.py

clean:
	rm -rf runs build *.egg-info
