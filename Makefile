# make demo   - train -> eval -> predict every task on synthetic data with the tiny backbone (CPU, < 5 min);
#               DEMO_ARGS='key=value ...' adds overrides to every training run
# make test   - the test suite (CPU, one pytest-xdist worker per core)
# make test-fast - the tests not marked slow (a few minutes)
# make install- .venv/ with the pinned, tested dependency set (constraints.txt); no-op when up to date
# make bench  - GPU benchmarks (bench/), prints a table and writes JSON
PYTHON ?= python3
# pytest-xdist processes for make test (auto: one per CPU); TEST_WORKERS=0 runs the tests in one process
TEST_WORKERS ?= auto
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export NO_ALBUMENTATIONS_UPDATE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m common.runs.demo $(DEMO_ARGS)

test: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup tests

test-fast: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest -p no:cacheprovider -n $(TEST_WORKERS) -m "not slow" tests

bench: $(STAMP)
	$(PY) -m bench.run

clean:
	rm -rf logs .cache .pytest_cache
