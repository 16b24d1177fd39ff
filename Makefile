# Two commands do all set-up on a fresh machine:
#   make quickstart   creates .venv, installs torch + vldistill, runs the main job (offline, bundled data)
#   make test         creates .venv, installs torch + vldistill[test], runs the test suite
# TORCH picks the torch wheel spec (GPU users: e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128").

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart quickstart-fast test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/vldistill quickstart

quickstart-fast: $(STAMP)
	$(BIN)/vldistill quickstart --fast

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf runs .pytest_cache .ruff_cache
