# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

# (Re)install when the venv is missing or pyproject.toml is newer than the last install.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m resode_lightning.demo

test: $(STAMP)
	$(PY) -m ruff check resode_lightning tests benchmarks conftest.py
	$(PY) -m ruff format --check resode_lightning tests benchmarks conftest.py
	$(PY) -m pytest -n 2 -q  # tests/ and the docstring examples of resode_lightning/

lint: $(STAMP)
	$(PY) -m ruff check resode_lightning tests benchmarks conftest.py
	$(PY) -m ruff format --check resode_lightning tests benchmarks conftest.py

bench: $(STAMP)
	$(PY) benchmarks/conversion.py

clean:
	rm -rf $(VENV) runs .pytest_cache
