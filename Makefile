# Two commands on a fresh machine: `make demo` renders manifests/local-tiny.yaml, `make test` runs the tests.
# Both set up .venv first. torch is installed alone and pinned first, so nothing after it pulls
# another torch build; on a CPU machine elsewhere pass
#   TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
TORCH_INDEX ?=
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0 $(TORCH_INDEX)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/ifrender run manifests/local-tiny.yaml --overwrite

test: setup
	$(BIN)/ruff check jobs workers tests
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check jobs workers tests
