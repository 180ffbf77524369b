# Two commands on a fresh machine: `make demo` renders manifests/local-tiny.yaml, `make test` runs the tests
# of every module (`make test-fast` runs the quick tier, for the edit loop; `make test-scenarios` the
# whole-job scenarios of tests/scenarios/: kill points, the 2,000-row memory bound, multi-node kills).
# Both set up .venv first. torch is installed alone and pinned first, so nothing after it pulls
# another torch build; on a CPU machine elsewhere pass
#   TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
TORCH_INDEX ?=
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast test-scenarios lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0 $(TORCH_INDEX)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/ifrender run manifests/local-tiny.yaml --overwrite

test: lint
	$(BIN)/python -m pytest -q --ignore=tests/scenarios

test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow" --ignore=tests/scenarios

test-scenarios: setup
	$(BIN)/python -m pytest -q tests/scenarios

lint: setup
	$(BIN)/ruff check jobs workers tests benchmarks
	$(BIN)/ruff format --check jobs workers tests benchmarks
