# `make demo` and `make test` are the whole set-up: each creates .venv in the repo on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test test-slow test-all demo clean

setup: $(STAMP)

# Reinstalls only when pyproject.toml changes; the package itself is installed editable.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[toolchain,dev]"
	touch $(STAMP)

# The fast tier: tiny models, a few steps each.
test: setup
	$(BIN)/python -m pytest -q -m "not slow"

# The slow tier alone: the real model, the demo, the README tour, DDP, SIGKILL trials, emulated ARM, properties.
test-slow: setup
	$(BIN)/python -m pytest -q -m slow

test-all: test test-slow

demo: setup
	$(BIN)/spj-edge demo $(DEMO_FLAGS)

clean:
	rm -rf $(VENV) runs dist
