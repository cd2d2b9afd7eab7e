# The two commands of the README:  make train  (the main job)  and  make test.
# Each creates .venv and installs the pinned dependencies on first use.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test lint bench clean

$(STAMP): pyproject.toml constraints.txt setup.py src/normlab/nn/csrc/batchnorm.cpp src/normlab/nn/csrc/stats.cpp
	python3 -m venv $(VENV)
	@# torch first: setup.py builds normlab's C++ kernels against it (no build isolation)
	$(PY) -m pip install --quiet -c constraints.txt setuptools torch
	$(PY) -m pip install --quiet -c constraints.txt --no-build-isolation -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/normlab train $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_batchnorm.py

clean:
	rm -rf $(VENV) runs build .pytest_cache .ruff_cache .hypothesis src/normlab/nn/*.so
