# The documented commands. `make run` and `make test` are the README's quickstart.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LINT_PATHS := gateway tests scripts $(wildcard loadtests/*.py)

.PHONY: install run test lint typecheck unit coverage e2e-vllm lint-deploy bench profile docs clean

$(STAMP): pyproject.toml
	@echo "Installing the gateway and its dev tools into $(VENV) (first run, or pyproject.toml changed; about a minute)..."
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)
	@echo "Installed: $(BIN)/llm-gateway"

install: $(STAMP)

## Gateway on 127.0.0.1:8080 in front of the bundled vLLM simulator on :8000.
## Point it at a real vLLM instead with BACKEND=http://host:8000 (or GATEWAY_BACKENDS).
run: install
	BIN=$(BIN) scripts/run-dev.sh

## Lint, type-check and the test suite (gateway and simulator processes on loopback) under
## coverage of gateway/, subprocesses included; `make unit` runs the suite alone.
test: install lint typecheck coverage
	@echo "make test: lint, types and the suite passed"

lint: install
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest -q tests --ignore=tests/e2e_vllm

## The suite under coverage, including the gateway and simulator processes it starts: the report
## for gateway/ is printed and written to .cache/coverage/report.txt (HTML in .cache/coverage/html).
coverage: install
	@echo "Running the suite under coverage: real gateway and simulator processes, about 40 minutes on 2 cores..."
	rm -rf .cache/coverage && mkdir -p .cache/coverage
	GATEWAY_TEST_COVERAGE=1 $(BIN)/coverage run -m pytest -q tests --ignore=tests/e2e_vllm; \
		status=$$?; \
		$(BIN)/coverage combine -q && \
		$(BIN)/coverage report > .cache/coverage/report.txt && \
		$(BIN)/coverage html -q -d .cache/coverage/html && \
		cat .cache/coverage/report.txt; \
		exit $$status

## Real vLLM (CPU build) end to end: builds .venv-vllm and a tiny model once, then runs the suite.
e2e-vllm: install
	bash scripts/vllm/setup-venv.sh
	.venv-vllm/bin/python scripts/vllm/make_tiny_model.py .cache/tiny-llama
	E2E_VLLM_REQUIRED=1 $(BIN)/pytest -q tests/e2e_vllm

## Deployment files: hadolint, Compose schema, cfn-lint, checkov, botocore, kubernetes-validate (manifests and the rendered Helm chart), shellcheck.
lint-deploy: install
	bash scripts/lint-deploy.sh

## First benchmark: the simulator directly vs through the gateway (bounded, loopback only).
bench: install
	$(BIN)/python -m loadtests.bench

## Where the gateway's CPU goes under the benchmark's load (py-spy, installed on first use).
profile: install
	$(BIN)/python -c "import shutil, sys; sys.exit(shutil.which('py-spy', path='$(BIN)') is None)" \
		|| $(BIN)/pip install -q --disable-pip-version-check py-spy
	$(BIN)/python -m loadtests.profile $(ARGS)

## Regenerate docs/configuration.md from the settings schema.
docs: install
	$(BIN)/python -m gateway.docgen > docs/configuration.md

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
