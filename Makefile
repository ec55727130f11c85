# Two entry points: `make run` (the bot; pass options with ARGS="--config my.toml") and `make test`.
# Each builds its own virtualenv on first use.
# The virtualenv's Python: PYTHON=/path/to/python, or else the first of these on PATH that is 3.11 or newer
# (pyproject's requires-python), the tested 3.11 first.
PYTHON_CANDIDATES ?= python3.11 python3.12 python3.13 python3.14 python3 python
NEW_ENOUGH := import sys; sys.exit(sys.version_info < (3, 11))
ifeq ($(origin PYTHON),undefined)
# Looked up on first use only (an existing virtualenv never needs it), then kept.
PYTHON = $(eval PYTHON := $(shell for p in $(PYTHON_CANDIDATES); do \
	$$p -c '$(NEW_ENOUGH)' >/dev/null 2>&1 && { echo $$p; break; }; done))$(PYTHON)
endif
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: run test lint clean

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "make: no Python 3.11 or newer on PATH (looked for $(PYTHON_CANDIDATES)); install one, or name it: make PYTHON=/path/to/python3.12 ..." >&2; exit 1; }
	@$(PYTHON) -c '$(NEW_ENOUGH)' || { echo "make: $(PYTHON) is not Python 3.11 or newer" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(PY) bot.py $(ARGS)

# Lint, types, then the suite: a type error fails the tests as a failing test does.
test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy i2p2i_bot cogs bot.py tests
	$(VENV)/bin/mypy bench
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# bench/ on its own: its scripts import their siblings as top-level modules, which makes bench/bot.py
# a second module `bot` beside bot.py.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy i2p2i_bot cogs bot.py tests
	$(VENV)/bin/mypy bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
