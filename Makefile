# The two commands the README gives: `make test` and `make demo`. Each creates
# or updates its own virtual environment in .venv (torch 2.13.0, CPU build),
# then builds memfast in place with --no-build-isolation.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.memfast-built
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu)

.PHONY: install test demo bench clean

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0 setuptools wheel ninja
	$(BIN)/python -m pip install -q --no-build-isolation -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/memfast demo

bench: $(STAMP)
	$(BIN)/python -m pytest bench -q --benchmark-enable --benchmark-columns=median,iqr,rounds --benchmark-sort=name

clean:
	rm -rf build $(VENV) memfast/_C*.so *.egg-info
