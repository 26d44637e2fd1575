# The commands the README names. Each creates .venv with pip when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The PyTorch build we test with; `make TORCH=torch install` takes whatever pip picks instead.
TORCH ?= torch==2.14.1 torchvision==0.29.1
# Where `make run` and the tests find Omniglot (METARUN_DATA/omniglot; a run downloads it there if absent).
export METARUN_DATA ?= $(HOME)/.cache/metarun/data

.PHONY: install run test test-all lint docs bench clean

$(BIN)/metarun: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c 'import torch, torchvision' 2>/dev/null || $(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/metarun

# The default experiment (conf/experiment/); `make run EXPERIMENT=... ARGS="key=value ..."` for others.
EXPERIMENT ?= protonet_omniglot_5w1s
run: install
	$(BIN)/metarun +experiment=$(EXPERIMENT) $(ARGS)

# The suite in TEST_WORKERS processes (pytest-xdist), one intra-op thread each: most tests are short
# steps and Python, during which one process leaves the other core idle (TEST_WORKERS=0: one process).
TEST_WORKERS ?= 2
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

test-all: install  # also the slow end-to-end reproduction runs
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "" $(PYTEST_ARGS)

# ruff's formatter and linter (pyproject.toml [tool.ruff]): `make lint` fails on code they would change.
lint: install
	test -x $(BIN)/ruff || $(BIN)/pip install -q 'ruff>=0.6'
	$(BIN)/ruff format --check metarun tests scripts
	$(BIN)/ruff check metarun tests scripts

# The documentation site (mkdocs.yml, docs/) into site/; a broken link, anchor or API reference fails it.
docs: install
	test -x $(BIN)/mkdocs || $(BIN)/pip install -q -e '.[docs]'
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Installs the peers it compares with first (higher, learn2learn, easyfsl); a peer that does not
# install is left out of the tables, named. Then one process against two (torchrun, gloo).
bench: install
	PYTHON=$(BIN)/python bash scripts/install_peers.sh || echo "make bench: a peer did not install; its rows are left out"
	$(BIN)/python scripts/bench.py $(ARGS)
	$(BIN)/python scripts/bench_workers.py
	$(BIN)/python scripts/bench_processes.py
	$(BIN)/python scripts/bench_heads.py --threads 1

clean:
	rm -rf $(VENV) build dist *.egg-info
