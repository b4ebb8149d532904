# Two commands on a fresh machine: `make demo` (the whole job) and `make test` (the test suite).
# Both create .venv and install everything first (tools/install.sh), once.
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install demo test

install: $(VENV)/.recsys-installed

$(VENV)/.recsys-installed: pyproject.toml tools/install.sh
	VENV=$(VENV) bash tools/install.sh

demo: install
	$(BIN)/recsys generate --rows 1000000 --out data/synthetic
	$(BIN)/recsys train configs/synthetic.yaml
	$(BIN)/recsys export configs/synthetic.yaml

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)
