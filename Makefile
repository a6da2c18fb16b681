PYTHON ?= python

.PHONY: install test test-fast

install:
	$(PYTHON) -m pip install -e ".[test,torch]"

test:
	$(PYTHON) -m pytest -q

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"
