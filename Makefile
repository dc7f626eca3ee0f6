# Two commands do all the set-up on a fresh machine:
#   make sample   install, then run the pipeline on the built-in sample videos
#   make test     install, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is pinned to 2.13.0; where a local CPU wheel directory exists, use it
# instead of the registry's CUDA build. Elsewhere set TORCH_FIND_LINKS or
# TORCH_INDEX (e.g. https://download.pytorch.org/whl/cpu).
TORCH_FIND_LINKS ?= $(wildcard /opt/wheels)
TORCH_INDEX ?=
UV_ARGS := $(if $(TORCH_FIND_LINKS),--find-links $(TORCH_FIND_LINKS)) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX) --index-strategy unsafe-best-match)
EXTRAS ?= dev

.PHONY: install sample test test-fast browser bench clean

install: $(VENV)/.installed-$(EXTRAS)

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv
	$(BIN)/uv pip install -q --compile-bytecode -p $(BIN)/python $(UV_ARGS) -e ".[$(EXTRAS)]"
	touch $@

sample: install
	$(BIN)/python -m engine +experiment=sample

# Two pytest workers (pytest-xdist), a file per worker at a time: each worker
# shares one Ray session across its tests, and the suite's waits (Ray start-up,
# subprocess runs) overlap. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: install browser
	REELSIFT_BROWSER=$$(cat $(VENV)/.browser) $(PYTEST)

# The quick lane for the inner loop: everything but the slow end-to-end runs.
test-fast: install
	$(PYTEST) -m "not slow"

# Headless Chromium + chromedriver for the web UI's browser test
# (tests/test_ui.py), from Debian's packages. Best-effort: without apt-get,
# root or network the test skips and says why; where they installed, the
# test is required ($(VENV)/.browser says which), and with CI=true it fails
# rather than skips if the browser is then missing. apt's output goes to
# $(VENV)/browser-install.log.
browser: install
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then echo required > $(VENV)/.browser; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	  if ( $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver ) \
	    > $(VENV)/browser-install.log 2>&1; then echo required > $(VENV)/.browser; \
	  else echo optional > $(VENV)/.browser; \
	    echo "note: could not install chromium + chromium-driver (see $(VENV)/browser-install.log); the browser test will be skipped"; fi; \
	else echo optional > $(VENV)/.browser; echo "note: no apt-get; the browser test will be skipped"; fi

bench:
	$(MAKE) install EXTRAS=dev,bench
	$(BIN)/python scripts/bench_split.py

clean:
	rm -rf $(VENV) output outputs sample_data
