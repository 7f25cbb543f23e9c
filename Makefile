# lass_sparse — the commands a user runs. `make test` installs first if needed.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2

.PHONY: install demo test test-fast bench bench-gpu gpu-bench gpu-check gpu-session lint nvcc-check clean

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*/*.cpp csrc/*/*.h)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	# Pinned: a bare `torch` pulls a multi-GB CUDA build on these machines.
	$(BIN)/python -m pip install -q "$(TORCH)" numpy
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lass-sparse experiment run experiments/demo.toml

test: $(STAMP)
	$(BIN)/python -m pytest -q tests benchmarks --benchmark-disable --durations=8

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks -m "not gpu" --benchmark-only \
	  --benchmark-json=benchmarks/results/cpu.json
	$(BIN)/python benchmarks/report.py benchmarks/results/cpu.json -o benchmarks/results/cpu.md
	@echo "wrote benchmarks/results/cpu.md; rename it after the device to commit it"

bench-gpu: $(STAMP)
	$(BIN)/python -m pytest benchmarks -m gpu --benchmark-only \
	  --benchmark-json=benchmarks/results/gpu.json
	$(BIN)/python benchmarks/report.py benchmarks/results/gpu.json -o benchmarks/results/gpu.md

# Issue 29's device-time sweep on a lent GPU (torch/triton preinstalled): build against that torch,
# then device time (CUDA events, graph replay) beside eager time, shares of the measured peaks,
# peak memory; the table in $(or $(OUT),gpu_bench_results)/.
gpu-bench:
	LASS_SPARSE_SKIP_CUDA_BUILD=0 TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-9.0} \
	  $(GPU_PY) -m pip install -q --no-build-isolation --no-deps -e .
	mkdir -p $(or $(OUT),gpu_bench_results)
	LASS_SPARSE_DEVICE_SWEEP=1 $(GPU_PY) -m pytest benchmarks/test_device_time.py -m gpu \
	  --benchmark-only --benchmark-json=$(or $(OUT),gpu_bench_results)/device.json
	$(GPU_PY) benchmarks/report.py $(or $(OUT),gpu_bench_results)/device.json \
	  -o $(or $(OUT),gpu_bench_results)/device.md

# Issue 29's one prepared run for a lent GPU session (about 9 minutes): build, the GPU tests of
# the paths no GPU has run yet, the device-time sweep under a time budget (key rows first);
# results, logs and Triton's cache in $(or $(OUT),gpu_session_results)/ as they are made.
gpu-session:
	OUT=$(or $(OUT),gpu_session_results) GPU_PY=$(GPU_PY) bash tools/gpu_session.sh

# On a lent GPU machine (torch/triton/cupy preinstalled, no network): builds with that torch,
# runs every op/module/optimizer per GPU backend vs the reference, `pytest -m "gpu or triton"`,
# the native kernels' hardening tests, the GPU benchmarks, the CLI pipeline and a joint-step profile; pass/fail table + logs in
# $(or $(OUT),gpu_check_results)/.
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) tools/gpu_check.py $(if $(OUT),--out $(OUT),)

lint: $(STAMP)
	$(BIN)/ruff check lass_sparse tests benchmarks tools examples setup.py

nvcc-check:
	bash .ci/nvcc_check.sh

clean:
	rm -rf build *.egg-info lass_sparse/*.so $(VENV)
