# Every target documents itself: `make help`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

$(RUN_STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[run]'
	@touch $(RUN_STAMP)

install: $(STAMP) ## Create .venv and install the project with its dev extra

run: $(RUN_STAMP) ## Start PostgreSQL/Redis (found or embedded), migrate, run API + relay + worker (ARGS=--embedded)
	$(BIN)/python -m devservers.run $(ARGS)

demo: $(RUN_STAMP) ## Against a running `make run`: two accounts, a few transfers, their tasks' states
	$(BIN)/python -m devservers.demo $(ARGS)

test: $(STAMP) ## Run the whole test suite against real PostgreSQL, Redis and Celery
	$(BIN)/pytest -q

mutation: $(STAMP) ## Mutation check of the pure rules against the unit tests (fails below 80% killed)
	BIN=$(BIN) bash .ci/mutation

bench: $(STAMP) ## Measure the service against its baselines (make bench ARGS=--quick)
	$(BIN)/python -m bench $(ARGS)

lint: $(STAMP) ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

fmt: $(STAMP) ## Format and autofix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(STAMP) ## mypy alone
	$(BIN)/mypy .

migrate: $(STAMP) ## Apply the migrations to the configured database
	$(BIN)/alembic upgrade head

.PHONY: help install run demo test mutation bench lint fmt typecheck migrate
