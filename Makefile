# Two commands on a fresh machine (each installs what it needs first):
#   make demo   train + evaluate tiny no-CoT, CoT, Coconut and Latent-SFT models on arith, print the table, write the plot
#   make test   the test suite (slow tests: make test-slow)
# Uses the active virtual environment if there is one, else creates .venv here.
#   make test-min   the suite again on the lowest versions pyproject.toml declares
#                   (.ci/constraints-min.txt), in its own .venv-min here; CI runs it after make test

ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
else
PY := $(CURDIR)/.venv/bin/python
endif
STAMP := $(dir $(PY)).latentreason-setup
MIN_PY := $(CURDIR)/.venv-min/bin/python
MIN_STAMP := $(CURDIR)/.venv-min/.latentreason-setup

.PHONY: setup demo test test-slow test-min bench check-results

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

$(MIN_PY):
	python3 -m venv $(CURDIR)/.venv-min

$(MIN_STAMP): pyproject.toml scripts/setup.sh .ci/constraints-min.txt | $(MIN_PY)
	bash scripts/setup.sh $(MIN_PY) .ci/constraints-min.txt
	touch $(MIN_STAMP)

# The two kill-and-restart tests (a SIGKILLed training, a SIGKILLed evaluation: ~75 s) check this
# package's own resume logic, which make test covers; resuming through the libraries' APIs is
# tested here by test_checkpoints.py.
MIN_SKIP := not test_resume_after_sigkill_reaches_the_same_weights and not test_eval_killed_and_restarted_loses_and_redoes_nothing

test-min: $(MIN_STAMP)
	$(MIN_PY) -m pytest -q -k "$(MIN_SKIP)"

check-results:
	$(PY) ../shared/tools/check_results.py
