# Two entry points, both safe on a fresh machine:
#   make demo   install everything, then run the main job on the embedded default
#   make test   install everything, then run the test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint
install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

demo: install
	$(BIN)/wanlite demo

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/hadolint containers/*.Dockerfile
