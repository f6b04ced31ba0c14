# Every target does its own set-up: a virtual environment at .venv with pinned packages
# (every pip call uses constraints.txt) and redis-server (apt-get when missing).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test check lint bench bench-control-plane bench-results clean

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found (need Python 3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q -c constraints.txt --no-deps --no-build-isolation -e .
	touch $@

setup: $(STAMP)
	@bash scripts/ensure-redis.sh

demo: setup
	$(VENV)/bin/argus demo

test: setup
	$(PY) -m pytest -q

check: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy --strict common services loadgen world tests

bench: bench-control-plane bench-results

bench-control-plane: setup
	@command -v wrk >/dev/null || (apt-get install -y wrk || sudo apt-get install -y wrk) \
		>/dev/null 2>&1 || echo "wrk not installed: throughput is measured with the Python client"
	$(PY) bench/control_plane.py

# Every policy on both Azure traces, small world and SDXL, simulated: docs/RESULTS.md.
bench-results: setup
	OMP_NUM_THREADS=1 $(PY) -m loadgen bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
