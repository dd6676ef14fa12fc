# The README's two commands. `make serve`: install, then run the whole system on the
# embedded default model. `make test`: install, then run every test.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup serve test lint format

setup:
	bash scripts/setup.sh

serve: setup
	$(PY) -m splitwise_local $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .
