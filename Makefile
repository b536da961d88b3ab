# `make demo` and `make test` are the whole set-up: each creates .venv in the repo on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test demo clean

setup: $(STAMP)

# Reinstalls only when pyproject.toml changes; the package itself is installed editable.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[toolchain,dev]"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/spj-edge demo --out runs/demo $(DEMO_FLAGS)

clean:
	rm -rf $(VENV) runs dist
