# Two commands a new user needs: `make demo` and `make test`.
# Both (re)create .venv from requirements.txt when it is missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= workdirs/demo
DEMO_DATA ?= data/synthetic
PROXY_DATA ?= data/photos
GLYPHS_DATA ?= data/glyphs
CROWDS_DATA ?= data/crowds
export JAX_PLATFORMS ?= cpu
# XLA:CPU allocates each step's temporaries afresh; glibc maps them as 4 KiB
# pages that fault once per step. Advised as transparent huge pages they
# fault 100x less and the demo step is ~8 % faster, with identical results
# (benchmarks/cpu_malloc.py, docs/BENCHMARKS.md "Memory allocation on CPU").
# glibc >= 2.35 reads it at process start; older glibc and other C libraries
# ignore it.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
# Faster still (0.88x of the step above, no page faults at all): mimalloc,
# from the cmeel-mimalloc wheel, preloaded and keeping freed pages for the
# next step; `python -m mimicdet_jax.cpu_alloc` prints the variables (none
# where the wheel is missing: then glibc's setting above applies). Expanded
# when a recipe runs, after .venv exists.
ALLOC_ENV = $(shell $(PY) -m mimicdet_jax.cpu_alloc)

.PHONY: venv test test-slow test-extras test-tpu tpu-plan-deps tpu-plan demo demo-data proxy-data glyphs-data crowds-data bench bench-peer clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

# Two workers, one test file each at a time (a file shares its fixtures):
# 2.5 min on a quiet 2-core Intel Xeon under mimalloc (2026-12-05), ~5.6
# min estimated on the slower 2-core AMD machine, measured at 6.4 min there
# before the allocator settings above (2026-12-02; docs/BENCHMARKS.md,
# "Test suite"); the longest files run first (tests/conftest.py).
test: $(STAMP)
	env $(ALLOC_ENV) $(PY) -m pytest -q -m "not slow and not tpu" -n 2 --dist loadfile

test-slow: $(STAMP)
	env $(ALLOC_ENV) $(PY) -m pytest -q -m slow

# The tests of the optional extras: .pth import (torch, torchvision) and the
# TFDS source (tensorflow, tensorflow-datasets). Installs them into the venv
# (several GB: torch 2.14.1 is a CUDA build on x86_64), then runs the tests
# marked torch, then those marked tfds, in two processes (torchvision's
# triton segfaults on import after tensorflow); a skip counts as a failure.
test-extras: $(STAMP)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 -r requirements-tfds.txt
	MIMICDET_REQUIRE_EXTRAS=1 $(PY) -m pytest -q -m torch
	MIMICDET_REQUIRE_EXTRAS=1 $(PY) -m pytest -q -m tfds

# libtpu: the real TPU compiler, which runs on this CPU-only machine (no TPU
# needed, ~680 MB), at the version of the installed jax. For the planner
# (`python -m mimicdet_jax.tools.plan_tpu`, docs/BENCHMARKS.md "TPU, compiled
# on CPU") and the tests marked tpu; .ci/run runs them after `make test`.
TPU_STAMP := $(VENV)/.libtpu
tpu-plan-deps: $(TPU_STAMP)

$(TPU_STAMP): $(STAMP)
	$(PY) -m pip install -q "jax[tpu]==$$($(PY) -c 'import jax; print(jax.__version__)')"
	touch $(TPU_STAMP)

test-tpu: $(TPU_STAMP)
	MIMICDET_REQUIRE_TPU=1 $(PY) -m pytest -q -m tpu

# The demo recipe on a 2-chip v5e (make tpu-plan TOPOLOGY=v5p:2x2x1 CONFIG=...).
CONFIG ?= configs/demo.py
TOPOLOGY ?= v5e:2x1
tpu-plan: $(TPU_STAMP)
	$(PY) -m mimicdet_jax.tools.plan_tpu --config $(CONFIG) --topology $(TOPOLOGY)

demo-data: $(STAMP)
	test -f $(DEMO_DATA)/annotations/val.json || \
	  $(PY) -m mimicdet_jax.data.synthetic $(DEMO_DATA) --num-train 2000 --num-val 200 --seed 0 --viz 4

# The real-image sets (docs/DATA.md), each written once by its module
# (mimicdet_jax/data/DATA_MODULE.py) into DATA_DIR: the proxy, objects cut
# from the photographs that scikit-image, scikit-learn and matplotlib ship
# (train it with configs/proxy_real.py, the demo's recipe); and two of other
# kinds, characters from matplotlib's fonts on the packaged photographs (24
# classes, small), and crowds of tiny faces, coins and textures (4 classes,
# 10-40 per image).
proxy-data: DATA_MODULE = photos
proxy-data: DATA_DIR = $(PROXY_DATA)
glyphs-data: DATA_MODULE = glyphs
glyphs-data: DATA_DIR = $(GLYPHS_DATA)
crowds-data: DATA_MODULE = crowds
crowds-data: DATA_DIR = $(CROWDS_DATA)
proxy-data glyphs-data crowds-data: $(STAMP)
	test -f $(DATA_DIR)/annotations/val.json || \
	  $(PY) -m mimicdet_jax.data.$(DATA_MODULE) $(DATA_DIR) --num-train 1500 --num-val 300 --seed 0 --viz 4

demo: demo-data
	env $(ALLOC_ENV) $(PY) -m mimicdet_jax.demo --config configs/demo.py --workdir $(DEMO_DIR) --data $(DEMO_DATA)

bench: $(STAMP)
	env $(ALLOC_ENV) $(PY) benchmarks/train_step.py --config configs/demo.py
	env $(ALLOC_ENV) $(PY) benchmarks/inference.py --config configs/demo.py

bench-peer: $(STAMP)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) benchmarks/peer_torchvision.py

clean:
	rm -rf $(VENV) workdirs
