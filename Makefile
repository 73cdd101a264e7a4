# attnbench: `make run` (set-up, then the main job) and `make test` (set-up, then every test).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test lint

setup: $(STAMP)

# Re-installs only when pyproject.toml changes; a second `make setup` does nothing.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: setup
	$(PY) -m attnbench run suites/quick.yaml --out runs --overwrite

test: setup
	$(PY) -m pytest --benchmark-disable

lint: setup
	$(VENV)/bin/ruff check .
