# Entry points; the README's two commands are `make demo` and `make test` spelled out.
PYTHON ?= python3
RUNS ?= 3

.PHONY: install demo test test-under-load test-gpu test-multigpu bench bench-step lint build
install:
	bash install.sh
demo: install
	$(PYTHON) -m iso_kernels prefill
test: install
	$(PYTHON) -m pytest
# The suite RUNS times while a CPU hog keeps every core busy (timing tests must hold on a loaded machine).
test-under-load: install
	RUNS=$(RUNS) PYTHON=$(PYTHON) bash tests/run_under_load.sh
test-gpu:
	$(PYTHON) -m pytest -m gpu
test-multigpu:
	$(PYTHON) -m pytest -m multigpu
# The one-shot GPU check (at most 480 s); bench-step reruns one step of its plan (at most 180 s, appended to
# the same log), e.g. make bench-step STEP=pytest_comm
bench:
	bash bench/gpu_check.sh bench/results/gpu_check
bench-step:
	$(if $(STEP),,$(error bench-step needs STEP=NAME, one of the steps bash bench/gpu_check.sh --dry-run OUT lists))
	bash bench/gpu_check.sh --step $(STEP) bench/results/gpu_check
lint:
	ruff check .
build:
	ISO_KERNELS_BUILD_EXT=1 $(PYTHON) -m pip install --no-build-isolation --no-deps -e .
