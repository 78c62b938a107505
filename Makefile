# Set-up and main entry points. Both `make demo` and `make test` create the virtual environment.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vlkit-installed
DEMO_DIR ?= runs/demo
# `make test-fast` runs the cases on the built-in tiny backbone (FAST_K: a pytest -k expression) and leaves out
# the end-to-end files (FAST_SKIP): subprocess CLIs and trainings, torchrun, Ray, kill -9 and concurrent
# writers, ONNX exports of every variant, fuzzing, the example plugin's own suite.
FAST_K ?= not open_clip and not hf
FAST_SKIP ?= tests/test_plugin_ia3.py tests/test_train.py tests/test_cli_foundation.py tests/test_safety.py \
	tests/test_export.py tests/test_recipes_run.py tests/test_serve_ray.py tests/test_pipeline.py \
	tests/test_adapt.py tests/test_fewshot.py tests/test_quiet.py tests/test_fuzz.py tests/test_serve_hardening.py

.PHONY: demo test test-fast lint venv bench clean

$(STAMP): pyproject.toml plugins/vlkit-ia3/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[test,lint]"
	$(PY) -m pip install -q --no-deps -e plugins/vlkit-ia3
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vlkit plugins
	$(VENV)/bin/vlkit inject --backbone tiny --adapter bottleneck --reduction 8 --towers both -o $(DEMO_DIR)/injected --overwrite
	$(VENV)/bin/vlkit train recipes/quickstart.yaml -o $(DEMO_DIR)/quickstart --overwrite
	$(VENV)/bin/vlkit inspect $(DEMO_DIR)/quickstart

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

# The quick loop while editing (under 3 minutes on 2 cores): the tests not marked slow, on the built-in `tiny`
# backbone only (FAST_K leaves out the open_clip and transformers cases), less the end-to-end files (FAST_SKIP).
test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" -k "$(FAST_K)" $(addprefix --ignore=,$(FAST_SKIP))

# ruff (lint and format check) and mypy over vlkit/; every check runs, and any finding fails.
lint: $(STAMP)
	@rc=0; \
	echo "ruff check vlkit"; $(VENV)/bin/ruff check vlkit || rc=1; \
	echo "ruff format --check vlkit"; $(VENV)/bin/ruff format --check --output-format concise vlkit || rc=1; \
	echo "mypy (vlkit)"; $(VENV)/bin/mypy || rc=1; \
	exit $$rc

bench: $(STAMP)
	$(PY) bench/efficiency.py

clean:
	rm -rf runs/demo .pytest_cache
