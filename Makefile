# Two commands on a fresh machine (each installs what it needs first):
#   make demo   train + evaluate tiny no-CoT and CoT models on arith, print the table, write the plot
#   make test   the test suite (slow tests: make test-slow)
# Uses the active virtual environment if there is one, else creates .venv here.

ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
else
PY := $(CURDIR)/.venv/bin/python
endif
STAMP := $(dir $(PY)).latentreason-setup

.PHONY: setup demo test test-slow bench check-results

$(PY):
	python3 -m venv $(CURDIR)/.venv

$(STAMP): pyproject.toml scripts/setup.sh | $(PY)
	bash scripts/setup.sh $(PY)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m latentreason.cli demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

check-results:
	$(PY) ../shared/tools/check_results.py
