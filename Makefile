# Two commands on a fresh machine: `make run` (the whole series, offline default) and `make test`.
# Both create .venv and install what they need first. Override PYTHON / TORCH_SPEC if you like.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed only when the venv has no torch yet; Colab and conda users keep their own torch.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install run test clean-notebooks bench

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

clean-notebooks: install
	$(PY) -m helpers clean-notebooks

bench: install
	$(PY) benchmarks/bench_sdxl.py
