# The two commands of the README: `make demo` runs a whole local swarm plus the site,
# `make test` runs the linter and the test suite. Both install what they need into .venv.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_ARGS ?=

.PHONY: demo test lint install migrate clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

migrate: install
	DEBUG=1 $(BIN)/python manage.py migrate --noinput

# `exec`: the demo replaces the recipe's shell, so on Ctrl-C make sees it stop cleanly (exit 0) instead
# of a shell killed by SIGINT, which it would report as "make: *** [demo] Interrupt".
demo: migrate
	DEBUG=1 exec $(BIN)/python manage.py demo $(DEMO_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) var
