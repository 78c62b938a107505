# Set-up and main entry points. Both `make demo` and `make test` create the virtual environment.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vlkit-installed
DEMO_DIR ?= runs/demo

.PHONY: demo test venv bench clean

$(STAMP): pyproject.toml plugins/vlkit-ia3/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[test]"
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

bench: $(STAMP)
	$(PY) bench/efficiency.py

clean:
	rm -rf runs/demo .pytest_cache
