# aimv2: `make test` and `make demo` do all set-up on a fresh machine.
#
#   make test                 create .venv, install torch / triton / the package + test extras, run the suite
#   make demo                 the main job on the embedded synthetic dataset (train, then probe)
#   make bench                the GPU benchmarks (writes benchmarks/results/*.json)
#   make gpu                  the first prepared GPU call (<= 480 s; benchmarks/gpu_all.sh), most valuable stages first:
#                             the image's python3 as it is (offline editable install, no venv, no
#                             registry); files to $$OUT, else benchmarks/results/. Dry mode without CUDA.
#   make gpu-more             the second call (<= 240 s): the stages `make gpu` does not hold (gpu_all.py --call more)
#   make gpu-extra            the third (<= 480 s): the [fp8] and [hf-backend] rows (gpu_all.py --call extra)
#   make gpu-wheels           download benchmarks/gpu_wheels.txt into .gpu-wheels/ (carried to the GPU, installed offline)
#   make gpu GPU_DEADLINE=300 OUT=/tmp/out GPU_ARGS=--dry
#   TORCH_SPEC=torch==2.11.0 make test    pick another torch (kept if one is already importable)

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
TRITON_CPU ?= triton==3.7.1
DALI_SPEC  ?= nvidia-dali-cuda130
PYTEST_ARGS ?=
GPU_DEADLINE ?=
GPU_ARGS ?=
OUT ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.aimv2-installed

.PHONY: setup test demo bench gpu gpu-more gpu-extra gpu-wheels clean

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "[setup] torch already importable: $$($(PYTHON) -c 'import torch; print(torch.__version__)') (kept)"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV); \
	fi
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  echo "[setup] installing $(TORCH_SPEC)"; $(BIN)/pip install -q "$(TORCH_SPEC)"; fi
	@if ! $(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
	   && ! $(BIN)/python -c "import triton" 2>/dev/null; then \
	  echo "[setup] CPU-only machine: installing $(TRITON_CPU) (kernels run in the Triton interpreter)"; \
	  $(BIN)/pip install -q "$(TRITON_CPU)"; fi
	$(BIN)/pip install -q --use-pep517 -e ".[test,tokenizers,fp8]"
	@if ! $(BIN)/python -c "import nvidia.dali" 2>/dev/null; then \
	  echo "[setup] installing $(DALI_SPEC) (optional: the DALI data backend)"; \
	  $(BIN)/pip install -q "$(DALI_SPEC)" || echo "[setup] DALI not installed: the torch data backend is used"; fi
	@touch $(STAMP)

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

demo: setup
	$(BIN)/aimv2 demo

bench: setup
	$(BIN)/pytest benchmarks -q

# no dependency on setup: on the GPU image python3 is used as it is (gpu_all.sh falls back to
# `make setup` only where torch is not importable)
gpu:
	@PYTHON="$(PYTHON)" GPU_DEADLINE="$(GPU_DEADLINE)" GPU_ARGS="$(GPU_ARGS)" OUT="$(OUT)" GPU_CALL=gpu bash benchmarks/gpu_all.sh

gpu-more:
	@PYTHON="$(PYTHON)" GPU_DEADLINE="$(GPU_DEADLINE)" GPU_ARGS="$(GPU_ARGS)" OUT="$(OUT)" GPU_CALL=more bash benchmarks/gpu_all.sh

gpu-extra:
	@PYTHON="$(PYTHON)" GPU_DEADLINE="$(GPU_DEADLINE)" GPU_ARGS="$(GPU_ARGS)" OUT="$(OUT)" GPU_CALL=extra bash benchmarks/gpu_all.sh

# the GPU image: CPython 3.12, x86_64 (benchmarks/results/gpu_all-*.log); no dependencies are pulled
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --platform manylinux2014_x86_64 -d .gpu-wheels -r benchmarks/gpu_wheels.txt
	@ls -l .gpu-wheels

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .gpu-wheels
