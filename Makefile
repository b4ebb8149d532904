# Two commands on a fresh machine: `make demo` (the whole job) and `make test` (the test suite, what CI runs).
# Both create .venv and install everything first (tools/install.sh), once. `make test-fast` is the edit loop:
# every test but those marked `slow` (spawned processes, torchx, end-to-end training), in about a minute.
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install demo test test-fast

install: $(VENV)/.recsys-installed

$(VENV)/.recsys-installed: pyproject.toml tools/install.sh
	VENV=$(VENV) bash tools/install.sh

demo: install
	$(BIN)/recsys generate --rows 1000000 --out data/synthetic
	$(BIN)/python tools/preprocess_criteo.py --split files --out data/synthetic/shards \
		train=data/synthetic/train.tsv val=data/synthetic/val.tsv test=data/synthetic/test.tsv
# Training: two nodes x one process on this machine, launched as on a cluster (torchx -> torchrun -> workers);
# data.batch_size is global, so the two processes train the config's batches of 4096 rows, 2048 each.
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/torchx run -s local_cwd launch/components.py:train \
		--nnodes 2 --nproc_per_node 1 -- configs/synthetic.yaml
	$(BIN)/recsys eval configs/synthetic.yaml --split test
	$(BIN)/recsys export configs/synthetic.yaml

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)
