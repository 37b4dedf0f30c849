# Everything a fresh machine needs: `make test` and `make demo` create the environment first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TYPING := .build/typing/throttllem

.PHONY: install test test-fast demo bench eval lint soak clean typing-tree ops-tools

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,triton-cpu]'
	touch $(STAMP)

install: $(STAMP) ops-tools

# promtool and prometheus, from Debian's `prometheus` package, for the ops tests (docker/
# configuration checks and a live Prometheus in tests/integration/test_prometheus_scrape.py).
# Installed only when missing; without apt-get or root it says so and the tests skip, naming why.
ops-tools:
	@if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "make ops-tools: installing Debian's prometheus package (promtool, prometheus)"; \
	  mkdir -p .build; \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	      --no-install-recommends prometheus; } >.build/ops-tools.log 2>&1 \
	    || echo "make ops-tools: WARNING: apt-get failed (see .build/ops-tools.log): the Prometheus tests will skip"; \
	else \
	  echo "make ops-tools: WARNING: promtool missing and apt-get unavailable (needs root): the Prometheus tests will skip"; \
	fi

# mypy cannot follow setuptools' package-dir mapping, so it reads the sources through a tree of
# links that mirrors the installed import names.
typing-tree:
	mkdir -p $(TYPING)
	ln -sfn ../../../controller $(TYPING)/controller
	ln -sfn ../../../python_backend $(TYPING)/backend

test: $(STAMP) ops-tools
	$(PY) -m pytest -q

test-fast: $(STAMP) ops-tools
	$(PY) -m pytest -q -m "not integration and not soak"

demo: $(STAMP)
	$(VENV)/bin/throttllem demo --out demo-out

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# The evaluation's acceptance matrix (~13 min per trace on 2 cores; needs ../shared/data).
eval: $(STAMP)
	$(PY) benchmarks/eval_matrix.py --traces conv,code --out eval-out

soak: $(STAMP) ops-tools
	$(PY) -m pytest -q -rP -m soak

lint: $(STAMP) typing-tree
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy -p throttllem.controller -p throttllem.backend

clean:
	rm -rf $(VENV) .build
