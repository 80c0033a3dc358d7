# make serve: install what is missing into .venv, then serve the default (tiny) model.
# make test:  install what is missing into .venv, then run the test suite.
# make serve SERVE_ARGS="--http-port 9000 --grpc-port 9001 --metrics-port 9002" passes flags to dsv4-serve.
PYTHON ?= python3
VENV ?= .venv
# the CPU build of torch is pinned: an open range makes pip fetch a multi-GB CUDA build
TORCH_SPEC ?= torch==2.13.0
SERVE_ARGS ?=
PYTEST_ARGS ?=
HOST ?= grpc://127.0.0.1:8001
SCENARIO ?= short_chat
USERS ?= 4
DURATION ?= 60s
FUZZ_MINUTES ?= 15

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test load soak fuzz clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/dsv4-serve $(SERVE_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

load: $(STAMP)
	$(BIN)/python -m load_tests.run --host $(HOST) --scenario $(SCENARIO) --users $(USERS) --duration $(DURATION)

soak: $(STAMP)
	$(BIN)/python -m tests.reliability.soak

# 15 minutes of hostile requests against the real server (CI runs a short round)
fuzz: $(STAMP)
	$(BIN)/python -m tests.reliability.fuzz --minutes $(FUZZ_MINUTES)

clean:
	rm -rf $(VENV) .venv-aiperf .pytest_cache .hypothesis
