# The two commands of the README: `make book` and `make test` (plus `make lab` for readers).
# Both create .venv if it is missing and install the pinned requirements when they changed.

PRESET ?= cpu
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export ADNB_HOME ?= $(CURDIR)/.adnb
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: book test lab install data clean help

help:
	@echo "make book [PRESET=ci|cpu|full]   execute every chapter with papermill and build _build/html"
	@echo "make test                        unit tests + every chapter at the ci preset"
	@echo "make lab                         JupyterLab on the project's environment"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (adnb)" >/dev/null
	touch $@

install: $(STAMP)

data: install
	$(PY) -m adnb data prepare

book: data
	$(PY) -m adnb book --preset $(PRESET)
	$(VENV)/bin/jupyter-book build . --warningiserror --keep-going --builder html
	test -f _build/html/index.html
	@echo "book built: _build/html/index.html (preset $(PRESET))"

test: install
	$(PY) -m pytest

lab: install
	$(PY) -m jupyter lab notebooks/

clean:
	rm -rf _build book/chapters
