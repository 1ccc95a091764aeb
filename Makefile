# neo-pipeline: `make demo` (fresh machine -> registered model), `make test` (fresh machine -> green suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
RUNTIME := $(VENV)/.runtime-stamp

.PHONY: install demo test bench-smoke clean-workspace

$(RUNTIME): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned to the CPU wheel that pip finds locally; a looser range would pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $(RUNTIME)

# What the tests and benchmarks add (transformers, moto, datasets, datasketch, ...): the demo skips it.
$(STAMP): $(RUNTIME)
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: $(RUNTIME)
	$(VENV)/bin/neo run -c tiny

# Exit code 5 means "no tests collected": treat as success only then.
test: install
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc
	$(MAKE) bench-smoke

bench-smoke: install
	@set -e; for b in benchmarks/bench_*.py; do [ -e "$$b" ] || continue; echo "smoke: $$b"; $(PY) $$b --smoke; done

clean-workspace:
	rm -rf .neo
