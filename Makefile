# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
SIZE ?= small
PYTEST_ARGS ?=
# Two pytest worker processes (pytest-xdist), each taking whole test files, so a module's fixtures (a
# Prefect server, a trained root) start once. Run one at a time the suite keeps about one core of two
# busy: its tests mostly wait on the subprocesses, servers and workers they start. TEST_WORKERS=0 runs
# it in this process, one test at a time.
TEST_WORKERS ?= 2

.PHONY: venv demo test lint bench clean

# The venv is rebuilt when pyproject.toml changes (stale) or is missing.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first, from the pinned files, so the project's ranges never pull another build.
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mpemd demo --size $(SIZE)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check . || true

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
