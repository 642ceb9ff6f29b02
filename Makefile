# make demo   - train -> eval -> predict every task on synthetic data with the tiny backbone (CPU, < 5 min);
#               DEMO_ARGS='key=value ...' adds overrides to every training run
# make test   - the test suite (CPU, one pytest-xdist worker per core), less the real-Slurm tests
# make test-slurm - the tests against a real Slurm cluster (tests/test_slurm.py; start one with .ci/slurm_up.sh)
# make test-fast - the tests not marked slow (a few minutes)
# make install- .venv/ with the pinned, tested dependency set (constraints.txt); no-op when up to date
# LINE=modern  - any target on the modern dependency line instead: .venv-modern/ from constraints-modern.txt
#                (hydra-core 1.4, optuna 5, SQLAlchemy 2); make test-modern runs CI's modern-line tests on it
# make bench  - GPU benchmarks (bench/), prints a table and writes JSON
PYTHON ?= python3
# pytest-xdist processes for make test (auto: one per CPU); TEST_WORKERS=0 runs the tests in one process
TEST_WORKERS ?= auto
# stable: constraints.txt in .venv/ (the default); modern: constraints-modern.txt in .venv-modern/ (README)
LINE ?= stable
ifeq ($(LINE),stable)
VENV := .venv
CONSTRAINTS := constraints.txt
else ifeq ($(LINE),modern)
VENV := .venv-modern
CONSTRAINTS := constraints-modern.txt
else
$(error LINE=$(LINE): expected stable or modern)
endif
# the tests CI also runs on the modern line: composition on both lines, the search space, sweeps on SQLite,
# PostgreSQL and JournalStorage (trial adoption included), and the README's commands
MODERN_TESTS := tests/test_hydra_lines.py tests/test_sweep_space.py tests/test_sweeps.py tests/test_sweeps_postgres.py \
	tests/test_sweep_journal.py tests/test_sweep_storage.py tests/test_sweep_adoption.py tests/test_readme.py
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export NO_ALBUMENTATIONS_UPDATE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast test-slurm test-modern bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m common.runs.demo $(DEMO_ARGS)

test: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup -m "not slurm" tests

# one test at a time: their jobs share the cluster's node; run alone, their array tasks start together
test-slurm: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest -p no:cacheprovider -m slurm tests

test-modern:
	$(MAKE) LINE=modern install
	WANDB_MODE=disabled .venv-modern/bin/python -m pytest -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup \
		$(MODERN_TESTS)

test-fast: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest -p no:cacheprovider -n $(TEST_WORKERS) -m "not slow" tests

bench: $(STAMP)
	$(PY) -m bench.run

clean:
	rm -rf logs .cache .pytest_cache
