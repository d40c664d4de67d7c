# Two commands matter: `make demo` and `make test`. Both set everything up first,
# and every step is idempotent (stamp files make a second run skip finished work).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.stamps

# Debian packages the tests need: ffprobe for segment checks, Chromium for
# browser tests, a JRE for the Pub/Sub emulator (already in the image).
APT_PACKAGES := ffmpeg chromium chromium-driver

.PHONY: setup demo test fuzz bench lint protos models clean apt

setup: $(STAMP)/apt $(STAMP)/install protos models

$(STAMP)/apt:
	@mkdir -p $(STAMP)
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "apt: installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  fi; \
	else echo "apt: not root or no apt-get; tests needing$(APT_PACKAGES) will skip"; fi
	@touch $@

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip wheel setuptools

$(STAMP)/install: pyproject.toml | $(VENV)/bin/python
	@mkdir -p $(STAMP)
	$(PIP) install --quiet -e '.[cloud,dev]'
	@touch $@

protos: protos/booth_pb2.py

protos/booth_pb2.py: protos/booth.proto $(STAMP)/install
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/booth.proto

models: models/pose_landmark_full.tflite

models/pose_landmark_full.tflite: | $(STAMP)/install
	$(PY) tools/fetch_models.py --dest models

demo: setup
	$(VENV)/bin/booth demo

test: setup
	$(PY) -m pytest -q -x --durations=15 tests

# Longer property-based runs of the same fuzz tests.
fuzz: setup
	FUZZ_EXAMPLES=2000 $(PY) -m pytest -q -m fuzz tests

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) models protos/*_pb2*.py protos/*_pb2*.pyi var .pytest_cache
