# make demo: the offline demo end to end; make test: the test suite; make bench: the benchmarks.
# The first use creates .venv and installs the project with its test extras.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch/torchvision first, at the versions this project is tested with (CPU or CUDA wheels alike)
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pipeline run --dataset demo --backbone daisy

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.matcher
	$(BIN)/python -m benchmarks.features
	$(BIN)/python -m benchmarks.match_stage
	$(BIN)/python -m benchmarks.cli_latency

lint: $(STAMP)
	$(BIN)/ruff check pipeline stages tests benchmarks
	$(BIN)/ruff format --check pipeline stages tests benchmarks

clean:
	rm -rf $(VENV) data cache
