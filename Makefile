# The two commands the README gives: `make test` and `make demo`. Each creates
# or updates its own virtual environment in .venv (torch 2.13.0, CPU build),
# then builds memfast in place with --no-build-isolation.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.memfast-built
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu)

.PHONY: install test demo bench clean gpu-prebuild gpu-wheels

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0 setuptools wheel ninja
	$(BIN)/python -m pip install -q --no-build-isolation -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The second run checks the CUDA sources on this CPU: tests/cuda_emu compiles csrc/cuda/*.cu
# for an emulator of the device (fibers for threads) and routes the ops' CPU kernels to them.
test: $(STAMP)
	$(BIN)/python -m pytest -q
	MEMFAST_TEST_CUDA_DEVICE=emulator $(BIN)/python -m pytest -q tests/test_cuda_cross_entropy.py

demo: $(STAMP)
	$(BIN)/memfast demo

bench: $(STAMP)
	$(BIN)/python -m pytest bench -q --benchmark-enable --benchmark-columns=median,iqr,rounds --benchmark-sort=name

# For a GPU session (bench/gpu_session.sh), made on this CPU machine. The GPU
# image runs torch 2.11.0+cu130 on Python 3.12, which PyPI's torch==2.11.0 is:
# the extension built here against it is carried there (`carry`), saving the
# build. A CUDA torch downloads ~3 GB into .venv-gpu. CPU loops: AVX2 only (the
# GPU host's CPU is not this one).
GPU_PYTHON ?= $(firstword $(wildcard /root/.pyenv/versions/3.12*/bin/python3.12) python3.12)
GPU_VENV := .venv-gpu
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda-13*) /usr/local/cuda)

gpu-prebuild:
	test -x $(GPU_VENV)/bin/python || $(GPU_PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q torch==2.11.0 setuptools wheel ninja numpy tqdm
	MEMFAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 CUDA_HOME=$(CUDA_HOME) MEMFAST_CPU_FLAGS="-mavx2 -mfma -mf16c" \
		$(GPU_VENV)/bin/python setup.py build_ext --inplace --force --build-temp build/gpu
	$(GPU_VENV)/bin/python -c "import memfast; print(memfast.build_info())"

gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps liger-kernel==0.8.5 -d .whl

clean:
	rm -rf build $(VENV) memfast/_C*.so *.egg-info
