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

.PHONY: install sample test browser bench clean

install: $(VENV)/.installed-$(EXTRAS)

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv
	$(BIN)/uv pip install -q --compile-bytecode -p $(BIN)/python $(UV_ARGS) -e ".[$(EXTRAS)]"
	touch $@

sample: install
	$(BIN)/python -m engine +experiment=sample

test: install browser
	$(BIN)/python -m pytest -q

# Headless Chromium + chromedriver for the web UI's browser test
# (tests/test_ui.py), from Debian's packages. Best-effort: without them (no
# apt-get, no root, no network) the test skips and says why.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	  ( $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver ) \
	    >/dev/null 2>&1 || echo "note: could not install chromium + chromium-driver; the browser test will be skipped"; \
	else echo "note: no apt-get; the browser test will be skipped"; fi

bench:
	$(MAKE) install EXTRAS=dev,bench
	$(BIN)/python scripts/bench_split.py

clean:
	rm -rf $(VENV) output outputs sample_data
