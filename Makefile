# The README names two targets: `make demo` (the local end-to-end run) and `make test`.
# Both install what they need into .venv first, offline-capable (PyPI wheels only).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,offline]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ttt run examples/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check ttt tests components pipelines
	$(BIN)/ruff format --check ttt tests components pipelines

clean:
	rm -rf ttt-store build dist *.egg-info
