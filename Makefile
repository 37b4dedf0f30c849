# Everything a fresh machine needs: `make test` and `make demo` create the environment first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TYPING := .build/typing/throttllem

.PHONY: install test test-fast demo bench lint soak clean typing-tree

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,triton-cpu]'
	touch $(STAMP)

install: $(STAMP)

# mypy cannot follow setuptools' package-dir mapping, so it reads the sources through a tree of
# links that mirrors the installed import names.
typing-tree:
	mkdir -p $(TYPING)
	ln -sfn ../../../controller $(TYPING)/controller
	ln -sfn ../../../python_backend $(TYPING)/backend

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration and not soak"

demo: $(STAMP)
	$(VENV)/bin/throttllem demo --out demo-out

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

soak: $(STAMP)
	$(PY) -m pytest -q -m soak

lint: $(STAMP) typing-tree
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy -p throttllem.controller -p throttllem.backend

clean:
	rm -rf $(VENV) .build
