# `make demo` and `make test` do everything on a fresh machine.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CONFIG  ?= configs/toy.yaml
METHODS ?= cam,oaa,oaa+,psa,mcis,mcis+rw
SEEDS   ?= 100,101,102
PYTEST_ARGS ?=

.PHONY: install demo compare test test-fast test-voc bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[cpu,dev]"
	touch $(STAMP)

demo: install
	$(BIN)/mcis pipeline --config $(CONFIG)

compare: install  # every method on the held-out data seeds: the table of docs/results.md
	$(BIN)/mcis pipeline --config $(CONFIG) --methods $(METHODS) --seeds $(SEEDS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-voc: install
	$(BIN)/python -m pytest -m voc_profile $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m benchmarks

lint: install
	$(BIN)/ruff check mcis_cli tests benchmarks

clean:
	rm -rf $(VENV) runs mlruns/* mlflow.db .pytest_cache
