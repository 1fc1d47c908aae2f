# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test docs lint bench clean

# (Re)install when the venv is missing or pyproject.toml is newer than the last install.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m resode_lightning.apps.demo

test: $(STAMP) docs
	$(PY) -m ruff check resode_lightning tests benchmarks conftest.py docs/rest_roles.py docs/snippets
	$(PY) -m ruff format --check resode_lightning tests benchmarks conftest.py docs/rest_roles.py docs/snippets
	$(PY) -m pytest -n 2 -q  # tests/ and the docstring examples of resode_lightning/

# The docs site (mkdocs.yml) into build/site, offline; strict: a broken reference or link fails.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

lint: $(STAMP)
	$(PY) -m ruff check resode_lightning tests benchmarks conftest.py docs/rest_roles.py docs/snippets
	$(PY) -m ruff format --check resode_lightning tests benchmarks conftest.py docs/rest_roles.py docs/snippets

bench: $(STAMP)
	$(PY) benchmarks/conversion.py

clean:
	rm -rf $(VENV) runs .pytest_cache
