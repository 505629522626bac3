# The README's two commands: `make run` and `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
# `make run` installs only what the demo needs (the package: the demo imports nothing
# beyond its dependencies); `make test` adds the dev and docs tools to the same venv.
# uv installs in seconds what pip takes a minute for; it comes from PyPI into the venv.
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed

.PHONY: run test test-min test-stress dist lint docs docs-serve bench system-deps clean

# The venv without pip (seeding pip takes seconds), uv put in by the interpreter's own pip
# (pip >= 22.3: --python); without such a pip, a venv with pip installs uv itself.
$(UV):
	$(PYTHON) -m venv --without-pip $(VENV)
	if $(PYTHON) -m pip --python $(BIN)/python --version >/dev/null 2>&1; then \
		$(PYTHON) -m pip --python $(BIN)/python install -q uv; \
	else \
		$(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install -q uv; \
	fi

$(RUN_STAMP): pyproject.toml | $(UV)
	$(UV) pip install -q --python $(BIN)/python -e .
	touch $@

$(STAMP): pyproject.toml $(RUN_STAMP)
	$(UV) pip install -q --python $(BIN)/python -e ".[dev,docs]" pip
	touch $@

# One worker unless WEB_CONCURRENCY says otherwise: the demo needs no more, and a second
# worker importing the SDK at the same time doubled the wait for the first page.
run: $(RUN_STAMP)
	WEB_CONCURRENCY=$${WEB_CONCURRENCY:-1} $(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

# PostgreSQL and Chromium come from Debian's packages, installed only when absent.
system-deps:
	bash scripts/install-system-deps.sh

lint: $(STAMP)
	$(BIN)/ruff check flask_chatkit
	$(BIN)/mypy flask_chatkit

# pytest in PYTEST_WORKERS processes (pytest-xdist): most tests wait on the servers they
# start, so two workers on two cores take ~6 min where one took ~13.
PYTEST_WORKERS ?= 2
test: $(STAMP) system-deps lint docs
	$(BIN)/pytest -n $(PYTEST_WORKERS)
	$(MAKE) test-min

# The pytest suite with two busy loops beside it (nice 0, like any other process), as a
# shared 2-core CI machine runs it: a timing bound without margin fails here. The loops
# are bounded (STRESS_MAX_SECONDS) and killed when pytest ends, on every path.
STRESS_MAX_SECONDS ?= 3600
test-stress: $(STAMP) system-deps
	bash scripts/test-stress.sh $(STRESS_MAX_SECONDS) -n $(PYTEST_WORKERS)

# The documentation site in docs/_build/html; warnings (and unresolved references) fail it.
# `-E`: a full rebuild, so a warning of an unchanged page is never hidden by the cache.
docs: $(STAMP)
	$(BIN)/sphinx-build -W -n -E --keep-going -q -b html docs docs/_build/html

DOCS_PORT ?= 8001
docs-serve: docs
	@echo "http://127.0.0.1:$(DOCS_PORT)/"
	$(BIN)/python -m http.server $(DOCS_PORT) --bind 127.0.0.1 --directory docs/_build/html

# The unit tests against the lowest versions pyproject.toml allows (scripts/test-min.sh),
# on every Python 3.1x Debian provides here (override: make test-min MIN_PYTHONS=python3.12).
MIN_PYTHONS ?= $(or $(wildcard /usr/bin/python3.1[0-9]),$(PYTHON))
test-min: $(STAMP) system-deps
	bash scripts/test-min.sh $(MIN_PYTHONS)

# sdist and wheel in dist/ (the package is not on PyPI: install the wheel from there).
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .

bench: $(STAMP) system-deps
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .venv-min-* dist build docs/_build docs/_generated .pytest_cache .mypy_cache .ruff_cache
