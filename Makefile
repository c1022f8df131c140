# Two commands on a fresh machine: `make run` (the whole series, offline default) and `make test`.
# Both create .venv and install what they need first. Override PYTHON / TORCH_SPEC if you like.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed only when the venv has no torch yet; Colab and conda users keep their own torch.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install run test test-colab clean-notebooks bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m helpers run --profile world

# Notebooks first: the browser test then opens the report that the nbval run of the series just wrote.
test: install
	$(PY) -m pytest --nbval-lax notebooks tests -p no:cacheprovider --durations=15

# The same notebooks and the classic-notebook designer test on Colab's versions (constraints/colab-gpu.txt: diffusers,
# transformers, peft, accelerate, huggingface_hub, ipywidgets 7.7.1, notebook 6.5.7, ipykernel 6.17.1 ...).
COLAB_VENV ?= .venv-colab
COLAB_PY := $(COLAB_VENV)/bin/python

$(COLAB_VENV)/.installed: pyproject.toml constraints/colab-gpu.txt
	$(PYTHON) -m venv $(COLAB_VENV)
	$(COLAB_PY) -m pip install -q --upgrade pip
	$(COLAB_PY) -c "import torch, torchvision" 2>/dev/null || $(COLAB_PY) -m pip install -q $(TORCH_SPEC)
	$(COLAB_PY) -m pip install -q -c constraints/colab-gpu.txt -e . notebook ipykernel papermill nbval pytest playwright
	touch $@

test-colab: $(COLAB_VENV)/.installed
	$(COLAB_PY) -m pytest --nbval-lax notebooks tests/test_browser.py tests/test_colab_pins.py -p no:cacheprovider

clean-notebooks: install
	$(PY) -m helpers clean-notebooks

bench: install
	$(PY) benchmarks/bench_sdxl.py
