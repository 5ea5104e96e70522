# mnist-study: `make ablations` runs the study, `make test` checks the code.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

# The first Python >= 3.11 on PATH, newest first; or PYTHON=/path/to/python.
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	2>/dev/null && { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
DATA := data
ARGS ?=
RESTORE ?=
WORKERS ?= auto
# Test processes (pytest-xdist): one per core of a CI machine; the slow tests spend part
# of their time waiting on signals, servers and locks, so one more keeps the cores busy.
TEST_JOBS ?= 2
SLOW_TEST_JOBS ?= 3
# The tests' stores (real SQLite files and Optuna journals) on a RAM disk where there is
# one: both sync to disk at every commit, ~4 ms a sync on this machine's disk, and the
# tests commit thousands of times. TEST_TMP= keeps them in the usual temporary folder.
TEST_TMP ?= $(shell test -d /dev/shm -a -w /dev/shm && echo /dev/shm)
PYTEST = $(if $(TEST_TMP),TMPDIR=$(TEST_TMP) )$(BIN)/python -m pytest
TRACKING := sqlite:///mlruns/mlflow.db
UI_PORT ?= 5000
DASHBOARD_PORT ?= 8080
UV_VERSION := 0.13.9
# The locked versions, compiled to .pyc (see the install rule).
UV_INSTALL = $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -c requirements.lock

.PHONY: help install lock data train test test-slow lint bench precision ablations scarcity scarcity300 replication replication1000 plan quick report ui dashboard clean

help: ## list the targets and the variables they take
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'
	@echo "variables (make TARGET NAME=value):"
	@printf "  %-22s %s\n" "WORKERS=$(WORKERS)" "study worker processes (auto: as many as the cores allow)"
	@printf "  %-22s %s\n" "ARGS=\"...\"" "more arguments for the target's command, e.g. ARGS=\"--threads 2\""
	@printf "  %-22s %s\n" "RESTORE=FILE" "make ablations: first restore the rounds a page published (docs/data/ablations-runs.csv) into new stores"
	@printf "  %-22s %s\n" "UI_PORT=$(UI_PORT)" "port of make ui"
	@printf "  %-22s %s\n" "DASHBOARD_PORT=$(DASHBOARD_PORT)" "port of make dashboard"
	@printf "  %-22s %s\n" "PYTHON=$(PYTHON)" "the Python (>= 3.11) that builds .venv"

# The stamp makes installing idempotent: redone only when pyproject.toml or the lock change.
$(BIN)/.installed: pyproject.toml requirements.lock
	@test -x $(BIN)/python || { test -n "$(PYTHON)" || { echo "no Python >= 3.11 found \
	(tried python3.13, python3.12, python3.11, python3); install one or set PYTHON=..."; \
	exit 2; }; $(PYTHON) -m venv $(VENV); }
	@echo "installing into $(VENV) with $$($(BIN)/python --version) (first time: ~1 min, torch is large)"
	@# uv installs the locked set (torch's CUDA build, ~5 GB) in ~65 s where pip took ~150 s.
	@# Compiled to .pyc at install: where PYTHONDONTWRITEBYTECODE is set (these machines),
	@# every process would otherwise compile torch and MLflow from source as it starts.
	@# This machine's pip.conf names index folders that do not exist; hide that noise.
	@$(BIN)/pip install --quiet uv==$(UV_VERSION) 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	@$(UV_INSTALL) -e '.[dev]'
	@touch $@

install: $(BIN)/.installed ## create .venv and install the project with its dev tools

lock: ## re-resolve the dependencies in a scratch venv and rewrite requirements.lock
	@rm -rf .lock-venv && test -n "$(PYTHON)" && $(PYTHON) -m venv .lock-venv
	@.lock-venv/bin/pip install --quiet -e '.[dev]' 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	@{ sed -n '1,2p' requirements.lock; .lock-venv/bin/pip freeze --exclude-editable; } > requirements.lock.new
	@mv requirements.lock.new requirements.lock && rm -rf .lock-venv
	@echo "requirements.lock rewritten; make install to use it, make test to check it"

data: $(BIN)/.installed ## fetch and verify MNIST into data/MNIST/raw
	@$(BIN)/mnist-study --data-root $(DATA) data

train: data ## train one configuration, e.g. make train ARGS="--batchnorm --epochs 3"
	@$(BIN)/mnist-study --data-root $(DATA) train $(ARGS)

test: data ## run the tests (CPU, 1.5 to 3 min on 2 cores; real MNIST and stores in tmp dirs), slow ones apart
	@$(PYTEST) -q -m "not slow" -n $(TEST_JOBS) --dist loadfile --durations=10 $(ARGS)

test-slow: data ## the slow tests: determinism, killed workers and sweeps, signals, concurrent commands, PostgreSQL, mlflow server (about 10 min on 2 cores)
	@$(PYTEST) -q -m slow -n $(SLOW_TEST_JOBS) --dist load --durations=10 --timeout 1800 $(ARGS)

lint: $(BIN)/.installed ## ruff (lint, formatting) and import-linter (imports go down: cli, analysis, study, tracking, training; MLflow in tracking alone; no circles)
	@$(BIN)/ruff check .
	@$(BIN)/ruff format --check .
	@$(BIN)/lint-imports --no-cache

bench: data ## training speed, textbook loop vs ours side by side (+ ARGS="--study-workers experiments/quick.toml")
	@mkdir -p reports
	@$(BIN)/mnist-study --data-root $(DATA) bench --json reports/bench.json $(ARGS)

precision: data ## bf16 against fp32 on this CPU: 10 seeds each, paired TOST at ±0.1 points (~20 min)
	@mkdir -p reports
	@$(BIN)/mnist-study --data-root $(DATA) precision --json reports/precision.json $(ARGS)

ablations: data ## run the study in experiments/ablations.toml (10 rounds of ~90-170 min on 2 cores; rerun to resume), then report
	@$(BIN)/mnist-study --data-root $(DATA) run experiments/ablations.toml --workers $(WORKERS) $(if $(RESTORE),--restore $(RESTORE)) $(ARGS)
	@$(MAKE) --no-print-directory report

scarcity: data ## the variants at 300 to 10,000 training images (~90 min on 2 cores; rerun to resume), then report
	@$(BIN)/mnist-study --data-root $(DATA) run experiments/scarcity.toml --workers $(WORKERS) $(ARGS)
	@$(BIN)/mnist-study report experiments/scarcity.toml --brief --page docs/scarcity.md

scarcity300: data ## the follow-up declared for 300 images: 20 seeds for weight decay and batchnorm, then report
	@$(BIN)/mnist-study --data-root $(DATA) run experiments/scarcity300.toml --workers $(WORKERS) $(ARGS)
	@$(BIN)/mnist-study report experiments/scarcity300.toml --brief --page docs/scarcity.md

replication: data ## every variant at 300 and 1,000 images, 8 tunings x (8 trials + 4 seeds) per cell (~7.5 h on 2 cores; rerun to resume), then report
	@$(BIN)/mnist-study --data-root $(DATA) run experiments/replication.toml --workers $(WORKERS) $(ARGS)
	@$(BIN)/mnist-study report experiments/replication.toml --brief --page docs/replication.md

replication1000: data ## the replication's 1,000-image cells at 19 tunings, a study of their own (4-15 h on 2 cores; rerun to resume), then report
	@$(BIN)/mnist-study --data-root $(DATA) run experiments/replication1000.toml --workers $(WORKERS) $(ARGS)
	@$(BIN)/mnist-study report experiments/replication1000.toml --brief --page docs/replication.md

plan: $(BIN)/.installed ## power and cost of replication designs (tunings x seeds) from its runs so far, on 2 and 64 workers
	@$(BIN)/mnist-study plan experiments/replication.toml --tracking-uri $(TRACKING) $(ARGS)

quick: data ## the same variants on a small budget (minutes), then its report in reports/quick/
	@$(BIN)/mnist-study --data-root $(DATA) run experiments/quick.toml --workers $(WORKERS) $(ARGS)
	@$(BIN)/mnist-study report experiments/quick.toml --brief

report: $(BIN)/.installed ## rebuild reports/ablations/ and docs/ablations.md's results from MLflow
	@$(BIN)/mnist-study report experiments/ablations.toml --brief --page docs/ablations.md $(ARGS)

ui: $(BIN)/.installed ## MLflow UI on the study store, on 127.0.0.1 only (UI_PORT=5000)
	@$(BIN)/mnist-study ui --tracking-uri $(TRACKING) --port $(UI_PORT)

dashboard: $(BIN)/.installed ## optuna-dashboard on the tuning studies, on 127.0.0.1 only (DASHBOARD_PORT=8080)
	@$(BIN)/mnist-study dashboard --storage mlruns/optuna.journal --port $(DASHBOARD_PORT)

clean: ## remove generated reports and caches (keeps .venv, data and mlruns)
	rm -rf reports .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +
