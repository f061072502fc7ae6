# `make test` and `make demo` create the virtualenv on first use (Python 3.11, pinned packages).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
REQS := requirements.txt requirements-dev.txt constraints.txt
STAMP := $(VENV)/.installed-$(shell cat $(REQS) | sha256sum | cut -c1-16)
export NLTK_DATA ?= $(CURDIR)/tests/fixtures/nltk_data

.PHONY: venv test test-faults demo clean-demo

venv: $(STAMP)

$(STAMP): $(REQS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt -c constraints.txt
	@rm -f $(VENV)/.installed-*
	@touch $@

test: venv
	$(PY) -m pytest

test-faults: venv
	$(PY) -m pytest -m faults

demo: venv
	$(PY) -m testing.demo

bench: venv
	$(PY) bench/run.py

clean-demo:
	rm -rf demo-output .cache/demo
