# Two commands on a fresh machine:
#   make demo   creates .venv, installs marnet with the offline demo extras, runs the demo
#   make test   creates .venv if missing, installs, lints (ruff), runs the test suite
#
# torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject.toml as an exact matching pair:
# timm imports torchvision, and a torchvision only loads beside the torch it was built for.
# On Linux x86_64 pip takes the CUDA build of both (it also runs on CPU).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Tests and the demo never touch the network: everything they load is local.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[demo,test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/marnet demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	MARNET_PROGRESS=0 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
