# The two commands of the README. Both create .venv and install the project when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train test test-fast benchmark base clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/python src/train.py $(ARGS)

# The tests run in TEST_WORKERS pytest-xdist processes, a test file to each at a time in collection order (the default
# run's file first: tests/conftest.py), each with its share of the cores. On 2 cores, make test took 30.3 min in
# one process (aa93238) and 16.9 min in two (6a6aeb1): experiments/performance/make_test.json at those commits.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow" $(PYTEST_ARGS)

# Pretrain the embedded base from its recipe and compare it with the shipped copy (ARGS=ship=true replaces that copy).
base: $(STAMP)
	$(BIN)/python src/build_base.py $(ARGS)

benchmark: $(STAMP)
	$(BIN)/python benchmarks/default_run.py $(ARGS)

clean:
	rm -rf outputs .pytest_cache
