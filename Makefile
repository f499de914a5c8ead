# The two commands of the README: `make book` and `make test` (plus `make lab` for readers).
# Both create .venv if it is missing and install the pinned requirements when they changed.

PRESET ?= cpu
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export ADNB_HOME ?= $(CURDIR)/.adnb
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: book test lab check-book install data clean help

help:
	@echo "make book [PRESET=ci|cpu|full]   execute every chapter with papermill and build _build/html"
	@echo "make test                        unit tests + every chapter at the ci preset"
	@echo "make lab                         JupyterLab on the project's environment"
	@echo "make check-book                  open every page of _build/html in headless Chromium, network off"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet -e '.[ray]'  # the package, with Ray for train-all --executor ray
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

# Widgets (the FAIR chapter's sliders) render through jupyterlab_widgets, which ipywidgets brings.
# JupyterLab refuses to start as root (containers, these project machines) without --allow-root.
lab: install
	$(PY) -m jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root)

# The built book as a reader sees it (tests/test_browser.py): needs `make book` first and a Chromium
# (apt-get install chromium). Screenshots land in _build/screens/.
check-book: install
	ADNB_BROWSER_CHECK=require $(PY) -m pytest -q tests/test_browser.py

clean:
	rm -rf _build book/chapters
