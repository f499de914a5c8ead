"""Where adnb keeps what it makes: generated data, trained weights, results records.

Everything lives under one home folder, ``$ADNB_HOME`` (default ``~/.cache/adnb``). The Makefile
points it at ``.adnb/`` inside the checkout so a clone is self-contained. Generated datasets can live
elsewhere, ``$ADNB_DATA``, so that several homes share one copy (the test suite's throwaway homes do).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def home() -> Path:
    return Path(os.environ.get("ADNB_HOME") or Path.home() / ".cache" / "adnb").expanduser()


def data_dir() -> Path:
    return Path(os.environ.get("ADNB_DATA") or home() / "data").expanduser()


def cache_dir() -> Path:
    return home() / "weights"


def results_dir() -> Path:
    """Where results records go: ``$ADNB_HOME/results``, or ``$ADNB_RESULTS`` when set (``adnb book``
    sets it to ``book_results_dir()`` for its chapters)."""
    return Path(os.environ.get("ADNB_RESULTS") or home() / "results").expanduser()


def book_results_dir() -> Path:
    """The records of ``adnb book`` builds, kept apart from those of ``run``, ``train`` and ``train-all``."""
    return home() / "book-results"


def notebooks_dir() -> Path:
    """The source notebooks of the book (in a checkout of the repository)."""
    return REPO_ROOT / "notebooks"
