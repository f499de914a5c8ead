# The two commands of the README: `make book` and `make test` (plus `make lab` for readers).
# Both create .venv if it is missing and install the pinned requirements when they changed.

PRESET ?= cpu
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export ADNB_HOME ?= $(CURDIR)/.adnb
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: book test test-slow test-live lab check-book install data clean help

help:
	@echo "make book [PRESET=ci|cpu|full]   execute every chapter with papermill and build _build/html"
	@echo "make test                        unit tests + every chapter at the ci preset (read from the book when current)"
	@echo "make test-slow                   the long end-to-end checks (clusters, third-party method, killed workers)"
	@echo "make test-live                   every chapter again with live widgets, each control moved"
	@echo "make lab                         JupyterLab on the project's environment"
	@echo "make check-book                  open every page of _build/html in headless Chromium, network off"

$(PY):
	$(PYTHON) -m venv $(VENV)

# uv installs the ~6 GB of wheels (torch's CUDA build among them) in parallel: about 25 s on 2 cores where
# pip took about 4 minutes. Without uv on the package index, pip does the same install.
UV_VERSION := 0.13.9

$(STAMP): requirements.txt pyproject.toml | $(PY)
	if $(PY) -m pip install --quiet uv==$(UV_VERSION); then \
	    $(VENV)/bin/uv pip install --quiet --python $(PY) -r requirements.txt -e '.[ray]'; \
	else \
	    $(PY) -m pip install --quiet -r requirements.txt -e '.[ray]'; \
	fi  # the package comes with Ray, for train-all --executor ray
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

# One worker per core: the chapters' file runs on one, the other test files spread over all of them
# (loadfile, not loadgroup: pytest 9.2 drops the xdist_group marks loadgroup needs). Left out: the long
# end-to-end checks (test-slow, which .ci/run adds), the browser check (check-book) and the live-widget
# re-execution of every chapter (test-live).
# --durations: every run names its ten slowest tests, where a cut would pay.
PYTEST_ARGS := -n auto --dist loadfile --durations=10

test: install
	$(PY) -m pytest $(PYTEST_ARGS) -m "not slow and not browser and not live"

test-slow: install
	$(PY) -m pytest $(PYTEST_ARGS) -m "slow and not browser and not live"

test-live: install
	$(PY) -m pytest $(PYTEST_ARGS) -m live

# Widgets (every chapter's interactive figure, adnb/interactive.py) render through jupyterlab_widgets, which ipywidgets brings.
# JupyterLab refuses to start as root (containers, these project machines) without --allow-root.
lab: install
	$(PY) -m jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root)

# The built book as a reader sees it (tests/test_browser.py): needs `make book` first and a Chromium
# (apt-get install chromium). Screenshots land in _build/screens/.
check-book: install
	ADNB_BROWSER_CHECK=require $(PY) -m pytest -q tests/test_browser.py

clean:
	rm -rf _build book/chapters
