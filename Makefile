# Two entry points: `make run` (set up, then the default job) and `make test` (set up, then the tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PLUGINS := $(sort $(dir $(wildcard plugins/*/pyproject.toml)))
STAMP := $(VENV)/.setup-stamp
SETUP_INPUTS := pyproject.toml constraints.txt $(wildcard plugins/*/pyproject.toml)
ARGS ?=
# the venv's bin first: torch.utils.cpp_extension runs `ninja` from PATH (pip's ninja lives there)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup run test bench lint clean

setup: $(STAMP)

$(STAMP): $(SETUP_INPUTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test,runtimes,plots]" $(foreach p,$(PLUGINS),-e $(p))
	touch $(STAMP)

run: setup
	$(BIN)/prunekit run $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

bench: setup
	$(BIN)/python -m pytest benches -q --benchmark-only $(ARGS)

lint: setup
	$(BIN)/ruff check host plugins tests benches

clean:
	rm -rf $(VENV) runs
