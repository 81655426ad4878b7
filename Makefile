# Two commands do everything on a fresh machine with python3 and make:
#   make demo   - create .venv, install, run the end-to-end demo on bundled data
#                 (examples/demo.py; `make demo-quick`, or `make demo DEMO_ARGS="--quick --no-plots"`)
#   make test   - create .venv if missing, install, run the whole test suite on the
#                 TensorFlow backend and, at the same time, the unit suite on JAX
#                 (KERAS_BACKEND=jax)
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
# TensorFlow's C++ start-up notices (printed by every process that imports it,
# whatever TF_CPP_MIN_LOG_LEVEL says) are dropped from the output.
QUIET := sed -u -E '/^(I0000|E0000|W0000|WARNING: All log messages before absl)/d'

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 3
export PYTHONHASHSEED ?= 0

.PHONY: demo demo-quick test test-tf test-jax venv bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,demo,jax]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py $(DEMO_ARGS) 2>&1 | $(QUIET)

demo-quick: $(STAMP)
	$(PY) examples/demo.py --quick $(DEMO_ARGS) 2>&1 | $(QUIET)

# Two jobs, one per Keras 3 backend (tf_keras is TensorFlow in both), run at the
# same time: each job's workers wait on subprocesses, locks and their last long
# file for part of the run, and the other job's workers fill those gaps (on 2
# cores, one job after the other left ~20% of the CPU idle). Every output line
# is prefixed with its job ([tf] / [jax]). Both always run; a failure in either
# fails `make test`. `make test-tf` / `make test-jax` run one. Both get
# --tf-keras-split: the tf_keras cases (TensorFlow code in either job) of the files
# in tests/conftest.py's TF_KERAS_IN_JAX_JOB run in the JAX job, which balances the
# two jobs' CPU; `make test-tf` alone runs every tf_keras case.
test: $(STAMP)
	@( $(MAKE) --no-print-directory test-tf SPLIT=--tf-keras-split 2>&1 | sed -u 's/^/[tf]  /' ) & tf=$$!; \
	( $(MAKE) --no-print-directory test-jax SPLIT=--tf-keras-split 2>&1 | sed -u 's/^/[jax] /' ) & jax=$$!; \
	status=0; \
	wait $$tf || { status=1; echo "[tf]  FAILED: the TensorFlow job (make test-tf)"; }; \
	wait $$jax || { status=1; echo "[jax] FAILED: the JAX job (make test-jax)"; }; \
	exit $$status

# Test settings, not library settings: XLA's CPU backend at LLVM -O0 (compiles
# 20-25% faster, same results: no fast-math either way), and on JAX a
# compilation cache shared by both workers for one run (many cases compile the
# same small student; a fresh folder each run, removed after).
TEST_ENV := XLA_FLAGS="$${XLA_FLAGS:---xla_backend_optimization_level=0}"
JAX_CACHE_ENV := JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0

# integration/ first and --no-loadscope-reorder: the few long integration files are handed
# out first and the many short unit files fill both workers to the end (H1's measurements).
# `make test-tf TF_TESTS=tests/test_losses.py` runs one file.
TF_TESTS ?= integration tests
test-tf: $(STAMP)
	$(TEST_ENV) KERAS_BACKEND=tensorflow $(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder $(SPLIT) $(TF_TESTS) 2>&1 | $(QUIET)

# Keras 3 on JAX: the whole unit suite (tests/; tests marked backend("tensorflow") are
# deselected, each with its reason; integration/ is the TensorFlow job's).
# `make test-jax JAX_TESTS=tests/test_jax_losses.py` runs one file.
JAX_TESTS ?= tests
test-jax: $(STAMP)
	@cache=$$(mktemp -d); trap 'rm -rf "$$cache"' EXIT; \
	$(TEST_ENV) $(JAX_CACHE_ENV) JAX_COMPILATION_CACHE_DIR="$$cache" KERAS_BACKEND=jax \
	  $(PY) -m pytest -n 2 --dist loadfile $(SPLIT) $(JAX_TESTS) 2>&1 | $(QUIET)

bench: $(STAMP)
	$(PY) benchmarks/bench_workloads.py 2>&1 | $(QUIET)
	$(PY) benchmarks/bench_cache.py 2>&1 | $(QUIET)
	$(PY) benchmarks/bench_jax.py 2>&1 | $(QUIET)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
