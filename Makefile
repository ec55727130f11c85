# Two entry points: `make run` (the bot; pass options with ARGS="--config my.toml") and `make test`.
# Each builds its own virtualenv on first use.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: run test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(PY) bot.py $(ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# bench/ on its own: its scripts import their siblings as top-level modules, which makes bench/bot.py
# a second module `bot` beside bot.py.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy i2p2i_bot cogs bot.py tests
	$(VENV)/bin/mypy bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
