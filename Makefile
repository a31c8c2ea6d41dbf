# Every target runs inside .venv, created on first use: `make verify` works on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS_STAMP := $(VENV)/.extras
# `make test` also installs the optional frameworks, so that the derive.torch and derive.jax tests run
# (they skip without them): `make test EXTRAS=` skips that.  torch is pinned to the CPU build this
# project tests with (on a machine without that file pip downloads the default build: set TORCH=...)
EXTRAS ?= 1
TORCH  ?= torch==2.13.0

.PHONY: venv verify test codegen accuracy bench docs fuzz clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# the distribution was called "derive" before it became derive-gradients: drop that old editable install
	$(PY) -m pip uninstall --quiet --yes derive 2>/dev/null || true
	$(PY) -m pip install --quiet -e '.[test,docs]'
	touch $(STAMP)

verify: $(STAMP)
	$(PY) -m derive verify

test: $(STAMP) $(if $(EXTRAS),$(EXTRAS_STAMP))
	$(PY) -m pytest

# torch first, pinned: asked for by range alone, pip would take a newer (CUDA) build
$(EXTRAS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet '$(TORCH)'
	$(PY) -m pip install --quiet -e '.[test,docs,torch,jax,peers]'
	touch $(EXTRAS_STAMP)

codegen: $(STAMP)
	$(PY) -m derive codegen

accuracy: $(STAMP)
	$(PY) -m derive accuracy

bench: $(STAMP) $(EXTRAS_STAMP)
	$(PY) -m derive bench

docs: $(STAMP)
	$(PY) -m derive.docs

# the property-based fuzz of the parser, loader and verifier, with many more examples than `make test`
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-3000} $(PY) -m pytest -q tests/test_fuzz_files.py
	@# coverage-guided (atheris) fuzz of the parser and loader; an input slower than 3 s is a finding
	$(PY) -m pip install --quiet -e '.[fuzz]'
	mkdir -p out/fuzz
	$(PY) tests/fuzz_atheris.py -atheris_runs=$${FUZZ_RUNS:-1000000} -max_total_time=$${FUZZ_SECONDS:-300} \
	    -input_timeout=3 -artifact_prefix=out/fuzz/

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
