# The two commands: `make run` serves Graft on the embedded default, `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.graft-installed
# The reference machine has this CPU wheel on disk; set TORCH_SPEC to a CUDA build on GPU machines.
TORCH_SPEC ?= torch==2.13.0
PIP := $(BIN)/python -m pip --disable-pip-version-check --quiet

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: run test faults venv lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m app.cli run

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fault-injection suite alone (it is part of `make test` too): kill -9, SIGTERM, duplicate deliveries,
# Redis and PostgreSQL cut mid-run, a full disk. Needs PostgreSQL and Redis on 127.0.0.1 (or the
# GRAFT_TEST_* URLs) and root for the small tmpfs of the disk-full tests.
faults: $(STAMP)
	$(BIN)/python -m pytest tests/faults $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check graft ml app workers migrations tests bench
	$(BIN)/ruff format --check graft ml app workers migrations tests bench
	$(BIN)/mypy graft ml app workers

bench: $(STAMP)
	for name in feature_cache service_overhead defaults adaptation distillation transferability resume api job_creation semi_supervised plan_cost; do \
		$(BIN)/python -m bench.$$name || exit 1; \
	done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
