# `make demo` and `make test` create .venv on first use: torch 2.13 (the CPU wheel on machines that have
# it; installed first and checked afterwards, so nothing else can pull a second torch), Triton, diffusers.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench peers ptx clean

demo: $(STAMP)
	$(PY) -m teacache_kernels demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/bench_decide.py
	$(PY) bench/bench_branch.py

# TeaCache against diffusers' FirstBlockCache, MagCache, TaylorSeer and cache-dit (about 15 minutes on CPU).
# cache-dit without its dependencies: they are all in the venv already, and it must not pull another torch.
peers: $(STAMP)
	$(PY) -m pip install --quiet --no-deps cache-dit==1.5.3
	$(PY) bench/bench_peers.py

ptx: $(STAMP)
	$(PY) -m teacache_kernels ptx --out ptx

$(STAMP): pyproject.toml setup.py .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -c "import torch; open('$(VENV)/.torch-version', 'w').write(torch.__version__)"
	$(PY) -m pip install --quiet -c .ci/constraints.txt -e ".[test]"
	$(PY) -c "import sys, torch; v = open('$(VENV)/.torch-version').read(); \
	  sys.exit(0 if torch.__version__ == v else f'installing pulled a second torch: {v} -> {torch.__version__}')"
	$(PY) -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)"
	touch $(STAMP)

clean:
	rm -rf $(VENV) .cache ptx flux_out teacache_demo.png
