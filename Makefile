# The README's two commands. `make serve`: install, then run the whole system on the
# embedded default model. `make test`: install (with Debian's prometheus, which the dashboard
# test runs), then run every test. `make serve SETUP_ARGS=--with-prometheus ARGS=--prometheus`
# serves with a Prometheus.
PY := .venv/bin/python
PYTEST_ARGS ?=
SETUP_ARGS ?=

.PHONY: setup serve test lint format

setup:
	bash scripts/setup.sh $(SETUP_ARGS)

test: SETUP_ARGS += --with-prometheus

serve: setup
	$(PY) -m splitwise_local $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

format: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .
