# wsgate: every target installs what it needs from the package registries first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.PHONY: install run test lint format bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Start an echo backend and a gateway in front of it (ws://127.0.0.1:8080/echo).
run: $(STAMP)
	$(BIN)/wsgate demo

## Run the whole test suite.
test: $(STAMP)
	$(BIN)/python -m pytest -q

## ruff (lint + format check) and mypy --strict.
lint: $(STAMP)
	$(BIN)/ruff check wsgate tests benchmarks
	$(BIN)/ruff format --check wsgate tests benchmarks
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format wsgate tests benchmarks
	$(BIN)/ruff check --fix wsgate tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
